"""Markdown, JSON and CSV writers: exact text, strict JSON, lossless CSV."""

import csv
import json

import numpy as np
import pytest

from cxr_jax.eval import report


def test_write_json_turns_nan_into_null_and_numpy_into_python(tmp_path):
  path = tmp_path / 'out' / 'metrics.json'
  report.write_json(str(path), {
      'auroc': np.float32(0.75), 'n': np.int64(12), 'ok': np.bool_(True), 'missing': np.nan,
      'curve': np.array([[0.5, np.inf], [1.0, 2.0]]), 'names': ('a', b'b'), 3: None})
  with open(path) as f:
    text = f.read()
  loaded = json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} in JSON'))
  assert loaded == {'auroc': 0.75, 'n': 12, 'ok': True, 'missing': None,
                    'curve': [[0.5, None], [1.0, 2.0]], 'names': ['a', 'b'], '3': None}
  assert isinstance(loaded['n'], int)
  with pytest.raises(TypeError, match='Cannot write a set'):
    report.write_json(str(path), {'bad': {1, 2}})


def test_write_csv_round_trips_floats_and_unions_keys(tmp_path):
  path = tmp_path / 'rows.csv'
  rows = [{'finding': 'nodule', 'auroc': 0.1 + 0.2, 'n': np.int32(7)},
          {'finding': 'effusion', 'auroc': np.nan, 'note': 'no positives', 'extra': None}]
  report.write_csv(str(path), rows)
  with open(path, newline='') as f:
    read = list(csv.DictReader(f))
  assert list(read[0]) == ['finding', 'auroc', 'n', 'note', 'extra']
  assert float(read[0]['auroc']) == 0.1 + 0.2
  assert read[0]['n'] == '7' and read[0]['note'] == ''
  assert read[1]['auroc'] == 'nan' and read[1]['note'] == 'no positives'
  assert read[1]['extra'] == ''
  report.write_csv(str(path), rows, columns=['auroc', 'finding'])
  with open(path) as f:
    assert f.readline().strip() == 'auroc,finding'


def test_markdown_report_text(tmp_path):
  document = report.Report('Probe evaluation')
  document.section('Per finding').paragraph('  Two findings.  ')
  document.table([{'finding': 'a|b', 'auroc': 0.81234, 'n': 10},
                  {'finding': 'c', 'auroc': float('nan'), 'n': 3}],
                 columns={'finding': 'Finding', 'auroc': 'AUROC', 'n': 'n'},
                 float_format='.2f')
  document.section('Figures', level=3).image('figs/eff.png', 'Data efficiency')
  path = tmp_path / 'nested' / 'report.md'
  document.write(str(path))
  assert path.read_text() == (
      '# Probe evaluation\n\n'
      '## Per finding\n\n'
      'Two findings.\n\n'
      '| Finding | AUROC | n |\n'
      '|---|---:|---:|\n'
      '| a\\|b | 0.81 | 10 |\n'
      '| c | n/a | 3 |\n\n'
      '### Figures\n\n'
      '![Data efficiency](figs/eff.png)\n\n'
      '*Data efficiency*\n')


def test_report_rejects_absolute_images_and_bad_levels(tmp_path):
  document = report.Report('x')
  with pytest.raises(ValueError, match='absolute; give it relative to the report'):
    document.image(str(tmp_path / 'a.png'))
  with pytest.raises(ValueError, match='level must be 2..6'):
    document.section('y', level=1)
  with pytest.raises(ValueError, match='at least one column'):
    document.table([])
