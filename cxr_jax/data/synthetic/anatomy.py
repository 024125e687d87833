"""Anatomy: the patient frame and the density of a chest without findings.

Soft tissue, lungs, heart, diaphragm domes, ribs, clavicles and lung markings, each
drawn from the study's anatomy parameters in patient-frame coordinates.
"""

import dataclasses
import math

import numpy as np

from cxr_jax.data.synthetic.drawing import _ellipse, _grid, _ramp, _smooth_noise

@dataclasses.dataclass
class _Frame:
  """Patient-frame coordinates of every pixel, and the pixel size in those units."""
  u: np.ndarray
  v: np.ndarray
  px: float
  size: int


def _patient_frame(size, anatomy) -> _Frame:
  x, y = _grid(size)
  c, s = math.cos(anatomy['rotation']), math.sin(anatomy['rotation'])
  dx = x - float(anatomy['center'][0])
  dy = y - float(anatomy['center'][1])
  zoom = anatomy['zoom']
  u = (c * dx + s * dy) * (1 / zoom)
  v = (-s * dx + c * dy) * (1 / zoom)
  return _Frame(u, v, 2.0 / size / zoom, size)


def _domes(anatomy):
  """Diaphragm dome heights {-1: right, 1: left}, before any volume loss."""
  left = anatomy['dome'] + anatomy['inspiration']
  return {-1: left - anatomy['dome_asymmetry'], 1: left}


def _dome_lift(findings):
  """How far volume loss (atelectasis) pulls each hemidiaphragm up."""
  lift = {-1: 0.0, 1: 0.0}
  atelectasis = findings['atelectasis']
  if atelectasis['present']:
    lift[atelectasis['side']] = 0.02 + 0.05 * atelectasis['severity']
  return lift


def _lung_geometry(frame, anatomy, side, dome, lift=0.0, lateral_shrink=0.0, apex_drop=0.0,
                   sharp=False):
  """Soft mask of one lung, before the heart and mediastinum are cut out.

  `dome` shapes the lung; `lift` raises the diaphragm without reshaping the rest.
  """
  w = anatomy['half_width']
  a = frame.u * side  # Distance from the midline towards this side.
  v = frame.v
  top = anatomy['apex'] + apex_drop
  height = (v - top) * (1.0 / (dome + 0.12 - top))
  h = np.clip(height, 0, 1)
  curve = np.sqrt(1 - (1 - h) ** 2)  # Rounded apex, near-vertical lateral wall below.
  lateral_edge = w * (0.32 + 0.66 * curve) - lateral_shrink * (1 - 0.7 * h)
  medial_edge = np.maximum(w * (0.32 - 0.2 * curve), anatomy['mediastinum'])
  dome_curve = dome - lift + 0.3 * ((a - 0.42 * w) * (1 / w)) ** 2
  edge = max(1.2 * frame.px, 0.004)
  lateral_soft = edge if sharp else max(0.04, edge)
  mask = (_ramp(lateral_edge - a, lateral_soft) * _ramp(a - medial_edge, max(0.015, edge))
          * _ramp(dome_curve - v, max(0.012, edge)) * _ramp(v - top, max(0.02, edge)))
  return mask


def _heart(frame, anatomy, findings):
  """Soft heart mask; its width follows the cardiothoracic ratio (CTR)."""
  cardio = findings['cardiomegaly']
  ctr = cardio['ctr'] if cardio['present'] else anatomy['ctr']
  width = ctr * 2 * anatomy['half_width'] * anatomy['heart_magnification']
  half = width / 2
  tilt = anatomy['heart_tilt'] + (0.1 * cardio['severity'] if cardio['present'] else 0.0)
  b = anatomy['heart_height'] * (1 + 0.4 * (ctr - 0.42))
  # Semi-axis along the tilted long axis that gives the heart its horizontal extent.
  a = math.sqrt(max(half ** 2 - (b * math.sin(tilt)) ** 2, (0.5 * half) ** 2)) / math.cos(tilt)
  center = (-0.33 * width + half, anatomy['dome'] + anatomy['inspiration'] + 0.02)
  return _ellipse(frame.u, frame.v, center, (a, b), tilt, max(0.015, 1.2 * frame.px))


def _ribs(frame, anatomy):
  """Posterior ribs (arching down laterally) and fainter anterior ribs, both sides."""
  w = anatomy['half_width']
  a = np.abs(frame.u) * (1 / w)
  v = frame.v
  spacing = 0.1 * anatomy['rib_spacing']
  # Posterior ribs: rise a little off the spine, then curve down to the lateral wall.
  centred = v - (0.5 * a * a - 0.12 * a) + 0.85 - anatomy['rib_offset']
  phase = np.maximum(centred, 0) ** 0.92 * (1 / spacing)
  frac = phase - np.floor(phase)
  thickness = 0.48
  # Saturating hump: soft edges at least a pixel wide whatever the image size.
  sharpness = min(3.0, spacing * thickness / (np.pi * 0.8 * frame.px))
  posterior = np.clip(sharpness * np.sin(np.pi * np.minimum(frac * (1 / thickness), 1)), 0, 1)
  # The lowest ribs reach below the domes only laterally.
  posterior *= (_ramp(a - 0.1, 0.08) * _ramp(1.08 - a, 0.06)
                * _ramp(anatomy['dome'] + 0.15 + 0.3 * a - v, 0.1))
  # Anterior ribs descend medially and vanish where they turn into cartilage.
  phase_ant = (v + 0.9 + 0.35 * a) * (1 / (1.25 * spacing))
  frac_ant = phase_ant - np.floor(phase_ant)
  anterior = np.clip(sharpness * np.sin(np.pi * np.minimum(frac_ant * (1 / 0.4), 1)), 0, 1)
  anterior *= _ramp(a - 0.45, 0.15) * _ramp(1.02 - a, 0.06) * _ramp(0.2 - v, 0.2)
  return posterior + 0.45 * anterior


def _clavicles(frame, anatomy, view):
  w = anatomy['half_width']
  a = np.abs(frame.u) * (1 / w)
  # AP projection throws the clavicles higher and flatter (lordotic projection).
  lift = -0.08 if view == 'AP' else 0.0
  centre = anatomy['clavicle'] + lift - 0.16 * a + 0.2 * (a - 0.45) ** 2 * (view == 'PA')
  thickness = 0.045 - 0.01 * a
  return (_ramp(thickness / 2 - np.abs(frame.v - centre), max(0.012, 1.2 * frame.px))
          * _ramp(a - 0.08, 0.04) * _ramp(0.95 - a, 0.08))


def _body(frame, anatomy, domes):
  """Soft-tissue thickness (0 in air, about 1 at the mid-thorax)."""
  w = anatomy['half_width']
  v = frame.v
  a = np.abs(frame.u)
  # Chest wall widening into the shoulders, whose tops slope down from the neck.
  half_width = (w + 0.1 + 0.4 * _ramp(-0.6 - v, 0.3)
                - 0.1 * np.clip((v - domes[1] - 0.1) * (1 / 0.5), 0, 1))  # The waist.
  shoulder_top = -1.04 + 0.42 * np.clip(a - anatomy['neck'], 0, None) ** 0.75
  x = a * (1 / half_width)
  thickness = np.sqrt(np.clip(1 - x * x, 0, 1)) * _ramp(1.0 - x, 0.03)
  thickness = np.maximum(thickness, 0.6 * _ramp(anatomy['neck'] - a, 0.04))
  thickness *= _ramp(v - shoulder_top, 0.05)
  abdomen = _ramp(v - (domes[1] + 0.1), 0.3)
  return thickness * (0.85 + 0.2 * abdomen) * anatomy['soft_tissue']


def _lung_markings(frame, anatomy, domes, rng_seed):
  """Vessels from each hilum: wavy streaks that branch outwards and fade to the periphery."""
  rng = np.random.default_rng(rng_seed)
  bend = 0.15 * _smooth_noise(rng, frame.size, 10)
  breaks = np.clip(0.55 + 0.6 * _smooth_noise(rng, frame.size, 18), 0, 1)
  markings = 0.012 * _smooth_noise(rng, frame.size, 28)  # Parenchymal mottling.
  w = anatomy['half_width']
  for i, side in enumerate((-1, 1)):
    # Only the columns that reach this side's lung: half the trigonometry.
    reach = np.flatnonzero((frame.u * side).max(axis=0) > 0.02)
    if not reach.size:
      continue
    cols = slice(reach[0], reach[-1] + 1)
    u, v = frame.u[:, cols], frame.v[:, cols]
    hilum_u = side * (anatomy['mediastinum'] + 0.1 * w)
    hilum_v = (domes[side] - 0.38) - 0.03 * (side > 0)  # The left hilum sits higher.
    du = (u - hilum_u) * side
    dv = v - hilum_v
    r = np.hypot(du, dv) + 1e-3
    theta = np.arctan2(dv, du) + bend[:, cols]
    log_r = np.log(r)
    trunks = np.zeros_like(r)
    branches = np.zeros_like(r)
    for k, order in enumerate(anatomy['vessel_orders'][i].tolist()):
      twist = float(anatomy['vessel_twists'][i, k]) * order * 0.25
      wave = np.cos(order * theta + twist * log_r + float(anatomy['vessel_phases'][i, k]))
      if k < 3:
        trunks += wave
      else:
        branches += wave
    # Higher angular orders appear only away from the hilum: vessels multiply outwards.
    streaks = trunks + branches * _ramp(r - 0.25, 0.2)
    # Inside the hilum the vessels merge into the hilar shadow (no starburst).
    vessels = np.clip(streaks * 0.5 - 0.3, 0, 1) * breaks[:, cols] * _ramp(r - 0.08, 0.08)
    markings[:, cols] += vessels * (0.3 * np.exp(-r * (1 / 0.35)) + 0.05)
    markings[:, cols] += 0.12 * np.exp(-(r * r) * (1 / (2 * 0.045 ** 2)))  # Hilar vessels.
  return markings
