"""Labels free-text chest X-ray reports with CheXpert's 14 observations and normal/abnormal.

  python -m cxr_jax.label_reports --reports reports.csv --output labels.csv
  python -m cxr_jax.label_reports --reports reports_folder/ --output labels.csv

--reports is a CSV with an id and a report column (--id_column, --text_column), or a
folder of UTF-8 .txt files, one report each, whose id is the file name without .txt.
The output CSV has `id`, the 14 observations in CheXpert's column order and spelling
(1.0 positive, 0.0 negative, -1.0 uncertain, blank unmentioned) and `Abnormal` (1/0),
one row per input report in input order, so it feeds the CheXpert-style builders and a
manifest's label columns directly. The labeler is `cxr_jax.text.labeler` (its module
docstring says how reports are read and how support devices count).

Every report is labelled or the run stops: a missing column, an empty report, a
repeated id or a file that is not UTF-8 is an error naming the file, row and column.
"""

import csv
import io
import os
import sys
from typing import List, Sequence, Tuple

from absl import flags
from absl import logging

from cxr_jax import cli
from cxr_jax.text import labeler as labeler_lib

FLAGS = flags.FlagValues()
flags.DEFINE_string('reports', None, 'CSV of reports, or a folder of .txt reports.',
                    flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Labels CSV to write.', flag_values=FLAGS)
flags.DEFINE_string('id_column', 'id', 'Id column of a reports CSV.', flag_values=FLAGS)
flags.DEFINE_string('text_column', 'report', 'Report column of a reports CSV.',
                    flag_values=FLAGS)
flags.DEFINE_bool('devices_abnormal', False,
                  'Count a support device alone as abnormal.', flag_values=FLAGS)

ABNORMAL_COLUMN = 'Abnormal'


def _decode(data: bytes, path: str) -> str:
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise ValueError(f'{path}: not UTF-8 (byte {e.start}, line {line}: '
                     f'{data[e.start:e.start + 1]!r}); convert it to UTF-8.') from None


def read_reports(path: str, id_column: str = 'id', text_column: str = 'report'
                 ) -> Tuple[List[str], List[str]]:
  """(ids, reports) from a CSV or a folder of .txt files; errors name file, row, column."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith('.txt'))
    if not names:
      raise ValueError(f'{path}: folder has no .txt report files.')
    ids, reports = [], []
    for name in names:
      file = os.path.join(path, name)
      with open(file, 'rb') as f:
        text = _decode(f.read(), file)
      if not text.strip():
        raise ValueError(f'{file}: empty report.')
      ids.append(name[:-len('.txt')])
      reports.append(text)
    return ids, reports
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: reports file or folder not found.') from None
  reader = csv.DictReader(io.StringIO(_decode(data, path), newline=''))
  header = [c.strip() for c in (reader.fieldnames or [])]
  missing = [c for c in (id_column, text_column) if c not in header]
  if missing:
    raise ValueError(f'{path}: missing column(s) {missing}; the header has {header} '
                     '(choose others with --id_column / --text_column).')
  reader.fieldnames = header
  ids, reports, first_row = [], [], {}
  for row_number, row in enumerate(reader, start=1):
    where = f'{path} row {row_number} (line {reader.line_num})'
    if None in row:
      raise ValueError(f'{where}: more cells than the header has columns.')
    report_id = (row[id_column] or '').strip()
    if not report_id:
      raise ValueError(f'{where}, column {id_column!r}: empty id.')
    if report_id in first_row:
      raise ValueError(f'{where}, column {id_column!r}: id {report_id!r} repeats row '
                       f'{first_row[report_id]}.')
    first_row[report_id] = row_number
    text = row[text_column]
    if text is None or not text.strip():
      raise ValueError(f'{where}, column {text_column!r}: empty report (id {report_id!r}).')
    ids.append(report_id)
    reports.append(text)
  if not ids:
    raise ValueError(f'{path}: no reports (only a header).')
  return ids, reports


def format_code(code: int) -> str:
  return '' if code == labeler_lib.UNMENTIONED else f'{float(code):.1f}'


def write_labels(path: str, ids: Sequence[str], labels: labeler_lib.Labels) -> None:
  """The labels CSV described in the module docstring."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(['id', *labels.names, ABNORMAL_COLUMN])
    for report_id, codes, abnormal in zip(ids, labels.codes, labels.abnormal):
      writer.writerow([report_id, *(format_code(int(c)) for c in codes), int(abnormal)])


def main(argv: Sequence[str]) -> labeler_lib.Labels:
  cli.parse(FLAGS, argv)
  if not FLAGS.reports or not FLAGS.output:
    raise cli.app.UsageError('--reports and --output are required.')
  ids, reports = read_reports(FLAGS.reports, FLAGS.id_column, FLAGS.text_column)
  labels = labeler_lib.ReportLabeler(devices_abnormal=FLAGS.devices_abnormal).label(reports)
  write_labels(FLAGS.output, ids, labels)
  logging.info('Labelled %d reports from %s (%d abnormal) with %s into %s.', len(ids),
               FLAGS.reports, int(labels.abnormal.sum()), labeler_lib.LABELER_VERSION,
               FLAGS.output)
  return labels


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
