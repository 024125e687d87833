"""Image-text contrastive pretraining on chest X-rays and their reports (CLIP / ConVIRT).

The network (`cxr_jax.models.image_text.ImageTextNetwork`: image tower, report encoder,
projections and learnt temperature) is built by `models.image_text.build_network`.

Loss: symmetric InfoNCE (Zhang et al. 2020, ConVIRT; CLIP) over the GLOBAL batch: with
s = logit scale, logits[i, j] = s * cos(image_i, text_j) over all B images and B
reports of the step, the loss is the mean of the image->text and text->image softmax
cross-entropies. Under `jax.jit` on the mesh the [B, B] product spans every device and
host (see losses.py), so each image is contrasted with every report of the step.
Reports that are word for word identical (after tokenisation) are positives of each
other rather than false negatives: the target of a row is uniform over them. Normal
studies often share a report ("No acute cardiopulmonary process."), especially when
only the impression is used. Identity is decided by two 32-bit polynomial hashes of the
token rows (a collision needs both to agree: about 2^-64 per pair), which costs [B, B]
instead of [B, B, L] memory.

Optionally (`config.loss.image_only` = 'simclr' or 'supcon') the image-only contrastive
loss of those stages is added on two augmented views (`two_views` in data.pp):
loss = w * image-text + (1 - w) * image-only, w = config.loss.image_text_weight. The
image-text term uses the first view.

Metrics: image_text_loss, temperature, image_to_text_accuracy and
text_to_image_accuracy (top-1 retrieval within the global batch, a hit being any
positive), duplicate_texts (fraction of reports with an identical partner), and with
an image-only loss image_only_loss and its statistics.

For the training loop: `add_config_fields(config)` (the `config.text` section and the
new `head`/`loss` fields), `tokenize_op(config)`, and the `image_text` stage registered
here: its loss `loss_fn`, and its start from published backbone weights or an earlier
run (the backbone of any stage; everything of an image-text run, for multimodal
domain-adaptive pretraining, with parts the run lacks, e.g. an image-only head added
now, initialised fresh and logged).
"""

from typing import Any, Collection, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax.models import heads
from cxr_jax.models import image_text as image_text_models
from cxr_jax.train import losses
from cxr_jax.train import optimizers
from cxr_jax.train import stages
from cxr_jax.train import trainer

IMAGE_ONLY_LOSSES = ('', 'simclr', 'supcon')
# The optimizer's usual exclusions (biases, norms) and the learnt temperature, which
# weight decay would pull towards T = 1 (CLIP does not decay it either).
WEIGHT_DECAY_EXCLUDE = optimizers.DEFAULT_WEIGHT_DECAY_EXCLUDE + r'|(^|/)log_logit_scale$'
# Seed of the token-row hashes' odd multipliers: fixed, so the loss is a pure function.
_HASH_SEED = 0x5EED


# --- the loss -------------------------------------------------------------------------


def _hash_multipliers(length: int) -> np.ndarray:
  rng = np.random.default_rng(_HASH_SEED)
  return (rng.integers(0, 2**31, size=(2, length), dtype=np.uint32) * 2 + 1).astype(np.uint32)


def same_text(tokens) -> jax.Array:
  """bool [B, B]: rows of `tokens` that are identical (see the module doc on hashing)."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'same_text: tokens must be [B, L], got {tokens.shape}.')
  multipliers = jnp.asarray(_hash_multipliers(tokens.shape[1]))
  # uint32 arithmetic wraps, so this is sum(token * multiplier) mod 2^32, per hash.
  hashes = jnp.sum(tokens.astype(jnp.uint32)[:, None, :] * multipliers[None], axis=-1)
  return jnp.all(hashes[:, None, :] == hashes[None, :, :], axis=-1)


def image_text_loss(image_embeddings, text_embeddings, logit_scale, tokens=None
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Symmetric InfoNCE of B paired image and text embeddings [B, E] (normalised here).

  Args:
    image_embeddings, text_embeddings: [B, E]; pair i is (image i, report i).
    logit_scale: s = 1 / temperature, a scalar (learnt or fixed).
    tokens: the reports' token ids [B, L]; identical rows are positives of each other.
      None: only the pair itself is a positive (plain CLIP).

  Returns:
    (loss, stats): the mean of the image->text and text->image cross-entropies;
    stats (no gradient): 'image_to_text_accuracy', 'text_to_image_accuracy',
    'temperature', 'duplicate_texts'.
  """
  images = heads.l2_normalize(image_embeddings)
  texts = heads.l2_normalize(text_embeddings)
  if images.ndim != 2 or images.shape != texts.shape:
    raise ValueError(f'image_text_loss: image {images.shape} and text {texts.shape} '
                     'embeddings must both be [B, E].')
  batch = images.shape[0]
  scale = jnp.asarray(logit_scale, jnp.float32)
  # Full precision, as in losses.supcon_loss: s up to 100 amplifies bfloat16 matmul error.
  logits = scale * jnp.matmul(images, texts.T, precision=jax.lax.Precision.HIGHEST)
  if tokens is None:
    positives = jnp.eye(batch, dtype=jnp.float32)
  else:
    if tokens.shape[0] != batch:
      raise ValueError(f'image_text_loss: {batch} pairs but tokens {tokens.shape}.')
    positives = same_text(tokens).astype(jnp.float32)
  # Symmetric, so the same targets serve both directions.
  targets = positives / jnp.sum(positives, axis=-1, keepdims=True)
  image_to_text = jnp.mean(losses.softmax_cross_entropy(logits, targets))
  text_to_image = jnp.mean(losses.softmax_cross_entropy(logits.T, targets))
  loss = 0.5 * (image_to_text + text_to_image)

  logits = jax.lax.stop_gradient(logits)
  text_hit = jnp.take_along_axis(positives, jnp.argmax(logits, axis=1)[:, None], axis=1)
  image_hit = jnp.take_along_axis(positives, jnp.argmax(logits, axis=0)[None, :], axis=0)
  stats = {
      'image_to_text_accuracy': jnp.mean(text_hit),
      'text_to_image_accuracy': jnp.mean(image_hit),
      'temperature': 1.0 / jax.lax.stop_gradient(scale),
      'duplicate_texts': jnp.mean(jnp.sum(positives, axis=-1) > 1),
  }
  return loss, stats


def loss_fn(network: image_text_models.ImageTextNetwork, config, params, model_state, batch,
            rng) -> Tuple[jax.Array, Tuple[Dict[str, Any], Dict[str, jax.Array]]]:
  """The training loss of a global batch: (loss, (new model state, metrics))."""
  image_only, weight = config.loss.image_only, config.loss.image_text_weight
  if image_only not in IMAGE_ONLY_LOSSES:
    raise ValueError(f'config.loss.image_only={image_only!r}; expected one of '
                     f'{IMAGE_ONLY_LOSSES}.')
  if 'text' not in batch:
    raise ValueError(f'Image-text training needs report tokens in the batch (it has '
                     f'{sorted(batch)}): put tokenize(...) in config.data.pp '
                     '(image_text.tokenize_op).')
  images = batch['image']
  if image_only and (images.ndim != 5 or images.shape[1] != 2):
    raise ValueError(f'config.loss.image_only={image_only!r} needs two views per image '
                     f'([B, 2, H, W, C]); got {images.shape}. Put two_views in config.data.pp.')
  if image_only and not 0 <= weight <= 1:
    raise ValueError(f'config.loss.image_text_weight={weight} must be in [0, 1].')

  outputs, _, new_state = stages.apply_network(network, params, model_state,
                                               (images, batch['text']), rng, train=True)
  loss, metrics = image_text_loss(outputs['image'], outputs['text'], outputs['logit_scale'],
                                  batch['text'])
  metrics['image_text_loss'] = loss
  if image_only:
    contrastive, stats = stages.contrastive_loss(image_only, config, outputs['image_only'],
                                                 batch)
    metrics.update({f'image_only_{k}': v for k, v in stats.items()})
    metrics['image_only_loss'] = contrastive
    loss = weight * loss + (1 - weight) * contrastive
  return loss, (new_state, metrics)


# --- building the run -----------------------------------------------------------------


def add_config_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds image-text's fields to a `config_lib.base_config()` (in place; returns it).

  text.tokenizer, text.max_len and text.sections are references that `tokenize_op`
  writes into data.pp, so one override (`--config.text.tokenizer=PATH`) sets both the
  vocabulary the encoder is built for and the file the data pipeline encodes with.
  """
  config.text = ml_collections.ConfigDict()
  # Report encoder (models/text.py): text-tiny | text-small | text-base. Its compute
  # dtype is config.model.dtype, like the image tower's.
  config.text.encoder = 'text-tiny'
  # Tokenizer JSON from `python -m cxr_jax.train.tokenizer`; sizes the vocabulary.
  config.text.tokenizer = ml_collections.FieldReference('', field_type=str)
  # Tokens per report, <bos> and <eos> included; longer reports are cut.
  config.text.max_len = ml_collections.FieldReference(64, field_type=int)
  # Report sections read: findings | impression | both | all; '' = the tokenizer's own.
  config.text.sections = ml_collections.FieldReference('', field_type=str)
  config.head.embed_dim = 128  # Size of the shared image-text embedding space.
  config.loss.image_text_temperature = 0.07  # Initial temperature; then learnt (>= 0.01).
  # '' | simclr | supcon: also train that image-only loss on two views (two_views in
  # data.pp); supcon takes its positives from config.loss.positives.
  config.loss.image_only = ''
  # With image_only: loss = w * image-text + (1 - w) * image-only.
  config.loss.image_text_weight = 0.5
  return config


def tokenize_op(config) -> Any:
  """"tokenize('<text.tokenizer>', <text.max_len>, '<text.sections>')", tied to the config.

  Append it to data.pp ('...|rgb|' + tokenize_op(c)); the result follows later
  overrides of the three text fields. Tokenizer paths must not contain quotes.
  """
  return ("tokenize('" + config.text.get_ref('tokenizer') + "', "
          + config.text.get_ref('max_len').to_str() + ", '"
          + config.text.get_ref('sections') + "')")


def _parts_of_run(config, saved_parts: Collection[str]) -> Tuple[str, ...]:
  """Everything of an image-text run (it has a text tower); only the backbone of others."""
  del config
  return ('backbone', 'text', 'head') if 'text' in saved_parts else ('backbone',)


trainer.add_stage('image_text', trainer.Stage(
    image_text_models.build_network, loss_fn, init_inputs=image_text_models.init_inputs,
    parts_of_run=_parts_of_run, partial=True,
    hint=lambda config: ('Continue with the same model_name, text.encoder, text.tokenizer '
                         'and head.embed_dim as that run.')))
