"""Losses: parity with loop-by-loop NumPy references, optax and sklearn; SupCon properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import log_loss

from cxr_jax.train import losses

# ---------------------------------------------------------------------------
# Independent references: float64, explicit loops over examples, anchors and positives,
# written from the papers' formulas rather than from the implementation.


def reference_sigmoid_ce(logits, targets, mask):
  per_example = []
  for i in range(logits.shape[0]):
    total, known = 0.0, 0.0
    for k in range(logits.shape[1]):
      if mask[i, k] == 0:
        continue
      p = 1.0 / (1.0 + math.exp(-logits[i, k]))
      total += -mask[i, k] * (targets[i, k] * math.log(p) + (1 - targets[i, k]) * math.log(1 - p))
      known += mask[i, k]
    per_example.append(total / known if known else 0.0)
  return np.array(per_example)


def reference_supcon(features, weights, temperature, base_temperature):
  """Khosla et al. 2020 eq. 2 (L_out) with weighted positives; anchors sample-major."""
  n, v, _ = features.shape
  z = [features[i, a] / np.linalg.norm(features[i, a]) for i in range(n) for a in range(v)]
  sample_of = [i for i in range(n) for _ in range(v)]
  losses_, has_positive = [], []
  for anchor in range(n * v):
    denominator = sum(math.exp(float(z[anchor] @ z[other]) / temperature)
                      for other in range(n * v) if other != anchor)
    weighted_sum, weight_total = 0.0, 0.0
    for positive in range(n * v):
      if positive == anchor:
        continue
      if sample_of[positive] == sample_of[anchor]:
        w = 1.0
      else:
        w = float(weights[sample_of[anchor], sample_of[positive]])
      if w == 0:
        continue
      log_prob = float(z[anchor] @ z[positive]) / temperature - math.log(denominator)
      weighted_sum += w * log_prob
      weight_total += w
    if weight_total:
      losses_.append(-(temperature / base_temperature) * weighted_sum / weight_total)
      has_positive.append(True)
    else:
      losses_.append(0.0)
      has_positive.append(False)
  return np.array(losses_), np.array(has_positive)


def reference_nt_xent(views_a, views_b, temperature):
  """SimCLR's NT-Xent (Chen et al. 2020, Algorithm 1): 2N anchors, cosine similarity."""
  n = views_a.shape[0]
  z = [x / np.linalg.norm(x) for x in views_a] + [x / np.linalg.norm(x) for x in views_b]
  per_anchor = {}
  for i in range(2 * n):
    j = (i + n) % (2 * n)
    numerator = math.exp(float(z[i] @ z[j]) / temperature)
    denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(2 * n) if k != i)
    per_anchor[i] = -math.log(numerator / denominator)
  return per_anchor


def random_features(seed, n=6, v=2, d=8):
  return np.random.default_rng(seed).normal(size=(n, v, d)).astype(np.float32)


def random_weights(seed, n=6):
  rng = np.random.default_rng(seed)
  weights = rng.uniform(size=(n, n)) * (rng.uniform(size=(n, n)) < 0.5)
  return weights.astype(np.float32)


# ---------------------------------------------------------------------------
# Softmax cross-entropy.


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_softmax_ce_integer_labels_match_optax(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(8, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, size=8)
  got = losses.softmax_cross_entropy(logits, labels, label_smoothing=smoothing)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, 5), smoothing)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy(logits, targets), rtol=1e-5)
  if not smoothing:
    np.testing.assert_allclose(
        got, optax.softmax_cross_entropy_with_integer_labels(logits, labels), rtol=1e-5)


@pytest.mark.parametrize('smoothing', [0.0, 0.2])
def test_softmax_ce_soft_targets_match_optax(smoothing):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(8, 5)).astype(np.float32) * 3
  # Mixup-like targets: a convex mix of two one-hots.
  lam = rng.uniform(size=(8, 1))
  targets = (lam * np.eye(5)[rng.integers(0, 5, 8)]
             + (1 - lam) * np.eye(5)[rng.integers(0, 5, 8)]).astype(np.float32)
  got = losses.softmax_cross_entropy(logits, targets, label_smoothing=smoothing)
  want = optax.softmax_cross_entropy(logits, optax.smooth_labels(targets, smoothing))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_softmax_ce_bf16_and_extreme_logits_are_float32_and_finite():
  logits = jnp.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 0.0]], jnp.bfloat16)
  got = losses.softmax_cross_entropy(logits, jnp.array([0, 2]), label_smoothing=0.1)
  assert got.dtype == jnp.float32
  # Exact values: smoothing puts 0.1/3 on each class; log-probs are 0, -2000, -1000.
  np.testing.assert_allclose(got, [0.1 / 3 * 3000, (0.9 + 0.1 / 3) * 1000 + 0.1 / 3 * 2000],
                             rtol=1e-5)


def test_softmax_ce_rejects_mismatched_targets_and_flags_bad_ids():
  with pytest.raises(ValueError, match='class ids'):
    losses.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 2)))
  got = losses.softmax_cross_entropy(jnp.zeros((3, 3)), jnp.array([-1, 3, 2]))
  np.testing.assert_array_equal(np.isnan(got), [True, True, False])


# ---------------------------------------------------------------------------
# Sigmoid cross-entropy.


def test_sigmoid_ce_with_mask_matches_loop_reference():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(7, 5)) * 4
  targets = rng.uniform(size=(7, 5))  # Soft targets exercise the general formula.
  mask = (rng.uniform(size=(7, 5)) < 0.6).astype(np.float64)
  mask[3] = 0  # A fully masked example.
  got = losses.sigmoid_cross_entropy(logits.astype(np.float32), targets.astype(np.float32),
                                     mask.astype(np.float32))
  np.testing.assert_allclose(got, reference_sigmoid_ce(logits, targets, mask), rtol=1e-5,
                             atol=1e-7)
  assert got[3] == 0


def test_sigmoid_ce_hard_targets_match_sklearn_log_loss():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 4)) * 2
  targets = (rng.uniform(size=(6, 4)) < 0.4).astype(np.float64)
  mask = (rng.uniform(size=(6, 4)) < 0.75).astype(np.float64)
  mask[:, 0] = 1  # Every example keeps a known label, as sklearn needs one.
  # Masked targets hold a CheXpert-like code; they must be ignored.
  stored_targets = np.where(mask > 0, targets, -1.0)
  got = losses.sigmoid_cross_entropy(logits.astype(np.float32),
                                     stored_targets.astype(np.float32), mask.astype(np.float32))
  probs = 1 / (1 + np.exp(-logits))
  for i in range(6):
    known = mask[i] > 0
    want = log_loss(targets[i, known], probs[i, known], labels=[0, 1])
    np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_sigmoid_ce_mean_ignores_fully_masked_examples_and_is_stable():
  logits = jnp.array([[100.0, -100.0], [0.0, 0.0], [5.0, 5.0]], jnp.bfloat16)
  targets = jnp.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
  mask = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
  per_example = losses.sigmoid_cross_entropy(logits, targets, mask)
  assert per_example.dtype == jnp.float32
  # Confidently wrong by 100 logits costs ~100 per label; no overflow to inf.
  np.testing.assert_allclose(per_example, [100.0, math.log(2.0), 0.0], rtol=1e-5)
  mean = losses.sigmoid_cross_entropy_mean(logits, targets, mask)
  np.testing.assert_allclose(mean, (100.0 + math.log(2.0)) / 2, rtol=1e-5)
  grad = jax.grad(lambda x: losses.sigmoid_cross_entropy_mean(x, targets, mask))(
      logits.astype(jnp.float32))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[2], 0.0)
  everything_masked = losses.sigmoid_cross_entropy_mean(logits, targets, jnp.zeros_like(mask))
  assert float(everything_masked) == 0.0


def test_sigmoid_ce_without_mask_averages_all_labels():
  logits = jnp.array([[0.0, 2.0]])
  targets = jnp.array([[1.0, 0.0]])
  want = (math.log(2.0) + math.log1p(math.exp(2.0))) / 2
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(logits, targets), [want], rtol=1e-6)


# ---------------------------------------------------------------------------
# Supervised contrastive loss.


def test_supcon_matches_loop_reference_with_soft_weights():
  features, weights = random_features(4), random_weights(5)
  got, stats = losses.supcon_loss(features, weights, temperature=0.1, base_temperature=0.07)
  want, has_positive = reference_supcon(features.astype(np.float64), weights, 0.1, 0.07)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(has_positive) and float(stats['anchors_without_positive']) == 0
  mean, scalar_stats = losses.supcon_loss_mean(features, weights, 0.1, 0.07)
  np.testing.assert_allclose(mean, want.mean(), rtol=1e-5)
  assert all(np.ndim(x) == 0 for x in scalar_stats.values())


def test_supcon_single_view_excludes_and_counts_anchors_without_positive():
  features = random_features(6, n=5, v=1)
  weights = np.zeros((5, 5), np.float32)
  weights[0, 1] = weights[1, 0] = 1.0
  weights[2, 3] = 0.5  # Asymmetric on purpose: anchor 3 still has no positive.
  got, stats = losses.supcon_loss(features, weights, 0.2, 0.07)
  want, has_positive = reference_supcon(features.astype(np.float64), weights, 0.2, 0.07)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_array_equal(stats['anchor_has_positive'], has_positive)
  assert float(stats['anchors_without_positive']) == 2  # Samples 3 and 4.
  mean, _ = losses.supcon_loss_mean(features, weights, 0.2, 0.07)
  np.testing.assert_allclose(mean, want[has_positive].mean(), rtol=1e-5)


def test_supcon_is_invariant_to_batch_permutation():
  features, weights = random_features(7), random_weights(8)
  permutation = np.random.default_rng(9).permutation(6)
  loss, _ = losses.supcon_loss(features, weights)
  permuted, _ = losses.supcon_loss(features[permutation], weights[permutation][:, permutation])
  np.testing.assert_allclose(permuted.reshape(6, 2), np.asarray(loss).reshape(6, 2)[permutation],
                             rtol=1e-5)


def test_supcon_is_lower_when_positives_are_aligned():
  rng = np.random.default_rng(10)
  classes = np.array([0, 0, 1, 1, 2, 2])
  weights = losses.positive_weights(classes, 'same_label')
  centers = rng.normal(size=(3, 16))
  aligned = centers[classes][:, None, :] + 0.05 * rng.normal(size=(6, 2, 16))
  scattered = rng.normal(size=(6, 2, 16))
  aligned_loss, aligned_stats = losses.supcon_loss_mean(aligned, weights)
  scattered_loss, scattered_stats = losses.supcon_loss_mean(scattered, weights)
  assert float(aligned_loss) < float(scattered_loss)
  assert float(aligned_stats['positive_similarity']) > 0.9
  assert float(aligned_stats['positive_similarity']) > float(
      scattered_stats['positive_similarity'])


def test_supcon_base_temperature_scales_the_loss():
  features, weights = random_features(11), random_weights(12)
  loss_a, _ = losses.supcon_loss(features, weights, temperature=0.1, base_temperature=0.07)
  loss_b, _ = losses.supcon_loss(features, weights, temperature=0.1, base_temperature=0.1)
  np.testing.assert_allclose(np.asarray(loss_a) * 0.07 / 0.1, loss_b, rtol=1e-6)


def test_supcon_normalises_features_and_casts_bf16():
  features, weights = random_features(13), random_weights(14)
  scaled = features * np.array([0.1, 30.0], np.float32)[None, :, None]
  np.testing.assert_allclose(losses.supcon_loss(scaled, weights)[0],
                             losses.supcon_loss(features, weights)[0], rtol=1e-5)
  as_bf16 = jnp.asarray(features, jnp.bfloat16)
  got, _ = losses.supcon_loss(as_bf16, weights)
  assert got.dtype == jnp.float32
  want, _ = reference_supcon(np.asarray(as_bf16.astype(jnp.float32), np.float64), weights,
                             0.1, 0.07)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_supcon_gradients_are_finite_including_degenerate_inputs():
  features = random_features(15, n=5, v=1)
  features[2] = 0.0  # A dead embedding.
  features[4] = features[3]  # Identical embeddings of different samples.
  weights = np.zeros((5, 5), np.float32)
  weights[0, 1] = 1.0  # Most anchors have no positive.

  def mean_loss(x, temperature):
    return losses.supcon_loss_mean(x, weights, temperature, 0.07)[0]

  # Jitted only because one compile is faster than op-by-op dispatch of the backward pass.
  loss_grads = jax.jit(jax.grad(mean_loss, argnums=(0, 1)))
  grads = loss_grads(jnp.asarray(features, jnp.bfloat16), 0.05)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  # Very low temperature: logits of +-1000 must not overflow.
  grads = loss_grads(random_features(16, n=5), 0.001)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_supcon_with_identity_weights_is_nt_xent():
  features = random_features(17, n=5, v=2)
  got, stats = losses.simclr_loss(features, temperature=0.5)
  reference = reference_nt_xent(features[:, 0].astype(np.float64),
                                features[:, 1].astype(np.float64), 0.5)
  # Sample-major anchors (n, view) vs the reference's [view 0 of all; view 1 of all].
  want = [reference[view * 5 + n] for n in range(5) for view in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  same_via_supcon, _ = losses.supcon_loss(features, jnp.eye(5), 0.5, base_temperature=0.5)
  np.testing.assert_allclose(same_via_supcon, got, rtol=1e-6)
  assert float(stats['anchors_without_positive']) == 0


def test_supcon_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r'\[N, V, D\]'):
    losses.supcon_loss(np.zeros((4, 8)))
  with pytest.raises(ValueError, match='positive_weights'):
    losses.supcon_loss(np.zeros((4, 2, 8)), np.zeros((3, 3)))
  with pytest.raises(ValueError, match='at least 2'):
    losses.supcon_loss(np.ones((1, 1, 8)))
  with pytest.raises(ValueError, match=r'\[N, 2, D\]'):
    losses.simclr_loss(np.zeros((4, 3, 8)))


# ---------------------------------------------------------------------------
# Positive weights from labels.


def test_positive_weights_same_label_for_ids_and_binary_label():
  np.testing.assert_array_equal(
      losses.positive_weights(np.array([2, 0, 2, 1]), 'same_label'),
      [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
  abnormal = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
  mask = np.array([1.0, 1.0, 1.0, 0.0], np.float32)  # The last image's label is unknown.
  np.testing.assert_array_equal(
      losses.positive_weights(abnormal, 'same_label', mask=mask),
      [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(
      losses.positive_weights(abnormal[:, None], 'same_label'),
      [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])


# Findings: effusion, cardiomegaly, edema.
FINDINGS = np.array([
    [1, 0, 0],  # 0: effusion
    [1, 1, 0],  # 1: effusion + cardiomegaly
    [0, 1, 1],  # 2: cardiomegaly + edema
    [0, 0, 0],  # 3: normal
    [0, 0, 0],  # 4: normal
], np.float32)


def test_positive_weights_any_shared_treats_normals_as_one_class():
  np.testing.assert_array_equal(losses.positive_weights(FINDINGS, 'any_shared'), [
      [1, 1, 0, 0, 0],
      [1, 1, 1, 0, 0],
      [0, 1, 1, 0, 0],
      [0, 0, 0, 1, 1],
      [0, 0, 0, 1, 1],
  ])


def test_positive_weights_jaccard():
  np.testing.assert_allclose(losses.positive_weights(FINDINGS, 'jaccard'), [
      [1, 1 / 2, 0, 0, 0],
      [1 / 2, 1, 1 / 3, 0, 0],
      [0, 1 / 3, 1, 0, 0],
      [0, 0, 0, 1, 1],
      [0, 0, 0, 1, 1],
  ], rtol=1e-6)


def test_positive_weights_ignore_masked_findings_pairwise():
  mask = np.ones_like(FINDINGS)
  mask[2, 1] = 0  # Image 2's cardiomegaly is uncertain.
  mask[4, 0] = 0  # Image 4 (normal) has an unknown effusion label.
  labels = np.where(mask > 0, FINDINGS, -1.0)  # Masked entries hold a label code.
  # 1 vs 2 are compared on effusion and edema only: {effusion} vs {edema}.
  # 0 vs 4 are compared on cardiomegaly and edema only: both normal there.
  # 1 vs 4: compared on cardiomegaly and edema: {cardiomegaly} vs {}.
  np.testing.assert_allclose(losses.positive_weights(labels, 'jaccard', mask=mask), [
      [1, 1 / 2, 0, 0, 1],
      [1 / 2, 1, 0, 0, 0],
      [0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1],
      [1, 0, 0, 1, 1],
  ], rtol=1e-6)
  np.testing.assert_array_equal(losses.positive_weights(labels, 'any_shared', mask=mask), [
      [1, 1, 0, 0, 1],
      [1, 1, 0, 0, 0],
      [0, 0, 1, 0, 0],
      [0, 0, 0, 1, 1],
      [1, 0, 0, 1, 1],
  ])
  # An image with no known finding has no evidence to be anyone's positive.
  mask[3] = 0
  weights = losses.positive_weights(labels, 'jaccard', mask=mask)
  np.testing.assert_array_equal(weights[3], [0, 0, 0, 1, 0])
  np.testing.assert_array_equal(weights[:, 3], [0, 0, 0, 1, 0])


def test_positive_weights_reject_wrong_mode_or_labels():
  with pytest.raises(ValueError, match='unknown mode'):
    losses.positive_weights(FINDINGS, 'cosine')
  with pytest.raises(ValueError, match="'any_shared' or 'jaccard'"):
    losses.positive_weights(FINDINGS, 'same_label')
  with pytest.raises(ValueError, match="need mode 'same_label'"):
    losses.positive_weights(np.array([0, 1, 1]), 'jaccard')


# ---------------------------------------------------------------------------
# Everything compiles under jit, with the temperature as a traced argument.


def test_losses_under_jit():
  features, weights = random_features(20), random_weights(21)
  logits = np.random.default_rng(22).normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2])

  @jax.jit
  def all_losses(features, weights, logits, temperature):
    multi_hot = jax.nn.one_hot(labels, 3)
    pw = losses.positive_weights(multi_hot, 'jaccard', mask=jnp.ones_like(multi_hot))
    return {
        'softmax': losses.softmax_cross_entropy(logits, labels, 0.1),
        'sigmoid': losses.sigmoid_cross_entropy_mean(logits, multi_hot, jnp.ones_like(logits)),
        'supcon': losses.supcon_loss_mean(features, weights, temperature, 0.07)[0],
        'supcon_labels': losses.supcon_loss_mean(features, pw, temperature, 0.07)[0],
        'simclr': losses.simclr_loss(features, temperature)[0],
    }

  jitted = all_losses(features, weights, logits, jnp.float32(0.1))
  np.testing.assert_allclose(jitted['softmax'],
                             losses.softmax_cross_entropy(logits, labels, 0.1), rtol=1e-6)
  np.testing.assert_allclose(jitted['supcon'],
                             losses.supcon_loss_mean(features, weights, 0.1, 0.07)[0], rtol=1e-6)
  np.testing.assert_allclose(
      jitted['supcon_labels'],
      losses.supcon_loss_mean(features, losses.positive_weights(labels, 'same_label'), 0.1,
                              0.07)[0], rtol=1e-6)
  np.testing.assert_allclose(jitted['simclr'], losses.simclr_loss(features, 0.1)[0], rtol=1e-6)
  assert np.isfinite(float(jitted['sigmoid']))
