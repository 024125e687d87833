"""Periodic evaluation on a held-out split while a stage trains.

The network runs in inference mode over the whole split (`config.eval.split`, read
once per evaluation with the deterministic `config.data.pp_eval`), and what is
measured depends on what the head produces:

  classifier on CXR findings   masked sigmoid loss, AUROC per finding and their mean
  classifier on classes        softmax loss and accuracy
  contrastive projection       k-nearest-neighbour AUROC per finding on the backbone
                               embedding (cosine, leave-one-out), and kNN accuracy on
                               classes: how well the representation being learned
                               separates the labels, without training anything

Every process reads its own shard; the jitted step returns replicated outputs, so each
process holds the whole split's outputs. The last partial batch is padded to the batch
size and the padding masked out, so nothing is dropped and nothing compiles twice.
"""

import math
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.data import pipeline
from cxr_jax.models import heads
from cxr_jax.train import losses
from cxr_jax.train import sharding

KNN_NEIGHBOURS = 20


def _pad(batch: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
  count = len(next(iter(batch.values())))
  padded = {k: np.concatenate([v, np.zeros((size - count, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}
  padded['valid'] = (np.arange(size) < count).astype(np.float32)
  return padded


def knn_scores(embeddings: np.ndarray, targets: np.ndarray, mask: Optional[np.ndarray] = None,
               k: int = KNN_NEIGHBOURS) -> np.ndarray:
  """Leave-one-out kNN score per label: the share of the k most cosine-similar other
  examples whose label is positive, among those where it is known. [N, K]."""
  unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
  similarity = unit @ unit.T
  np.fill_diagonal(similarity, -np.inf)
  k = min(k, len(unit) - 1)
  neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  mask = np.ones_like(targets) if mask is None else mask
  positive = (targets[neighbours] * mask[neighbours]).sum(1)
  known = mask[neighbours].sum(1)
  return np.where(known > 0, positive / np.maximum(known, 1), 0.5)


class Evaluator:
  """Measures the network on `config.eval.split`; `run(params, model_state)` -> metrics."""

  def __init__(self, network: heads.Network, config, mesh):
    self.network, self.config = network, config
    self.batch_size = config.eval.batch_size or config.batch_size
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.classifier = heads.is_classifier(network)
    self.label_smoothing = config.loss.label_smoothing
    data_config = config.data.copy_and_resolve_references()
    with data_config.unlocked():
      data_config.pp = config.data.pp_eval
      data_config.batch_pp = ''
    self.data = pipeline.pipeline_from_config(
        data_config, batch_size=self.batch_size, seed=config.seed, train=False,
        split=config.eval.split)
    self.findings = tuple(self.data.findings)

    def step(params, model_state, batch):
      output, aux = network.apply({'params': params, **model_state}, batch['image'],
                                  train=False)
      out = {k: v for k, v in batch.items() if k != 'image'}
      out['embedding'] = aux['embedding'].astype(jnp.float32)
      if self.classifier:
        out['logits'] = output.astype(jnp.float32)
      return out

    self._step = jax.jit(step, out_shardings=sharding.replicated(mesh))

  def outputs(self, params, model_state) -> Dict[str, np.ndarray]:
    """Concatenated step outputs over the split, padding removed."""
    parts = []
    for batch in self.data:
      batch = pipeline.to_global(_pad(batch, self.data.process_batch_size), self.batch_sharding)
      parts.append(jax.device_get(self._step(params, model_state, batch)))
    if not parts:
      raise ValueError(f'Evaluation split {self.config.eval.split!r} of '
                       f'{self.config.data.name!r} has no records.')
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    valid = joined.pop('valid') > 0
    return {k: v[valid] for k, v in joined.items()}

  def run(self, params, model_state) -> Dict[str, float]:
    from cxr_jax.eval import metrics  # pylint: disable=g-import-not-at-top  scipy: only here.
    out = self.outputs(params, model_state)
    result = {'examples': float(len(out['embedding']))}
    if 'labels' in out:  # CXR findings.
      targets, mask = out['labels'], out['label_mask']
      if self.classifier:
        result['loss'] = float(losses.sigmoid_cross_entropy_mean(
            out['logits'], targets, mask))
        scores, prefix = out['logits'], 'auroc'
      else:
        scores, prefix = knn_scores(out['embedding'], targets, mask), 'knn_auroc'
      values = []
      for i, finding in enumerate(self.findings):
        known = mask[:, i] > 0
        value = float(metrics.auroc(targets[known, i].astype(np.int32), scores[known, i]))
        result[f'{prefix}/{finding}'] = value
        values.append(value)
      finite = [v for v in values if math.isfinite(v)]
      result[f'{prefix}_mean'] = float(np.mean(finite)) if finite else math.nan
    elif 'label' in out:  # Natural-image classes.
      labels = out['label'].astype(np.int64)
      if self.classifier:
        result['loss'] = float(np.mean(losses.softmax_cross_entropy(
            out['logits'], labels, label_smoothing=self.label_smoothing)))
        result['accuracy'] = float(np.mean(out['logits'].argmax(-1) == labels))
      else:
        onehot = np.eye(labels.max() + 1, dtype=np.float32)[labels]
        result['knn_accuracy'] = float(np.mean(
            knn_scores(out['embedding'], onehot).argmax(-1) == labels))
    return result

