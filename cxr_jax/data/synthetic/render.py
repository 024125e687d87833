"""Rendering a study into a radiograph, and `generate_cxr`.

Devices add density and sites burn in their markers; `_render_density` composes
anatomy, findings and devices into a density map, `_expose` turns it into display
values through the site's beam, detector and software, `_quantise` stores it at the
site's bit depth.
"""

import math
from typing import Mapping, Optional, Tuple

import numpy as np
from scipy import ndimage

from cxr_jax.data.synthetic.anatomy import (_Frame, _body, _clavicles, _dome_lift, _domes, _heart,
                                            _lung_geometry, _lung_markings, _patient_frame, _ribs)
from cxr_jax.data.synthetic.drawing import _ellipse, _grid, _polyline, _ramp, _segment
from cxr_jax.data.synthetic.findings import (_airspace_opacity, _atelectasis, _lung_point, _nodules,
                                             _pleural_effusion, _pneumothorax, _tuberculosis)
from cxr_jax.data.synthetic.reports import _metadata
from cxr_jax.data.synthetic.sites import SITES, SiteProfile
from cxr_jax.data.synthetic.sampling import _Study, _sample_study, check_opacity_texture

# ---------------------------------------------------------------------------
# Devices and burned-in text.


def _devices_density(frame, anatomy, devices):
  density = np.zeros_like(frame.u)
  w = anatomy['half_width']
  wire = max(0.008, 1.0 * frame.px)
  edge = max(0.6 * frame.px, 0.004)
  if devices['ecg_leads']:
    for pu, pv in devices['lead_positions'].tolist():
      centre = (pu * (w + 0.05), -0.6 + 0.55 * pv)
      r = np.hypot(frame.u - centre[0], frame.v - centre[1])
      density += 0.5 * _ramp(0.012 - np.abs(r - 0.022), edge)
      tail = (centre[0] + 0.5 * np.sign(pu or 1), centre[1] - 0.4)
      density += 0.25 * _segment(frame.u, frame.v, centre, tail, wire, edge)
  if devices['central_line']:
    side = devices['line_side']
    points = [(side * 0.45, -1.1), (side * 0.15, -0.62), (-0.04, -0.35), (-0.04, -0.12)]
    density += 0.35 * _polyline(frame.u, frame.v, points, wire, edge)
  if devices['pacemaker']:
    box = _ellipse(frame.u, frame.v, (0.55 * w, -0.58), (0.09, 0.06), 0.2, 0.02)
    density += 2.0 * np.clip(box * 2, 0, 1)
    points = [(0.5 * w, -0.58), (0.1, -0.6), (-0.03, -0.3), (0.05, 0.1), (0.2, 0.25)]
    density += 1.2 * _polyline(frame.u, frame.v, points, wire * 1.5, edge)
  return density


_GLYPHS = {
    'A': ('01110', '10001', '10001', '11111', '10001', '10001', '10001'),
    'L': ('10000', '10000', '10000', '10000', '10000', '10000', '11111'),
    'P': ('11110', '10001', '10001', '11110', '10000', '10000', '10000'),
    'R': ('11110', '10001', '10001', '11110', '10100', '10010', '10001'),
}


def _burn_marker(image, site: SiteProfile, view: str):
  """Burns the site's marker text into a corner (in place), as technologists do."""
  size = image.shape[0]
  height = max(7, int(round(0.055 * size)))
  glyph_width = int(round(height * 5 / 7))
  gap = max(1, height // 6)
  text = site.marker.format(view=view)
  total_width = len(text) * glyph_width + (len(text) - 1) * gap
  margin = max(2, int(round((site.border + 0.03) * size)))
  top = margin if site.marker_corner[0] == 't' else size - margin - height
  left = margin if site.marker_corner[1] == 'l' else size - margin - total_width
  if site.marker_box:
    pad = max(1, height // 4)
    image[max(0, top - pad):top + height + pad, max(0, left - pad):left + total_width + pad] = 0
  rows = (np.arange(height) * 7 // height)
  cols = (np.arange(glyph_width) * 5 // glyph_width)
  for i, char in enumerate(text):
    bitmap = np.array([[c == '1' for c in row] for row in _GLYPHS[char]])
    x0 = left + i * (glyph_width + gap)
    patch = image[top:top + height, x0:x0 + glyph_width]
    patch[bitmap[rows][:, cols]] = 1.0


# ---------------------------------------------------------------------------
# Rendering.


def _render_density(study: _Study, frame: _Frame, opacity_texture: float = 0.0) -> np.ndarray:
  anatomy, findings = study.anatomy, study.findings
  domes = _domes(anatomy)
  lift = _dome_lift(findings)
  body = _body(frame, anatomy, domes)
  heart = _heart(frame, anatomy, findings)
  knob_centre = (anatomy['mediastinum'] - 0.005, anatomy['apex'] + 0.4)
  knob = _ellipse(frame.u, frame.v, knob_centre, (anatomy['aortic_knob'],) * 2, 0.0,
                  max(0.015, frame.px))
  lung_masks = {side: _lung_geometry(frame, anatomy, side, domes[side], lift[side])
                for side in (-1, 1)}
  lungs = (lung_masks[-1] + lung_masks[1]) * (1 - heart) * (1 - knob)

  # Lungs are air: most of the beam's path through the mid-chest, less at its edges.
  air = lungs * (0.58 * anatomy['aeration'] * body)
  fill = np.zeros_like(frame.u)
  extra_air = np.zeros_like(frame.u)
  extra_density = np.zeros_like(frame.u)
  markings_visible = np.ones_like(frame.u)
  present = {name: params['present'] for name, params in findings.items()}

  def add_fill(f):
    np.maximum(fill, f, out=fill)

  if present['airspace_opacity']:
    add_fill(_airspace_opacity(frame, anatomy, domes, findings['airspace_opacity'],
                               opacity_texture))
  if present['pleural_effusion']:
    # Fluid lies on the diaphragm, raised or not.
    bases = {side: domes[side] - lift[side] for side in domes}
    add_fill(_pleural_effusion(frame, anatomy, bases, findings['pleural_effusion'],
                               study.view))
  if present['tuberculosis']:
    tb_fill, cavity = _tuberculosis(frame, anatomy, domes, findings['tuberculosis'])
    add_fill(tb_fill)
    extra_air += 0.1 * cavity * lungs
  if present['atelectasis']:
    at_fill, retrocardiac = _atelectasis(frame, anatomy, domes, findings['atelectasis'],
                                         heart)
    add_fill(at_fill)
    extra_density += retrocardiac
  if present['nodule']:
    extra_density += _nodules(frame, anatomy, domes, findings['nodule']) * lungs
  if present['pneumothorax']:
    region, line = _pneumothorax(frame, anatomy, domes, lift, findings['pneumothorax'],
                                 lung_masks)
    region *= lungs
    markings_visible -= region
    extra_air += 0.1 * region
    extra_density += 0.1 * line * (1 - heart)

  devices = study.devices
  if devices['granulomas']:
    for k in range(devices['granulomas']):
      side = int(devices['granuloma_sides'][k])
      cu, cv = _lung_point(anatomy, domes, side, *devices['granuloma_positions'][k].tolist())
      r = np.hypot(frame.u - cu, frame.v - cv)
      extra_density += 0.5 * _ramp(0.012 - r, max(frame.px, 0.006))

  markings = _lung_markings(frame, anatomy, domes, anatomy['lung_texture_seed'])
  aerated = lungs * (1 - fill)
  density = body - air * (1 - fill) + markings * aerated * markings_visible - extra_air
  # The heart is a little denser than the mediastinum, until it merges with the abdomen.
  density += 0.06 * heart * (1 - lungs) * _ramp(domes[1] - frame.v, 0.05)
  density += extra_density

  # Bones.
  w = anatomy['half_width']
  bone_in_body = _ramp(body - 0.05, 0.1)
  # Ribs stand out against aerated lung; over the abdomen scatter and noise hide them.
  rib_visibility = 0.35 + 0.65 * _ramp(domes[1] + 0.12 - frame.v, 0.15)
  density += anatomy['rib_density'] * _ribs(frame, anatomy) * bone_in_body * rib_visibility
  density += 0.2 * _clavicles(frame, anatomy, study.view)
  spine = _ramp(0.055 - np.abs(frame.u), max(0.01, frame.px))
  vertebrae = 0.85 + 0.15 * np.cos(frame.v * (2 * np.pi / 0.09))
  density += 0.13 * spine * vertebrae
  trachea = _ramp(0.03 - np.abs(frame.u), max(0.01, frame.px)) * _ramp(
      anatomy['apex'] + 0.45 - frame.v, 0.05)
  density -= 0.22 * trachea
  for side in (-1, 1):
    humerus = _ellipse(frame.u, frame.v, (side * (w + 0.38), -0.75), (0.15, 0.15), 0.0, 0.05)
    density += 0.18 * humerus
    if study.view == 'AP':  # Scapulae project over the lungs unless rotated out (PA).
      scapula = _ramp(np.abs(frame.u) - (w * 0.72 + 0.25 * (frame.v + 0.7)), 0.03) * _ramp(
          w + 0.05 - np.abs(frame.u), 0.03) * _ramp(frame.v + 0.75, 0.05) * _ramp(
              -0.15 - frame.v, 0.1)
      density += 0.07 * scapula
  if anatomy['breast'] > 0:
    for side in (-1, 1):
      centre = (side * 0.55 * w, domes[side] - 0.05)
      radius = 0.18 + 0.14 * anatomy['breast']
      breast = _ellipse(frame.u, frame.v, centre, (radius * 1.2, radius), 0.0, 0.06)
      breast *= _ramp(centre[1] + 0.5 * radius - frame.v, 0.02)  # Inframammary fold.
      density += 0.13 * anatomy['breast'] * breast
  gas = anatomy['stomach_gas']
  stomach = _ellipse(frame.u, frame.v, (0.42 * w, domes[1] + 0.08 + 0.5 * gas[1]),
                     (gas[1], 0.6 * gas[1]), 0.0, 0.03)
  density -= gas[0] * stomach * body
  density += _devices_density(frame, anatomy, devices)
  return np.maximum(density, 0)


def _expose(density, study: _Study, frame: _Frame) -> np.ndarray:
  """Beam, detector and export software: density -> display values in [0, 1]."""
  site = SITES[study.site]
  anatomy = study.anatomy
  size = frame.size
  rng = np.random.default_rng(anatomy['noise_seed'])
  transmitted = np.exp(density * np.float32(-site.attenuation * anatomy['penetration']))
  # Scatter: a broad haze that flattens contrast where the beam is weak. It is smooth,
  # so a quarter-resolution estimate suffices.
  scatter = ndimage.uniform_filter(transmitted[::4, ::4], max(3, size // 16), mode='nearest')
  scatter = np.repeat(np.repeat(scatter, 4, 0), 4, 1)[:size, :size]
  transmitted = transmitted + site.scatter * scatter
  blur = site.blur * size
  if blur > 0.3:
    transmitted = ndimage.gaussian_filter(transmitted, blur, mode='nearest')
  # Small images are resampled from a larger detector image, which averages noise
  # partly away: noise is set at 256 px and scales as sqrt(size / 256).
  pixel_scale = np.float32((size / 256) ** 0.5 / np.sqrt(anatomy['dose']))
  noise = rng.standard_normal((2, size, size), dtype=np.float32)
  transmitted = (transmitted
                 + np.sqrt(transmitted) * noise[0] * (site.quantum_noise * pixel_scale)
                 + noise[1] * (site.electronic_noise * pixel_scale))
  signal = -np.log(np.maximum(transmitted, 1e-4))
  grid_x, grid_y = _grid(size)
  angle, slope = anatomy['heel']
  signal += slope * (math.cos(angle) * grid_x + math.sin(angle) * grid_y)
  if site.edge_enhance:
    background = ndimage.uniform_filter(signal, max(3, int(0.06 * size) | 1), mode='nearest')
    signal = signal + site.edge_enhance * (signal - background)
  sample = signal[::max(1, size // 128), ::max(1, size // 128)]
  lo, hi = map(float, np.percentile(sample, anatomy['window']))
  x = np.clip((signal - lo) * (1 / max(hi - lo, 1e-6)), 0, 1)
  x = x ** np.float32(site.gamma * anatomy['gamma'])
  if site.s_curve:
    x = (1 - site.s_curve) * x + site.s_curve * (x * x * (3 - 2 * x))
  if site.grid_lines:
    rows = np.arange(size, dtype=np.float32)[:, None]
    x = np.clip(x + site.grid_lines * np.cos(rows * (2 * np.pi * 0.42)), 0, 1)
  x = site.black_level + (site.white_level - site.black_level) * x
  if site.border:
    jitter = 1 + 0.3 * (rng.random(4) - 0.5)
    widths = np.maximum(1, np.round(site.border * size * jitter)).astype(int)
    x[:widths[0]] = site.border_value
    x[size - widths[1]:] = site.border_value
    x[:, :widths[2]] = site.border_value
    x[:, size - widths[3]:] = site.border_value
  _burn_marker(x, site, study.view)
  return x


def _quantise(x, bits):
  levels = (1 << bits) - 1
  stored = np.round(x * levels).astype(np.uint32)
  return (stored * 65535 // levels).astype(np.uint16)


def generate_cxr(index: int, *, seed: int = 0, site: str = 'A', image_size: int = 128,
                 label_noise: float = 0.1,
                 findings_override: Optional[Mapping[str, bool]] = None,
                 severity_range: Tuple[float, float] = (0.0, 1.0),
                 mine_labels: bool = False, variability: float = 1.0,
                 opacity_texture: float = 0.0) -> dict:
  """One synthetic frontal chest radiograph with labels, metadata and report.

  Args:
    index: example number; consecutive indices may share a patient.
    seed: dataset seed; with `site` and `index` it fixes the example.
    site: a key of SITES; sites differ in scanner and processing, not anatomy.
    image_size: height and width in pixels (>= 32).
    label_noise: probability that report mining garbles each label.
    findings_override: finding -> present, forcing findings on or off while every
      other part of the example (anatomy, noise, other findings) stays the same.
    severity_range: (low, high) in [0, 1]: every finding's severity is drawn on [0, 1]
      and rescaled into it. (0, 1) is the full spectrum from subtle to obvious; a
      higher floor keeps findings visible at small image sizes (the quickstart's 32 px).
    mine_labels: take 'labels' (and 'abnormal', 'no_finding') from the report, read by
      `cxr_jax.text.labeler` (see `mine_report_labels`), instead of the generator's codes.
    variability: how widely positioning (shift, rotation, patient size and distance)
      and acquisition (dose, penetration, tone, heel effect) vary between studies, as
      a multiple of the default spreads: 1 is a well-positioned department; real
      archives vary more (2 to 3), which is what keeps a linear model on raw pixels
      from finding findings by their place in the image. The same draws are made at
      every value, so a study's patient, findings and report do not depend on it.
    opacity_texture: in [0, 1], how much of an airspace opacity's density breaks into
      mottled blobs instead of an even haze: 0 (the default) is the haze, 1 is fully
      mottled. The finding stays where and as large as it was, with much less density
      on average. Meant to be what raw pixels lose and a convolution keeps; measured
      at 28-56 px it lowers both alike (BENCHMARKS.md, issue 13). Labels, reports and
      every other pixel are unchanged.

  Returns:
    dict with 'image' uint16 [H, W]; 'true_labels' int8 [K] (0/1, order of
    CXR_FINDINGS); 'labels' int8 [K] report-mined codes; 'true_abnormal' (0/1),
    'abnormal' and 'no_finding' (codes) int8; 'patient_id', 'study_id', 'sex'
    ('F'|'M'), 'age' (int), 'view' ('PA'|'AP'), 'site', 'report' (str).
  """
  if not (isinstance(image_size, (int, np.integer)) and image_size >= 32):
    raise ValueError(f'image_size must be an integer >= 32, got {image_size!r}.')
  study = _sample_study(index, seed, site, label_noise, findings_override, severity_range,
                        variability)
  frame = _patient_frame(int(image_size), study.anatomy)
  density = _render_density(study, frame, check_opacity_texture(opacity_texture))
  display = _expose(density, study, frame)
  example = _metadata(study, mine_labels)
  example['image'] = _quantise(display, SITES[site].bits)
  return example
