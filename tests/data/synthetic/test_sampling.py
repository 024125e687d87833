"""Synthetic studies without pixels: patients, prevalence, co-occurrence, label noise,
and the severity range and variability options."""

import collections

import numpy as np
import pytest

from cxr_jax.data import synthetic
from cxr_jax.data.synthetic import sampling
from cxr_jax.data.synthetic import (CXR_FINDINGS, NEGATIVE, POSITIVE, UNCERTAIN,
                                    UNMENTIONED)

ALL_OFF = {name: False for name in CXR_FINDINGS}


@pytest.fixture(scope='module')
def metadata():
  """Label-level statistics need thousands of studies; these skip rendering."""
  return [synthetic.study_metadata(i, seed=3, label_noise=0.0) for i in range(3000)]


# ---------------------------------------------------------------------------
# Patients, prevalence, co-occurrence, label noise.


def test_patients_have_several_studies_with_consistent_attributes():
  studies = collections.defaultdict(list)
  for i in range(400):
    meta = synthetic.study_metadata(i)
    studies[meta['patient_id']].append(meta)
  assert 1.2 < 400 / len(studies) < 2.5
  assert max(len(s) for s in studies.values()) >= 3
  chronic = [CXR_FINDINGS.index(name) for name, prior in synthetic.FINDING_PRIORS.items()
             if prior.chronic]
  for patient in studies.values():
    assert len({s['sex'] for s in patient}) == 1
    ages = [s['age'] for s in patient]
    assert ages == sorted(ages)
    assert len({s['true_labels'][chronic].tobytes() for s in patient}) == 1
  assert len({s['study_id'] for p in studies.values() for s in p}) == 400


def test_prevalence_matches_the_configured_model(metadata):
  true = np.stack([m['true_labels'] for m in metadata])
  n = len(true)
  for k, name in enumerate(CXR_FINDINGS):
    p = synthetic.PREVALENCE[name]
    # Chronic findings repeat over a patient's studies: allow for that clustering.
    tolerance = 4 * np.sqrt(p * (1 - p) * 2 / n)
    assert abs(true[:, k].mean() - p) < tolerance, (name, true[:, k].mean(), p)


def test_findings_co_occur_as_configured(metadata):
  true = np.stack([m['true_labels'] for m in metadata]).astype(bool)
  column = {name: true[:, k] for k, name in enumerate(CXR_FINDINGS)}
  for child, prior in synthetic.FINDING_PRIORS.items():
    for parent, boost in prior.given.items():
      with_parent = column[child][column[parent]].mean()
      without = column[child][~column[parent]].mean()
      assert abs((with_parent - without) - boost) < 0.1, (child, parent, with_parent, without)


def test_sites_share_the_patient_distribution():
  by_site = {site: [synthetic.study_metadata(i, site=site) for i in range(800)]
             for site in synthetic.SITES}
  for site, metas in by_site.items():
    assert abs(np.mean([m['sex'] == 'F' for m in metas]) - 0.5) < 0.08, site
    assert abs(np.mean([m['age'] for m in metas]) - 56) < 3.5, site
    assert abs(np.mean([m['view'] == 'AP' for m in metas]) - synthetic.AP_FRACTION) < 0.06
    assert abs(np.mean([m['true_abnormal'] for m in metas]) - 0.4) < 0.08, site


def test_zero_label_noise_gives_the_true_labels(metadata):
  for meta in metadata[:500]:
    np.testing.assert_array_equal(meta['labels'], meta['true_labels'])


def test_label_noise_rate_and_kinds_of_error():
  true, mined = [], []
  for i in range(1500):
    meta = synthetic.study_metadata(i, label_noise=0.2)
    true.append(meta['true_labels'])
    mined.append(meta['labels'])
  true, mined = np.stack(true), np.stack(mined)
  assert abs((true != mined).mean() - 0.2) < 0.02
  garbled_positive = mined[(true == 1) & (true != mined)]
  garbled_negative = mined[(true == 0) & (true != mined)]
  assert set(garbled_positive.tolist()) == {UNCERTAIN, NEGATIVE, UNMENTIONED}
  assert set(garbled_negative.tolist()) == {UNCERTAIN, POSITIVE, UNMENTIONED}
  # Report mining mostly leaves negatives unmentioned rather than inventing findings.
  assert (garbled_negative == UNMENTIONED).mean() > 0.55


def test_noisier_mining_garbles_a_superset_of_labels():
  for i in range(200):
    light = synthetic.study_metadata(i, label_noise=0.1)
    heavy = synthetic.study_metadata(i, label_noise=0.3)
    wrong_light = light['labels'] != light['true_labels']
    assert np.all(heavy['labels'][wrong_light] == light['labels'][wrong_light])


# ---------------------------------------------------------------------------
# Severity range and variability: drawn with the study, nothing else changes.


def test_severity_range_rescales_every_severity_and_changes_nothing_else():
  """Each severity is the full-range draw mapped linearly into the range; the rest
  (patients, presence, labels, positions) is drawn as before."""
  for i in range(40):
    full = sampling._sample_study(i, 3, 'B', 0.1, None)
    high = sampling._sample_study(i, 3, 'B', 0.1, None, (0.8, 1.0))
    np.testing.assert_array_equal(full.labels, high.labels)
    np.testing.assert_array_equal(full.true_labels, high.true_labels)
    assert full.patient_id == high.patient_id and full.view == high.view
    for name in CXR_FINDINGS:
      expected = 0.8 + 0.2 * full.findings[name]['severity']
      assert high.findings[name]['severity'] == pytest.approx(expected, abs=1e-12)
      assert full.findings[name]['side'] == high.findings[name]['side']
  # Obvious findings change more pixels than the same findings drawn at full range.
  def changed(index, severity_range):
    off, on = (synthetic.generate_cxr(index, seed=9, image_size=64, severity_range=severity_range,
                                      findings_override={**ALL_OFF, 'airspace_opacity': flag})
               for flag in (False, True))
    return np.abs(on['image'].astype(np.float32) - off['image']).sum()
  assert sum(changed(i, (0.8, 1.0)) for i in range(6)) > sum(changed(i, (0.0, 1.0))
                                                             for i in range(6))


def test_variability_widens_positioning_and_acquisition_only():
  """Shift, rotation, zoom and exposure move away from their centred values in
  proportion to `variability`; patients, findings, labels and reports are drawn as
  before."""
  geometry = ('center', 'rotation', 'zoom', 'penetration', 'gamma')

  def studies(variability):
    return [sampling._sample_study(i, 3, 'B', 0.1, None, variability=variability)
            for i in range(100)]

  centred, default, wide = studies(0.0), studies(1.0), studies(2.5)
  for c, d, w in zip(centred, default, wide):
    for key in geometry:
      np.testing.assert_allclose(np.asarray(w.anatomy[key]) - c.anatomy[key],
                                 2.5 * (np.asarray(d.anatomy[key]) - c.anatomy[key]),
                                 rtol=1e-9, atol=1e-12, err_msg=key)
    assert c.anatomy['rotation'] == 0 and c.anatomy['penetration'] == 1
    np.testing.assert_array_equal(w.labels, d.labels)
    np.testing.assert_array_equal(w.true_labels, d.true_labels)
    assert (w.patient_id, w.view, w.age) == (d.patient_id, d.view, d.age)
    assert w.findings['airspace_opacity'] == d.findings['airspace_opacity']
  assert synthetic.study_metadata(7, variability=2.5)['report'] == (
      synthetic.study_metadata(7)['report'])
