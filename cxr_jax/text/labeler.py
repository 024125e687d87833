"""A rule-based labeler: free-text chest X-ray reports -> CheXpert codes and normal/abnormal.

  codes, abnormal = label_reports(['FINDINGS: Small left effusion. No pneumothorax.'])

`codes` is int8 [N, 14] in the order of OBSERVATIONS (CheXpert's 14, spelled as in its
CSVs) with CheXpert's codes: 1 positive, 0 negative, -1 uncertain, -2 unmentioned (a
blank cell in a CSV). `abnormal` is int8 [N], 1 when the report describes any
abnormality, including the many outside the 14 (granulomas, degenerative spine,
hyperinflation, tortuous or calcified aorta, scoliosis, post-surgical change, hernias,
...). The command line is `python -m cxr_jax.label_reports`.

How a report is read:
  1. Normalised: lower case; de-identification placeholders (`XXXX`, `___`, `[** **]`)
     become one neutral word; dictation abbreviations and common misspellings are
     spelled out (`ptx`, `w/o`, `s/p`, `effusoin`, ...); hyphens between letters become
     spaces; a wrapped line joins its paragraph, a blank line or list number ends a
     sentence.
  2. Sectioned: only FINDINGS and IMPRESSION (and their synonyms) describe the image;
     a report with neither is read whole except its INDICATION / HISTORY / COMPARISON /
     TECHNIQUE / RECOMMENDATION sections, so "rule out pneumonia" in the indication
     is never a finding.
  3. Mentions: a spaCy EntityRuler with this module's phrase lists finds each
     observation (and the OTHER abnormalities); some phrases are negative ("heart
     size is normal") or uncertain ("borderline heart size") by themselves.
  4. Scope: two negspacy NegEx components, one with negation cues and one with
     uncertainty cues (both: preceding, following, pseudo and termination phrases,
     sentence-bounded), mark each mention negated and/or uncertain. Negation wins
     over uncertainty ("possible effusion without pneumothorax"); phrases such as
     "cannot exclude" and "no change in" are pseudo-negations, so they neither negate
     nor stop an uncertainty cue.
  5. Aggregated as CheXpert does: an observation is positive if any mention is, else
     uncertain if any is, else negative if any is, else unmentioned. `No Finding` is
     1 when the report describes no abnormality at all (Support Devices aside), blank
     otherwise. Change language ("unchanged effusion", "decreased opacity") is a
     positive mention; "resolved" / "no longer seen" negate.

Support devices: by default a device alone does not make a study abnormal (a line in a
normal chest is a normal chest, as `cxr_jax.data.labels.derive_abnormal` also reads
codes); `devices_abnormal=True` counts them. Uncertain findings count as abnormal.

Why spaCy + negspacy: medspacy's ConText and sectionizer pin spaCy < 3.8, which pins
NumPy < 2, and this project's JAX needs NumPy >= 2, so medspacy cannot be installed
alongside it. negspacy (NegEx, the algorithm ConText extends) runs on current spaCy;
the uncertainty scope is a second NegEx instance with uncertainty cues, and sections
are found by header matching like `cxr_jax.text.tokenizer.report_sections`.

LABELER_VERSION changes whenever a phrase list or rule changes what a report gets, so
datasets built with mined labels say which labeler made them.
"""

import dataclasses
import re
import threading
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

LABELER_VERSION = 'cxr_jax.text.labeler/1'

# CheXpert's 14 observations in its CSV column order (as `cxr_jax.data.labels`).
OBSERVATIONS = (
    'No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
    'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax',
    'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices')
POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED = 1, 0, -1, -2
OTHER = 'Other Abnormality'  # Mentions that only decide `abnormal`.
_RANK = {UNMENTIONED: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}  # CheXpert's aggregation.

# --- phrase lists ---------------------------------------------------------------
# A phrase is space-separated words of the normalised text; 'a|b' is any one of them,
# a trailing '?' makes that word optional. Hyphens are spaces after normalisation.
_HEART = 'heart|cardiac|cardiomediastinal'
_DEGREE = 'mildly|moderately|markedly|severely|slightly|minimally|significantly|substantially|somewhat|massively|very|quite'
_IS = 'is|are|appears|appear|remains|remain|again|seems|looks|has|been|becomes|now|still|being'

PHRASES: Dict[str, Tuple[str, ...]] = {
    'Enlarged Cardiomediastinum': (
        'widened|widening|wide mediastinum|mediastinal',
        'mediastinal widening|enlargement|prominence',
        'widening|enlargement|prominence of the mediastinum|mediastinal',
        'mediastinum|mediastinal silhouette|contour? ' + f'{_IS}? {_IS}? {_DEGREE}? widened|enlarged|prominent',
        f'enlarged|widened|prominent cardiomediastinal|mediastinal silhouette|contour|contours',
        f'cardiomediastinal silhouette|contour|contours {_IS}? {_IS}? {_DEGREE}? enlarged|widened|prominent',
        'enlargement of the cardiomediastinal silhouette',
        'mediastinal mass|lymphadenopathy', 'hilar|mediastinal adenopathy|lymphadenopathy',
    ),
    'Cardiomegaly': (
        'cardiomegaly', 'cardiomegally', 'cardiomegaley', 'cardiac enlargement',
        'cardiomyopathy',
        f'enlarged|enlarging heart|cardiac',
        f'enlarged|enlarging heart|cardiac silhouette|shadow|size',
        f'heart|cardiac size|silhouette|shadow? {_IS}? {_IS}? {_DEGREE}? {_DEGREE}? enlarged|increased|large|prominent|enlarging',
        f'enlargement of the heart|cardiac',
        'enlargement of the cardiac silhouette|shadow',
    ),
    'Lung Opacity': (
        'opacity', 'opacities', 'opacification', 'opacifications', 'opacified',
        'infiltrate', 'infiltrates', 'infiltration', 'infiltrations', 'infiltrative',
        'airspace disease', 'air space disease', 'airspace process', 'air space process',
        'haziness', 'hazy density|densities', 'patchy density|densities',
        'streaky density|densities', 'parenchymal density|densities', 'ground glass',
        'reticular|reticulonodular markings|pattern|opacity|opacities|changes',
        'increased interstitial markings', 'interstitial markings|prominence|opacities|pattern',
        'interstitial lung disease', 'airspace|alveolar filling',
    ),
    'Lung Lesion': (
        'nodule', 'nodules', 'nodular opacity|opacities|density|densities', 'mass', 'masses',
        'lesion', 'lesions', 'neoplasm', 'tumor', 'tumour', 'carcinoma', 'malignancy',
        'metastasis', 'metastases', 'metastatic disease', 'cavitary lesion|lesions',
        'cavitation',
    ),
    'Edema': (
        'edema', 'oedema', 'edematous', 'pulmonary vascular congestion', 'vascular congestion',
        'pulmonary congestion', 'congestive heart failure', 'heart failure', 'chf',
        'fluid overload', 'volume overload', 'cephalization', 'kerley lines', 'kerley b lines',
        'vascular engorgement', 'engorged vessels|vasculature', 'vascular redistribution',
        'peribronchial cuffing', 'vascular indistinctness',
        'prominent|prominence of pulmonary? vascular|vasculature|vessels',
        'pulmonary vasculature|vessels|vascularity is|are|appears? engorged|prominent|congested|indistinct',
    ),
    'Consolidation': (
        'consolidation', 'consolidations', 'consolidative', 'consolidated', 'consolidating',
        'air bronchogram', 'air bronchograms',
    ),
    'Pneumonia': (
        'pneumonia', 'pneumonias', 'pneumonitis', 'bronchopneumonia', 'infection',
        'infectious process|processes', 'infectious', 'aspiration', 'pna', 'pnuemonia',
        'pneumona', 'infective', 'empyema',
    ),
    'Atelectasis': (
        'atelectasis', 'atelectases', 'atelectatic', 'atelectesis', 'atelectsis',
        'atelactasis', 'atelectaisis', 'atelecatsis', 'atelectais', 'atelectasia',
        'collapse', 'collapsed lobe|lung|segment', 'volume loss', 'loss of volume',
    ),
    'Pneumothorax': (
        'pneumothorax', 'pneumothoraces', 'pneumothroax', 'pneumothoraxes', 'pnuemothorax',
        'pneumothorx', 'pneumothoarx', 'pnemothorax', 'ptx', 'pneumothorax',
        'hydropneumothorax', 'hemopneumothorax', 'hydropneumothoraces',
        'visible|visceral pleural line|edge', 'apical pleural air|lucency',
    ),
    'Pleural Effusion': (
        'pleural effusion', 'pleural effusions', 'effusion', 'effusions', 'effusoin',
        'effusiona', 'efusion', 'effussion', 'effsuion', 'pleural fluid', 'hydrothorax',
        'hemothorax', 'hydropneumothorax', 'hemopneumothorax', 'hydropneumothoraces',
        'fluid in the pleural space|spaces', 'layering fluid',
        'blunting|blunted|blunt|obscuration|obliteration of? the? right|left|bilateral|both? costophrenic|cp angle|angles|sulcus|sulci',
        'costophrenic|cp angle|angles|sulcus|sulci blunting',
        'costophrenic|cp angle|angles|sulcus|sulci ' + f'{_IS}? {_IS}? {_DEGREE}? blunted|obscured',
        'meniscus sign', 'subpulmonic fluid|effusion',
    ),
    'Pleural Other': (
        'pleural thickening', 'pleural plaque', 'pleural plaques', 'pleural calcification',
        'pleural calcifications', 'pleural scarring', 'pleural scar', 'pleural parenchymal|pleuroparenchymal scarring|thickening',
        'fibrothorax', 'pleural based opacity|opacities|density|mass', 'apical cap|caps',
        'pleural calcified plaque|plaques', 'calcified pleural plaque|plaques|thickening',
        'pleural|pleurally based thickening', 'thickening of the pleura',
    ),
    'Fracture': (
        'fracture', 'fractures', 'fractured', 'fx', 'fxs', 'fracure', 'fracutre', 'fractre',
        'fraction deformity', 'compression deformity|deformities', 'vertebral body height loss',
        'loss of vertebral body height', 'rib deformity|deformities',
    ),
    'Support Devices': (
        'tube', 'tubes', 'line', 'lines', 'catheter', 'catheters', 'pacemaker', 'pacer',
        'pacemaker|pacer|defibrillator leads|lead|wires|wire', 'defibrillator', 'icd', 'aicd',
        'endotracheal', 'ett', 'et tube', 'ng tube', 'og tube', 'enteric tube',
        'nasogastric', 'orogastric', 'feeding tube', 'dobhoff', 'dobbhoff', 'picc', 'port',
        'port a cath', 'portacath', 'mediport', 'swan ganz', 'pulmonary artery catheter',
        'central venous', 'cvc', 'chest tube', 'pigtail', 'drain', 'drains', 'tracheostomy',
        'trach', 'stent', 'stents', 'valve replacement', 'prosthetic valve|valves',
        'valve prosthesis', 'annuloplasty ring', 'ivc filter', 'lvad', 'impella',
        'intra aortic balloon pump', 'iabp', 'ecg leads', 'ekg leads', 'monitoring leads',
        'telemetry leads', 'electrodes', 'electrode', 'loop recorder', 'neurostimulator',
        'vp shunt', 'shunt catheter', 'sheath', 'cannula', 'ecmo', 'hemodialysis catheter',
    ),
    OTHER: (
        'granuloma', 'granulomas', 'granulomatous', 'calcified lymph node|nodes',
        # An old infection is a scar, not pneumonia (longer than 'infection', so it wins).
        'old|prior|previous|remote|healed|past infection|infections|granulomatous|tuberculosis|tb',
        'degenerative', 'spondylosis', 'spondylitic', 'osteophyte', 'osteophytes',
        'osteophytosis', 'arthritis', 'arthritic', 'arthropathy', 'dish',
        'hyperinflation', 'hyperinflated', 'hyperexpanded', 'hyperexpansion',
        'overinflation', 'overinflated', 'emphysema', 'emphysematous', 'copd',
        'chronic obstructive', 'bullae', 'bulla', 'bullous', 'blebs',
        'tortuous', 'tortuosity', 'ectatic', 'ectasia', 'unfolded|unfolding aorta|thoracic',
        'unfolding of the aorta', 'aortic dilation|dilatation|ectasia|enlargement', 'dilated aorta', 'dilatation|dilation of the aorta',
        'aortic|atherosclerotic|vascular|arterial calcification|calcifications|calcified|atherosclerosis|plaque',
        'calcified|calcification of the? aorta|aortic|arch|knob|annulus|valve',
        'aortic knob|arch|wall|valve calcification|calcifications|calcified|atherosclerosis',
        'calcified aortic knob|arch|wall|valve',
        'atherosclerosis', 'atherosclerotic', 'aneurysm', 'aneurysmal',
        'scoliosis', 'scoliotic', 'kyphosis', 'kyphotic', 'levoscoliosis', 'dextroscoliosis',
        'kyphoscoliosis', 'lordosis', 'lordotic curvature', 'post surgical|postsurgical|postoperative|post operative|operative change|changes|state',
        'status post', 'sternotomy', 'median sternotomy', 'sternal wires|sutures',
        'cabg', 'coronary artery bypass', 'bypass grafting', 'surgical clips|clip|sutures|staples',
        'clips', 'cholecystectomy', 'mastectomy', 'lobectomy', 'pneumonectomy',
        'wedge resection', 'thoracotomy', 'resection', 'hernia', 'hiatal', 'hiatus hernia',
        'scarring', 'scar', 'scars', 'fibrosis', 'fibrotic', 'fibronodular', 'fibrocavitary',
        'bronchiectasis', 'bronchiectatic', 'bronchial wall thickening', 'bronchitis',
        'elevated|elevation of the? right|left? hemidiaphragm|diaphragm',
        'hemidiaphragm|diaphragm is|are? elevated', 'eventration',
        'osteopenia', 'osteopenic', 'demineralization', 'lytic', 'sclerotic', 'blastic',
        'free air', 'pneumoperitoneum', 'pneumomediastinum', 'subcutaneous emphysema',
        'subcutaneous air', 'calcified nodule|nodules', 'goiter', 'thyroid enlargement',
        'cardiac|heart|coronary valve|artery calcification|calcifications',
        'pericardial effusion', 'hilar enlargement|prominence|fullness',
        'enlarged|prominent|full hila|hilum|hilar', 'right aortic arch', 'dextrocardia',
        'situs inversus', 'pectus', 'cervical rib', 'bone island',
        'tuberculosis', 'tb', 'sarcoidosis', 'silicosis', 'asbestosis', 'histoplasmosis',
        'bronchiolitis', 'mucus plugging', 'air trapping', 'flattened|flattening of? the? hemidiaphragms|diaphragms|diaphragm|hemidiaphragm',
        'abnormal', 'abnormality', 'abnormalities', 'azygos lobe', 'pulmonary hypertension',
        'enlarged pulmonary arteries|artery', 'chilaiditi', 'dilated bowel', 'air fluid level|levels',
        'hemidiaphragm eventration', 'spinal fusion', 'spinal hardware', 'orthopedic hardware',
        'hardware', 'prosthesis', 'arthroplasty', 'rotator cuff', 'shoulder replacement',
        'vertebroplasty', 'kyphoplasty', 'breast implant|implants',
    ),
}

# Phrases that are negative mentions by themselves.
NEGATIVE_PHRASES: Dict[str, Tuple[str, ...]] = {
    'Cardiomegaly': (
        f'heart|cardiac size|silhouette|shadow {_IS}? {_IS}? normal|unremarkable',
        f'heart|cardiac size|silhouette|shadow {_IS}? {_IS}? within normal limits',
        f'heart|cardiac size|silhouette|shadow {_IS}? {_IS}? not|no enlarged|larger',
        'normal|unremarkable heart|cardiac size|silhouette|shadow', 'heart is normal in size',
        'heart size normal', 'normal sized heart', 'normal size heart',
        'heart is not enlarged', 'normal heart', f'heart {_IS}? normal size',
    ),
    'Enlarged Cardiomediastinum': (
        f'cardiomediastinal|mediastinal silhouette|silhouettes|contour|contours {_IS}? {_IS}? normal|unremarkable|within',
        f'mediastinum {_IS}? {_IS}? normal|unremarkable|within|midline',
        'normal|unremarkable cardiomediastinal|mediastinal silhouette|silhouettes|contour|contours',
        'heart and mediastinum are normal|unremarkable|stable|within',
        'mediastinal and hilar contours are normal|unremarkable|within',
    ),
    OTHER: ('osseous|bony|skeletal structures|structures|bones are? intact|unremarkable|normal',),
}

# Phrases that are uncertain mentions by themselves (borderline heart size).
UNCERTAIN_PHRASES: Dict[str, Tuple[str, ...]] = {
    'Cardiomegaly': (
        f'heart|cardiac size|silhouette? {_IS}? {_IS}? borderline|top|upper normal|enlarged|size|limit|limits',
        'borderline|top normal|upper normal cardiomegaly|heart|cardiac size|silhouette|enlargement',
        'heart|cardiac size|silhouette is? at the upper limit|limits|range of? normal?',
        f'heart|cardiac size|silhouette {_IS}? {_IS}? upper limits|limit|range of normal',
    ),
}

# Dictation shorthands and misspellings, spelled out before tokenising (whole words).
_REWRITES = (
    (r'\bw/o\b', ' without '), (r'\bw/\s?', ' with '), (r'\bs/p\b', ' status post '),
    (r'\bc/w\b', ' consistent with '), (r'\br/o\b', ' rule out '), (r'\bb/l\b', ' bilateral '),
    (r'\bvs\.?(?=\s)', ' versus '), (r'\bvs$', ' versus'), (r'\bapprox\.', ' approximately'),
    (r'\bcp\s+angles?\b', ' costophrenic angle '), (r'\bcxr\b', ' chest radiograph '),
    (r'\blll\b', ' left lower lobe '), (r'\brll\b', ' right lower lobe '),
    (r'\blul\b', ' left upper lobe '), (r'\brul\b', ' right upper lobe '),
    (r'\brml\b', ' right middle lobe '), (r'\bij\b', ' internal jugular '),
    (r'\bet\s+tube\b', ' endotracheal tube '), (r'\bngt\b', ' ng tube '),
    (r"\bcan't\b", ' cannot '), (r'\bcan not\b', ' cannot '), (r"\bisn't\b", ' is not '),
    (r"\baren't\b", ' are not '), (r'\bnoted\b', ' '), (r'\bseen\b(?! )', ' seen '),
)
# De-identification placeholders: XXXX (Open-i), ___ (MIMIC-CXR), [** **] (MIMIC-II).
_PLACEHOLDER = re.compile(r'\[\*\*.*?\*\*\]|_{2,}|\bX{2,}\b', re.IGNORECASE)

# --- negation and uncertainty cues (NegEx termsets) --------------------------------
# Uncertainty phrases that contain a negation word, and change language: not negations.
_NOT_NEGATIONS = (
    'cannot exclude', 'cannot be excluded', 'not be excluded', 'not excluded',
    'cannot rule out', 'cannot be ruled out', 'not be ruled out', 'not ruled out',
    'not rule out', 'cannot be entirely excluded', 'cannot be completely excluded',
    'not entirely excluded', 'difficult to exclude', 'not only', 'no change', 'no change in',
    'no interval change', 'no significant change', 'no significant interval change',
    'no substantial change', 'no definite change', 'not changed', 'not significantly changed',
    'without change', 'without interval change', 'without significant change',
    'no increase', 'no further', 'not appreciably changed', 'no appreciable change',
    'no other', 'nearly resolved', 'almost resolved', 'partially resolved',
    'near complete resolution', 'near resolution', 'partial resolution', 'not resolved',
    'incompletely resolved', 'has not resolved', 'not well seen', 'not well visualized',
    'no longer intubated', 'not imaged', 'not included', 'not assessed', 'not evaluated',
    'no new', 'without new', 'gram negative', 'not excluded',
)
NEGATION_TERMS = {
    'preceding_negations': [
        'no', 'not', 'without', 'absence of', 'absent', 'negative for', 'no evidence of',
        'no radiographic evidence of', 'no definite', 'no convincing', 'no focal',
        'no sign of', 'no signs of', 'free of', 'clear of', 'resolved', 'resolution of',
        'interval resolution of', 'removal of', 'interval removal of', 'removed',
        'cannot', 'never', 'nor', 'neither', 'fails to reveal', 'without evidence of',
        'no new', 'no acute', 'no visible', 'no obvious', 'no residual', 'no large',
        'no significant', 'there is no', 'there are no', 'rather than', 'no longer',
    ],
    'following_negations': [
        'resolved', 'has resolved', 'have resolved', 'is resolved', 'are resolved',
        'removed', 'has been removed', 'have been removed', 'were removed', 'was removed',
        'no longer seen', 'no longer visible', 'no longer present', 'no longer identified',
        'no longer evident', 'no longer', 'not seen', 'not visualized', 'not identified',
        'not present', 'not demonstrated', 'not evident', 'not appreciated', 'not detected',
        'is absent', 'are absent', 'absent', 'unlikely', 'is unlikely', 'less likely',
        'not apparent', 'not noted', 'ruled out', 'was not', 'were not', 'is not', 'are not',
        'has cleared', 'have cleared', 'cleared',
        # "Nodular opacities that most likely represent nipple shadows": not a lesion.
        'nipple shadow', 'nipple shadows', 'represent nipple shadows', 'likely nipple shadows',
        'likely represent nipple shadows', 'most likely represent nipple shadows',
        'likely represents nipple shadows', 'consistent with nipple shadows',
    ],
    'pseudo_negations': list(_NOT_NEGATIONS),
    'termination': [
        'but', 'however', 'although', 'though', 'yet', 'still', 'except', 'aside from',
        'apart from', 'which', 'with', 'there is', 'there are', 'there has been',
        'otherwise', 'and there', 'while', 'whereas', 'nevertheless', 'though',
        'secondary to', 'due to', 'consistent with', 'compatible with', 'suggesting',
        'suggestive of', 'likely', 'possibly', 'possible', 'concerning for',
        'may represent', 'could represent', 'represents', 'representing', 'at the',
    ],
}
UNCERTAINTY_TERMS = {
    'preceding_negations': [
        'possible', 'possibly', 'probable', 'probably', 'likely', 'questionable',
        'question of', 'questioned', 'suspicious for', 'suspicion of', 'suspicion for',
        'suspect', 'suspected', 'concerning for', 'concern for', 'worrisome for',
        'suggestive of', 'suggests', 'suggesting', 'suggest', 'may', 'might', 'could',
        'may represent', 'could represent', 'may reflect', 'could reflect',
        'may be', 'could be', 'might be', 'cannot exclude', 'cannot rule out',
        'not excluded', 'difficult to exclude', 'differential', 'differential includes',
        'differential diagnosis', 'versus', 'or', 'rule out', 'evaluate for',
        'assess for', 'to exclude', 'borderline', 'equivocal', 'indeterminate',
        'uncertain', 'presumed', 'presumably', 'perhaps', 'potential', 'potentially',
        'vague', 'not definitely', 'would be difficult to exclude', 'atypical',
        'infection versus', 'correlate for', 'correlation for', 'consider', 'developing',
        'incipient',
    ],
    'following_negations': [
        'cannot be excluded', 'can not be excluded', 'not be excluded', 'not excluded',
        'cannot be ruled out', 'not ruled out', 'is possible', 'are possible',
        'is not excluded', 'is suspected', 'are suspected', 'suspected', 'versus',
        'is questioned', 'questioned', 'is likely', 'are likely',
        'is probable', 'probable', 'possible', 'not entirely excluded',
        'cannot be entirely excluded', 'cannot be completely excluded',
        'is not entirely excluded', 'difficult to exclude', 'considered',
        'is a consideration', 'a consideration', 'is considered', 'in the differential',
        'could be present', 'may be present', 'might be present', 'is suggested',
        'not definitely', 'is uncertain', 'uncertain',
    ],
    'pseudo_negations': [
        'likely represents', 'likely represent', 'unlikely', 'less likely', 'no change',
        'or other', 'more likely', 'most likely represents',
    ],
    'termination': [
        'but', 'however', 'although', 'though', 'yet', 'except', 'aside from',
        'apart from', 'which', 'there is', 'there are', 'otherwise', 'while', 'whereas',
        'no', 'without', 'and there', 'unchanged', 'stable', 'again', 'consistent with',
        'in keeping with',
    ],
}
# CheXpert reads "likely X" as uncertain; "opacity, likely representing atelectasis"
# makes the opacity certain and the atelectasis uncertain, which NegEx's one-sided
# scopes already give.

_HEADERS = {
    'findings': ('findings', 'finding', 'report', 'observations', 'chest', 'pa and lateral chest',
                 'portable chest', 'description'),
    'impression': ('impression', 'impressions', 'conclusion', 'conclusions', 'opinion',
                   'summary', 'interpretation', 'result', 'results', 'diagnosis',
                   'findings and impression', 'findings/impression', 'impression/findings',
                   'final impression', 'wet read', 'addendum'),
    'excluded': ('indication', 'indications', 'history', 'clinical history',
                 'clinical information', 'clinical indication', 'clinical data',
                 'clinical details', 'reason for exam', 'reason for examination',
                 'reason for study', 'reason', 'comparison', 'comparisons', 'prior',
                 'priors', 'technique', 'examination', 'exam', 'procedure',
                 'recommendation', 'recommendations', 'recommend', 'notification',
                 'communication', 'critical result', 'critical results', 'type of exam',
                 'study', 'ordering physician', 'referring physician', 'provider',
                 'signed by', 'dictated by', 'final report', 'views', 'view', 'hx',
                 'question', 'clinical question', 'symptoms', 'preliminary report',
                 'attending', 'radiologist'),
}
_KIND_OF_HEADER = {h: kind for kind, names in _HEADERS.items() for h in names}
_HEADER = re.compile(
    r'(?:(?<=^)|(?<=\n)|(?<=[.!?;])|(?<=\.\s))[ \t]*('
    + '|'.join(sorted((re.escape(h) for h in _KIND_OF_HEADER), key=len, reverse=True))
    + r')[ \t]*:', re.IGNORECASE)
# An unknown header: capitals at a line start, then a colon (ends the section before it).
_OTHER_HEADER = re.compile(r'(?m)^[ \t]*([A-Z][A-Z /&()\-]*[A-Z)])[ \t]*:')
_PARAGRAPH_END = re.compile(r'\n[ \t]*\n|(?<=[.!?])[ \t]*\n(?=[ \t]*[A-Z0-9])')


def sections(report: str) -> List[Tuple[str, str]]:
  """[(kind, text)] in report order; kind 'findings', 'impression', 'excluded', 'other'.

  Text before the first header is kind 'preamble'.
  """
  marks = [(m.start(), m.end(), _KIND_OF_HEADER[m.group(1).lower()])
           for m in _HEADER.finditer(report)]
  taken = {start for start, _, _ in marks}
  for m in _OTHER_HEADER.finditer(report):
    name = m.group(1).lower()
    if m.start(1) not in taken and name not in _KIND_OF_HEADER and all(
        not (s <= m.start(1) < e) for s, e, _ in marks):
      marks.append((m.start(1), m.end(), 'other'))
  marks.sort()
  out = []
  if not marks or marks[0][0] > 0:
    out.append(('preamble', report[:marks[0][0] if marks else len(report)]))
  for i, (_, end, kind) in enumerate(marks):
    stop = marks[i + 1][0] if i + 1 < len(marks) else len(report)
    body = report[end:stop]
    # An indication or history is one paragraph: a blank line, or a line that starts a
    # new sentence, ends it ("HISTORY: Cough.\nSmall effusion." without FINDINGS:).
    cut = _PARAGRAPH_END.search(body.lstrip()) if kind == 'excluded' else None
    if cut:
      offset = len(body) - len(body.lstrip())
      out.append((kind, body[:offset + cut.start()]))
      out.append(('other', body[offset + cut.start():]))
    else:
      out.append((kind, body))
  return out


def image_text(report: str) -> str:
  """The parts of a report that describe the image (see the module docstring, step 2)."""
  parts = sections(report)
  described = [text for kind, text in parts if kind in ('findings', 'impression')]
  if any(t.strip() for t in described):
    return '\n\n'.join(described)
  return '\n\n'.join(text for kind, text in parts if kind in ('preamble', 'other', 'findings',
                                                                  'impression'))


def normalise(text: str) -> str:
  """Lower case, placeholders and shorthands rewritten, sentences made explicit."""
  text = _PLACEHOLDER.sub(' xxxx ', text)
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  # A list number or a blank line starts a sentence; a wrapped line does not.
  text = re.sub(r'\n\s*(\d{1,2}[.)]\s)', r'. \1', text)
  text = re.sub(r'\n[ \t]*\n', ' . ', text)
  text = re.sub(r'(?m)^[ \t]*[-*\u2022][ \t]+', ' . ', text)
  text = text.lower()
  text = re.sub(r'(?<=[a-z])-(?=[a-z])', ' ', text)
  for pattern, replacement in _REWRITES:
    text = re.sub(pattern, replacement, text)
  text = re.sub(r'(?<=\d)\.(?=\s|$)', ' .', text)  # "2." at a sentence end.
  return ' '.join(text.split())


def _expansions(phrase: str, limit: int) -> Optional[List[str]]:
  """Every literal a phrase stands for, or None when there are more than `limit`."""
  count, words = 1, []
  for word in phrase.split():
    optional = word.endswith('?') and len(word) > 1
    options = word.rstrip('?').split('|') if optional else word.split('|')
    words.append(options + [''] if optional else options)
    count *= len(words[-1])
  if count > limit:
    return None
  out = ['']
  for options in words:
    out = [f'{head} {option}' if option else head for head in out for option in options]
  return sorted({' '.join(text.split()) for text in out if text.strip()})


def _token_pattern(phrase: str) -> List[dict]:
  pattern = []
  for word in phrase.split():
    optional = word.endswith('?') and len(word) > 1
    word = word.rstrip('?') if optional else word
    options = word.split('|')
    token = {'LOWER': options[0]} if len(options) == 1 else {'LOWER': {'IN': options}}
    if optional:
      token['OP'] = '?'
    pattern.append(token)
  return pattern


@dataclasses.dataclass(frozen=True)
class Labels:
  """codes int8 [N, len(names)]; abnormal int8 [N] (0/1)."""
  codes: np.ndarray
  abnormal: np.ndarray
  names: Tuple[str, ...]


class ReportLabeler:
  """Labels reports with OBSERVATIONS plus any `extra` observations.

  Args:
    devices_abnormal: whether a support device alone makes a report abnormal.
    extra: observation name -> phrases (this module's phrase syntax), labelled after the
      14 and counted towards `abnormal`, e.g. {'Tuberculosis': ('tuberculosis',)}.
  """

  def __init__(self, *, devices_abnormal: bool = False,
               extra: Optional[Mapping[str, Sequence[str]]] = None):
    import spacy  # pylint: disable=g-import-not-at-top  Only when labelling.
    from negspacy import negation  # pylint: disable=g-import-not-at-top,unused-import

    extra = dict(extra or {})
    clash = sorted(set(extra) & (set(OBSERVATIONS) | {OTHER}))
    if clash:
      raise ValueError(f'extra observations {clash} clash with the built-in ones.')
    self.devices_abnormal = bool(devices_abnormal)
    self.names = tuple(OBSERVATIONS) + tuple(extra)
    nlp = spacy.blank('en')
    nlp.add_pipe('sentencizer', config={'punct_chars': ['.', '!', '?', ';']})
    ruler = nlp.add_pipe('entity_ruler', config={'phrase_matcher_attr': 'LOWER'})
    # Several observations may share a phrase (hydropneumothorax), so a label is the
    # '+'-joined observations; '~' / '?' mark a phrase negative / uncertain by itself.
    by_phrase: Dict[Tuple[str, str], List[str]] = {}
    for name, phrases in list(PHRASES.items()) + list(extra.items()):
      for phrase in phrases:
        by_phrase.setdefault((phrase, ''), []).append(name)
    for mark, table in (('~', NEGATIVE_PHRASES), ('?', UNCERTAIN_PHRASES)):
      for name, phrases in table.items():
        for phrase in phrases:
          by_phrase.setdefault((phrase, mark), []).append(name)
    patterns = []
    for (phrase, mark), names in by_phrase.items():
      label = '+'.join(sorted(set(names))) + mark
      # Literals go to spaCy's PhraseMatcher (a hash lookup per token); only phrases
      # with many variants stay token patterns for the (much slower) Matcher.
      literals = _expansions(phrase, limit=300)
      if literals is None:
        patterns.append({'label': label, 'pattern': _token_pattern(phrase)})
      else:
        patterns.extend({'label': label, 'pattern': text} for text in literals)
    ruler.add_patterns(patterns)
    nlp.add_pipe('negex', name='negation', config={
        'neg_termset': NEGATION_TERMS, 'extension_name': 'negated'})
    nlp.add_pipe('negex', name='uncertainty', config={
        'neg_termset': UNCERTAINTY_TERMS, 'extension_name': 'uncertain'})
    self._nlp = nlp
    self._column = {name: k for k, name in enumerate(self.names)}
    # What decides `abnormal` besides OTHER: every observation but these two.
    self._findings = [k for k, name in enumerate(self.names)
                      if name not in ('No Finding', 'Support Devices')]

  def label(self, reports: Sequence[str], *, batch_size: int = 256) -> Labels:
    """Labels for each report; a report must be a non-empty str (ValueError names it)."""
    texts = []
    for i, report in enumerate(reports):
      if not isinstance(report, str):
        raise TypeError(f'report {i}: expected str, got {type(report).__name__}.')
      if not report.strip():
        raise ValueError(f'report {i}: empty report.')
      texts.append(normalise(image_text(report)))
    codes = np.full((len(texts), len(self.names)), UNMENTIONED, np.int8)
    abnormal = np.zeros(len(texts), np.int8)
    for i, doc in enumerate(self._nlp.pipe(texts, batch_size=batch_size)):
      codes[i], abnormal[i] = self._aggregate(doc)
    return Labels(codes=codes, abnormal=abnormal, names=self.names)

  def _aggregate(self, doc) -> Tuple[List[int], int]:
    codes = [UNMENTIONED] * len(self.names)
    other = UNMENTIONED
    rank = _RANK
    for ent in doc.ents:
      label = ent.label_
      if label.endswith('~') or ent._.negated:
        code = NEGATIVE
      elif label.endswith('?') or ent._.uncertain:
        code = UNCERTAIN
      else:
        code = POSITIVE
      for name in label.rstrip('~?').split('+'):
        if name == OTHER:
          other = max(other, code, key=rank.get)
        else:
          k = self._column[name]
          codes[k] = max(codes[k], code, key=rank.get)
    abnormal = other in (POSITIVE, UNCERTAIN) or any(
        codes[k] in (POSITIVE, UNCERTAIN) for k in self._findings)
    if self.devices_abnormal:
      abnormal = abnormal or codes[self._column['Support Devices']] in (POSITIVE, UNCERTAIN)
    codes[self._column['No Finding']] = UNMENTIONED if abnormal else POSITIVE
    return codes, int(abnormal)


_DEFAULT: Dict[Tuple, ReportLabeler] = {}
_DEFAULT_LOCK = threading.Lock()


def default_labeler(devices_abnormal: bool = False) -> ReportLabeler:
  """A labeler built once per process and setting (building one takes about a second)."""
  key = (bool(devices_abnormal),)
  with _DEFAULT_LOCK:
    if key not in _DEFAULT:
      _DEFAULT[key] = ReportLabeler(devices_abnormal=devices_abnormal)
    return _DEFAULT[key]


def label_reports(texts: Sequence[str], *, devices_abnormal: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
  """(codes int8 [N, 14] in OBSERVATIONS order, abnormal int8 [N])."""
  labels = default_labeler(devices_abnormal).label(texts)
  return labels.codes, labels.abnormal
