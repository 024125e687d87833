"""Image-text contrastive pretraining on chest X-rays and their reports (CLIP / ConVIRT).

Network (`ImageTextNetwork`), parameters as the checkpoint stores them:
  params['backbone']  the image tower, a zoo model without classifier, exactly as in
                      `heads.Network`, so later stages (probes, fine-tuning, embed,
                      export) take it unchanged through `config.init.workdir`;
  params['text']      the report encoder (`cxr_jax.models.text`);
  params['head']      `image_projection` and `text_projection`, linear maps (no bias) of
                      the two towers' pooled embeddings into one `embed_dim` space where
                      both are L2-normalised; `log_logit_scale`, the learnt temperature
                      as log(1 / T), initialised at log(1 / 0.07) and clipped at log(100)
                      when used (CLIP, Radford et al. 2021: the scale never exceeds 100;
                      above the clip the gradient is zero, so it stays there); and, when
                      an image-only loss is added, `image_only`, the SupCon/SimCLR
                      projection MLP of `heads.ProjectionHead`.

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
new `head`/`loss` fields), `build_network(config)`, `init_inputs(config)` (dummy
inputs for `network.init`), `initial_variables(network, config, rng)` (fresh, then
published backbone weights or an earlier run: the backbone of any stage, everything of
an image-text run, for multimodal domain-adaptive pretraining) and
`loss_fn(network, config, params, model_state, batch, rng)` with the signature of the
trainer's stage losses.
"""

import math
from typing import Any, Dict, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax import models
from cxr_jax.models import heads
from cxr_jax.models import text as text_models
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train import checkpointing
from cxr_jax.train import losses
from cxr_jax.train import optimizers

MAX_LOGIT_SCALE = 100.0  # CLIP's clip of the learnt scale (temperature >= 0.01).
IMAGE_ONLY_LOSSES = ('', 'simclr', 'supcon')
# The optimizer's usual exclusions (biases, norms) and the learnt temperature, which
# weight decay would pull towards T = 1 (CLIP does not decay it either).
WEIGHT_DECAY_EXCLUDE = optimizers.DEFAULT_WEIGHT_DECAY_EXCLUDE + r'|(^|/)log_logit_scale$'
# Seed of the token-row hashes' odd multipliers: fixed, so the loss is a pure function.
_HASH_SEED = 0x5EED


class ImageTextHead(nn.Module):
  """The projections into the shared space, the learnt temperature, the image-only MLP."""
  embed_dim: int
  init_temperature: float = 0.07
  image_only_head: bool = False

  def setup(self):
    if not 0 < self.init_temperature:
      raise ValueError(f'init_temperature must be positive, got {self.init_temperature}.')
    self.image_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.text_projection = nn.Dense(self.embed_dim, use_bias=False)
    self.log_logit_scale = self.param(
        'log_logit_scale', nn.initializers.constant(math.log(1 / self.init_temperature)), ())
    if self.image_only_head:
      self.image_only = heads.ProjectionHead()

  def project_image(self, embedding):
    return losses.l2_normalize(self.image_projection(embedding.astype(jnp.float32)))

  def project_text(self, embedding):
    return losses.l2_normalize(self.text_projection(embedding.astype(jnp.float32)))

  def logit_scale(self):
    return jnp.exp(jnp.minimum(self.log_logit_scale, math.log(MAX_LOGIT_SCALE)))


class ImageTextNetwork(nn.Module):
  """Image tower at params['backbone'], report encoder at params['text'], head at params['head'].

  `apply(variables, images, tokens, train=...) -> (outputs, aux)`:
    images: [B, H, W, C], or [B, V, H, W, C] views of each image (the first view is
      the one compared with the report).
    tokens: int [B, L] from `cxr_jax.text.Tokenizer.encode`, or None for the image
      side only (what embed/export call).
    outputs: 'image' [B, E] and 'text' [B, E] L2-normalised; 'logit_scale' (); with an
      image-only head 'image_only' [B, V, 128].
    aux: 'embedding' [B, D] the backbone's pooled embedding (first view), as every
      zoo model's aux; 'text_embedding' [B, D_text] when tokens are given.
  `encode_image` and `encode_text` (through `apply(..., method=...)`) give one side.
  """
  backbone: nn.Module
  text: nn.Module
  embed_dim: int = 128
  init_temperature: float = 0.07
  image_only_head: bool = False

  def setup(self):
    self.head = ImageTextHead(self.embed_dim, self.init_temperature, self.image_only_head)

  def encode_image(self, images, train: bool = False):
    """L2-normalised projected image embeddings [B, E]."""
    _, aux = self.backbone(images, train=train)
    return self.head.project_image(aux['embedding'])

  def encode_text(self, tokens, train: bool = False):
    """L2-normalised projected report embeddings [B, E]."""
    return self.head.project_text(self.text(tokens, train=train))

  def logit_scale(self):
    return self.head.logit_scale()

  def __call__(self, images, tokens=None, train: bool = False):
    if images.ndim not in (4, 5):
      raise ValueError(f'ImageTextNetwork: images must be [B, H, W, C] or [B, V, H, W, C], '
                       f'got {images.shape}.')
    batch = images.shape[0]
    views = images.shape[1] if images.ndim == 5 else 1
    if tokens is not None and tokens.shape[0] != batch:
      raise ValueError(f'ImageTextNetwork: {batch} images but {tokens.shape[0]} reports.')
    _, backbone_aux = self.backbone(images.reshape(-1, *images.shape[-3:]), train=train)
    embedding = backbone_aux['embedding'].reshape(batch, views, -1)
    outputs = {'image': self.head.project_image(embedding[:, 0]),
               'logit_scale': self.head.logit_scale()}
    aux = {'embedding': embedding[:, 0]}
    if tokens is not None:
      aux['text_embedding'] = self.text(tokens, train=train)
      outputs['text'] = self.head.project_text(aux['text_embedding'])
    if self.image_only_head:
      outputs['image_only'] = self.head.image_only(
          backbone_aux['embedding']).reshape(batch, views, -1)
    return outputs, aux


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
  images = losses.l2_normalize(image_embeddings)
  texts = losses.l2_normalize(text_embeddings)
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


def image_only_loss(config, features, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The SupCon or SimCLR loss of the image-only stages on [B, 2, D] projections."""
  if config.loss.image_only == 'simclr':
    per_anchor, stats = losses.simclr_loss(features, temperature=config.loss.temperature)
    return losses.mean_over_valid(per_anchor, stats.pop('anchor_has_positive')), stats
  if config.loss.positives == 'abnormal':
    weights = losses.positive_weights(batch['abnormal'], 'same_label')
  else:
    weights = losses.positive_weights(batch['labels'], config.loss.positives,
                                      mask=batch.get('label_mask'))
  return losses.supcon_loss_mean(features, weights, temperature=config.loss.temperature,
                                 base_temperature=config.loss.base_temperature)


def loss_fn(network: ImageTextNetwork, config, params, model_state, batch, rng
            ) -> Tuple[jax.Array, Tuple[Dict[str, Any], Dict[str, jax.Array]]]:
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

  variables = {'params': params, **model_state}
  rngs = {'dropout': rng}
  if model_state:
    (outputs, _), new_state = network.apply(variables, images, batch['text'], train=True,
                                            mutable=list(model_state), rngs=rngs)
  else:
    outputs, _ = network.apply(variables, images, batch['text'], train=True, rngs=rngs)
    new_state = model_state
  loss, metrics = image_text_loss(outputs['image'], outputs['text'], outputs['logit_scale'],
                                  batch['text'])
  metrics['image_text_loss'] = loss
  if image_only:
    contrastive, stats = image_only_loss(config, outputs['image_only'], batch)
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
  # Tokenizer JSON from `python -m cxr_jax.text.tokenizer`; sizes the vocabulary.
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


def build_network(config) -> ImageTextNetwork:
  backbone = models.build_model(config, num_classes=None)
  tokenizer = tokenizer_lib.load_cached(config.text.tokenizer)
  text = text_models.get_text_encoder(config.text.encoder, vocab_size=tokenizer.vocab_size,
                                      max_len=config.text.max_len, dtype=config.model.dtype)
  return ImageTextNetwork(backbone, text, embed_dim=config.head.embed_dim,
                          init_temperature=config.loss.image_text_temperature,
                          image_only_head=bool(config.loss.image_only))


def init_inputs(config) -> Dict[str, jax.Array]:
  """Keyword inputs for `network.init(rng, **init_inputs(config), train=False)`."""
  size = config.init_image_size
  tokens = np.zeros((1, config.text.max_len), np.int32)
  tokens[0, :2] = (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)
  return {'images': jnp.zeros((1, size, size, 3), jnp.float32), 'tokens': jnp.asarray(tokens)}


def initial_variables(network: ImageTextNetwork, config, rng) -> Dict[str, Any]:
  """Fresh variables, then `config.init`: published weights (backbone), or an earlier run.

  From an image-text run's workdir everything it has is taken (backbone, text encoder,
  projections and temperature: multimodal domain-adaptive pretraining continues the
  whole model); parts the run lacks (e.g. an image-only head added now) start fresh and
  are logged. From any other stage's workdir only its backbone is taken.
  """
  variables = flax.core.unfreeze(jax.jit(
      lambda r: network.init(r, **init_inputs(config), train=False))(rng))
  if config.init.weights and config.init.workdir:
    raise ValueError('Set config.init.weights or config.init.workdir, not both.')
  if config.init.weights:
    source = config.init.weights
    loaded = {collection: {'backbone': tree} for collection, tree in
              models.load_pretrained(network.backbone, config.init.weights).items()}
  elif config.init.workdir:
    source = config.init.workdir
    checkpointing.require_complete(config.init.workdir, 'config.init.workdir')
    state, _, _ = checkpointing.read_checkpoint(config.init.workdir)
    parts = ('backbone', 'text', 'head') if 'text' in state['params'] else ('backbone',)
    loaded = {collection: {p: tree[p] for p in parts if p in tree} for collection, tree in
              [('params', state['params']), *state['model_state'].items()]}
  else:
    return variables
  return _merge(variables, loaded, source)


def _merge(variables, loaded, source: str) -> Dict[str, Any]:
  """`loaded` over `variables` leaf by leaf; shapes must agree, missing leaves stay fresh."""
  fresh_leaves = []
  for collection, fresh in variables.items():
    fresh_flat = flax.traverse_util.flatten_dict(fresh, sep='/')
    loaded_flat = flax.traverse_util.flatten_dict(loaded.get(collection, {}), sep='/')
    parts = {path.split('/')[0] for path in loaded_flat}
    for path, value in fresh_flat.items():
      if path.split('/')[0] not in parts:
        continue
      if path not in loaded_flat:
        fresh_leaves.append(f'{collection}/{path}')
        continue
      if tuple(np.shape(loaded_flat[path])) != tuple(value.shape):
        raise ValueError(f'{source}: {collection}/{path} has shape '
                         f'{tuple(np.shape(loaded_flat[path]))}, the model expects '
                         f'{tuple(value.shape)}. Continue with the same model_name, '
                         'text.encoder, text.tokenizer and head.embed_dim as that run.')
      fresh_flat[path] = jnp.asarray(loaded_flat[path])
    variables[collection] = flax.traverse_util.unflatten_dict(fresh_flat, sep='/')
  if fresh_leaves:
    logging.info('Not in %s, initialised fresh: %s', source, ', '.join(fresh_leaves))
  return variables
