"""Budget sampling guarantees, draw bookkeeping, the summary's statistics and CSV files."""

import csv
import os

import numpy as np
import pytest
from scipy import stats

from cxr_jax.eval import efficiency


def test_sample_budget_holds_both_classes_of_a_rare_finding():
  labels = np.zeros(1000, int)
  labels[[17, 503]] = 1
  for seed in range(20):
    indices = efficiency.sample_budget(labels, 10, np.random.default_rng(seed))
    assert indices.size == 10 and np.unique(indices).size == 10
    assert np.all(np.diff(indices) > 0)
    assert labels[indices].sum() >= 1 and (labels[indices] == 0).sum() >= 1


def test_sample_budget_covers_every_finding_when_the_budget_allows():
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(500, 4)) < [0.01, 0.02, 0.5, 0.99]).astype(int)
  mask = np.ones_like(labels)
  mask[labels[:, 0] == 1, 0] = 0  # Finding 0's positives are unknown: none can be counted.
  mask[np.flatnonzero(labels[:, 0] == 0)[:3], 0] = 0
  for seed in range(10):
    indices = efficiency.sample_budget(labels, 8, np.random.default_rng(seed), mask=mask)
    for k in (1, 2, 3):
      assert set(labels[indices, k]) == {0, 1}, (seed, k)


def test_sample_budget_all_and_bad_budgets():
  labels = np.array([0, 1] * 10)
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(efficiency.sample_budget(labels, 'all', rng), np.arange(20))
  np.testing.assert_array_equal(np.sort(efficiency.sample_budget(labels, 20, rng)),
                                np.arange(20))
  with pytest.raises(ValueError, match="Budget 21 is larger than the 20 cases.*'all'"):
    efficiency.sample_budget(labels, 21, rng)
  for bad in (0, -3, 'most', 2.5):
    with pytest.raises(ValueError, match="positive number of examples or 'all'"):
      efficiency.sample_budget(labels, bad, rng)


def test_sample_budget_is_uniform_beyond_the_class_seeds():
  labels = np.zeros(50, int)
  labels[0] = 1
  counts = np.zeros(50)
  for seed in range(400):
    counts[efficiency.sample_budget(labels, 6, np.random.default_rng(seed))] += 1
  assert counts[0] == 400  # The only positive is always drawn.
  # The other 5 slots are uniform over the 49 negatives: 400 * 5 / 49 = 40.8 each.
  assert stats.chisquare(counts[1:]).pvalue > 0.001


def test_data_efficiency_rows_summary_and_files(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 300)
  calls = []

  def train_and_score(indices):
    calls.append(indices)
    # A score that depends on the draw, so draws differ.
    return {'auroc': 0.5 + indices.size / 1000 + indices[0] / 1e4,
            'auprc': float(indices.mean()) / 300}

  result = efficiency.data_efficiency(train_and_score, labels, budgets=(10, 100, 'all'),
                                      draws=4, seed=3, output_dir=str(tmp_path), name='probe')
  assert len(calls) == 4 + 4 + 1
  assert [row['budget'] for row in result['draws']] == [10] * 4 + [100] * 4 + ['all']
  assert [row['num_examples'] for row in result['draws']] == [10] * 4 + [100] * 4 + [300]
  summary = {(row['budget'], row['metric']): row for row in result['summary']}
  values = np.array([row['auroc'] for row in result['draws'][4:8]])
  row = summary[(100, 'auroc')]
  half = stats.t.ppf(0.975, 3) * values.std(ddof=1) / 2
  assert row['mean'] == pytest.approx(values.mean())
  assert row['std'] == pytest.approx(values.std(ddof=1))
  assert (row['low'], row['high']) == pytest.approx((values.mean() - half, values.mean() + half))
  assert row['num_draws'] == 4
  assert np.isnan(summary[('all', 'auroc')]['std'])
  with open(tmp_path / 'probe_summary.csv') as f:
    read = list(csv.DictReader(f))
  assert len(read) == 3 * 2
  assert float(read[2]['mean']) == summary[(100, 'auroc')]['mean']
  assert os.path.exists(tmp_path / 'probe_draws.csv')


def test_draws_are_seeded_and_independent_of_the_other_budgets():
  labels = np.random.default_rng(2).integers(0, 2, 200)
  seen = {}

  def record(indices):
    seen.setdefault(indices.size, []).append(indices)
    return 0.0

  efficiency.data_efficiency(record, labels, budgets=(20,), draws=2, seed=5)
  efficiency.data_efficiency(record, labels, budgets=(50, 20), draws=2, seed=5)
  first, second = seen[20][:2], seen[20][2:]
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[1])


def test_data_efficiency_checks_budgets_before_training_and_results_after():
  labels = np.array([0, 1] * 20)

  def must_not_run(indices):
    raise AssertionError('trained before the budgets were checked')

  with pytest.raises(ValueError, match='Budget 100 is larger than the 40'):
    efficiency.data_efficiency(must_not_run, labels, budgets=(10, 100))
  with pytest.raises(TypeError, match='returned a str for budget 10, draw 0'):
    efficiency.data_efficiency(lambda indices: 'good', labels, budgets=(10,))
  with pytest.warns(UserWarning, match='scored nan'):
    result = efficiency.data_efficiency(
        lambda indices: float('nan') if indices[0] == 0 else 1.0, labels, budgets=(30,),
        draws=5)
  assert result['summary'][0]['num_draws'] == sum(
      row['score'] == 1.0 for row in result['draws'])
