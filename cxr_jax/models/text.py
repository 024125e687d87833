"""Report encoder for image-text pretraining: a small pre-LN Transformer in Flax.

Token ids come from `cxr_jax.text.tokenizer` (0 is padding; every text is
`<bos> subwords <eos>`). The encoder adds a learned position embedding to each token
embedding, runs `depth` pre-LN blocks (LayerNorm -> self-attention -> residual,
LayerNorm -> GELU MLP -> residual) and a final LayerNorm, and returns one vector per
text, float32 [B, width].

Choices, for reports rather than generation:
  * Bidirectional attention with a padding mask: every token sees the whole report,
    as in BERT-style report encoders (ConVIRT); nothing is generated, so there is no
    need for a causal mask.
  * Masked mean pooling over the non-padding tokens (<bos> and <eos> included), which
    uses every token's state rather than one position's and is well conditioned from
    the first step.
  Together they make the output independent of how much padding follows the text:
  padded keys get exactly zero attention weight and padded positions are left out of
  the mean (the tests check this).

Sizes by name (`get_text_encoder`): 'text-tiny' for tests, 'text-small' for CPU/one-GPU
runs, 'text-base' (CLIP's text tower shape: width 512, 12 layers, 8 heads). `dtype`
sets the compute dtype; parameters, LayerNorm statistics, the attention softmax and the
pooled output stay float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.registry import Registry
from cxr_jax.text.tokenizer import PAD_ID

TEXT_ENCODERS = Registry('text encoder')


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask):
    y = nn.LayerNorm(dtype=self.dtype, name='attention_norm')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, force_fp32_for_softmax=True,
        name='attention')(y, y, mask=attention_mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='mlp_norm')(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name='mlp_in')(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name='mlp_out')(nn.gelu(y))
    return x + y


class TextEncoder(nn.Module):
  """Token ids int [B, L] (L <= max_len, 0 = padding) -> float32 [B, width]."""
  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train  # No dropout or batch statistics.
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'{type(self).__name__}: tokens must be integer ids [B, L], got '
                       f'{tokens.dtype} {tokens.shape}.')
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f'{type(self).__name__}: {length} tokens per text, more than the '
                       f'max_len={self.max_len} its position embedding was built for.')
    valid = tokens != PAD_ID
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name='token_embedding')(tokens)
    positions = self.param('position_embedding', nn.initializers.normal(0.01),
                           (self.max_len, self.width))
    x = (x + positions[:length]).astype(self.dtype)
    attention_mask = nn.make_attention_mask(valid, valid)  # [B, 1, L, L]
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, name=f'block{i}')(
          x, attention_mask)
    x = nn.LayerNorm(dtype=jnp.float32, name='final_norm')(x).astype(jnp.float32)
    weights = valid.astype(jnp.float32)[..., None]
    return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


SIZES = {
    'text-tiny': dict(width=32, depth=1, num_heads=2, mlp_dim=64),
    'text-small': dict(width=256, depth=4, num_heads=4, mlp_dim=1024),
    'text-base': dict(width=512, depth=12, num_heads=8, mlp_dim=2048),
}
for _name, _size in SIZES.items():
  TEXT_ENCODERS.add(_name, functools.partial(TextEncoder, **_size))


def get_text_encoder(name: str, *, vocab_size: int, max_len: int, **kwargs) -> TextEncoder:
  """The encoder registered as `name`; `dtype` may be given by name, e.g. 'bfloat16'."""
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return TEXT_ENCODERS.get(name)(vocab_size=vocab_size, max_len=max_len, **kwargs)
