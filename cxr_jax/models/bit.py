"""BiT: ResNet-v2 with GroupNorm and Weight Standardization (Kolesnikov et al., 2020).

The parameter tree mirrors the published BiT `.npz` files key for key (minus their
`resnet/` prefix), e.g. `block1/unit01/a/standardized_conv2d/kernel`, so loading
published weights is a rename-free unflatten (see `weights.py`).

Input: float images in [-1, 1] (BiT's `x / 127.5 - 1`), shape [B, H, W, 3].
"""

import functools
from typing import Any, FrozenSet, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models.registry import MODELS

# Published architecture constants (BiT paper; github.com/google-research/big_transfer).
WS_EPS = 1e-10
GN_GROUPS = 32
GN_EPS = 1e-5
UNITS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


# How a convolution is computed (`BiT.conv_impl`). 'conv' is XLA's convolution; 'matmul'
# is one matrix product over the kernel's shifted, strided views of the input (im2col),
# whose gradients are matrix products too: XLA:CPU computes convolution gradients several
# times slower than those (benchmarks/conv_impl.py), while accelerators' convolutions are
# fast and im2col would store kh*kw copies of each input for the backward pass. 'auto'
# picks per platform at lowering time (`jax.lax.platform_dependent`), so one exported
# program runs each where it is fast: on CPU `cpu_conv` (XLA's convolution where XLA:CPU
# is fast at it, the matrix products elsewhere), on other platforms 'conv'.
CONV_IMPLS = ('auto', 'conv', 'matmul')


def _explicit_padding(padding, kernel_size):
  """((top, bottom), (left, right)); 'SAME'/'VALID' only for 1x1 kernels, where both are 0."""
  if isinstance(padding, str):
    if kernel_size != (1, 1):
      raise ValueError(f'padding {padding!r} with kernel {kernel_size}: give explicit '
                       f'((top, bottom), (left, right)) padding.')
    return ((0, 0), (0, 0))
  return tuple(tuple(p) for p in padding)


@jax.custom_vjp
def channel_matmul(x, w):
  """x [..., K] @ w [K, N]: `jnp.dot`, with its gradients written as 2-D matrix products.

  Autodiff's kernel gradient contracts the cotangent with x over all leading axes at
  once; XLA:CPU then transposed the cotangent inside the fusion that sums the residual
  stream's gradients, which cost more than the matrix products themselves on BiT-R50
  (BENCHMARKS.md, "cxr_jax against PyTorch"). As [M, K]^T @ [M, N] the transpose falls on
  the stored activation instead.
  """
  return jnp.dot(x, w)


def _channel_matmul_fwd(x, w):
  return jnp.dot(x, w), (x, w)


def _channel_matmul_bwd(residuals, g):
  x, w = residuals
  w_grad = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))
  return jnp.dot(g, w.T), w_grad


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def conv_as_matmul(x, kernel, strides: int, padding):
  """The NHWC x HWIO convolution as one matrix product over strided slices (im2col).

  Output sizes are (padded - kernel) // stride + 1, written the same way for every
  kernel, so a strided 1x1 projection and a padded strided 3x3 path agree on
  symbolic sizes in shape-polymorphic export.
  """
  kh, kw, cin, cout = kernel.shape
  (top, bottom), (left, right) = _explicit_padding(padding, (kh, kw))
  if top or bottom or left or right:
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h = (x.shape[1] - kh) // strides + 1
  out_w = (x.shape[2] - kw) // strides + 1
  taps = [jax.lax.slice(x, (0, i, j, 0),
                        (x.shape[0], i + strides * (out_h - 1) + 1,
                         j + strides * (out_w - 1) + 1, cin),
                        (1, strides, strides, 1))
          for i in range(kh) for j in range(kw)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return channel_matmul(patches, kernel.reshape(kh * kw * cin, cout))


def _xla_conv(x, kernel, strides: int, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), _explicit_padding(padding, kernel.shape[:2]),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# Below this many rows or columns of input, XLA:CPU's convolution is slower than the
# product even forward (13x at BiT-tiny's last stride, 2x2 -> 1x1; benchmarks/conv_impl.py).
_SMALL_MAP = 7


def _known_small(shape) -> bool:
  """Whether an NHWC map has fewer than _SMALL_MAP rows or columns (symbolic sizes: no)."""
  return any(isinstance(d, int) and d < _SMALL_MAP for d in shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def cpu_conv(x, kernel, strides: int, padding):
  """The convolution as XLA:CPU computes it fastest: forward alone or with gradients.

  Without gradients (inference, embedding, export) a kh x kw kernel is XLA's
  convolution, which skips building im2col's patches (1.4-3x faster forward at
  BiT-R50's 56-px maps on the two CPUs measured). Under `jax.grad` the forward and the
  kernel gradient are `conv_as_matmul`'s matrix products, as XLA:CPU's kernel gradients
  are slow; an unstrided convolution's input gradient is XLA's convolution. Maps known
  to be small keep the products throughout.
  """
  if kernel.shape[:2] == (1, 1) or _known_small(x.shape):
    return conv_as_matmul(x, kernel, strides, padding)
  return _xla_conv(x, kernel, strides, padding)


def _cpu_conv_fwd(x, kernel, strides, padding):
  out, vjp = jax.vjp(functools.partial(conv_as_matmul, strides=strides, padding=padding),
                     x, kernel)
  return out, (vjp, kernel)


def _cpu_conv_bwd(strides, padding, residuals, g):
  # Where XLA's convolution replaces the products' input gradient below, jit drops the
  # unused product.
  vjp, kernel = residuals
  x_grad, kernel_grad = vjp(g)
  kh, kw = kernel.shape[:2]
  if strides == 1 and (kh, kw) != (1, 1) and not _known_small(g.shape):
    # An unstrided convolution's input gradient is itself one, with the kernel flipped
    # and its channels swapped: faster as XLA's convolution forward than as the product
    # and its col2im scatter (1.07x on BiT-R50's training step; BENCHMARKS.md).
    (top, bottom), (left, right) = padding
    x_grad = _xla_conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1,
                       ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))
  return x_grad, kernel_grad


cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


class StandardizedConv(nn.Module):
  """Conv whose kernel is standardized over (H, W, in) with biased variance."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Any = 'SAME'
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    if self.conv_impl not in CONV_IMPLS:
      raise ValueError(f'conv_impl={self.conv_impl!r}; expected one of {CONV_IMPLS}.')
    shape = (*self.kernel_size, x.shape[-1], self.features)
    # Standardization removes the kernel's scale, so a plain normal init suffices.
    kernel = self.param('kernel', nn.initializers.normal(1.0), shape, jnp.float32)
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(kernel - mean), axis=(0, 1, 2), keepdims=True)
    kernel = ((kernel - mean) / jnp.sqrt(var + WS_EPS)).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.kernel_size == (1, 1) and self.strides == 1:
      # A matrix product over channels whatever conv_impl says: as fast as the
      # convolution on accelerators, and it stores nothing extra.
      return channel_matmul(x, kernel[0, 0])
    padding = _explicit_padding(self.padding, self.kernel_size)
    impls = {'matmul': conv_as_matmul, 'conv': _xla_conv}
    if self.conv_impl in impls:
      return impls[self.conv_impl](x, kernel, self.strides, padding)
    cpu = functools.partial(cpu_conv, strides=self.strides, padding=padding)
    conv = functools.partial(_xla_conv, strides=self.strides, padding=padding)
    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=conv)


class GroupNorm(nn.Module):
  """GroupNorm with BiT's parameter names (gamma/beta) and two-pass float32 statistics.

  Statistics are reduced over space per channel first and then averaged within each
  group on the small [B, C] arrays, so the activation keeps its NHWC layout: grouping
  it as [..., groups, C/groups] made XLA:CPU transpose every activation twice.
  """
  num_groups: int = GN_GROUPS
  epsilon: float = GN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm {self.name}: {channels} channels are not divisible '
                       f'into {self.num_groups} groups.')
    gamma = self.param('gamma', nn.initializers.ones, (channels,), jnp.float32)
    beta = self.param('beta', nn.initializers.zeros, (channels,), jnp.float32)
    x = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    per_group = channels // self.num_groups

    def group_mean(per_channel):
      """[B, C] per-channel spatial means -> their group's mean, as [B, 1.., C]."""
      groups = per_channel.reshape(-1, self.num_groups, per_group).mean(-1, keepdims=True)
      groups = jnp.broadcast_to(groups, (*groups.shape[:-1], per_group))
      return groups.reshape(x.shape[0], *(1 for _ in spatial), channels)

    centred = x - group_mean(jnp.mean(x, axis=spatial))
    var = group_mean(jnp.mean(jnp.square(centred), axis=spatial))
    return (centred * (jax.lax.rsqrt(var + self.epsilon) * gamma) + beta).astype(self.dtype)


class _NamedConv(nn.Module):
  """Wraps a StandardizedConv under a scope name, as the published files nest it."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Any = 'SAME'
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    return StandardizedConv(self.features, self.kernel_size, self.strides, self.padding,
                            self.dtype, self.conv_impl, name='standardized_conv2d')(x)


class PreActConv(nn.Module):
  """GroupNorm -> ReLU -> conv; optionally also the projection shortcut of that input."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Any = 'SAME'
  projection_features: int = 0
  projection_strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    x = nn.relu(GroupNorm(dtype=self.dtype, name='group_norm')(x))
    projection = None
    if self.projection_features:
      projection = _NamedConv(self.projection_features, (1, 1), self.projection_strides,
                              dtype=self.dtype, conv_impl=self.conv_impl, name='proj')(x)
    y = StandardizedConv(self.features, self.kernel_size, self.strides, self.padding,
                         self.dtype, self.conv_impl, name='standardized_conv2d')(x)
    return y, projection


class BottleneckUnit(nn.Module):
  """Pre-activation bottleneck; the stride sits on the 3x3 conv, padded symmetrically."""
  mid_features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    out_features = 4 * self.mid_features
    needs_projection = x.shape[-1] != out_features or self.strides != 1
    conv = functools.partial(PreActConv, dtype=self.dtype, conv_impl=self.conv_impl)
    y, projection = conv(
        self.mid_features, (1, 1),
        projection_features=out_features if needs_projection else 0,
        projection_strides=self.strides, name='a')(x)
    y, _ = conv(self.mid_features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name='b')(y)
    y, _ = conv(out_features, (1, 1), name='c')(y)
    return y + (projection if needs_projection else x)


class Stage(nn.Module):
  num_units: int
  mid_features: int
  strides: int
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    # Rematerialised units keep only their input for the backward pass and recompute
    # the rest; nn.remat keeps the unit's name, so the parameter tree is unchanged.
    unit = nn.remat(BottleneckUnit) if self.remat else BottleneckUnit
    for i in range(self.num_units):
      x = unit(self.mid_features, self.strides if i == 0 else 1,
               dtype=self.dtype, conv_impl=self.conv_impl, name=f'unit{i + 1:02d}')(x)
    return x


class BiT(nn.Module):
  """ResNet-v2 as in BiT. `truncate` removes that many final stages (CheXtransfer)."""
  units: Sequence[int] = UNITS[50]
  width: float = 1
  num_classes: Optional[int] = None
  truncate: int = 0
  zero_head: bool = True
  dtype: Any = jnp.float32
  # Recompute each residual unit's activations in the backward pass instead of storing
  # them: less accelerator memory for one more forward pass per unit.
  remat: bool = False
  # How convolutions are computed: 'auto' (on CPU `cpu_conv`: XLA's convolution forward,
  # matrix products under grad; XLA's convolution elsewhere), 'conv' or 'matmul'; see
  # CONV_IMPLS. The same function, to float rounding.
  conv_impl: str = 'auto'

  # Where the classifier lives, and which parameters sit after the body (their
  # width follows the last kept stage, so truncation re-initialises them).
  weights_format = 'bit_npz'
  head_scope = 'head'
  after_body_scopes = ('group_norm',)

  def removed_scopes(self) -> FrozenSet[str]:
    """Top-level parameter scopes of the full network that truncation removed."""
    return frozenset(f'block{i + 1}' for i in range(len(self.units) - self.truncate,
                                                     len(self.units)))

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # BiT has no batch statistics and no dropout.
    if not 0 <= self.truncate < len(self.units):
      raise ValueError(f'truncate={self.truncate}: BiT has {len(self.units)} stages; '
                       f'remove between 0 and {len(self.units) - 1}.')
    features = {}
    x = _NamedConv(int(64 * self.width), (7, 7), 2, padding=((3, 3), (3, 3)),
                   dtype=self.dtype, conv_impl=self.conv_impl, name='root_block')(images)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    features['root'] = x
    for i, num_units in enumerate(self.units[:len(self.units) - self.truncate]):
      x = Stage(num_units, int(64 * self.width) * 2**i, 1 if i == 0 else 2,
                dtype=self.dtype, remat=self.remat, conv_impl=self.conv_impl,
                name=f'block{i + 1}')(x)
      features[f'block{i + 1}'] = x
    x = nn.relu(GroupNorm(dtype=self.dtype, name='group_norm')(x))
    embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = None
    if self.num_classes:
      logits = _Head(self.num_classes, self.zero_head, name='head')(embedding)
    return logits, {'embedding': embedding, 'features': features}


class _Head(nn.Module):
  """Linear classifier stored as BiT's 1x1 `head/conv2d` (kernel [1, 1, D, K])."""
  num_classes: int
  zero_init: bool = True

  @nn.compact
  def __call__(self, embedding):
    kernel_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    conv = nn.Conv(self.num_classes, (1, 1), kernel_init=kernel_init, name='conv2d')
    return conv(embedding[:, None, None, :])[:, 0, 0, :].astype(jnp.float32)


def _register():
  for depth, units in UNITS.items():
    for width in (1, 2, 3, 4):
      MODELS.add(f'bit-r{depth}x{width}',
                 functools.partial(BiT, units=units, width=width))
      if depth != 26:  # BiT-S was trained on ImageNet-1k, BiT-M on ImageNet-21k.
        MODELS.add(f'bit-s-r{depth}x{width}',
                   functools.partial(BiT, units=units, width=width, num_classes=1000))
        MODELS.add(f'bit-m-r{depth}x{width}',
                   functools.partial(BiT, units=units, width=width, num_classes=21843))
  # Small enough for tests and CPU quickstarts; 32 channels at the root keep GroupNorm(32).
  MODELS.add('bit-tiny', functools.partial(BiT, units=(1, 1, 1, 1), width=0.5))
  MODELS.add('bit-small', functools.partial(BiT, units=(2, 2, 2, 2), width=0.5))


_register()
