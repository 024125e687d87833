"""The training loop: stages chained, exact resume after SIGKILL, SIGTERM, non-finite loss,
and the same training on 1 and 8 devices."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from cxr_jax import main
from cxr_jax.data import pipeline
from cxr_jax.data.builders import synthetic as synthetic_builders
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import evaluator
from cxr_jax.train import initialization
from cxr_jax.train import sharding
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NATURAL_PP = 'decode|random_crop(28)|flip_lr|value_range(-1, 1)'
CXR_PP = 'decode|window|two_views|random_crop(28)|flip_lr|value_range(-1, 1, 0, 1)|rgb'
FINDINGS = ('airspace_opacity', 'atelectasis', 'cardiomegaly', 'nodule', 'pleural_effusion',
            'pneumothorax', 'tuberculosis')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('tfds'))
  synthetic_builders.prepare(synthetic_builders.make_natural_config(
      num_classes=4, image_size=32, num_train=64, num_test=16), directory)
  synthetic_builders.prepare(synthetic_builders.make_cxr_config(
      'A', image_size=32, num_examples=96), directory)
  return directory


def overrides(data_dir, stage='supervised', **extra):
  """--config.* flags for a tiny run of `stage` on the synthetic sets in `data_dir`."""
  # model.truncate=2, why this size: half of bit-tiny's stages compile in about half the
  # time and run the same code paths (the loop, resuming and test_distributed's two
  # processes do not depend on depth; the 8-device test keeps all stages, see there).
  flags = {'data.data_dir': data_dir, 'batch_size': 8, 'total_steps': 6, 'log_every': 1,
           'optimizer.schedule.warmup_steps': 1, 'checkpoint.every': 1, 'model.truncate': 2}
  if stage == 'supervised':
    flags.update({'data.name': 'synthetic_natural/4cls_32px_64_16_seed0',
                  'head.num_classes': 4, 'data.pp': NATURAL_PP})
  else:
    flags.update({'data.name': 'synthetic_cxr/site_a_32px_96_noise10_seed0',
                  'data.pp': CXR_PP})
  flags.update(extra)
  return flags


def config_for(stage, flags):
  config_file = 'supervised_natural.py' if stage == 'supervised' else 'supcon_cxr.py'
  return config_lib.load(os.path.join(REPO, 'configs', config_file), flags)


def run_main(stage, flags, workdir):
  """Starts `python -m cxr_jax.main` for a tiny run; its output goes to WORKDIR.log."""
  config_file = 'supervised_natural.py' if stage == 'supervised' else 'supcon_cxr.py'
  args = [sys.executable, '-m', 'cxr_jax.main', '--config', f'configs/{config_file}',
          '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in flags.items()]
  log = open(f'{workdir}.log', 'a')  # A file, not a pipe: a full pipe would block the run.
  return subprocess.Popen(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                          stdout=log, stderr=subprocess.STDOUT)


def log_of(workdir):
  with open(f'{workdir}.log') as f:
    return f.read()


def final_params(workdir):
  """The params of the latest checkpoint, as a flat dict of NumPy arrays."""
  backbone = initialization.variables_from_workdir(str(workdir))['backbone']
  return {'/'.join(map(str, k)): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(backbone['params']).items()}


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_stages_chain_and_report(data_dir, tmp_path):
  generic = tmp_path / 'generic'
  state = trainer.train(config_for('supervised', overrides(data_dir, **{
      'eval.every': 6, 'eval.split': 'test',
      'data.pp_eval': 'decode|central_crop(28)|value_range(-1, 1)'})), str(generic))
  assert int(state['step']) == 6
  lines = read_metrics(generic)
  assert [m['step'] for m in lines] == [1, 2, 3, 4, 5, 6, 6]
  assert {'loss', 'accuracy', 'grad_norm', 'learning_rate'} <= set(lines[0])
  assert lines[-1]['eval/examples'] == 16 and 0 <= lines[-1]['eval/accuracy'] <= 1
  assert os.listdir(generic / 'tensorboard')
  cxr = tmp_path / 'cxr'
  config = config_for('supcon', overrides(data_dir, 'supcon', total_steps=3, **{
      'eval.every': 3, 'data.pp_eval': 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'}))
  config.init.workdir = str(generic)
  trainer.train(config, str(cxr))
  assert [m['step'] for m in read_metrics(cxr)] == [1, 2, 3, 3]
  assert read_metrics(cxr)[0]['anchors_without_positive'] == 0
  assert 0 <= read_metrics(cxr)[-1]['eval/knn_auroc/cardiomegaly'] <= 1
  # SupCon started from the generic backbone, not from a fresh initialisation.
  fresh = trainer.initial_variables(trainer.build_network(config_for(
      'supcon', overrides(data_dir, 'supcon'))), config_for('supcon', overrides(
          data_dir, 'supcon')), jax.random.PRNGKey(1))
  loaded = trainer.initial_variables(trainer.build_network(config), config,
                                     jax.random.PRNGKey(1))
  root = lambda v: np.asarray(v['params']['backbone']['root_block']['standardized_conv2d'][
      'kernel'])
  np.testing.assert_array_equal(root(loaded), final_params(generic)[
      'root_block/standardized_conv2d/kernel'])
  assert not np.array_equal(root(loaded), root(fresh))


def test_unknown_key_in_init_workdir_and_bad_pp(data_dir, tmp_path):
  config = config_for('supcon', overrides(data_dir, 'supcon'))
  config.init.workdir = str(tmp_path / 'nothing')
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    trainer.train(config, str(tmp_path / 'run'))
  config = config_for('supcon', overrides(data_dir, 'supcon', **{'data.pp': 'decode|rgb'}))
  with pytest.raises(ValueError, match='two views per image'):
    trainer.train(config, str(tmp_path / 'run2'))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  config = config_for('supervised', overrides(data_dir, **{
      'optimizer.learning_rate': 1e30, 'optimizer.lr_reference_batch': 0,
      'optimizer.schedule.warmup_steps': 0, 'optimizer.schedule.name': 'constant'}))
  with pytest.raises(trainer.NonFiniteLossError, match='Non-finite training metrics at step'):
    trainer.train(config, str(tmp_path))
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  for step in steps:  # Every checkpoint kept holds finite parameters.
    assert all(np.all(np.isfinite(v)) for v in final_params_at(tmp_path, step).values())


def test_non_finite_parameters_are_never_saved(data_dir, tmp_path):
  # The loss of step 1 is computed before its update, so it is finite while the
  # parameters the update leaves are not (1e39 overflows float32: an exploded rate).
  config = config_for('supervised', overrides(data_dir, total_steps=3, **{
      'optimizer.learning_rate': 1e39, 'optimizer.lr_reference_batch': 0,
      'optimizer.schedule.warmup_steps': 0, 'optimizer.schedule.name': 'constant'}))
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'Non-finite parameters after step 1 .*nothing was saved for it; '
                     r'there is no earlier checkpoint'):
    trainer.train(config, str(tmp_path))
  assert not [s for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  config.optimizer.learning_rate = 0.01  # A sane rate starts afresh and trains.
  trainer.train(config, str(tmp_path))
  assert checkpointing.completed_step(str(tmp_path)) == 3


def final_params_at(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return {'/'.join(map(str, k)): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(restored['state']['params']).items()}


@pytest.mark.slow
@pytest.mark.parametrize('stage', ['supervised', 'supcon'])
def test_sigkill_then_rerun_equals_uninterrupted(data_dir, tmp_path, stage):
  flags = overrides(data_dir, stage, total_steps=8)
  straight = run_main(stage, flags, tmp_path / 'straight')
  assert straight.wait(timeout=600) == 0, log_of(tmp_path / 'straight')[-3000:]

  kill_after = random.Random(stage).randint(2, 6)
  interrupted = run_main(stage, flags, tmp_path / 'killed')
  metrics = tmp_path / 'killed' / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
      break
    time.sleep(0.05)
  interrupted.send_signal(signal.SIGKILL)
  interrupted.wait(timeout=60)
  resumed = run_main(stage, flags, tmp_path / 'killed')
  assert resumed.wait(timeout=600) == 0, log_of(tmp_path / 'killed')[-3000:]
  assert 'Resumed from step' in log_of(tmp_path / 'killed')
  a, b = final_params(tmp_path / 'straight'), final_params(tmp_path / 'killed')
  assert a.keys() == b.keys()
  for key in a:  # Bitwise: the same programs on the same data in the same order.
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_as_preempted(data_dir, tmp_path):
  flags = overrides(data_dir, total_steps=100000, **{'checkpoint.every': 1000})
  process = run_main('supervised', flags, tmp_path)
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('\n') >= 3):
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  # Not 0: a scheduler (or a chain) must not take a stopped run for a finished one.
  assert process.wait(timeout=120) == main.EXIT_PREEMPTED, log_of(tmp_path)[-3000:]
  last_lines = log_of(tmp_path).strip().splitlines()[-2:]
  assert 'Re-run the same command to continue' in last_lines[0], last_lines
  assert last_lines[1] == 'Exit status 75: preempted, re-run to continue.', last_lines
  assert not (tmp_path / checkpointing.COMPLETE).exists()
  steps = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert steps and max(steps) >= 3 and max(steps) < 1000


def sigterm_at(monkeypatch, step):
  """Sends this process SIGTERM when the run writes the metrics of `step`."""
  from cxr_jax.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  write = metrics_lib.MetricWriter.write

  def write_then_signal(self, at, values):
    write(self, at, values)
    if at == step:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_lib.MetricWriter, 'write', write_then_signal)


def test_preemption_stops_everything_after_it_and_completion_is_recorded(
    data_dir, tmp_path, monkeypatch):
  run = tmp_path / 'run'
  sigterm_at(monkeypatch, 2)
  with pytest.raises(trainer.Preempted, match='Re-run the same command to continue'):
    trainer.train(config_for('supervised', overrides(data_dir, total_steps=4)), str(run))
  assert not (run / checkpointing.COMPLETE).exists()
  assert checkpointing.read_checkpoint(str(run))[2] == 3  # Saved at the step it stopped.
  later = finetune_config(data_dir, 'linear', total_steps=2)
  later.init.workdir = str(run)  # Nothing may start from a run that did not finish.
  with pytest.raises(checkpointing.IncompleteRunError,
                     match=r'is a run that has not finished: its latest checkpoint is step 3'):
    trainer.train(later, str(tmp_path / 'later'))
  assert not (tmp_path / 'later' / 'checkpoints').exists()
  monkeypatch.undo()
  trainer.train(config_for('supervised', overrides(data_dir, total_steps=4)), str(run))
  assert checkpointing.completed_step(str(run)) == 4
  # Training on (a longer run) makes it unfinished again until it ends.
  sigterm_at(monkeypatch, 5)
  with pytest.raises(trainer.Preempted):
    trainer.train(config_for('supervised', overrides(data_dir, total_steps=8)), str(run))
  assert checkpointing.completed_step(str(run)) is None


EQUIVALENCE_SCRIPT = '''
import json, sys
import jax, numpy as np, flax
sys.path.insert(0, {tests_dir!r})
from test_trainer import config_for, overrides
from cxr_jax.train import trainer
assert jax.device_count() == 8
out = {{}}
for stage in ('supervised', 'supcon'):
  results = []
  for devices in (1, 8):
    # All of bit-tiny's stages: the bound below was measured on them (on half of them
    # SupCon's loss differs by 1.3e-4, float32 rounding of another network).
    config = config_for(stage, overrides({data_dir!r}, stage, total_steps=5,
                                         **{{'mesh.devices': devices, 'model.truncate': 0}}))
    workdir = {workdir!r} + f'/{{stage}}{{devices}}'
    state = trainer.train(config, workdir)
    losses = [m['loss'] for m in map(json.loads, open(workdir + '/metrics.jsonl'))]
    params = flax.traverse_util.flatten_dict(jax.device_get(state['params']))
    results.append((losses, params))
  (l1, p1), (l8, p8) = results
  out[stage] = {{'loss': float(np.max(np.abs(np.array(l1) - np.array(l8)))),
                 'params': float(max(np.max(np.abs(p1[k] - p8[k])) for k in p1))}}
print(json.dumps(out))
'''


@pytest.mark.slow
def test_eight_devices_match_one(data_dir, tmp_path):
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  script = EQUIVALENCE_SCRIPT.format(tests_dir=tests_dir, data_dir=data_dir,
                                     workdir=str(tmp_path))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  differences = json.loads(result.stdout.strip().splitlines()[-1])
  print(differences)
  # Float32 rounding only: the one- and eight-device programs sum in different orders.
  # Measured 2026-12-03 (BiT's 1x1 convolutions as products): SupCon loss 3.4e-5 on a
  # loss of about 14, parameters 4.6e-5.
  for stage, diff in differences.items():
    assert diff['loss'] <= 1e-4, (stage, diff)
    assert diff['params'] <= 1e-4, (stage, diff)


@pytest.mark.slow
def test_finetune_modes_freeze_exactly_the_backbone(data_dir, tmp_path):
  generic = tmp_path / 'generic'
  trainer.train(config_for('supervised', overrides(data_dir, total_steps=2)), str(generic))
  start = final_params(generic)
  for mode in ('linear', 'mlp', 'full'):
    config = finetune_config(data_dir, mode, total_steps=3)
    config.init.workdir = str(generic)
    state = trainer.train(config, str(tmp_path / mode))
    backbone = final_params(tmp_path / mode)
    unchanged = all(np.array_equal(start[k], backbone[k]) for k in start)
    assert unchanged == (mode != 'full'), mode
    head = jax.device_get(state['params']['head'])
    assert ('hidden0' in head) == (mode == 'mlp')
    assert np.any(np.asarray(head['dense']['kernel']))  # The head trained (zero init).
  config = finetune_config(data_dir, 'linear', **{'head.num_classes': 3})
  with pytest.raises(ValueError, match='has 7 findings to predict'):
    trainer.train(config, str(tmp_path / 'mismatch'))


def test_gradient_accumulation_advances_the_schedule_per_update(data_dir, tmp_path):
  config = config_for('supervised', overrides(data_dir, total_steps=6, **{
      'optimizer.accumulate_steps': 2, 'optimizer.schedule.warmup_steps': 0,
      'optimizer.schedule.name': 'linear'}))
  trainer.train(config, str(tmp_path))
  rates = [m['learning_rate'] for m in read_metrics(tmp_path)]
  assert rates[0] == rates[1] > rates[2] == rates[3] > rates[4] == rates[5]  # 3 updates.
  config.total_steps = 7
  with pytest.raises(ValueError, match='not a multiple of optimizer.accumulate_steps=2'):
    trainer.train(config, str(tmp_path / 'odd'))


def finetune_config(data_dir, mode='linear', **extra):
  flags = overrides(data_dir, 'supcon', **{
      'data.pp': 'decode|window|random_crop(28)|value_range(-1, 1, 0, 1)|rgb',
      'data.pp_eval': 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb',
      'head.num_classes': 7, **extra})
  config = config_for('supcon', flags)
  config.trainer, config.finetune.mode = 'finetune', mode
  return config


def test_evaluation_keeps_the_best_checkpoint_and_records_the_findings(data_dir, tmp_path):
  config = finetune_config(data_dir, 'full', total_steps=4, **{
      'eval.every': 2, 'eval.best_metric': 'loss', 'optimizer.learning_rate': 0.05})
  trainer.train(config, str(tmp_path))
  evals = [m for m in read_metrics(tmp_path) if 'eval/loss' in m]
  assert [m['step'] for m in evals] == [2, 4]
  source, _ = pipeline.open_source(config.data.name, 'validation', data_dir)
  assert evals[0]['eval/examples'] == len(source)  # Padded last batch, nothing dropped.
  assert {f'eval/auroc/{f}' for f in FINDINGS} <= set(evals[0])
  best_step = min(evals, key=lambda m: m['eval/loss'])['step']
  state, saved_config, step = checkpointing.read_checkpoint(str(tmp_path), best=True)
  assert step == best_step
  assert tuple(saved_config.data.findings) == FINDINGS  # Resolved from the dataset.
  assert sorted(os.listdir(tmp_path / 'best')) == [str(best_step)]
  config.eval.best_metric = 'auroc/nodule_typo'
  with pytest.raises(ValueError, match="best_metric='auroc/nodule_typo' is not measured"):
    trainer.train(config, str(tmp_path / 'typo'))


def test_knn_scores_rank_a_separable_label_first():
  rng = np.random.default_rng(0)
  labels = np.repeat([0.0, 1.0], 30)[:, None]
  centres = np.where(labels > 0, np.eye(8)[1], np.eye(8)[0])
  embeddings = rng.normal(size=(60, 8)) + 10 * centres  # Two directions (kNN is cosine).
  scores = evaluator.knn_scores(embeddings, labels, k=5)
  assert scores[:30].max() < scores[30:].min()
  mask = np.ones_like(labels)
  mask[30:] = 0  # Unknown labels are no evidence; with none at all the score is 0.5.
  masked = evaluator.knn_scores(embeddings, labels, mask, k=5)
  np.testing.assert_array_equal(masked[:30], 0.0)
  np.testing.assert_array_equal(masked[30:], 0.5)


@pytest.mark.slow
def test_lpft_probes_then_fine_tunes_from_the_probe(data_dir, tmp_path):
  config = finetune_config(data_dir, 'lpft', total_steps=2, **{
      'finetune.lp_steps': 3, 'finetune.lp_learning_rate': 0.1})
  trainer.train(config, str(tmp_path))
  probe_state, probe_config, probe_step = checkpointing.read_checkpoint(
      str(tmp_path / 'linear_probe'))
  assert probe_step == 3 and probe_config.finetune.mode == 'linear'
  assert probe_config.optimizer.learning_rate == 0.1
  _, full_config, full_step = checkpointing.read_checkpoint(str(tmp_path))
  assert full_step == 2 and full_config.finetune.mode == 'full' and full_config.init.head
  # Fine-tuning started from the probe's head, which had trained away from zero.
  start = trainer.initial_variables(trainer.build_network(full_config), full_config,
                                    jax.random.PRNGKey(0))
  np.testing.assert_array_equal(start['params']['head']['dense']['kernel'],
                                probe_state['params']['head']['dense']['kernel'])
  assert np.any(probe_state['params']['head']['dense']['kernel'])
  config.finetune.lp_steps = 0
  with pytest.raises(ValueError, match='needs finetune.lp_steps > 0'):
    trainer.train(config, str(tmp_path / 'no_probe'))


@pytest.mark.slow
def test_frozen_backbone_run_resumes_exactly(data_dir, tmp_path):
  # A constant rate makes a 3-step run the prefix of the 5-step one, so extending it
  # resumes mid-schedule (frozen backbone: no optimizer state for it; MLP batch stats).
  run = lambda steps, name: trainer.train(finetune_config(data_dir, 'mlp', **{
      'total_steps': steps, 'optimizer.schedule.name': 'constant'}), str(tmp_path / name))
  run(5, 'straight')
  run(3, 'resumed')
  run(5, 'resumed')
  a, _, _ = checkpointing.read_checkpoint(str(tmp_path / 'straight'))
  b, _, _ = checkpointing.read_checkpoint(str(tmp_path / 'resumed'))
  flat_a, flat_b = (flax.traverse_util.flatten_dict(s['params']) for s in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=str(key))


def test_a_batch_that_does_not_split_over_the_devices_is_named():
  sharding.check_batch_size(16, 8)
  with pytest.raises(ValueError, match=r'batch_size=12 does not split over the 8 devices of '
                     r'this run: it must be a multiple of 8 \(e.g. 8 or 16\)'):
    sharding.check_batch_size(12, 8)
  with pytest.raises(ValueError, match=r'eval.batch_size=3 .* multiple of 4 \(e.g. 4\)'):
    sharding.check_batch_size(3, 4, 'eval.batch_size')


def test_head_bias_init(data_dir):
  config = finetune_config(data_dir, 'full', **{'head.bias_init': -2.0})
  variables = trainer.initial_variables(trainer.build_network(config), config,
                                        jax.random.PRNGKey(0))
  np.testing.assert_array_equal(variables['params']['head']['dense']['bias'], -2.0)


def test_projection_head_width_is_a_setting(data_dir):
  config = config_for('supcon', overrides(data_dir, 'supcon', **{'head.projection_hidden': 48}))
  variables = trainer.initial_variables(trainer.build_network(config), config,
                                        jax.random.PRNGKey(0))
  head = variables['params']['head']
  assert head['hidden']['kernel'].shape[1] == 48 and head['output']['kernel'].shape[0] == 48
  # A run saved before the setting existed is read with the head's default width.
  del config.head['projection_hidden']
  assert trainer.build_network(config).head.hidden == 2048


def test_resuming_with_an_incompatible_config_names_what_changed(data_dir, tmp_path):
  trainer.train(config_for('supervised', overrides(data_dir, total_steps=2)), str(tmp_path))
  config = config_for('supervised', overrides(data_dir, total_steps=4))
  config.optimizer.name = 'adamw'  # Different optimizer state.
  with pytest.raises(ValueError, match=r"cannot resume.*optimizer.name: 'sgd' -> 'adamw'") as e:
    trainer.train(config, str(tmp_path))
  assert '[] -> ()' not in str(e.value)  # A list saved as JSON is the tuple it was.
  assert 'step_boundaries' not in str(e.value)


def test_an_error_is_the_last_thing_printed(data_dir, tmp_path):
  # Data workers (processes, threads) must be stopped before exit: their finalizers
  # used to print tracebacks below the error.
  flags = overrides(data_dir, 'supcon', total_steps=2, **{'data.workers': 2})
  trainer.train(config_for('supcon', flags), str(tmp_path / 'run'))
  process = run_main('supcon', {**flags, 'head.projection_hidden': 64}, tmp_path / 'run')
  assert process.wait(timeout=600) == 1
  last = log_of(tmp_path / 'run').strip().splitlines()[-1]
  assert last.startswith('ValueError: ') and 'head.projection_hidden: 2048 -> 64' in last, (
      log_of(tmp_path / 'run')[-3000:])


def test_bfloat16_step_tracks_the_float32_step():
  """bf16 compute (the full-scale recipes' default): float32 parameters, loss close."""
  from cxr_jax.train import config_lib, optimizers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
           'labels': rng.integers(0, 2, (8, 7)).astype(np.float32),
           'label_mask': np.ones((8, 7), np.float32)}
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = config_lib.base_config()
    config.model_name, config.model.dtype = 'bit-tiny', dtype
    config.head.num_classes, config.init_image_size = 7, 32
    config.optimizer.learning_rate = 0.1
    network = trainer.build_network(config)
    variables = trainer.initial_variables(network, config, jax.random.PRNGKey(0))
    params = variables.pop('params')
    tx, _ = optimizers.make_optimizer(config.optimizer, params, 10, batch_size=8)
    state = {'step': np.int32(0), 'params': params, 'opt_state': tx.init(params),
             'model_state': variables, 'rng': jax.random.PRNGKey(1)}
    step = jax.jit(trainer.make_train_step(network, config, tx))
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics['loss']))
      assert metrics['loss'].dtype == np.float32
    runs[dtype] = (params, state['params'], losses)
  start, end32, losses32 = runs['float32']
  _, end16, losses16 = runs['bfloat16']
  assert {x.dtype for x in jax.tree.leaves(end16)} == {np.dtype(np.float32)}
  np.testing.assert_allclose(losses16, losses32, rtol=0.02)
  assert losses32[-1] < losses32[0]  # The steps learn something, so tracking means something.
  # The bf16 run's parameter updates point where the float32 run's do.
  update32 = np.concatenate([np.ravel(e - s) for e, s in
                             zip(jax.tree.leaves(end32), jax.tree.leaves(start))])
  update16 = np.concatenate([np.ravel(e - s) for e, s in
                             zip(jax.tree.leaves(end16), jax.tree.leaves(start))])
  cosine = update16 @ update32 / np.linalg.norm(update16) / np.linalg.norm(update32)
  print(f'bf16 vs float32: losses {losses16} / {losses32}, update cosine {cosine:.4f}')
  assert cosine > 0.95
