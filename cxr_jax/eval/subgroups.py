"""Metrics by subgroup (sex, age band, view, site) and the largest gap between groups.

A model that is good on average can still fail one group of patients; these tables
make that visible. Each group gets its own row (n, n_pos, AUROC and optionally a
bootstrap interval); a group that cannot support an AUROC (too few cases, or one
class only) gets nan and a `note` saying why, never a crash and never a number from
three images. Missing metadata ('', 'U', 'UNKNOWN', -1 ages ...) forms the group
'unknown', which is listed but left out of the gap, since it is not a population.
"""

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from cxr_jax.eval import metrics

ATTRIBUTES = ('sex', 'age', 'view', 'site')
DEFAULT_AGE_EDGES = (40, 60, 80)  # Bands <40, 40-60, 60-80, >=80.
UNKNOWN = 'unknown'
_MISSING = frozenset({'', 'u', 'unknown', 'nan', 'none', 'n/a'})


def age_band_names(edges: Sequence[float] = DEFAULT_AGE_EDGES) -> list:
  """Band names for `edges`, youngest first: (40, 60, 80) -> <40, 40-60, 60-80, >=80."""
  edges = [float(edge) for edge in edges]
  if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
    raise ValueError(f'Age band edges must be a non-empty increasing sequence, got {edges}.')
  text = [f'{edge:g}' for edge in edges]
  return [f'<{text[0]}'] + [f'{a}-{b}' for a, b in zip(text, text[1:])] + [f'>={text[-1]}']


def age_bands(ages, edges: Sequence[float] = DEFAULT_AGE_EDGES) -> np.ndarray:
  """Ages -> band names '<40', '40-60', '60-80', '>=80' (lower edge inclusive).

  Negative or non-finite ages (the builders store -1 for unknown) map to 'unknown'.
  """
  names = age_band_names(edges)
  try:
    ages = np.asarray(ages, dtype=np.float64)
  except ValueError as error:
    raise ValueError(f'Ages must be numbers (years; -1 for unknown), got values like '
                     f'{np.asarray(ages).ravel()[:3].tolist()}.') from error
  known = np.isfinite(ages) & (ages >= 0)
  index = np.searchsorted(np.asarray(edges, np.float64), np.where(known, ages, 0), side='right')
  return np.where(known, np.asarray(names, dtype=object)[index], UNKNOWN).astype(str)


def group_names(values) -> np.ndarray:
  """Metadata values -> group names (str), with the missing markers mapped to 'unknown'."""
  values = np.asarray(values)
  if values.dtype.kind == 'S':
    values = np.char.decode(values, 'utf-8')
  names = np.char.strip(values.astype(str))
  missing = np.isin(np.char.lower(names), list(_MISSING))
  return np.where(missing, UNKNOWN, names)


def subgroup_rows(labels, scores, groups, *, attribute: str, finding: str = '',
                  min_cases: int = 10, patient_ids=None, num_samples: int = 0,
                  level: float = 0.95, seed: int = 0,
                  order: Optional[Sequence[str]] = None) -> list:
  """AUROC per group of one attribute, for one finding.

  Args:
    labels: [N] 0/1 labels.
    scores: [N] scores.
    groups: [N] group name per case (see `group_names`, `age_bands`).
    attribute: the attribute's name, copied into each row.
    finding: the finding's name, copied into each row.
    min_cases: groups with fewer cases get nan (an AUROC from a handful of images
      is noise).
    patient_ids: optional [N] ids for a patient-level bootstrap.
    num_samples: bootstrap resamples for an interval; 0 for point estimates.
    level: interval coverage.
    seed: bootstrap seed.
    order: group names in the order to list them (e.g. age bands youngest
      first); groups not named follow sorted by name, 'unknown' last.

  Returns:
    One dict per group: finding, attribute, group, n, n_pos,
    prevalence, auroc, auroc_low, auroc_high, note.
  """
  labels, scores = metrics.check_binary(labels, scores)
  groups = np.asarray(groups).astype(str)
  if groups.shape != labels.shape:
    raise ValueError(f'{attribute!r} values have shape {groups.shape}; expected '
                     f'{labels.shape} like the labels.')
  rank = {name: i for i, name in enumerate(order or ())}
  names = sorted(set(groups.tolist()),
                 key=lambda name: (name == UNKNOWN, rank.get(name, len(rank)), name))
  rows = []
  for name in names:
    inside = groups == name
    group_labels, group_scores = labels[inside], scores[inside]
    num_pos = int(group_labels.sum())
    row = dict(finding=finding, attribute=attribute, group=name, n=int(inside.sum()),
               n_pos=num_pos, prevalence=num_pos / inside.sum(), auroc=np.nan,
               auroc_low=np.nan, auroc_high=np.nan, note='')
    reason = metrics.single_class_reason(group_labels)
    if row['n'] < min_cases:
      row['note'] = f'fewer than {min_cases} cases'
    elif reason:
      row['note'] = reason
    elif num_samples:
      ids = None if patient_ids is None else np.asarray(patient_ids)[inside]
      interval = metrics.bootstrap_ci(metrics.auroc, group_labels, group_scores, groups=ids,
                                      num_samples=num_samples, level=level, seed=seed)
      row.update(auroc=interval.point, auroc_low=interval.low, auroc_high=interval.high)
    else:
      row['auroc'] = metrics.auroc(group_labels, group_scores)
    rows.append(row)
  return rows


def largest_gap(rows: Sequence[Mapping]) -> dict:
  """The largest AUROC difference between two known groups of the same rows.

  Returns:
    dict: finding, attribute, gap, best_group, best_auroc, worst_group, worst_auroc,
    num_groups (groups with a defined AUROC), note. The gap is nan (with a note)
    when fewer than two groups have a defined AUROC.
  """
  rows = list(rows)
  valid = [row for row in rows if row['group'] != UNKNOWN and np.isfinite(row['auroc'])]
  gap = dict(finding=rows[0]['finding'] if rows else '',
             attribute=rows[0]['attribute'] if rows else '', gap=np.nan, best_group='',
             best_auroc=np.nan, worst_group='', worst_auroc=np.nan, num_groups=len(valid),
             note='')
  if len(valid) < 2:
    gap['note'] = 'fewer than two groups with a defined AUROC'
    return gap
  best = max(valid, key=lambda row: row['auroc'])
  worst = min(valid, key=lambda row: row['auroc'])
  gap.update(gap=best['auroc'] - worst['auroc'], best_group=best['group'],
             best_auroc=best['auroc'], worst_group=worst['group'],
             worst_auroc=worst['auroc'])
  return gap


def subgroup_table(labels, mask, scores, findings: Sequence[str], metadata: Mapping, *,
                   attributes: Optional[Sequence[str]] = None,
                   age_edges: Sequence[float] = DEFAULT_AGE_EDGES, min_cases: int = 10,
                   patient_ids=None, num_samples: int = 0, level: float = 0.95,
                   seed: int = 0) -> Tuple[list, list]:
  """Subgroup rows and gaps for every finding and attribute.

  Args:
    labels, mask, scores, findings: as in `metrics.per_finding_table` ([N, K]).
    metadata: {attribute: [N] values}; 'age' holds numbers (banded by `age_edges`),
      the others names.
    attributes: which to use; default every one of ATTRIBUTES that `metadata` has.
    age_edges, min_cases, patient_ids, num_samples, level, seed: see `age_bands`
      and `subgroup_rows`.

  Returns:
    (rows, gaps): `subgroup_rows` rows for all findings and attributes, and one
    `largest_gap` dict per (finding, attribute).
  """
  labels, mask, scores = metrics.check_table(labels, mask, scores, findings)
  if attributes is None:
    attributes = [name for name in ATTRIBUTES if name in metadata]
  missing = [name for name in attributes if name not in metadata]
  if missing:
    raise ValueError(f'Subgroup attributes {missing} are not in the metadata; it has '
                     f'{sorted(metadata)}.')
  grouping = {}
  for name in attributes:
    values = np.asarray(metadata[name])
    if values.shape != (labels.shape[0],):
      raise ValueError(f'metadata[{name!r}] has shape {values.shape}; expected '
                       f'({labels.shape[0]},), one value per case.')
    grouping[name] = age_bands(values, age_edges) if name == 'age' else group_names(values)
  if patient_ids is not None:
    patient_ids = np.asarray(patient_ids)
  rows, gaps = [], []
  for k, finding in enumerate(findings):
    known = mask[:, k]
    ids = None if patient_ids is None else patient_ids[known]
    for name in attributes:
      attribute_rows = subgroup_rows(
          labels[known, k].astype(np.int8), scores[known, k], grouping[name][known],
          attribute=name, finding=finding, min_cases=min_cases, patient_ids=ids,
          num_samples=num_samples, level=level, seed=seed,
          order=age_band_names(age_edges) if name == 'age' else None)
      rows.extend(attribute_rows)
      gaps.append(largest_gap(attribute_rows))
  return rows, gaps
