"""Preprocessing ops, named in a string: "decode|resize(256)|random_crop(224)|flip_lr".

Each op is registered under a name; its factory takes the literal arguments written
in the string and returns `fn(example, rng) -> example`, where `example` is a dict
of NumPy values and `rng` a `np.random.Generator` that grain derives from the
pipeline seed and the record index (so augmentation is reproducible and resumes
exactly). Images are [H, W, C] arrays; integer images keep their dtype (uint8 or
uint16) until `value_range` or `window` turns them into float32.

`two_views` splits the string: ops before it run once, ops after it run on two
copies with independent randomness, and `image` becomes [2, H, W, C] (the two
augmented views that contrastive losses compare).

Batch ops (`mixup`) run on whole batches and belong in the separate batch string.
"""

import ast
import math
from typing import Any, Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from cxr_jax.data import images
from cxr_jax.registry import Registry
from cxr_jax.text import tokenizer as tokenizer_lib

Example = Dict[str, Any]
Op = Callable[[Example, np.random.Generator], Example]

OPS = Registry('preprocessing op')
BATCH_OPS = Registry('batch preprocessing op')
TWO_VIEWS = 'two_views'


def parse(pp: str) -> List[Tuple[str, tuple, dict]]:
  """'a|b(1, x=2)' -> [('a', (), {}), ('b', (1,), {'x': 2})]; errors name the op."""
  ops = []
  for text in (t.strip() for t in pp.split('|')):
    if not text:
      raise ValueError(f'Empty preprocessing op in {pp!r}.')
    try:
      node = ast.parse(text, mode='eval').body
    except SyntaxError as e:
      raise ValueError(f'Cannot parse preprocessing op {text!r} in {pp!r}: {e.msg}') from None
    if isinstance(node, ast.Name):
      ops.append((node.id, (), {}))
      continue
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
      raise ValueError(f'Preprocessing op {text!r} in {pp!r} is not of the form name(args).')
    try:
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
      raise ValueError(f'Preprocessing op {text!r} in {pp!r}: arguments must be literals '
                       '(numbers, strings, tuples).') from None
    ops.append((node.func.id, args, kwargs))
  return ops


def _build(registry: Registry, name: str, args: tuple, kwargs: dict, pp: str) -> Op:
  if name not in registry:
    raise ValueError(f'Unknown preprocessing op {name!r} in {pp!r}. '
                     f'Known: {", ".join(registry.names())}.')
  try:
    return registry.get(name)(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f'Preprocessing op {name}{args or ""}{kwargs or ""} in {pp!r}: {e}') from None


class Preprocess:
  """A parsed per-example preprocessing string, callable as `pp(example, rng)`."""

  def __init__(self, pp: str):
    self.pp = pp
    parsed = parse(pp) if pp.strip() else []
    names = [name for name, _, _ in parsed]
    if names.count(TWO_VIEWS) > 1:
      raise ValueError(f'{TWO_VIEWS} appears more than once in {pp!r}.')
    split = names.index(TWO_VIEWS) if TWO_VIEWS in names else len(parsed)
    self.shared = [_build(OPS, *p, pp) for p in parsed[:split]]
    self.per_view = [_build(OPS, *p, pp) for p in parsed[split + 1:]]
    self.num_views = 2 if TWO_VIEWS in names else 1

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    example = dict(example)
    for op in self.shared:
      example = op(example, rng)
    if self.num_views == 1:
      for op in self.per_view:
        example = op(example, rng)
      return example
    views = []
    for _ in range(self.num_views):
      view = dict(example)
      for op in self.per_view:
        view = op(view, rng)
      views.append(view['image'])
    shapes = {v.shape for v in views}
    if len(shapes) > 1:
      raise ValueError(f'{self.pp!r}: views differ in shape {shapes}; end each view with a '
                       'fixed-size crop or resize.')
    return {**example, 'image': np.stack(views)}


class BatchPreprocess:
  """A parsed batch-level string (e.g. 'mixup(0.2)'), callable as `pp(batch, rng)`."""

  def __init__(self, pp: str):
    self.ops = [_build(BATCH_OPS, *p, pp) for p in (parse(pp) if pp.strip() else [])]

  def __call__(self, batch: Example, rng: np.random.Generator) -> Example:
    for op in self.ops:
      batch = op(batch, rng)
    return batch


# --- helpers ------------------------------------------------------------------------


def _image_op(fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Op:
  def apply(example, rng):
    return {**example, 'image': fn(example['image'], rng)}
  return apply


def _size_pair(size) -> Tuple[int, int]:
  h, w = (size, size) if np.isscalar(size) else tuple(size)
  if int(h) != h or int(w) != w or h <= 0 or w <= 0:
    raise ValueError(f'size must be a positive integer or (height, width), got {size!r}')
  return int(h), int(w)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area averaging when no side grows, bilinear otherwise; reproducible bit for bit.

  OpenCV's plain INTER_LINEAR on 8/16-bit images uses SIMD-dependent fixed point and
  its integer INTER_AREA rounds float32 sums, so results could differ between machines
  and from the exported SavedModel's in-graph resize. Integer images are therefore
  area-averaged in float64 and rounded half to even, and enlarged with
  INTER_LINEAR_EXACT (OpenCV's bit-exact fixed point).
  """
  if image.shape[:2] == (height, width):
    return image
  integer = np.issubdtype(image.dtype, np.integer)
  if height <= image.shape[0] and width <= image.shape[1]:
    out = cv2.resize(image.astype(np.float64) if integer else image, (width, height),
                     interpolation=cv2.INTER_AREA)
    if integer:
      info = np.iinfo(image.dtype)
      out = np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
  else:
    out = cv2.resize(image, (width, height),
                     interpolation=cv2.INTER_LINEAR_EXACT if integer else cv2.INTER_LINEAR)
  return out.reshape(height, width, image.shape[2])  # cv2 drops a single channel axis.


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W, 1] -> [H, W, 3] copies of the channel; OpenCV's copy is ~7x np.repeat's."""
  if image.ndim == 3 and image.dtype in (np.uint8, np.uint16, np.float32):
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  return np.repeat(image, 3, axis=-1)


def _require_unit_float(image: np.ndarray, op: str):
  if image.dtype != np.float32:
    raise ValueError(f'{op} needs a float32 image in [0, 1] (got {image.dtype}); '
                     'put value_range(0, 1) or window before it.')


def _dtype_range(dtype) -> Tuple[float, float]:
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return float(info.min), float(info.max)
  return 0.0, 1.0


# --- decoding and value ranges -----------------------------------------------------


@OPS.register('decode')
def decode(channels: int = 0):
  """Stored image -> [H, W, C]: PNG/JPEG bytes (8- or 16-bit), a dataset's raw stored
  arrays (`images.encode_raw`, no codec), or an array, which passes through.

  `channels=1` converts colour to gray, `channels=3` gray to RGB; 0 keeps the stored ones.
  Raw arrays come back read-only, without a copy: ops make new arrays, never write.
  """
  if channels not in (0, 1, 3):
    raise ValueError(f'channels must be 0, 1 or 3, got {channels!r}')

  def fn(image, rng):
    del rng
    if isinstance(image, (bytes, np.bytes_)) or (
        isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1):
      if images.is_raw(image):
        image = images.decode_raw(image)
      else:
        data = np.frombuffer(image, np.uint8) if isinstance(image, (bytes, np.bytes_)) else image
        decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if decoded is None:
          raise ValueError('image bytes could not be decoded as PNG or JPEG')
        if decoded.ndim == 3:
          decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB if decoded.shape[2] == 4
                                 else cv2.COLOR_BGR2RGB)
        image = decoded
    image = image[..., None] if image.ndim == 2 else image
    if channels == 3 and image.shape[-1] == 1:
      image = _gray_to_rgb(image)
    elif channels == 1 and image.shape[-1] == 3:
      image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None]
    return image
  return _image_op(fn)


@OPS.register('value_range')
def value_range(vmin: float = -1.0, vmax: float = 1.0, in_min=None, in_max=None):
  """Maps the input range (the integer dtype's full range, or [0, 1] for floats) linearly."""
  if not vmax > vmin:
    raise ValueError(f'need vmax > vmin, got ({vmin}, {vmax})')

  def fn(image, rng):
    del rng
    lo, hi = _dtype_range(image.dtype)
    lo = lo if in_min is None else in_min
    hi = hi if in_max is None else in_max
    # In place on one float32 copy: the same operations in the same order as
    # `(x - lo) / (hi - lo) * (vmax - vmin) + vmin`, so bit for bit the export's result.
    out = image.astype(np.float32)
    np.subtract(out, lo, out=out)
    np.divide(out, hi - lo, out=out)
    np.multiply(out, vmax - vmin, out=out)
    np.add(out, vmin, out=out)
    return out
  return _image_op(fn)


@OPS.register('window')
def window(low_percentile: float = 0.5, high_percentile: float = 99.5):
  """CXR windowing: clip to intensity percentiles and stretch to float [0, 1].

  Makes films from scanners with different exposure and bit depth comparable.
  """
  if not 0 <= low_percentile < high_percentile <= 100:
    raise ValueError(f'need 0 <= low < high <= 100, got ({low_percentile}, {high_percentile})')

  def fn(image, rng):
    del rng
    image = image.astype(np.float32)
    lo, hi = np.percentile(image, (low_percentile, high_percentile))
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
  return _image_op(fn)


@OPS.register('rgb')
def rgb():
  """Gray [H, W, 1] -> [H, W, 3], for backbones pretrained on colour images."""
  def fn(image, rng):
    del rng
    return _gray_to_rgb(image) if image.shape[-1] == 1 else image
  return _image_op(fn)


# --- geometry ------------------------------------------------------------------------


@OPS.register('resize')
def resize(size):
  """Resizes to `size` (int: square, or (height, width))."""
  height, width = _size_pair(size)
  return _image_op(lambda image, rng: _resize(image, height, width))


@OPS.register('resize_small')
def resize_small(size: int):
  """Resizes so that the shorter side is `size`, keeping the aspect ratio."""
  _size_pair(size)

  def fn(image, rng):
    del rng
    h, w = image.shape[:2]
    scale = size / min(h, w)
    return _resize(image, max(size, round(h * scale)), max(size, round(w * scale)))
  return _image_op(fn)


def _crop(image, top, left, height, width):
  if image.shape[0] < height or image.shape[1] < width:
    raise ValueError(f'cannot crop {height}x{width} from a {image.shape[0]}x{image.shape[1]} '
                     'image; resize first')
  return image[top:top + height, left:left + width]


@OPS.register('central_crop')
def central_crop(size):
  height, width = _size_pair(size)

  def fn(image, rng):
    del rng
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return _crop(image, top, left, height, width)
  return _image_op(fn)


@OPS.register('random_crop')
def random_crop(size):
  height, width = _size_pair(size)

  def fn(image, rng):
    top = rng.integers(0, max(image.shape[0] - height, 0) + 1)
    left = rng.integers(0, max(image.shape[1] - width, 0) + 1)
    return _crop(image, top, left, height, width)
  return _image_op(fn)


@OPS.register('inception_crop')
def inception_crop(size, area_min: float = 8, area_max: float = 100):
  """Random crop of `area_min`..`area_max` percent of the image, aspect 3/4..4/3, resized."""
  height, width = _size_pair(size)
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f'need 0 < area_min <= area_max <= 100, got ({area_min}, {area_max})')

  def fn(image, rng):
    h, w = image.shape[:2]
    for _ in range(10):
      area = h * w * rng.uniform(area_min, area_max) / 100
      aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
      ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
      if 0 < ch <= h and 0 < cw <= w:
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return _resize(image[top:top + ch, left:left + cw], height, width)
    side = min(h, w)  # Fall back to the central square, as the reference recipe does.
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(image[top:top + side, left:left + side], height, width)
  return _image_op(fn)


@OPS.register('flip_lr')
def flip_lr(probability: float = 0.5):
  def fn(image, rng):
    return image[:, ::-1] if rng.uniform() < probability else image
  return _image_op(fn)


@OPS.register('affine')
def affine(rotate: float = 10, translate: float = 0.05, scale: Sequence[float] = (0.9, 1.1)):
  """Small random rotation (degrees), translation (fraction of size) and zoom."""
  lo, hi = scale

  def fn(image, rng):
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-rotate, rotate),
                                     rng.uniform(lo, hi))
    matrix[:, 2] += rng.uniform(-translate, translate, 2) * (w, h)
    out = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out.reshape(image.shape)
  return _image_op(fn)


# --- photometric (float images in [0, 1]) --------------------------------------------


@OPS.register('brightness')
def brightness(delta: float = 0.1):
  def fn(image, rng):
    _require_unit_float(image, 'brightness')
    return np.clip(image + rng.uniform(-delta, delta), 0, 1).astype(np.float32)
  return _image_op(fn)


@OPS.register('contrast')
def contrast(lower: float = 0.8, upper: float = 1.2):
  def fn(image, rng):
    _require_unit_float(image, 'contrast')
    mean = image.mean()
    return np.clip((image - mean) * rng.uniform(lower, upper) + mean, 0, 1).astype(np.float32)
  return _image_op(fn)


@OPS.register('gamma')
def gamma(lower: float = 0.8, upper: float = 1.25):
  """Random gamma: mimics differences in detector response curves."""
  if not 0 < lower <= upper:
    raise ValueError(f'need 0 < lower <= upper, got ({lower}, {upper})')

  def fn(image, rng):
    _require_unit_float(image, 'gamma')
    return np.power(image, rng.uniform(lower, upper)).astype(np.float32)
  return _image_op(fn)


# --- keys ----------------------------------------------------------------------------


@OPS.register('onehot')
def onehot(num_classes: int):
  """Integer class `label` -> float32 one-hot [num_classes] (needed by mixup)."""
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'num_classes must be an integer >= 2, got {num_classes!r}')

  def fn(example, rng):
    del rng
    label = int(example['label'])
    if not 0 <= label < num_classes:
      raise ValueError(f'onehot({num_classes}): label {label} is out of range')
    return {**example, 'label': np.eye(num_classes, dtype=np.float32)[label]}
  return fn


@OPS.register('keep')
def keep(*keys: str):
  """Keeps only these keys (drops e.g. report text before batching)."""
  def fn(example, rng):
    del rng
    missing = [k for k in keys if k not in example]
    if missing:
      raise KeyError(f'keep{keys}: example has no {missing}; it has {sorted(example)}')
    return {k: example[k] for k in keys}
  return fn


# --- batch ops -----------------------------------------------------------------------


@BATCH_OPS.register('mixup')
def mixup(alpha: float = 0.2):
  """Mixes each image and its labels with the batch's reversed order (Zhang et al., 2018)."""
  if alpha <= 0:
    raise ValueError(f'alpha must be positive, got {alpha}')

  def fn(batch, rng):
    weight = np.float32(rng.beta(alpha, alpha))
    out = dict(batch)
    out['image'] = weight * batch['image'] + (1 - weight) * batch['image'][::-1]
    # Class labels must be one-hot (the `onehot` op) to mix; CXR findings are mixed as is.
    key = 'labels' if 'labels' in batch else 'label'
    if key not in batch or not np.issubdtype(batch[key].dtype, np.floating):
      raise ValueError(f'mixup needs float `labels` (CXR findings) or one-hot `label` (put '
                       f'onehot(NUM_CLASSES) in the preprocessing string); the batch has '
                       f'{ {k: str(v.dtype) for k, v in batch.items()} }.')
    out[key] = weight * batch[key] + (1 - weight) * batch[key][::-1]
    if 'label_mask' in batch:  # A label counts only where both mixed examples know it.
      out['label_mask'] = batch['label_mask'] * batch['label_mask'][::-1]
    return out
  return fn


# --- text ----------------------------------------------------------------------------


@OPS.register('tokenize')
def tokenize(path: str, max_len: int = 128, sections: str = ''):
  """Report -> `text` int32 [max_len]: `<bos> subwords <eos>` then zeros (image-text training).

  Reads `example['report']` (str or UTF-8 bytes), keeps `sections` of it ('findings',
  'impression', 'both', 'all'; '' = those the tokenizer was trained on) and encodes it
  with the tokenizer file at `path` (cxr_jax/text/tokenizer.py), loaded once per process.
  A report without the wanted section falls back to what it has; the first such report
  is logged and all are counted in `cxr_jax.text.tokenizer.SECTION_FALLBACKS`.
  """
  if not isinstance(max_len, int) or max_len < 2:
    raise ValueError(f'max_len must be an integer of at least 2 (<bos> and <eos>), got '
                     f'{max_len!r}')
  tokenizer = tokenizer_lib.load_cached(path)
  sections = sections or tokenizer.sections
  if sections not in tokenizer_lib.SECTIONS:
    raise ValueError(f'sections must be one of {tokenizer_lib.SECTIONS} or "", got '
                     f'{sections!r}')

  def fn(example, rng):
    del rng
    if 'report' not in example:
      raise KeyError(f'tokenize: the example has no report (it has {sorted(example)}); '
                     'image-text training needs a dataset with reports.')
    text = tokenizer_lib.report_text(example['report'], sections)
    return {**example, 'text': tokenizer.encode([text], max_len)[0]}
  return fn
