"""Drawing primitives, all in normalised coordinates so any image size looks alike.

The pixel grid, an anti-aliased step, a smooth Gaussian random field, and soft
masks of ellipses, segments and polylines: what anatomy, findings, devices and
natural images are drawn with.
"""

import functools
import math

import numpy as np

@functools.lru_cache(maxsize=16)
def _grid(size: int):
  """Pixel-centre coordinates in [-1, 1]: x to the right, y downwards."""
  c = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  x, y = np.meshgrid(c, c)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def _ramp(z, width):
  """0 below -width/2, 1 above width/2, linear in between: a cheap anti-aliased step."""
  step = z * float(1.0 / width) + 0.5
  # In-place ufuncs: np.clip's Python overhead dominates at small image sizes.
  np.maximum(step, 0.0, out=step)
  return np.minimum(step, 1.0, out=step)


@functools.lru_cache(maxsize=64)
def _smoothing_matrix(size: int, cells: int):
  spacing = 2.0 / cells
  nodes = (np.arange(cells + 4) - 1.5) * spacing - 1.0
  pixels = (np.arange(size) + 0.5) * (2.0 / size) - 1.0
  weights = np.exp(-0.5 * ((pixels[:, None] - nodes[None]) / (0.7 * spacing)) ** 2)
  weights = weights.astype(np.float32)
  weights.setflags(write=False)
  return weights


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
  """Zero-mean, unit-std Gaussian random field with about `cells` blobs across.

  The field is defined on a fixed coarse lattice and interpolated, so it looks the
  same at every image size; two small matmuls make it cheap even at 512 px.
  """
  weights = _smoothing_matrix(size, cells)
  coarse = rng.standard_normal((weights.shape[1], weights.shape[1]), dtype=np.float32)
  field = weights @ coarse @ weights.T
  field -= field.mean()
  return field * (1.0 / (field.std() + 1e-6))


def _ellipse(u, v, center, radii, angle, edge):
  """Soft mask of a rotated ellipse; `edge` is the blur width at its boundary."""
  # Python floats keep float32 arrays float32 (NumPy scalars would promote them).
  cu, cv = u - float(center[0]), v - float(center[1])
  c, s = math.cos(angle), math.sin(angle)
  a = (c * cu + s * cv) * float(1.0 / radii[0])
  b = (-s * cu + c * cv) * float(1.0 / radii[1])
  r = np.sqrt(a * a + b * b)
  return _ramp(1.0 - r, edge / min(radii))


def _segment(u, v, p0, p1, width, edge):
  """Soft mask of a line segment of the given width."""
  (u0, v0), (u1, v1) = (map(float, p0)), (map(float, p1))
  du, dv = u1 - u0, v1 - v0
  t = np.clip(((u - u0) * du + (v - v0) * dv) * (1 / max(du * du + dv * dv, 1e-9)), 0, 1)
  dist = np.hypot(u - u0 - t * du, v - v0 - t * dv)
  return _ramp(width * 0.5 - dist, edge)


def _polyline(u, v, points, width, edge):
  mask = np.zeros_like(u)
  for p0, p1 in zip(points[:-1], points[1:]):
    np.maximum(mask, _segment(u, v, p0, p1, width, edge), out=mask)
  return mask
