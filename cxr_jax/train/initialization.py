"""A stage's starting variables: fresh, then published weights or an earlier run's parts.

Every stage merges what it starts from the same way (`merge_variables`): leaf by leaf,
shapes checked, over a fresh initialisation. What differs between stages is only which
parts of an earlier run they take and whether those parts may lack leaves (see
`trainer.Stage`).
"""

from typing import Any, Dict, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import models
from cxr_jax.train import checkpointing

Variables = Dict[str, Any]  # {collection: {part: tree}}, e.g. {'params': {'backbone': ...}}


def variables_from_workdir(workdir: str, parts: Sequence[str] = ('backbone',)
                           ) -> Dict[str, Variables]:
  """{part: variables} of an earlier stage's latest checkpoint, for each of `parts`."""
  state, _, _ = checkpointing.read_checkpoint(workdir)
  return _parts_of(state, parts, workdir)


def _parts_of(state, parts: Sequence[str], workdir: str) -> Dict[str, Variables]:
  out = {}
  for part in parts:
    if part not in state['params']:
      raise ValueError(f'The checkpoint in {workdir} has no {part} parameters.')
    out[part] = {'params': state['params'][part]}
    for collection, tree in state['model_state'].items():
      if part in tree:
        out[part][collection] = tree[part]
  return out


def merge_variables(variables: Variables, loaded: Dict[str, Variables], source: str, *,
                    partial: bool = False, hint: str = '') -> Variables:
  """`loaded` ({part: {collection: tree}}) over `variables` leaf by leaf; returns variables.

  Shapes must agree. Unless `partial`, a loaded part must have exactly the leaves of the
  run's part; with `partial`, leaves the run has and `loaded` lacks (a head added now)
  start fresh and are logged, and leaves the run lacks are ignored. `hint` ends the
  error messages (what must match the earlier run).
  """
  fresh_leaves = []
  by_collection = {}
  for part, part_variables in loaded.items():
    for collection, tree in part_variables.items():
      if collection not in variables and not partial:
        raise ValueError(f'{source}: the {part} has {collection}, which this run\'s model '
                         f'lacks. {hint}')
      by_collection.setdefault(collection, {})[part] = tree
  for collection, loaded_parts in by_collection.items():
    if collection not in variables:
      continue
    fresh_flat = flax.traverse_util.flatten_dict(variables[collection], sep='/')
    loaded_flat = flax.traverse_util.flatten_dict(loaded_parts, sep='/')
    if not partial:
      for part in loaded_parts:
        in_part = lambda paths: {p for p in paths if p.split('/')[0] == part}
        missing = sorted(in_part(fresh_flat) - in_part(loaded_flat))
        unexpected = sorted(in_part(loaded_flat) - in_part(fresh_flat))
        if missing or unexpected:
          raise ValueError(f'{source}: the {part} does not fit this run\'s {part} '
                           f'({collection}: missing {missing[:5]}, unexpected '
                           f'{unexpected[:5]}). {hint}')
    for path, value in fresh_flat.items():
      if path.split('/')[0] not in loaded_parts:
        continue
      if path not in loaded_flat:
        fresh_leaves.append(f'{collection}/{path}')
        continue
      if tuple(np.shape(loaded_flat[path])) != tuple(value.shape):
        raise ValueError(f'{source}: {collection}/{path} has shape '
                         f'{tuple(np.shape(loaded_flat[path]))}, the model expects '
                         f'{tuple(value.shape)}. {hint}')
      fresh_flat[path] = jnp.asarray(loaded_flat[path])
    variables[collection] = flax.traverse_util.unflatten_dict(fresh_flat, sep='/')
  if fresh_leaves:
    logging.info('Not in %s, initialised fresh: %s', source, ', '.join(fresh_leaves))
  return variables


def initial_variables(network, config, rng, *, init_inputs: Dict[str, Any],
                      parts_of_run, partial: bool, hint: str) -> Variables:
  """Fresh variables, then `config.init`: published backbone weights, or an earlier run.

  `parts_of_run(saved_params)` names the parts taken from `config.init.workdir`'s
  checkpoint, given its parameters' top-level names.
  """
  variables = flax.core.unfreeze(jax.jit(
      lambda r: network.init(r, **init_inputs, train=False))(rng))
  if config.init.weights and config.init.workdir:
    raise ValueError('Set config.init.weights or config.init.workdir, not both.')
  if config.init.weights:
    source = config.init.weights
    loaded = {'backbone': models.load_pretrained(network.backbone, config.init.weights)}
  elif config.init.workdir:
    source = config.init.workdir
    checkpointing.require_complete(config.init.workdir, 'config.init.workdir')
    state, _, _ = checkpointing.read_checkpoint(config.init.workdir)
    loaded = _parts_of(state, parts_of_run(set(state['params'])), config.init.workdir)
  else:
    return variables
  return merge_variables(variables, loaded, source, partial=partial, hint=hint)
