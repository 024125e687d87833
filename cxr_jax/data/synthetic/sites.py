"""Sites: the same anatomy seen through different scanners and export software.

A `SiteProfile` is what one hospital's detector and image processing do to a
radiograph; `SITES` are the three the generator knows (A, B, C).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class SiteProfile:
  """What one hospital's detector and image processing do to a radiograph."""
  description: str
  attenuation: float  # Beam hardness: scales how strongly density absorbs (contrast).
  quantum_noise: float  # Photon-noise std at unit transmission (256 px reference).
  electronic_noise: float  # Additive detector noise std (256 px reference).
  scatter: float  # Scattered fraction reaching the detector (lower with a grid).
  blur: float  # Detector/resampling blur sigma, as a fraction of the image width.
  edge_enhance: float  # Unsharp-mask gain of the export software.
  gamma: float  # Tone exponent after windowing; > 1 darkens mid-tones.
  s_curve: float  # Blend (0..1) towards a sigmoid contrast curve.
  black_level: float  # Pedestal the export adds, as a fraction of the range.
  white_level: float  # Highest anatomy value, as a fraction of the range.
  bits: int  # Stored bit depth, scaled up to 16 bits on export.
  marker: str  # Burned-in marker text; '{view}' becomes the study's view.
  marker_corner: str  # 'tl', 'tr', 'bl' or 'br'.
  marker_box: bool  # Marker drawn white on a black box.
  border: float  # Collimation border width as a fraction of the image (0: none).
  border_value: float  # Border intensity, 0 black to 1 white.
  grid_lines: float  # Amplitude of anti-scatter grid lines (0: none).


SITES = {
    'A': SiteProfile(
        description='Flat-panel DR, mild processing, native 16 bit.',
        attenuation=2.4, quantum_noise=0.012, electronic_noise=0.002, scatter=0.04,
        blur=0.0015, edge_enhance=0.35, gamma=1.0, s_curve=0.25, black_level=0.0, white_level=1.0,
        bits=16, marker='L', marker_corner='tr', marker_box=False, border=0.0,
        border_value=0.0, grid_lines=0.0),
    'B': SiteProfile(
        description='Older computed radiography: noisier, softer, flat tone curve, '
                    'pedestal, 12-bit, grid lines, white collimation edges.',
        attenuation=2.0, quantum_noise=0.03, electronic_noise=0.006, scatter=0.1,
        blur=0.005, edge_enhance=0.0, gamma=1.35, s_curve=0.0, black_level=0.07, white_level=0.93,
        bits=12, marker='R', marker_corner='tl', marker_box=True, border=0.035,
        border_value=1.0, grid_lines=0.025),
    'C': SiteProfile(
        description='DR with strong edge enhancement and a steep sigmoid curve, '
                    '14-bit, black collimation border.',
        attenuation=2.8, quantum_noise=0.018, electronic_noise=0.003, scatter=0.03,
        blur=0.0025, edge_enhance=0.9, gamma=0.8, s_curve=0.7, black_level=0.02, white_level=1.0,
        bits=14, marker='{view}', marker_corner='bl', marker_box=False, border=0.05,
        border_value=0.0, grid_lines=0.0),
}
