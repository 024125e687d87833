"""The one training loop; a stage (`config.trainer`) is one `Stage` entry in `STAGES`.

A stage names its network (a builder in `cxr_jax.models`), its loss, and how it starts
from an earlier run; stage modules register themselves with `add_stage`:
`train/stages.py` (supervised, supcon, simclr, finetune with LP-FT) and
`train/image_text.py` (image_text).

Everything else is shared: the device mesh, initialisation from published weights
or an earlier stage's workdir (initialization.py), the optimizer, exact resume from
Orbax checkpoints (state, data position and config), periodic evaluation with a kept
best checkpoint (evaluator.py), SIGTERM handling, non-finite-loss stops, metrics.
"""

import dataclasses
import functools
import json
import os
import signal
from typing import Any, Callable, Collection, Dict, Sequence, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cxr_jax.data import pipeline
from cxr_jax.models import heads
from cxr_jax.models import networks
from cxr_jax.registry import Registry
from cxr_jax.train import checkpointing
from cxr_jax.train import evaluator as evaluator_lib
from cxr_jax.train import initialization
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


# --- what differs between stages -----------------------------------------------------


def _backbone_and_head_parts(config, saved_parts: Collection[str]) -> Tuple[str, ...]:
  del saved_parts
  return ('backbone', 'head') if config.init.head else ('backbone',)


def _single_phase(config, workdir: str) -> Sequence[Tuple[Any, str]]:
  return [(config, workdir)]


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one `config.trainer` trains.

  Attributes:
    network: config -> the Flax module trained (a builder in `cxr_jax.models`).
    loss: (network, config, params, model_state, batch, rng) -> (loss, (new model
      state, metrics)), on a global batch.
    init_inputs: config -> keyword inputs of `network.init` (besides rng and train).
    parts_of_run: (config, top-level parameter names of `config.init.workdir`'s
      checkpoint) -> the parts taken from it.
    partial: parts taken from weights or a run may lack leaves this network has (they
      start fresh); otherwise each part must fit exactly.
    hint: config -> what must match the run started from, for errors.
    phases: (config, workdir) -> the runs one training is made of, in order, e.g.
      LP-FT's linear probe and then its fine-tuning; each resumes on its own.
  """
  network: Callable[[Any], Any]
  loss: Callable[..., Any]
  init_inputs: Callable[[Any], Dict[str, Any]] = networks.image_inputs
  parts_of_run: Callable[[Any, Collection[str]], Tuple[str, ...]] = _backbone_and_head_parts
  partial: bool = False
  hint: Callable[[Any], str] = lambda config: (
      f'Continue with the same model_name and head as that run (this run: model '
      f'{config.model_name}, head {config.head.kind or "default"}).')
  phases: Callable[[Any, str], Sequence[Tuple[Any, str]]] = _single_phase


STAGES = Registry('stage')


def add_stage(name: str, stage: Stage) -> None:
  """Registers `stage`, and the loop as the trainer of that name."""
  STAGES.add(name, stage)
  TRAINERS.add(name, train)


def _stage(config) -> Stage:
  if config.trainer not in STAGES:
    raise ValueError(f'Unknown stage {config.trainer!r}; expected one of '
                     f'{sorted(STAGES.names())}.')
  return STAGES.get(config.trainer)


# --- building the run -----------------------------------------------------------------


def build_network(config):
  """The network that stage `config.trainer` trains, as the config describes it."""
  return _stage(config).network(config)


def initial_variables(network, config, rng) -> Dict[str, Any]:
  """Fresh init, then the parts the stage takes from published weights or an earlier run."""
  stage = _stage(config)
  return initialization.initial_variables(
      network, config, rng, init_inputs=stage.init_inputs(config),
      parts_of_run=functools.partial(stage.parts_of_run, config), partial=stage.partial,
      hint=stage.hint(config))


def make_train_step(network, config, tx) -> Callable:
  loss_fn = functools.partial(_stage(config).loss, network, config)

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


def _with_resolved_findings(config, findings):
  """The config saved with checkpoints names the findings its classifier predicts."""
  if not findings or tuple(config.data.findings) == tuple(findings):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.findings = tuple(findings)
  return config


def train(config, workdir: str) -> State:
  """Trains stage `config.trainer` in `workdir` (each of its phases); the final state."""
  sharding.initialize_distributed()
  for phase_config, phase_workdir in _stage(config).phases(config, workdir):
    state = _train(phase_config, phase_workdir)
  return state


def _train(config, workdir: str) -> State:
  mesh = sharding.make_mesh(config.mesh.fsdp, config.mesh.devices)
  sharding.check_batch_size(config.batch_size, mesh.devices.size)
  if config.eval.every and config.eval.batch_size:
    sharding.check_batch_size(config.eval.batch_size, mesh.devices.size, 'eval.batch_size')
  network = build_network(config)
  data = pipeline.pipeline_from_config(config.data, batch_size=config.batch_size,
                                       seed=config.seed, train=True)
  config = _with_resolved_findings(config, data.findings)
  if heads.is_classifier(network) and data.findings and config.head.num_classes != len(data.findings):
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

