"""BiT: parity with an independent NumPy forward pass, published key layout, loader errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxr_jax import models
from cxr_jax.models import bit
from cxr_jax.train import config_lib

# ---------------------------------------------------------------------------
# Published-layout weight files, built from the naming scheme of the released
# BiT .npz files (github.com/google-research/big_transfer), not from the module.


def published_shapes(units, width, num_classes):
  """Key -> shape of a released BiT file for a ResNet-v2 with these units/width."""
  root = int(64 * width)
  shapes = {'resnet/root_block/standardized_conv2d/kernel': (7, 7, 3, root)}
  cin = root
  for b, n in enumerate(units):
    mid = root * 2**b
    for u in range(n):
      p = f'resnet/block{b + 1}/unit{u + 1:02d}/'
      shapes[p + 'a/group_norm/gamma'] = shapes[p + 'a/group_norm/beta'] = (cin,)
      shapes[p + 'a/standardized_conv2d/kernel'] = (1, 1, cin, mid)
      shapes[p + 'b/group_norm/gamma'] = shapes[p + 'b/group_norm/beta'] = (mid,)
      shapes[p + 'b/standardized_conv2d/kernel'] = (3, 3, mid, mid)
      shapes[p + 'c/group_norm/gamma'] = shapes[p + 'c/group_norm/beta'] = (mid,)
      shapes[p + 'c/standardized_conv2d/kernel'] = (1, 1, mid, 4 * mid)
      if u == 0:
        shapes[p + 'a/proj/standardized_conv2d/kernel'] = (1, 1, cin, 4 * mid)
      cin = 4 * mid
  shapes['resnet/group_norm/gamma'] = shapes['resnet/group_norm/beta'] = (cin,)
  if num_classes:
    shapes['resnet/head/conv2d/kernel'] = (1, 1, cin, num_classes)
    shapes['resnet/head/conv2d/bias'] = (num_classes,)
  return shapes


def random_weights(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith('gamma'):
      out[key] = 1 + 0.2 * rng.standard_normal(shape)
    elif key.endswith(('beta', 'bias')):
      out[key] = 0.2 * rng.standard_normal(shape)
    else:
      out[key] = rng.standard_normal(shape) * (0.05 if 'head' in key else 1.0)
  return {k: v.astype(np.float32) for k, v in out.items()}


# ---------------------------------------------------------------------------
# Independent reference: float64 NumPy, straight from the paper's description.


def np_conv(x, w, stride=1, pad=0):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ w[i, j]
  return out


def np_std_conv(x, w, stride=1, pad=0):
  w = w.astype(np.float64)
  w = (w - w.mean(axis=(0, 1, 2))) / np.sqrt(w.var(axis=(0, 1, 2)) + 1e-10)
  return np_conv(x, w, stride, pad)


def np_gn_relu(x, gamma, beta, groups=32, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  x = ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * gamma + beta
  return np.maximum(x, 0)


def np_bit_forward(weights, units, images):
  w = lambda k: weights['resnet/' + k].astype(np.float64)
  x = np_std_conv(images.astype(np.float64), w('root_block/standardized_conv2d/kernel'), 2, 3)
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, not -inf
  ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  x = np.max([x[:, i:i + 2 * ho:2, j:j + 2 * wo:2] for i in range(3) for j in range(3)], axis=0)
  for b, n in enumerate(units):
    for u in range(n):
      p = f'block{b + 1}/unit{u + 1:02d}/'
      stride = 2 if (b > 0 and u == 0) else 1
      a = np_gn_relu(x, w(p + 'a/group_norm/gamma'), w(p + 'a/group_norm/beta'))
      shortcut = x
      if u == 0:
        shortcut = np_std_conv(a, w(p + 'a/proj/standardized_conv2d/kernel'), stride)
      y = np_std_conv(a, w(p + 'a/standardized_conv2d/kernel'))
      y = np_gn_relu(y, w(p + 'b/group_norm/gamma'), w(p + 'b/group_norm/beta'))
      y = np_std_conv(y, w(p + 'b/standardized_conv2d/kernel'), stride, 1)
      y = np_gn_relu(y, w(p + 'c/group_norm/gamma'), w(p + 'c/group_norm/beta'))
      x = np_std_conv(y, w(p + 'c/standardized_conv2d/kernel')) + shortcut
  x = np_gn_relu(x, w('group_norm/gamma'), w('group_norm/beta'))
  embedding = x.mean(axis=(1, 2))
  logits = embedding @ w('head/conv2d/kernel')[0, 0] + w('head/conv2d/bias')
  return logits, embedding


SMALL_UNITS = (2, 2, 2, 2)  # 'bit-small': two units per stage covers identity shortcuts too.


@pytest.fixture(scope='module')
def small_npz(tmp_path_factory):
  weights = random_weights(published_shapes(SMALL_UNITS, 0.5, num_classes=5))
  path = tmp_path_factory.mktemp('bit') / 'bit_small.npz'
  np.savez(path, **weights)
  return path, weights


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  """'bit-tiny' (one unit per stage): cheap to compile, for the loader's rules."""
  weights = random_weights(published_shapes((1, 1, 1, 1), 0.5, num_classes=5), seed=3)
  path = tmp_path_factory.mktemp('bit') / 'bit_tiny.npz'
  np.savez(path, **weights)
  return path, weights


@pytest.mark.parametrize('size', [64, 50])  # 50 is odd after the root stride: padding matters.
def test_forward_matches_numpy_reference(small_npz, size):
  path, weights = small_npz
  model = models.get_model('bit-small', num_classes=5)
  variables = models.load_pretrained(model, path)
  images = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  ref_logits, ref_embedding = np_bit_forward(weights, SMALL_UNITS, images)
  assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4
  assert np.abs(np.asarray(aux['embedding']) - ref_embedding).max() <= 1e-4
  assert aux['embedding'].shape == (2, 1024)
  assert set(aux['features']) == {'root', 'block1', 'block2', 'block3', 'block4'}


@pytest.mark.parametrize('name,units,width,classes', [
    ('bit-m-r50x1', bit.UNITS[50], 1, 21843),
    ('bit-s-r101x3', bit.UNITS[101], 3, 1000),
    ('bit-m-r152x4', bit.UNITS[152], 4, 21843),
])
@pytest.mark.parametrize('remat', [False, True])
def test_parameter_tree_matches_published_layout(name, units, width, classes, remat):
  model = models.get_model(name, remat=remat)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))['params']
  flat = {'resnet/' + '/'.join(k): v.shape
          for k, v in __import__('flax').traverse_util.flatten_dict(shapes).items()}
  assert flat == published_shapes(units, width, classes)


def test_default_head_is_zero_initialised():
  model = models.get_model('bit-tiny', num_classes=3)
  variables = models.weights.init_variables(model)
  assert not np.any(variables['params']['head']['conv2d']['kernel'])


def test_head_policies(tiny_npz):
  path, weights = tiny_npz
  head = 'resnet/head/conv2d/kernel'
  kept = models.load_pretrained(models.get_model('bit-tiny', num_classes=5), path)
  np.testing.assert_array_equal(kept['params']['head']['conv2d']['kernel'], weights[head])
  replaced = models.load_pretrained(models.get_model('bit-tiny', num_classes=5), path,
                                    head='replace')
  assert not np.any(replaced['params']['head']['conv2d']['kernel'])
  other = models.load_pretrained(models.get_model('bit-tiny', num_classes=7), path)
  assert other['params']['head']['conv2d']['kernel'].shape == (1, 1, 1024, 7)
  with pytest.raises(ValueError, match='head/conv2d/kernel'):
    models.load_pretrained(models.get_model('bit-tiny', num_classes=7), path, head='keep')
  dropped = models.load_pretrained(models.get_model('bit-tiny', num_classes=None), path)
  assert 'head' not in dropped['params']
  logits, aux = jax.jit(models.get_model('bit-tiny', num_classes=None).apply)(
      dropped, jnp.zeros((1, 32, 32, 3)))
  assert logits is None and aux['embedding'].shape == (1, 1024)


def test_all_key_problems_reported_in_one_error(tiny_npz, tmp_path):
  _, weights = tiny_npz
  broken = dict(weights)
  del broken['resnet/block2/unit01/b/group_norm/gamma']
  del broken['resnet/block3/unit01/c/standardized_conv2d/kernel']
  broken['resnet/block1/unit01/a/extra/kernel'] = np.zeros(3, np.float32)
  broken['resnet/root_block/standardized_conv2d/kernel'] = np.zeros((7, 7, 3, 64), np.float32)
  path = tmp_path / 'broken.npz'
  np.savez(path, **broken)
  with pytest.raises(ValueError) as err:
    models.load_pretrained(models.get_model('bit-tiny', num_classes=5), path)
  message = str(err.value)
  for expected in [str(path), 'missing (2)', 'block2/unit01/b/group_norm/gamma',
                   'block3/unit01/c/standardized_conv2d/kernel', 'unexpected (1)',
                   'block1/unit01/a/extra/kernel', 'mis-shaped (1)',
                   'root_block/standardized_conv2d/kernel: file (7, 7, 3, 64) vs model '
                   '(7, 7, 3, 32)']:
    assert expected in message


def test_rejects_pickles_and_foreign_files(tmp_path):
  model = models.get_model('bit-tiny')
  pickled = tmp_path / 'pickled.npz'
  np.savez(pickled, **{'resnet/x': np.array([{'a': 1}], dtype=object)})
  with pytest.raises(ValueError, match='pickled.npz'):
    models.load_pretrained(model, pickled)
  foreign = tmp_path / 'foreign.npz'
  np.savez(foreign, **{'conv1/weight': np.zeros(3)})
  with pytest.raises(ValueError, match=r'foreign.npz.*resnet/'):
    models.load_pretrained(model, foreign)
  with pytest.raises(FileNotFoundError, match='nowhere.npz'):
    models.load_pretrained(model, tmp_path / 'nowhere.npz')


def test_truncation_loads_kept_stages(tiny_npz):
  path, weights = tiny_npz
  model = models.get_model('bit-tiny', num_classes=None, truncate=1)
  variables = models.load_pretrained(model, path)
  params = variables['params']
  assert 'block4' not in params
  np.testing.assert_array_equal(params['block3']['unit01']['c']['standardized_conv2d']['kernel'],
                                weights['resnet/block3/unit01/c/standardized_conv2d/kernel'])
  assert params['group_norm']['gamma'].shape == (512,)  # fresh: width follows block3
  _, aux = jax.jit(model.apply)(variables, jnp.zeros((1, 64, 64, 3)))
  assert aux['embedding'].shape == (1, 512) and 'block4' not in aux['features']
  full = models.get_model('bit-tiny', num_classes=None)
  count = lambda m: sum(x.size for x in jax.tree.leaves(models.load_pretrained(m, path)))
  assert count(model) < count(full)
  with pytest.raises(ValueError, match='truncate=4'):
    jax.eval_shape(lambda: models.weights.init_variables(models.get_model('bit-tiny', truncate=4)))


def test_bfloat16_compute_keeps_float32_params(tiny_npz):
  path, _ = tiny_npz
  model32 = models.get_model('bit-tiny', num_classes=5)
  model16 = models.get_model('bit-tiny', num_classes=5, dtype=jnp.bfloat16)
  variables = models.load_pretrained(model16, path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  images = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  logits16, aux16 = jax.jit(model16.apply)(variables, images)
  logits32, _ = jax.jit(model32.apply)(variables, images)
  assert logits16.dtype == jnp.float32 and aux16['features']['block1'].dtype == jnp.bfloat16
  assert np.all(np.isfinite(logits16))
  np.testing.assert_allclose(logits16, logits32, atol=0.1 * np.abs(logits32).max())


def test_remat_gives_the_same_loss_and_gradients(small_npz):
  path, _ = small_npz
  config = config_lib.base_config()
  config.model_name = 'bit-small'
  config.model.num_classes = 5
  plain = models.build_model(config)
  config.model.remat = True
  remat = models.build_model(config)
  assert remat.remat and not plain.remat
  # The published file loads into the rematerialised model: its tree is the same.
  variables = models.load_pretrained(remat, path)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(jax.eval_shape(lambda: models.weights.init_variables(plain))))
  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, (2, 50, 50, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 2)

  def loss_and_grads(model):
    def loss_fn(params):
      logits, aux = model.apply({'params': params}, images, train=True)
      log_probs = jax.nn.log_softmax(logits)
      return (-jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1))
              + 1e-3 * jnp.mean(jnp.square(aux['embedding'])))
    return jax.jit(jax.value_and_grad(loss_fn))(variables['params'])

  loss, grads = loss_and_grads(plain)
  remat_loss, remat_grads = loss_and_grads(remat)
  # Rematerialisation recomputes the forward pass in the backward one: the same
  # arithmetic, but XLA fuses the two programs differently and may sum in another
  # order. The loss agrees to 1e-6; the gradient differs by float32 rounding carried
  # through the network's depth (measured: 1.5e-6 relative in L2, the largest entry
  # difference 1.4e-6 of the largest gradient), so gradients are held to 1e-5.
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
  assert optax.tree_utils.tree_norm(
      jax.tree.map(jnp.subtract, remat_grads, grads)) <= 1e-5 * optax.tree_utils.tree_norm(grads)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  for (key, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                         jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(r, g, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(key))
  # The comparison has teeth: every gradient but the zero-initialised head's is nonzero.
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['block1']))


def test_conv_impls_match_a_float64_reference_in_loss_and_gradients(tiny_npz):
  """'auto' (on CPU: 'matmul', im2col) computes what a convolution does.

  The reference is XLA's convolution in float64. Measured at size 50: float32 'matmul'
  gradients within 2e-6 of it; float32 'conv' gradients off by up to 1.3e-2 (4 % of a
  GroupNorm beta's gradient), so 'conv' in float32 cannot be the reference.
  """
  path, _ = tiny_npz
  # 50 px leaves odd sizes after the strided layers, where padding matters.
  images = np.random.default_rng(6).uniform(-1, 1, (2, 50, 50, 3))

  def loss_and_grads(conv_impl, dtype):
    model = models.get_model('bit-tiny', num_classes=5, conv_impl=conv_impl, dtype=dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype),
                          models.load_pretrained(model, path)['params'])

    def loss_fn(params):
      logits, aux = model.apply({'params': params}, jnp.asarray(images, dtype))
      return jnp.mean(jnp.square(logits)) + jnp.mean(jnp.square(aux['embedding']))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return np.asarray(loss, np.float64), jax.tree.map(lambda g: np.asarray(g, np.float64), grads)

  with jax.enable_x64(True):
    loss, grads = loss_and_grads('conv', jnp.float64)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads))
  auto_loss, auto_grads = loss_and_grads('auto', jnp.float32)
  np.testing.assert_allclose(auto_loss, loss, rtol=1e-5)
  for (key, g), a in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(auto_grads)):
    np.testing.assert_allclose(a, g, rtol=0, atol=2e-5 * scale, err_msg=jax.tree_util.keystr(key))
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads['block1']))


def test_channel_matmul_gradients_are_the_products_autodiff_gives():
  """Its hand-written backward pass computes what `jax.grad` of `jnp.dot` does."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  mine = jax.grad(loss(bit.channel_matmul), (0, 1))(x, w)
  reference = jax.grad(loss(jnp.dot), (0, 1))(x, w)
  for a, b in zip(mine, reference):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize('side, strides, forward_is_conv, input_grad_is_conv',
                         [(12, 2, True, False), (12, 1, True, True), (4, 1, False, False)])
def test_cpu_conv_uses_xla_convolution_only_where_it_is_fast(
    side, strides, forward_is_conv, input_grad_is_conv):
  """Forward alone: XLA's convolution (not on small maps). Under grad: the kernel gradient
  is always the products', the input gradient XLA's convolution only when unstrided."""
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, side, side, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
  padding = ((1, 1), (1, 1))
  conv = lambda x, w: bit.cpu_conv(x, w, strides, padding)
  products = lambda x, w: bit.conv_as_matmul(x, w, strides, padding)
  assert ('convolution' in jax.jit(conv).lower(x, w).as_text()) == forward_is_conv
  np.testing.assert_allclose(conv(x, w), products(x, w), rtol=0, atol=1e-5)
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  x_grad_hlo = jax.jit(jax.grad(loss(conv), 0)).lower(x, w).as_text()
  w_grad_hlo = jax.jit(jax.grad(loss(conv), 1)).lower(x, w).as_text()
  assert ('convolution' in x_grad_hlo) == input_grad_is_conv
  assert 'convolution' not in w_grad_hlo
  for a, b in zip(jax.grad(loss(conv), (0, 1))(x, w), jax.grad(loss(products), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_conv_as_matmul_exports_with_symbolic_height_and_width():
  """Strided 1x1 projections and padded strided 3x3 paths agree on symbolic sizes."""
  model = models.get_model('bit-tiny', conv_impl='matmul')
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  b, h, w = jax.export.symbolic_shape('b, h, w')
  exported = jax.export.export(jax.jit(lambda v, x: model.apply(v, x)[1]['embedding']))(
      variables, jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
  assert str(exported.out_avals[0].shape) == '(b, 1024)'


def test_unknown_conv_impl_is_named():
  model = models.get_model('bit-tiny', conv_impl='winograd')
  with pytest.raises(ValueError, match="conv_impl='winograd'.*'matmul'"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_registry_lists_names_on_unknown():
  with pytest.raises(KeyError, match='bit-m-r50x1'):
    models.get_model('bit-m-r51x1')
