"""Findings as they act on a film: lung air replaced, density added, air let in.

Each returns `fill` (fraction of lung air replaced, in [0, 1]) and/or extra
density; all are drawn from their own parameters, never from shared streams.
"""

import math

import numpy as np

from cxr_jax.data.synthetic.anatomy import _lung_geometry
from cxr_jax.data.synthetic.drawing import _ellipse, _ramp, _smooth_noise

def _lung_point(anatomy, domes, side, height, lateral):
  """Patient-frame point at a lung `height` (0 apex .. 1 base) and `lateral` fraction."""
  w = anatomy['half_width']
  top = anatomy['apex']
  v = top + height * (domes[side] + 0.08 - top)
  curve = math.sqrt(1 - (1 - min(float(height), 1)) ** 2)
  lo = max(w * (0.32 - 0.2 * curve), anatomy['mediastinum'] + 0.05)
  hi = w * (0.32 + 0.66 * curve) - 0.04
  return float(side * (lo + lateral * max(hi - lo, 0.02))), float(v)


def _airspace_opacity(frame, anatomy, domes, params, texture=0.0):
  """A fluffy consolidation; with `texture` > 0, part of it breaks into mottled blobs.

  Mottling keeps the opacity's place and extent but leaves aerated lung between fine
  blobs (about 12 across the film), so much less density is added on average.
  """
  fill = np.zeros_like(frame.u)
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  patches = _smooth_noise(np.random.default_rng(params['field_seed']), frame.size, 22)
  strength = 0.25 + 0.65 * params['severity']
  if texture:
    # Its own stream, so the smooth opacity (texture 0) draws exactly what it always did.
    grain = _smooth_noise(np.random.default_rng([params['field_seed'], 1]), frame.size, 12)
    strength = strength * ((1 - texture) + texture * _ramp(grain - 0.3, 0.5))
  for side in sides:
    cu, cv = _lung_point(anatomy, domes, side, params['height'], params['lateral'])
    r2 = (frame.u - cu) ** 2 + (frame.v - cv) ** 2
    envelope = np.exp(-r2 * (1 / (2 * params['radius'] ** 2)))
    fluffy = np.clip(2.2 * envelope + 0.45 * patches - 0.6, 0, 1)
    fill = np.maximum(fill, strength * fluffy)
  return fill


def _pleural_effusion(frame, anatomy, domes, params, view):
  """Fluid at the base: a meniscus rising laterally, blunting the costophrenic angle.

  On supine (AP) films fluid layers behind the lung instead: a veil over the
  hemithorax, densest at the base, with a smaller meniscus.
  """
  fill = np.zeros_like(frame.u)
  severity = params['severity']
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  w = anatomy['half_width']
  supine = view == 'AP'
  for side in sides:
    a = frame.u * side
    depth = (0.05 + 0.42 * severity) * (0.6 if supine else 1.0)
    top = domes[side] + 0.1 - depth * (0.55 + 0.45 * np.clip(a * (1 / w), 0, 1.1) ** 2)
    meniscus = _ramp(frame.v - top, 0.03 + 0.04 * severity)
    hemithorax = _ramp(a, 0.02)
    fill = np.maximum(fill, meniscus * hemithorax * 0.95)
    if supine:
      veil = np.clip((frame.v - (domes[side] - 0.9)) * (1 / 0.9), 0, 1)
      fill = np.maximum(fill, 0.45 * severity * veil * hemithorax)
  return fill


def _pneumothorax(frame, anatomy, domes, lift, params, lung_masks):
  """Returns (region, pleural_line): air without lung markings, and its edge."""
  side = params['side']
  severity = params['severity']
  gap = 0.035 + 0.22 * severity
  collapsed = _lung_geometry(
      frame, anatomy, side, domes[side], lift[side],
      lateral_shrink=gap * (0.6 if params['apical'] else 1.0),
      apex_drop=gap * (1.4 if params['apical'] else 0.6), sharp=True)
  outer = lung_masks[side]
  region = np.clip(outer - collapsed, 0, 1)
  # The visceral pleura: a thin bright line where the collapsed lung ends.
  line = 4 * collapsed * (1 - collapsed) * outer
  return region, line


def _nodules(frame, anatomy, domes, params):
  density = np.zeros_like(frame.u)
  for k in range(params['count']):
    side = int(params['sides'][k])
    cu, cv = _lung_point(anatomy, domes, side, params['heights'][k], params['laterals'][k])
    radius = float(params['radii'][k]) * (0.8 + 0.4 * params['severity'])
    r2 = ((frame.u - cu) ** 2 + (frame.v - cv) ** 2) * (1 / radius ** 2)
    # A sphere's projected thickness, softened by a pixel at its rim.
    sphere = np.sqrt(np.clip(1 - r2, 0, 1))
    sphere = np.maximum(sphere, _ramp(1 - np.sqrt(r2), 1.5 * frame.px / radius) * 0.3)
    density += (0.12 + 0.25 * params['severity']) * sphere
  return density


def _tuberculosis(frame, anatomy, domes, params):
  """Upper-zone fibronodular opacities, an optional cavity, and apical pleural capping.

  Returns (fill, cavity_air).
  """
  severity = params['severity']
  nodular = _smooth_noise(np.random.default_rng(params['field_seed']), frame.size, 40)
  fill = np.zeros_like(frame.u)
  cavity_air = np.zeros_like(frame.u)
  sides = (-1, 1) if params['bilateral'] else (params['side'],)
  for i, side in enumerate(sides):
    extent = (0.25 + 0.2 * severity) * (1.0 if i == 0 else 0.6)
    zone = _ramp(anatomy['apex'] + extent * (domes[side] + 0.1 - anatomy['apex'])
                 - frame.v, 0.12) * _ramp(frame.u * side, 0.02)
    spots = np.clip(1.3 * nodular - 0.4 + 0.8 * severity, 0, 1)
    fill = np.maximum(fill, zone * spots * (0.45 + 0.5 * severity))
    capping = _ramp(anatomy['apex'] + 0.06 - frame.v, 0.04) * _ramp(frame.u * side, 0.02)
    fill = np.maximum(fill, 0.6 * capping)
  if params['cavity'] and severity > 0.3:  # Cavities come with established disease.
    side = params['side']
    cu, cv = _lung_point(anatomy, domes, side, params['cavity_height'],
                         params['cavity_lateral'])
    radius = params['cavity_radius']
    du, dv = frame.u - cu, frame.v - cv
    # An irregular, thick wall: the radius wobbles with angle and the nodular field.
    wobble = 1 + 0.12 * np.cos(3 * np.arctan2(dv, du) + 10 * radius) + 0.08 * nodular
    r = np.sqrt(du * du + dv * dv) * (1 / (radius * wobble))
    edge = 2.5 * frame.px / radius
    wall = _ramp(1.3 - r, edge) * _ramp(r - 0.6, edge)
    fill = np.maximum(fill, wall * (0.35 + 0.5 * severity))
    cavity_air = _ramp(0.6 - r, edge) * severity
  return fill, cavity_air


def _atelectasis(frame, anatomy, domes, params, heart):
  """Plate-like band at a base, and sometimes left lower lobe collapse behind the heart.

  Returns (fill, retrocardiac_density).
  """
  side = params['side']
  cu, cv = _lung_point(anatomy, domes, side, params['height'], params['lateral'])
  severity = params['severity']
  thickness = params['thickness'] * (0.8 + 0.6 * severity)
  band = _ellipse(frame.u, frame.v, (cu, cv), (params['length'] / 2, thickness),
                  params['angle'], max(1.2 * frame.px, 0.3 * thickness))
  fill = band * (0.6 + 0.4 * severity)
  retrocardiac = np.zeros_like(frame.u)
  if params['lobar']:
    # A triangle hugging the spine behind the heart, apex at the hilum.
    base = domes[1]
    wedge = (_ramp(frame.v - (base - 0.35), 0.15) * _ramp(base + 0.05 - frame.v, 0.04)
             * _ramp(0.02 + 0.45 * (frame.v - (base - 0.35)) - frame.u, 0.05)
             * _ramp(frame.u + 0.02, 0.04))
    retrocardiac = 0.1 * (0.5 + severity) * wedge
  return fill, retrocardiac
