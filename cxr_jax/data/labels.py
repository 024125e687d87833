"""CXR label conventions: stored codes, uncertainty policies, derived labels, patient splits.

Builders store each finding as an int8 code in the CheXpert convention (POSITIVE 1,
NEGATIVE 0, UNCERTAIN -1, UNMENTIONED -2 for a blank cell). A policy turns codes into
the training targets `labels` (float32 0/1) and `label_mask` (1 where the target is
known), per finding: U-Ignore masks uncertain labels, U-Zeros and U-Ones map them to
0 or 1 (Irvin et al., 2019, CheXpert).
"""

import dataclasses
import hashlib
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED = 1, 0, -1, -2

# The 14 CheXpert observations, in the order of the CheXpert CSV columns.
CHEXPERT_FINDINGS = (
    'No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
    'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax',
    'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices')

# The 14 ChestX-ray14 findings (Wang et al., 2017), as spelled in `Finding Labels`.
NIH_FINDINGS = (
    'Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
    'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening',
    'Hernia')

# Per-record metadata every CXR builder stores beside the labels; embeddings files,
# probe predictions and zero-shot scores carry them for patient-level and subgroup metrics.
METADATA_KEYS = ('patient_id', 'study_id', 'sex', 'age', 'view', 'site')

POLICIES = ('ignore', 'zeros', 'ones')


def parse_code(value, *, source: str) -> int:
  """A CSV cell -> label code; blank is UNMENTIONED. Errors name the source cell."""
  text = str(value).strip() if value is not None else ''
  if text == '' or text.lower() == 'nan':
    return UNMENTIONED
  try:
    number = float(text)
  except ValueError:
    number = None
  if number not in (1.0, 0.0, -1.0):
    raise ValueError(f'{source}: label value {value!r} is not one of 1, 0, -1 or blank.')
  return int(number)


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
  """How codes become targets. `per_finding` overrides `uncertain` for named findings.

  `unmentioned` says what a blank means: 'ignore' (mask it) or 'zeros' (negative, the
  usual reading of report-mined labels where a finding not mentioned is absent).
  """
  uncertain: str = 'ignore'
  per_finding: Tuple[Tuple[str, str], ...] = ()
  unmentioned: str = 'zeros'

  def __post_init__(self):
    for name, policy in ((('uncertain', self.uncertain),) + tuple(self.per_finding)):
      if policy not in POLICIES:
        raise ValueError(f'Uncertainty policy for {name!r} is {policy!r}; expected one of '
                         f'{POLICIES}.')
    if self.unmentioned not in ('ignore', 'zeros'):
      raise ValueError(f"unmentioned={self.unmentioned!r}; expected 'ignore' or 'zeros'.")

  @classmethod
  def from_config(cls, config: Mapping) -> 'LabelPolicy':
    return cls(uncertain=config.get('uncertain', 'ignore'),
               per_finding=tuple(sorted(dict(config.get('per_finding', {}) or {}).items())),
               unmentioned=config.get('unmentioned', 'zeros'))

  def apply(self, codes: np.ndarray, findings: Sequence[str]) -> Dict[str, np.ndarray]:
    """codes [..., K] int8 -> {'labels': float32 [..., K], 'label_mask': float32 [..., K]}."""
    overrides = dict(self.per_finding)
    unknown = sorted(set(overrides) - set(findings))
    if unknown:
      raise ValueError(f'Label policy names findings {unknown} that the dataset lacks; '
                       f'it has {list(findings)}.')
    codes = np.asarray(codes)
    labels = (codes == POSITIVE).astype(np.float32)
    mask = np.ones(codes.shape, np.float32)
    if self.unmentioned == 'ignore':
      mask[codes == UNMENTIONED] = 0
    for k, name in enumerate(findings):
      policy = overrides.get(name, self.uncertain)
      uncertain = codes[..., k] == UNCERTAIN
      if policy == 'ignore':
        mask[..., k][uncertain] = 0
      elif policy == 'ones':
        labels[..., k][uncertain] = 1
    return {'labels': labels, 'label_mask': mask}


def derive_abnormal(codes: np.ndarray, findings: Sequence[str]) -> np.ndarray:
  """Normal (0) vs abnormal (1) per image, the coarse label of the CXR-network recipe.

  Abnormal if any finding other than 'No Finding'/'Support Devices' is positive or
  uncertain; normal otherwise (including 'No Finding' positive).
  """
  excluded = {'No Finding', 'no_finding', 'Support Devices'}
  columns = [k for k, name in enumerate(findings) if name not in excluded]
  codes = np.asarray(codes)[..., columns]
  return np.any((codes == POSITIVE) | (codes == UNCERTAIN), axis=-1).astype(np.int8)


def patient_split(patient_id: str, fractions: Mapping[str, float], *, salt: str = '') -> str:
  """Assigns a patient (so every study of that patient) to one split, by a stable hash.

  `fractions` like {'train': 0.8, 'validation': 0.1, 'test': 0.1}; deterministic across
  runs, machines and Python versions, so no patient ever crosses splits.
  """
  total = sum(fractions.values())
  if not np.isclose(total, 1.0):
    raise ValueError(f'Split fractions {dict(fractions)} sum to {total}, not 1.')
  digest = hashlib.sha256(f'{salt}{patient_id}'.encode()).digest()
  point = int.from_bytes(digest[:8], 'big') / 2**64
  cumulative = 0.0
  for name, fraction in fractions.items():
    cumulative += fraction
    if point < cumulative:
      return name
  return list(fractions)[-1]
