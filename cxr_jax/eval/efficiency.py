"""Data-efficiency curves: performance against the number of training labels.

The question a CXR network answers is "how good is a classifier trained on only N
labelled images?". For each budget N (e.g. 10, 45, 100, 500, 1000, all) we draw
`draws` random training subsets, train and score on each, and summarise the
draws. The caller supplies training and scoring as one function of the training
indices, so the same curve works for probes, fine-tuning or anything else.

Sampling: a subset holds at least one positive and one negative of every finding
when the budget and the pool allow it (a classifier cannot learn from one class),
and is otherwise uniform. A budget larger than the pool is an error, not a silent
"all": ask for 'all' explicitly. Subsets are seeded by (seed, budget, draw), so a
draw does not change when other budgets are added to the list.

Summary per budget and metric: the mean over draws, the standard deviation, and a
`level` Student-t interval for the mean (how well the draws pin down the expected
score at this budget).
"""

import os
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats

from cxr_jax.eval import report

ALL = 'all'
Budget = Union[int, str]
DEFAULT_BUDGETS = (10, 45, 100, 500, 1000, ALL)


def _label_table(labels, mask):
  """labels [N] or [N, K] -> (labels [N, K], known mask bool [N, K])."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    labels = labels[:, None]
  if labels.ndim != 2 or labels.shape[0] == 0:
    raise ValueError(f'Expected labels of shape [N] or [N, K] with N > 0, got {labels.shape}.')
  known = np.ones(labels.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  if known.ndim == 1:
    known = known[:, None]
  if known.shape != labels.shape:
    raise ValueError(f'mask has shape {known.shape}; expected {labels.shape} like the labels.')
  return labels, known


def _check_budget(budget: Budget, pool: int) -> None:
  if budget == ALL:
    return
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
    raise ValueError(f"A budget is a positive number of examples or 'all'; got {budget!r}.")
  if budget > pool:
    raise ValueError(f"Budget {budget} is larger than the {pool} cases in the pool; use "
                     "'all' to train on every case.")


def sample_budget(labels, budget: Budget, rng: np.random.Generator, *, mask=None) -> np.ndarray:
  """Training indices for a label budget, sorted.

  Args:
    labels: [N] or [N, K] 0/1 labels of the training pool.
    budget: number of cases to draw, or 'all'.
    rng: the source of randomness.
    mask: optional, like labels: 1 where the label is known.

  Returns:
    int64 [budget] indices without repeats. For each finding in random order, a
    positive and a negative are drawn first while the budget lasts and the pool
    has one; the rest is uniform over the remaining cases.
  """
  labels, known = _label_table(labels, mask)
  pool = labels.shape[0]
  _check_budget(budget, pool)
  if budget == ALL:
    return np.arange(pool)
  chosen = np.zeros(pool, bool)
  for k in rng.permutation(labels.shape[1]):
    for value in (1, 0):
      if chosen.sum() == budget:
        break
      has_value = known[:, k] & (labels[:, k] == value)
      if np.any(has_value & chosen):
        continue
      candidates = np.flatnonzero(has_value & ~chosen)
      if candidates.size:
        chosen[rng.choice(candidates)] = True
  rest = np.flatnonzero(~chosen)
  chosen[rng.choice(rest, budget - int(chosen.sum()), replace=False)] = True
  return np.flatnonzero(chosen)


def _as_scores(result, budget, draw) -> dict:
  if isinstance(result, Mapping):
    scores = dict(result)
  elif isinstance(result, (int, float, np.number)):
    scores = {'score': result}
  else:
    raise TypeError(f'train_and_score returned a {type(result).__name__} for budget '
                    f'{budget}, draw {draw}; expected a float or a dict of floats.')
  try:
    return {name: float(value) for name, value in scores.items()}
  except (TypeError, ValueError) as error:
    raise TypeError(f'train_and_score returned {scores!r} for budget {budget}, draw {draw}; '
                    'expected float values.') from error


def summarize(draw_rows: Sequence[Mapping], level: float = 0.95) -> list:
  """Rows per draw -> one row per (budget, metric): mean, std, interval over draws.

  Non-finite draw values are left out, and `num_draws` counts the ones used.
  """
  fixed = ('budget', 'draw', 'num_examples')
  summary = []
  budgets = list(dict.fromkeys(row['budget'] for row in draw_rows))
  for budget in budgets:
    rows = [row for row in draw_rows if row['budget'] == budget]
    metric_names = list(dict.fromkeys(key for row in rows for key in row if key not in fixed))
    for name in metric_names:
      values = np.array([row.get(name, np.nan) for row in rows], np.float64)
      values = values[np.isfinite(values)]
      mean = float(values.mean()) if values.size else np.nan
      std = float(values.std(ddof=1)) if values.size > 1 else np.nan
      half_width = (float(stats.t.ppf((1 + level) / 2, values.size - 1)) * std /
                    np.sqrt(values.size)) if values.size > 1 else np.nan
      summary.append(dict(budget=budget,
                          num_examples=float(np.mean([row['num_examples'] for row in rows])),
                          metric=name, mean=mean, std=std, low=mean - half_width,
                          high=mean + half_width, num_draws=int(values.size)))
  return summary


def data_efficiency(train_and_score: Callable[[np.ndarray], Union[float, Mapping]], labels,
                    budgets: Sequence[Budget] = DEFAULT_BUDGETS, draws: int = 5,
                    seed: int = 0, *, mask=None, level: float = 0.95,
                    output_dir: Optional[str] = None, name: str = 'data_efficiency') -> dict:
  """Trains and scores on `draws` subsets per budget; returns and optionally writes them.

  Args:
    train_and_score: indices into the training pool -> a score (float) or a dict of
      scores (e.g. {'auroc': ..., 'auprc': ...}), measured on held-out data.
    labels: [N] or [N, K] labels of the training pool (used to sample subsets).
    budgets: numbers of training cases, and/or 'all' (trained once: every draw of
      the whole pool is the same subset).
    draws: subsets per budget.
    seed: subsets are a function of (seed, budget, draw).
    mask: optional known-label mask like `labels`.
    level: coverage of the interval for the mean.
    output_dir: if given, writes NAME_draws.csv and NAME_summary.csv there.
    name: file name prefix.

  Returns:
    {'draws': [{budget, draw, num_examples, <metric>: value, ...}],
     'summary': [{budget, num_examples, metric, mean, std, low, high, num_draws}]}.
  """
  labels, known = _label_table(labels, mask)
  if draws < 1:
    raise ValueError(f'draws must be at least 1, got {draws}.')
  # Every budget is checked before any training, so a typo fails in seconds.
  for budget in budgets:
    _check_budget(budget, labels.shape[0])
  draw_rows = []
  for budget in budgets:
    for draw in range(1 if budget == ALL else draws):
      budget_key = labels.shape[0] if budget == ALL else int(budget)
      rng = np.random.default_rng([seed, budget_key, draw])
      indices = sample_budget(labels, budget, rng, mask=known)
      scores = _as_scores(train_and_score(indices), budget, draw)
      draw_rows.append(dict(budget=budget, draw=draw, num_examples=int(indices.size),
                            **scores))
  if any(not np.isfinite(value) for row in draw_rows for key, value in row.items()
         if key not in ('budget', 'draw', 'num_examples')):
    warnings.warn('data_efficiency: some draws scored nan/inf; the summary leaves them out '
                  '(see num_draws).', stacklevel=2)
  result = {'draws': draw_rows, 'summary': summarize(draw_rows, level)}
  if output_dir is not None:
    report.write_csv(os.path.join(output_dir, f'{name}_draws.csv'), result['draws'])
    report.write_csv(os.path.join(output_dir, f'{name}_summary.csv'), result['summary'])
  return result
