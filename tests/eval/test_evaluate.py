"""evaluate_predictions: label codes through the policy, files written, summary consistent."""

import csv
import json
import os

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from cxr_jax.eval import evaluate
from cxr_jax.eval import metrics
from cxr_jax.eval import report

FINDINGS = ['cardiomegaly', 'nodule', 'pneumothorax']


def _predictions(seed=0, n=160):
  rng = np.random.default_rng(seed)
  codes = rng.choice(np.array([1, 0, -1, -2], np.int8), (n, 3), p=[0.3, 0.4, 0.15, 0.15])
  logits = rng.normal(size=(n, 3)) + 1.5 * (codes == 1)
  metadata = {'sex': rng.choice(['M', 'F', 'U'], n), 'age': rng.integers(-1, 95, n),
              'view': rng.choice(['PA', 'AP'], n), 'site': np.full(n, 'site_a')}
  return codes, logits, metadata, np.arange(n) // 2


def test_label_codes_logits_and_files(tmp_path):
  codes, logits, metadata, patient_ids = _predictions()
  summary = evaluate.evaluate_predictions(
      codes, None, logits, FINDINGS, output_dir=str(tmp_path), patient_ids=patient_ids,
      metadata=metadata, name='test', logits=True, num_samples=50)
  assert sorted(os.listdir(tmp_path)) == sorted(
      ['test_metrics.json', 'test_per_finding.csv', 'test_reliability.png',
       'test_subgroups.csv', 'test_subgroup_gaps.csv'])
  probs = 1 / (1 + np.exp(-logits))
  for k, row in enumerate(summary['per_finding']):
    # Default policy: uncertain (-1) left out, unmentioned (-2) negative.
    known = codes[:, k] != -1
    targets = (codes[known, k] == 1).astype(int)
    assert row['n'] == known.sum()
    assert row['auroc'] == pytest.approx(sk_metrics.roc_auc_score(targets, logits[known, k]))
    assert row['auprc'] == pytest.approx(
        sk_metrics.average_precision_score(targets, logits[known, k]))
    assert row['ece'] == pytest.approx(
        metrics.expected_calibration_error(targets, probs[known, k]))
    assert row['auroc_low'] < row['auroc'] < row['auroc_high']
  assert summary['mean_auroc'] == pytest.approx(
      np.mean([row['auroc'] for row in summary['per_finding']]))
  assert summary['bootstrap']['patient_level']
  with open(tmp_path / 'test_metrics.json') as f:
    written = json.load(f)
  assert written['mean_auroc'] == pytest.approx(summary['mean_auroc'])
  assert written['files'] == summary['files']
  with open(tmp_path / 'test_per_finding.csv') as f:
    assert [row['finding'] for row in csv.DictReader(f)] == FINDINGS
  with open(tmp_path / 'test_subgroups.csv') as f:
    attributes = {row['attribute'] for row in csv.DictReader(f)}
  assert attributes == {'sex', 'age', 'view', 'site'}
  # One site only: no gap, and the reason is given.
  site_gap = next(gap for gap in summary['subgroup_gaps'] if gap['attribute'] == 'site')
  assert np.isnan(site_gap['gap']) and site_gap['note']


def test_label_policy_changes_what_counts(tmp_path):
  codes, logits, _, _ = _predictions(1)
  summary = evaluate.evaluate_predictions(
      codes, None, logits, FINDINGS, output_dir=str(tmp_path), logits=True, num_samples=0,
      label_policy={'uncertain': 'ones', 'unmentioned': 'ignore'})
  known = codes[:, 1] != -2
  targets = np.isin(codes[known, 1], (1, -1)).astype(int)
  assert summary['per_finding'][1]['auroc'] == pytest.approx(
      sk_metrics.roc_auc_score(targets, logits[known, 1]))
  assert 'subgroups' not in summary['files']


def test_targets_with_mask_and_an_undefined_finding(tmp_path):
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, (50, 2))
  labels[:, 1] = 0
  probs = rng.uniform(size=(50, 2))
  with pytest.warns(metrics.UndefinedMetricWarning, match="'b'.*no positives"):
    summary = evaluate.evaluate_predictions(labels, np.ones((50, 2)), probs, ['a', 'b'],
                                            output_dir=str(tmp_path), num_samples=20)
  assert summary['undefined_findings'] == ['b']
  assert summary['mean_auroc'] == pytest.approx(summary['per_finding'][0]['auroc'])
  with open(tmp_path / 'eval_metrics.json') as f:
    assert json.load(f)['per_finding'][1]['auroc'] is None
  document = evaluate.add_to_report(report.Report('Run'), summary)
  text = document.markdown()
  assert '## Evaluation: eval' in text
  assert '![Reliability diagram (eval)](eval_reliability.png)' in text
  assert 'Undefined (one class only in the test set): b.' in text


def test_bad_inputs_fail_before_any_file_is_written(tmp_path):
  codes, logits, _, _ = _predictions(3, n=20)
  with pytest.raises(ValueError, match=r'outside \[0, 1\]; pass logits=True'):
    evaluate.evaluate_predictions(codes, None, logits, FINDINGS, output_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r'found \[3\]'):
    evaluate.evaluate_predictions(np.full((20, 3), 3), None, logits, FINDINGS,
                                  output_dir=str(tmp_path), logits=True)
  with pytest.raises(ValueError, match='either a mask .* or a label_policy'):
    evaluate.evaluate_predictions(codes, np.ones((20, 3)), logits, FINDINGS,
                                  output_dir=str(tmp_path), label_policy={})
  with pytest.raises(ValueError, match=r'scores have shape \(20, 2\)'):
    evaluate.evaluate_predictions(codes, None, logits[:, :2], FINDINGS,
                                  output_dir=str(tmp_path), logits=True)
  assert not os.listdir(tmp_path)
