"""Orbax checkpoints of the training state, the data iterator's position and the config.

A checkpoint at step s holds the state after s updates and the grain iterator ready
to yield the batch of update s+1, so resuming repeats and skips nothing. Saves are
asynchronous. A run keeps its last `keep` in WORKDIR/checkpoints (for resuming) and,
when it evaluates, the best by the evaluation metric in WORKDIR/best (a second
Checkpointer with `best_metric`, every save there carrying metrics). The run's config is saved with every step, so a checkpoint
alone says how to rebuild its network (`read_checkpoint`).

A run that reaches its last step writes WORKDIR/complete.json once that step's
checkpoint is on disk. That file, never a checkpoint's existence, is what says a run is
finished: a run stopped part-way (preempted, killed) leaves checkpoints but no record,
and anything that starts from a run (a later stage, LP-FT's fine-tuning) refuses one
without it (`require_complete`).
"""

import contextlib
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from cxr_jax import files


class Checkpointer:
  """Saves and restores a run's checkpoints in `directory`.

  A save that fails (a full disk: an OSError, raised by the next call when saving is
  asynchronous) removes its partial step directory and raises OSError (same errno)
  naming the directory, the step and the cause; the checkpoints before it are kept,
  so re-running resumes from the latest of them. Partial steps of a process killed
  while saving are removed when the next Checkpointer opens the directory.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str = '',
               best_mode: str = 'max', asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    self._saving: Optional[int] = None
    self._failed = False
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode=best_mode, keep_checkpoints_without_metrics=True)
    # Partial steps of a process killed while saving. Removed here, before the manager
    # opens the directory, rather than by Orbax's cleanup_tmp_directories, which may
    # still be deleting when the caller looks.
    self._remove_partial_steps()
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.PyGrainCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, config=None,
           metrics: Optional[dict] = None, force: bool = False) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.PyGrainCheckpointSave(data_iterator)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config.to_dict())
    # A failed asynchronous save surfaces at the next call: waiting first names its step.
    self.wait()
    self._saving = step
    with self._reporting_failures():
      self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  @contextlib.contextmanager
  def _reporting_failures(self):
    try:
      yield
    except OSError as e:
      step, self._saving, self._failed = self._saving, None, True
      try:  # Let the failed save's other writer threads end before removing its files.
        self.manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except  The same failure, reported below.
        pass
      self._remove_partial_steps()
      kept = [s for s in self.manager.all_steps(read=True)] if os.path.isdir(
          self.directory) else []
      raise files.failure(
          f'checkpoint{f" step {step}" if step is not None else ""} in {self.directory}'
          f'{f" ({e.filename})" if e.filename else ""}', e,
          'Its partial files were removed; the checkpoints before it are kept (latest: '
          f'{max(kept) if kept else "none"}) and re-running resumes from there') from e

  def _remove_partial_steps(self) -> None:
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if '.orbax-checkpoint-tmp' in name:  # Orbax's name for a step not yet committed.
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def restore(self, abstract_state: Any, data_iterator=None, step: Optional[int] = None):
    """The state at `step` (default latest); also rewinds `data_iterator` if given."""
    step = self.latest_step() if step is None else step
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.PyGrainCheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self) -> None:
    with self._reporting_failures():
      self.manager.wait_until_finished()
    self._saving = None

  def close(self) -> None:
    if self._failed:  # Reported already; closing would raise the same error again.
      try:
        self.manager.close()
      except OSError:
        pass
      # Writer threads of the failed save may have gone on after the first clean-up.
      self._remove_partial_steps()
      return
    with self._reporting_failures():
      self.manager.close()


def read_checkpoint(workdir: str, step: Optional[int] = None, best: bool = False
                    ) -> Tuple[Dict[str, Any], ml_collections.ConfigDict, int]:
  """(state as host arrays, the run's config, step) of a run's checkpoint, no target needed.

  `step` picks one of WORKDIR/checkpoints, `best=True` the one in WORKDIR/best (the best
  by the run's evaluation metric; the latest when the run did not evaluate), and by
  default the latest.
  """
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoint in {workdir}: it has no checkpoints/ directory '
                            '(is it a training run?).')
  if best and step is None and os.path.isdir(os.path.join(workdir, 'best')):
    directory = os.path.join(workdir, 'best')
  ckpt = Checkpointer(directory, asynchronous=False)
  try:
    if step is None:
      step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {directory}.')
    if step not in ckpt.manager.all_steps():
      raise FileNotFoundError(f'No checkpoint for step {step} in {directory}; it has '
                              f'{sorted(ckpt.manager.all_steps())}.')
    # Restoring onto the saved shardings fails where the devices differ from the run's
    # (a run of 8 GPUs or 2 hosts read on a laptop), so every array goes to one local device.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        ckpt.manager.item_metadata(step)['state'].tree)
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()))
  finally:
    ckpt.close()
  return restored['state'], ml_collections.ConfigDict(restored['config']), step


COMPLETE = 'complete.json'


class IncompleteRunError(RuntimeError):
  """An earlier run that something starts from has not finished."""


def mark_complete(workdir: str, step: int) -> None:
  """Records that the run in `workdir` finished at `step` (its checkpoint is written)."""
  if jax.process_index() == 0:
    # Written whole or not at all: a half-written record would read as a finished run.
    tmp = os.path.join(workdir, f'.{COMPLETE}.tmp-{os.getpid()}')
    try:
      with open(tmp, 'w') as f:
        json.dump({'step': int(step)}, f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, os.path.join(workdir, COMPLETE))
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def completed_step(workdir: str) -> Optional[int]:
  """The step at which the run in `workdir` finished, or None if it has not finished."""
  path = os.path.join(workdir, COMPLETE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return int(json.load(f)['step'])


def clear_complete(workdir: str) -> None:
  """Forgets the record before a run trains on (a longer total_steps, say)."""
  if jax.process_index() == 0 and os.path.exists(os.path.join(workdir, COMPLETE)):
    os.remove(os.path.join(workdir, COMPLETE))


def require_complete(workdir: str, field: str) -> None:
  """Raises IncompleteRunError unless the run in `workdir` finished (see COMPLETE)."""
  if completed_step(workdir) is not None:
    return
  directory = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    raise FileNotFoundError(f'{field}={workdir!r}: No checkpoint in {workdir} (is it a '
                            'training run, and has it started?).')
  raise IncompleteRunError(
      f'{field}={workdir!r} is a run that has not finished: its latest checkpoint is step '
      f'{steps[-1]} and it has no '
      f'{COMPLETE}, which a run writes only when it completes its last step (it was '
      'preempted or killed part-way, or is still running). Re-run its command to finish it '
      'first (re-running resumes it); a chain or LP-FT run does this when re-run.')
