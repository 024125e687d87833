"""TF SavedModel export of a trained run, with its evaluation preprocessing inside the graph.

    python -m cxr_jax.export --workdir runs/probe --output exported/probe [--step N | --best]

The network is converted with `jax.experimental.jax2tf` (StableHLO inside an
XlaCallModule op, lowered for CPU, CUDA and TPU by default) and called on weights held
as `tf.Variable`s rather than graph constants: every signature shares one copy of the
weights (stored once under variables/), and a large backbone never meets the 2 GiB
limit of a graph protobuf. The batch dimension is symbolic, so one graph serves any
batch size.

Signatures (each returns `embedding` float32 [B, D]; a classifier run adds `logits`
[B, K] and, when the run names its findings, their sigmoid `probabilities`):

  serving_default, embed_images   float32 [B, H, W, 1] grayscale in [0, 1]
  embed_images_uint8 / _uint16    uint8 / uint16 [B, H, W, 1] grayscale
  embed_png                       tf.string [B]: encoded PNGs, 8- or 16-bit, each of
                                  its own size: gray, or a gray film stored as RGB(A)
                                  or palette (its channels must be equal)
  metadata                        no input; the metadata below as tensors

An image-text run (`inference.Model.has_text`) exports both towers. Its image
signatures also return `image_embedding` float32 [B, E], the L2-normalised projection
into the joint image-text space (what zero-shot scoring compares with prompts; the
backbone's `embedding` stays the input of probes), and one more signature:

  embed_text                      int32 token ids [B, L], 1 <= L <= the run's max_len
                                  (shorter rows are padded in the graph; the encoder
                                  ignores padding), ids in [0, vocab_size) ->
                                  `text_embedding` float32 [B, E], L2-normalised

A TF graph cannot run the `tokenizers` library, so tokenisation stays in Python: the
run's tokenizer file is stored as assets/cxr_jax_tokenizer.json and
`embed_texts(DIR, texts)` encodes with it and calls `embed_text`, agreeing with
`inference.Model.embed_texts` on the workdir (1e-4). The metadata's 'text' entry names
the tokenizer file, max_len, vocab_size, the joint size and the learnt `logit_scale`
(1 / temperature) that zero-shot scores need (`eval.zero_shot.zero_shot_scores`).

From Python, `tf.saved_model.load(DIR).embed_images(x)` takes any of those dtypes as
[B, H, W] or [B, H, W, 1] arrays of any H, W. The run's `config.data.pp_eval` runs
inside the graph on every input, so the SavedModel takes the same raw pixels as
`inference.Model.embed_arrays` and agrees with it (the tests hold them to 1e-4). A
pp_eval that crops before resizing is preceded by a resize to the training images'
size (`inference.Model.input_pp`, stored as the metadata's 'input_pp'), so a large film
is seen at the resolution and field of view of training, not through a small crop.

In-graph preprocessing. Each deterministic op of `data.transforms` has a TF version
here, written to reproduce the NumPy op bit for bit: `value_range` repeats its float32
arithmetic; `window` sorts each image and interpolates NumPy's 'linear' percentile in
float64 as NumPy does; crops and `rgb` are exact. `resize` reproduces OpenCV, which
the NumPy op calls: area averaging when neither side grows (INTER_AREA, both its
whole-factor path and its weighted path with OpenCV's float32 weights), bilinear
interpolation with half-pixel centres otherwise (INTER_LINEAR for float images,
INTER_LINEAR_EXACT's 8.8 / 16.16 fixed point for 8- and 16-bit images). 8- and
16-bit images are averaged in float64 and rounded half to even. Integer rounding is
where agreement is won or lost: one grey level moved by a rounding tie changes a small
network's embedding by more than 1e-4. So the NumPy op must resize integer images the
same reproducible way (float64 INTER_AREA, INTER_LINEAR_EXACT); OpenCV's plain
INTER_LINEAR on 8-bit images (SIMD-dependent 11-bit fixed point) and its float32
INTER_AREA sums cannot be reproduced by any other implementation, nor across machines.
tests/test_export.py checks `data.transforms` against OpenCV for this. An op with no
in-graph version (augmentations, `two_views`) stops the export naming it. A pp_eval
without a fixed-size op gives a model input whose height and width are symbolic too.

Metadata (findings, embedding size, pp_eval, model name, source workdir and step,
input size, the text side of image-text runs) is stored as
assets/cxr_jax_metadata.json, readable without TensorFlow by `read_metadata(DIR)`, and
as the `metadata` signature.

TensorFlow is imported here and only here (and in the embedding tool's SavedModel
path), never on the training path.
"""

import inspect
import json
import os
import re
import shutil
import sys
from typing import Any, Callable, Dict, Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from cxr_jax import cli
from cxr_jax import files
from cxr_jax import inference
from cxr_jax.data import transforms
from cxr_jax.registry import Registry
from cxr_jax.text import tokenizer as tokenizer_lib

METADATA_FILE = 'cxr_jax_metadata.json'
TOKENIZER_FILE = 'cxr_jax_tokenizer.json'
FORMAT = 'cxr_jax.export/1'
DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')
INPUT_DTYPES = {'float32': 'embed_images', 'uint8': 'embed_images_uint8',
                'uint16': 'embed_images_uint16'}

# Each factory takes the NumPy op's arguments, bound with that op's own defaults, and
# returns fn(images) on a batch [B, H, W, C] whose dtype is known when tracing.
GRAPH_OPS = Registry('in-graph preprocessing op')


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


# --- in-graph preprocessing ----------------------------------------------------------


def graph_preprocess(pp: str) -> Callable[[Any], Any]:
  """The TF version of a deterministic preprocessing string: fn(images [B, H, W, C]).

  Raises ValueError naming the op when one has no in-graph version.
  """
  checked = transforms.Preprocess(pp)  # The NumPy parser's errors, for bad arguments.
  if checked.num_views != 1:
    raise ValueError(f'{transforms.TWO_VIEWS} in {pp!r}: evaluation preprocessing must give '
                     'one image; it has no in-graph version.')
  ops = []
  for name, args, kwargs in (transforms.parse(pp) if pp.strip() else []):
    if name not in GRAPH_OPS:
      raise ValueError(
          f'Preprocessing op {name!r} in pp_eval {pp!r} has no in-graph version, so the run '
          f'cannot be exported. In-graph ops: {", ".join(GRAPH_OPS.names())}. Random '
          'augmentations do not belong in pp_eval.')
    bound = inspect.signature(transforms.OPS.get(name)).bind(*args, **kwargs)
    bound.apply_defaults()
    ops.append(GRAPH_OPS.get(name)(**bound.arguments))

  def fn(images):
    for op in ops:
      images = op(images)
    return images
  return fn


def _integer_range(dtype):
  info = np.iinfo(dtype.as_numpy_dtype)
  return info.min, info.max


def _to_dtype_rounded(values, dtype):
  """float64 values -> `dtype`: integers rounded half to even (as np.rint) and clipped."""
  tf = _tf()
  if not dtype.is_integer:
    return tf.cast(values, dtype)
  lo, hi = _integer_range(dtype)
  return tf.cast(tf.clip_by_value(tf.round(values), lo, hi), dtype)


@GRAPH_OPS.register('decode')
def _decode(channels):
  """Arrays pass through (already decoded); gray becomes RGB for channels=3."""
  def fn(images):
    if channels == 3 and images.shape[-1] == 1:
      return _gray_to_rgb(images)
    if channels == 1 and images.shape[-1] != 1:
      raise ValueError('decode(channels=1) of colour images has no in-graph version; the '
                       'exported signatures take grayscale images.')
    return images
  return fn


@GRAPH_OPS.register('value_range')
def _value_range(vmin, vmax, in_min, in_max):
  def fn(images):
    tf = _tf()
    lo, hi = _integer_range(images.dtype) if images.dtype.is_integer else (0.0, 1.0)
    lo = lo if in_min is None else in_min
    hi = hi if in_max is None else in_max
    # The same float32 operations, in the same order, as the NumPy op.
    scaled = (tf.cast(images, tf.float32) - np.float32(lo)) / np.float32(hi - lo)
    return scaled * np.float32(vmax - vmin) + np.float32(vmin)
  return fn


def _percentile(sorted_values, percent):
  """NumPy's default ('linear') percentile of each row of `sorted_values` [B, N], float64."""
  tf = _tf()
  n = tf.shape(sorted_values)[1]
  position = tf.cast(n - 1, tf.float64) * (np.float64(percent) / 100)
  below = tf.floor(position)
  fraction = position - below
  i = tf.cast(below, tf.int32)
  low = sorted_values[:, i]
  high = sorted_values[:, tf.minimum(i + 1, n - 1)]
  # NumPy's _lerp: the difference in the array's dtype, the rest in float64, from the
  # nearer end.
  difference = tf.cast(high - low, tf.float64)
  low, high = tf.cast(low, tf.float64), tf.cast(high, tf.float64)
  return tf.where(fraction >= 0.5, high - difference * (1 - fraction),
                  low + difference * fraction)


@GRAPH_OPS.register('window')
def _window(low_percentile, high_percentile):
  def fn(images):
    tf = _tf()
    images = tf.cast(images, tf.float32)
    flat = tf.sort(tf.reshape(images, [tf.shape(images)[0], -1]), axis=1)
    lo = _percentile(flat, low_percentile)[:, None, None, None]
    hi = _percentile(flat, high_percentile)[:, None, None, None]
    stretched = (tf.cast(images, tf.float64) - lo) / tf.maximum(hi - lo, 1e-6)
    return tf.cast(tf.clip_by_value(stretched, 0, 1), tf.float32)
  return fn


def _gray_to_rgb(images):
  return _tf().concat([images] * 3, axis=-1)  # tf.repeat (Tile) lacks uint16 kernels.


@GRAPH_OPS.register('rgb')
def _rgb():
  return lambda images: _gray_to_rgb(images) if images.shape[-1] == 1 else images


def _crop_size(size):
  height, width = (size, size) if np.isscalar(size) else tuple(size)
  return int(height), int(width)


@GRAPH_OPS.register('central_crop')
def _central_crop(size):
  height, width = _crop_size(size)

  def fn(images):
    tf = _tf()
    in_height, in_width = tf.shape(images)[1], tf.shape(images)[2]
    with tf.control_dependencies([tf.debugging.Assert(
        (in_height >= height) & (in_width >= width),
        [f'central_crop: cannot crop {height}x{width} from an image of size', in_height,
         in_width, '; resize first'])]):
      top, left = (in_height - height) // 2, (in_width - width) // 2
      return images[:, top:top + height, left:left + width]
  return fn


@GRAPH_OPS.register('resize')
def _resize_op(size):
  height, width = _crop_size(size)
  return lambda images: resize(images, height, width)


@GRAPH_OPS.register('resize_small')
def _resize_small(size):
  def fn(images):
    tf = _tf()
    in_height, in_width = tf.shape(images)[1], tf.shape(images)[2]
    scale = size / tf.cast(tf.minimum(in_height, in_width), tf.float64)
    # Python's round() in the NumPy op rounds half to even, like tf.round.
    height = tf.maximum(size, tf.cast(tf.round(tf.cast(in_height, tf.float64) * scale), tf.int32))
    width = tf.maximum(size, tf.cast(tf.round(tf.cast(in_width, tf.float64) * scale), tf.int32))
    return resize(images, height, width)
  return fn


@GRAPH_OPS.register('keep')
def _keep(keys):
  if 'image' not in keys:
    raise ValueError(f'keep{tuple(keys)} drops the image; nothing would be left to embed.')
  return lambda images: images


# --- resizing as OpenCV does it --------------------------------------------------------


def resize(images, height, width):
  """OpenCV-equivalent resize of [B, H, W, C] to `height` x `width` (ints or int32 tensors).

  Area averaging when neither side grows, bilinear interpolation otherwise; see the
  module docstring. The output keeps the input's dtype.
  """
  tf = _tf()
  in_height, in_width = tf.shape(images)[1], tf.shape(images)[2]
  shrinking = (height <= in_height) & (width <= in_width)
  out = tf.cond(shrinking, lambda: _resize_area(images, height, width),
                lambda: _resize_linear(images, height, width))
  static = [d if isinstance(d, int) else None for d in (height, width)]
  return tf.ensure_shape(out, [images.shape[0]] + static + [images.shape[-1]])


def _area_weights(in_size, out_size):
  """[out, in] float64 weights of OpenCV's INTER_AREA (computeResizeAreaTab).

  Each output cell covers `scale` input pixels starting at d * scale; a pixel's weight
  is its overlap with the cell over the cell's width, dropped below 1e-3 and rounded
  to float32 as OpenCV stores it.
  """
  tf = _tf()
  in_f, out_f = tf.cast(in_size, tf.float64), tf.cast(out_size, tf.float64)
  scale = in_f / out_f
  start = tf.range(out_f, dtype=tf.float64)[:, None] * scale
  end = start + scale
  cell = tf.minimum(scale, in_f - start)
  pixel = tf.range(in_f, dtype=tf.float64)[None, :]
  overlap = tf.minimum(pixel + 1, end) - tf.maximum(pixel, start)
  overlap = tf.where(overlap > 1e-3, overlap, tf.zeros_like(overlap))
  return tf.cast(tf.cast(overlap / cell, tf.float32), tf.float64)


def _resize_area(images, height, width):
  tf = _tf()
  in_height, in_width = tf.shape(images)[1], tf.shape(images)[2]
  values = tf.cast(images, tf.float64)

  def fast():  # Whole factors: OpenCV sums each block and scales by float32(1 / area).
    factor_y, factor_x = in_height // height, in_width // width
    shape = tf.shape(values)
    blocks = tf.reshape(values, [shape[0], height, factor_y, width, factor_x, shape[3]])
    area = tf.cast(factor_y * factor_x, tf.float64)
    inverse = tf.cast(tf.cast(1 / area, tf.float32), tf.float64)
    return tf.reduce_sum(blocks, axis=[2, 4]) * inverse

  def general():
    rows = tf.einsum('xw,bhwc->bhxc', _area_weights(in_width, width), values)
    return tf.einsum('yh,bhxc->byxc', _area_weights(in_height, height), rows)

  whole = (in_height % height == 0) & (in_width % width == 0)
  return _to_dtype_rounded(tf.cond(whole, fast, general), images.dtype)


def _linear_taps(in_size, out_size, fraction_bits: Optional[int]):
  """Source index and the two weights of each output position, as OpenCV computes them.

  Positions are float64 (OpenCV 5 computes them in double precision). fraction_bits=None:
  INTER_LINEAR for float images, float64 weights. fraction_bits=8/16: INTER_LINEAR_EXACT,
  weights rounded half to even to `fraction_bits` binary places, the first weight one
  minus the second.
  Positions left of the first pixel centre copy pixel 0, right of the last copy the
  last pixel.
  """
  tf = _tf()
  in_f, out_f = tf.cast(in_size, tf.float64), tf.cast(out_size, tf.float64)
  scale = 1 / (out_f / in_f)
  position = (tf.range(out_f, dtype=tf.float64) + 0.5) * scale - 0.5
  index = tf.floor(position)
  inside = (index >= 0) & (index < in_f - 1)
  clamped = tf.where(index < 0, tf.zeros_like(index), in_f - 1)
  source = tf.cast(tf.where(inside, index, clamped), tf.int32)
  if fraction_bits is None:
    second = tf.where(inside, position - index, tf.zeros_like(position))
    first = 1 - second
  else:
    one = 2.0 ** fraction_bits
    second = tf.where(inside, tf.round((position - index) * one), tf.zeros_like(position))
    second = tf.cast(second, tf.int64)
    first = tf.cast(one, tf.int64) - second
  return source, tf.minimum(source + 1, tf.cast(in_size, tf.int32) - 1), first, second


def _resize_linear(images, height, width):
  tf = _tf()
  in_height, in_width = tf.shape(images)[1], tf.shape(images)[2]
  bits = {tf.uint8: 8, tf.uint16: 16}.get(images.dtype) if images.dtype.is_integer else None
  if images.dtype.is_integer and bits is None:
    raise ValueError(f'resize: integer images must be uint8 or uint16, got {images.dtype.name}')
  values = tf.cast(images, tf.int64 if bits else tf.float64)
  x0, x1, wx0, wx1 = _linear_taps(in_width, width, bits)
  y0, y1, wy0, wy1 = _linear_taps(in_height, height, bits)
  horizontal = (tf.gather(values, x0, axis=2) * wx0[None, None, :, None]
                + tf.gather(values, x1, axis=2) * wx1[None, None, :, None])
  out = (tf.gather(horizontal, y0, axis=1) * wy0[None, :, None, None]
         + tf.gather(horizontal, y1, axis=1) * wy1[None, :, None, None])
  if bits is None:
    return tf.cast(out, images.dtype)
  # Both passes carry `bits` fraction bits; round half up, as OpenCV's fixed point does.
  shift = 2 * bits
  rounded = tf.bitwise.right_shift(out + (1 << (shift - 1)), shift)
  return tf.cast(tf.minimum(rounded, _integer_range(images.dtype)[1]), images.dtype)


# --- the SavedModel --------------------------------------------------------------------


def _png_depth_and_colour(png):
  """Bit depth and colour type from a PNG's IHDR chunk (bytes 24 and 25)."""
  tf = _tf()
  header = tf.io.decode_raw(tf.strings.substr(png, 24, 2), tf.uint8)
  return tf.cast(header[0], tf.int32), tf.cast(header[1], tf.int32)


def _metadata(model: inference.Model, input_shape, platforms) -> Dict[str, Any]:
  names = ['embedding']
  if model.has_logits:
    names.append('logits')
    if model.findings:
      names.append('probabilities')
  signatures = ['serving_default'] + list(INPUT_DTYPES.values()) + ['embed_png', 'metadata']
  text = {}
  if model.has_text:
    names.append('image_embedding')
    signatures.append('embed_text')
    text = {'tokenizer': TOKENIZER_FILE, 'max_len': model.text_max_len,
            'vocab_size': model.tokenizer.vocab_size, 'encoder': model.config.text.encoder,
            'joint_embedding_dim': model.joint_embedding_dim,
            'logit_scale': model.logit_scale, 'outputs': ['text_embedding']}
  return {
      'format': FORMAT, 'model_name': model.model_name, 'trainer': model.config.trainer,
      'embedding_dim': model.embedding_dim, 'has_logits': model.has_logits,
      'num_classes': model.num_classes, 'findings': list(model.findings),
      'pp_eval': model.pp_eval, 'input_pp': model.input_pp,
      'workdir': os.path.abspath(model.workdir) if model.workdir else '', 'step': model.step, 'model_input_shape': list(input_shape),
      'outputs': names, 'platforms': list(platforms), 'signatures': signatures,
      'has_text': model.has_text, 'text': text,
  }


class _Exported:
  """Builds the tf.Module that is saved: variables, the converted network, signatures."""

  def __init__(self, model: inference.Model, platforms: Sequence[str]):
    tf = _tf()
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
    self.model = model
    self.preprocess = graph_preprocess(model.input_pp)
    # The shape pp_eval gives a gray image; None where it depends on the input's size.
    probe = tf.function(self.preprocess, autograph=False).get_concrete_function(
        tf.TensorSpec([None, None, None, 1], tf.float32))
    self.input_shape = [d if d is None else int(d) for d in probe.output_shapes[1:]]
    height, width, channels = self.input_shape
    polymorphic = f'(b, {height or "h"}, {width or "w"}, {channels})'
    if channels is None:
      raise ValueError(f'pp_eval={model.pp_eval!r} leaves the channel count unknown.')
    converted = jax2tf.convert(
        lambda variables, images: inference.forward(
            model.network, model.has_logits, variables, images, joint=model.has_text),
        polymorphic_shapes=[None, polymorphic], with_gradient=False,
        native_serialization_platforms=tuple(platforms))
    self.module = tf.Module()
    self.module.variables_tree = tf.nest.map_structure(
        lambda x: tf.Variable(np.asarray(x), trainable=False), model.variables)
    self.module.network = tf.function(
        lambda images: converted(self.module.variables_tree, images), autograph=False,
        input_signature=[tf.TensorSpec([None] + self.input_shape, tf.float32)])
    if model.has_text:
      # Fixed length max_len: embed_text pads shorter inputs, which changes nothing (the
      # encoder masks padding), so one graph serves every length without symbolic
      # slicing of the position embedding.
      converted_text = jax2tf.convert(
          lambda variables, tokens: inference.text_forward(model.network, variables, tokens),
          polymorphic_shapes=[None, f'(b, {model.text_max_len})'], with_gradient=False,
          native_serialization_platforms=tuple(platforms))
      self.module.text_network = tf.function(
          lambda tokens: converted_text(self.module.variables_tree, tokens), autograph=False,
          input_signature=[tf.TensorSpec([None, model.text_max_len], tf.int32)])
    self.findings = tf.constant(list(model.findings), tf.string) if model.findings else None
    self.metadata = _metadata(model, self.input_shape, platforms)

  def outputs(self, preprocessed):
    tf = _tf()
    result = dict(self.module.network(tf.cast(preprocessed, tf.float32)))
    if 'logits' in result and self.model.findings:
      result['probabilities'] = tf.sigmoid(result['logits'])
    return result

  def embed_images(self, images):
    tf = _tf()
    if images.shape.rank == 3:
      images = images[..., None]
    if images.shape.rank != 4 or images.shape[-1] not in (1, None):
      raise ValueError(f'embed_images takes grayscale [B, H, W] or [B, H, W, 1], got '
                       f'{images.shape}')
    images = tf.ensure_shape(images, [None, None, None, 1])
    return self.outputs(self.preprocess(images))

  def embed_png(self, pngs):
    tf = _tf()

    def gray(png, colour, dtype):
      """The film as [H, W, 1]; a gray film stored as RGB(A) or palette must have equal
      channels (converting real colour to luma would embed what no detector made)."""
      def stored_gray():  # Colour types 0 and 4 (gray, gray + alpha; alpha dropped).
        return tf.io.decode_png(png, 1, dtype)

      def stored_colour():  # Types 2, 3 and 6: RGB, palette, RGBA (alpha dropped).
        rgb = tf.io.decode_png(png, 3, dtype)
        equal = tf.reduce_all(tf.equal(rgb[..., 0], rgb[..., 1])) & tf.reduce_all(
            tf.equal(rgb[..., 0], rgb[..., 2]))
        with tf.control_dependencies([tf.debugging.Assert(equal, [
            'embed_png takes grayscale films: this PNG (colour type', colour, ') has '
            'channels that differ, so it is a colour image, not a gray film stored as '
            'RGB; convert it to gray yourself if that is what you mean'])]):
          return tf.identity(rgb[..., :1])
      return tf.cond((colour == 0) | (colour == 4), stored_gray, stored_colour)

    def one(png):
      depth, colour = _png_depth_and_colour(png)
      eight = lambda: self.preprocess(gray(png, colour, tf.uint8)[None])
      sixteen = lambda: self.preprocess(gray(png, colour, tf.uint16)[None])
      return tf.cast(tf.cond(depth == 16, sixteen, eight), tf.float32)[0]

    images = tf.map_fn(one, pngs, fn_output_signature=tf.TensorSpec(
        self.input_shape, tf.float32))
    return self.outputs(images)

  def embed_text(self, tokens):
    tf = _tf()
    max_len, vocab_size = self.model.text_max_len, self.model.tokenizer.vocab_size
    length = tf.shape(tokens)[1]
    checks = [
        tf.debugging.Assert((length >= 1) & (length <= max_len), [
            f'embed_text takes 1 to max_len={max_len} token ids per text; got', length]),
        tf.debugging.Assert(tf.reduce_all((tokens >= 0) & (tokens < vocab_size)), [
            f'embed_text: token ids must lie in [0, {vocab_size}) (the tokenizer\'s '
            'vocabulary); got ids from', tf.reduce_min(tokens), 'to', tf.reduce_max(tokens)])]
    with tf.control_dependencies(checks):
      padded = tf.pad(tokens, [[0, 0], [0, tf.maximum(max_len - length, 0)]])
    return self.module.text_network(tf.ensure_shape(padded, [None, max_len]))

  def metadata_tensors(self):
    tf = _tf()
    out = {'json': tf.constant(json.dumps(self.metadata)),
           'embedding_dim': tf.constant(self.model.embedding_dim, tf.int32),
           'pp_eval': tf.constant(self.model.pp_eval),
           'model_name': tf.constant(self.model.model_name),
           'step': tf.constant(self.model.step, tf.int64)}
    out['findings'] = (self.findings if self.findings is not None
                       else tf.zeros([0], tf.string))
    if self.model.has_text:
      out['tokenizer_file'] = self.module.tokenizer_file.asset_path
      out['text_max_len'] = tf.constant(self.model.text_max_len, tf.int32)
      out['logit_scale'] = tf.constant(self.model.logit_scale, tf.float32)
    return out

  def save(self, directory: str) -> None:
    tf = _tf()
    module = self.module
    module.embed_images = tf.function(self.embed_images, autograph=False)
    signatures = {}
    for dtype_name, signature in INPUT_DTYPES.items():
      dtype = tf.as_dtype(dtype_name)
      module.embed_images.get_concrete_function(tf.TensorSpec([None, None, None], dtype))
      signatures[signature] = module.embed_images.get_concrete_function(
          tf.TensorSpec([None, None, None, 1], dtype, name='images'))
    signatures['serving_default'] = signatures['embed_images']
    module.embed_png = tf.function(self.embed_png, autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name='png')])
    signatures['embed_png'] = module.embed_png.get_concrete_function()
    assets = directory + '.assets'
    os.makedirs(assets, exist_ok=True)
    try:
      metadata_path = os.path.join(assets, METADATA_FILE)
      with open(metadata_path, 'w') as f:
        json.dump(self.metadata, f, indent=2)
      module.metadata_file = tf.saved_model.Asset(metadata_path)
      if self.model.has_text:
        tokenizer_path = os.path.join(assets, TOKENIZER_FILE)
        shutil.copyfile(self.model.tokenizer.path, tokenizer_path)
        module.tokenizer_file = tf.saved_model.Asset(tokenizer_path)
        module.embed_text = tf.function(self.embed_text, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32, name='tokens')])
        signatures['embed_text'] = module.embed_text.get_concrete_function()
      # After the assets: the metadata signature returns the tokenizer's asset path.
      module.metadata = tf.function(self.metadata_tensors, autograph=False,
                                    input_signature=[])
      signatures['metadata'] = module.metadata.get_concrete_function()
      tf.saved_model.save(module, directory, signatures=signatures)
    finally:
      shutil.rmtree(assets, ignore_errors=True)


def export_model(model: inference.Model, output: str, *,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS, overwrite: bool = False) -> str:
  """Writes `model` as a SavedModel to `output` (built aside, then moved into place)."""
  output = os.path.abspath(output)
  if os.path.exists(output) and not overwrite:
    raise FileExistsError(f'{output} exists; choose another --output or pass --overwrite.')
  staging = f'{output}.tmp-{os.getpid()}'
  _remove_stale_staging(output)
  try:
    _Exported(model, platforms).save(staging)
    if os.path.exists(output):
      shutil.rmtree(output)
    os.replace(staging, output)
  except OSError as e:
    if not files.is_write_failure(e):
      raise  # A missing tokenizer file, say: its message names it.
    raise files.failure(f'the SavedModel {output}', e) from e
  except Exception as e:  # TensorFlow reports a failed write as its own error types.
    if not isinstance(e, _tf().errors.OpError):
      raise
    message = ' '.join(str(e.message).split())
    raise OSError(f'Writing the SavedModel {output} failed: {message}. Nothing of it was '
                  'left behind; free space (or fix the cause) and re-run the same '
                  'command.') from e
  finally:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(staging + '.assets', ignore_errors=True)
  return output


def _remove_stale_staging(output: str) -> None:
  """Removes what exports into `output` killed outright (kill -9) left beside it."""
  parent, name = os.path.split(output)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    match = re.match(rf'^{re.escape(name)}\.tmp-(\d+)(\.assets)?$', entry)
    if not match:
      continue
    try:
      os.kill(int(match[1]), 0)  # Signal 0 only asks whether the writer still runs.
      continue
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except PermissionError:  # Someone else's live process.
      continue


def export_run(workdir: str, output: str, *, step: Optional[int] = None, best: bool = False,
               platforms: Sequence[str] = DEFAULT_PLATFORMS, overwrite: bool = False) -> str:
  """Exports the run in `workdir` (its latest, `step` or best checkpoint) to `output`."""
  return export_model(inference.load_run(workdir, step=step, best=best), output,
                      platforms=platforms, overwrite=overwrite)


def read_metadata(export_dir: str) -> Dict[str, Any]:
  """The metadata of an exported SavedModel, read without TensorFlow."""
  path = os.path.join(export_dir, 'assets', METADATA_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{export_dir} is not a cxr_jax SavedModel export: it has no '
                            f'assets/{METADATA_FILE}.')
  with open(path) as f:
    return json.load(f)


def is_export(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'saved_model.pb'))


def embed_texts(export_dir: str, texts: Sequence[str], *, batch_size: int = 32,
                loaded: Any = None) -> np.ndarray:
  """Texts -> float32 [N, E] L2-normalised text embeddings, through an export's embed_text.

  Tokenises in Python with the export's own tokenizer (its assets) and max_len, exactly
  as `inference.Model.embed_texts` does on the workdir, then calls the signature in
  batches padded to `batch_size`. `loaded`: the export already loaded with
  `tf.saved_model.load` (loaded again otherwise).

  Raises ValueError naming `export_dir` when it was not exported from an image-text run.
  """
  metadata = read_metadata(export_dir)
  if not metadata.get('has_text'):
    raise ValueError(
        f'{export_dir} is not an image-text run\'s export (exported from '
        f'{metadata.get("workdir") or "?"}, trainer {metadata.get("trainer")!r}): it has no '
        "text tower or embed_text signature. Text embeddings come from runs of the "
        "'image_text' trainer.")
  text = metadata['text']
  tokenizer = tokenizer_lib.load_cached(os.path.join(export_dir, 'assets', text['tokenizer']))
  tokens = inference.tokenize_texts(tokenizer, texts, int(text['max_len']))
  tf = _tf()
  signature = (loaded or tf.saved_model.load(export_dir)).signatures['embed_text']
  return inference.in_padded_batches(
      lambda batch: signature(tokens=tf.constant(batch))['text_embedding'].numpy(), tokens,
      batch_size, int(text['joint_embedding_dim']))


# Flags live in their own FlagValues, so that importing this module and
# cxr_jax.embed together defines no flag twice.
FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'Training run to export.', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Directory to write the SavedModel to.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step to export (default: latest).',
                     flag_values=FLAGS)
flags.DEFINE_bool('best', False, 'Export the best checkpoint (WORKDIR/best).', flag_values=FLAGS)
flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS),
                  'Platforms the network is lowered for: cpu, cuda, rocm, tpu.', flag_values=FLAGS)
flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.', flag_values=FLAGS)


def main(argv: Sequence[str]) -> str:
  cli.parse(FLAGS, argv)
  missing = [f'--{n}' for n in ('workdir', 'output') if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f'Missing {", ".join(missing)}.')
  if FLAGS.step is not None and FLAGS.best:
    raise app.UsageError('Pass --step or --best, not both.')
  path = export_run(FLAGS.workdir, FLAGS.output, step=FLAGS.step, best=FLAGS.best,
                    platforms=FLAGS.platforms, overwrite=FLAGS.overwrite)
  print(f'SavedModel written to {path}', file=sys.stderr)
  return path


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
