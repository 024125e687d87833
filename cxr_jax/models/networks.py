"""The backbone-and-head networks the image-only stages train, built from a recipe's config.

A stage (`cxr_jax.train.trainer.STAGES`) names one of these builders, or the image-text
network's (`models/image_text.py`); a checkpoint saves its config, so inference rebuilds
a run's network from the config alone.
"""

from typing import Dict

import jax
import jax.numpy as jnp

from cxr_jax.models import heads
from cxr_jax.models import registry

# finetune.mode: (default head, frozen backbone). lpft's network is full fine-tuning's;
# its linear-probe phase is a 'linear' run first (train/stages.py).
FINETUNE_MODES = {'linear': ('linear', True), 'mlp': ('mlp', True), 'full': ('linear', False),
                  'lpft': ('linear', False)}


def backbone_and_head(config, default_head: str, frozen: bool = False) -> heads.Network:
  """`config.model_name` without classifier, and the head `config.head.kind` (or default)."""
  backbone = registry.build_model(config, num_classes=None)
  head_kind = config.head.kind or default_head
  num_classes = config.head.num_classes if head_kind in ('linear', 'mlp') else 0
  # Runs saved before projection_hidden existed used the head's default width.
  projection_hidden = config.head.get('projection_hidden', heads.ProjectionHead.hidden)
  head_args = {'linear': {'bias_init_value': config.head.bias_init},
               'projection': {'hidden': projection_hidden}}.get(head_kind, {})
  return heads.Network(backbone, heads.make_head(head_kind, num_classes, **head_args),
                       frozen_backbone=frozen)


def classifier(config) -> heads.Network:
  """Supervised stages: a linear head unless config.head.kind says otherwise."""
  return backbone_and_head(config, 'linear')


def contrastive(config) -> heads.Network:
  """SupCon and SimCLR: a projection head, discarded after pretraining."""
  return backbone_and_head(config, 'projection')


def finetune(config) -> heads.Network:
  """Task training: head and frozen backbone by `config.finetune.mode` (FINETUNE_MODES)."""
  if config.finetune.mode not in FINETUNE_MODES:
    raise ValueError(f'finetune.mode={config.finetune.mode!r}; expected one of '
                     f'{sorted(FINETUNE_MODES)}.')
  default_head, frozen = FINETUNE_MODES[config.finetune.mode]
  return backbone_and_head(config, default_head, frozen)


def image_inputs(config) -> Dict[str, jax.Array]:
  """Keyword inputs for `network.init(rng, **image_inputs(config), train=False)`."""
  size = config.init_image_size
  return {'images': jnp.zeros((1, size, size, 3), jnp.float32)}
