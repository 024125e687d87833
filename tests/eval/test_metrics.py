"""Metrics against scikit-learn, DeLong against its O(n_pos * n_neg) form, bootstraps by design."""

import numpy as np
import pytest
from scipy import stats
from sklearn import calibration
from sklearn import metrics as sk_metrics

from cxr_jax.eval import metrics


def _random_case(seed, n=300, tied=False):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  if tied:
    # Few distinct values, so many positive/negative pairs tie.
    scores = rng.integers(0, 5, n).astype(np.float32) + labels * rng.integers(0, 2, n)
  else:
    scores = rng.normal(size=n) + 0.8 * labels
  return labels, scores


@pytest.mark.parametrize('tied', [False, True])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auroc_and_auprc_match_sklearn(seed, tied):
  labels, scores = _random_case(seed, tied=tied)
  assert metrics.auroc(labels, scores) == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
  assert metrics.auprc(labels, scores) == pytest.approx(
      sk_metrics.average_precision_score(labels, scores), abs=1e-12)


def test_all_tied_scores_give_half_auroc_and_prevalence_auprc():
  labels = np.array([0, 1, 1, 0, 1])
  scores = np.full(5, 0.3)
  assert metrics.auroc(labels, scores) == 0.5
  assert metrics.auprc(labels, scores) == pytest.approx(0.6)


@pytest.mark.parametrize('metric', [metrics.auroc, metrics.auprc])
@pytest.mark.parametrize('labels,reason', [([0, 0, 0], 'no positives'),
                                           ([1, 1], 'no negatives'), ([], 'no cases')])
def test_single_class_is_nan_with_warning(metric, labels, reason):
  with pytest.warns(metrics.UndefinedMetricWarning, match=reason):
    value = metric(np.array(labels), np.linspace(0, 1, len(labels)))
  assert np.isnan(value)


@pytest.mark.parametrize('labels,scores,message', [
    ([0, 1, 1], [0.1, 0.2], 'differ in length: 3 vs 2'),
    ([0, 1, -1], [0.1, 0.2, 0.3], r'binary 0/1 labels; found the values \[-1\]'),
    ([0, 2, 1], [0.1, 0.2, 0.3], r'found the values \[2\]'),
    ([0, 1, 1], [0.1, np.nan, 0.3], 'finite scores; 1 are not finite .*index 1'),
    ([0, 1, 1], [0.1, np.inf, 0.3], 'not finite'),
    ([[0, 1]], [[0.1, 0.2]], '1-D labels'),
])
def test_bad_input_raises(labels, scores, message):
  for metric in (metrics.auroc, metrics.auprc):
    with pytest.raises(ValueError, match=message):
      metric(np.array(labels), np.array(scores))


def test_bootstrap_is_seeded_and_contains_point():
  labels, scores = _random_case(3)
  first = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=300, seed=7)
  again = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=300, seed=7)
  other = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=300, seed=8)
  point, low, high = first
  assert tuple(first) == tuple(again)
  assert (low, high) != (other.low, other.high)
  assert point == metrics.auroc(labels, scores)
  assert low < point < high
  assert first.num_samples == 300 and first.num_redrawn == 0


@pytest.mark.parametrize('metric', [metrics.auroc, metrics.auprc])
@pytest.mark.parametrize('tied', [False, True])
def test_bootstrap_from_counts_equals_resampling_the_arrays(metric, tied):
  labels, scores = _random_case(13, n=120, tied=tied)
  patient_ids = np.arange(120) // 3
  fast = metrics.bootstrap_ci(metric, labels, scores, groups=patient_ids, num_samples=100)
  # A wrapper is not a known metric, so the bootstrap calls it on resampled arrays.
  plain = metrics.bootstrap_ci(lambda y, s: metric(y, s), labels, scores, groups=patient_ids,
                               num_samples=100)
  np.testing.assert_allclose(tuple(fast), tuple(plain), rtol=1e-12)


def test_bootstrap_interval_shrinks_with_more_data():
  widths = []
  for n in (100, 2500):
    labels, scores = _random_case(4, n=n)
    interval = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=300)
    widths.append(interval.high - interval.low)
  # Width scales like 1/sqrt(n): 5x fewer cases, about 5x wider.
  assert widths[0] > 3 * widths[1]


def test_bootstrap_level_orders_intervals():
  labels, scores = _random_case(5)
  narrow = metrics.bootstrap_ci(metrics.auprc, labels, scores, num_samples=300, level=0.5)
  wide = metrics.bootstrap_ci(metrics.auprc, labels, scores, num_samples=300, level=0.99)
  assert wide.low < narrow.low < narrow.high < wide.high


def test_patient_bootstrap_keeps_patients_together():
  rng = np.random.default_rng(0)
  images_per_patient = rng.integers(1, 5, 40)
  patient_ids = np.repeat(np.arange(40), images_per_patient)
  labels = np.repeat(rng.integers(0, 2, 40), images_per_patient)
  # The score encodes the patient, so the metric can see which images were drawn.
  scores = patient_ids.astype(float)
  seen = []

  def recording_metric(resampled_labels, resampled_scores):
    seen.append(np.bincount(resampled_scores.astype(int), minlength=40))
    return metrics.auroc(resampled_labels, resampled_scores)

  metrics.bootstrap_ci(recording_metric, labels, scores, groups=patient_ids.astype(str),
                       num_samples=50)
  counts = np.stack(seen[1:])  # The first call is the point estimate on all images.
  assert np.all(counts % images_per_patient == 0)
  # Each resample draws 40 patients with replacement.
  assert np.all((counts // images_per_patient).sum(axis=1) == 40)


def test_patient_bootstrap_of_duplicated_images_equals_image_bootstrap_of_patients():
  labels, scores = _random_case(6, n=80)
  copies = 5
  duplicated_labels, duplicated_scores = np.repeat(labels, copies), np.repeat(scores, copies)
  patient_ids = np.repeat(np.arange(80), copies)
  by_patient = metrics.bootstrap_ci(metrics.auroc, duplicated_labels, duplicated_scores,
                                    groups=patient_ids, num_samples=200, seed=1)
  unique = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=200, seed=1)
  np.testing.assert_allclose(tuple(by_patient), tuple(unique), atol=1e-12)
  # Treating the copies as independent images makes the interval too narrow.
  by_image = metrics.bootstrap_ci(metrics.auroc, duplicated_labels, duplicated_scores,
                                  num_samples=200, seed=1)
  assert by_image.high - by_image.low < 0.6 * (by_patient.high - by_patient.low)


def test_bootstrap_redraws_single_class_resamples_and_says_so():
  labels = np.array([1] + [0] * 11)
  scores = np.linspace(0, 1, 12)
  with pytest.warns(metrics.UndefinedMetricWarning, match=r'\d+ resamples had a single class'):
    interval = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=100)
  # P(no positive in 12 draws) = (11/12)^12, about 0.35, so redraws happen.
  assert interval.num_redrawn > 10
  assert interval.num_samples == 100
  with pytest.warns(metrics.UndefinedMetricWarning, match='stopped at the limit of 5 redraws'):
    capped = metrics.bootstrap_ci(metrics.auroc, labels, scores, num_samples=100,
                                  max_redraw_fraction=0.05)
  assert capped.num_redrawn == 5 and 0 < capped.num_samples < 100


def test_bootstrap_of_undefined_metric_is_nan():
  with pytest.warns(metrics.UndefinedMetricWarning):
    point, low, high = metrics.bootstrap_ci(metrics.auroc, np.zeros(5), np.arange(5.0))
  assert np.isnan([point, low, high]).all()


def _delong_by_placement_matrix(labels, scores_a, scores_b):
  """DeLong et al. (1988) straight from the definition: psi over all pos/neg pairs."""
  pos, neg = labels == 1, labels == 0
  placements = []
  for scores in (scores_a, scores_b):
    difference = scores[pos][:, None] - scores[neg][None, :]
    psi = (difference > 0) + 0.5 * (difference == 0)
    placements.append((psi.mean(axis=1), psi.mean(axis=0)))
  v10 = np.stack([p[0] for p in placements])
  v01 = np.stack([p[1] for p in placements])
  s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (
      pos.sum() - 1)
  s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (
      neg.sum() - 1)
  covariance = s10 / pos.sum() + s01 / neg.sum()
  aucs = v10.mean(axis=1)
  z = (aucs[0] - aucs[1]) / np.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
  return aucs, covariance, z, 2 * (1 - stats.norm.cdf(abs(z)))


@pytest.mark.parametrize('tied', [False, True])
def test_delong_matches_placement_value_form(tied):
  labels, scores_a = _random_case(7, n=150, tied=tied)
  rng = np.random.default_rng(8)
  scores_b = scores_a + rng.normal(size=150) * (1.0 if not tied else 0.0) + (
      rng.integers(0, 3, 150) if tied else 0)
  result = metrics.delong_test(labels, scores_a, scores_b)
  aucs, covariance, z, p_value = _delong_by_placement_matrix(labels, scores_a, scores_b)
  assert result['auroc_a'] == pytest.approx(sk_metrics.roc_auc_score(labels, scores_a))
  np.testing.assert_allclose([result['auroc_a'], result['auroc_b']], aucs, rtol=1e-12)
  np.testing.assert_allclose(result['covariance'], covariance, rtol=1e-9)
  assert result['z'] == pytest.approx(z, rel=1e-9)
  assert result['p_value'] == pytest.approx(p_value, rel=1e-6)
  assert result['difference_low'] < result['difference'] < result['difference_high']


def test_delong_identical_models_and_single_class():
  labels, scores = _random_case(9, n=60)
  same = metrics.delong_test(labels, scores, scores.copy())
  assert same['z'] == 0 and same['p_value'] == 1
  with pytest.warns(metrics.UndefinedMetricWarning, match='DeLong'):
    undefined = metrics.delong_test(np.ones(4), np.arange(4.0), np.arange(4.0))
  assert np.isnan(undefined['p_value'])
  # One positive: AUROC is defined, but not the variance of the difference.
  with pytest.warns(metrics.UndefinedMetricWarning, match='at least 2 of each'):
    one_positive = metrics.delong_test(np.array([1, 0, 0, 0]), np.arange(4.0),
                                       np.arange(4.0)[::-1])
  assert np.isnan(one_positive['p_value']) and np.isnan(one_positive['z'])
  with pytest.raises(ValueError, match='scores_b'):
    metrics.delong_test(labels, scores, scores[:-1])


def test_reliability_curve_matches_sklearn_and_ece_matches_direct_sum():
  rng = np.random.default_rng(10)
  probs = rng.uniform(size=500) ** 2
  labels = (rng.uniform(size=500) < probs).astype(int)
  probs[:20] = 0.2  # On a bin edge of 10 bins.
  probs[20:25], probs[25:30] = 0.0, 1.0
  curve = metrics.reliability_curve(labels, probs, num_bins=10)
  fraction, mean = calibration.calibration_curve(labels, probs, n_bins=10)
  filled = curve['count'] > 0
  np.testing.assert_allclose(curve['fraction_positive'][filled], fraction)
  np.testing.assert_allclose(curve['mean_predicted'][filled], mean)
  assert curve['count'].sum() == 500
  expected = 0.0
  for low, high in zip(np.linspace(0, 1, 11)[:-1], np.linspace(0, 1, 11)[1:]):
    inside = ((probs > low) | (low == 0)) & (probs <= high)
    if inside.any():
      expected += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
  assert metrics.expected_calibration_error(labels, probs, num_bins=10) == pytest.approx(
      expected)


def test_ece_of_calibrated_and_overconfident_models():
  rng = np.random.default_rng(11)
  probs = rng.uniform(size=20000)
  labels = (rng.uniform(size=20000) < probs).astype(int)
  assert metrics.expected_calibration_error(labels, probs) < 0.02
  overconfident = np.clip((probs - 0.5) * 3 + 0.5, 0, 1)
  assert metrics.expected_calibration_error(labels, overconfident) > 0.1
  with pytest.raises(ValueError, match='probabilities in \\[0, 1\\].*sigmoid'):
    metrics.expected_calibration_error(labels, probs * 4 - 2)


def test_per_finding_table_uses_the_mask_and_reports_undefined_findings():
  rng = np.random.default_rng(12)
  n = 200
  labels = rng.integers(0, 2, (n, 3))
  scores = rng.normal(size=(n, 3)) + labels
  mask = rng.uniform(size=(n, 3)) > 0.3
  labels[~mask] = -1  # Unknown entries may hold raw codes.
  labels[:, 2][mask[:, 2]] = 0  # The third finding has no positives where known.
  patient_ids = np.arange(n) // 2
  with pytest.warns(metrics.UndefinedMetricWarning, match="'c'.*no positives"):
    rows = metrics.per_finding_table(labels, mask, scores, ['a', 'b', 'c'],
                                     patient_ids=patient_ids, num_samples=100)
  for k in (0, 1):
    known = mask[:, k]
    row = rows[k]
    assert row['n'] == known.sum() and row['n_pos'] == labels[known, k].sum()
    assert row['auroc'] == pytest.approx(
        sk_metrics.roc_auc_score(labels[known, k], scores[known, k]))
    assert row['auprc'] == pytest.approx(
        sk_metrics.average_precision_score(labels[known, k], scores[known, k]))
    assert row['auroc_low'] < row['auroc'] < row['auroc_high']
    assert row['auprc_low'] < row['auprc'] < row['auprc_high']
  assert np.isnan(rows[2]['auroc']) and 'no positives' in rows[2]['note']


def test_per_finding_table_rejects_bad_tables():
  labels = np.zeros((4, 2))
  with pytest.raises(ValueError, match=r'scores have shape \(4, 3\)'):
    metrics.per_finding_table(labels, None, np.zeros((4, 3)), ['a', 'b'])
  with pytest.raises(ValueError, match='3 finding names for 2'):
    metrics.per_finding_table(labels, None, np.zeros((4, 2)), ['a', 'b', 'c'])
  with pytest.raises(ValueError, match=r'mask is 1 must be 0 or 1; found \[-1'):
    metrics.per_finding_table(labels - 1, None, np.zeros((4, 2)), ['a', 'b'])
  scores = np.zeros((4, 2))
  scores[1, 1] = np.nan
  with pytest.raises(ValueError, match="'b': 1 scores are not finite"):
    metrics.per_finding_table(np.array([[0, 1], [1, 0]] * 2), None, scores, ['a', 'b'],
                              num_samples=0)
