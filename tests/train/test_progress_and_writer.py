"""The progress line: no rate from the compiling first step, then images/s and ETA."""

import json

from cxr_jax.train import metrics


def test_progress_line_skips_the_compiling_step_then_shows_rate_and_eta():
  progress = metrics.Progress(total_steps=100, batch_size=8)
  first = progress.line(1, {'loss': 0.5})
  assert 'first step (compiling)' in first and 'ETA' not in first
  later = progress.line(11, {'loss': 0.25})
  assert later.startswith('step 11/100  loss 0.25  ') and 'img/s  ETA ' in later


def test_metric_writer_appends_jsonl(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(3, {'loss': 1.5})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path))  # A resumed run appends.
  writer.write(4, {'loss': 1.25})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines == [{'step': 3, 'loss': 1.5}, {'step': 4, 'loss': 1.25}]
