"""The label_reports command line: CSV and folder input, output format, bad input."""

import csv
import os

import pytest

from cxr_jax import label_reports
from cxr_jax.data import labels as labels_lib


def _read(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _run(tmp_path, reports, *extra):
  output = str(tmp_path / 'out' / 'labels.csv')
  label_reports.main(['label_reports', f'--reports={reports}', f'--output={output}', *extra])
  return _read(output)


def test_csv(tmp_path):
  path = tmp_path / 'reports.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['study', 'text'])
    writer.writerow(['s1', 'FINDINGS: Small left pleural effusion.\nIMPRESSION: No pneumothorax.'])
    writer.writerow(['s2', 'IMPRESSION: Possible right lower lobe pneumonia.'])
    writer.writerow(['s3', 'IMPRESSION: Normal chest.'])
  rows = _run(tmp_path, path, '--id_column=study', '--text_column=text')
  assert list(rows[0]) == ['id', *labels_lib.CHEXPERT_FINDINGS, 'Abnormal']
  assert [r['id'] for r in rows] == ['s1', 's2', 's3']
  assert rows[0]['Pleural Effusion'] == '1.0' and rows[0]['Pneumothorax'] == '0.0'
  assert rows[0]['Edema'] == '' and rows[0]['Abnormal'] == '1'
  assert rows[1]['Pneumonia'] == '-1.0' and rows[1]['Abnormal'] == '1'
  assert rows[2]['No Finding'] == '1.0' and rows[2]['Abnormal'] == '0'
  # Codes parse with the builders' own reader.
  assert labels_lib.parse_code(rows[1]['Pneumonia'], source='x') == labels_lib.UNCERTAIN


def test_folder(tmp_path):
  folder = tmp_path / 'reports'
  folder.mkdir()
  (folder / 'b.txt').write_text('FINDINGS: Moderate cardiomegaly.')
  (folder / 'a.txt').write_text('FINDINGS: Lungs are clear.')
  (folder / 'notes.md').write_text('not a report')
  rows = _run(tmp_path, folder)
  assert [(r['id'], r['Cardiomegaly'], r['Abnormal']) for r in rows] == [
      ('a', '', '0'), ('b', '1.0', '1')]


def test_missing_column(tmp_path):
  path = tmp_path / 'r.csv'
  path.write_text('id,text\n1,Normal.\n')
  with pytest.raises(ValueError, match=r"r\.csv: missing column\(s\) \['report'\]"):
    _run(tmp_path, path)


def test_empty_report_names_row_and_column(tmp_path):
  path = tmp_path / 'r.csv'
  path.write_text('id,report\n1,Normal.\n2,  \n')
  with pytest.raises(ValueError, match=r"r\.csv row 2 \(line 3\), column 'report': empty"):
    _run(tmp_path, path)


def test_repeated_id(tmp_path):
  path = tmp_path / 'r.csv'
  path.write_text('id,report\n1,Normal.\n1,Effusion.\n')
  with pytest.raises(ValueError, match='repeats row 1'):
    _run(tmp_path, path)


def test_non_utf8(tmp_path):
  path = tmp_path / 'r.csv'
  path.write_bytes('id,report\n1,Normal.\n2,Small effusion \u00e9.\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'r\.csv: not UTF-8 .*line 3'):
    _run(tmp_path, path)
  folder = tmp_path / 'f'
  folder.mkdir()
  (folder / 'x.txt').write_bytes(b'Small effusion \xe9.')
  with pytest.raises(ValueError, match=r'x\.txt: not UTF-8'):
    _run(tmp_path, folder)


def test_empty_file_in_folder(tmp_path):
  folder = tmp_path / 'f'
  folder.mkdir()
  (folder / 'x.txt').write_text('\n')
  with pytest.raises(ValueError, match=r'x\.txt: empty report'):
    _run(tmp_path, folder)
