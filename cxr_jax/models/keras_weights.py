"""Reads Keras EfficientNet weight files into the layout of `efficientnet.EfficientNet`.

Two formats exist:
  * legacy HDF5 (the published keras-applications `efficientnetb*.h5` files, Keras 2
    `save_weights('x.h5')`, Keras 3 `legacy_h5_format`): a root attribute
    `layer_names`, and per layer a group whose `weight_names` attribute lists its
    datasets (`stem_bn/gamma`, or `stem_bn/gamma:0` from Keras 2). A full-model
    `.h5` holds the same under `model_weights`.
  * Keras 3 `.weights.h5`: `layers/<auto_name>/vars/<i>`, where auto_name is the
    snake-cased class name plus a per-class counter in creation order
    (`conv2d_3`), so the layer it belongs to comes from the architecture's order.
"""

import re
from typing import Dict, Iterable, List, Optional, Tuple

import h5py
import numpy as np

FlatVariables = Dict[Tuple[str, ...], np.ndarray]

# Keras weight name -> (collection, variable name) in the Flax module.
# `count` is Normalization's bookkeeping for adapt(); it does not affect the output.
_TARGETS = {
    'kernel': ('params', 'kernel'),
    'depthwise_kernel': ('params', 'kernel'),  # Keras 2 DepthwiseConv2D.
    'bias': ('params', 'bias'),
    'gamma': ('params', 'scale'),
    'beta': ('params', 'bias'),
    'moving_mean': ('batch_stats', 'mean'),
    'moving_variance': ('batch_stats', 'var'),
    'mean': ('constants', 'mean'),
    'variance': ('constants', 'variance'),
    'count': None,
}

# Keras 3 class name -> (auto-name base, names of `vars/0`, `vars/1`, ...).
_KERAS3_CLASSES = {
    'Normalization': ('normalization', ('mean', 'variance', 'count')),
    'Conv2D': ('conv2d', ('kernel', 'bias')),
    'DepthwiseConv2D': ('depthwise_conv2d', ('kernel', 'bias')),
    'BatchNormalization': ('batch_normalization',
                           ('gamma', 'beta', 'moving_mean', 'moving_variance')),
    'Dense': ('dense', ('kernel', 'bias')),
}

# Keras numbers layers per session, so a second model's is `normalization_1`.
_NORMALIZATION_NAME = re.compile(r'normalization(_\d+)?$')


def _scope(layer_name: str) -> Tuple[str, ...]:
  """Keras layer name -> module scope: 'block2a_se_reduce' -> ('block2a', 'se_reduce')."""
  if _NORMALIZATION_NAME.match(layer_name):
    return ('normalization',)
  if re.match(r'block\d+[a-z]+_', layer_name):
    return tuple(layer_name.split('_', 1))
  return (layer_name,)


def _convert(layer_name: str, weight_name: str, value: np.ndarray, path: str
             ) -> Optional[Tuple[Tuple[str, ...], np.ndarray]]:
  """One Keras weight -> (flat key, array) in the module's layout; None if unused."""
  if weight_name not in _TARGETS:
    raise ValueError(f'{path}: layer {layer_name!r} has an unknown weight '
                     f'{weight_name!r}; expected one of {", ".join(_TARGETS)}.')
  target = _TARGETS[weight_name]
  if target is None:
    return None
  collection, variable = target
  value = np.asarray(value)
  if layer_name.endswith('dwconv') and variable == 'kernel':
    # Keras (k, k, C, 1) -> Flax grouped conv (k, k, 1, C).
    value = np.swapaxes(value, 2, 3)
  if collection == 'constants':
    value = value.reshape(-1)  # Older Keras kept a broadcastable (1, 1, 1, C) shape.
  return (collection, *_scope(layer_name), variable), value


def _read_attr_list(group: h5py.Group, name: str) -> Optional[List[str]]:
  """A string-list attribute, which Keras splits into `name0`, `name1`, ... when large."""
  if name in group.attrs:
    values = list(group.attrs[name])
  elif f'{name}0' in group.attrs:
    values, i = [], 0
    while f'{name}{i}' in group.attrs:
      values.extend(group.attrs[f'{name}{i}'])
      i += 1
  else:
    return None
  return [v.decode('utf8') if isinstance(v, bytes) else str(v) for v in values]


def _read_legacy(root: h5py.Group, path: str) -> FlatVariables:
  layer_names = _read_attr_list(root, 'layer_names')
  out = {}
  for layer_name in layer_names:
    if layer_name not in root:
      raise ValueError(f'{path}: layer {layer_name!r} is listed in layer_names but has '
                       f'no group in the file.')
    group = root[layer_name]
    weight_names = _read_attr_list(group, 'weight_names')
    if weight_names is None:
      raise ValueError(f'{path}: layer {layer_name!r} has no weight_names attribute; '
                       f'not a Keras weights file?')
    for weight_name in weight_names:
      if weight_name not in group:
        raise ValueError(f'{path}: layer {layer_name!r} lists weight {weight_name!r} '
                         f'but the file has no such dataset.')
      # 'stem_bn/gamma:0' (Keras 2) or 'stem_bn/gamma' (Keras 3) -> 'gamma'.
      short_name = weight_name.rsplit('/', 1)[-1].split(':', 1)[0]
      converted = _convert(layer_name, short_name, group[weight_name][()], path)
      if converted is not None:
        key, value = converted
        if key in out:
          raise ValueError(f'{path}: weight {"/".join(key)} appears twice '
                           f'(second time in layer {layer_name!r}).')
        out[key] = value
  return out


def _auto_names(layers: Iterable[Tuple[str, str]]) -> Dict[str, Tuple[str, str]]:
  """Keras 3 auto-name ('conv2d_3') -> (layer name, class name), numbered per class."""
  counts, names = {}, {}
  for layer_name, class_name in layers:
    base = _KERAS3_CLASSES[class_name][0]
    n = counts.get(base, 0)
    counts[base] = n + 1
    names[base if n == 0 else f'{base}_{n}'] = (layer_name, class_name)
  return names


def _read_keras3(root: h5py.Group, path: str, model) -> FlatVariables:
  if not hasattr(model, 'keras_layers'):
    raise ValueError(f'{path}: a Keras 3 .weights.h5 file names layers by creation order; '
                     f'{type(model).__name__} does not say what that order is.')
  known = _auto_names(model.keras_layers())
  out = {}
  for auto_name, group in root['layers'].items():
    variables = group.get('vars')
    if variables is None or not len(variables):
      continue  # Activations, pooling, padding, ...: nothing to load.
    if auto_name not in known:
      raise ValueError(
          f'{path}: layer group layers/{auto_name} has weights but the '
          f'{type(model).__name__} architectures (width {model.width_coefficient}, '
          f'depth {model.depth_coefficient}) have no such layer; a different variant?')
    layer_name, class_name = known[auto_name]
    var_names = _KERAS3_CLASSES[class_name][1]
    for index in variables:
      if not index.isdigit() or int(index) >= len(var_names):
        raise ValueError(f'{path}: layers/{auto_name}/vars/{index} is not a weight of a '
                         f'Keras {class_name} (expected vars 0..{len(var_names) - 1}).')
      converted = _convert(layer_name, var_names[int(index)], variables[index][()], path)
      if converted is not None:
        out[converted[0]] = converted[1]
  return out


def read_keras_efficientnet(path: str, model) -> FlatVariables:
  """Reads a Keras EfficientNet weights file (either format) as `{(collection, *path): array}`.

  Only file-format problems are reported here; missing, unexpected and mis-shaped
  variables are left to `weights.fit_variables`, which sees the model.
  """
  try:
    is_hdf5 = h5py.is_hdf5(path)
  except OSError as e:
    raise ValueError(f'{path}: cannot open: {e}') from e
  if not is_hdf5:
    raise ValueError(f'{path}: not an HDF5 file; expected Keras EfficientNet weights '
                     f'(.h5 or .weights.h5).')
  with h5py.File(path, 'r') as f:
    root = f['model_weights'] if 'model_weights' in f else f
    if _read_attr_list(root, 'layer_names') is not None:
      loaded = _read_legacy(root, path)
    elif isinstance(root.get('layers'), h5py.Group):
      loaded = _read_keras3(root, path, model)
    else:
      raise ValueError(f'{path}: HDF5 file is not Keras weights: no layer_names attribute '
                       f'(legacy .h5) and no layers/ group (Keras 3 .weights.h5).')
  if not loaded:
    raise ValueError(f'{path}: Keras weights file holds no weights.')
  return loaded
