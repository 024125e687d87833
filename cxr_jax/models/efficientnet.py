"""EfficientNet B0-B7 and L2 (Tan & Le, 2019; Xie et al., 2020), as in Keras applications.

The computation matches `keras.applications.EfficientNetB*` layer for layer so the
published Keras weights load unchanged. Parameter scopes follow the Keras layer
names with the block prefix split off (Keras `block2a_se_reduce` is
`block2a/se_reduce` here), so loading them is a near-rename (see `keras_weights.py`).

Input: float images in [0, 255], shape [B, H, W, 3]; the model normalises them
itself with a mean/variance that is loaded from the weights file.
"""

import functools
import math
from typing import Any, FrozenSet, Iterator, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models.registry import MODELS

# ImageNet statistics used by Keras' EfficientNet (keras.src.applications.efficientnet).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STDDEV = (0.229, 0.224, 0.225)
IMAGENET_VARIANCE = tuple(s**2 for s in IMAGENET_STDDEV)

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3
NORMALIZATION_EPSILON = 1e-7  # keras.backend.epsilon(), the floor on the input stddev.
SE_RATIO = 0.25
DEPTH_DIVISOR = 8
STEM_FILTERS = 32
TOP_FILTERS = 1280

# Keras' initialisers, so that layers trained from scratch start as in the reference.
# The depthwise kernel is stored here as (k, k, 1, C) rather than Keras' (k, k, C, 1),
# so Keras' fan_out (k * k) is our fan_in.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'truncated_normal')
dense_init = nn.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform')


class BlockGroup(NamedTuple):
  kernel_size: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int


# The B0 baseline (EfficientNet paper, Table 1); every variant scales these.
BLOCK_GROUPS = (
    BlockGroup(3, 1, 32, 16, 1, 1),
    BlockGroup(3, 2, 16, 24, 6, 2),
    BlockGroup(5, 2, 24, 40, 6, 2),
    BlockGroup(3, 3, 40, 80, 6, 2),
    BlockGroup(5, 3, 80, 112, 6, 1),
    BlockGroup(5, 4, 112, 192, 6, 2),
    BlockGroup(3, 1, 192, 320, 6, 1),
)

# name: (width_coefficient, depth_coefficient, resolution, dropout_rate), as published
# (Keras applications for B0-B7; Noisy Student, Xie et al. 2020, for L2).
VARIANTS = {
    'b0': (1.0, 1.0, 224, 0.2),
    'b1': (1.0, 1.1, 240, 0.2),
    'b2': (1.1, 1.2, 260, 0.3),
    'b3': (1.2, 1.4, 300, 0.3),
    'b4': (1.4, 1.8, 380, 0.4),
    'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5),
    'b7': (2.0, 3.1, 600, 0.5),
    'l2': (4.3, 5.3, 800, 0.5),
}

# Default input resolution of each registered model name.
RESOLUTION = {f'efficientnet-{v}': spec[2] for v, spec in VARIANTS.items()}
RESOLUTION['efficientnet-tiny'] = 64


def round_filters(filters: int, width_coefficient: float) -> int:
  """Scales a width to the nearest multiple of 8, never more than 10% below target."""
  filters *= width_coefficient
  rounded = max(DEPTH_DIVISOR,
                int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
  if rounded < 0.9 * filters:
    rounded += DEPTH_DIVISOR
  return int(rounded)


def round_repeats(repeats: int, depth_coefficient: float) -> int:
  return int(math.ceil(depth_coefficient * repeats))


class BlockSpec(NamedTuple):
  name: str  # Keras' prefix, e.g. 'block2b'.
  group: int  # 0-based index into BLOCK_GROUPS.
  index: int  # 0-based position among all blocks; sets the drop-connect rate.
  kernel_size: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int


def block_specs(width_coefficient: float, depth_coefficient: float) -> Tuple[BlockSpec, ...]:
  """All blocks of a variant in order; only a group's first block strides or widens."""
  specs = []
  for g, group in enumerate(BLOCK_GROUPS):
    filters_in = round_filters(group.filters_in, width_coefficient)
    filters_out = round_filters(group.filters_out, width_coefficient)
    for j in range(round_repeats(group.repeats, depth_coefficient)):
      specs.append(BlockSpec(
          name=f'block{g + 1}{chr(ord("a") + j)}', group=g, index=len(specs),
          kernel_size=group.kernel_size,
          filters_in=filters_in if j == 0 else filters_out, filters_out=filters_out,
          expand_ratio=group.expand_ratio, strides=group.strides if j == 0 else 1))
  return tuple(specs)


def keras_layers(width_coefficient: float, depth_coefficient: float
                 ) -> Iterator[Tuple[str, str]]:
  """Yields (layer name, class name) of the Keras model's weighted layers in creation order.

  Keras 3 `.weights.h5` files name layers by class and creation order rather than by
  layer name, so reading them needs this order. It covers the full model with its
  classifier, whatever this module's `truncate` and `num_classes`.
  """
  yield 'normalization', 'Normalization'
  yield 'stem_conv', 'Conv2D'
  yield 'stem_bn', 'BatchNormalization'
  for spec in block_specs(width_coefficient, depth_coefficient):
    if spec.expand_ratio != 1:
      yield f'{spec.name}_expand_conv', 'Conv2D'
      yield f'{spec.name}_expand_bn', 'BatchNormalization'
    yield f'{spec.name}_dwconv', 'DepthwiseConv2D'
    yield f'{spec.name}_bn', 'BatchNormalization'
    yield f'{spec.name}_se_reduce', 'Conv2D'
    yield f'{spec.name}_se_expand', 'Conv2D'
    yield f'{spec.name}_project_conv', 'Conv2D'
    yield f'{spec.name}_project_bn', 'BatchNormalization'
  yield 'top_conv', 'Conv2D'
  yield 'top_bn', 'BatchNormalization'
  yield 'predictions', 'Dense'


class InputNormalization(nn.Module):
  """Keras' stem preprocessing: x / 255, then (x - mean) / stddev per channel.

  mean and variance live in the 'constants' collection so that the weights file
  supplies them (Keras stores them as the `normalization` layer's weights).
  """
  mean: Sequence[float] = IMAGENET_MEAN
  variance: Sequence[float] = IMAGENET_VARIANCE
  # Keras builds the ImageNet-weights model with an extra Rescaling(1 / sqrt(stddev))
  # here (github.com/tensorflow/tensorflow/issues/49930); the published weights expect
  # it, a Keras model built with weights=None does not have it.
  imagenet_rescale: bool = True

  @nn.compact
  def __call__(self, images):
    mean = self.variable('constants', 'mean',
                         lambda: jnp.asarray(self.mean, jnp.float32)).value
    variance = self.variable('constants', 'variance',
                             lambda: jnp.asarray(self.variance, jnp.float32)).value
    x = images.astype(jnp.float32) * (1.0 / 255.0)
    x = (x - mean) / jnp.maximum(jnp.sqrt(variance), NORMALIZATION_EPSILON)
    if self.imagenet_rescale:
      x = x * jnp.asarray([1.0 / math.sqrt(s) for s in IMAGENET_STDDEV], jnp.float32)
    return x


def _conv(features, kernel_size, name, strides=1, use_bias=False, dtype=jnp.float32):
  # TF 'SAME' padding equals Keras' ZeroPadding2D(correct_pad) + 'valid' on strided convs.
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding='SAME',
                 use_bias=use_bias, kernel_init=conv_init, dtype=dtype, name=name)


def _batch_norm(train, name, dtype):
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, name=name)


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def shifted_depthwise(x, kernel, strides: int):
  """Depthwise conv as a fused sum of k*k shifted products (TF SAME padding)."""
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  oh, ow = -(-h // strides), -(-w // strides)
  x = jnp.pad(x, ((0, 0), _same_padding(h, kh, strides), _same_padding(w, kw, strides),
                  (0, 0)))
  out = 0
  for i in range(kh):
    for j in range(kw):
      window = x[:, i:i + strides * (oh - 1) + 1:strides, j:j + strides * (ow - 1) + 1:strides]
      out = out + window * kernel[i, j, 0]
  return out


class DepthwiseConv(nn.Module):
  """Depthwise conv, kernel stored (k, k, 1, C) as a grouped nn.Conv would store it.

  XLA:CPU runs grouped convolutions hundreds of times below its matmul rate; there a
  fused sum of shifted products is 10-17x faster forward and ~8x for gradients
  (BENCHMARKS.md). Accelerators use the convolution. 'auto' picks by backend.
  """
  kernel_size: int
  strides: int = 1
  impl: str = 'auto'  # 'auto' | 'conv' | 'shifted'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param('kernel', depthwise_init,
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    impl = self.impl
    if impl == 'auto':
      impl = 'shifted' if jax.default_backend() == 'cpu' else 'conv'
    if impl == 'shifted':
      return shifted_depthwise(x, kernel, self.strides)
    if impl != 'conv':
      raise ValueError(f"depthwise_impl={self.impl!r}; expected 'auto', 'conv' or 'shifted'.")
    return jax.lax.conv_general_dilated(
        x, kernel, (self.strides, self.strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


class MBConvBlock(nn.Module):
  """Inverted residual: expand 1x1 -> depthwise -> squeeze-excite -> project 1x1."""
  kernel_size: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int
  drop_rate: float = 0.0
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs, train: bool = False):
    filters = self.filters_in * self.expand_ratio
    x = inputs
    if self.expand_ratio != 1:
      x = _conv(filters, 1, 'expand_conv', dtype=self.dtype)(x)
      x = nn.swish(_batch_norm(train, 'expand_bn', self.dtype)(x))

    x = DepthwiseConv(self.kernel_size, self.strides, self.depthwise_impl, self.dtype,
                      name='dwconv')(x)
    x = nn.swish(_batch_norm(train, 'bn', self.dtype)(x))

    # The squeeze width follows the block input, not the expanded width.
    filters_se = max(1, int(self.filters_in * SE_RATIO))
    se = jnp.mean(x, axis=(1, 2), keepdims=True)
    se = nn.swish(_conv(filters_se, 1, 'se_reduce', use_bias=True, dtype=self.dtype)(se))
    se = nn.sigmoid(_conv(filters, 1, 'se_expand', use_bias=True, dtype=self.dtype)(se))
    x = x * se

    x = _conv(self.filters_out, 1, 'project_conv', dtype=self.dtype)(x)
    x = _batch_norm(train, 'project_bn', self.dtype)(x)
    if self.strides == 1 and self.filters_in == self.filters_out:
      if self.drop_rate > 0:
        # Drop-connect: drops the residual branch of whole samples.
        x = nn.Dropout(self.drop_rate, broadcast_dims=(1, 2, 3),
                       deterministic=not train, name='drop')(x)
      x = x + inputs
    return x


class EfficientNet(nn.Module):
  """EfficientNet; `truncate` removes that many final block groups (and the top conv)."""
  width_coefficient: float = 1.0
  depth_coefficient: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  num_classes: Optional[int] = None
  truncate: int = 0
  dtype: Any = jnp.float32
  input_mean: Sequence[float] = IMAGENET_MEAN
  input_variance: Sequence[float] = IMAGENET_VARIANCE
  # True for the published ImageNet weights; False for weights of a Keras model that
  # was built with weights=None (see InputNormalization).
  keras_imagenet_rescale: bool = True
  depthwise_impl: str = 'auto'  # See DepthwiseConv: 'conv' or 'shifted' force one.
  # Recompute each MBConv block's activations in the backward pass instead of storing
  # them: less memory for more compute (BENCHMARKS.md, memory at scale).
  remat: bool = False

  weights_format = 'keras_h5'
  head_scope = 'predictions'  # Where the classifier lives.
  after_body_scopes = ()  # Truncation drops the top conv rather than resizing it.

  def removed_scopes(self) -> FrozenSet[str]:
    """Top-level parameter scopes of the full network that truncation removed."""
    if not self.truncate:
      return frozenset()
    kept_groups = len(BLOCK_GROUPS) - self.truncate
    specs = block_specs(self.width_coefficient, self.depth_coefficient)
    return frozenset({s.name for s in specs if s.group >= kept_groups} | {'top_conv', 'top_bn'})

  def keras_layers(self) -> Iterator[Tuple[str, str]]:
    """The weighted layers of the equivalent full Keras model, in creation order."""
    return keras_layers(self.width_coefficient, self.depth_coefficient)

  @nn.compact
  def __call__(self, images, train: bool = False):
    num_groups = len(BLOCK_GROUPS)
    if not 0 <= self.truncate < num_groups:
      raise ValueError(f'truncate={self.truncate}: EfficientNet has {num_groups} block '
                       f'groups; remove between 0 and {num_groups - 1}.')
    kept_groups = num_groups - self.truncate
    features = {}

    x = InputNormalization(self.input_mean, self.input_variance,
                           self.keras_imagenet_rescale, name='normalization')(images)
    x = x.astype(self.dtype)
    x = _conv(round_filters(STEM_FILTERS, self.width_coefficient), 3, 'stem_conv',
              strides=2, dtype=self.dtype)(x)
    x = nn.swish(_batch_norm(train, 'stem_bn', self.dtype)(x))
    features['stem'] = x

    specs = block_specs(self.width_coefficient, self.depth_coefficient)
    # `train` (argument 2, counting the module) is a Python bool that picks BatchNorm's
    # and dropout's mode, so it must stay static. nn.remat keeps the block's name.
    block = nn.remat(MBConvBlock, static_argnums=(2,)) if self.remat else MBConvBlock
    for spec in specs:
      if spec.group >= kept_groups:
        break
      # Rates grow with depth over the full network, so truncation keeps them as is.
      x = block(spec.kernel_size, spec.filters_in, spec.filters_out,
                spec.expand_ratio, spec.strides,
                drop_rate=self.drop_connect_rate * spec.index / len(specs),
                depthwise_impl=self.depthwise_impl, dtype=self.dtype,
                name=spec.name)(x, train)
      features[f'block{spec.group + 1}'] = x

    if not self.truncate:
      x = _conv(round_filters(TOP_FILTERS, self.width_coefficient), 1, 'top_conv',
                dtype=self.dtype)(x)
      x = nn.swish(_batch_norm(train, 'top_bn', self.dtype)(x))
      features['top'] = x

    embedding = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = None
    if self.num_classes:
      x = nn.Dropout(self.dropout_rate, deterministic=not train, name='top_dropout')(
          embedding)
      logits = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=jnp.float32,
                        name='predictions')(x)
    return logits, {'embedding': embedding, 'features': features}


def _register():
  for variant, (width, depth, _, dropout) in VARIANTS.items():
    MODELS.add(f'efficientnet-{variant}', functools.partial(
        EfficientNet, width_coefficient=width, depth_coefficient=depth,
        dropout_rate=dropout, num_classes=1000))
  # Every group a single block, 8-32 channels wide: for tests and CPU quickstarts.
  MODELS.add('efficientnet-tiny', functools.partial(
      EfficientNet, width_coefficient=0.25, depth_coefficient=0.25, dropout_rate=0.2))


_register()
