"""Losses for every training stage: softmax CE, masked multi-label BCE, SupCon and SimCLR.

All functions take GLOBAL batch arrays. Under `jax.jit` on a sharded mesh XLA inserts the
cross-device communication, so a contrastive loss over the whole [N, ...] array contrasts
every example against the whole global batch; nothing here uses pmap axis names.

Inputs may be bfloat16; every loss casts to float32 first so that log-sum-exps and the
similarity matrix keep full precision. Per-example losses come back as float32 [N]; the
`*_mean` helpers reduce them to the scalar that training differentiates.

Supervised contrastive loss follows Khosla et al. 2020 (arXiv 2004.11362), the L_out form
(the average over positives sits outside the log), with self-contrast removed and the
temperature / base-temperature scaling of the authors' code. SimCLR's NT-Xent (Chen et al.
2020, arXiv 2002.05709) is the special case with only the other view as positive.
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from cxr_jax.models.heads import l2_normalize

POSITIVE_WEIGHT_MODES = ('same_label', 'any_shared', 'jaccard')


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def mean_over_valid(values, valid):
  """Mean of `values` weighted by `valid` (bool or in [0, 1]); 0, not NaN, if none is valid.

  Entries with `valid == 0` are dropped with `where`, so even a NaN there cannot leak in.
  """
  values, valid = _f32(values), _f32(valid)
  count = jnp.sum(valid)
  total = jnp.sum(jnp.where(valid > 0, values * valid, 0.0))
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------------------
# Classification losses.


def softmax_cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy, float32 [N].

  Args:
    logits: [N, K].
    labels: int class ids [N] in [0, K) (an id outside gives NaN), or targets [N, K]
      (one-hot, or soft targets such as mixup's; each row should sum to 1).
    label_smoothing: mixes the targets with the uniform distribution over K classes,
      (1 - s) * targets + s / K, as in Szegedy et al. 2016 (and `optax.smooth_labels`).
  """
  logits = _f32(logits)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  labels = jnp.asarray(labels)
  if labels.ndim == logits.ndim - 1:
    # A gather instead of a one-hot: at ImageNet-21k scale the one-hot would be the
    # largest array of the step.
    picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)
    loss = -picked[..., 0]
    if label_smoothing:
      loss = (1.0 - label_smoothing) * loss - label_smoothing * jnp.mean(log_probs, axis=-1)
    # A gather would wrap -1 (a common "ignore" code) to the last class; an out-of-range id
    # is a data bug, so make it loud instead.
    in_range = jnp.logical_and(labels >= 0, labels < num_classes)
    return jnp.where(in_range, loss, jnp.nan)
  if labels.shape != logits.shape:
    raise ValueError(f'softmax_cross_entropy: labels {labels.shape} must be class ids '
                     f'{logits.shape[:-1]} or targets {logits.shape}.')
  targets = _f32(labels)
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  return -jnp.sum(targets * log_probs, axis=-1)


def _sigmoid_cross_entropy_terms(logits, targets, mask):
  """Elementwise BCE [N, K] (0 where masked) and the per-example count of known labels."""
  logits, targets = _f32(logits), _f32(targets)
  if targets.shape != logits.shape:
    raise ValueError(f'sigmoid_cross_entropy: targets {targets.shape} must match '
                     f'logits {logits.shape}.')
  known = jnp.ones_like(logits) if mask is None else jnp.broadcast_to(_f32(mask), logits.shape)
  # Masked targets may hold label codes such as -1; zero them so nothing odd leaks into
  # the (discarded) masked branch or its gradient.
  targets = jnp.where(known > 0, targets, 0.0)
  # log_sigmoid is the stable log(1 / (1 + exp(-x))); the two terms never overflow.
  terms = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  terms = jnp.where(known > 0, terms * known, 0.0)
  return terms, jnp.sum(known, axis=-1)


def sigmoid_cross_entropy(logits, targets, mask=None):
  """Per-example multi-label binary cross-entropy, averaged over the known labels, [N].

  Args:
    logits: [N, K].
    targets: [N, K] in [0, 1] (soft targets allowed).
    mask: optional [N, K]; 1 where a label is known, 0 where it is unknown (e.g. U-Ignore).
      Fractional values weight the labels. An example with no known label gets loss 0,
      and must be excluded from a batch mean: use `sigmoid_cross_entropy_mean`.
  """
  terms, known_count = _sigmoid_cross_entropy_terms(logits, targets, mask)
  return jnp.sum(terms, axis=-1) / jnp.maximum(known_count, 1e-12)


def sigmoid_cross_entropy_mean(logits, targets, mask=None):
  """Batch mean of `sigmoid_cross_entropy` over the examples with at least one known label.

  Each such example counts once however many of its labels are known (a mean of
  per-example means), so heavily annotated images do not dominate the batch.
  """
  terms, known_count = _sigmoid_cross_entropy_terms(logits, targets, mask)
  per_example = jnp.sum(terms, axis=-1) / jnp.maximum(known_count, 1e-12)
  return mean_over_valid(per_example, known_count > 0)


# ---------------------------------------------------------------------------
# Contrastive losses.


def supcon_loss(features, positive_weights=None, temperature=0.1,
                base_temperature=0.07) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Supervised contrastive loss (Khosla et al. 2020), L_out form, per anchor.

  Every one of the M = N * V views is an anchor and is contrasted against the other
  M - 1 views (its own similarity is removed from numerator and denominator):

    loss_a = -(T / T_base) * sum_p w_ap * log_softmax_{b != a}(z_a . z_b / T)_p / sum_p w_ap

  where w_ap = positive_weights[sample(a), sample(p)], except that the other views of the
  anchor's own sample always have weight 1.

  Args:
    features: [N, V, D] embeddings, V views per sample; any float dtype. They are
      L2-normalised here (idempotent if the caller already normalised them).
    positive_weights: [N, N] in [0, 1], row i = how much each sample is a positive for
      anchor sample i (see `positive_weights`); need not be symmetric. Its diagonal is
      ignored (forced to 1). None means only the other views are positives (SimCLR).
    temperature: T, a Python float or a traced scalar (e.g. a learned temperature).
    base_temperature: T_base; the loss is scaled by T / T_base, as in the authors' code,
      so that the gradient scale does not move with T. Set it equal to T for no scaling.

  Returns:
    loss_per_anchor: float32 [N * V], sample-major: anchor n * V + v is view v of sample
      n. Anchors without any positive (possible only when V == 1) hold 0.
    stats: 'anchor_has_positive' bool [N * V]; float32 scalars
      'anchors_without_positive' (count), 'positive_weight_per_anchor' (mean total
      positive weight over valid anchors), 'positive_similarity' and
      'negative_similarity' (mean cosine of weighted positive pairs / of zero-weight
      pairs); gradients do not flow through the stats.
  """
  features = jnp.asarray(features)
  if features.ndim != 3:
    raise ValueError(f'supcon_loss: features must be [N, V, D], got {features.shape}.')
  num_samples, num_views, _ = features.shape
  num_anchors = num_samples * num_views
  if num_anchors < 2:
    raise ValueError(f'supcon_loss: needs at least 2 views in the batch to contrast, '
                     f'got features {features.shape}.')
  if positive_weights is None:
    positive_weights = jnp.eye(num_samples, dtype=jnp.float32)
  positive_weights = _f32(positive_weights)
  if positive_weights.shape != (num_samples, num_samples):
    raise ValueError(f'supcon_loss: positive_weights {positive_weights.shape} must be '
                     f'[N, N] = {(num_samples, num_samples)} for features {features.shape}.')

  embeddings = l2_normalize(features).reshape(num_anchors, -1)
  # TPUs multiply float32 in one bfloat16 pass by default; at T = 0.07 that error (~1e-2
  # in the cosine) would be amplified ~14x in the logits, so ask for full precision. The
  # [M, M] product is small next to the network.
  cosine = jnp.matmul(embeddings, embeddings.T, precision=jax.lax.Precision.HIGHEST)
  logits = cosine / _f32(temperature)
  is_self = jnp.eye(num_anchors, dtype=bool)
  log_normalizer = jax.nn.logsumexp(jnp.where(is_self, -jnp.inf, logits), axis=-1, keepdims=True)
  # Zero the self entries so that their zero-weighted terms are exactly 0, whatever the
  # log-normalizer is.
  log_probs = jnp.where(is_self, 0.0, logits - log_normalizer)

  same_sample = jnp.eye(num_samples, dtype=bool)
  sample_weights = jnp.where(same_sample, 1.0, positive_weights)
  # Sample-major anchor order makes the [M, M] weights a plain repeat of the [N, N] ones.
  weights = jnp.repeat(jnp.repeat(sample_weights, num_views, axis=0), num_views, axis=1)
  weights = jnp.where(is_self, 0.0, weights)

  weight_sum = jnp.sum(weights, axis=-1)
  has_positive = weight_sum > 0
  mean_log_prob = jnp.sum(weights * log_probs, axis=-1) / jnp.where(has_positive, weight_sum, 1.0)
  scale = _f32(temperature) / _f32(base_temperature)
  loss_per_anchor = jnp.where(has_positive, -scale * mean_log_prob, 0.0)

  cosine = jax.lax.stop_gradient(cosine)
  negatives = jnp.logical_and(weights == 0, ~is_self)
  stats = {
      'anchor_has_positive': has_positive,
      'anchors_without_positive': jnp.sum(~has_positive).astype(jnp.float32),
      'positive_weight_per_anchor': mean_over_valid(weight_sum, has_positive),
      'positive_similarity': jnp.sum(weights * cosine) / jnp.maximum(jnp.sum(weights), 1e-12),
      'negative_similarity': mean_over_valid(cosine, negatives),
  }
  return loss_per_anchor, stats


def supcon_loss_mean(features, positive_weights=None, temperature=0.1,
                     base_temperature=0.07) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """`supcon_loss` averaged over the anchors that have a positive; stats are all scalars."""
  loss_per_anchor, stats = supcon_loss(features, positive_weights, temperature,
                                       base_temperature)
  has_positive = stats.pop('anchor_has_positive')
  return mean_over_valid(loss_per_anchor, has_positive), stats


def simclr_loss(features, temperature=0.1) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SimCLR's NT-Xent per anchor [2N]: SupCon where only the other view is a positive.

  features: [N, 2, D], two augmented views per image. NT-Xent has no base-temperature
  scaling, so T_base = T. Returns (loss_per_anchor, stats) as `supcon_loss`; every anchor
  has a positive, so the plain mean of loss_per_anchor is the NT-Xent batch loss.
  """
  features = jnp.asarray(features)
  if features.ndim != 3 or features.shape[1] != 2:
    raise ValueError(f'simclr_loss: features must be [N, 2, D], got {features.shape}.')
  return supcon_loss(features, None, temperature, base_temperature=temperature)


# ---------------------------------------------------------------------------
# Which samples are positives of each other, from noisy CXR labels.


def positive_weights(labels, mode: str, mask=None) -> jax.Array:
  """[N, N] float32 weights in [0, 1]: how much sample j is a positive for anchor i.

  The diagonal is always 1 (every image is a positive of itself).

  Args:
    labels: int class ids [N]; or float 0/1 labels [N] or [N, K] (a value > 0.5 is a
      positive finding).
    mode:
      'same_label': 1 where the two labels are equal. For int ids [N], or a single
        binary label [N] / [N, 1] such as `abnormal`. Multi-finding labels need one of
        the modes below.
      'any_shared': 1 if the two images share at least one positive finding, or if
        neither has any positive finding: two normal images are positives of each
        other, so normals form one class rather than N singletons.
      'jaccard': |A n B| / |A u B| over the sets of positive findings; 1 for two
        normal images (the same convention as 'any_shared').
    mask: optional, same shape as float labels; 1 where a label is known. Masked labels
      are ignored pairwise: images i and j are compared only on the findings known in
      both, so an unknown finding neither adds nor removes similarity. "Normal" above
      means "no positive among those findings". A pair with no finding known in both
      gets weight 0 (there is no evidence either way).
  """
  if mode not in POSITIVE_WEIGHT_MODES:
    raise ValueError(f'positive_weights: unknown mode {mode!r}; valid: {POSITIVE_WEIGHT_MODES}.')
  labels = jnp.asarray(labels)
  integer_ids = jnp.issubdtype(labels.dtype, jnp.integer)
  if integer_ids:
    if mode != 'same_label' or labels.ndim != 1:
      raise ValueError(f'positive_weights: int labels {labels.shape} are class ids [N] and '
                       f"need mode 'same_label'; got mode {mode!r}. Pass float 0/1 labels "
                       f'[N, K] for multi-label modes.')
    if mask is not None:
      raise ValueError('positive_weights: a mask only applies to float 0/1 labels.')
    same = labels[:, None] == labels[None, :]
    return same.astype(jnp.float32)

  if labels.ndim == 1:
    labels = labels[:, None]
    mask = None if mask is None else jnp.asarray(mask).reshape(labels.shape)
  if labels.ndim != 2:
    raise ValueError(f'positive_weights: labels must be [N] or [N, K], got {labels.shape}.')
  if mode == 'same_label' and labels.shape[1] != 1:
    raise ValueError(f"positive_weights: mode 'same_label' takes one label per image, got "
                     f"{labels.shape}; use 'any_shared' or 'jaccard' for several findings.")
  known = jnp.ones(labels.shape, jnp.float32) if mask is None else (_f32(mask) > 0).astype(
      jnp.float32)
  positive = (_f32(labels) > 0.5).astype(jnp.float32) * known

  # Counts over the findings known in both images, all as [N, K] x [K, N] products.
  known_in_both = known @ known.T
  positive_in_both = positive @ positive.T
  # Positive in either image (and known in both): |A u B| = |A| + |B| - |A n B|.
  positive_in_either = positive @ known.T + known @ positive.T - positive_in_both
  comparable = known_in_both > 0
  both_normal = jnp.logical_and(comparable, positive_in_either == 0)

  if mode in ('same_label', 'any_shared'):
    # With one label (same_label), "equal" is exactly "both positive or both negative",
    # so the two modes share a formula.
    weights = jnp.logical_or(positive_in_both > 0, both_normal).astype(jnp.float32)
  else:
    jaccard = positive_in_both / jnp.maximum(positive_in_either, 1.0)
    weights = jnp.where(both_normal, 1.0, jaccard)
  weights = jnp.where(comparable, weights, 0.0)
  return jnp.where(jnp.eye(labels.shape[0], dtype=bool), 1.0, weights)
