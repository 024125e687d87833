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
  writer = metrics.MetricWriter(str(tmp_path), start_step=3)  # A resumed run appends.
  writer.write(4, {'loss': 1.25})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert lines == [{'step': 3, 'loss': 1.5}, {'step': 4, 'loss': 1.25}]


def test_a_resumed_run_drops_what_it_logged_after_its_checkpoint(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2, 3, 4):  # Killed after step 4; its last checkpoint was step 2.
    writer.write(step, {'loss': 1.0 / step})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path), start_step=2)
  writer.write(3, {'loss': 0.3})
  writer.close()
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [(l['step'], l['loss']) for l in lines] == [(1, 1.0), (2, 0.5), (3, 0.3)]
  # TensorBoard is told to purge the repeated steps too: a SessionLog START at the
  # first step logged again makes it drop the earlier events from that step on.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  starts = [e.step for path in sorted((tmp_path / 'tensorboard').iterdir())
            for e in tf.compat.v1.train.summary_iterator(str(path))
            if e.HasField('session_log') and e.session_log.status == e.session_log.START]
  assert starts == [3], starts
