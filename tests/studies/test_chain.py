"""Chaining recipes: references between stages, their files and datasets (into fields
computed from them too), the tokenizer stage, and bad chains named."""

import os
import random
import signal
import subprocess
import sys
import time

import flax
import ml_collections
import numpy as np
import pytest

from cxr_jax import main
from cxr_jax import train
from cxr_jax.studies import chain
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import image_text
from cxr_jax.train import tokenizer as tokenizer_trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_references_resolve_to_datasets_and_stage_workdirs():
  stage = config_lib.base_config()
  stage.data.name, stage.data.data_dir, stage.init.workdir = '@site_a', '@data_dir', '@generic'
  resolved = chain.resolve(stage, {'site_a': 'synthetic_cxr/site_a_32px', 'data_dir': '/d',
                                   'generic': '/w/generic'})
  assert (resolved.data.name, resolved.data.data_dir, resolved.init.workdir) == (
      'synthetic_cxr/site_a_32px', '/d', '/w/generic')
  assert stage.data.name == '@site_a'  # The recipe itself is left as it was.
  with pytest.raises(ValueError, match=r"config.init.workdir='@generic' refers to nothing"):
    chain.resolve(stage, {'site_a': 'x', 'data_dir': '/d'})


def test_bad_chains_are_named(tmp_path):
  config = ml_collections.ConfigDict({'trainer': 'chain', 'data_dir': str(tmp_path),
                                      'synthetic': {}, 'order': ('a', 'b'),
                                      'stages': {'a': config_lib.base_config()}})
  with pytest.raises(ValueError, match=r"names stages \['b'\] that config.stages lacks"):
    chain.run_chain(config, str(tmp_path))
  with pytest.raises(ValueError, match="synthetic.x.kind must be 'cxr' or 'natural'"):
    chain.build_synthetic({'x': {'kind': 'photos', 'args': {}}}, str(tmp_path))
  config.order = ('a',)
  config.stages.a.trainer = 'chain'
  with pytest.raises(ValueError, match="Stage 'a' has trainer 'chain'"):
    chain.run_chain(config, str(tmp_path))


def _image_text_stage(tokenizer):
  """An image-text recipe whose data.pp follows text.tokenizer (a FieldReference)."""
  stage = image_text.add_config_fields(config_lib.base_config())
  stage.trainer = 'image_text'
  stage.text.tokenizer = tokenizer
  stage.data.pp = image_text.tokenize_op(stage) + '|decode'
  return stage


def test_paths_in_stage_workdirs_resolve_into_computed_fields():
  stage = _image_text_stage('@tokenizer/tokenizer.json')
  stage.init.workdir = '@generic'  # The whole workdir, as before.
  stage.data.data_dir = '@data_dir/site_a'
  references = {'tokenizer': '/w/tokenizer', 'generic': '/w/generic', 'data_dir': '/d',
                'site_a': 'synthetic_cxr/a_32px'}
  resolved = chain.resolve(stage, references, directories=('tokenizer', 'generic', 'data_dir'))
  assert resolved.text.tokenizer == '/w/tokenizer/tokenizer.json'
  assert resolved.data.pp == "tokenize('/w/tokenizer/tokenizer.json', 64, '')|decode"
  assert (resolved.init.workdir, resolved.data.data_dir) == ('/w/generic', '/d/site_a')
  # The recipe keeps its references, and its pp still follows text.tokenizer.
  assert stage.data.pp == "tokenize('@tokenizer/tokenizer.json', 64, '')|decode"
  stage.text.tokenizer = '/elsewhere.json'
  assert stage.data.pp.startswith("tokenize('/elsewhere.json'")


@pytest.mark.parametrize('value,message', [
    ('@tokenizer/tokenizer.json', r"config.text.tokenizer='@tokenizer/tokenizer.json' "
     r"refers to nothing; known: \['@data_dir', '@site_a'\]"),
    ('@site_a/x', r"'@site_a/x': @site_a is not a directory, so it takes no /PATH; "
     r"directories: \['@data_dir'\]"),
    ('@data_dir//abs', r"'@data_dir//abs': expected @data_dir/PATH with PATH relative to /d"),
    ('@data_dir/', r"expected @data_dir/PATH"),
])
def test_bad_references_are_named(value, message):
  with pytest.raises(ValueError, match=message):
    chain.resolve(_image_text_stage(value), {'data_dir': '/d', 'site_a': 'x'},
                  directories=('data_dir',))


def test_references_to_later_stages_stop_the_chain_before_it_runs(tmp_path):
  later = _image_text_stage('@tokenizer/tokenizer.json')
  tokenizer_stage = tokenizer_trainer.default_config()
  tokenizer_stage.data.name, tokenizer_stage.data.data_dir = '@site_a', '@data_dir'
  config = ml_collections.ConfigDict({
      'trainer': 'chain', 'data_dir': str(tmp_path / 'tfds'),
      'synthetic': {'site_a': {'kind': 'cxr', 'args': {'site': 'A'}}},
      'order': ('text', 'tokenizer'), 'stages': {'text': later, 'tokenizer': tokenizer_stage}})
  with pytest.raises(ValueError, match=r"Stage 'text': config.text.tokenizer="
                     r"'@tokenizer/tokenizer.json' refers to nothing; known: "
                     r"\['@data_dir', '@site_a'\] \(a stage can refer to the stages before"):
    chain.run_chain(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'tfds')  # Nothing was generated, nothing ran.
  config.order = ('tokenizer', 'text')
  chain.check_stages(config)


def test_a_study_stage_whose_config_cannot_run_stops_the_chain_before_it_runs():
  """The study's own config check runs with the chain's: a pretraining stage must not
  run for half an hour before a budget typo in the study after it is found."""
  config = config_lib.load(os.path.join(REPO, 'configs', 'quickstart.py'))
  chain.check_stages(config)
  config.stages.study.budgets = (10, 45, 100)
  with pytest.raises(ValueError, match=r"Stage 'study': config.finetune.budgets has \[500\], "
                     r"which are not in config.budgets \(10, 45, 100\)"):
    chain.check_stages(config)


def test_the_tokenizer_trainer_is_registered():
  assert train.TRAINERS.get('tokenizer') is tokenizer_trainer.run


@pytest.mark.parametrize('data', ['synthetic', 'real'])
def test_pretraining_comparison_trains_the_tokenizer_its_image_text_stage_reads(data):
  config = config_lib.load(os.path.join(REPO, 'configs', f'pretraining_comparison.py:{data}'))
  chain.check_stages(config)  # Every reference names something before it.
  order = list(config.order)
  assert order.index('tokenizer') < order.index('image_text')
  assert config.stages.tokenizer.trainer == 'tokenizer'
  assert config.stages.tokenizer.data.split == 'train'
  references = {n: f'/w/{n}' for n in order}
  references.update({'data_dir': '/d', **{n: f'tfds/{n}' for n in config.synthetic.keys()}})
  text = chain.resolve(config.stages.image_text, references, directories=order)
  assert text.text.tokenizer == '/w/tokenizer/tokenizer.json'
  assert text.data.pp.startswith("tokenize('/w/tokenizer/tokenizer.json', ")
  tokenizer = chain.resolve(config.stages.tokenizer, references, directories=order)
  # The tokenizer reads the reports image_text pretrains on.
  assert tokenizer.data.name == text.data.name and tokenizer.data.data_dir == '/d'


# A chain of two tiny stages, the second LP-FT from the first, for `python -m cxr_jax.main`.
FAULT_RECIPE = '''
import ml_collections
from cxr_jax.train import config_lib

def get_config(data_dir):
  def stage(trainer, steps):
    c = config_lib.base_config()
    c.trainer, c.total_steps, c.batch_size, c.log_every = trainer, steps, 8, 1
    c.checkpoint.every, c.init_image_size, c.head.num_classes = 1, 28, 4
    # Why this size: half of bit-tiny's stages compile in about half the time; stopping
    # and resuming a chain does not depend on the network's depth.
    c.model.truncate = 2
    c.data.name, c.data.data_dir = '@natural', '@data_dir'
    c.data.pp = 'decode|random_crop(28)|flip_lr|value_range(-1, 1)'
    c.optimizer.schedule.warmup_steps = 1
    return c
  generic, ft = stage('supervised', 6), stage('finetune', 3)
  ft.finetune.mode, ft.finetune.lp_steps, ft.init.workdir = 'lpft', 3, '@generic'
  return ml_collections.ConfigDict({
      'trainer': 'chain', 'data_dir': data_dir, 'order': ('generic', 'ft'),
      'synthetic': {'natural': {'kind': 'natural', 'args': {
          'num_classes': 4, 'image_size': 32, 'num_train': 64, 'num_test': 16}}},
      'stages': {'generic': generic, 'ft': ft}})
'''
# Where each run's metrics go, in the order they train: the chain's first stage, then
# LP-FT's probe and its fine-tuning.
PHASES = {'generic': 6, 'ft/linear_probe': 3, 'ft': 3}


def _all_params(workdir):
  out = {}
  for phase in PHASES:
    state, _, _ = checkpointing.read_checkpoint(os.path.join(workdir, phase))
    for key, value in flax.traverse_util.flatten_dict(state['params']).items():
      out[(phase, *key)] = np.asarray(value)
  return out


def _start(recipe, data_dir, workdir):
  log = open(f'{workdir}.log', 'a')  # A file, not a pipe: a full pipe would block the run.
  return subprocess.Popen(
      [sys.executable, '-m', 'cxr_jax.main', '--config', f'{recipe}:{data_dir}',
       '--workdir', str(workdir)], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      stdout=log, stderr=subprocess.STDOUT)


def _steps_logged(workdir, phase):
  path = os.path.join(workdir, phase, 'metrics.jsonl')
  return len(open(path).read().splitlines()) if os.path.exists(path) else 0


@pytest.mark.slow
def test_sigterm_and_sigkill_anywhere_in_a_chain_and_lpft_change_nothing(tmp_path):
  recipe = tmp_path / 'recipe.py'
  recipe.write_text(FAULT_RECIPE)
  data_dir = tmp_path / 'tfds'
  straight = _start(recipe, data_dir, tmp_path / 'straight')
  assert straight.wait(timeout=900) == 0, (tmp_path / 'straight.log').read_text()[-3000:]

  workdir = tmp_path / 'interrupted'
  rng = random.Random(17)
  # One fault in each run of the two stages, at a seeded random step of it.
  faults = [(signal.SIGTERM, 'generic'), (signal.SIGTERM, 'ft/linear_probe'),
            (signal.SIGKILL, 'ft')]
  for sig, phase in faults:
    at = _steps_logged(workdir, phase) + 1 + rng.randrange(PHASES[phase] - 1)
    process = _start(recipe, data_dir, workdir)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None and _steps_logged(
        workdir, phase) < at:
      time.sleep(0.02)
    assert process.poll() is None, (tmp_path / 'interrupted.log').read_text()[-3000:]
    process.send_signal(sig)
    code = process.wait(timeout=300)
    log = (tmp_path / 'interrupted.log').read_text()
    if sig == signal.SIGTERM:
      assert code == main.EXIT_PREEMPTED, log[-3000:]
      assert log.strip().splitlines()[-1].endswith('preempted, re-run to continue.'), log[-3000:]
      # Nothing after the stopped run started: the chain's next stage, LP-FT's fine-tuning.
      later = list(PHASES)[list(PHASES).index(phase) + 1]
      assert not os.path.exists(os.path.join(workdir, later, 'checkpoints')), later
      # Recorded as complete exactly when it had reached its last step when it stopped.
      stopped_at = checkpointing.read_checkpoint(os.path.join(workdir, phase))[2]
      assert (checkpointing.completed_step(os.path.join(workdir, phase)) == stopped_at) == (
          stopped_at == PHASES[phase]), (phase, stopped_at)
  finished = _start(recipe, data_dir, workdir)
  assert finished.wait(timeout=900) == 0, (tmp_path / 'interrupted.log').read_text()[-3000:]
  a, b = _all_params(tmp_path / 'straight'), _all_params(workdir)
  assert a.keys() == b.keys()
  for key in a:  # Bitwise: the same programs on the same data in the same order.
    np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))
