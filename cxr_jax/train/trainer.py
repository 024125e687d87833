"""The one training loop. A stage (`config.trainer`) only chooses the loss and the head.

  supervised  softmax CE on `label` (natural images), or masked sigmoid CE on
              `labels`/`label_mask` (CXR findings); linear head.
  supcon      supervised contrastive loss on two views; positives from `abnormal`,
              any shared finding, or Jaccard overlap (config.loss.positives);
              projection head, discarded afterwards.
  simclr      the same contrastive machinery with only the other view as positive.
  image_text  images against their reports (image_text.py): symmetric InfoNCE with a
              learned temperature, optionally plus SimCLR/SupCon on the images.
  finetune    task training from a pretrained backbone, supervised loss;
              config.finetune.mode: linear (frozen backbone, linear head), mlp
              (frozen backbone, MLP head), full (everything trains, linear head) or
              lpft (a linear probe run, then full fine-tuning from it).

Everything else is shared: the device mesh, initialisation from published weights
or an earlier stage's workdir, the optimizer, exact resume from Orbax checkpoints
(state, data position and config), periodic evaluation with a kept best checkpoint
(evaluator.py), SIGTERM handling, non-finite-loss stops, metrics.
"""

import functools
import json
import os
import signal
from typing import Any, Callable, Dict, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxr_jax import models
from cxr_jax.data import pipeline
from cxr_jax.models import heads
from cxr_jax.train import checkpointing
from cxr_jax.train import evaluator as evaluator_lib
from cxr_jax.train import image_text
from cxr_jax.train import losses
from cxr_jax.train import metrics as metrics_lib
from cxr_jax.train import optimizers
from cxr_jax.train import sharding
from cxr_jax.train.registry import TRAINERS

State = Dict[str, Any]


class NonFiniteLossError(RuntimeError):
  pass


class Preempted(Exception):
  """SIGTERM stopped a run after saving a checkpoint; re-running its command continues it.

  An exception rather than a return, so that nothing that runs after a run (a chain's
  next stage, LP-FT's fine-tuning, a study's evaluation) goes on from a partial one.
  """

  def __init__(self, workdir: str, step: int):
    super().__init__(f'Preempted (SIGTERM): the run in {workdir} saved a checkpoint at step '
                     f'{step} and stopped before finishing. Re-run the same command to continue.')
    self.workdir, self.step = workdir, step


# --- what differs between stages ------------------------------------------------------


def _apply(network, params, model_state, images, rng, train: bool):
  variables = {'params': params, **model_state}
  if train and model_state:
    (output, aux), new_state = network.apply(variables, images, train=True,
                                             mutable=list(model_state), rngs={'dropout': rng})
    return output, aux, new_state
  output, aux = network.apply(variables, images, train=train, rngs={'dropout': rng})
  return output, aux, model_state


def supervised_loss(network, config, params, model_state, batch, rng):
  logits, _, new_state = _apply(network, params, model_state, batch['image'], rng, True)
  if 'label' in batch:  # Single-label classes (natural images); soft after mixup.
    per_example = losses.softmax_cross_entropy(
        logits, batch['label'], label_smoothing=config.loss.label_smoothing)
    loss = jnp.mean(per_example)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == (
        batch['label'] if batch['label'].ndim == 1 else jnp.argmax(batch['label'], -1)))
    return loss, (new_state, {'accuracy': accuracy})
  loss = losses.sigmoid_cross_entropy_mean(logits, batch['labels'], batch['label_mask'])
  return loss, (new_state, {})


def _contrastive_features(network, params, model_state, batch, rng):
  images = batch['image']
  if images.ndim != 5 or images.shape[1] != 2:
    raise ValueError(f'Contrastive stages need two views per image ([B, 2, H, W, C]); got '
                     f'{images.shape}. Put two_views in config.data.pp.')
  flat = images.reshape(-1, *images.shape[2:])
  projected, _, new_state = _apply(network, params, model_state, flat, rng, True)
  return projected.reshape(images.shape[0], 2, -1), new_state


def supcon_loss(network, config, params, model_state, batch, rng):
  features, new_state = _contrastive_features(network, params, model_state, batch, rng)
  if config.loss.positives == 'abnormal':
    weights = losses.positive_weights(batch['abnormal'], 'same_label')
  else:
    weights = losses.positive_weights(batch['labels'], config.loss.positives,
                                      mask=batch.get('label_mask'))
  loss, stats = losses.supcon_loss_mean(features, weights, temperature=config.loss.temperature,
                                        base_temperature=config.loss.base_temperature)
  return loss, (new_state, stats)


def simclr_loss(network, config, params, model_state, batch, rng):
  features, new_state = _contrastive_features(network, params, model_state, batch, rng)
  per_anchor, stats = losses.simclr_loss(features, temperature=config.loss.temperature)
  loss = losses.mean_over_valid(per_anchor, stats.pop('anchor_has_positive'))
  return loss, (new_state, stats)


STAGES: Dict[str, Tuple[Callable, str]] = {
    # name: (loss, head kind)
    'supervised': (supervised_loss, 'linear'),
    'supcon': (supcon_loss, 'projection'),
    'simclr': (simclr_loss, 'projection'),
    'finetune': (supervised_loss, 'linear'),
    # Image-text contrastive pretraining; its network and loss live in image_text.py.
    'image_text': (image_text.loss_fn, ''),
}
# mode: (head, frozen backbone). lpft's network is full fine-tuning's; train() runs its
# linear-probe phase first (linear_probe_then_finetune).
FINETUNE_MODES = {'linear': ('linear', True), 'mlp': ('mlp', True), 'full': ('linear', False),
                  'lpft': ('linear', False)}


# --- building the run -----------------------------------------------------------------


def build_network(config) -> heads.Network:
  if config.trainer == 'image_text':
    return image_text.build_network(config)
  backbone = models.build_model(config, num_classes=None)
  head_kind, frozen = config.head.kind or STAGES[config.trainer][1], False
  if config.trainer == 'finetune':
    if config.finetune.mode not in FINETUNE_MODES:
      raise ValueError(f'finetune.mode={config.finetune.mode!r}; expected one of '
                       f'{sorted(FINETUNE_MODES)}.')
    mode_head, frozen = FINETUNE_MODES[config.finetune.mode]
    head_kind = config.head.kind or mode_head
  num_classes = config.head.num_classes if head_kind in ('linear', 'mlp') else 0
  # Runs saved before projection_hidden existed used the head's default width.
  projection_hidden = config.head.get('projection_hidden', heads.ProjectionHead.hidden)
  head_args = {'linear': {'bias_init_value': config.head.bias_init},
               'projection': {'hidden': projection_hidden}}.get(head_kind, {})
  return heads.Network(backbone, heads.make_head(head_kind, num_classes, **head_args),
                       frozen_backbone=frozen)


def initial_variables(network: heads.Network, config, rng) -> Dict[str, Any]:
  """Fresh init, then the backbone from published weights or an earlier stage's run."""
  if config.trainer == 'image_text':
    return image_text.initial_variables(network, config, rng)
  size = config.init_image_size
  variables = jax.jit(lambda r: network.init(
      r, jnp.zeros((1, size, size, 3), jnp.float32), train=False))(rng)
  variables = flax.core.unfreeze(variables)
  if config.init.weights and config.init.workdir:
    raise ValueError('Set config.init.weights or config.init.workdir, not both.')
  if config.init.weights:
    loaded = {'backbone': models.load_pretrained(network.backbone, config.init.weights)}
  elif config.init.workdir:
    checkpointing.require_complete(config.init.workdir, 'config.init.workdir')
    loaded = variables_from_workdir(config.init.workdir, head=config.init.head)
  else:
    return variables
  for part, part_variables in loaded.items():
    for collection, tree in part_variables.items():
      expected = jax.tree.map(jnp.shape, variables[collection][part])
      got = jax.tree.map(jnp.shape, tree)
      if expected != got:
        raise ValueError(f'The {part} from {config.init.weights or config.init.workdir} does '
                         f'not fit this run\'s {part} ({collection} shapes differ; model '
                         f'{config.model_name}, head {config.head.kind or "default"}).')
      variables[collection][part] = jax.tree.map(jnp.asarray, tree)
  return variables


def variables_from_workdir(workdir: str, head: bool = False) -> Dict[str, Dict[str, Any]]:
  """{'backbone': variables[, 'head': variables]} of an earlier stage's latest checkpoint."""
  state, _, _ = checkpointing.read_checkpoint(workdir)
  parts = ('backbone', 'head') if head else ('backbone',)
  out = {}
  for part in parts:
    if part not in state['params']:
      raise ValueError(f'The checkpoint in {workdir} has no {part} parameters.')
    out[part] = {'params': state['params'][part]}
    for collection, tree in state['model_state'].items():
      if part in tree:
        out[part][collection] = tree[part]
  return out


def make_train_step(network, config, tx) -> Callable:
  loss_fn = functools.partial(STAGES[config.trainer][0], network, config)

  def train_step(state: State, batch) -> Tuple[State, Dict[str, jax.Array]]:
    rng = jax.random.fold_in(state['rng'], state['step'])
    (loss, (model_state, extra)), grads = jax.value_and_grad(
        lambda p: loss_fn(p, state['model_state'], batch, rng), has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {**state, 'step': state['step'] + 1, 'opt_state': opt_state,
                 'params': optax.apply_updates(state['params'], updates),
                 'model_state': model_state}
    return new_state, {'loss': loss, 'grad_norm': optax.tree_utils.tree_norm(grads), **extra}

  return train_step


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it saves before exiting."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


# --- the loop -------------------------------------------------------------------------


def linear_probe_then_finetune(config, workdir: str) -> State:
  """LP-FT (Kumar et al., 2022): fit a linear head on the frozen backbone first, so that
  full fine-tuning starts from a good head and distorts the pretrained features less.

  The probe is its own run in WORKDIR/linear_probe (finetune.lp_steps steps, rate
  finetune.lp_learning_rate); fine-tuning then starts from its backbone and head. Each
  phase resumes on its own, so re-running the command continues wherever it stopped.
  """
  if config.finetune.lp_steps <= 0:
    raise ValueError('finetune.mode=lpft needs finetune.lp_steps > 0 (the probe phase).')
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    probe.finetune.mode = 'linear'
    probe.total_steps = config.finetune.lp_steps
    probe.optimizer.learning_rate = (config.finetune.lp_learning_rate
                                     or config.optimizer.learning_rate)
    probe.eval.best_metric = ''  # The fine-tuning phase keeps the best checkpoint.
  probe_dir = os.path.join(workdir, 'linear_probe')
  train(probe, probe_dir)
  full = config.copy_and_resolve_references()
  with full.unlocked():
    full.finetune.mode = 'full'
    full.init.weights, full.init.workdir, full.init.head = '', probe_dir, True
  return train(full, workdir)


def _with_resolved_findings(config, findings):
  """The config saved with checkpoints names the findings its classifier predicts."""
  if not findings or tuple(config.data.findings) == tuple(findings):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.findings = tuple(findings)
  return config


def train(config, workdir: str) -> State:
  sharding.initialize_distributed()
  if config.trainer not in STAGES:
    raise ValueError(f'Unknown stage {config.trainer!r}; expected one of {sorted(STAGES)}.')
  if config.trainer == 'finetune' and config.finetune.mode == 'lpft':
    return linear_probe_then_finetune(config, workdir)
  mesh = sharding.make_mesh(config.mesh.fsdp, config.mesh.devices)
  sharding.check_batch_size(config.batch_size, mesh.devices.size)
  if config.eval.every and config.eval.batch_size:
    sharding.check_batch_size(config.eval.batch_size, mesh.devices.size, 'eval.batch_size')
  network = build_network(config)
  data = pipeline.pipeline_from_config(config.data, batch_size=config.batch_size,
                                       seed=config.seed, train=True)
  config = _with_resolved_findings(config, data.findings)
  classifier = isinstance(getattr(network, 'head', None), (heads.LinearHead, heads.MLPHead))
  if classifier and data.findings and config.head.num_classes != len(data.findings):
    raise ValueError(f'config.head.num_classes={config.head.num_classes}, but the data has '
                     f'{len(data.findings)} findings to predict: {list(data.findings)}.')
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = initial_variables(network, config, init_rng)
  params = variables.pop('params')
  optimizer_config = config.optimizer
  if getattr(network, 'frozen_backbone', False):  # No optimizer state for what cannot change.
    optimizer_config = optimizer_config.copy_and_resolve_references()
    with optimizer_config.unlocked():
      optimizer_config.freeze = '^backbone/'
  # The loop counts batches; with accumulation the optimizer updates every k of them.
  accumulate = optimizer_config.get('accumulate_steps', 1)
  if config.total_steps % accumulate:
    raise ValueError(f'total_steps={config.total_steps} is not a multiple of '
                     f'optimizer.accumulate_steps={accumulate}.')
  tx, schedule = optimizers.make_optimizer(optimizer_config, params,
                                           config.total_steps // accumulate,
                                           batch_size=config.batch_size)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params), 'model_state': variables, 'rng': state_rng}
  state_sharding = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  state = jax.device_put(state, state_sharding)

  checkpoints = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  evaluator, best = None, None
  if config.eval.every:
    evaluator = evaluator_lib.Evaluator(network, config, mesh)
  if config.eval.best_metric:
    if not evaluator:
      raise ValueError(f'eval.best_metric={config.eval.best_metric!r} needs evaluations: '
                       'set eval.every > 0.')
    best = checkpointing.Checkpointer(
        os.path.join(workdir, 'best'), keep=1, best_metric=config.eval.best_metric,
        best_mode='min' if 'loss' in config.eval.best_metric else 'max')
  iterator = iter(data)
  # Everything from here on is closed on every way out, errors included: grain worker
  # processes, Orbax and TensorBoard threads left to interpreter exit print tracebacks
  # below the real error.
  writer, preemption = None, None
  try:
    if checkpoints.latest_step() is not None:
      abstract = jax.tree.map(
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
      try:
        state = checkpoints.restore(abstract, iterator)
      except ValueError as e:
        raise ValueError(_mismatch_message(workdir, config, e)) from None
      logging.info('Resumed from step %d in %s', int(state['step']), workdir)
    start = int(state['step'])
    if start < config.total_steps:  # Training on: the run is not finished until it ends.
      checkpointing.clear_complete(workdir)

    step_fn = jax.jit(make_train_step(network, config, tx), donate_argnums=(0,),
                      out_shardings=(state_sharding, sharding.replicated(mesh)))
    batch_sharding = sharding.batch_sharding(mesh)
    all_finite = jax.jit(_all_finite)
    writer = metrics_lib.MetricWriter(workdir, start_step=start)
    progress = metrics_lib.Progress(config.total_steps, config.batch_size, start)
    preemption = _Preemption()
    for step in range(start + 1, config.total_steps + 1):
      batch = pipeline.to_global(next(iterator), batch_sharding)
      state, step_metrics = step_fn(state, batch)
      preempted = preemption.requested  # Read once: the signal may arrive at any moment.
      last = step == config.total_steps
      checkpoint_due = last or preempted or step % config.checkpoint.every == 0
      if step % config.log_every == 0 or checkpoint_due or step == start + 1:
        values = jax.device_get(step_metrics)
        if not all(np.isfinite(v) for v in values.values()):
          raise NonFiniteLossError(
              f'Non-finite training metrics at step {step}: {values}. Training stopped; the '
              f'last good checkpoint (step {checkpoints.latest_step()}) is kept.')
        values['learning_rate'] = schedule((step - 1) // accumulate)
        writer.write(step, values)
        progress.show(step, values)
      if checkpoint_due or (evaluator and best and (step % config.eval.every == 0 or last)):
        # A step's loss is computed before its update, so finite metrics do not make the
        # updated state finite; only a finite state may become a checkpoint.
        if not bool(all_finite(state)):
          kept = checkpoints.latest_step()
          raise NonFiniteLossError(
              f'Non-finite parameters after step {step} (its loss, computed before the '
              f'update, was {float(step_metrics["loss"]):.4g}). Training stopped and nothing '
              'was saved for it; ' + (f'the last good checkpoint (step {kept}) is kept.'
                                      if kept is not None else
                                      'there is no earlier checkpoint. Lower the learning '
                                      'rate (or clip gradients) and run again.'))
      if evaluator and (step % config.eval.every == 0 or last):
        _evaluate(evaluator, state, step, writer, best, config)
      if checkpoint_due:
        checkpoints.save(step, state, iterator, config=config, force=True)
      if preempted:
        logging.warning('SIGTERM: saved a checkpoint at step %d; exiting.', step)
        break
    # Recorded only once the last checkpoint is on disk (saves are asynchronous).
    checkpoints.wait()
    if int(state['step']) == config.total_steps:
      checkpointing.mark_complete(workdir, config.total_steps)
  finally:
    if preemption:
      preemption.restore()
    for manager in (checkpoints, best):
      if manager:
        manager.wait()
        manager.close()
    if writer:
      writer.close()
    pipeline.close(iterator)
  if preemption.requested:  # Also when it came after the last step: the job is stopping.
    raise Preempted(workdir, int(state['step']))
  return state


def _all_finite(state: State) -> jax.Array:
  """Whether every floating-point number of the state (parameters, optimizer and model
  state) is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _mismatch_message(workdir, config, error) -> str:
  """Why a checkpoint does not fit this run: the config fields that differ, if known."""
  try:
    _, saved, step = checkpointing.read_checkpoint(workdir)
    old = flax.traverse_util.flatten_dict(saved.to_dict(), sep='.')
    new = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
    # The saved config went through JSON, which turns tuples into lists.
    as_saved = lambda v: json.loads(json.dumps(v, default=str))
    changed = [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(set(old) | set(new))
               if as_saved(old.get(k)) != as_saved(new.get(k))
               and not k.startswith('data.findings')]
  except Exception:  # pylint: disable=broad-except
    changed, step = [], '?'
  return (f'{workdir} holds a checkpoint (step {step}) of a run this config cannot resume: '
          f'its state does not fit ({str(error).splitlines()[0]}). Changed config fields: '
          f'{"; ".join(changed) or "unknown"}. Use a new --workdir, or the old config.')


def _evaluate(evaluator, state, step, writer, best, config) -> Dict[str, float]:
  results = evaluator.run(state['params'], state['model_state'])
  writer.write(step, {f'eval/{k}': v for k, v in results.items()})
  logging.info('Evaluation at step %d: %s', step, results)
  if best:
    name = config.eval.best_metric
    if name not in results:
      raise ValueError(f'eval.best_metric={name!r} is not measured for this run; it has '
                       f'{sorted(results)}.')
    if np.isfinite(results[name]):  # An undefined metric never makes a checkpoint "best".
      best.save(step, state, None, config=config, metrics={name: results[name]}, force=True)
  return results


for _name in STAGES:
  TRAINERS.add(_name, train)
