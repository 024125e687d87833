"""BiT (ResNet-v2, GroupNorm, weight standardization) in PyTorch: the reference for vs_pytorch.py.

Written from the published architecture (Kolesnikov et al. 2020, "Big Transfer"):
a 7x7/2 weight-standardized root conv, 3x3/2 max pooling, pre-activation bottleneck
units (GroupNorm(32) -> ReLU -> conv; the stride on the 3x3 conv; a 1x1 projection of
the pre-activated input where the shape changes), a final GroupNorm -> ReLU, global
average pooling and a 1x1-conv head. `load_flat` takes cxr_jax's parameter tree
flattened to '/'-joined names, so both frameworks can run the same weights.

Imports torch: only the benchmark's separate environment has it, never the package.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

WS_EPS = 1e-10
GN_GROUPS = 32
GN_EPS = 1e-5
UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class StdConv2d(nn.Conv2d):
  """Conv2d whose weight is standardized per output channel (biased variance)."""

  def forward(self, x):
    w = self.weight
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = (w - mean).square().mean(dim=(1, 2, 3), keepdim=True)
    w = (w - mean) / torch.sqrt(var + WS_EPS)
    return F.conv2d(x, w, None, self.stride, self.padding)


def _gn(channels):
  return nn.GroupNorm(GN_GROUPS, channels, eps=GN_EPS)


class Unit(nn.Module):
  """Pre-activation bottleneck unit."""

  def __init__(self, cin, mid, stride):
    super().__init__()
    cout = 4 * mid
    self.gn_a, self.conv_a = _gn(cin), StdConv2d(cin, mid, 1, bias=False)
    self.gn_b = _gn(mid)
    self.conv_b = StdConv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
    self.gn_c, self.conv_c = _gn(mid), StdConv2d(mid, cout, 1, bias=False)
    self.proj = (StdConv2d(cin, cout, 1, stride=stride, bias=False)
                 if cin != cout or stride != 1 else None)

  def forward(self, x):
    pre = F.relu(self.gn_a(x))
    shortcut = self.proj(pre) if self.proj is not None else x
    y = self.conv_a(pre)
    y = self.conv_b(F.relu(self.gn_b(y)))
    y = self.conv_c(F.relu(self.gn_c(y)))
    return y + shortcut


class BiT(nn.Module):

  def __init__(self, depth=50, width=1, num_classes=14):
    super().__init__()
    root = 64 * width
    self.root = StdConv2d(3, root, 7, stride=2, padding=3, bias=False)
    blocks, cin = [], root
    for i, num_units in enumerate(UNITS[depth]):
      mid = root * 2**i
      units = []
      for u in range(num_units):
        units.append(Unit(cin, mid, (1 if i == 0 else 2) if u == 0 else 1))
        cin = 4 * mid
      blocks.append(nn.Sequential(*units))
    self.blocks = nn.Sequential(*blocks)
    self.gn = _gn(cin)
    self.head = nn.Conv2d(cin, num_classes, 1)

  def forward(self, x):  # x: [B, 3, H, W] in [-1, 1].
    x = self.root(x)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)
    x = F.relu(self.gn(self.blocks(x)))
    x = x.mean(dim=(2, 3), keepdim=True)
    return self.head(x)[:, :, 0, 0]

  def load_flat(self, flat):
    """Copies cxr_jax's flattened BiT parameters ('block1/unit01/a/...') into this module."""
    def conv(module, key):
      module.weight.data = torch.from_numpy(np.ascontiguousarray(
          flat[key].transpose(3, 2, 0, 1)))

    def norm(module, key):
      module.weight.data = torch.from_numpy(flat[f'{key}/gamma'])
      module.bias.data = torch.from_numpy(flat[f'{key}/beta'])

    conv(self.root, 'root_block/standardized_conv2d/kernel')
    for i, block in enumerate(self.blocks):
      for u, unit in enumerate(block):
        p = f'block{i + 1}/unit{u + 1:02d}'
        for part in 'abc':
          norm(getattr(unit, f'gn_{part}'), f'{p}/{part}/group_norm')
          conv(getattr(unit, f'conv_{part}'), f'{p}/{part}/standardized_conv2d/kernel')
        if unit.proj is not None:
          conv(unit.proj, f'{p}/a/proj/standardized_conv2d/kernel')
    norm(self.gn, 'group_norm')
    conv(self.head, 'head/conv2d/kernel')
    self.head.bias.data = torch.from_numpy(flat['head/conv2d/bias'])
