"""Binary classification metrics for CXR findings, with honest uncertainty.

Everything here is NumPy/SciPy on host arrays, one finding at a time unless a name
says otherwise (`per_finding_table`). The rules shared by every metric:

- Labels are 0/1 (bool, int or float holding only 0 and 1); scores are finite
  floats of the same length. Anything else is a ValueError that says what was
  expected.
- A metric that is undefined for the input (AUROC with a single class present)
  returns nan and emits an `UndefinedMetricWarning` naming the problem; it never
  returns a made-up number.
- Ties are handled exactly: AUROC counts a tied positive/negative pair as one half
  (the Mann-Whitney statistic), and average precision moves thresholds between
  distinct score values only, the way scikit-learn defines it. Both are computed
  from the number of positives and negatives at each distinct score, which also
  lets the bootstrap score a resample without sorting it again.
"""

import warnings

import numpy as np
from scipy import stats


class UndefinedMetricWarning(UserWarning):
  """A metric is undefined for its input (e.g. one class only) and came back nan."""


def check_binary(labels, scores, *, what='scores'):
  """Validates one finding's inputs; returns (labels int8 [N], scores float64 [N]).

  Raises:
    ValueError: shapes differ or are not 1-D, labels are not 0/1, or scores are
      not finite; the message says what was expected.
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores)
  if labels.ndim != 1 or scores.ndim != 1:
    raise ValueError(f'Expected 1-D labels and {what}, got shapes {labels.shape} and '
                     f'{scores.shape}.')
  if labels.shape[0] != scores.shape[0]:
    raise ValueError(f'labels and {what} differ in length: {labels.shape[0]} vs '
                     f'{scores.shape[0]}.')
  if labels.dtype.kind not in 'biuf':
    raise ValueError(f'Expected binary 0/1 labels, got dtype {labels.dtype}.')
  binary = (labels == 0) | (labels == 1)
  if not np.all(binary):
    bad = np.unique(labels[~binary])[:5]
    raise ValueError(f'Expected binary 0/1 labels; found the values {bad.tolist()}. '
                     'Raw label codes (-1 uncertain, -2 unmentioned) must go through a '
                     'label policy or a mask first.')
  if scores.dtype.kind not in 'biuf':
    raise ValueError(f'Expected numeric {what}, got dtype {scores.dtype}.')
  scores = scores.astype(np.float64)
  finite = np.isfinite(scores)
  if not np.all(finite):
    first = int(np.argmin(finite))
    raise ValueError(f'Expected finite {what}; {int(np.sum(~finite))} are not finite '
                     f'(the first at index {first} is {scores[first]}).')
  return labels.astype(np.int8), scores


def single_class_reason(labels) -> str:
  """Why a binary metric is undefined for `labels`, or '' when both classes occur."""
  labels = np.asarray(labels)
  num_pos = int(np.sum(labels == 1))
  num_neg = int(labels.size - num_pos)
  if labels.size == 0:
    return 'no cases'
  if num_pos == 0:
    return f'no positives among {num_neg} cases'
  if num_neg == 0:
    return f'no negatives among {num_pos} cases'
  return ''


def _undefined(metric_name, reason):
  warnings.warn(f'{metric_name} is undefined ({reason}); returning nan.',
                UndefinedMetricWarning, stacklevel=3)
  return float('nan')


class _ScoreLevels:
  """Cases grouped by distinct score value, ascending: the one sort both metrics need.

  AUROC and average precision depend only on how many positives and negatives sit
  at each distinct score, so with the levels computed once a bootstrap resample
  costs two `bincount`s over its case multiplicities instead of a fresh sort.
  """

  def __init__(self, labels, scores):
    _, self.level = np.unique(scores, return_inverse=True)
    self.num_levels = int(self.level.max()) + 1 if self.level.size else 0
    self.positive = labels == 1

  def class_counts(self, multiplicity=None):
    """(positives, negatives) per level; `multiplicity` [N] weights each case."""
    weights = np.ones(self.level.size) if multiplicity is None else multiplicity
    positives = np.bincount(self.level, weights=weights * self.positive,
                            minlength=self.num_levels)
    negatives = np.bincount(self.level, weights=weights * ~self.positive,
                            minlength=self.num_levels)
    return positives, negatives


def _auroc_from_counts(positives, negatives):
  """Mann-Whitney: each positive beats the negatives below its level, ties count 1/2."""
  negatives_below = np.cumsum(negatives) - negatives
  wins = np.sum(positives * (negatives_below + 0.5 * negatives))
  return float(wins / (positives.sum() * negatives.sum()))


def _auprc_from_counts(positives, negatives):
  """Average precision with one threshold per level, from the highest score down."""
  true_pos = np.cumsum(positives[::-1])
  predicted_pos = true_pos + np.cumsum(negatives[::-1])
  # A level with no cases adds no recall, so its (undefined) precision is not used.
  precision = np.divide(true_pos, predicted_pos, out=np.zeros_like(true_pos),
                        where=predicted_pos > 0)
  return float(np.sum(positives[::-1] * precision) / positives.sum())


def auroc(labels, scores) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

  Args:
    labels: [N] binary 0/1 labels.
    scores: [N] finite scores, larger meaning more likely positive (probabilities,
      logits or any monotone transform give the same value).

  Returns:
    The AUROC as a float, or nan with an UndefinedMetricWarning when only one class
    is present.
  """
  labels, scores = check_binary(labels, scores)
  reason = single_class_reason(labels)
  if reason:
    return _undefined('AUROC', reason)
  return _auroc_from_counts(*_ScoreLevels(labels, scores).class_counts())


def auprc(labels, scores) -> float:
  """Average precision: sum over thresholds of (R_t - R_{t-1}) * P_t.

  The definition of scikit-learn's `average_precision_score` (no interpolation);
  thresholds are the distinct score values, so tied scores enter together.

  Returns:
    The average precision, or nan with an UndefinedMetricWarning when only one class
    is present (with no positives it is undefined; with no negatives it is
    trivially 1 and says nothing about the model).
  """
  labels, scores = check_binary(labels, scores)
  reason = single_class_reason(labels)
  if reason:
    return _undefined('AUPRC', reason)
  return _auprc_from_counts(*_ScoreLevels(labels, scores).class_counts())


# Metrics the bootstrap evaluates from per-level counts (same values, no re-sorting).
_FROM_COUNTS = {auroc: _auroc_from_counts, auprc: _auprc_from_counts}


class BootstrapCI:
  """A bootstrap interval; unpacks as (point, low, high).

  Attributes:
    point: the metric on the full data.
    low, high: the percentile interval at `level` over the valid resamples.
    level: e.g. 0.95.
    num_samples: how many valid resamples the interval uses.
    num_redrawn: resamples that held a single class (metric undefined) and were
      drawn again; reported, never silently dropped.
  """

  def __init__(self, point, low, high, *, level, num_samples, num_redrawn):
    self.point, self.low, self.high = float(point), float(low), float(high)
    self.level, self.num_samples, self.num_redrawn = level, num_samples, num_redrawn

  def __iter__(self):
    return iter((self.point, self.low, self.high))

  def __repr__(self):
    return (f'BootstrapCI(point={self.point:.4f}, low={self.low:.4f}, high={self.high:.4f}, '
            f'level={self.level}, num_samples={self.num_samples}, '
            f'num_redrawn={self.num_redrawn})')


def _resampler(num_cases, groups):
  """A function rng -> case indices of one bootstrap resample.

  With `groups` (patient ids) whole patients are drawn with replacement and every
  image of a drawn patient comes along, so correlated images of one patient never
  make an interval look narrower than the number of patients supports.
  """
  if groups is None:
    return lambda rng: rng.integers(0, num_cases, num_cases)
  groups = np.asarray(groups)
  if groups.shape != (num_cases,):
    raise ValueError(f'groups (patient ids) must have shape ({num_cases},) like the labels; '
                     f'got {groups.shape}.')
  _, codes = np.unique(groups, return_inverse=True)
  by_group = np.argsort(codes, kind='stable')
  sizes = np.bincount(codes)
  starts = np.cumsum(sizes) - sizes

  def draw(rng):
    drawn = rng.integers(0, sizes.size, sizes.size)
    drawn_sizes = sizes[drawn]
    offsets = np.arange(drawn_sizes.sum()) - np.repeat(np.cumsum(drawn_sizes) - drawn_sizes,
                                                       drawn_sizes)
    return by_group[np.repeat(starts[drawn], drawn_sizes) + offsets]

  return draw


def bootstrap_ci(metric, labels, scores, *, groups=None, num_samples=1000, level=0.95,
                 seed=0, max_redraw_fraction=1.0) -> BootstrapCI:
  """Percentile bootstrap confidence interval of `metric(labels, scores)`.

  Args:
    metric: f(labels, scores) -> float, e.g. `auroc` or `auprc`.
    labels: [N] binary labels.
    scores: [N] finite scores.
    groups: optional [N] patient ids: resample patients, not images.
    num_samples: number of valid resamples.
    level: coverage of the interval, in (0, 1).
    seed: the resamples are a function of the seed only.
    max_redraw_fraction: a resample with a single class (the metric is undefined)
      is drawn again, at most `max_redraw_fraction * num_samples` times in all;
      past that the interval uses the valid resamples it has, with a warning.

  Returns:
    BootstrapCI (unpacks as point, low, high); all nan, with a warning, when the
    metric is undefined on the full data.
  """
  labels, scores = check_binary(labels, scores)
  if num_samples < 1:
    raise ValueError(f'num_samples must be at least 1, got {num_samples}.')
  if not 0 < level < 1:
    raise ValueError(f'level must lie in (0, 1), got {level}.')
  sampler = _resampler(labels.size, groups)
  point = metric(labels, scores)
  if not np.isfinite(point):
    return BootstrapCI(point, np.nan, np.nan, level=level, num_samples=0, num_redrawn=0)
  from_counts = _FROM_COUNTS.get(metric)
  levels = _ScoreLevels(labels, scores) if from_counts else None
  rng = np.random.default_rng(seed)
  values, redrawn = [], 0
  max_redrawn = int(max_redraw_fraction * num_samples)
  while len(values) < num_samples:
    indices = sampler(rng)
    num_pos = int(labels[indices].sum())
    if num_pos in (0, indices.size):
      if redrawn == max_redrawn:
        break
      redrawn += 1
      continue
    if from_counts:
      multiplicity = np.bincount(indices, minlength=labels.size).astype(np.float64)
      values.append(from_counts(*levels.class_counts(multiplicity)))
    else:
      values.append(metric(labels[indices], scores[indices]))
  if redrawn:
    stopped = (f' (stopped at the limit of {max_redrawn} redraws)'
               if len(values) < num_samples else '')
    warnings.warn(f'bootstrap: {redrawn} resamples had a single class (metric undefined) '
                  f'and were drawn again{stopped}; the interval uses {len(values)} valid '
                  'resamples.', UndefinedMetricWarning, stacklevel=2)
  if not values:
    return BootstrapCI(point, np.nan, np.nan, level=level, num_samples=0,
                       num_redrawn=redrawn)
  low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
  return BootstrapCI(point, low, high, level=level, num_samples=len(values),
                     num_redrawn=redrawn)


def _delong_components(labels, score_rows):
  """Fast DeLong (Sun & Xu, 2014): AUROCs and their covariance for M models.

  Args:
    labels: [N] binary labels with both classes.
    score_rows: [M, N] scores of M models on the same cases.

  Returns:
    (aucs [M], covariance [M, M]).
  """
  positive = labels == 1
  pos, neg = score_rows[:, positive], score_rows[:, ~positive]
  num_pos, num_neg = pos.shape[1], neg.shape[1]
  # Mid-ranks within positives, within negatives, and over all cases: their
  # differences are the placement values without forming the num_pos x num_neg matrix.
  rank_pos = stats.rankdata(pos, axis=1)
  rank_neg = stats.rankdata(neg, axis=1)
  rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
  # For a positive: the fraction of negatives it outscores (ties 1/2), and for a
  # negative: the fraction of positives that outscore it.
  pos_placement = (rank_all[:, :num_pos] - rank_pos) / num_neg
  neg_placement = 1.0 - (rank_all[:, num_pos:] - rank_neg) / num_pos
  aucs = pos_placement.mean(axis=1)
  covariance = (np.atleast_2d(np.cov(pos_placement)) / num_pos +
                np.atleast_2d(np.cov(neg_placement)) / num_neg)
  return aucs, covariance


def delong_test(labels, scores_a, scores_b, *, level=0.95) -> dict:
  """DeLong test of AUROC(a) = AUROC(b) for two models scored on the same cases.

  Uses the fast algorithm of Sun & Xu (2014), "Fast Implementation of DeLong's
  Algorithm for Comparing the Areas Under Correlated Receiver Operating
  Characteristic Curves", IEEE Signal Processing Letters 21(11).

  Returns:
    dict with auroc_a, auroc_b, difference (a - b), its standard error and
    `level` normal interval (difference_low, difference_high), z, the two-sided
    p_value, and covariance (2x2 nested list: var_a, cov_ab; cov_ab, var_b).
    Identical models give z = 0 and p = 1. An input with fewer than two cases of a
    class gives nan everywhere with an UndefinedMetricWarning.
  """
  labels, scores_a = check_binary(labels, scores_a, what='scores_a')
  _, scores_b = check_binary(labels, scores_b, what='scores_b')
  if not 0 < level < 1:
    raise ValueError(f'level must lie in (0, 1), got {level}.')
  reason = single_class_reason(labels)
  if not reason and min(labels.sum(), labels.size - labels.sum()) < 2:
    # The variance estimate needs two cases of each class (sample covariances).
    reason = (f'{int(labels.sum())} positive and {int(labels.size - labels.sum())} '
              'negative cases; the variance needs at least 2 of each')
  if reason:
    _undefined('DeLong test', reason)
    nan = float('nan')
    return dict(auroc_a=nan, auroc_b=nan, difference=nan, standard_error=nan,
                difference_low=nan, difference_high=nan, z=nan, p_value=nan,
                covariance=[[nan, nan], [nan, nan]])
  aucs, covariance = _delong_components(labels, np.stack([scores_a, scores_b]))
  difference = float(aucs[0] - aucs[1])
  variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
  standard_error = float(np.sqrt(max(variance, 0.0)))
  if standard_error > 0:
    z = difference / standard_error
  else:
    # No variance in the difference: the models rank these cases identically (or
    # one is perfect where the other is perfectly wrong).
    z = 0.0 if difference == 0 else float(np.sign(difference) * np.inf)
  p_value = float(2 * stats.norm.sf(abs(z)))
  half_width = float(stats.norm.ppf((1 + level) / 2)) * standard_error
  return dict(auroc_a=float(aucs[0]), auroc_b=float(aucs[1]), difference=difference,
              standard_error=standard_error, difference_low=difference - half_width,
              difference_high=difference + half_width, z=float(z), p_value=p_value,
              covariance=covariance.tolist())


def _check_probabilities(labels, probs):
  labels, probs = check_binary(labels, probs, what='probabilities')
  if probs.size and (probs.min() < 0 or probs.max() > 1):
    raise ValueError(f'Expected probabilities in [0, 1], got values from {probs.min():.4g} '
                     f'to {probs.max():.4g}; apply a sigmoid to logits first.')
  return labels, probs


def reliability_curve(labels, probs, num_bins=15) -> dict:
  """Calibration of predicted probabilities in `num_bins` equal-width bins of [0, 1].

  Bin b holds the cases with probability in (b/B, (b+1)/B] (the first bin also
  holds 0), the convention of Guo et al. (2017) and scikit-learn's
  `calibration_curve`. For a binary finding, a bin's "confidence" is its mean
  predicted probability of positive and its "accuracy" is the observed fraction of
  positives; a calibrated model has the two equal.

  Returns:
    dict of [num_bins] arrays: bin_low, bin_high, mean_predicted (confidence),
    fraction_positive (accuracy), count. Empty bins have count 0 and nan means.
  """
  labels, probs = _check_probabilities(labels, probs)
  if num_bins < 1:
    raise ValueError(f'num_bins must be at least 1, got {num_bins}.')
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.searchsorted(edges[1:-1], probs, side='left')
  count = np.bincount(bins, minlength=num_bins)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_predicted = np.bincount(bins, weights=probs, minlength=num_bins) / count
    fraction_positive = np.bincount(bins, weights=labels, minlength=num_bins) / count
  return dict(bin_low=edges[:-1], bin_high=edges[1:], mean_predicted=mean_predicted,
              fraction_positive=fraction_positive, count=count)


def expected_calibration_error(labels, probs, num_bins=15) -> float:
  """ECE = sum over bins of (n_b / N) * |mean predicted - fraction positive|.

  Defined for a single class too (calibration does not need both); nan with a
  warning only for an empty input.
  """
  curve = reliability_curve(labels, probs, num_bins)
  total = curve['count'].sum()
  if total == 0:
    return _undefined('ECE', 'no cases')
  filled = curve['count'] > 0
  gaps = np.abs(curve['mean_predicted'][filled] - curve['fraction_positive'][filled])
  return float(np.sum(curve['count'][filled] / total * gaps))


def check_table(labels, mask, scores, findings):
  """Validates [N, K] labels/mask/scores and K names; returns (labels, mask bool, scores).

  Labels must be 0/1 where the mask is 1 (elsewhere they may hold raw codes).
  """
  labels, scores = np.asarray(labels), np.asarray(scores)
  findings = list(findings)
  if labels.ndim != 2:
    raise ValueError(f'Expected labels of shape [N, K], got {labels.shape}.')
  if scores.shape != labels.shape:
    raise ValueError(f'scores have shape {scores.shape}; expected {labels.shape} like the '
                     'labels (one column per finding, in the same order).')
  if len(findings) != labels.shape[1]:
    raise ValueError(f'{len(findings)} finding names for {labels.shape[1]} label columns.')
  mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask)
  if mask.shape != labels.shape:
    raise ValueError(f'mask has shape {mask.shape}; expected {labels.shape}.')
  mask = mask.astype(bool)
  known_labels = labels[mask]
  bad = ~((known_labels == 0) | (known_labels == 1))
  if np.any(bad):
    raise ValueError(f'Labels where the mask is 1 must be 0 or 1; found '
                     f'{np.unique(known_labels[bad])[:5].tolist()}. Raw codes need a label '
                     'policy (cxr_jax.data.labels.LabelPolicy) first.')
  return labels, mask, scores


def per_finding_table(labels, mask, scores, findings, *, patient_ids=None,
                      num_samples=1000, level=0.95, seed=0) -> list:
  """AUROC and AUPRC with bootstrap intervals, one row per finding.

  Args:
    labels: [N, K] 0/1 labels (entries where mask is 0 may hold anything).
    mask: [N, K], 1 where the label is known; None means all known. A case counts
      for finding k only where mask[:, k] is 1.
    scores: [N, K] scores (finite where the mask is 1).
    findings: K names, the column order.
    patient_ids: optional [N] ids: patient-level bootstrap.
    num_samples: bootstrap resamples per metric (0 for point estimates only).
    level: interval coverage.
    seed: bootstrap seed (the same resamples for AUROC and AUPRC).

  Returns:
    list of dicts: finding, n, n_pos, prevalence, auroc, auroc_low, auroc_high,
    auprc, auprc_low, auprc_high, bootstrap_redrawn, note (why a value is nan).
  """
  labels, mask, scores = check_table(labels, mask, scores, findings)
  if patient_ids is not None:
    patient_ids = np.asarray(patient_ids)
    if patient_ids.shape != (labels.shape[0],):
      raise ValueError(f'patient_ids has shape {patient_ids.shape}; expected '
                       f'({labels.shape[0]},).')
  rows = []
  for k, finding in enumerate(findings):
    known = mask[:, k]
    finding_labels = labels[known, k].astype(np.int8)
    finding_scores = scores[known, k]
    if not np.all(np.isfinite(finding_scores)):
      raise ValueError(f'Finding {finding!r}: {int(np.sum(~np.isfinite(finding_scores)))} '
                       'scores are not finite where the label is known.')
    num_pos = int(finding_labels.sum())
    row = dict(finding=finding, n=int(finding_labels.size), n_pos=num_pos,
               prevalence=num_pos / finding_labels.size if finding_labels.size else np.nan)
    reason = single_class_reason(finding_labels)
    if reason:
      warnings.warn(f'Finding {finding!r}: AUROC and AUPRC are undefined ({reason}); '
                    'reporting nan.', UndefinedMetricWarning, stacklevel=2)
      row.update(auroc=np.nan, auroc_low=np.nan, auroc_high=np.nan, auprc=np.nan,
                 auprc_low=np.nan, auprc_high=np.nan, bootstrap_redrawn=0, note=reason)
      rows.append(row)
      continue
    groups = None if patient_ids is None else patient_ids[known]
    redrawn = 0
    for name, metric in (('auroc', auroc), ('auprc', auprc)):
      if num_samples:
        interval = bootstrap_ci(metric, finding_labels, finding_scores, groups=groups,
                                num_samples=num_samples, level=level, seed=seed)
        row.update({name: interval.point, f'{name}_low': interval.low,
                    f'{name}_high': interval.high})
        redrawn = max(redrawn, interval.num_redrawn)
      else:
        row.update({name: metric(finding_labels, finding_scores), f'{name}_low': np.nan,
                    f'{name}_high': np.nan})
    row.update(bootstrap_redrawn=redrawn, note='')
    rows.append(row)
  return rows
