"""EfficientNet: parity with Keras applications, both Keras weight formats, loader errors."""

import math
import os
import shutil

os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'  # Before TF is imported: keep its C++ logs quiet.

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models
from cxr_jax.models import efficientnet
from cxr_jax.models import keras_weights
from cxr_jax.models import weights

# TensorFlow is a test dependency: the reference implementation is Keras' own.
import tensorflow as tf  # noqa: E402
from keras.src.applications import efficientnet as keras_efficientnet  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402

PARITY_TOL = 1e-4


def tiny_model(**overrides):
  """The one tiny configuration shared by most tests (so it is initialised once)."""
  return models.get_model('efficientnet-tiny', num_classes=1000,
                          keras_imagenet_rescale=False, **overrides)


# ---------------------------------------------------------------------------
# Keras reference models with random weights, saved in both file formats.


def normalization_layer(keras_model):
  return next(layer for layer in keras_model.layers
              if isinstance(layer, tf.keras.layers.Normalization))


def randomize(keras_model, seed):
  """Sets every weight (BN moving stats and input normalization included) at random.

  With arbitrary moving statistics the signal either fades block by block (the
  logits then hardly depend on the image and parity is vacuous) or grows until
  float32 rounding is amplified past any tolerance. So the statistics are first
  calibrated on random images (a training-mode pass with momentum 0), then
  perturbed; a variance gain of 0.9-1.3 keeps the net image-dependent yet
  well-conditioned (found by a sweep: below ~0.8 rounding is amplified ~100x,
  above ~1.2 the logits stop depending on the image).
  """
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    for w in layer.weights:
      name, shape = w.path.rsplit('/', 1)[-1], tuple(w.shape)
      if name == 'count':
        continue
      if name == 'mean':  # Normalization: per-channel input statistics in [0, 1] units.
        value = rng.uniform(0.3, 0.6, shape)
      elif name == 'variance':
        value = rng.uniform(0.03, 0.08, shape)
      elif name == 'gamma':
        value = 1 + 0.1 * rng.standard_normal(shape)
      elif name in ('beta', 'bias', 'moving_mean'):
        value = 0.1 * rng.standard_normal(shape)
      elif name == 'moving_variance':
        value = rng.uniform(0.5, 1.5, shape)
      elif isinstance(layer, tf.keras.layers.DepthwiseConv2D):
        value = rng.standard_normal(shape) / math.sqrt(shape[0] * shape[1])
      else:
        value = rng.standard_normal(shape) / math.sqrt(np.prod(shape[:-1]))
      w.assign(value.astype(np.float32))
  normalization_layer(keras_model).finalize_state()  # Else Keras keeps its cached copy.

  batch_norms = [layer for layer in keras_model.layers
                 if isinstance(layer, tf.keras.layers.BatchNormalization)]
  for layer in batch_norms:
    layer.momentum = 0.0
  tf.keras.utils.set_random_seed(seed)  # The pass applies dropout too.
  keras_model(random_images(keras_model.input.shape[1], seed, batch=8), training=True)
  for layer in batch_norms:
    layer.momentum = efficientnet.BN_MOMENTUM
    variance = layer.moving_variance.numpy()
    layer.moving_mean.assign(layer.moving_mean.numpy()
                             + 0.1 * np.sqrt(variance) * rng.standard_normal(variance.shape))
    layer.moving_variance.assign(variance * rng.uniform(0.9, 1.3, variance.shape))


def keras_outputs(keras_model, images):
  """(logits, avg_pool embedding) of a Keras EfficientNet built with include_top."""
  both = tf.keras.Model(keras_model.input,
                        [keras_model.output, keras_model.get_layer('avg_pool').output])
  logits, embedding = both(images, training=False)
  return logits.numpy(), embedding.numpy()


def weighted_layers(keras_model):
  names = [(layer.name, type(layer).__name__) for layer in keras_model.layers if layer.weights]
  # Keras numbers unnamed layers per session ('normalization_3'); the module does not.
  return [('normalization', c) if c == 'Normalization' else (n, c) for n, c in names]


def save_both_formats(keras_model, directory, stem):
  keras3_path = str(directory / f'{stem}.weights.h5')
  legacy_path = str(directory / f'{stem}.h5')
  keras_model.save_weights(keras3_path)
  with h5py.File(legacy_path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)
  return keras3_path, legacy_path


def random_images(size, seed, batch=2):
  return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def keras_reference(build, directory, seed):
  """Random-weight Keras model built by `build(size)`, saved in both formats, and its
  outputs on random images at 64 px and at 65 px (odd: SAME padding is asymmetric).

  The .weights.h5 file comes from the 64 px model; the legacy .h5 from the 65 px one,
  which shares its weights but holds a later Normalization layer than the session's
  first, so that file names it 'normalization_<n>' as real Keras sessions do.
  """
  out = {}
  for size in (64, 65):
    keras_model = build(size)
    if size == 64:
      randomize(keras_model, seed)
      trained = keras_model.get_weights()
      out['keras3'], _ = save_both_formats(keras_model, directory, 'at64')
      out['layers'] = weighted_layers(keras_model)
    else:
      keras_model.set_weights(trained)
      normalization_layer(keras_model).finalize_state()
      _, out['legacy'] = save_both_formats(keras_model, directory, 'at65')
    images = random_images(size, seed=seed + size)
    out[size] = (images, *keras_outputs(keras_model, images))
  out['dir'] = directory
  return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A Keras EfficientNet with efficientnet-tiny's width and depth."""
  build = lambda size: keras_efficientnet.EfficientNet(
      0.25, 0.25, 64, weights=None, input_shape=(size, size, 3),
      classifier_activation=None, name='efficientnet_tiny')
  return keras_reference(build, tmp_path_factory.mktemp('tiny'), seed=1)


@pytest.fixture(scope='module')
def b0(tmp_path_factory):
  build = lambda size: tf.keras.applications.EfficientNetB0(
      weights=None, input_shape=(size, size, 3), classifier_activation=None)
  return keras_reference(build, tmp_path_factory.mktemp('b0'), seed=0)


def apply(model, variables, images, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, images)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# ---------------------------------------------------------------------------
# Parity with Keras.


def test_keras_layer_order_and_formats_agree(tiny):
  model = tiny_model()
  assert list(model.keras_layers()) == tiny['layers']
  keras3 = keras_weights.read_keras_efficientnet(tiny['keras3'], model)
  legacy = keras_weights.read_keras_efficientnet(tiny['legacy'], model)
  assert sorted(keras3) == sorted(legacy)
  for key in keras3:
    np.testing.assert_array_equal(keras3[key], legacy[key], err_msg='/'.join(key))
  assert keras3['constants', 'normalization', 'variance'].shape == (3,)
  assert keras3['batch_stats', 'block2a', 'expand_bn', 'var'].shape == (48,)
  assert keras3['params', 'block2a', 'dwconv', 'kernel'].shape == (3, 3, 1, 48)


def check_parity(name, model, reference, fmt, size):
  variables = models.load_pretrained(model, reference[fmt])
  images, keras_logits, keras_embedding = reference[size]
  logits, aux = apply(model, variables, images)
  print(f'{name} {fmt} {size}px: max |logits diff| {max_diff(logits, keras_logits):.2e}, '
        f'max |embedding diff| {max_diff(aux["embedding"], keras_embedding):.2e} '
        f'(logits differ by {max_diff(keras_logits[0], keras_logits[1]):.2f} between images)')
  assert max_diff(keras_logits[0], keras_logits[1]) > 100 * PARITY_TOL  # Not vacuous.
  assert logits.dtype == jnp.float32 and aux['embedding'].dtype == jnp.float32
  assert max_diff(logits, keras_logits) <= PARITY_TOL
  assert max_diff(aux['embedding'], keras_embedding) <= PARITY_TOL
  assert set(aux['features']) == {'stem', 'top', *(f'block{i}' for i in range(1, 8))}
  assert aux['features']['block7'].shape[1:3] == (-(-size // 32),) * 2
  return variables


@pytest.mark.slow  # ~10 s with a warm compilation cache, ~50 s cold on two cores.
@pytest.mark.parametrize('fmt, size', [('keras3', 64), ('legacy', 65)])
def test_b0_matches_keras(b0, fmt, size):
  model = models.get_model('efficientnet-b0', keras_imagenet_rescale=False)
  assert list(model.keras_layers()) == b0['layers']
  check_parity('B0', model, b0, fmt, size)


@pytest.mark.parametrize('depthwise_impl', ['conv', 'shifted'])
@pytest.mark.parametrize('fmt, size', [('keras3', 64), ('legacy', 65)])
def test_tiny_matches_keras(tiny, fmt, size, depthwise_impl):
  # Both depthwise implementations (convolution; CPU's shifted sum) against Keras.
  check_parity(f'tiny ({depthwise_impl})', tiny_model().clone(depthwise_impl=depthwise_impl),
               tiny, fmt, size)


def test_imagenet_rescale_matches_keras(tiny):
  # The ImageNet-weights path multiplies the normalised input by 1 / sqrt(stddev):
  # (x - m) / sqrt(v / stddev) / sqrt(stddev) = (x - m) / sqrt(v) exactly, so with
  # the loaded variance divided by stddev it must reproduce Keras' logits.
  model = tiny_model()
  variables = models.load_pretrained(model, tiny['keras3'])
  constants = variables['constants']['normalization']
  adjusted = {**variables, 'constants': {'normalization': {
      **constants,
      'variance': constants['variance'] / jnp.asarray(efficientnet.IMAGENET_STDDEV)}}}
  images, keras_logits, _ = tiny[64]
  rescaled = jax.jit(model.clone(keras_imagenet_rescale=True).apply)
  logits = rescaled(adjusted, images)[0]
  print(f'tiny with ImageNet rescale: max |logits diff| {max_diff(logits, keras_logits):.2e}')
  assert max_diff(logits, keras_logits) <= PARITY_TOL
  assert max_diff(rescaled(variables, images)[0], keras_logits) > 100 * PARITY_TOL


def test_input_normalization_matches_numpy():
  mean, variance = (0.4, 0.5, 0.6), (0.04, 0.09, 1e-16)  # The last one hits the floor.
  images = random_images(4, seed=3)
  for rescale in (False, True):
    layer = efficientnet.InputNormalization(mean, variance, imagenet_rescale=rescale)
    out, variables = layer.init_with_output(jax.random.PRNGKey(0), images)
    expected = (images.astype(np.float64) / 255 - np.asarray(mean)) / np.maximum(
        np.sqrt(np.asarray(variance)), 1e-7)
    if rescale:
      expected /= np.sqrt(np.asarray(efficientnet.IMAGENET_STDDEV))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert set(variables) == {'constants'}


# ---------------------------------------------------------------------------
# Architecture bookkeeping.


def test_registry_and_published_widths():
  # Width of the top conv (the embedding) of Keras' EfficientNetB0-B7.
  published = {'b0': 1280, 'b1': 1280, 'b2': 1408, 'b3': 1536, 'b4': 1792,
               'b5': 2048, 'b6': 2304, 'b7': 2560}
  for variant, width in published.items():
    name = f'efficientnet-{variant}'
    model = models.get_model(name)
    assert model.num_classes == 1000
    assert efficientnet.round_filters(1280, model.width_coefficient) == width, name
    assert name in efficientnet.RESOLUTION
  assert len(efficientnet.block_specs(2.0, 3.1)) == 55  # B7: block1a-d ... block7a-d.
  assert models.get_model('efficientnet-l2').width_coefficient == 4.3
  assert models.get_model('efficientnet-tiny').num_classes is None


def param_count(model):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 64, 64, 3)), train=False))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes['params']))


def test_truncation_loads_the_full_file(tiny):
  full = tiny_model()
  truncated = tiny_model(truncate=2)
  full_vars = models.load_pretrained(full, tiny['legacy'])
  truncated_vars = models.load_pretrained(truncated, tiny['keras3'])
  assert {'block6a', 'block7a', 'top_conv', 'top_bn'}.isdisjoint(truncated_vars['params'])
  assert param_count(truncated) < param_count(full)
  b0 = models.get_model('efficientnet-b0')
  assert param_count(b0.clone(truncate=2)) < param_count(b0)

  images = tiny[64][0]
  _, full_aux = apply(full, full_vars, images)
  _, aux = apply(truncated, truncated_vars, images)
  assert set(aux['features']) == {'stem', *(f'block{i}' for i in range(1, 6))}
  np.testing.assert_allclose(aux['features']['block5'], full_aux['features']['block5'],
                             atol=1e-5)
  np.testing.assert_allclose(aux['embedding'],
                             full_aux['features']['block5'].mean(axis=(1, 2)), atol=1e-5)


@pytest.mark.parametrize('truncate', [-1, 7])
def test_truncate_out_of_range(truncate):
  with pytest.raises(ValueError, match=f'truncate={truncate}.*between 0 and 6'):
    param_count(tiny_model(truncate=truncate))


# ---------------------------------------------------------------------------
# Loader errors.


def copy_file(src, directory, name):
  dst = str(directory / name)
  shutil.copy(src, dst)
  return dst


def test_missing_and_misshaped_weights_are_named(tiny, tmp_path):
  path = copy_file(tiny['legacy'], tmp_path, 'broken.h5')
  with h5py.File(path, 'r+') as f:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs['layer_names']]
    f.attrs['layer_names'] = [n.encode() for n in names if n != 'block3a_bn']
    del f['block3a_bn']
    kernel = 'block2a_se_reduce/kernel'
    del f['block2a_se_reduce'][kernel]
    f['block2a_se_reduce'][kernel] = np.zeros((1, 1, 5, 5), np.float32)
  with pytest.raises(ValueError) as error:
    models.load_pretrained(tiny_model(), path)
  message = str(error.value)
  assert path in message
  assert 'params/block3a/bn/scale' in message
  assert 'batch_stats/block3a/bn/mean' in message
  assert 'params/block2a/se_reduce/kernel: file (1, 1, 5, 5)' in message


def test_foreign_layer_in_keras3_file(tiny, tmp_path):
  path = copy_file(tiny['keras3'], tmp_path, 'extra.weights.h5')
  with h5py.File(path, 'r+') as f:
    f['layers/conv2d_999/vars/0'] = np.zeros((1, 1, 8, 8), np.float32)
  with pytest.raises(ValueError, match=r'extra\.weights\.h5.*layers/conv2d_999'):
    models.load_pretrained(tiny_model(), path)


def test_format_errors(tiny, tmp_path):
  model = tiny_model()

  text = tmp_path / 'weights.h5'
  text.write_text('not weights')
  with pytest.raises(ValueError, match=f'{text}: not an HDF5 file'):
    models.load_pretrained(model, text)

  empty = tmp_path / 'empty.h5'
  with h5py.File(empty, 'w') as f:
    f['data'] = np.zeros(3)
  with pytest.raises(ValueError, match=f'{empty}: .*no layer_names'):
    models.load_pretrained(model, empty)

  no_names = copy_file(tiny['legacy'], tmp_path, 'no_names.h5')
  with h5py.File(no_names, 'r+') as f:
    del f['stem_bn'].attrs['weight_names']
  with pytest.raises(ValueError, match="no_names.h5: layer 'stem_bn' has no weight_names"):
    models.load_pretrained(model, no_names)

  renamed = copy_file(tiny['legacy'], tmp_path, 'renamed.h5')
  with h5py.File(renamed, 'r+') as f:
    f['stem_bn'].attrs['weight_names'] = [b'stem_bn/gamma', b'stem_bn/beta',
                                          b'stem_bn/moving_mean', b'stem_bn/mystery']
    f['stem_bn/stem_bn/mystery'] = f['stem_bn/stem_bn/moving_variance'][()]
  with pytest.raises(ValueError,
                     match="renamed.h5: layer 'stem_bn' has an unknown weight 'mystery'"):
    models.load_pretrained(model, renamed)


def test_full_model_h5_and_keras2_weight_names(tiny, tmp_path):
  """Weights under `model_weights`, named as Keras 2 wrote them ('.../kernel:0')."""
  path = str(tmp_path / 'full_model.h5')
  with h5py.File(tiny['legacy'], 'r') as src, h5py.File(path, 'w') as dst:
    src.copy(src['/'], dst, name='model_weights')
    root = dst['model_weights']
    for layer in root:
      group = root[layer]
      names = [n.decode() if isinstance(n, bytes) else str(n)
               for n in group.attrs.get('weight_names', [])]
      for name in names:
        keras2 = name + ':0'
        if name.endswith('dwconv/kernel'):
          keras2 = name.replace('/kernel', '/depthwise_kernel:0')
        group.move(name, keras2)
      if names:
        group.attrs['weight_names'] = [
            (n.replace('/kernel', '/depthwise_kernel') if n.endswith('dwconv/kernel') else n)
            .encode() + b':0' for n in names]
  model = tiny_model()
  loaded = keras_weights.read_keras_efficientnet(path, model)
  direct = keras_weights.read_keras_efficientnet(tiny['legacy'], model)
  assert sorted(loaded) == sorted(direct)
  for key in direct:
    np.testing.assert_array_equal(loaded[key], direct[key], err_msg='/'.join(key))


# ---------------------------------------------------------------------------
# Precision and training mode.


def test_bfloat16_keeps_float32_params(tiny):
  model = tiny_model()
  variables = models.load_pretrained(model, tiny['legacy'])
  bf16 = model.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0),
                                            jnp.zeros((1, 64, 64, 3)), train=False))
  assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}
  images, keras_logits, _ = tiny[64]
  logits, aux = apply(bf16, variables, images)
  assert logits.dtype == jnp.float32 and aux['embedding'].dtype == jnp.float32
  assert aux['features']['block3'].dtype == jnp.bfloat16
  assert np.all(np.isfinite(logits))
  # bfloat16 keeps ~3 significant digits; errors compound over the blocks.
  relative = np.linalg.norm(logits - keras_logits) / np.linalg.norm(keras_logits)
  print(f'tiny bf16: relative logits error {relative:.3f}')
  assert relative < 0.1


def test_train_mode_updates_batch_stats_and_drops():
  model = tiny_model()
  variables = weights.init_variables(model)
  images = jnp.asarray(random_images(64, seed=4, batch=4))

  @jax.jit
  def train_step(rng):
    return model.apply(variables, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': rng})

  (logits, _), updates = train_step(jax.random.PRNGKey(0))
  (other_logits, _), _ = train_step(jax.random.PRNGKey(1))
  assert set(updates) == {'batch_stats'}
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   updates['batch_stats'], variables['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))
  assert np.all(np.isfinite(logits))
  assert max_diff(logits, other_logits) > 0  # Dropout and drop-connect are active.


def test_remat_gives_the_same_loss_gradients_and_batch_stats():
  plain = tiny_model()
  remat = tiny_model(remat=True)
  variables = weights.init_variables(plain)
  # The tree (and so Keras weight loading) is unchanged by rematerialisation.
  assert (jax.tree.structure(jax.eval_shape(lambda: weights.init_variables(remat))) ==
          jax.tree.structure(variables))
  images = jnp.asarray(random_images(64, seed=6, batch=4))

  def loss_and_grads(model):
    def loss_fn(params):
      # Training mode: BatchNorm on batch statistics, dropout and drop-connect active
      # with the same key, which the rematerialised blocks must reuse when recomputing.
      (logits, _), updates = model.apply(
          {**variables, 'params': params}, images, train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(jnp.square(logits)), updates
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])

  (loss, stats), grads = loss_and_grads(plain)
  (remat_loss, remat_stats), remat_grads = loss_and_grads(remat)
  # As for BiT (test_bit.py): the loss to 1e-6, gradients and batch statistics to
  # float32 rounding through the network's depth.
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6, atol=1e-6)
  for tree, remat_tree in ((grads, remat_grads), (stats, remat_stats)):
    assert jax.tree.structure(remat_tree) == jax.tree.structure(tree)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))
    for (key, g), r in zip(jax.tree_util.tree_leaves_with_path(tree),
                           jax.tree.leaves(remat_tree)):
      np.testing.assert_allclose(r, g, rtol=0, atol=1e-5 * scale,
                                 err_msg=jax.tree_util.keystr(key))
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['block2a']))
