"""How hard is the synthetic CXR task? Trivial features versus a small CNN.

  python benchmarks/synthetic_difficulty.py --train 2000 --test 1000 --image_size 64

For every finding, test AUROC (against the true labels) of:
  - mean intensity: the global mean pixel value, read in its better direction;
  - linear 8x8: L2-regularised logistic regression on the image downsampled to 8x8;
  - cnn: a small Flax CNN trained briefly (multi-label, binary cross-entropy).
The data should be learnable but not trivial: the first two should stay well
below the CNN. Results go to stdout as a Markdown table and, with --json, to a file.
"""

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize, stats

from cxr_jax.data import synthetic


def auroc(labels, scores):
  """Mann-Whitney AUROC with tied scores counted as half."""
  labels = np.asarray(labels, bool)
  positives, negatives = labels.sum(), (~labels).sum()
  if not positives or not negatives:
    return float('nan')
  ranks = stats.rankdata(scores)
  return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def make_dataset(start, count, image_size, site, seed):
  images, labels = [], []
  for index in range(start, start + count):
    example = synthetic.generate_cxr(index, seed=seed, site=site, image_size=image_size,
                                     label_noise=0.0)
    images.append(example['image'])
    labels.append(example['true_labels'])
  images = np.stack(images).astype(np.float32) / 65535.0
  return images, np.stack(labels).astype(np.float32)


def downsample(images, cells=8):
  n, h, w = images.shape
  return images.reshape(n, cells, h // cells, cells, w // cells).mean(axis=(2, 4)).reshape(n, -1)


def logistic_regression(x, y, l2=1.0):
  """Weights of an L2-regularised logistic regression, fit by L-BFGS."""
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)

  def loss_and_grad(w):
    z = x @ w
    loss = np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * np.sum(w[:-1] ** 2)
    grad = x.T @ (1 / (1 + np.exp(-z)) - y)
    grad[:-1] += l2 * w[:-1]
    return loss, grad

  w = optimize.minimize(loss_and_grad, np.zeros(x.shape[1]), jac=True, method='L-BFGS-B').x
  return lambda features: np.concatenate([features, np.ones((len(features), 1))], 1) @ w


class SmallCNN(nn.Module):
  num_outputs: int

  @nn.compact
  def __call__(self, x):
    for features in (16, 32, 64, 64):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.GroupNorm(num_groups=8)(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_outputs)(x)


def train_cnn(train_x, train_y, test_x, epochs, batch_size, learning_rate, seed=0):
  model = SmallCNN(train_y.shape[1])
  mean, std = train_x.mean(), train_x.std()
  normalise = lambda x: ((x - mean) / std)[..., None]
  params = model.init(jax.random.PRNGKey(seed), normalise(train_x[:1]))
  steps = epochs * (len(train_x) // batch_size)
  optimizer = optax.adamw(optax.cosine_onecycle_schedule(steps, learning_rate), weight_decay=1e-4)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.sigmoid_binary_cross_entropy(model.apply(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  predict = jax.jit(model.apply)
  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(train_x))
    losses = []
    for i in range(0, len(order) - batch_size + 1, batch_size):
      batch = order[i:i + batch_size]
      params, opt_state, loss = step(params, opt_state, normalise(train_x[batch]),
                                     train_y[batch])
      losses.append(float(loss))
    print(f'  epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}', flush=True)
  outputs = [np.asarray(predict(params, normalise(test_x[i:i + 256])))
             for i in range(0, len(test_x), 256)]
  return np.concatenate(outputs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train', type=int, default=2000)
  parser.add_argument('--test', type=int, default=1000)
  parser.add_argument('--image_size', type=int, default=64)
  parser.add_argument('--site', default='A')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--epochs', type=int, default=40, help='0: baselines only.')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=3e-3)
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  start = time.perf_counter()
  train_x, train_y = make_dataset(0, args.train, args.image_size, args.site, args.seed)
  # Test studies come from a later index range: no patient is shared with training
  # because patients never straddle a block of STUDIES_PER_BLOCK indices.
  offset = -(-args.train // synthetic.STUDIES_PER_BLOCK) * synthetic.STUDIES_PER_BLOCK
  test_x, test_y = make_dataset(offset, args.test, args.image_size, args.site, args.seed)
  print(f'generated {args.train + args.test} images in {time.perf_counter() - start:.1f} s')

  results = {name: {'test_positives': int(test_y[:, k].sum())}
             for k, name in enumerate(synthetic.CXR_FINDINGS)}
  train_small, test_small = downsample(train_x), downsample(test_x)
  feature_mean, feature_std = train_small.mean(0), train_small.std(0) + 1e-6
  train_small = (train_small - feature_mean) / feature_std
  test_small = (test_small - feature_mean) / feature_std
  for k, name in enumerate(synthetic.CXR_FINDINGS):
    mean_auc = auroc(test_y[:, k], test_x.mean(axis=(1, 2)))
    results[name]['mean_intensity'] = max(mean_auc, 1 - mean_auc)
    scorer = logistic_regression(train_small, train_y[:, k])
    results[name]['linear_8x8'] = auroc(test_y[:, k], scorer(test_small))

  if args.epochs:
    start = time.perf_counter()
    logits = train_cnn(train_x, train_y, test_x, args.epochs, args.batch_size,
                       args.learning_rate, args.seed)
    print(f'trained the CNN in {time.perf_counter() - start:.1f} s')
  for k, name in enumerate(synthetic.CXR_FINDINGS):
    results[name]['cnn'] = auroc(test_y[:, k], logits[:, k]) if args.epochs else float('nan')

  print(f'\n{args.train} train / {args.test} test images, {args.image_size} px, '
        f'site {args.site}, true labels; test AUROC\n')
  print('| finding | test positives | mean intensity | linear 8x8 | small CNN |')
  print('|---|---|---|---|---|')
  for name, row in results.items():
    print(f"| {name} | {row['test_positives']} | {row['mean_intensity']:.3f} | "
          f"{row['linear_8x8']:.3f} | {row['cnn']:.3f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'results': results}, f, indent=2)


if __name__ == '__main__':
  main()
