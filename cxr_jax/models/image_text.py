"""The image-text network: an image tower and a report encoder meeting in one joint space.

Parameters, as checkpoints store them:
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

The loss that trains it is in `cxr_jax/train/image_text.py`.
"""

import math
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.models import heads
from cxr_jax.models import registry
from cxr_jax.models import text as text_models
from cxr_jax.text import tokenizer as tokenizer_lib

MAX_LOGIT_SCALE = 100.0  # CLIP's clip of the learnt scale (temperature >= 0.01).


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
    return heads.l2_normalize(self.image_projection(embedding.astype(jnp.float32)))

  def project_text(self, embedding):
    return heads.l2_normalize(self.text_projection(embedding.astype(jnp.float32)))

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


def build_network(config) -> ImageTextNetwork:
  """The image-text network a recipe describes (`config.text`, `config.head.embed_dim`)."""
  backbone = registry.build_model(config, num_classes=None)
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
