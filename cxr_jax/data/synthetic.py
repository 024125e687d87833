"""Procedural chest X-ray phantoms and natural-like images: the embedded default data.

Nothing is downloaded: every test and the quickstart train on these generators.

`generate_cxr` draws a frontal chest radiograph (uint16, full 16-bit range, as in
16-bit PNG/DICOM exports) of a patient at a site, with true finding labels, the
labels a report miner would extract (CheXpert codes, with a configurable error
rate), and the templated report those labels came from. `generate_natural` draws
an RGB image of one of many procedural object classes for generic pretraining.

Both are pure functions of their arguments: the random state of every example is
derived from (seed, site, index) through `np.random.SeedSequence`, so any example
can be regenerated alone (random access for ArrayRecord builders, parallel
generation). Patient, study, findings, labels, report and devices draw from
separate streams, and every finding's parameters are drawn whether it is present or
not, so forcing a finding on or off with `findings_override` changes only that
finding's pixels (and labels and report).

Findings (CXR_FINDINGS, the label order), each with a severity from subtle to obvious:
  airspace_opacity  fluffy patchy brightening of a lung zone, sometimes bilateral;
  atelectasis       a plate-like band at a base, the hemidiaphragm pulled up, at times
                    a retrocardiac left lower lobe collapse;
  cardiomegaly      cardiothoracic ratio above 0.5 (normal hearts stay at or below it;
                    the AP view magnifies every heart by ~13%, as on real films);
  nodule            one to three round bright spots of 1.5-3.5 cm;
  pleural_effusion  fluid at a base with a meniscus rising laterally, blunting the
                    costophrenic angle and hiding the dome; a veil on supine AP films;
  pneumothorax      apical or lateral air without lung markings outside a thin
                    pleural line (ribs, on the chest wall, stay visible);
  tuberculosis      upper-zone fibronodular opacities, apical capping, in established
                    disease an irregular thick-walled cavity.
Unlabelled distractors: ECG leads, central lines, pacemakers (commoner with
cardiomegaly), calcified granulomas, breast shadows, stomach gas.

Sites (SITES) differ in beam hardness, scatter, noise, blur, edge enhancement, tone
curve, pedestal, bit depth, burned-in markers, collimation borders and grid lines;
patients, anatomy and findings follow the same distributions at every site.

How the radiograph is made. Anatomy is a density map in a patient frame (u to the
image right = patient's left, v downwards, both about [-1, 1]): soft tissue with a
thickness profile, two aerated lungs (negative density) bounded by the apices,
chest wall, mediastinum, heart and diaphragm domes; ribs, clavicles, spine and
humeral heads; lung markings radiating from the hila. Findings act as they do on
films: they replace lung air with fluid or tissue (opacity, effusion, atelectasis,
nodule, tuberculosis), enlarge the heart (cardiomegaly), or add air where lung
markings vanish behind a thin pleural line (pneumothorax). The density is turned
into transmitted intensity, blurred and given quantum noise by the site's detector,
log-transformed, edge-enhanced, windowed and tone-mapped by the site's software,
burned-in markers and collimation borders are added, and it is quantised to the
site's bit depth and scaled to 16 bits.

Labels and co-occurrence. `FINDING_PRIORS` is the presence model: a base rate plus
boosts for age, the AP view (sicker, portable patients) and co-present findings
(effusion with cardiomegaly, opacity and atelectasis with effusion). Chronic
findings belong to the patient and persist over their studies; acute ones are
drawn per study. `PREVALENCE` lists the marginal rates this produces.

Report mining. With probability `label_noise` a label is garbled: a true positive
becomes uncertain, negative or unmentioned; a true negative becomes unmentioned,
uncertain or positive (see `_GARBLED_POSITIVE` and `_GARBLED_NEGATIVE`). The report
is written from the garbled labels, as if the radiologist (or the miner) erred.
With `mine_labels=True` the labels are instead read back from that report by the
report labeler (`cxr_jax.text.labeler`), as the published recipe mined its labels.

Patients. Indices come in blocks of `STUDIES_PER_BLOCK`; each block is split into
patients with one to four studies, so consecutive indices often share a patient and
splits must be made by `patient_id`.
"""

import dataclasses
import functools
import math
import zlib
from typing import Mapping, Optional, Tuple

import numpy as np
from scipy import ndimage

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
# Sites: the same anatomy seen through different scanners and export software.


@dataclasses.dataclass(frozen=True)
class SiteProfile:
  """What one hospital's detector and image processing do to a radiograph."""
  description: str
  attenuation: float  # Beam hardness: scales how strongly density absorbs (contrast).
  quantum_noise: float  # Photon-noise std at unit transmission (256 px reference).
  electronic_noise: float  # Additive detector noise std (256 px reference).
  scatter: float  # Scattered fraction reaching the detector (lower with a grid).
  blur: float  # Detector/resampling blur sigma, as a fraction of the image width.
  edge_enhance: float  # Unsharp-mask gain of the export software.
  gamma: float  # Tone exponent after windowing; > 1 darkens mid-tones.
  s_curve: float  # Blend (0..1) towards a sigmoid contrast curve.
  black_level: float  # Pedestal the export adds, as a fraction of the range.
  white_level: float  # Highest anatomy value, as a fraction of the range.
  bits: int  # Stored bit depth, scaled up to 16 bits on export.
  marker: str  # Burned-in marker text; '{view}' becomes the study's view.
  marker_corner: str  # 'tl', 'tr', 'bl' or 'br'.
  marker_box: bool  # Marker drawn white on a black box.
  border: float  # Collimation border width as a fraction of the image (0: none).
  border_value: float  # Border intensity, 0 black to 1 white.
  grid_lines: float  # Amplitude of anti-scatter grid lines (0: none).


SITES = {
    'A': SiteProfile(
        description='Flat-panel DR, mild processing, native 16 bit.',
        attenuation=2.4, quantum_noise=0.012, electronic_noise=0.002, scatter=0.04,
        blur=0.0015, edge_enhance=0.35, gamma=1.0, s_curve=0.25, black_level=0.0, white_level=1.0,
        bits=16, marker='L', marker_corner='tr', marker_box=False, border=0.0,
        border_value=0.0, grid_lines=0.0),
    'B': SiteProfile(
        description='Older computed radiography: noisier, softer, flat tone curve, '
                    'pedestal, 12-bit, grid lines, white collimation edges.',
        attenuation=2.0, quantum_noise=0.03, electronic_noise=0.006, scatter=0.1,
        blur=0.005, edge_enhance=0.0, gamma=1.35, s_curve=0.0, black_level=0.07, white_level=0.93,
        bits=12, marker='R', marker_corner='tl', marker_box=True, border=0.035,
        border_value=1.0, grid_lines=0.025),
    'C': SiteProfile(
        description='DR with strong edge enhancement and a steep sigmoid curve, '
                    '14-bit, black collimation border.',
        attenuation=2.8, quantum_noise=0.018, electronic_noise=0.003, scatter=0.03,
        blur=0.0025, edge_enhance=0.9, gamma=0.8, s_curve=0.7, black_level=0.02, white_level=1.0,
        bits=14, marker='{view}', marker_corner='bl', marker_box=False, border=0.05,
        border_value=0.0, grid_lines=0.0),
}

# ---------------------------------------------------------------------------
# Random streams, one per component, so changing one leaves the others alone.

STUDIES_PER_BLOCK = 4
_STUDIES_PER_PATIENT = (1, 1, 1, 1, 2, 2, 3, 4)

_BLOCK, _PATIENT, _CHRONIC, _STUDY, _ACUTE, _LABELS, _REPORT, _DEVICES = range(8)
_NATURAL = 1000


def _site_key(site: str) -> int:
  return zlib.crc32(site.encode())


def _rng(seed: int, site: str, *keys: int) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(_site_key(site), *keys)))


def _pick(rng, options):
  """One element of a sequence (much cheaper than Generator.choice for small tuples)."""
  return options[int(rng.integers(len(options)))]


def _check_seed_index(seed, index):
  if not (isinstance(index, (int, np.integer)) and index >= 0):
    raise ValueError(f'index must be a non-negative integer, got {index!r}.')
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')


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


# ---------------------------------------------------------------------------
# Reports, written from the (garbled) codes in varied dictation: section layouts, an
# indication that may name a finding the image lacks, negation ("no", "without",
# "free of", "resolved"), uncertainty ("possible", "may represent", "cannot be
# excluded", "likely"), change language ("unchanged", "no change in"), laterality,
# abbreviations and typos (PTX, effusoin), and de-identification placeholders. A
# finding coded POSITIVE gets a positive sentence, NEGATIVE a negated one, UNCERTAIN a
# hedged one, UNMENTIONED none; `mine_labels=True` then reads the codes back with
# `cxr_jax.text.labeler`, as the published recipe mined its labels.

_SIDE_WORD = {-1: 'right', 1: 'left', 0: 'bilateral'}
_SIZE_WORD = ('small', 'moderate', 'large')

_POSITIVE_TEMPLATES = {
    'airspace_opacity': ('Patchy airspace opacity in the {side} {zone} zone.',
                         '{Side} {zone} zone airspace opacity.',
                         'Focal {side} {zone} zone consolidation.',
                         'There is patchy opacity in the {side} {zone} zone, new since the prior.',
                         'Unchanged {side} {zone} zone airspace disease.',
                         '{Side} {zone} zone infiltrate.'),
    'atelectasis': ('Linear atelectasis at the {side} base.',
                    'Plate-like atelectasis in the {side} lower zone.',
                    '{Side} basilar atelectasis, unchanged.',
                    'No change in the subsegmental atelectasis at the {side} base.',
                    'Mild {side} basilar atelectasis.'),
    'cardiomegaly': ('The heart is enlarged, in keeping with cardiomegaly.',
                     '{Size} cardiomegaly.', 'Stable {size} cardiomegaly.',
                     'The cardiac silhouette is {degree} enlarged.',
                     'Heart size is {degree} enlarged, unchanged.', 'Cardiomegally.'),
    'nodule': ('A {cm} cm nodule in the {side} {zone} zone.',
               'Rounded {side} {zone} zone nodule measuring {cm} cm.',
               '{cm} cm {side} {zone} zone pulmonary nodule, unchanged.',
               'There is a {cm} cm nodule projecting over the {side} {zone} zone.'),
    'pleural_effusion': ('{Size} {side} pleural effusion.',
                         'There is a {size} {side} pleural effusion.',
                         'Unchanged {size} {side} effusion.',
                         'No change in the {size} {side} pleural effusion.',
                         '{Size} {side} pleural effusoin.',
                         '{Size} {side} effusion with blunting of the costophrenic angle.'),
    'pneumothorax': ('{Size} {side} apical pneumothorax.',
                     'There is a {size} {side} pneumothorax with a visible pleural line.',
                     '{Size} {side} PTX.', 'Unchanged {size} {side} pneumothorax.',
                     'Not only is the {side} pneumothorax still present, it is {size}.'),
    'tuberculosis': ('{Side} upper lobe fibrocavitary change, consistent with tuberculosis.',
                     'Upper zone fibronodular change typical of tuberculosis.',
                     'Findings in the {side} upper lobe consistent with active TB.'),
}
_NEGATIVE_TEMPLATES = {
    'airspace_opacity': ('No focal airspace opacity.', 'Lungs are clear without consolidation.',
                         'The lungs are free of focal airspace disease.',
                         'No focal consolidation.'),
    'atelectasis': ('No atelectasis.', 'Previously seen {side} basilar atelectasis has resolved.',
                    'No evidence of atelectasis.'),
    'cardiomegaly': ('No cardiomegaly.', 'Heart size is normal.', 'The heart is not enlarged.',
                     'Normal heart size.', 'The heart is normal in size.'),
    'nodule': ('No pulmonary nodule.', 'No suspicious nodule or mass.',
               'No nodules are seen.'),
    'pleural_effusion': ('No pleural effusion.', 'No effusion.',
                         'Resolved {side} pleural effusion.', 'Negative for pleural effusion.'),
    'pneumothorax': ('No pneumothorax.', 'No PTX.', 'There is no pneumothorax.',
                     'The {side} pneumothorax has resolved.', 'No pneumothroax.'),
    'tuberculosis': ('No radiographic evidence of tuberculosis.',
                     'No findings to suggest active TB.'),
}
_UNCERTAIN_TEMPLATES = {
    'airspace_opacity': ('Possible subtle airspace opacity in the {side} {zone} zone.',
                         'Hazy {side} {zone} zone change may represent early consolidation.',
                         'Questionable {side} {zone} zone infiltrate.',
                         'Early {side} {zone} zone consolidation cannot be excluded.'),
    'atelectasis': ('{Side} basilar linear markings, likely atelectasis.',
                    'Possible {side} basal atelectasis.',
                    'Atelectasis versus scarring at the {side} base.'),
    'cardiomegaly': ('Heart size is at the upper limits of normal.',
                     'Borderline cardiomegaly.',
                     'Equivocal cardiomegaly given the projection.',
                     'Possible mild cardiomegaly.'),
    'nodule': ('Questionable {side} {zone} zone nodule.',
               'Possible nodule in the {side} {zone} zone; cannot exclude nipple shadow.',
               'A {side} {zone} zone nodule cannot be excluded.'),
    'pleural_effusion': ('Possible small {side} pleural effusion.',
                         'Cannot exclude a small {side} pleural effusion.',
                         'A small {side} effusion cannot be excluded.',
                         'Trace {side} effusion is questioned.'),
    'pneumothorax': ('Questionable {side} apical pneumothorax.',
                     'Cannot exclude a small {side} pneumothorax.',
                     'A tiny {side} apical PTX cannot be excluded.'),
    'tuberculosis': ('{Side} apical scarring; cannot exclude tuberculosis.',
                     'Upper zone fibrotic change, suspected tuberculosis.',
                     'Possible reactivation TB in the {side} upper lobe.'),
}
# Findings in the order radiologists usually dictate them.
_REPORT_ORDER = ('cardiomegaly', 'airspace_opacity', 'atelectasis', 'nodule', 'tuberculosis',
                 'pleural_effusion', 'pneumothorax')
# Indications name what the referrer worried about, present or not; never a finding.
_INDICATIONS = ('Cough and fever, rule out pneumonia.', 'Shortness of breath.',
                '___ year old {sex} with chest pain.', 'Evaluate for pneumothorax.',
                'Dyspnea, ? effusion.', 'History of tuberculosis, screening.',
                'Preoperative evaluation.', 'Fall, evaluate for rib fracture.',
                'Follow-up of pleural effusion.', 'XXXX-year-old {sex} with hypoxia.')
_COMPARISONS = ('None.', '___.', 'Chest radiograph from XXXX.', 'Prior study of ___.')
_NORMAL_IMPRESSIONS = ('No acute cardiopulmonary process.',
                       'No acute cardiopulmonary abnormality.',
                       'No acute intrathoracic process.', 'Normal chest radiograph.')
_BONES = ('Osseous structures are unremarkable.', 'Visualized bones are intact.',
          'No acute osseous abnormality.')


def _describe(finding, params, true_positive, rng):
  """Words for side, size and zone: from the image when true, invented when not."""
  if true_positive:
    side = 0 if params['bilateral'] else params['side']
    size = _SIZE_WORD[min(2, int(params['severity'] * 3))]
    if finding == 'nodule':
      side = int(params['sides'][0])
      zone = ('upper', 'mid', 'lower')[min(2, int(params['heights'][0] * 3))]
      # The thorax (about 1.4 units) is about 30 cm wide.
      cm = 42 * params['radii'][0] * (0.8 + 0.4 * params['severity'])
    else:
      height = params.get('height', 0.8 if finding != 'tuberculosis' else 0.2)
      zone = ('upper', 'mid', 'lower')[min(2, int(height * 3))]
      cm = 1.0
  else:
    side = _pick(rng, (-1, 1))
    size = _pick(rng, _SIZE_WORD[:2])
    zone = _pick(rng, ('upper', 'mid', 'lower'))
    cm = float(rng.uniform(0.6, 1.5))
  if finding in ('airspace_opacity', 'nodule', 'atelectasis', 'pneumothorax') and side == 0:
    side = 1
  side_word = _SIDE_WORD[side]
  degree = {'small': 'mildly', 'moderate': 'moderately', 'large': 'markedly'}[size]
  return dict(side=side_word, Side=side_word.capitalize(), size=size,
              Size=size.capitalize(), zone=zone, cm=f'{cm:.1f}', degree=degree)


def _sentence(name, code, words, rng):
  templates = {POSITIVE: _POSITIVE_TEMPLATES, NEGATIVE: _NEGATIVE_TEMPLATES,
               UNCERTAIN: _UNCERTAIN_TEMPLATES}[code][name]
  sentence = _pick(rng, templates).format(**words)
  return sentence.replace('bilateral pleural effusion', 'bilateral pleural effusions')


def _write_report(study: _Study) -> str:
  rng = study.report_rng
  if study.view == 'AP':
    exam = 'Portable AP chest radiograph.'
  else:
    exam = _pick(rng, ('PA chest radiograph.', 'PA and lateral chest radiographs.'))
  indication = _pick(rng, _INDICATIONS).format(sex='woman' if study.sex == 'F' else 'man')
  comparison = _pick(rng, _COMPARISONS)
  code = dict(zip(CXR_FINDINGS, study.labels.tolist()))
  truth = dict(zip(CXR_FINDINGS, study.true_labels.tolist()))
  findings, impression = [], []
  for name in _REPORT_ORDER:
    if code[name] == UNMENTIONED:
      continue
    words = _describe(name, study.findings[name], truth[name] == 1, rng)
    if code[name] == NEGATIVE:
      pair = code['pleural_effusion'] == code['pneumothorax'] == NEGATIVE
      if name == 'pleural_effusion' and pair:
        findings.append(_pick(rng, ('No pleural effusion or pneumothorax.',
                                    'No effusion or pneumothorax.',
                                    'There is no pleural effusion or pneumothorax.')))
      elif name == 'pneumothorax' and pair:
        continue  # Already said together with the effusion.
      else:
        findings.append(_sentence(name, NEGATIVE, words, rng))
      continue
    sentence = _sentence(name, code[name], words, rng)
    findings.append(sentence)
    impression.append(sentence if rng.random() < 0.5 else
                      _sentence(name, code[name], words, rng))
  devices = study.devices
  if devices['pacemaker']:
    findings.append('Left chest wall pacemaker with lead in the right ventricle.')
  if devices['central_line']:
    findings.append(_pick(rng, ('Central venous catheter tip in the superior vena cava.',
                                'Right IJ line terminates in the SVC.')))
  if devices['ecg_leads']:
    findings.append('Overlying monitoring leads.')
  if devices['granulomas']:
    findings.append('Calcified granuloma, a sequela of old infection.')
  if not findings:
    findings.append('The cardiomediastinal silhouette is within normal limits.')
  findings.append(_pick(rng, _BONES))
  if not impression:
    impression.append(_pick(rng, _NORMAL_IMPRESSIONS))
  elif len(impression) > 1 and rng.random() < 0.4:
    impression = [f'{i}. {s}' for i, s in enumerate(impression, start=1)]
  layout = rng.random()
  if layout < 0.5:  # Headers on their own lines.
    return (f'EXAMINATION: {exam}\nINDICATION: {indication}\nCOMPARISON: {comparison}\n'
            f'FINDINGS: {" ".join(findings)}\nIMPRESSION: {chr(10).join(impression)}')
  if layout < 0.8:  # Blank-line paragraphs, as in MIMIC-CXR's free text.
    return (f'FINAL REPORT\nEXAMINATION:  {exam.upper()}\n\nINDICATION:  {indication}\n\n'
            f'FINDINGS:\n\n{" ".join(findings)}\n\nIMPRESSION:\n\n{chr(10).join(impression)}')
  return f'Findings: {" ".join(findings)} Impression: {" ".join(impression)}'


def study_metadata(index: int, *, seed: int = 0, site: str = 'A', label_noise: float = 0.1,
                   findings_override: Optional[Mapping[str, bool]] = None,
                   severity_range: Tuple[float, float] = (0.0, 1.0),
                   mine_labels: bool = False, variability: float = 1.0) -> dict:
  """Everything `generate_cxr` returns except the image, without rendering it (fast)."""
  return _metadata(_sample_study(index, seed, site, label_noise, findings_override,
                                 severity_range, variability), mine_labels)


# What the labeler's observations mean for CXR_FINDINGS: the most certain code among
# them (positive > uncertain > negative > unmentioned, CheXpert's aggregation). Lung
# Opacity's children Consolidation and Pneumonia count as airspace opacity.
MINED_OBSERVATIONS = {
    'airspace_opacity': ('Lung Opacity', 'Consolidation', 'Pneumonia'),
    'atelectasis': ('Atelectasis',),
    'cardiomegaly': ('Cardiomegaly',),
    'nodule': ('Lung Lesion',),
    'pleural_effusion': ('Pleural Effusion',),
    'pneumothorax': ('Pneumothorax',),
    'tuberculosis': ('Tuberculosis',),
}
# Tuberculosis is not a CheXpert observation; the labeler gets its phrases as an extra.
_TUBERCULOSIS_PHRASES = ('tuberculosis', 'tb', 'tuberculous', 'mycobacterial')


@functools.lru_cache(maxsize=1)
def report_labeler():
  """The labeler `mine_labels` uses (built once per process; import deferred: spaCy)."""
  from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top
  return labeler.ReportLabeler(extra={'Tuberculosis': _TUBERCULOSIS_PHRASES})


def mine_report_labels(reports) -> np.ndarray:
  """int8 [N, len(CXR_FINDINGS)] codes the labeler reads from the reports."""
  labels = report_labeler().label(list(reports))
  column = {name: k for k, name in enumerate(labels.names)}
  rank = {UNMENTIONED: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}
  out = np.full((len(labels.codes), len(CXR_FINDINGS)), UNMENTIONED, np.int8)
  for k, name in enumerate(CXR_FINDINGS):
    for i, row in enumerate(labels.codes):
      out[i, k] = max((int(row[column[o]]) for o in MINED_OBSERVATIONS[name]), key=rank.get)
  return out


def _metadata(study: _Study, mine_labels: bool = False) -> dict:
  true_abnormal = int(np.any(study.true_labels == 1))
  report = _write_report(study)
  labels = mine_report_labels([report])[0] if mine_labels else study.labels
  return {
      'true_labels': study.true_labels,
      'labels': labels,
      'true_abnormal': np.int8(true_abnormal),
      'abnormal': np.int8(derive_abnormal(labels)),
      'no_finding': np.int8(derive_no_finding(labels)),
      'patient_id': study.patient_id,
      'study_id': study.study_id,
      'sex': study.sex,
      'age': study.age,
      'view': study.view,
      'site': study.site,
      'report': report,
  }


# ---------------------------------------------------------------------------
# Drawing primitives, all in normalised coordinates so any image size looks alike.


@functools.lru_cache(maxsize=16)
def _grid(size: int):
  """Pixel-centre coordinates in [-1, 1]: x to the right, y downwards."""
  c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  x, y = np.meshgrid(c, c)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def _ramp(z, width):
  """0 below -width/2, 1 above width/2, linear in between: a cheap anti-aliased step."""
  step = z * float(1.0 / width) + 0.5
  # In-place ufuncs: np.clip's Python overhead dominates at small image sizes.
  np.maximum(step, 0.0, out=step)
  return np.minimum(step, 1.0, out=step)


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(size: int, cells: int):
  spacing = 2.0 / cells
  nodes = (np.arange(cells + 4) - 1.5) * spacing - 1.0
  pixels = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
  weights = np.exp(-0.5 * ((pixels[:, None] - nodes[None]) / (0.7 * spacing)) ** 2)
  weights = weights.astype(np.float32)
  weights.setflags(write=False)
  return weights


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
  """Zero-mean, unit-std Gaussian random field with about `cells` blobs across.

  The field is defined on a fixed coarse lattice and interpolated, so it looks the
  same at every image size; two small matmuls make it cheap even at 512 px.
  """
  weights = _smoothing_matrix(size, cells)
  coarse = rng.standard_normal((weights.shape[1], weights.shape[1]), dtype=np.float32)
  field = weights @ coarse @ weights.T
  field -= field.mean()
  return field * (1.0 / (field.std() + 1e-6))


def _ellipse(u, v, center, radii, angle, edge):
  """Soft mask of a rotated ellipse; `edge` is the blur width at its boundary."""
  # Python floats keep float32 arrays float32 (NumPy scalars would promote them).
  cu, cv = u - float(center[0]), v - float(center[1])
  c, s = math.cos(angle), math.sin(angle)
  a = (c * cu + s * cv) * float(1.0 / radii[0])
  b = (-s * cu + c * cv) * float(1.0 / radii[1])
  r = np.sqrt(a * a + b * b)
  return _ramp(1.0 - r, edge / min(radii))


def _segment(u, v, p0, p1, width, edge):
  """Soft mask of a line segment of the given width."""
  (u0, v0), (u1, v1) = (map(float, p0)), (map(float, p1))
  du, dv = u1 - u0, v1 - v0
  t = np.clip(((u - u0) * du + (v - v0) * dv) * (1 / max(du * du + dv * dv, 1e-9)), 0, 1)
  dist = np.hypot(u - u0 - t * du, v - v0 - t * dv)
  return _ramp(width * 0.5 - dist, edge)


def _polyline(u, v, points, width, edge):
  mask = np.zeros_like(u)
  for p0, p1 in zip(points[:-1], points[1:]):
    np.maximum(mask, _segment(u, v, p0, p1, width, edge), out=mask)
  return mask


# ---------------------------------------------------------------------------
# Anatomy.


@dataclasses.dataclass
class _Frame:
  """Patient-frame coordinates of every pixel, and the pixel size in those units."""
  u: np.ndarray
  v: np.ndarray
  px: float
  size: int


def _patient_frame(size, anatomy) -> _Frame:
  x, y = _grid(size)
  c, s = math.cos(anatomy['rotation']), math.sin(anatomy['rotation'])
  dx = x - float(anatomy['center'][0])
  dy = y - float(anatomy['center'][1])
  zoom = anatomy['zoom']
  u = (c * dx + s * dy) * (1 / zoom)
  v = (-s * dx + c * dy) * (1 / zoom)
  return _Frame(u, v, 2.0 / size / zoom, size)


def _domes(anatomy):
  """Diaphragm dome heights {-1: right, 1: left}, before any volume loss."""
  left = anatomy['dome'] + anatomy['inspiration']
  return {-1: left - anatomy['dome_asymmetry'], 1: left}


def _dome_lift(findings):
  """How far volume loss (atelectasis) pulls each hemidiaphragm up."""
  lift = {-1: 0.0, 1: 0.0}
  atelectasis = findings['atelectasis']
  if atelectasis['present']:
    lift[atelectasis['side']] = 0.02 + 0.05 * atelectasis['severity']
  return lift


def _lung_geometry(frame, anatomy, side, dome, lift=0.0, lateral_shrink=0.0, apex_drop=0.0,
                   sharp=False):
  """Soft mask of one lung, before the heart and mediastinum are cut out.

  `dome` shapes the lung; `lift` raises the diaphragm without reshaping the rest.
  """
  w = anatomy['half_width']
  a = frame.u * side  # Distance from the midline towards this side.
  v = frame.v
  top = anatomy['apex'] + apex_drop
  height = (v - top) * (1.0 / (dome + 0.12 - top))
  h = np.clip(height, 0, 1)
  curve = np.sqrt(1 - (1 - h) ** 2)  # Rounded apex, near-vertical lateral wall below.
  lateral_edge = w * (0.32 + 0.66 * curve) - lateral_shrink * (1 - 0.7 * h)
  medial_edge = np.maximum(w * (0.32 - 0.2 * curve), anatomy['mediastinum'])
  dome_curve = dome - lift + 0.3 * ((a - 0.42 * w) * (1 / w)) ** 2
  edge = max(1.2 * frame.px, 0.004)
  lateral_soft = edge if sharp else max(0.04, edge)
  mask = (_ramp(lateral_edge - a, lateral_soft) * _ramp(a - medial_edge, max(0.015, edge))
          * _ramp(dome_curve - v, max(0.012, edge)) * _ramp(v - top, max(0.02, edge)))
  return mask


def _heart(frame, anatomy, findings):
  """Soft heart mask; its width follows the cardiothoracic ratio (CTR)."""
  cardio = findings['cardiomegaly']
  ctr = cardio['ctr'] if cardio['present'] else anatomy['ctr']
  width = ctr * 2 * anatomy['half_width'] * anatomy['heart_magnification']
  half = width / 2
  tilt = anatomy['heart_tilt'] + (0.1 * cardio['severity'] if cardio['present'] else 0.0)
  b = anatomy['heart_height'] * (1 + 0.4 * (ctr - 0.42))
  # Semi-axis along the tilted long axis that gives the heart its horizontal extent.
  a = math.sqrt(max(half ** 2 - (b * math.sin(tilt)) ** 2, (0.5 * half) ** 2)) / math.cos(tilt)
  center = (-0.33 * width + half, anatomy['dome'] + anatomy['inspiration'] + 0.02)
  return _ellipse(frame.u, frame.v, center, (a, b), tilt, max(0.015, 1.2 * frame.px))


def _ribs(frame, anatomy):
  """Posterior ribs (arching down laterally) and fainter anterior ribs, both sides."""
  w = anatomy['half_width']
  a = np.abs(frame.u) * (1 / w)
  v = frame.v
  spacing = 0.1 * anatomy['rib_spacing']
  # Posterior ribs: rise a little off the spine, then curve down to the lateral wall.
  centred = v - (0.5 * a * a - 0.12 * a) + 0.85 - anatomy['rib_offset']
  phase = np.maximum(centred, 0) ** 0.92 * (1 / spacing)
  frac = phase - np.floor(phase)
  thickness = 0.48
  # Saturating hump: soft edges at least a pixel wide whatever the image size.
  sharpness = min(3.0, spacing * thickness / (np.pi * 0.8 * frame.px))
  posterior = np.clip(sharpness * np.sin(np.pi * np.minimum(frac * (1 / thickness), 1)), 0, 1)
  # The lowest ribs reach below the domes only laterally.
  posterior *= (_ramp(a - 0.1, 0.08) * _ramp(1.08 - a, 0.06)
                * _ramp(anatomy['dome'] + 0.15 + 0.3 * a - v, 0.1))
  # Anterior ribs descend medially and vanish where they turn into cartilage.
  phase_ant = (v + 0.9 + 0.35 * a) * (1 / (1.25 * spacing))
  frac_ant = phase_ant - np.floor(phase_ant)
  anterior = np.clip(sharpness * np.sin(np.pi * np.minimum(frac_ant * (1 / 0.4), 1)), 0, 1)
  anterior *= _ramp(a - 0.45, 0.15) * _ramp(1.02 - a, 0.06) * _ramp(0.2 - v, 0.2)
  return posterior + 0.45 * anterior


def _clavicles(frame, anatomy, view):
  w = anatomy['half_width']
  a = np.abs(frame.u) * (1 / w)
  # AP projection throws the clavicles higher and flatter (lordotic projection).
  lift = -0.08 if view == 'AP' else 0.0
  centre = anatomy['clavicle'] + lift - 0.16 * a + 0.2 * (a - 0.45) ** 2 * (view == 'PA')
  thickness = 0.045 - 0.01 * a
  return (_ramp(thickness / 2 - np.abs(frame.v - centre), max(0.012, 1.2 * frame.px))
          * _ramp(a - 0.08, 0.04) * _ramp(0.95 - a, 0.08))


def _body(frame, anatomy, domes):
  """Soft-tissue thickness (0 in air, about 1 at the mid-thorax)."""
  w = anatomy['half_width']
  v = frame.v
  a = np.abs(frame.u)
  # Chest wall widening into the shoulders, whose tops slope down from the neck.
  half_width = (w + 0.1 + 0.4 * _ramp(-0.6 - v, 0.3)
                - 0.1 * np.clip((v - domes[1] - 0.1) * (1 / 0.5), 0, 1))  # The waist.
  shoulder_top = -1.04 + 0.42 * np.clip(a - anatomy['neck'], 0, None) ** 0.75
  x = a * (1 / half_width)
  thickness = np.sqrt(np.clip(1 - x * x, 0, 1)) * _ramp(1.0 - x, 0.03)
  thickness = np.maximum(thickness, 0.6 * _ramp(anatomy['neck'] - a, 0.04))
  thickness *= _ramp(v - shoulder_top, 0.05)
  abdomen = _ramp(v - (domes[1] + 0.1), 0.3)
  return thickness * (0.85 + 0.2 * abdomen) * anatomy['soft_tissue']


def _lung_markings(frame, anatomy, domes, rng_seed):
  """Vessels from each hilum: wavy streaks that branch outwards and fade to the periphery."""
  rng = np.random.default_rng(rng_seed)
  bend = 0.15 * _smooth_noise(rng, frame.size, 10)
  breaks = np.clip(0.55 + 0.6 * _smooth_noise(rng, frame.size, 18), 0, 1)
  markings = 0.012 * _smooth_noise(rng, frame.size, 28)  # Parenchymal mottling.
  w = anatomy['half_width']
  for i, side in enumerate((-1, 1)):
    # Only the columns that reach this side's lung: half the trigonometry.
    reach = np.flatnonzero((frame.u * side).max(axis=0) > 0.02)
    if not reach.size:
      continue
    cols = slice(reach[0], reach[-1] + 1)
    u, v = frame.u[:, cols], frame.v[:, cols]
    hilum_u = side * (anatomy['mediastinum'] + 0.1 * w)
    hilum_v = (domes[side] - 0.38) - 0.03 * (side > 0)  # The left hilum sits higher.
    du = (u - hilum_u) * side
    dv = v - hilum_v
    r = np.hypot(du, dv) + 1e-3
    theta = np.arctan2(dv, du) + bend[:, cols]
    log_r = np.log(r)
    trunks = np.zeros_like(r)
    branches = np.zeros_like(r)
    for k, order in enumerate(anatomy['vessel_orders'][i].tolist()):
      twist = float(anatomy['vessel_twists'][i, k]) * order * 0.25
      wave = np.cos(order * theta + twist * log_r + float(anatomy['vessel_phases'][i, k]))
      if k < 3:
        trunks += wave
      else:
        branches += wave
    # Higher angular orders appear only away from the hilum: vessels multiply outwards.
    streaks = trunks + branches * _ramp(r - 0.25, 0.2)
    # Inside the hilum the vessels merge into the hilar shadow (no starburst).
    vessels = np.clip(streaks * 0.5 - 0.3, 0, 1) * breaks[:, cols] * _ramp(r - 0.08, 0.08)
    markings[:, cols] += vessels * (0.3 * np.exp(-r * (1 / 0.35)) + 0.05)
    markings[:, cols] += 0.12 * np.exp(-(r * r) * (1 / (2 * 0.045 ** 2)))  # Hilar vessels.
  return markings


# ---------------------------------------------------------------------------
# Findings. Each returns `fill` (fraction of lung air replaced, in [0, 1]) and/or
# extra density; all are drawn from their own parameters, never from shared streams.


def _lung_point(anatomy, domes, side, height, lateral):
  """Patient-frame point at a lung `height` (0 apex .. 1 base) and `lateral` fraction."""
  w = anatomy['half_width']
  top = anatomy['apex']
  v = top + height * (domes[side] + 0.08 - top)
  curve = math.sqrt(1 - (1 - min(float(height), 1)) ** 2)
  lo = max(w * (0.32 - 0.2 * curve), anatomy['mediastinum'] + 0.05)
  hi = w * (0.32 + 0.66 * curve) - 0.04
  return float(side * (lo + lateral * max(hi - lo, 0.02))), float(v)


def _airspace_opacity(frame, anatomy, domes, params, texture=0.0):
  """A fluffy consolidation; with `texture` > 0, part of it breaks into mottled blobs.

  Mottling keeps the opacity's place and extent but leaves aerated lung between fine
  blobs (about 12 across the film), so much less density is added on average: a
  convolution sees the blobs' edges, area-averaged pixels mostly lose them.
  """
  fill = np.zeros_like(frame.u)
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  patches = _smooth_noise(np.random.default_rng(params['field_seed']), frame.size, 22)
  strength = 0.25 + 0.65 * params['severity']
  if texture:
    # Its own stream, so the smooth opacity (texture 0) draws exactly what it always did.
    grain = _smooth_noise(np.random.default_rng([params['field_seed'], 1]), frame.size, 12)
    strength = strength * ((1 - texture) + texture * _ramp(grain - 0.3, 0.5))
  for side in sides:
    cu, cv = _lung_point(anatomy, domes, side, params['height'], params['lateral'])
    r2 = (frame.u - cu) ** 2 + (frame.v - cv) ** 2
    envelope = np.exp(-r2 * (1 / (2 * params['radius'] ** 2)))
    fluffy = np.clip(2.2 * envelope + 0.45 * patches - 0.6, 0, 1)
    fill = np.maximum(fill, strength * fluffy)
  return fill


def _pleural_effusion(frame, anatomy, domes, params, view):
  """Fluid at the base: a meniscus rising laterally, blunting the costophrenic angle.

  On supine (AP) films fluid layers behind the lung instead: a veil over the
  hemithorax, densest at the base, with a smaller meniscus.
  """
  fill = np.zeros_like(frame.u)
  severity = params['severity']
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  w = anatomy['half_width']
  supine = view == 'AP'
  for side in sides:
    a = frame.u * side
    depth = (0.05 + 0.42 * severity) * (0.6 if supine else 1.0)
    top = domes[side] + 0.1 - depth * (0.55 + 0.45 * np.clip(a * (1 / w), 0, 1.1) ** 2)
    meniscus = _ramp(frame.v - top, 0.03 + 0.04 * severity)
    hemithorax = _ramp(a, 0.02)
    fill = np.maximum(fill, meniscus * hemithorax * 0.95)
    if supine:
      veil = np.clip((frame.v - (domes[side] - 0.9)) * (1 / 0.9), 0, 1)
      fill = np.maximum(fill, 0.45 * severity * veil * hemithorax)
  return fill


def _pneumothorax(frame, anatomy, domes, lift, params, lung_masks):
  """Returns (region, pleural_line): air without lung markings, and its edge."""
  side = params['side']
  severity = params['severity']
  gap = 0.035 + 0.22 * severity
  collapsed = _lung_geometry(
      frame, anatomy, side, domes[side], lift[side],
      lateral_shrink=gap * (0.6 if params['apical'] else 1.0),
      apex_drop=gap * (1.4 if params['apical'] else 0.6), sharp=True)
  outer = lung_masks[side]
  region = np.clip(outer - collapsed, 0, 1)
  # The visceral pleura: a thin bright line where the collapsed lung ends.
  line = 4 * collapsed * (1 - collapsed) * outer
  return region, line


def _nodules(frame, anatomy, domes, params):
  density = np.zeros_like(frame.u)
  for k in range(params['count']):
    side = int(params['sides'][k])
    cu, cv = _lung_point(anatomy, domes, side, params['heights'][k], params['laterals'][k])
    radius = float(params['radii'][k]) * (0.8 + 0.4 * params['severity'])
    r2 = ((frame.u - cu) ** 2 + (frame.v - cv) ** 2) * (1 / radius ** 2)
    # A sphere's projected thickness, softened by a pixel at its rim.
    sphere = np.sqrt(np.clip(1 - r2, 0, 1))
    sphere = np.maximum(sphere, _ramp(1 - np.sqrt(r2), 1.5 * frame.px / radius) * 0.3)
    density += (0.12 + 0.25 * params['severity']) * sphere
  return density


def _tuberculosis(frame, anatomy, domes, params):
  """Upper-zone fibronodular opacities, an optional cavity, and apical pleural capping.

  Returns (fill, cavity_air).
  """
  severity = params['severity']
  nodular = _smooth_noise(np.random.default_rng(params['field_seed']), frame.size, 40)
  fill = np.zeros_like(frame.u)
  cavity_air = np.zeros_like(frame.u)
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  for i, side in enumerate(sides):
    extent = (0.25 + 0.2 * severity) * (1.0 if i == 0 else 0.6)
    zone = _ramp(anatomy['apex'] + extent * (domes[side] + 0.1 - anatomy['apex'])
                 - frame.v, 0.12) * _ramp(frame.u * side, 0.02)
    spots = np.clip(1.3 * nodular - 0.4 + 0.8 * severity, 0, 1)
    fill = np.maximum(fill, zone * spots * (0.45 + 0.5 * severity))
    capping = _ramp(anatomy['apex'] + 0.06 - frame.v, 0.04) * _ramp(frame.u * side, 0.02)
    fill = np.maximum(fill, 0.6 * capping)
  if params['cavity'] and severity > 0.3:  # Cavities come with established disease.
    side = params['side']
    cu, cv = _lung_point(anatomy, domes, side, params['cavity_height'],
                         params['cavity_lateral'])
    radius = params['cavity_radius']
    du, dv = frame.u - cu, frame.v - cv
    # An irregular, thick wall: the radius wobbles with angle and the nodular field.
    wobble = 1 + 0.12 * np.cos(3 * np.arctan2(dv, du) + 10 * radius) + 0.08 * nodular
    r = np.sqrt(du * du + dv * dv) * (1 / (radius * wobble))
    edge = 2.5 * frame.px / radius
    wall = _ramp(1.3 - r, edge) * _ramp(r - 0.6, edge)
    fill = np.maximum(fill, wall * (0.35 + 0.5 * severity))
    cavity_air = _ramp(0.6 - r, edge) * severity
  return fill, cavity_air


def _atelectasis(frame, anatomy, domes, params, heart):
  """Plate-like band at a base, and sometimes left lower lobe collapse behind the heart.

  Returns (fill, retrocardiac_density).
  """
  side = params['side']
  cu, cv = _lung_point(anatomy, domes, side, params['height'], params['lateral'])
  severity = params['severity']
  thickness = params['thickness'] * (0.8 + 0.6 * severity)
  band = _ellipse(frame.u, frame.v, (cu, cv), (params['length'] / 2, thickness),
                  params['angle'], max(1.2 * frame.px, 0.3 * thickness))
  fill = band * (0.6 + 0.4 * severity)
  retrocardiac = np.zeros_like(frame.u)
  if params['lobar']:
    # A triangle hugging the spine behind the heart, apex at the hilum.
    base = domes[1]
    wedge = (_ramp(frame.v - (base - 0.35), 0.15) * _ramp(base + 0.05 - frame.v, 0.04)
             * _ramp(0.02 + 0.45 * (frame.v - (base - 0.35)) - frame.u, 0.05)
             * _ramp(frame.u + 0.02, 0.04))
    retrocardiac = 0.1 * (0.5 + severity) * wedge
  return fill, retrocardiac


# ---------------------------------------------------------------------------
# Devices and burned-in text.


def _devices_density(frame, anatomy, devices):
  density = np.zeros_like(frame.u)
  w = anatomy['half_width']
  wire = max(0.008, 1.0 * frame.px)
  edge = max(0.6 * frame.px, 0.004)
  if devices['ecg_leads']:
    for pu, pv in devices['lead_positions'].tolist():
      centre = (pu * (w + 0.05), -0.6 + 0.55 * pv)
      r = np.hypot(frame.u - centre[0], frame.v - centre[1])
      density += 0.5 * _ramp(0.012 - np.abs(r - 0.022), edge)
      tail = (centre[0] + 0.5 * np.sign(pu or 1), centre[1] - 0.4)
      density += 0.25 * _segment(frame.u, frame.v, centre, tail, wire, edge)
  if devices['central_line']:
    side = devices['line_side']
    points = [(side * 0.45, -1.1), (side * 0.15, -0.62), (-0.04, -0.35), (-0.04, -0.12)]
    density += 0.35 * _polyline(frame.u, frame.v, points, wire, edge)
  if devices['pacemaker']:
    box = _ellipse(frame.u, frame.v, (0.55 * w, -0.58), (0.09, 0.06), 0.2, 0.02)
    density += 2.0 * np.clip(box * 2, 0, 1)
    points = [(0.5 * w, -0.58), (0.1, -0.6), (-0.03, -0.3), (0.05, 0.1), (0.2, 0.25)]
    density += 1.2 * _polyline(frame.u, frame.v, points, wire * 1.5, edge)
  return density


_GLYPHS = {
    'A': ('01110', '10001', '10001', '11111', '10001', '10001', '10001'),
    'L': ('10000', '10000', '10000', '10000', '10000', '10000', '11111'),
    'P': ('11110', '10001', '10001', '11110', '10000', '10000', '10000'),
    'R': ('11110', '10001', '10001', '11110', '10100', '10010', '10001'),
}


def _burn_marker(image, site: SiteProfile, view: str):
  """Burns the site's marker text into a corner (in place), as technologists do."""
  size = image.shape[0]
  height = max(7, int(round(0.055 * size)))
  glyph_width = int(round(height * 5 / 7))
  gap = max(1, height // 6)
  text = site.marker.format(view=view)
  total_width = len(text) * glyph_width + (len(text) - 1) * gap
  margin = max(2, int(round((site.border + 0.03) * size)))
  top = margin if site.marker_corner[0] == 't' else size - margin - height
  left = margin if site.marker_corner[1] == 'l' else size - margin - total_width
  if site.marker_box:
    pad = max(1, height // 4)
    image[max(0, top - pad):top + height + pad, max(0, left - pad):left + total_width + pad] = 0
  rows = (np.arange(height) * 7 // height)
  cols = (np.arange(glyph_width) * 5 // glyph_width)
  for i, char in enumerate(text):
    bitmap = np.array([[c == '1' for c in row] for row in _GLYPHS[char]])
    x0 = left + i * (glyph_width + gap)
    patch = image[top:top + height, x0:x0 + glyph_width]
    patch[bitmap[rows][:, cols]] = 1.0


# ---------------------------------------------------------------------------
# Rendering.


def _render_density(study: _Study, frame: _Frame, opacity_texture: float = 0.0) -> np.ndarray:
  anatomy, findings = study.anatomy, study.findings
  domes = _domes(anatomy)
  lift = _dome_lift(findings)
  body = _body(frame, anatomy, domes)
  heart = _heart(frame, anatomy, findings)
  knob_centre = (anatomy['mediastinum'] - 0.005, anatomy['apex'] + 0.4)
  knob = _ellipse(frame.u, frame.v, knob_centre, (anatomy['aortic_knob'],) * 2, 0.0,
                  max(0.015, frame.px))
  lung_masks = {side: _lung_geometry(frame, anatomy, side, domes[side], lift[side])
                for side in (-1, 1)}
  lungs = (lung_masks[-1] + lung_masks[1]) * (1 - heart) * (1 - knob)

  # Lungs are air: most of the beam's path through the mid-chest, less at its edges.
  air = lungs * (0.58 * anatomy['aeration'] * body)
  fill = np.zeros_like(frame.u)
  extra_air = np.zeros_like(frame.u)
  extra_density = np.zeros_like(frame.u)
  markings_visible = np.ones_like(frame.u)
  present = {name: params['present'] for name, params in findings.items()}

  def add_fill(f):
    np.maximum(fill, f, out=fill)

  if present['airspace_opacity']:
    add_fill(_airspace_opacity(frame, anatomy, domes, findings['airspace_opacity'],
                               opacity_texture))
  if present['pleural_effusion']:
    # Fluid lies on the diaphragm, raised or not.
    bases = {side: domes[side] - lift[side] for side in domes}
    add_fill(_pleural_effusion(frame, anatomy, bases, findings['pleural_effusion'],
                               study.view))
  if present['tuberculosis']:
    tb_fill, cavity = _tuberculosis(frame, anatomy, domes, findings['tuberculosis'])
    add_fill(tb_fill)
    extra_air += 0.1 * cavity * lungs
  if present['atelectasis']:
    at_fill, retrocardiac = _atelectasis(frame, anatomy, domes, findings['atelectasis'],
                                         heart)
    add_fill(at_fill)
    extra_density += retrocardiac
  if present['nodule']:
    extra_density += _nodules(frame, anatomy, domes, findings['nodule']) * lungs
  if present['pneumothorax']:
    region, line = _pneumothorax(frame, anatomy, domes, lift, findings['pneumothorax'],
                                 lung_masks)
    region *= lungs
    markings_visible -= region
    extra_air += 0.1 * region
    extra_density += 0.1 * line * (1 - heart)

  devices = study.devices
  if devices['granulomas']:
    for k in range(devices['granulomas']):
      side = int(devices['granuloma_sides'][k])
      cu, cv = _lung_point(anatomy, domes, side, *devices['granuloma_positions'][k].tolist())
      r = np.hypot(frame.u - cu, frame.v - cv)
      extra_density += 0.5 * _ramp(0.012 - r, max(frame.px, 0.006))

  markings = _lung_markings(frame, anatomy, domes, anatomy['lung_texture_seed'])
  aerated = lungs * (1 - fill)
  density = body - air * (1 - fill) + markings * aerated * markings_visible - extra_air
  # The heart is a little denser than the mediastinum, until it merges with the abdomen.
  density += 0.06 * heart * (1 - lungs) * _ramp(domes[1] - frame.v, 0.05)
  density += extra_density

  # Bones.
  w = anatomy['half_width']
  bone_in_body = _ramp(body - 0.05, 0.1)
  # Ribs stand out against aerated lung; over the abdomen scatter and noise hide them.
  rib_visibility = 0.35 + 0.65 * _ramp(domes[1] + 0.12 - frame.v, 0.15)
  density += anatomy['rib_density'] * _ribs(frame, anatomy) * bone_in_body * rib_visibility
  density += 0.2 * _clavicles(frame, anatomy, study.view)
  spine = _ramp(0.055 - np.abs(frame.u), max(0.01, frame.px))
  vertebrae = 0.85 + 0.15 * np.cos(frame.v * (2 * np.pi / 0.09))
  density += 0.13 * spine * vertebrae
  trachea = _ramp(0.03 - np.abs(frame.u), max(0.01, frame.px)) * _ramp(
      anatomy['apex'] + 0.45 - frame.v, 0.05)
  density -= 0.22 * trachea
  for side in (-1, 1):
    humerus = _ellipse(frame.u, frame.v, (side * (w + 0.38), -0.75), (0.15, 0.15), 0.0, 0.05)
    density += 0.18 * humerus
    if study.view == 'AP':  # Scapulae project over the lungs unless rotated out (PA).
      scapula = _ramp(np.abs(frame.u) - (w * 0.72 + 0.25 * (frame.v + 0.7)), 0.03) * _ramp(
          w + 0.05 - np.abs(frame.u), 0.03) * _ramp(frame.v + 0.75, 0.05) * _ramp(
              -0.15 - frame.v, 0.1)
      density += 0.07 * scapula
  if anatomy['breast'] > 0:
    for side in (-1, 1):
      centre = (side * 0.55 * w, domes[side] - 0.05)
      radius = 0.18 + 0.14 * anatomy['breast']
      breast = _ellipse(frame.u, frame.v, centre, (radius * 1.2, radius), 0.0, 0.06)
      breast *= _ramp(centre[1] + 0.5 * radius - frame.v, 0.02)  # Inframammary fold.
      density += 0.13 * anatomy['breast'] * breast
  gas = anatomy['stomach_gas']
  stomach = _ellipse(frame.u, frame.v, (0.42 * w, domes[1] + 0.08 + 0.5 * gas[1]),
                     (gas[1], 0.6 * gas[1]), 0.0, 0.03)
  density -= gas[0] * stomach * body
  density += _devices_density(frame, anatomy, devices)
  return np.maximum(density, 0)


def _expose(density, study: _Study, frame: _Frame) -> np.ndarray:
  """Beam, detector and export software: density -> display values in [0, 1]."""
  site = SITES[study.site]
  anatomy = study.anatomy
  size = frame.size
  rng = np.random.default_rng(anatomy['noise_seed'])
  transmitted = np.exp(density * np.float32(-site.attenuation * anatomy['penetration']))
  # Scatter: a broad haze that flattens contrast where the beam is weak. It is smooth,
  # so a quarter-resolution estimate suffices.
  scatter = ndimage.uniform_filter(transmitted[::4, ::4], max(3, size // 16), mode='nearest')
  scatter = np.repeat(np.repeat(scatter, 4, 0), 4, 1)[:size, :size]
  transmitted = transmitted + site.scatter * scatter
  blur = site.blur * size
  if blur > 0.3:
    transmitted = ndimage.gaussian_filter(transmitted, blur, mode='nearest')
  # Small images are resampled from a larger detector image, which averages noise
  # partly away: noise is set at 256 px and scales as sqrt(size / 256).
  pixel_scale = np.float32((size / 256) ** 0.5 / np.sqrt(anatomy['dose']))
  noise = rng.standard_normal((2, size, size), dtype=np.float32)
  transmitted = (transmitted
                 + np.sqrt(transmitted) * noise[0] * (site.quantum_noise * pixel_scale)
                 + noise[1] * (site.electronic_noise * pixel_scale))
  signal = -np.log(np.maximum(transmitted, 1e-4))
  grid_x, grid_y = _grid(size)
  angle, slope = anatomy['heel']
  signal += slope * (math.cos(angle) * grid_x + math.sin(angle) * grid_y)
  if site.edge_enhance:
    background = ndimage.uniform_filter(signal, max(3, int(0.06 * size) | 1), mode='nearest')
    signal = signal + site.edge_enhance * (signal - background)
  sample = signal[::max(1, size // 128), ::max(1, size // 128)]
  lo, hi = map(float, np.percentile(sample, anatomy['window']))
  x = np.clip((signal - lo) * (1 / max(hi - lo, 1e-6)), 0, 1)
  x = x ** np.float32(site.gamma * anatomy['gamma'])
  if site.s_curve:
    x = (1 - site.s_curve) * x + site.s_curve * (x * x * (3 - 2 * x))
  if site.grid_lines:
    rows = np.arange(size, dtype=np.float32)[:, None]
    x = np.clip(x + site.grid_lines * np.cos(rows * (2 * np.pi * 0.42)), 0, 1)
  x = site.black_level + (site.white_level - site.black_level) * x
  if site.border:
    jitter = 1 + 0.3 * (rng.random(4) - 0.5)
    widths = np.maximum(1, np.round(site.border * size * jitter)).astype(int)
    x[:widths[0]] = site.border_value
    x[size - widths[1]:] = site.border_value
    x[:, :widths[2]] = site.border_value
    x[:, size - widths[3]:] = site.border_value
  _burn_marker(x, site, study.view)
  return x


def _quantise(x, bits):
  levels = (1 << bits) - 1
  stored = np.round(x * levels).astype(np.uint32)
  return (stored * 65535 // levels).astype(np.uint16)


def generate_cxr(index: int, *, seed: int = 0, site: str = 'A', image_size: int = 128,
                 label_noise: float = 0.1,
                 findings_override: Optional[Mapping[str, bool]] = None,
                 severity_range: Tuple[float, float] = (0.0, 1.0),
                 mine_labels: bool = False, variability: float = 1.0,
                 opacity_texture: float = 0.0) -> dict:
  """One synthetic frontal chest radiograph with labels, metadata and report.

  Args:
    index: example number; consecutive indices may share a patient.
    seed: dataset seed; with `site` and `index` it fixes the example.
    site: a key of SITES; sites differ in scanner and processing, not anatomy.
    image_size: height and width in pixels (>= 32).
    label_noise: probability that report mining garbles each label.
    findings_override: finding -> present, forcing findings on or off while every
      other part of the example (anatomy, noise, other findings) stays the same.
    severity_range: (low, high) in [0, 1]: every finding's severity is drawn on [0, 1]
      and rescaled into it. (0, 1) is the full spectrum from subtle to obvious; a
      higher floor keeps findings visible at small image sizes (the quickstart's 32 px).
    mine_labels: take 'labels' (and 'abnormal', 'no_finding') from the report, read by
      `cxr_jax.text.labeler` (see `mine_report_labels`), instead of the generator's codes.
    variability: how widely positioning (shift, rotation, patient size and distance)
      and acquisition (dose, penetration, tone, heel effect) vary between studies, as
      a multiple of the default spreads: 1 is a well-positioned department; real
      archives vary more (2 to 3), which is what keeps a linear model on raw pixels
      from finding findings by their place in the image. The same draws are made at
      every value, so a study's patient, findings and report do not depend on it.
    opacity_texture: in [0, 1], how much of an airspace opacity's density breaks into
      mottled blobs instead of an even haze: 0 (the default) is the haze, 1 is fully
      mottled. Mottling is what raw pixels lose and a convolution keeps (issue 13):
      it lowers a linear model on downsampled pixels while the finding stays where
      and as large as it was. Labels, reports and every other pixel are unchanged.

  Returns:
    dict with 'image' uint16 [H, W]; 'true_labels' int8 [K] (0/1, order of
    CXR_FINDINGS); 'labels' int8 [K] report-mined codes; 'true_abnormal' (0/1),
    'abnormal' and 'no_finding' (codes) int8; 'patient_id', 'study_id', 'sex'
    ('F'|'M'), 'age' (int), 'view' ('PA'|'AP'), 'site', 'report' (str).
  """
  if not (isinstance(image_size, (int, np.integer)) and image_size >= 32):
    raise ValueError(f'image_size must be an integer >= 32, got {image_size!r}.')
  study = _sample_study(index, seed, site, label_noise, findings_override, severity_range,
                        variability)
  frame = _patient_frame(int(image_size), study.anatomy)
  density = _render_density(study, frame, check_opacity_texture(opacity_texture))
  display = _expose(density, study, frame)
  example = _metadata(study, mine_labels)
  example['image'] = _quantise(display, SITES[site].bits)
  return example


# ---------------------------------------------------------------------------
# Natural-like images for generic pretraining.

NATURAL_SHAPES = ('disk', 'square', 'triangle', 'star', 'ring', 'cross', 'hexagon', 'crescent')
NATURAL_TEXTURES = ('solid', 'stripes', 'checker', 'dots', 'blobs', 'gradient', 'fractal')
NATURAL_LAYOUTS = ('single', 'pair', 'grid', 'scatter')
NATURAL_PALETTES = ('warm', 'cool', 'muted')
MAX_NATURAL_CLASSES = (len(NATURAL_SHAPES) * len(NATURAL_TEXTURES) * len(NATURAL_LAYOUTS)
                       * len(NATURAL_PALETTES))


@functools.lru_cache(maxsize=1)
def _class_table():
  """Class -> (shape, texture, layout, palette); a fixed shuffle so classes differ early."""
  combos = [(s, t, l, p) for s in NATURAL_SHAPES for t in NATURAL_TEXTURES
            for l in NATURAL_LAYOUTS for p in NATURAL_PALETTES]
  order = np.random.default_rng(20240601).permutation(len(combos))
  return tuple(combos[i] for i in order)


def natural_class(label: int) -> tuple:
  """The (shape, texture, layout, palette) that defines a natural-image class."""
  return _class_table()[label]


def _shape_distance(shape, x, y):
  """Approximate signed distance (negative inside) of a unit-size shape."""
  if shape == 'disk':
    return np.hypot(x, y) - 1
  if shape == 'square':
    return np.maximum(np.abs(x), np.abs(y)) - 0.85
  if shape == 'triangle':
    return np.maximum(np.abs(x) * 0.866 + y * 0.5, -y) - 0.5
  if shape == 'star':
    r = np.hypot(x, y)
    return r - (0.65 + 0.35 * np.cos(5 * np.arctan2(y, x)))
  if shape == 'ring':
    return np.abs(np.hypot(x, y) - 0.72) - 0.28
  if shape == 'cross':
    return np.minimum(np.maximum(np.abs(x) - 0.3, np.abs(y) - 1),
                      np.maximum(np.abs(x) - 1, np.abs(y) - 0.3))
  if shape == 'hexagon':
    return np.maximum(np.abs(x) * 0.866 + np.abs(y) * 0.5, np.abs(y)) - 0.85
  if shape == 'crescent':
    return np.maximum(np.hypot(x, y) - 1, 0.8 - np.hypot(x - 0.5, y))
  raise ValueError(shape)


def _texture(texture, x, y, rng, size):
  """Mixing weight in [0, 1] between an object's two colours."""
  angle = rng.uniform(0, np.pi)
  c, s = np.cos(angle), np.sin(angle)
  xr, yr = c * x + s * y, -s * x + c * y
  freq = rng.uniform(3, 7)
  if texture == 'solid':
    return np.zeros_like(x)
  if texture == 'stripes':
    return 0.5 + 0.5 * np.clip(3 * np.sin(freq * np.pi * xr), -1, 1)
  if texture == 'checker':
    return 0.5 + 0.5 * np.clip(3 * np.sin(freq * np.pi * xr) * np.sin(freq * np.pi * yr), -1, 1)
  if texture == 'dots':
    return np.clip(3 * (np.cos(freq * np.pi * xr) * np.cos(freq * np.pi * yr) - 0.5), 0, 1)
  if texture == 'blobs':
    return np.clip(0.5 + 1.5 * _smooth_noise(rng, size, 10), 0, 1)
  if texture == 'gradient':
    return np.clip(0.5 + 0.5 * xr, 0, 1)
  if texture == 'fractal':  # Roughly 1/f: octaves with halving amplitude.
    field = sum(_smooth_noise(rng, size, cells) / (k + 1)
                for k, cells in enumerate((6, 12, 24, 48)))
    return np.clip(0.5 + 0.3 * field, 0, 1)
  raise ValueError(texture)


def _hsv_to_rgb(h, s, v):
  k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
  return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _palette_colour(rng, palette):
  if palette == 'warm':
    return _hsv_to_rgb(rng.uniform(-0.08, 0.17) % 1, rng.uniform(0.5, 1), rng.uniform(0.5, 1))
  if palette == 'cool':
    return _hsv_to_rgb(rng.uniform(0.42, 0.75), rng.uniform(0.5, 1), rng.uniform(0.4, 1))
  return _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.2, 0.95))


def _layout_instances(layout, rng):
  """(centre x, centre y, scale) of each object instance."""
  if layout == 'single':
    return [(*rng.uniform(-0.2, 0.2, 2), rng.uniform(0.4, 0.65))]
  if layout == 'pair':
    offset = rng.uniform(0.4, 0.55)
    angle = rng.uniform(0, np.pi)
    scale = rng.uniform(0.25, 0.35)
    return [(sign * offset * np.cos(angle), sign * offset * np.sin(angle), scale)
            for sign in (-1, 1)]
  if layout == 'grid':
    n = _pick(rng, (2, 3))
    step = 1.5 / n
    scale = step * rng.uniform(0.3, 0.42)
    jitter = rng.normal(0, 0.03, (n, n, 2))
    return [(-0.75 + step * (i + 0.5) + jitter[i, j, 0], -0.75 + step * (j + 0.5)
             + jitter[i, j, 1], scale) for i in range(n) for j in range(n)]
  count = int(rng.integers(4, 8))
  return [(*rng.uniform(-0.75, 0.75, 2), rng.uniform(0.12, 0.25)) for _ in range(count)]


def _paint_shape(canvas, shape, texture, colours, instances, rng, size, alpha=1.0):
  x, y = _grid(size)
  px = 2.0 / size
  weight = _texture(texture, x, y, rng, size)
  paint = colours[0] * (1 - weight[..., None]) + colours[1] * weight[..., None]
  for cx, cy, scale in instances:
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    distance = _shape_distance(shape, (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale)
    mask = (_ramp(-distance * scale, 1.5 * px) * alpha)[..., None]
    canvas *= 1 - mask
    canvas += mask * paint
  return canvas


def generate_natural(index: int, *, seed: int = 0, num_classes: int = 100,
                     image_size: int = 64) -> dict:
  """One natural-like RGB image: objects of a class's shape, texture, layout, palette.

  Classes share colours, shapes and textures, so only their combination (not the mean
  colour) identifies one; random backgrounds and distractor shapes add clutter.
  Labels cycle through the classes (label = index % num_classes), so any prefix of
  indices is balanced.

  Returns: dict with 'image' uint8 [H, W, 3] and 'label' int.
  """
  _check_seed_index(seed, index)
  if not 1 <= num_classes <= MAX_NATURAL_CLASSES:
    raise ValueError(f'num_classes must be in [1, {MAX_NATURAL_CLASSES}], got {num_classes}.')
  if not (isinstance(image_size, (int, np.integer)) and image_size >= 16):
    raise ValueError(f'image_size must be an integer >= 16, got {image_size!r}.')
  size = int(image_size)
  label = index % num_classes
  shape, texture, layout, palette = natural_class(label)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NATURAL, index)))

  # Background: two random colours mixed by a smooth random field, plus a faint texture.
  bg_colours = [_hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.7), rng.uniform(0.15, 0.95))
                for _ in range(2)]
  mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, int(rng.integers(2, 6))), 0, 1)
  canvas = (bg_colours[0] * (1 - mix[..., None]) + bg_colours[1] * mix[..., None])
  canvas = canvas.astype(np.float32)

  # Clutter: smaller, fainter shapes of other families and textures.
  for _ in range(int(rng.integers(1, 4))):
    other_shape = _pick(rng, [s for s in NATURAL_SHAPES if s != shape])
    other_texture = _pick(rng, NATURAL_TEXTURES)
    colours = [_hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.2, 1))
               for _ in range(2)]
    instance = [(*rng.uniform(-0.9, 0.9, 2), rng.uniform(0.08, 0.2))]
    canvas = _paint_shape(canvas, other_shape, other_texture, colours, instance, rng, size,
                          alpha=rng.uniform(0.3, 0.7))

  colours = [_palette_colour(rng, palette) for _ in range(2)]
  if texture != 'solid' and np.abs(colours[0] - colours[1]).sum() < 0.4:
    colours[1] = 1 - colours[1]  # Keep the texture visible.
  canvas = _paint_shape(canvas, shape, texture, colours, _layout_instances(layout, rng), rng,
                        size)

  # Photometric jitter and sensor noise.
  canvas = canvas * rng.uniform(0.7, 1.2) + rng.uniform(-0.1, 0.1)
  canvas += rng.normal(0, rng.uniform(0.0, 0.05), canvas.shape).astype(np.float32)
  image = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
  return {'image': image, 'label': int(label)}
