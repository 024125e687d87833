"""Subgroup AUROCs against scikit-learn on the subsets; gaps; the nan-with-reason paths."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from cxr_jax.eval import subgroups


def test_age_bands_default_and_custom_edges():
  ages = [-1, 0, 39, 40, 59.5, 60, 79, 80, 104, np.nan]
  assert subgroups.age_bands(ages).tolist() == [
      'unknown', '<40', '<40', '40-60', '40-60', '60-80', '60-80', '>=80', '>=80', 'unknown']
  assert subgroups.age_bands([17, 18, 65], edges=(18, 65)).tolist() == [
      '<18', '18-65', '>=65']
  with pytest.raises(ValueError, match='increasing'):
    subgroups.age_bands([30], edges=(60, 40))
  with pytest.raises(ValueError, match=r"Ages must be numbers .* like \['41', 'old'\]"):
    subgroups.age_bands(['41', 'old'])


def test_group_names_map_missing_markers_to_unknown():
  names = subgroups.group_names(np.array([b'F', b'', b'U', b' M ', b'UNKNOWN', b'PA']))
  assert names.tolist() == ['F', 'unknown', 'unknown', 'M', 'unknown', 'PA']


def _two_group_case(seed=0, n=200):
  rng = np.random.default_rng(seed)
  sex = np.array(['F', 'M'] * (n // 2))
  labels = rng.integers(0, 2, n)
  # The model separates the classes well for F and barely for M.
  scores = rng.normal(size=n) + np.where(sex == 'F', 2.5, 0.3) * labels
  return labels, scores, sex


def test_subgroup_rows_match_sklearn_and_gap_names_the_groups():
  labels, scores, sex = _two_group_case()
  rows = subgroups.subgroup_rows(labels, scores, sex, attribute='sex', finding='nodule')
  assert [row['group'] for row in rows] == ['F', 'M']
  for row in rows:
    inside = sex == row['group']
    assert row['n'] == inside.sum() and row['n_pos'] == labels[inside].sum()
    assert row['auroc'] == pytest.approx(
        sk_metrics.roc_auc_score(labels[inside], scores[inside]))
    assert row['attribute'] == 'sex' and row['finding'] == 'nodule'
  gap = subgroups.largest_gap(rows)
  assert (gap['best_group'], gap['worst_group']) == ('F', 'M')
  assert gap['gap'] == pytest.approx(rows[0]['auroc'] - rows[1]['auroc'])
  assert gap['gap'] > 0.2


def test_small_single_class_and_unknown_groups_get_nan_with_reason():
  labels, scores, _ = _two_group_case(1, n=60)
  groups = np.array(['A'] * 40 + ['B'] * 5 + ['C'] * 10 + ['unknown'] * 5)
  labels[45:55] = 1  # Group C has positives only.
  rows = {row['group']: row for row in subgroups.subgroup_rows(
      labels, scores, groups, attribute='site', min_cases=10)}
  assert np.isfinite(rows['A']['auroc'])
  assert np.isnan(rows['B']['auroc']) and rows['B']['note'] == 'fewer than 10 cases'
  assert np.isnan(rows['C']['auroc']) and 'no negatives' in rows['C']['note']
  gap = subgroups.largest_gap(list(rows.values()))
  assert np.isnan(gap['gap']) and 'fewer than two groups' in gap['note']


def test_bootstrap_interval_per_group_is_optional():
  labels, scores, sex = _two_group_case(2)
  plain = subgroups.subgroup_rows(labels, scores, sex, attribute='sex')
  assert all(np.isnan(row['auroc_low']) for row in plain)
  with_ci = subgroups.subgroup_rows(labels, scores, sex, attribute='sex', num_samples=100,
                                    patient_ids=np.arange(200) // 2)
  for row, point in zip(with_ci, plain):
    assert row['auroc'] == point['auroc']
    assert row['auroc_low'] < row['auroc'] < row['auroc_high']


def test_subgroup_table_over_findings_and_attributes():
  rng = np.random.default_rng(3)
  n = 240
  labels = rng.integers(0, 2, (n, 2))
  scores = rng.normal(size=(n, 2)) + labels
  mask = np.ones((n, 2), bool)
  mask[:40, 1] = False
  metadata = {'sex': rng.choice(['M', 'F'], n), 'age': rng.integers(20, 95, n),
              'view': rng.choice(['PA', 'AP', 'LATERAL'], n), 'embedding': np.zeros((n, 4))}
  rows, gaps = subgroups.subgroup_table(labels, mask, scores, ['a', 'b'], metadata)
  assert {row['attribute'] for row in rows} == {'sex', 'age', 'view'}
  assert len(gaps) == 2 * 3
  age_rows = [row for row in rows if row['attribute'] == 'age' and row['finding'] == 'a']
  assert [row['group'] for row in age_rows] == ['<40', '40-60', '60-80', '>=80']
  row = next(row for row in rows
             if (row['finding'], row['attribute'], row['group']) == ('b', 'view', 'AP'))
  inside = mask[:, 1] & (metadata['view'] == 'AP')
  assert row['n'] == inside.sum()
  assert row['auroc'] == pytest.approx(sk_metrics.roc_auc_score(labels[inside, 1],
                                                                scores[inside, 1]))


def test_subgroup_table_errors_name_the_problem():
  labels = np.zeros((10, 1))
  with pytest.raises(ValueError, match=r"\['site'\] are not in the metadata; it has \['sex'\]"):
    subgroups.subgroup_table(labels, None, labels, ['a'], {'sex': ['M'] * 10},
                             attributes=['site'])
  with pytest.raises(ValueError, match=r"metadata\['sex'\] has shape \(9,\)"):
    subgroups.subgroup_table(labels, None, labels, ['a'], {'sex': ['M'] * 9})
