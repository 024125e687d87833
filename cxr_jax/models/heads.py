"""Heads on a backbone's embedding, and the backbone+head network every stage trains.

Parameters of a `Network` are {'backbone': ..., 'head': ...}, so a later stage takes
an earlier stage's backbone unchanged and puts its own head on it (the SupCon
projection head is discarded after CXR pretraining).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Below this squared norm a feature is treated as the zero vector, so normalising it
# neither divides by zero nor produces an infinite gradient.
_NORM_EPS_SQUARED = 1e-24


def l2_normalize(x, axis: int = -1):
  """x / ||x|| in float32; the zero vector stays zero (finite value and gradient)."""
  x = jnp.asarray(x).astype(jnp.float32)
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS_SQUARED))


class LinearHead(nn.Module):
  """Linear classifier; zero-initialised kernel as in BiT, optional bias init (e.g. log prior)."""
  num_classes: int
  zero_init: bool = True
  bias_init_value: float = 0.0

  @nn.compact
  def __call__(self, embedding, train: bool = False):
    del train
    return nn.Dense(self.num_classes,
                    kernel_init=nn.initializers.zeros if self.zero_init
                    else nn.initializers.lecun_normal(),
                    bias_init=nn.initializers.constant(self.bias_init_value),
                    name='dense')(embedding.astype(jnp.float32))


class MLPHead(nn.Module):
  """Hidden layers with batch norm, ReLU and dropout, then a linear classifier.

  The defaults ([512, 256], dropout) follow the published CXR Foundation probing recipe.
  """
  num_classes: int
  hidden: Sequence[int] = (512, 256)
  dropout: float = 0.1

  @nn.compact
  def __call__(self, embedding, train: bool = False):
    x = embedding.astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f'hidden{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, name=f'norm{i}')(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes, name='dense')(x)


class ProjectionHead(nn.Module):
  """MLP to a small L2-normalised vector that contrastive losses compare (SupCon: 128-d).

  Batch norm after each layer, as in SimCLR v2, removes the component that every image's
  projection shares. Unlike SimCLR v2's last layer (center=False) the output norm keeps
  a learned bias, which can re-grow that shared component: SupCon with positives the
  embedding cannot yet separate collapsed through it on small CXR runs (every cosine
  near 0.9). Without it the cosines stayed near 0 but the probes gained nothing
  (BENCHMARKS.md, "Why SupCon's cosines rise together"), so it stays until a recipe
  shows which is better.
  """
  hidden: int = 2048
  features: int = 128

  @nn.compact
  def __call__(self, embedding, train: bool = False):
    norm = lambda name, **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                           name=name, **kw)
    x = nn.Dense(self.hidden, use_bias=False, name='hidden')(embedding.astype(jnp.float32))
    x = nn.relu(norm('hidden_norm')(x))
    x = nn.Dense(self.features, use_bias=False, name='output')(x)
    x = norm('output_norm', use_scale=False)(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Network(nn.Module):
  """backbone (a zoo model built without classifier) + optional head on its embedding.

  Returns `(head_output_or_None, aux)` like every zoo model; `aux['embedding']` is the
  backbone's pooled embedding.
  """
  backbone: nn.Module
  head: Optional[nn.Module] = None
  # Linear/MLP probing: the backbone runs in inference mode (no batch-statistics
  # updates, no dropout) and no gradient flows into it, which also skips its backward.
  frozen_backbone: bool = False

  def __call__(self, images, train: bool = False):
    _, aux = self.backbone(images, train=train and not self.frozen_backbone)
    if self.frozen_backbone:
      aux = jax.tree.map(jax.lax.stop_gradient, aux)
    output = self.head(aux['embedding'], train=train) if self.head is not None else None
    return output, aux


def make_head(kind: str, num_classes: int = 0, **kwargs) -> Optional[nn.Module]:
  heads = {'linear': LinearHead, 'mlp': MLPHead, 'projection': ProjectionHead}
  if kind == 'none':
    return None
  if kind not in heads:
    raise ValueError(f'Unknown head {kind!r}; expected one of {sorted(heads)} or none.')
  if kind == 'projection':
    return ProjectionHead(**kwargs)
  return heads[kind](num_classes=num_classes, **kwargs)


def is_classifier(network: nn.Module) -> bool:
  """Whether `network` outputs class logits: a `Network` with a linear or MLP head.

  A contrastive projection head is a training device, not an output; an image-text
  network's outputs are its joint-space embeddings.
  """
  # getattr: an image-text network's head is defined in setup(), out of reach unbound.
  return isinstance(getattr(network, 'head', None), (LinearHead, MLPHead))
