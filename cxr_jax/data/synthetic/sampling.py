"""What one synthetic study is, sampled without rendering it.

The labels (`CXR_FINDINGS`, CheXpert codes), the presence model (`FINDING_PRIORS`),
patients, and `_sample_study`: who, which view, which findings with which
parameters, which mined labels and devices. The `check_*` functions validate the
generator's options. Indices come in blocks of `STUDIES_PER_BLOCK`; each block is
split into patients with one to four studies.
"""

import dataclasses
from typing import Mapping, Tuple

import numpy as np

from cxr_jax.data.synthetic.sites import SITES
from cxr_jax.data.synthetic.streams import (_ACUTE, _BLOCK, _CHRONIC, _DEVICES, _LABELS,
                                            _PATIENT, _REPORT, _STUDY, _check_seed_index,
                                            _pick, _rng)

# ---------------------------------------------------------------------------
# Labels.

CXR_FINDINGS = ('airspace_opacity', 'atelectasis', 'cardiomegaly', 'nodule',
                'pleural_effusion', 'pneumothorax', 'tuberculosis')

# CheXpert label codes (int8); UNMENTIONED stands for CheXpert's blank.
POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED = 1, 0, -1, -2
LABEL_CODES = (POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED)


@dataclasses.dataclass(frozen=True)
class FindingPrior:
  """P(present) = base + age_boost * (age - 18) / 72 + ap_boost [AP] + sum(given[present])."""
  base: float
  chronic: bool  # A property of the patient, shared by all their studies.
  age_boost: float = 0.0
  ap_boost: float = 0.0
  given: Mapping[str, float] = dataclasses.field(default_factory=dict)


# Sampled in this order, so `given` may only name findings listed above it.
FINDING_PRIORS = {
    'cardiomegaly': FindingPrior(0.05, chronic=True, age_boost=0.15),
    'nodule': FindingPrior(0.035, chronic=True, age_boost=0.06),
    'tuberculosis': FindingPrior(0.05, chronic=True),
    'pleural_effusion': FindingPrior(0.05, chronic=False, ap_boost=0.06,
                                     given={'cardiomegaly': 0.30}),
    'airspace_opacity': FindingPrior(0.08, chronic=False, ap_boost=0.06,
                                     given={'pleural_effusion': 0.25, 'tuberculosis': 0.10}),
    'atelectasis': FindingPrior(0.04, chronic=False, ap_boost=0.04,
                                given={'pleural_effusion': 0.20, 'airspace_opacity': 0.12}),
    'pneumothorax': FindingPrior(0.03, chronic=False, ap_boost=0.03),
}

# Marginal rates that FINDING_PRIORS produces (Monte Carlo over 6 x 10^4 studies);
# about 40% of studies have at least one finding.
PREVALENCE = {
    'airspace_opacity': 0.128,
    'atelectasis': 0.087,
    'cardiomegaly': 0.129,
    'nodule': 0.065,
    'pleural_effusion': 0.105,
    'pneumothorax': 0.039,
    'tuberculosis': 0.052,
}

AP_FRACTION = 0.3
# Beyond 3x the default spreads, patients leave the film and tone curves invert.
MAX_VARIABILITY = 3.0

# How report mining garbles a label when it does (probabilities sum to one).
# Positives are mostly hedged or missed; negatives mostly go unmentioned.
_GARBLED_POSITIVE = ((UNCERTAIN, 0.5), (NEGATIVE, 0.3), (UNMENTIONED, 0.2))
_GARBLED_NEGATIVE = ((UNMENTIONED, 0.7), (UNCERTAIN, 0.15), (POSITIVE, 0.15))


def derive_abnormal(labels: np.ndarray) -> int:
  """Report-level 'abnormal' code: positive if any finding is, uncertain if only hedged."""
  labels = np.asarray(labels)
  if np.any(labels == POSITIVE):
    return POSITIVE
  if np.any(labels == UNCERTAIN):
    return UNCERTAIN
  return NEGATIVE


def derive_no_finding(labels: np.ndarray) -> int:
  """CheXpert's 'No Finding': positive only when nothing is positive or uncertain."""
  abnormal = derive_abnormal(labels)
  return {POSITIVE: NEGATIVE, UNCERTAIN: NEGATIVE, NEGATIVE: POSITIVE}[abnormal]


# ---------------------------------------------------------------------------
# Patients: indices come in blocks, each split into patients with one to four studies.

STUDIES_PER_BLOCK = 4
_STUDIES_PER_PATIENT = (1, 1, 1, 1, 2, 2, 3, 4)


def _patient_of(seed: int, site: str, index: int):
  """(patient key, study number of that patient) for an index; see module docstring."""
  block, offset = divmod(index, STUDIES_PER_BLOCK)
  rng = _rng(seed, site, _BLOCK, block)
  start = 0
  for j in range(STUDIES_PER_BLOCK):
    size = min(_pick(rng, _STUDIES_PER_PATIENT), STUDIES_PER_BLOCK - start)
    if offset < start + size:
      return block * STUDIES_PER_BLOCK + j, offset - start
    start += size
  raise AssertionError('unreachable: the block is fully partitioned')


# ---------------------------------------------------------------------------
# Studies: who, which view, which findings, what the report says.


@dataclasses.dataclass
class _Study:
  site: str
  patient_id: str
  study_id: str
  sex: str
  age: int
  view: str
  true_labels: np.ndarray  # int8 [K] 0/1, after any override.
  labels: np.ndarray  # int8 [K] report-mined codes.
  anatomy: dict  # Patient- and study-level geometry and exposure.
  findings: dict  # Finding name -> drawn parameters (drawn whether present or not).
  devices: dict
  report_rng: np.random.Generator


def _sample_anatomy(rng, sex, age):
  """Patient-level geometry, in patient-frame units (the thorax spans about 1.4)."""
  old = (age - 18) / 72
  male = sex == 'M'
  size = rng.normal()
  return dict(
      half_width=0.68 + 0.04 * male + 0.045 * size,
      apex=-0.70 + 0.025 * rng.normal(),
      dome=0.33 + 0.05 * rng.normal(),
      dome_asymmetry=0.045 + 0.015 * rng.normal(),  # The right dome sits higher.
      # Normal hearts reach a cardiothoracic ratio of 0.5; cardiomegaly starts above it.
      ctr=float(np.clip(0.43 + 0.035 * rng.normal() + 0.03 * old, 0.34, 0.5)),
      heart_tilt=0.5 + 0.08 * rng.normal(),
      heart_height=0.34 + 0.02 * rng.normal(),
      mediastinum=0.1 + 0.008 * rng.normal() + 0.015 * old,
      aortic_knob=0.035 + 0.02 * old + 0.005 * rng.normal(),
      rib_spacing=1.0 + 0.05 * rng.normal(),
      rib_offset=0.02 * rng.normal(),
      rib_density=(0.13 if male else 0.11) * (1.1 - 0.35 * old),  # Osteopenia with age.
      clavicle=-0.64 + 0.025 * rng.normal(),
      breast=float(rng.uniform(0.2, 1.3)) if not male else 0.0,
      soft_tissue=1.0 + 0.15 * size,
      neck=0.20 + 0.02 * rng.normal(),
      lung_texture_seed=int(rng.integers(2**31)),
      vessel_phases=rng.uniform(0, 2 * np.pi, (2, 6)),
      # Three trunk orders, then three finer branch orders (see _lung_markings).
      vessel_orders=np.concatenate([rng.integers(9, 18, (2, 3)), rng.integers(24, 44, (2, 3))],
                                   axis=1),
      vessel_twists=rng.normal(0, 1.0, (2, 6)),
  )


def _sample_study_geometry(rng, view, variability=1.0):
  """Positioning, breath and exposure of one study; `variability` widens their spread."""
  ap = view == 'AP'
  v = variability
  return dict(
      center=v * rng.normal(0, 0.05, 2) + (0, 0.02 * ap),
      rotation=v * 0.06 * rng.normal(),
      zoom=(0.95 + v * rng.uniform(-0.11, 0.11)) * (1.04 if ap else 1.0),
      # Supine/portable films are taken in poorer inspiration: domes ride higher.
      inspiration=0.045 * rng.normal() - 0.05 * ap,
      aeration=rng.uniform(0.78, 1.1),  # Depth of breath and habitus: how dark lungs are.
      # Anode heel effect and uneven soft tissue: a gentle brightness slope across the film.
      heel=(rng.uniform(0, 2 * np.pi), v * rng.uniform(0, 0.25)),
      heart_magnification=1.13 if ap else 1.0,
      penetration=1 + v * rng.uniform(-0.15, 0.15),
      dose=float(np.exp(v * rng.normal(0, 0.35))),
      gamma=1 + v * rng.uniform(-0.1, 0.1),
      window=(rng.uniform(0.2, 1.5), rng.uniform(99.3, 99.9)),
      noise_seed=int(rng.integers(2**31)),
      stomach_gas=(rng.uniform(0, 0.25), rng.uniform(0.05, 0.12)),  # (density, size)
  )


def _sample_finding_parameters(rng, finding, severity_range=(0.0, 1.0)):
  """Where and how strongly a finding would show; drawn whether present or not."""
  low, high = severity_range
  # Subtle to obvious, mostly in between; rescaled into severity_range.
  severity = low + (high - low) * float(rng.beta(1.3, 1.6))
  side = _pick(rng, (-1, 1))  # -1: image left = patient right.
  params = dict(severity=severity, side=side, bilateral=False,
                field_seed=int(rng.integers(2**31)))
  if finding == 'airspace_opacity':
    params.update(bilateral=rng.random() < 0.2, height=rng.uniform(0.2, 0.95),
                  lateral=rng.uniform(0.3, 0.8), radius=rng.uniform(0.07, 0.22))
  elif finding == 'pleural_effusion':
    params.update(bilateral=rng.random() < 0.3)
  elif finding == 'cardiomegaly':
    params.update(ctr=0.5 + 0.14 * severity)
  elif finding == 'pneumothorax':
    params.update(apical=rng.random() < 0.7)
  elif finding == 'nodule':
    count = _pick(rng, (1, 1, 1, 2, 3))
    params.update(
        sides=rng.integers(0, 2, 3) * 2 - 1, heights=rng.uniform(0.15, 0.85, 3),
        laterals=rng.uniform(0.25, 0.85, 3), radii=rng.uniform(0.035, 0.075, 3),
        count=count)
  elif finding == 'tuberculosis':
    params.update(bilateral=rng.random() < 0.5, cavity=rng.random() < 0.4,
                  cavity_height=rng.uniform(0.12, 0.35), cavity_lateral=rng.uniform(0.35, 0.7),
                  cavity_radius=rng.uniform(0.045, 0.08))
  elif finding == 'atelectasis':
    params.update(height=rng.uniform(0.62, 0.9), lateral=rng.uniform(0.3, 0.7),
                  length=rng.uniform(0.15, 0.32), thickness=rng.uniform(0.012, 0.03),
                  angle=rng.normal(0, 0.2), lobar=rng.random() < 0.3)
  return params


def _sample_presence(u, prior, age, view, present):
  p = prior.base + prior.age_boost * (age - 18) / 72
  if not prior.chronic and view == 'AP':
    p += prior.ap_boost
  p += sum(boost for parent, boost in prior.given.items() if present[parent])
  return bool(u < p)


def _mine_labels(rng, true_labels, label_noise):
  """Report-mined codes: each label garbled with probability `label_noise`."""
  garble = rng.random(len(true_labels)) < label_noise
  kind = rng.random(len(true_labels))
  labels = np.array(true_labels, np.int8)
  for k, truth in enumerate(true_labels):
    if garble[k]:
      table = _GARBLED_POSITIVE if truth else _GARBLED_NEGATIVE
      cumulative = np.cumsum([p for _, p in table])
      labels[k] = table[int(np.searchsorted(cumulative, kind[k], side='right'))][0]
  return labels


def check_severity_range(severity_range) -> Tuple[float, float]:
  """(low, high) as floats, or a ValueError naming what is wrong with it."""
  try:
    low, high = map(float, severity_range)
  except (TypeError, ValueError):
    raise ValueError(f'severity_range must be a pair (low, high), got {severity_range!r}.'
                     ) from None
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f'severity_range must satisfy 0 <= low <= high <= 1, got '
                     f'{severity_range!r}.')
  return low, high


def check_variability(variability) -> float:
  """`variability` as a float, or a ValueError naming the value."""
  try:
    value = float(variability)
  except (TypeError, ValueError):
    raise ValueError(f'variability must be a number, got {variability!r}.') from None
  if not 0.0 <= value <= MAX_VARIABILITY:
    raise ValueError(f'variability must be in [0, {MAX_VARIABILITY}], got {variability!r}.')
  return value


def check_opacity_texture(opacity_texture) -> float:
  """`opacity_texture` as a float in [0, 1], or a ValueError naming the value."""
  try:
    value = float(opacity_texture)
  except (TypeError, ValueError):
    raise ValueError(f'opacity_texture must be a number, got {opacity_texture!r}.') from None
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'opacity_texture must be in [0, 1], got {opacity_texture!r}.')
  return value


def _sample_study(index, seed, site, label_noise, findings_override,
                  severity_range=(0.0, 1.0), variability=1.0):
  _check_seed_index(seed, index)
  severity_range = check_severity_range(severity_range)
  variability = check_variability(variability)
  if site not in SITES:
    raise ValueError(f'Unknown site {site!r}; sites are {sorted(SITES)}.')
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f'label_noise must be in [0, 1], got {label_noise}.')
  override = dict(findings_override or {})
  unknown = sorted(set(override) - set(CXR_FINDINGS))
  if unknown:
    raise ValueError(f'findings_override names unknown findings {unknown}; '
                     f'findings are {list(CXR_FINDINGS)}.')

  patient_key, study_number = _patient_of(seed, site, index)
  patient_rng = _rng(seed, site, _PATIENT, patient_key)
  sex = 'F' if patient_rng.random() < 0.5 else 'M'
  first_age = int(np.clip(np.round(patient_rng.normal(56, 17)), 18, 88))
  anatomy = _sample_anatomy(patient_rng, sex, first_age)
  age = min(90, first_age + study_number)  # Follow-up studies about a year apart.

  study_rng = _rng(seed, site, _STUDY, index)
  view = 'AP' if study_rng.random() < AP_FRACTION else 'PA'
  anatomy.update(_sample_study_geometry(study_rng, view, variability))

  # Presence draws come first, then every finding's parameters in a fixed order and
  # number, so forcing one finding on or off changes no other draw.
  chronic_rng = _rng(seed, site, _CHRONIC, patient_key)
  acute_rng = _rng(seed, site, _ACUTE, index)
  chronic_u = chronic_rng.random(len(CXR_FINDINGS))
  acute_u = acute_rng.random(len(CXR_FINDINGS))
  present = {}
  for name, prior in FINDING_PRIORS.items():
    k = CXR_FINDINGS.index(name)
    u = chronic_u[k] if prior.chronic else acute_u[k]
    present[name] = _sample_presence(u, prior, first_age, view, present)
  natural = dict(present)
  present.update({name: bool(value) for name, value in override.items()})

  findings = {}
  for name in CXR_FINDINGS:
    rng = chronic_rng if FINDING_PRIORS[name].chronic else acute_rng
    findings[name] = _sample_finding_parameters(rng, name, severity_range)
    findings[name]['present'] = present[name]
  # Compressive atelectasis sits above the effusion.
  if present['pleural_effusion'] and present['atelectasis']:
    findings['atelectasis']['side'] = findings['pleural_effusion']['side']

  true_labels = np.array([present[name] for name in CXR_FINDINGS], np.int8)
  labels = _mine_labels(_rng(seed, site, _LABELS, index), true_labels, label_noise)
  devices = _sample_devices(_rng(seed, site, _DEVICES, index), view, natural)
  return _Study(
      site=site, patient_id=f'{site}-s{seed}-p{patient_key:07d}',
      study_id=f'{site}-s{seed}-i{index:07d}', sex=sex, age=age, view=view,
      true_labels=true_labels, labels=labels, anatomy=anatomy, findings=findings,
      devices=devices, report_rng=_rng(seed, site, _REPORT, index))


def _sample_devices(rng, view, natural_findings):
  """Lines and leads: unlabelled distractors, commoner on sicker (AP) patients."""
  ap = view == 'AP'
  draws = rng.random(4)
  return dict(
      ecg_leads=draws[0] < (0.35 if ap else 0.03),
      lead_positions=rng.uniform(-1, 1, (4, 2)),
      central_line=draws[1] < (0.25 if ap else 0.02),
      line_side=_pick(rng, (-1, 1)),
      pacemaker=draws[2] < (0.15 if natural_findings['cardiomegaly'] else 0.015),
      granulomas=int(draws[3] < 0.1) * int(rng.integers(1, 3)),
      granuloma_positions=rng.uniform(0.15, 0.85, (2, 2)),
      granuloma_sides=rng.integers(0, 2, 2) * 2 - 1,
  )
