"""Reports written from a study's label codes, and labels mined back from reports.

`_write_report` dictates a report from the (garbled) codes; `mine_report_labels`
reads CXR_FINDINGS codes back with `cxr_jax.text.labeler`; `study_metadata` is
everything `generate_cxr` returns except the image.
"""

import functools
from typing import Mapping, Optional, Tuple

import numpy as np

from cxr_jax.data.synthetic.streams import _pick
from cxr_jax.data.synthetic.sampling import (CXR_FINDINGS, NEGATIVE, POSITIVE, UNCERTAIN,
                                            UNMENTIONED, _sample_study, _Study, derive_abnormal,
                                            derive_no_finding)

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
