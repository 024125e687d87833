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
uncertain or positive (see `_GARBLED_POSITIVE` and `_GARBLED_NEGATIVE` in
`sampling`). The report is written from the garbled labels, as if the radiologist (or
the miner) erred.
With `mine_labels=True` the labels are instead read back from that report by the
report labeler (`cxr_jax.text.labeler`), as the published recipe mined its labels.

Patients. Indices come in blocks of `STUDIES_PER_BLOCK`; each block is split into
patients with one to four studies, so consecutive indices often share a patient and
splits must be made by `patient_id`.

Modules, each importing only those listed before it:
  streams   the random streams every example draws from;
  sites     SiteProfile and SITES;
  sampling  labels, finding priors, patients, and sampling a study (no pixels);
  reports   report writing, label mining, study_metadata;
  drawing   drawing primitives (grid, ramp, smooth noise, soft shapes);
  anatomy   the patient frame and the chest without findings;
  findings  each finding's fill or density;
  render    devices, markers, density to display values, generate_cxr;
  natural   natural-like images, generate_natural.
The package exposes the public names below; private ones stay in their modules.
"""

from cxr_jax.data.synthetic.natural import (MAX_NATURAL_CLASSES, NATURAL_LAYOUTS,
                                            NATURAL_PALETTES, NATURAL_SHAPES, NATURAL_TEXTURES,
                                            generate_natural, natural_class)
from cxr_jax.data.synthetic.render import generate_cxr
from cxr_jax.data.synthetic.reports import (MINED_OBSERVATIONS, mine_report_labels,
                                            report_labeler, study_metadata)
from cxr_jax.data.synthetic.sites import SITES, SiteProfile
from cxr_jax.data.synthetic.sampling import (AP_FRACTION, CXR_FINDINGS, FINDING_PRIORS,
                                            LABEL_CODES, MAX_VARIABILITY, NEGATIVE, POSITIVE,
                                            PREVALENCE, STUDIES_PER_BLOCK, UNCERTAIN,
                                            UNMENTIONED, FindingPrior, check_opacity_texture,
                                            check_severity_range, check_variability,
                                            derive_abnormal, derive_no_finding)

__all__ = [
    # Labels, the presence model, patients.
    'CXR_FINDINGS', 'POSITIVE', 'NEGATIVE', 'UNCERTAIN', 'UNMENTIONED', 'LABEL_CODES',
    'FindingPrior', 'FINDING_PRIORS', 'PREVALENCE', 'AP_FRACTION', 'MAX_VARIABILITY',
    'STUDIES_PER_BLOCK', 'derive_abnormal', 'derive_no_finding',
    # Checks of the generator's options.
    'check_severity_range', 'check_variability', 'check_opacity_texture',
    # Sites.
    'SiteProfile', 'SITES',
    # Reports and the labels mined from them.
    'study_metadata', 'MINED_OBSERVATIONS', 'report_labeler', 'mine_report_labels',
    # Radiographs.
    'generate_cxr',
    # Natural images.
    'NATURAL_SHAPES', 'NATURAL_TEXTURES', 'NATURAL_LAYOUTS', 'NATURAL_PALETTES',
    'MAX_NATURAL_CLASSES', 'natural_class', 'generate_natural',
]
