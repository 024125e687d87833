"""Probe benchmark: the JAX linear probe against scikit-learn, and the MLP probe's time.

  python benchmarks/probe.py                                # N=100,000, D=2,048, K=14
  python benchmarks/probe.py --n 20000 --d 512 --k 5        # smaller

Data: synthetic embeddings shaped like a CNN's pooled features. A latent vector with
a power-law spectrum (variance of factor j ~ 1/j, 256 factors) is mixed into D
features, noise is added, and softplus makes them non-negative and skewed, like
ReLU-then-average-pool embeddings; findings are logistic in the same latent
factors (prevalence 2-30 %, correlated with each other), and 5 % of each finding's
labels are masked (unknown). The held-out test set comes from the same model.

Timing, in one process on the same data:
- JAX: `cxr_jax.probe.fit(kind='linear')` end to end (input checks, standardisation,
  preconditioner, solve), once with JIT compilation (what a user's first call
  costs) and once more without (a later call of the same shape).
- scikit-learn: `LogisticRegression(C=1.0, solver='lbfgs', max_iter=1000)`, the same
  objective (C=1 is the probe's default l2 = 1/n_k), fitted one finding at a time on
  that finding's labelled rows of the same standardised float32 features; only the
  `.fit` calls are timed (standardising and row selection are not).
- Both stop when the largest gradient entry is below tol=1e-4 (sklearn's default).
- AUROC (cxr_jax.eval.metrics.auroc) of both on the test set, and their difference.
- MLP: `fit(kind='mlp')` for --mlp_epochs epochs (no early stop), its time and AUROC.

Prints a Markdown table; --json writes the numbers to a file.
"""

import argparse
import json
import platform
import time

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression

from cxr_jax import probe
from cxr_jax.eval import metrics


def synthetic_embeddings(n: int, d: int, k: int, seed: int, latent: int = 256,
                         mask_fraction: float = 0.05, chunk: int = 10000):
  """(embeddings float32 [n, d], labels float32 [n, k], mask float32 [n, k])."""
  rng = np.random.default_rng(seed)
  params = np.random.default_rng(12345)   # The same model for train and test sets.
  spectrum = (1.0 + np.arange(latent)) ** -1.0
  mixing = (params.standard_normal((latent, d)) / np.sqrt(spectrum.sum())).astype(np.float32)
  effects = params.standard_normal((latent, k)) * np.sqrt(spectrum)[:, None]
  effects /= np.sqrt((effects ** 2 * spectrum[:, None]).sum(axis=0))  # Unit signal variance.
  prevalence = params.uniform(0.02, 0.3, k)
  bias = np.log(prevalence / (1 - prevalence))
  embeddings, labels = [], []
  for start in range(0, n, chunk):
    rows = min(chunk, n - start)
    factors = (rng.standard_normal((rows, latent)) * np.sqrt(spectrum)).astype(np.float32)
    features = 2.0 * factors @ mixing + rng.standard_normal((rows, d), dtype=np.float32)
    embeddings.append(np.logaddexp(0, features).astype(np.float32))
    logits = 2.0 * factors @ effects + bias
    labels.append((rng.uniform(size=(rows, k)) < 1 / (1 + np.exp(-logits))).astype(np.float32))
  mask = (rng.uniform(size=(n, k)) >= mask_fraction).astype(np.float32)
  return np.concatenate(embeddings), np.concatenate(labels), mask


def auroc_per_finding(labels, mask, scores):
  return np.array([metrics.auroc(labels[mask[:, j] > 0, j], scores[mask[:, j] > 0, j])
                   for j in range(labels.shape[1])])


def timed(fn):
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--n', type=int, default=100000, help='training examples')
  parser.add_argument('--n_test', type=int, default=20000, help='held-out examples')
  parser.add_argument('--d', type=int, default=2048, help='embedding size')
  parser.add_argument('--k', type=int, default=14, help='findings')
  parser.add_argument('--sklearn_findings', type=int, default=None,
                      help='fit sklearn on this many findings only (default: all)')
  parser.add_argument('--mlp_epochs', type=int, default=3, help='0: skip the MLP')
  parser.add_argument('--json', default=None, help='also write the numbers here')
  args = parser.parse_args()

  (x, y, m), data_seconds = timed(lambda: synthetic_embeddings(args.n, args.d, args.k, 0))
  x_test, y_test, m_test = synthetic_embeddings(args.n_test, args.d, args.k, 1)
  print(f'data: {args.n} x {args.d}, {args.k} findings, made in {data_seconds:.1f} s',
        flush=True)

  first, jax_first = timed(lambda: probe.fit(x, y, m, kind='linear'))
  linear, jax_warm = timed(lambda: probe.fit(x, y, m, kind='linear'))
  jax_auroc = auroc_per_finding(y_test, m_test, linear.predict(x_test))
  print(f'jax linear: {jax_first:.1f} s with compilation, {jax_warm:.1f} s without; '
        f'{linear.history["iterations"]} L-BFGS iterations', flush=True)
  del first

  features = (x - linear.mean) / linear.scale
  features_test = (x_test - linear.mean) / linear.scale
  num_sklearn = args.k if args.sklearn_findings is None else min(args.sklearn_findings, args.k)
  sklearn_seconds, sklearn_iterations, sklearn_auroc = [], [], []
  for j in range(num_sklearn):
    rows = m[:, j] > 0
    model = LogisticRegression(C=1.0, solver='lbfgs', max_iter=1000, tol=1e-4)
    features_j, labels_j = features[rows], y[rows, j]
    _, seconds = timed(lambda: model.fit(features_j, labels_j))
    sklearn_seconds.append(seconds)
    sklearn_iterations.append(int(model.n_iter_[0]))
    scores = model.predict_proba(features_test)[:, 1]
    known = m_test[:, j] > 0
    sklearn_auroc.append(metrics.auroc(y_test[known, j], scores[known]))
    print(f'sklearn finding {j}: {seconds:.1f} s, {model.n_iter_[0]} iterations', flush=True)
  sklearn_total = float(np.sum(sklearn_seconds)) * args.k / num_sklearn
  difference = np.abs(jax_auroc[:num_sklearn] - np.array(sklearn_auroc))

  result = dict(
      n=args.n, n_test=args.n_test, d=args.d, k=args.k, device=str(jax.devices()[0]),
      machine=platform.machine(), jax_first_s=jax_first, jax_warm_s=jax_warm,
      jax_iterations=linear.history['iterations'], sklearn_s=sklearn_total,
      sklearn_findings_fitted=num_sklearn, sklearn_iterations=sklearn_iterations,
      ratio_first=sklearn_total / jax_first, ratio_warm=sklearn_total / jax_warm,
      jax_mean_auroc=float(np.mean(jax_auroc)),
      sklearn_mean_auroc=float(np.mean(sklearn_auroc)),
      max_abs_auroc_difference=float(difference.max()))

  if args.mlp_epochs:
    config = {'epochs': args.mlp_epochs, 'patience': args.mlp_epochs}
    mlp, mlp_seconds = timed(lambda: probe.fit(x, y, m, kind='mlp', config=config))
    result.update(mlp_s=mlp_seconds, mlp_epochs=mlp.history['epochs_run'],
                  mlp_s_per_epoch=mlp_seconds / mlp.history['epochs_run'],
                  mlp_mean_auroc=float(np.mean(auroc_per_finding(y_test, m_test,
                                                                 mlp.predict(x_test)))))

  extrapolated = '' if num_sklearn == args.k else f' (from {num_sklearn} findings, scaled)'
  print(f'\nN={args.n:,}, D={args.d:,}, {args.k} findings, test N={args.n_test:,}\n')
  print('| probe | wall time (s) | iterations | mean test AUROC |')
  print('|---|---|---|---|')
  print(f'| JAX linear, first call (with compilation) | {jax_first:.1f} | '
        f'{result["jax_iterations"]} | {result["jax_mean_auroc"]:.4f} |')
  print(f'| JAX linear, later call | {jax_warm:.1f} | {result["jax_iterations"]} | '
        f'{result["jax_mean_auroc"]:.4f} |')
  print(f'| scikit-learn, one finding at a time{extrapolated} | {sklearn_total:.1f} | '
        f'{min(sklearn_iterations)}-{max(sklearn_iterations)} per finding | '
        f'{result["sklearn_mean_auroc"]:.4f} |')
  if args.mlp_epochs:
    print(f'| JAX MLP [512, 256], {result["mlp_epochs"]} epochs | {result["mlp_s"]:.1f} '
          f'({result["mlp_s_per_epoch"]:.1f} per epoch) | - | '
          f'{result["mlp_mean_auroc"]:.4f} |')
  print(f'\nspeed-up over scikit-learn: {result["ratio_first"]:.1f}x (first call), '
        f'{result["ratio_warm"]:.1f}x (later call); largest AUROC difference '
        f'{result["max_abs_auroc_difference"]:.5f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
