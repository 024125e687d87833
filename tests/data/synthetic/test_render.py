"""Synthetic radiographs end to end (`generate_cxr`): shape, determinism, arguments,
sites and findings in the pixels, opacity texture, difficulty."""

import numpy as np
import pytest
from scipy import ndimage, stats

from cxr_jax.data import synthetic
from cxr_jax.data.synthetic import anatomy
from cxr_jax.data.synthetic import render
from cxr_jax.data.synthetic import sampling
from cxr_jax.data.synthetic import CXR_FINDINGS

ALL_OFF = {name: False for name in CXR_FINDINGS}


def auroc(labels, scores):
  labels = np.asarray(labels, bool)
  ranks = stats.rankdata(scores)
  positives, negatives = labels.sum(), (~labels).sum()
  return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


@pytest.fixture(scope='module')
def rendered():
  """A few hundred rendered 64 px studies with their true labels."""
  examples = [synthetic.generate_cxr(i, seed=5, image_size=64) for i in range(300)]
  images = np.stack([e['image'] for e in examples]).astype(np.float32) / 65535
  labels = np.stack([e['true_labels'] for e in examples])
  return images, labels


# ---------------------------------------------------------------------------
# Shape of an example, determinism.


@pytest.mark.parametrize('size', [37, 64])
def test_example_fields_shapes_and_dtypes(size):
  example = synthetic.generate_cxr(3, site='B', image_size=size)
  assert example['image'].dtype == np.uint16 and example['image'].shape == (size, size)
  k = len(CXR_FINDINGS)
  assert example['true_labels'].dtype == np.int8 and example['true_labels'].shape == (k,)
  assert example['labels'].dtype == np.int8 and example['labels'].shape == (k,)
  assert set(example['true_labels'].tolist()) <= {0, 1}
  assert set(example['labels'].tolist()) <= set(synthetic.LABEL_CODES)
  assert example['sex'] in ('F', 'M') and 18 <= example['age'] <= 90
  assert example['view'] in ('PA', 'AP') and example['site'] == 'B'
  assert isinstance(example['age'], int)
  for key in ('patient_id', 'study_id', 'report'):
    assert isinstance(example[key], str) and example[key]
  assert example['true_abnormal'] == int(example['true_labels'].any())
  assert example['abnormal'] == synthetic.derive_abnormal(example['labels'])


def test_same_arguments_give_identical_bytes_and_other_indices_differ():
  a = synthetic.generate_cxr(11, seed=1, site='C', image_size=64)
  b = synthetic.generate_cxr(11, seed=1, site='C', image_size=64)
  assert a['image'].tobytes() == b['image'].tobytes()
  assert a['report'] == b['report'] and a['labels'].tobytes() == b['labels'].tobytes()
  assert a['patient_id'] == b['patient_id'] and a['study_id'] == b['study_id']
  for other in (dict(index=12, seed=1), dict(index=11, seed=2)):
    c = synthetic.generate_cxr(other['index'], seed=other['seed'], site='C', image_size=64)
    assert not np.array_equal(a['image'], c['image'])
  natural_a = synthetic.generate_natural(5, seed=1, num_classes=10, image_size=32)
  natural_b = synthetic.generate_natural(5, seed=1, num_classes=10, image_size=32)
  assert natural_a['image'].tobytes() == natural_b['image'].tobytes()
  natural_c = synthetic.generate_natural(6, seed=1, num_classes=10, image_size=32)
  assert not np.array_equal(natural_a['image'], natural_c['image'])


def test_image_uses_the_full_16_bit_range():
  for site in synthetic.SITES:
    image = synthetic.generate_cxr(0, site=site, image_size=64)['image']
    assert image.max() > 0.9 * 65535 and image.min() < 0.1 * 65535, site
    assert len(np.unique(image)) > 1000, site  # Not 8-bit values stored in 16 bits.


def test_large_images_are_supported():
  image = synthetic.generate_cxr(1, image_size=512)['image']
  assert image.shape == (512, 512) and image.std() > 5000


def test_metadata_matches_the_rendered_example():
  for i in range(5):
    example = synthetic.generate_cxr(i, image_size=32, label_noise=0.3)
    meta = synthetic.study_metadata(i, label_noise=0.3)
    for key, value in meta.items():
      np.testing.assert_array_equal(example[key], value)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='site'):
    synthetic.generate_cxr(0, site='Z')
  with pytest.raises(ValueError, match='effusion_typo'):
    synthetic.generate_cxr(0, findings_override={'effusion_typo': True})
  with pytest.raises(ValueError, match='label_noise'):
    synthetic.generate_cxr(0, label_noise=1.5)
  with pytest.raises(ValueError, match='index'):
    synthetic.generate_cxr(-1)
  with pytest.raises(ValueError, match=r'severity_range .*\(0.9, 0.2\)'):
    synthetic.generate_cxr(0, severity_range=(0.9, 0.2))
  with pytest.raises(ValueError, match='severity_range must be a pair'):
    synthetic.generate_cxr(0, severity_range=0.8)
  with pytest.raises(ValueError, match=r'variability must be in \[0, 3.0\], got 4'):
    synthetic.generate_cxr(0, variability=4)
  with pytest.raises(ValueError, match="variability must be a number, got 'wide'"):
    synthetic.generate_cxr(0, variability='wide')
  with pytest.raises(ValueError, match='num_classes'):
    synthetic.generate_natural(0, num_classes=synthetic.MAX_NATURAL_CLASSES + 1)


# ---------------------------------------------------------------------------
# Sites and findings in the pixels.


def _site_features(image):
  x = image.astype(np.float32) / 65535
  detail = x - ndimage.uniform_filter(x, 3)
  return [np.median(x), np.percentile(x, 5), np.percentile(x, 95), np.abs(detail).mean(),
          (x < 0.02).mean(), (x > 0.98).mean()]


def test_sites_differ_measurably():
  """A nearest-centroid classifier on intensity and noise statistics recognises the site."""
  features = {site: np.array([_site_features(
      synthetic.generate_cxr(i, site=site, image_size=64)['image']) for i in range(40)])
              for site in synthetic.SITES}
  scale = np.concatenate(list(features.values())).std(0) + 1e-9
  centroids = {site: f[:20].mean(0) / scale for site, f in features.items()}
  correct = 0
  for site, f in features.items():
    for row in f[20:] / scale:
      nearest = min(centroids, key=lambda s: np.sum((row - centroids[s]) ** 2))
      correct += nearest == site
  assert correct / (20 * len(features)) > 0.9
  # Site B's older detector is noisier than site A's.
  assert features['B'][:, 3].mean() > 1.3 * features['A'][:, 3].mean()


def _finding_difference(name, index):
  off = synthetic.generate_cxr(index, seed=9, image_size=64, findings_override=ALL_OFF)
  on = synthetic.generate_cxr(index, seed=9, image_size=64,
                              findings_override={**ALL_OFF, name: True})
  assert on['true_labels'][CXR_FINDINGS.index(name)] == 1
  assert off['true_labels'].sum() == 0
  return (on['image'].astype(np.float32) - off['image'].astype(np.float32)) / 65535


@pytest.mark.parametrize('name', CXR_FINDINGS)
def test_each_finding_changes_the_image_where_expected(name):
  diffs = np.stack([_finding_difference(name, i) for i in range(4)])
  # Per-image windowing shifts everything a little; look at real changes only.
  changed = np.where(np.abs(diffs) > 0.03, diffs, 0)
  assert all(np.abs(d).sum() > 0.3 for d in changed), name
  weight = np.abs(changed).sum(0)
  rows, cols = np.mgrid[:64, :64] / 63.0
  centre_row = (weight * rows).sum() / weight.sum()
  centre_distance = (weight * np.abs(cols - 0.5)).sum() / weight.sum()
  brighter = changed.sum() > 0
  if name == 'pleural_effusion':
    assert centre_row > 0.55 and brighter
  elif name == 'tuberculosis':
    assert centre_row < 0.45 and brighter
  elif name == 'atelectasis':
    assert centre_row > 0.5 and brighter  # A basal band and a raised hemidiaphragm.
  elif name == 'cardiomegaly':
    assert 0.45 < centre_row < 0.85 and centre_distance < 0.25 and brighter
  elif name == 'airspace_opacity':
    assert centre_distance > 0.1 and brighter
  elif name == 'nodule':
    # A few small spots: most of the change sits in a small fraction of pixels.
    per_image = np.abs(changed).reshape(4, -1)
    top = np.sort(per_image, axis=1)[:, -60:].sum(1)
    assert np.all(top > 0.6 * per_image.sum(1)) and brighter
  elif name == 'pneumothorax':
    assert not brighter  # Air replaces lung: darker, bar the thin pleural line.
    assert centre_distance > 0.12


def test_override_changes_only_the_named_finding():
  base = synthetic.generate_cxr(2, label_noise=0.0, findings_override=ALL_OFF)
  forced = synthetic.generate_cxr(2, label_noise=0.0,
                                  findings_override={**ALL_OFF, 'nodule': True})
  assert (forced['true_labels'] != base['true_labels']).sum() == 1
  assert base['patient_id'] == forced['patient_id'] and base['age'] == forced['age']


def test_opacity_texture_mottles_the_opacity_where_it_was_and_nothing_else():
  """Texture breaks an airspace opacity's density into blobs inside the same area: less
  density on average, more of it at fine scale; films without the finding are as before."""

  def added_density(index, texture):
    densities = []
    for flag in (False, True):
      study = sampling._sample_study(index, 9, 'B', 0.1,
                                      {**ALL_OFF, 'airspace_opacity': flag})
      frame = anatomy._patient_frame(64, study.anatomy)
      densities.append(render._render_density(study, frame, texture))
    return densities[1] - densities[0]  # Opacity replaces air: density goes up.

  for index in range(4):
    smooth, mottled = added_density(index, 0.0), added_density(index, 1.0)
    assert smooth.max() > 0.05
    assert np.all(mottled[smooth <= 1e-6] <= 1e-6)  # Only where the opacity is.
    assert mottled.sum() < 0.7 * smooth.sum()
    fine = lambda d: np.abs(d - ndimage.gaussian_filter(d, 2.0)).sum() / d.sum()
    assert fine(mottled) > 1.25 * fine(smooth), (fine(mottled), fine(smooth))
  without = {**ALL_OFF, 'cardiomegaly': True}
  np.testing.assert_array_equal(
      synthetic.generate_cxr(5, image_size=32, findings_override=without)['image'],
      synthetic.generate_cxr(5, image_size=32, findings_override=without,
                             opacity_texture=1.0)['image'])
  with pytest.raises(ValueError, match="opacity_texture must be a number, got 'rough'"):
    synthetic.generate_cxr(0, opacity_texture='rough')


# ---------------------------------------------------------------------------
# Difficulty: cheap checks. benchmarks/synthetic_difficulty.py trains a CNN.


def test_global_mean_intensity_is_a_weak_feature(rendered):
  images, labels = rendered
  means = images.mean(axis=(1, 2))
  scores = {}
  for k, name in enumerate(CXR_FINDINGS):
    if labels[:, k].sum() >= 8:
      value = auroc(labels[:, k], means)
      scores[name] = max(value, 1 - value)
  assert len(scores) >= 5
  assert np.median(list(scores.values())) < 0.7, scores
  assert max(scores.values()) < 0.8, scores


def test_lung_base_brightness_separates_effusion_once_the_lungs_are_located(rendered):
  """White-box: with the lungs located (as a CNN must learn to), a region statistic works.

  Fixed pixel regions do poorly because patients move; the generator's own lung
  geometry finds the bases, whose brightness relative to the mid-lungs carries the
  effusion signal. (The global mean gives about 0.55, see the test above.)
  """
  images, labels = rendered
  statistic = []
  for i, image in enumerate(images):
    study = sampling._sample_study(i, 5, 'A', 0.1, None)
    frame = anatomy._patient_frame(64, study.anatomy)
    domes = anatomy._domes(study.anatomy)
    lungs = sum(anatomy._lung_geometry(frame, study.anatomy, side, domes[side])
                for side in (-1, 1)) > 0.5
    bases = lungs & (frame.v > domes[1] - 0.1)
    statistic.append(image[bases].mean() - image[lungs].mean())
  k = CXR_FINDINGS.index('pleural_effusion')
  assert auroc(labels[:, k], np.array(statistic)) > 0.72  # 0.80 when written.
