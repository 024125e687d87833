"""Where a run reports: metrics.jsonl, TensorBoard event files, and a progress line."""

import json
import os
import sys
import time
from typing import Dict

import jax
import numpy as np


class MetricWriter:
  """Appends {'step': s, **metrics} lines to WORKDIR/metrics.jsonl and TensorBoard.

  Only process 0 writes; a resumed run appends to the same files.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tensorboard = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    for key, value in values.items():
      self._tensorboard.add_scalar(key, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tensorboard.close()


class Progress:
  """'step 120/1000  loss 0.512  37.2 img/s  ETA 4m10s' lines, every `every` steps."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total, self.batch_size = total_steps, batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()
    self._first = True

  def line(self, step: int, metrics: Dict[str, float]) -> str:
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) * self.batch_size / max(elapsed, 1e-9)
    first = self._first
    self._last_step, self._last_time, self._first = step, now, False
    shown = '  '.join(f'{k} {float(v):.4g}' for k, v in metrics.items())
    if first:  # Its time is mostly compilation; a rate or ETA from it would mislead.
      return f'step {step}/{self.total}  {shown}  first step (compiling) {elapsed:.1f}s'
    eta = (self.total - step) * self.batch_size / max(rate, 1e-9)
    return (f'step {step}/{self.total}  {shown}  {rate:.1f} img/s  '
            f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')

  def show(self, step: int, metrics: Dict[str, float]) -> None:
    if jax.process_index() == 0:
      print(self.line(step, metrics), file=sys.stderr, flush=True)
