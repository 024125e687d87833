"""Orbax checkpoints of the training state together with the data iterator's position.

A checkpoint at step s holds the state after s updates and the grain iterator ready
to yield the batch of update s+1, so resuming repeats and skips nothing. Saves are
asynchronous; the last `keep` are kept, plus the best by an evaluation metric when
`best_metric` is set.
"""

import os
from typing import Any, Optional

import grain.python as grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str = '',
               best_mode: str = 'max', asynchronous: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode=best_mode, keep_checkpoints_without_metrics=True)
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.PyGrainCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, metrics: Optional[dict] = None,
           force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.PyGrainCheckpointSave(data_iterator)),
        metrics=metrics, force=force)

  def restore(self, abstract_state: Any, data_iterator=None, step: Optional[int] = None):
    """The state at `step` (default latest); also rewinds `data_iterator` if given."""
    step = self.latest_step() if step is None else step
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.PyGrainCheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
