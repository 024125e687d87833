"""Loading published weights into the zoo's modules.

Each architecture names the file format it reads (`weights_format`); a reader turns
the file into a flat `{(collection, *path): array}` dict in the module's own layout,
and `load_pretrained` fits that onto a fresh initialisation: every missing,
unexpected or mis-shaped key is reported in one error, and the head is kept,
dropped or re-initialised as the model and the `head` argument say.
"""

import os
from typing import Any, Callable, Dict, Tuple

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

FlatVariables = Dict[Tuple[str, ...], np.ndarray]

HEAD_POLICIES = ('auto', 'keep', 'replace')


def read_bit_npz(path: str, model=None) -> FlatVariables:
  """Reads a published BiT `.npz` (keys `resnet/...`, kernels HWIO)."""
  del model  # The file's keys already name the module's scopes.
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {key: archive[key] for key in archive.files}
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: cannot read as a BiT .npz weights file: {e}') from e
  prefix = 'resnet/'
  foreign = sorted(k for k in arrays if not k.startswith(prefix))
  if foreign:
    raise ValueError(f'{path}: not a BiT weights file; keys without the {prefix!r} prefix: '
                     f'{", ".join(foreign[:10])}{" ..." if len(foreign) > 10 else ""}')
  return {('params', *k[len(prefix):].split('/')): v for k, v in arrays.items()}


def _read_keras_h5(path: str, model) -> FlatVariables:
  from cxr_jax.models import keras_weights  # h5py is only needed for this format.
  return keras_weights.read_keras_efficientnet(path, model)


# Readers get the model too: some formats only make sense given the architecture.
READERS: Dict[str, Callable[[str, Any], FlatVariables]] = {
    'bit_npz': read_bit_npz,
    'keras_h5': _read_keras_h5,
}


# Compiling a large model's init takes tens of seconds on CPU; compile once per
# distinct model configuration (a module's repr lists all its fields).
_JITTED_INITS: Dict[Tuple[str, int], Callable] = {}


def init_variables(model, rng=None, image_size: int = 64) -> Dict[str, Any]:
  """Initialises all variable collections; parameter shapes do not depend on image size."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  key = (repr(model), image_size)
  if key not in _JITTED_INITS:
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    _JITTED_INITS[key] = jax.jit(lambda r: model.init(r, images, train=False))
  return _JITTED_INITS[key](rng)


def _fmt(key: Tuple[str, ...]) -> str:
  return '/'.join(key)


def fit_variables(model, initial: Dict[str, Any], loaded: FlatVariables, *,
                  source: str, head: str = 'auto') -> Dict[str, Any]:
  """Overlays `loaded` on `initial` (the model's own init) under the head/truncation rules."""
  if head not in HEAD_POLICIES:
    raise ValueError(f'head={head!r}; expected one of {HEAD_POLICIES}.')
  expected = flax.traverse_util.flatten_dict(flax.core.unfreeze(initial))
  head_prefix = ('params', model.head_scope)
  in_head = lambda key: key[:2] == head_prefix
  truncated = getattr(model, 'truncate', 0) > 0
  removed_scopes = model.removed_scopes()

  out = dict(expected)
  missing, unexpected, misshaped, notes = [], [], [], []
  for key, value in loaded.items():
    if in_head(key):
      continue
    if key not in expected:
      if key[1] not in removed_scopes:
        unexpected.append(_fmt(key))
    elif value.shape != expected[key].shape:
      if truncated and key[1] in model.after_body_scopes:
        notes.append(f'{_fmt(key)} re-initialised (width changed by truncation)')
      else:
        misshaped.append(f'{_fmt(key)}: file {value.shape} vs model {expected[key].shape}')
    else:
      out[key] = value
  missing = [_fmt(k) for k in expected if not in_head(k) and k not in loaded]

  model_head = [k for k in expected if in_head(k)]
  file_head = {k: v for k, v in loaded.items() if in_head(k)}
  if not model_head:
    if file_head:
      notes.append(f'{model.head_scope} in the file dropped (the model has no classifier)')
  elif head == 'replace' or not file_head:
    if head == 'keep':
      missing += [_fmt(k) for k in model_head]
    notes.append(f'{model.head_scope} initialised afresh')
  else:
    fits = all(k in file_head and file_head[k].shape == expected[k].shape for k in model_head)
    if fits and len(file_head) == len(model_head):
      out.update(file_head)
    elif head == 'keep':
      misshaped += [f'{_fmt(k)}: file {file_head[k].shape if k in file_head else "absent"} '
                    f'vs model {expected[k].shape}' for k in model_head]
    else:
      notes.append(f'{model.head_scope} initialised afresh (file head does not fit '
                   f'num_classes={getattr(model, "num_classes", None)})')

  problems = [(f'missing ({len(missing)})', missing),
              (f'unexpected ({len(unexpected)})', unexpected),
              (f'mis-shaped ({len(misshaped)})', misshaped)]
  if any(items for _, items in problems):
    lines = [f'{source}: weights do not fit {type(model).__name__}:']
    for title, items in problems:
      if items:
        lines.append(f'  {title}:')
        lines.extend(f'    {item}' for item in sorted(items))
    raise ValueError('\n'.join(lines))
  for note in notes:
    logging.info('%s: %s', source, note)
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, dtype=expected[k].dtype) for k, v in out.items()})


def load_pretrained(model, path: str, *, head: str = 'auto', rng=None) -> Dict[str, Any]:
  """Returns variables for `model` filled from a published weights file at `path`.

  Args:
    model: a module from `get_model`; its `weights_format` picks the file reader
      (BiT: `.npz`; EfficientNet: Keras `.h5` / `.weights.h5`).
    path: local file; nothing is downloaded.
    head: 'auto' keeps the file's classifier when it fits `num_classes` and
      re-initialises it otherwise; 'keep' demands that it fits; 'replace' always
      re-initialises it. A model with `num_classes=None` drops it.
    rng: PRNG key for the parts that are initialised afresh.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Pretrained weights file not found: {path}')
  fmt = getattr(type(model), 'weights_format', None)
  if fmt not in READERS:
    raise ValueError(f'{type(model).__name__} has no published-weights reader.')
  loaded = READERS[fmt](path, model)
  return fit_variables(model, init_variables(model, rng), loaded, source=path, head=head)
