"""The model registry, kept apart from the architectures so they can register themselves."""

import jax.numpy as jnp

from cxr_jax.registry import Registry

MODELS = Registry('model')


def get_model(name: str, **kwargs):
  """Builds the Flax module registered as `name`; kwargs override its defaults.

  Example: `get_model('bit-m-r50x1', num_classes=14)`; `num_classes=None`
  builds an embedding-only model whose logits are None. `dtype` (the compute
  dtype; parameters stay float32) may be given by name, e.g. 'bfloat16'.
  """
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return MODELS.get(name)(**kwargs)


def model_names():
  return MODELS.names()


def build_model(config, **overrides):
  """The model a recipe names: `config.model_name` with `config.model` as overrides.

  Fields left at None keep the registered default (e.g. the published class count);
  keyword `overrides` win over the config (a trainer's num_classes=None, say).
  """
  fields = {k: v for k, v in config.model.to_dict().items() if v is not None}
  return get_model(config.model_name, **{**fields, **overrides})
