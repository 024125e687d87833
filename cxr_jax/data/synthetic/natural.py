"""Natural-like RGB images for generic pretraining: `generate_natural`.

A class is a combination of shape, texture, layout and palette; backgrounds and
distractor shapes add clutter, so no single cue (like the mean colour) gives it away.
"""

import functools

import numpy as np

from cxr_jax.data.synthetic.drawing import _grid, _ramp, _smooth_noise
from cxr_jax.data.synthetic.streams import _NATURAL, _check_seed_index, _pick

NATURAL_SHAPES = ('disk', 'square', 'triangle', 'star', 'ring', 'cross', 'hexagon', 'crescent')
NATURAL_TEXTURES = ('solid', 'stripes', 'checker', 'dots', 'blobs', 'gradient', 'fractal')
NATURAL_LAYOUTS = ('single', 'pair', 'grid', 'scatter')
NATURAL_PALETTES = ('warm', 'cool', 'muted')
MAX_NATURAL_CLASSES = (len(NATURAL_SHAPES) * len(NATURAL_TEXTURES) * len(NATURAL_LAYOUTS)
                       * len(NATURAL_PALETTES))


@functools.lru_cache(maxsize=1)
def _class_table():
  """Class -> (shape, texture, layout, palette); a fixed shuffle so classes differ early."""
  combos = [(s, t, l, p) for s in NATURAL_SHAPES for t in NATURAL_TEXTURES
            for l in NATURAL_LAYOUTS for p in NATURAL_PALETTES]
  order = np.random.default_rng(20240601).permutation(len(combos))
  return tuple(combos[i] for i in order)


def natural_class(label: int) -> tuple:
  """The (shape, texture, layout, palette) that defines a natural-image class."""
  return _class_table()[label]


def _shape_distance(shape, x, y):
  """Approximate signed distance (negative inside) of a unit-size shape."""
  if shape == 'disk':
    return np.hypot(x, y) - 1
  if shape == 'square':
    return np.maximum(np.abs(x), np.abs(y)) - 0.85
  if shape == 'triangle':
    return np.maximum(np.abs(x) * 0.866 + y * 0.5, -y) - 0.5
  if shape == 'star':
    r = np.hypot(x, y)
    return r - (0.65 + 0.35 * np.cos(5 * np.arctan2(y, x)))
  if shape == 'ring':
    return np.abs(np.hypot(x, y) - 0.72) - 0.28
  if shape == 'cross':
    return np.minimum(np.maximum(np.abs(x) - 0.3, np.abs(y) - 1),
                      np.maximum(np.abs(x) - 1, np.abs(y) - 0.3))
  if shape == 'hexagon':
    return np.maximum(np.abs(x) * 0.866 + np.abs(y) * 0.5, np.abs(y)) - 0.85
  if shape == 'crescent':
    return np.maximum(np.hypot(x, y) - 1, 0.8 - np.hypot(x - 0.5, y))
  raise ValueError(shape)


def _texture(texture, x, y, rng, size):
  """Mixing weight in [0, 1] between an object's two colours."""
  angle = rng.uniform(0, np.pi)
  c, s = np.cos(angle), np.sin(angle)
  xr, yr = c * x + s * y, -s * x + c * y
  freq = rng.uniform(3, 7)
  if texture == 'solid':
    return np.zeros_like(x)
  if texture == 'stripes':
    return 0.5 + 0.5 * np.clip(3 * np.sin(freq * np.pi * xr), -1, 1)
  if texture == 'checker':
    return 0.5 + 0.5 * np.clip(3 * np.sin(freq * np.pi * xr) * np.sin(freq * np.pi * yr), -1, 1)
  if texture == 'dots':
    return np.clip(3 * (np.cos(freq * np.pi * xr) * np.cos(freq * np.pi * yr) - 0.5), 0, 1)
  if texture == 'blobs':
    return np.clip(0.5 + 1.5 * _smooth_noise(rng, size, 10), 0, 1)
  if texture == 'gradient':
    return np.clip(0.5 + 0.5 * xr, 0, 1)
  if texture == 'fractal':  # Roughly 1/f: octaves with halving amplitude.
    field = sum(_smooth_noise(rng, size, cells) / (k + 1)
                for k, cells in enumerate((6, 12, 24, 48)))
    return np.clip(0.5 + 0.3 * field, 0, 1)
  raise ValueError(texture)


def _hsv_to_rgb(h, s, v):
  k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
  return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def _palette_colour(rng, palette):
  if palette == 'warm':
    return _hsv_to_rgb(rng.uniform(-0.08, 0.17) % 1, rng.uniform(0.5, 1), rng.uniform(0.5, 1))
  if palette == 'cool':
    return _hsv_to_rgb(rng.uniform(0.42, 0.75), rng.uniform(0.5, 1), rng.uniform(0.4, 1))
  return _hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), rng.uniform(0.2, 0.95))


def _layout_instances(layout, rng):
  """(centre x, centre y, scale) of each object instance."""
  if layout == 'single':
    return [(*rng.uniform(-0.2, 0.2, 2), rng.uniform(0.4, 0.65))]
  if layout == 'pair':
    offset = rng.uniform(0.4, 0.55)
    angle = rng.uniform(0, np.pi)
    scale = rng.uniform(0.25, 0.35)
    return [(sign * offset * np.cos(angle), sign * offset * np.sin(angle), scale)
            for sign in (-1, 1)]
  if layout == 'grid':
    n = _pick(rng, (2, 3))
    step = 1.5 / n
    scale = step * rng.uniform(0.3, 0.42)
    jitter = rng.normal(0, 0.03, (n, n, 2))
    return [(-0.75 + step * (i + 0.5) + jitter[i, j, 0], -0.75 + step * (j + 0.5)
             + jitter[i, j, 1], scale) for i in range(n) for j in range(n)]
  count = int(rng.integers(4, 8))
  return [(*rng.uniform(-0.75, 0.75, 2), rng.uniform(0.12, 0.25)) for _ in range(count)]


def _paint_shape(canvas, shape, texture, colours, instances, rng, size, alpha=1.0):
  x, y = _grid(size)
  px = 2.0 / size
  weight = _texture(texture, x, y, rng, size)
  paint = colours[0] * (1 - weight[..., None]) + colours[1] * weight[..., None]
  for cx, cy, scale in instances:
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = x - cx, y - cy
    distance = _shape_distance(shape, (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale)
    mask = (_ramp(-distance * scale, 1.5 * px) * alpha)[..., None]
    canvas *= 1 - mask
    canvas += mask * paint
  return canvas


def generate_natural(index: int, *, seed: int = 0, num_classes: int = 100,
                     image_size: int = 64) -> dict:
  """One natural-like RGB image: objects of a class's shape, texture, layout, palette.

  Classes share colours, shapes and textures, so only their combination (not the mean
  colour) identifies one; random backgrounds and distractor shapes add clutter.
  Labels cycle through the classes (label = index % num_classes), so any prefix of
  indices is balanced.

  Returns: dict with 'image' uint8 [H, W, 3] and 'label' int.
  """
  _check_seed_index(seed, index)
  if not 1 <= num_classes <= MAX_NATURAL_CLASSES:
    raise ValueError(f'num_classes must be in [1, {MAX_NATURAL_CLASSES}], got {num_classes}.')
  if not (isinstance(image_size, (int, np.integer)) and image_size >= 16):
    raise ValueError(f'image_size must be an integer >= 16, got {image_size!r}.')
  size = int(image_size)
  label = index % num_classes
  shape, texture, layout, palette = natural_class(label)
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_NATURAL, index)))

  # Background: two random colours mixed by a smooth random field, plus a faint texture.
  bg_colours = [_hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.7), rng.uniform(0.15, 0.95))
                for _ in range(2)]
  mix = np.clip(0.5 + 0.5 * _smooth_noise(rng, size, int(rng.integers(2, 6))), 0, 1)
  canvas = (bg_colours[0] * (1 - mix[..., None]) + bg_colours[1] * mix[..., None])
  canvas = canvas.astype(np.float32)

  # Clutter: smaller, fainter shapes of other families and textures.
  for _ in range(int(rng.integers(1, 4))):
    other_shape = _pick(rng, [s for s in NATURAL_SHAPES if s != shape])
    other_texture = _pick(rng, NATURAL_TEXTURES)
    colours = [_hsv_to_rgb(rng.uniform(), rng.uniform(0, 1), rng.uniform(0.2, 1))
               for _ in range(2)]
    instance = [(*rng.uniform(-0.9, 0.9, 2), rng.uniform(0.08, 0.2))]
    canvas = _paint_shape(canvas, other_shape, other_texture, colours, instance, rng, size,
                          alpha=rng.uniform(0.3, 0.7))

  colours = [_palette_colour(rng, palette) for _ in range(2)]
  if texture != 'solid' and np.abs(colours[0] - colours[1]).sum() < 0.4:
    colours[1] = 1 - colours[1]  # Keep the texture visible.
  canvas = _paint_shape(canvas, shape, texture, colours, _layout_instances(layout, rng), rng,
                        size)

  # Photometric jitter and sensor noise.
  canvas = canvas * rng.uniform(0.7, 1.2) + rng.uniform(-0.1, 0.1)
  canvas += rng.normal(0, rng.uniform(0.0, 0.05), canvas.shape).astype(np.float32)
  image = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
  return {'image': image, 'label': int(label)}
