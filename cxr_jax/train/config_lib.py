"""Recipes: the fields every training recipe has (`base_config()`), and `load`.

`configs/*.py` start from `base_config()`. `load('configs/NAME.py:ARG', overrides)` is
the one way to read a recipe file, for the command line, recipes built from other
recipes, benchmarks and tests alike.
"""

import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections

from cxr_jax.train import optimizers


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'supervised'  # supervised | supcon | simclr | finetune (train/trainer.py).
  c.seed = 0  # Initialisation, shuffling, augmentation and dropout all derive from it.
  c.total_steps = 1000  # Batches; optimizer updates = total_steps / accumulate_steps.
  c.batch_size = 64  # Global batch, split over processes and devices.
  c.log_every = 10  # Steps between metrics lines (and non-finite-loss checks).
  c.init_image_size = 64  # Image size used only to trace parameter shapes at init.

  c.model_name = 'bit-tiny'  # Backbone from the model registry; built without classifier.
  c.model = ml_collections.ConfigDict()
  c.model.truncate = 0  # Final stages removed (CheXtransfer truncation).
  c.model.dtype = 'float32'  # Compute dtype; parameters stay float32.
  # Recompute each residual unit's / MBConv block's activations in the backward pass
  # rather than store them: the same numbers, less memory, ~1/3 more compute.
  c.model.remat = False

  c.head = ml_collections.ConfigDict()
  c.head.kind = ''  # linear | mlp | projection | none; '' = the stage's default.
  c.head.num_classes = 0  # Classifier outputs (supervised stages).
  # Initial bias of a linear head. 0 for softmax; for sigmoid losses over many rare
  # classes a negative prior such as -log(num_classes) keeps early gradients sane.
  c.head.bias_init = 0.0
  # Hidden width of a contrastive stage's projection head (SupCon and SimCLR use 2048;
  # configs/quickstart.py narrows it to 256 for its tiny backbone).
  c.head.projection_hidden = 2048

  c.finetune = ml_collections.ConfigDict()
  # finetune stage: linear | mlp (frozen backbone) | full | lpft (linear probe for
  # lp_steps in WORKDIR/linear_probe, then full fine-tuning from that backbone and head).
  c.finetune.mode = 'linear'
  c.finetune.lp_steps = 0  # lpft: probe steps (total_steps are the fine-tuning steps).
  c.finetune.lp_learning_rate = 0.0  # lpft: the probe's peak rate; 0 = optimizer's.

  c.init = ml_collections.ConfigDict()
  c.init.weights = ''  # Published backbone weights (.npz BiT, .h5 Keras EfficientNet).
  c.init.workdir = ''  # Or: an earlier stage's workdir; its latest backbone is used.
  c.init.head = False  # With init.workdir: also take its head (LP-FT's second phase).

  c.data = ml_collections.ConfigDict()
  c.data.name = ''  # TFDS name, e.g. 'synthetic_cxr/site_a'.
  c.data.split = 'train'
  # Train on only these record indices of the split (label budgets); () = all of it.
  c.data.records = ()
  c.data.data_dir = ''  # TFDS data directory; '' = TFDS's default (~/tensorflow_datasets).
  c.data.pp = 'decode|value_range(-1, 1)|rgb'  # Preprocessing string (transforms.py).
  # Deterministic preprocessing for evaluation, embedding and export (no augmentation).
  c.data.pp_eval = 'decode|value_range(-1, 1)|rgb'
  c.data.batch_pp = ''  # Batch ops, e.g. 'mixup(0.2)'.
  c.data.findings = ()  # CXR findings to train on; () = all the dataset has.
  c.data.label_policy = ml_collections.ConfigDict()
  c.data.label_policy.uncertain = 'ignore'  # ignore | zeros | ones (U-Ignore/Zeros/Ones).
  c.data.label_policy.per_finding = {}  # Overrides, e.g. {'Atelectasis': 'ones'}.
  c.data.label_policy.unmentioned = 'zeros'  # What a blank label means: zeros | ignore.
  c.data.workers = 0  # grain worker processes; 0 decodes in the training process.
  c.data.prefetch = 2

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0
  c.loss.temperature = 0.1  # Contrastive temperature.
  c.loss.base_temperature = 0.07  # SupCon's loss scale T / T_base (Khosla et al. 2020).
  c.loss.positives = 'abnormal'  # SupCon positives: abnormal | any_shared | jaccard.

  c.optimizer = optimizers.default_config()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1  # Devices per parameter shard; 1 replicates parameters.
  c.mesh.devices = 0  # 0 = every device; N = the first N (single-process scaling tests).

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0  # Steps between evaluations on eval.split (and at the end); 0 = never.
  c.eval.split = 'validation'
  c.eval.batch_size = 0  # 0 = batch_size.
  # Metric that picks the checkpoint kept in WORKDIR/best, e.g. 'auroc_mean',
  # 'knn_auroc_mean', 'accuracy' or 'loss' (lower is better for names with 'loss').
  # '' keeps no best checkpoint.
  c.eval.best_metric = ''

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100  # Steps between checkpoints (also saved at the end/SIGTERM).
  c.checkpoint.keep = 3
  return c


def load_module(path: str):
  """The recipe file at `path`, executed as a fresh module (its get_config and constants)."""
  name = '_cxr_recipe_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise FileNotFoundError(f'No recipe file {path!r}.')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of the recipe 'FILE.py[:ARG]', then `overrides` ({'a.b': value}).

  As on the command line, an override whose key the config lacks is an error naming
  the valid keys.
  """
  path, _, arg = spec.partition(':')
  module = load_module(path)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in (overrides or {}).items():
    message = unknown_key_message(config, key)
    if message:
      raise ValueError(f'{key}: {message}')
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def unknown_key_message(config, key: str) -> str:
  """Why dotted `key` names no field of `config`, with the valid keys; '' when it does."""
  node, walked = config, 'config'
  for part in key.split('.'):
    if not hasattr(node, 'keys'):
      return f'{walked} is a value, not a section with key {part!r}.'
    if part not in node:
      return (f'{walked} has no key {part!r}. '
              f'Valid keys of {walked}: {", ".join(sorted(node.keys()))}.')
    node, walked = node[part], f'{walked}.{part}'
  return ''
