"""The generated datasets as TFDS builders: splits by patient, stored bits, determinism."""

import collections
import dataclasses

import cv2
import numpy as np
import pytest

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import pipeline
from cxr_jax.data import synthetic
from cxr_jax.data import transforms
from cxr_jax.data.builders import synthetic as synthetic_builders


@pytest.fixture(scope='module')
def cxr(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = synthetic_builders.make_cxr_config('B', image_size=48, num_examples=120,
                                              label_noise=0.2, seed=5)
  return synthetic_builders.prepare(config, data_dir), data_dir


def read_all(name, split, data_dir):
  source, info = pipeline.open_source(name, split, data_dir)
  return [source[i] for i in range(len(source))], info


def test_cxr_splits_are_patient_disjoint_and_complete(cxr):
  name, data_dir = cxr
  assert name == 'synthetic_cxr/site_b_48px_120_noise20_seed5'
  patients, keys = {}, []
  for split in ('train', 'validation', 'test'):
    records, info = read_all(name, split, data_dir)
    patients[split] = {r['patient_id'] for r in records}
    keys += [r['image_id'] for r in records]
  assert len(keys) == len(set(keys)) == 120
  assert not patients['train'] & patients['validation']
  assert not patients['train'] & patients['test']
  assert not patients['validation'] & patients['test']
  assert tuple(info.metadata['findings']) == tuple(synthetic.CXR_FINDINGS)


def test_cxr_records_match_the_generator(cxr):
  name, data_dir = cxr
  records, _ = read_all(name, 'train', data_dir)
  record = records[0]
  index = int(record['image_id'].decode().rsplit('-', 1)[1])
  expected = synthetic.generate_cxr(index, seed=5, site='B', image_size=48, label_noise=0.2)
  image = cv2.imdecode(np.frombuffer(record['image'], np.uint8), cv2.IMREAD_UNCHANGED)
  assert image.dtype == np.uint16  # Stored losslessly at 16 bits.
  np.testing.assert_array_equal(image, expected['image'])
  np.testing.assert_array_equal(record['labels'], expected['labels'])
  assert record['report'].decode() == expected['report']
  assert record['site'].decode() == 'B'
  codes = np.stack([r['labels'] for r in records])
  assert set(np.unique(codes)) <= {labels_lib.POSITIVE, labels_lib.NEGATIVE,
                                   labels_lib.UNCERTAIN, labels_lib.UNMENTIONED}


@pytest.mark.parametrize('raw_size', [32, 64])  # Area-averaged down; interpolated up.
def test_raw_records_are_the_png_records_resized(cxr, raw_size):
  name, data_dir = cxr
  config = synthetic_builders.make_cxr_config('B', image_size=48, num_examples=120,
                                              label_noise=0.2, seed=5)
  raw_name = synthetic_builders.prepare(
      dataclasses.replace(config, name=f'{config.name}_raw{raw_size}', raw_size=raw_size),
      data_dir)
  png_records, _ = read_all(name, 'train', data_dir)
  raw_records, info = read_all(raw_name, 'train', data_dir)
  assert info.metadata['raw_size'] == raw_size
  assert [r['image_id'] for r in raw_records] == [r['image_id'] for r in png_records]
  from_png = transforms.Preprocess(f'decode|resize({raw_size})')
  from_raw = transforms.Preprocess('decode')
  for png, raw in zip(png_records, raw_records):
    expected = from_png(png, None)['image']
    stored = from_raw(raw, None)['image']
    assert stored.dtype == np.uint16 and stored.shape == (raw_size, raw_size, 1)
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(raw['labels'], png['labels'])


def test_natural_is_balanced_rgb(tmp_path):
  config = synthetic_builders.make_natural_config(num_classes=5, image_size=24, num_train=100,
                                                  num_test=20)
  name = synthetic_builders.prepare(config, str(tmp_path))
  records, info = read_all(name, 'train', str(tmp_path))
  assert info.features['label'].num_classes == 5
  assert collections.Counter(int(r['label']) for r in records) == {c: 20 for c in range(5)}
  image = cv2.imdecode(np.frombuffer(records[0]['image'], np.uint8), cv2.IMREAD_UNCHANGED)
  assert image.shape == (24, 24, 3)
  test_records, _ = read_all(name, 'test', str(tmp_path))
  assert len(test_records) == 20


def test_severity_range_is_in_the_name_and_the_records():
  assert synthetic_builders.make_cxr_config('A', image_size=32, num_examples=10).name == (
      'site_a_32px_10_noise10_seed0')  # Names of datasets built before the range existed.
  config = synthetic_builders.make_cxr_config('A', image_size=32, num_examples=10,
                                              severity_range=(0.8, 1.0))
  assert config.name == 'site_a_32px_10_noise10_severity80-100_seed0'
  index = next(i for i in range(40)
               if synthetic.study_metadata(i, label_noise=0.1)['true_abnormal'])
  record = synthetic_builders._render_cxr(index, config)
  expected = synthetic.generate_cxr(index, site='A', image_size=32, severity_range=(0.8, 1.0))
  np.testing.assert_array_equal(record.pixels, expected['image'])
  assert not np.array_equal(record.pixels, synthetic.generate_cxr(index, site='A',
                                                                  image_size=32)['image'])
  with pytest.raises(ValueError, match='severity_range'):
    synthetic_builders.make_cxr_config('A', severity_range=(0.5, 1.5))


def test_variability_is_in_the_name_and_the_records():
  config = synthetic_builders.make_cxr_config('B', image_size=32, num_examples=10,
                                              variability=2.5)
  assert config.name == 'site_b_32px_10_noise10_var2.5_seed0'
  record = synthetic_builders._render_cxr(3, config)
  np.testing.assert_array_equal(record.pixels, synthetic.generate_cxr(
      3, site='B', image_size=32, variability=2.5)['image'])
  assert not np.array_equal(record.pixels, synthetic.generate_cxr(3, site='B',
                                                                  image_size=32)['image'])
  with pytest.raises(ValueError, match='variability'):
    synthetic_builders.make_cxr_config('B', variability=-1)


def test_opacity_texture_is_in_the_name_and_the_records():
  config = synthetic_builders.make_cxr_config('B', image_size=32, num_examples=40,
                                              opacity_texture=0.5)
  assert config.name == 'site_b_32px_40_noise10_texture0.5_seed0'
  index = next(i for i in range(40) if synthetic.study_metadata(
      i, site='B')['true_labels'][synthetic.CXR_FINDINGS.index('airspace_opacity')])
  record = synthetic_builders._render_cxr(index, config)
  np.testing.assert_array_equal(record.pixels, synthetic.generate_cxr(
      index, site='B', image_size=32, opacity_texture=0.5)['image'])
  assert not np.array_equal(record.pixels, synthetic.generate_cxr(index, site='B',
                                                                  image_size=32)['image'])
  with pytest.raises(ValueError, match=r'opacity_texture must be in \[0, 1\], got 2'):
    synthetic_builders.make_cxr_config('B', opacity_texture=2)


def test_unknown_site_is_named():
  with pytest.raises(ValueError, match="Unknown synthetic site 'Q'"):
    synthetic_builders.make_cxr_config('Q')


def test_mined_labels_dataset(tmp_path):
  config = synthetic_builders.make_cxr_config('A', image_size=32, num_examples=40,
                                              label_noise=0.3, mine_labels=True)
  assert config.name == 'site_a_32px_40_noise30_mined_seed0'
  name = synthetic_builders.prepare(config, str(tmp_path))
  records, info = read_all(name, 'train', str(tmp_path))
  from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top
  assert info.metadata['labels']['source'] == 'mined'
  assert info.metadata['labels']['labeler'] == labeler.LABELER_VERSION
  reports = [r['report'].decode() for r in records]
  np.testing.assert_array_equal(np.stack([r['labels'] for r in records]),
                                synthetic.mine_report_labels(reports))


def test_generator_labels_are_recorded(cxr):
  name, data_dir = cxr
  _, info = read_all(name, 'test', data_dir)
  assert info.metadata['labels'] == {'source': 'generator', 'label_noise': 0.2}
