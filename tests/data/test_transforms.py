"""Preprocessing strings: parsing, errors that name the op, and what each op does."""

import io

import cv2
import numpy as np
import pytest

from cxr_jax.data import images
from cxr_jax.data import transforms


def run(pp, image, seed=0, **extra):
  return transforms.Preprocess(pp)({'image': image, **extra}, np.random.default_rng(seed))


def test_parse_literals_and_kwargs():
  assert transforms.parse('decode|resize(256)|inception_crop(224, area_min=5)|flip_lr') == [
      ('decode', (), {}), ('resize', (256,), {}), ('inception_crop', (224,), {'area_min': 5}),
      ('flip_lr', (), {})]


@pytest.mark.parametrize('pp,message', [
    ('decode|rezise(256)', "Unknown preprocessing op 'rezise' in 'decode|rezise(256)'. Known:"),
    ('resize(-3)', 'resize(-3,)'),
    ('resize(256, 1, 2)', 'resize(256, 1, 2)'),
    ('gamma(lower=2, upper=1)', 'need 0 < lower <= upper'),
    ('resize(x)', 'arguments must be literals'),
    ('decode||flip_lr', 'Empty preprocessing op'),
    ('two_views|two_views', 'two_views appears more than once'),
])
def test_errors_name_the_op(pp, message):
  with pytest.raises(ValueError, match=None) as err:
    transforms.Preprocess(pp)
  assert message in str(err.value)


def test_decode_png_keeps_16_bits_and_jpeg_8_bits():
  gray16 = (np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) * 50).astype(np.uint16)
  png = cv2.imencode('.png', gray16)[1].tobytes()
  out = run('decode', png)['image']
  assert out.dtype == np.uint16 and out.shape == (40, 30, 1)
  np.testing.assert_array_equal(out[..., 0], gray16)
  colour = np.zeros((8, 8, 3), np.uint8)
  colour[..., 0] = 200  # Red in RGB order.
  jpeg = cv2.imencode('.jpg', colour[..., ::-1])[1].tobytes()
  out = run('decode', jpeg)['image']
  assert out.shape == (8, 8, 3) and out[..., 0].mean() > 150 and out[..., 2].mean() < 50
  assert run('decode(1)', jpeg)['image'].shape == (8, 8, 1)
  assert run('decode(3)', png)['image'].shape == (40, 30, 3)
  with pytest.raises(ValueError, match='could not be decoded'):
    run('decode', b'not an image')


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
@pytest.mark.parametrize('shape', [(40, 30), (40, 30, 1), (7, 5, 3)])
def test_decode_raw_gives_the_stored_array(dtype, shape):
  stored = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
  raw = images.encode_raw(stored)
  out = run('decode', raw)['image']
  assert out.dtype == dtype and out.shape == (shape + (1,))[:3]
  np.testing.assert_array_equal(out.reshape(shape), stored)
  # As the data source hands records over: bytes, or a uint8 array of them.
  np.testing.assert_array_equal(run('decode', np.frombuffer(raw, np.uint8))['image'], out)
  assert run('decode(3)', raw)['image'].shape[-1] == 3


@pytest.mark.parametrize('damage, message', [
    (lambda raw: raw[:-1], r'describes uint16\[6, 4\] \(48 bytes\) but the record holds 47'),
    (lambda raw: raw + b'\0\0', 'holds 50 bytes of pixels'),
    (lambda raw: raw[:20], 'raw image'),
])
def test_decode_raw_of_the_wrong_size_is_an_error(damage, message):
  raw = images.encode_raw(np.zeros((6, 4), np.uint16))
  with pytest.raises(images.ImageError, match=message):
    run('decode', damage(raw))


def test_raw_images_are_integer_gray_or_colour_arrays():
  with pytest.raises(ValueError, match=r'uint8 or uint16 \[H, W\(, C\)\], got float32'):
    images.encode_raw(np.zeros((4, 4), np.float32))
  stream = io.BytesIO()
  np.save(stream, np.zeros((4, 4), np.float32))  # A .npy the builders never write.
  with pytest.raises(images.ImageError, match='unusable .npy header'):
    run('decode', stream.getvalue())


def test_value_range_uses_dtype_range():
  image = np.array([[[0], [65535]]], np.uint16)
  np.testing.assert_allclose(run('value_range(-1, 1)', image)['image'][..., 0], [[-1, 1]])
  image8 = np.array([[[0], [255]]], np.uint8)
  np.testing.assert_allclose(run('value_range(0, 1)', image8)['image'][..., 0], [[0, 1]])


def test_window_clips_percentiles():
  image = np.linspace(0, 1000, 1001, dtype=np.float32).reshape(1001, 1, 1)
  out = run('window(10, 90)', image)['image']
  assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
  assert np.isclose(out[500, 0, 0], 0.5)


def test_geometry_shapes_and_determinism():
  image = np.random.default_rng(0).integers(0, 65535, (100, 80, 1)).astype(np.uint16)
  pp = 'resize_small(64)|random_crop(48)|flip_lr|affine|value_range(0, 1)|rgb'
  a, b, c = run(pp, image, seed=1), run(pp, image, seed=1), run(pp, image, seed=2)
  assert a['image'].shape == (48, 48, 3) and a['image'].dtype == np.float32
  np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(a['image'], c['image'])
  assert run('resize_small(64)', image)['image'].shape == (80, 64, 1)
  assert run('resize((32, 16))', image)['image'].shape == (32, 16, 1)
  assert run('central_crop(50)', image)['image'].shape == (50, 50, 1)
  assert run('inception_crop(24)', image)['image'].shape == (24, 24, 1)
  with pytest.raises(ValueError, match='cannot crop 120x120'):
    run('random_crop(120)', image)


def test_flip_lr_flips():
  image = np.arange(6, dtype=np.uint8).reshape(1, 6, 1)
  np.testing.assert_array_equal(run('flip_lr(1.0)', image)['image'][0, :, 0], [5, 4, 3, 2, 1, 0])
  np.testing.assert_array_equal(run('flip_lr(0.0)', image)['image'], image)


def test_photometric_ops_need_unit_float():
  image = np.full((4, 4, 1), 0.5, np.float32)
  for op in ('brightness(0.2)', 'contrast', 'gamma'):
    out = run(op, image)['image']
    assert out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
  with pytest.raises(ValueError, match=r'gamma needs a float32 image in \[0, 1\]'):
    run('gamma', np.zeros((4, 4, 1), np.uint16))


def test_two_views_are_independent_augmentations():
  image = np.random.default_rng(0).integers(0, 255, (64, 64, 1)).astype(np.uint8)
  out = run('value_range(0, 1)|two_views|random_crop(32)|flip_lr', image, labels=np.ones(3))
  assert out['image'].shape == (2, 32, 32, 1)
  assert not np.array_equal(out['image'][0], out['image'][1])
  assert out['labels'].shape == (3,)


def test_keep_drops_other_keys():
  out = run('keep("image")', np.zeros((2, 2, 1)), report='x')
  assert list(out) == ['image']
  with pytest.raises(KeyError, match='has no'):
    run('keep("labels")', np.zeros((2, 2, 1)))


def test_mixup_mixes_images_labels_and_masks():
  batch = {'image': np.stack([np.zeros((2, 2, 1)), np.ones((2, 2, 1))]).astype(np.float32),
           'labels': np.array([[0.], [1.]], np.float32),
           'label_mask': np.array([[1.], [0.]], np.float32)}
  out = transforms.BatchPreprocess('mixup(0.4)')(batch, np.random.default_rng(0))
  weight = out['image'][0].mean()
  assert 0 < weight < 1
  np.testing.assert_allclose(out['labels'][0], weight)  # Image and label mixed alike.
  np.testing.assert_array_equal(out['label_mask'], [[0.], [0.]])


def test_mixup_of_classes_needs_onehot_labels():
  examples = [run('onehot(3)', np.full((2, 2, 1), v, np.float32), label=np.int64(v))
              for v in (0, 2)]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  np.testing.assert_array_equal(batch['label'], [[1, 0, 0], [0, 0, 1]])
  out = transforms.BatchPreprocess('mixup(0.4)')(batch, np.random.default_rng(0))
  weight = 1 - out['image'][0].mean() / 2  # Image 0 is 0, image 1 is 2.
  np.testing.assert_allclose(out['label'][0], [weight, 0, 1 - weight], rtol=1e-6)
  with pytest.raises(ValueError, match='put onehot'):
    transforms.BatchPreprocess('mixup(0.4)')({'image': batch['image'],
                                              'label': np.array([0, 2])},
                                             np.random.default_rng(0))
  with pytest.raises(ValueError, match='label 3 is out of range'):
    run('onehot(3)', np.zeros((2, 2, 1)), label=np.int64(3))
