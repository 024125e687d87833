"""Hand-annotated reports and how a labeler's output is scored against them.

The file format (tests/text/data/annotated_reports.txt is one): '#' lines are comments;
a record is a line '== ID', the report's lines, then one line
'-- abnormal=0|1 | Observation=code | ...' with codes 1, 0, -1 (or -2 for "must be
blank"). An observation a record does not list is expected to be blank or negative.

Scores follow CheXpert's evaluation of its labeler: per observation, F1 of "positive"
(code 1) over the reports, and of "mentioned" (any code but blank, negation and
uncertainty included) when asked; plus normal/abnormal accuracy.
"""

import dataclasses
from typing import Dict, List, Sequence

import numpy as np

from cxr_jax.text import labeler as labeler_lib


@dataclasses.dataclass(frozen=True)
class Annotated:
  id: str
  report: str
  abnormal: int
  codes: Dict[str, int]  # Observation -> expected code, only those listed.
  line: int  # Of the '== id' line, for error messages.


def read_annotated(path: str) -> List[Annotated]:
  """The records of an annotation file; a malformed one is an error naming its line."""
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  records, current = [], None
  for number, line in enumerate(lines, start=1):
    if current is None:
      if not line.strip() or line.startswith('#'):
        continue
      if not line.startswith('== '):
        raise ValueError(f'{path} line {number}: expected "== ID", got {line[:40]!r}.')
      current = {'id': line[3:].strip(), 'line': number, 'body': []}
    elif line.startswith('-- '):
      records.append(_record(current, line[3:], path, number))
      current = None
    else:
      current['body'].append(line)
  if current is not None:
    raise ValueError(f'{path} line {current["line"]}: record {current["id"]!r} has no '
                     '"-- " labels line.')
  ids = [r.id for r in records]
  if len(set(ids)) != len(ids):
    raise ValueError(f'{path}: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}.')
  return records


def _record(current, labels: str, path: str, number: int) -> Annotated:
  codes, abnormal = {}, None
  for item in labels.split('|'):
    name, _, value = (part.strip() for part in item.partition('='))
    where = f'{path} line {number} ({current["id"]})'
    if name == 'abnormal':
      if value not in ('0', '1'):
        raise ValueError(f'{where}: abnormal={value!r}; expected 0 or 1.')
      abnormal = int(value)
    elif name in labeler_lib.OBSERVATIONS:
      if value not in ('1', '0', '-1', '-2'):
        raise ValueError(f'{where}: {name}={value!r}; expected 1, 0, -1 or -2.')
      codes[name] = int(value)
    else:
      raise ValueError(f'{where}: unknown label {name!r}; expected abnormal or one of '
                       f'{list(labeler_lib.OBSERVATIONS)}.')
  if abnormal is None:
    raise ValueError(f'{path} line {number} ({current["id"]}): no abnormal=0|1.')
  report = '\n'.join(current['body']).strip()
  if not report:
    raise ValueError(f'{path} line {current["line"]} ({current["id"]}): empty report.')
  return Annotated(id=current['id'], report=report, abnormal=abnormal, codes=codes,
                   line=current['line'])


def expected_codes(records: Sequence[Annotated], names: Sequence[str]) -> np.ndarray:
  """int8 [N, len(names)]: listed codes, blank (-2) where not listed."""
  codes = np.full((len(records), len(names)), labeler_lib.UNMENTIONED, np.int8)
  for i, record in enumerate(records):
    for name, code in record.codes.items():
      codes[i, list(names).index(name)] = code
  return codes


def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
  """F1 of boolean arrays; nan when neither has a positive."""
  truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
  tp = np.sum(truth & predicted)
  denominator = truth.sum() + predicted.sum()
  return float(2 * tp / denominator) if denominator else float('nan')


def score(expected: np.ndarray, predicted: np.ndarray, names: Sequence[str],
          expected_abnormal: np.ndarray, predicted_abnormal: np.ndarray) -> Dict[str, float]:
  """{'abnormal_accuracy', 'f1/<observation>' (positive), 'n_pos/<observation>'}."""
  out = {'abnormal_accuracy': float(np.mean(np.asarray(expected_abnormal) ==
                                            np.asarray(predicted_abnormal)))}
  for k, name in enumerate(names):
    out[f'f1/{name}'] = f1(expected[:, k] == 1, predicted[:, k] == 1)
    out[f'n_pos/{name}'] = int(np.sum(expected[:, k] == 1))
  return out
