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

  Only process 0 writes. A run resumed from its checkpoint at `start_step` appends to the
  same files, after dropping what it logged past that step before it stopped (it logs
  those steps again), so that plots and TensorBoard count each step once.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    self._tensorboard = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      dropped = _truncate_after(path, start_step)
      self._jsonl = open(path, 'a')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step: TensorBoard drops the earlier files' events from this step on.
      self._tensorboard = SummaryWriter(
          os.path.join(workdir, 'tensorboard'),
          purge_step=start_step + 1 if start_step or dropped else None)

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


def _truncate_after(path: str, step: int) -> bool:
  """Rewrites the metrics.jsonl at `path` without its lines for steps after `step`;
  whether there were any."""
  if not os.path.exists(path):
    return False
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for number, line in enumerate(lines, 1):
    try:
      if json.loads(line)['step'] <= step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      if number == len(lines):  # The last line, cut short by the kill that stopped the run.
        continue
      raise ValueError(f'{path}, line {number}: not a metrics line ({line[:200]!r}).') from None
  if len(kept) == len(lines):
    return False
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(''.join(line + '\n' for line in kept))
  os.replace(tmp, path)
  return True


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
