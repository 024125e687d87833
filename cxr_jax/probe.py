"""Linear and MLP probes: classifiers on frozen embeddings, one sigmoid output per finding.

  probe = fit(embeddings, labels, mask, kind='linear', findings=names)
  probabilities = probe.predict(test_embeddings)      # [N, K]
  probe.save('probe.npz'); probe = load('probe.npz')

  python -m cxr_jax.probe --train train.npz --eval test.npz --output DIR \\
      [--kind linear|mlp] [--findings a,b] [--budget N --seed S] [--uncertain ignore] \\
      [--config '{"class_weight": "balanced"}']

The command line reads embeddings files (or shard directories) with
`cxr_jax.embeddings_file.load_embeddings`, turns the stored label codes into labels and
a mask with `LabelPolicy`, trains on all (or --budget drawn) training rows, and writes
DIR/probe.npz, DIR/predictions.npz and DIR/metrics.json (AUROC per finding).

What is fitted. Labels are 0/1 per finding with a mask (1 where the label is known);
a masked entry never reaches the loss, whatever its label. Features are standardised
with the training set's mean and standard deviation (a constant feature gets scale 1),
and the probe keeps both. For finding k the objective is

  sum_i a_ik * logloss(y_ik, logit_ik) + l2 / 2 * ||kernel||^2

where a_ik = mask_ik * class_weight_ik, normalised to sum to 1 over the training set:
the weighted mean loss over the labelled examples. 'balanced' class weights are
n_k / (2 * n_k,class), as in scikit-learn; biases are not penalised.

Linear probe: that objective is scikit-learn's `LogisticRegression(C)` on the same
standardised features with l2 = 1 / (C * n_k), n_k the finding's labelled examples
(sklearn scales its penalty by the sum of sample weights the same way); `l2=None`
means C = 1, sklearn's default. It is solved to its optimum by full-batch L-BFGS
(optax.lbfgs, zoom line search) on the sum of the K objectives, whose optimum is each
finding's own (the terms share no parameters), in one jit: an iteration reads the
features once for all findings (a matrix product) where sklearn, fitted one finding at
a time, reads them K times (matrix-vector products). It stops when every finding's
largest gradient entry is below `tol` (sklearn's lbfgs criterion); a warning names the
findings that did not get there within `max_iter`. L-BFGS works in preconditioned
variables (`_solve_linear`), which cuts the iterations several-fold on correlated
embeddings. The kernel is optimised as [K, D] and stored in `LinearHead`'s [D, K]
layout: XLA:CPU computes the gradient of x @ W about 5x faster with W as [K, D]
(BENCHMARKS.md). No validation data is used: the L2 penalty is the regulariser and the
optimum is unique.

MLP probe: the recipe of the published CXR Foundation notebooks (google-health/
cxr-foundation, train_data_efficient_classifier: hidden layers [512, 256] with batch
norm and dropout, L2 on the kernels, cosine learning-rate decay, batch 512, up to 100
epochs) on the project's `MLPHead` (which puts batch norm before the ReLU; one output
per finding on a shared trunk), trained by minibatch Adam. After each epoch the
validation loss or mean AUROC is measured; training stops after `patience` epochs
without improvement and the best epoch's parameters (and batch statistics) are
restored. Validation data is the `validation` argument or, when none is given, a
seeded `validation_fraction` of the training examples held out.

A finding with a single class among its labelled training examples is an error that
names it (there is nothing to learn, and a constant output would be a silent wrong
number); leave it out with `findings` / `--findings`. Results are a function of the
inputs and `seed` only.
"""

import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from cxr_jax import cli
from cxr_jax import embeddings_file
from cxr_jax import npz_files
from cxr_jax.data import labels as labels_lib
from cxr_jax.eval import efficiency
from cxr_jax.eval import metrics
from cxr_jax.eval import report
from cxr_jax.models import heads

KINDS = ('linear', 'mlp')
CLASS_WEIGHTS = ('none', 'balanced')
EARLY_STOPPING = ('loss', 'auroc')
FORMAT_VERSION = 1
# Rows per predict call: bounded memory, and one compiled shape for any N.
_PREDICT_CHUNK = 8192
# Covariance eigenpairs in the linear probe's preconditioner (more cut iterations at
# N=100,000 until about 256; see BENCHMARKS.md).
_PRECONDITIONER_RANK = 256


class ConvergenceWarning(UserWarning):
  """The linear probe's solver stopped before its gradient tolerance was met."""


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """How a probe trains. (linear) and (mlp) fields apply to that kind only."""
  # 'none' or 'balanced' (per finding, n / (2 * n_class), as scikit-learn).
  class_weight: str = 'none'
  # L2 coefficient on the kernels, added to the mean loss as l2 / 2 * ||kernel||^2.
  # None: linear 1 / n_k (scikit-learn's default C=1); mlp 0 (the published recipe).
  l2: Optional[float] = None
  # (linear) L-BFGS iterations at most, and the max |gradient| at which a finding stops.
  max_iter: int = 1000
  tol: float = 1e-4
  # (mlp) Hidden widths and dropout rate of MLPHead.
  hidden: Tuple[int, ...] = (512, 256)
  dropout: float = 0.1
  # (mlp) Adam's peak learning rate (cosine decay to 0 over `epochs`), examples per step.
  learning_rate: float = 1e-3
  batch_size: int = 512
  epochs: int = 100
  # (mlp) Early stopping: epochs without improvement, and on what ('loss' or 'auroc').
  patience: int = 10
  early_stopping: str = 'loss'
  # (mlp) Fraction of the training examples held out when no validation set is given.
  validation_fraction: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, 'hidden', tuple(int(width) for width in self.hidden))
    choices = {'class_weight': CLASS_WEIGHTS, 'early_stopping': EARLY_STOPPING}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f'ProbeConfig.{name}={getattr(self, name)!r}; expected one of '
                         f'{allowed}.')
    positive = ('max_iter', 'tol', 'learning_rate', 'batch_size', 'epochs', 'patience')
    for name in positive:
      if not getattr(self, name) > 0:
        raise ValueError(f'ProbeConfig.{name}={getattr(self, name)!r}; expected > 0.')
    if self.l2 is not None and not self.l2 >= 0:
      raise ValueError(f'ProbeConfig.l2={self.l2!r}; expected >= 0 or None.')
    if not 0 <= self.dropout < 1:
      raise ValueError(f'ProbeConfig.dropout={self.dropout!r}; expected 0 <= dropout < 1.')
    if not 0 < self.validation_fraction < 1:
      raise ValueError(f'ProbeConfig.validation_fraction={self.validation_fraction!r}; '
                       'expected 0 < fraction < 1.')
    if any(width < 1 for width in self.hidden):
      raise ValueError(f'ProbeConfig.hidden={self.hidden!r}; expected positive widths.')

  @classmethod
  def create(cls, config=None) -> 'ProbeConfig':
    """None, a ProbeConfig, or a mapping / ml_collections ConfigDict of its fields."""
    if config is None:
      return cls()
    if isinstance(config, cls):
      return config
    if hasattr(config, 'to_dict'):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f'Probe config must be a ProbeConfig, a mapping or None; got '
                      f'{type(config).__name__}.')
    valid = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(valid))
    if unknown:
      raise ValueError(f'Unknown probe config keys {unknown}; valid keys: {", ".join(valid)}.')
    return cls(**config)

  def to_dict(self) -> Dict[str, Any]:
    return {**dataclasses.asdict(self), 'hidden': list(self.hidden)}


def _make_head(kind: str, num_findings: int, config: ProbeConfig):
  if kind == 'linear':
    return heads.LinearHead(num_classes=num_findings)
  return heads.MLPHead(num_classes=num_findings, hidden=config.hidden, dropout=config.dropout)


@dataclasses.dataclass
class Probe:
  """A trained probe: head parameters plus the standardisation it was trained with.

  Attributes:
    kind: 'linear' or 'mlp'.
    config: the ProbeConfig it was trained with.
    findings: K names, the order of the outputs.
    params: the head's parameters (LinearHead / MLPHead layout).
    model_state: {'batch_stats': ...} for the MLP, {} for the linear probe.
    mean, scale: float32 [D], features are (x - mean) / scale.
    history: how training went (linear: iterations and final max |gradient| per
      finding; mlp: per-epoch validation loss/AUROC, best_epoch, epochs_run).
  """
  kind: str
  config: ProbeConfig
  findings: Tuple[str, ...]
  params: Dict[str, Any]
  model_state: Dict[str, Any]
  mean: np.ndarray
  scale: np.ndarray
  history: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def head(self):
    return _make_head(self.kind, len(self.findings), self.config)

  def logits(self, embeddings) -> np.ndarray:
    """float32 [N, K] logits for [N, D] embeddings."""
    x = _check_embeddings(embeddings, 'predict')
    if x.shape[1] != self.mean.shape[0]:
      raise ValueError(f'predict: embeddings have {x.shape[1]} features; this probe was '
                       f'trained on {self.mean.shape[0]}.')
    return _predict_logits(self.head, {'params': self.params, **self.model_state},
                           self.mean, self.scale, x)

  def predict(self, embeddings) -> np.ndarray:
    """float32 [N, K] probabilities for [N, D] embeddings, one column per finding."""
    return np.asarray(jax.nn.sigmoid(self.logits(embeddings)))

  def save(self, path: str) -> None:
    """Writes one .npz (no pickles): parameters, standardisation, config, findings."""
    arrays = {f'params/{key}': np.asarray(value) for key, value in
              flax.traverse_util.flatten_dict(self.params, sep='/').items()}
    arrays.update({f'model_state/{key}': np.asarray(value) for key, value in
                   flax.traverse_util.flatten_dict(self.model_state, sep='/').items()})
    arrays.update(mean=self.mean, scale=self.scale, kind=np.array(self.kind),
                  findings=np.array(self.findings, dtype=np.str_),
                  config=np.array(json.dumps(self.config.to_dict())),
                  history=np.array(json.dumps(report.to_builtin(self.history))),
                  format_version=np.array(FORMAT_VERSION))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, 'wb') as f:
      np.savez(f, **arrays)


def load(path: str) -> Probe:
  """Reads a probe written by `Probe.save`; errors name the file and what is wrong."""
  arrays = npz_files.read(path, 'probe file')
  required = ('kind', 'findings', 'config', 'mean', 'scale', 'format_version')
  missing = [key for key in required if key not in arrays]
  if missing:
    raise ValueError(f'{path}: not a probe file; keys {missing} are missing '
                     f'(it has {sorted(arrays)}).')
  if int(arrays['format_version']) != FORMAT_VERSION:
    raise ValueError(f'{path}: probe format version {int(arrays["format_version"])}; this '
                     f'code reads version {FORMAT_VERSION}.')
  kind = str(arrays['kind'])
  if kind not in KINDS:
    raise ValueError(f'{path}: probe kind {kind!r}; expected one of {KINDS}.')
  config = ProbeConfig.create(json.loads(str(arrays['config'])))
  findings = tuple(str(name) for name in arrays['findings'])
  mean = arrays['mean'].astype(np.float32)
  params, model_state = {}, {}
  for key, value in arrays.items():
    if key.startswith('params/'):
      params[key[len('params/'):]] = value
    elif key.startswith('model_state/'):
      model_state[key[len('model_state/'):]] = value
  # The file must hold exactly the head's variables, with their shapes.
  head = _make_head(kind, len(findings), config)
  template = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0),
                                              jnp.zeros((1, mean.shape[0])), train=False))
  expected = {f'params/{key}': value.shape for key, value in
              flax.traverse_util.flatten_dict(template['params'], sep='/').items()}
  expected.update({f'model_state/{key}': value.shape for key, value in
                   flax.traverse_util.flatten_dict(
                       {k: v for k, v in template.items() if k != 'params'}, sep='/').items()})
  found = {f'params/{key}': value.shape for key, value in params.items()}
  found.update({f'model_state/{key}': value.shape for key, value in model_state.items()})
  if found != expected:
    problems = sorted(set(expected) ^ set(found)) + [
        f'{key} {found[key]} (expected {expected[key]})' for key in sorted(set(found) & set(
            expected)) if found[key] != expected[key]]
    raise ValueError(f'{path}: the {kind} probe\'s parameters do not fit its config; '
                     f'mismatched: {problems}.')
  return Probe(kind=kind, config=config, findings=findings,
               params=flax.traverse_util.unflatten_dict(params, sep='/'),
               model_state=flax.traverse_util.unflatten_dict(model_state, sep='/'),
               mean=mean, scale=arrays['scale'].astype(np.float32),
               history=json.loads(str(arrays['history'])) if 'history' in arrays else {})


# ----------------------------------------------------------------------------- inputs


def _check_embeddings(embeddings, what: str) -> np.ndarray:
  """-> float32 [N, D]; errors say which input and which rows are bad."""
  x = np.asarray(embeddings)
  if x.ndim != 2 or 0 in x.shape:
    raise ValueError(f'{what}: expected embeddings of shape [N, D] with N, D > 0; got '
                     f'shape {x.shape}.')
  if x.dtype.kind not in 'biuf':
    raise ValueError(f'{what}: expected numeric embeddings; got dtype {x.dtype}.')
  x = x.astype(np.float32, copy=False)
  # A row sum is NaN/inf when an entry is (or when it overflows: those rows are
  # rechecked); 15x faster than np.isfinite over the whole array.
  suspects = np.flatnonzero(~np.isfinite(x.sum(axis=1)))
  rows = suspects[~np.isfinite(x[suspects]).all(axis=1)]
  if rows.size:
    raise ValueError(f'{what}: {rows.size} embedding rows hold NaN or inf (as float32); '
                     f'the first is row {rows[0]}.')
  return x


def _check_targets(labels, mask, num_examples: int, findings, what: str):
  """-> (labels float32 [N, K] with masked entries 0, mask float32 [N, K], findings)."""
  y = np.asarray(labels)
  if y.ndim == 1:
    y = y[:, None]
  if y.ndim != 2 or y.shape[1] == 0:
    raise ValueError(f'{what}: expected labels of shape [N, K] (or [N]); got {y.shape}.')
  if y.shape[0] != num_examples:
    raise ValueError(f'{what}: {num_examples} embeddings but {y.shape[0]} label rows.')
  if y.dtype.kind not in 'biuf':
    raise ValueError(f'{what}: expected numeric 0/1 labels; got dtype {y.dtype}.')
  if mask is None:
    known = np.ones(y.shape, bool)
  else:
    m = np.asarray(mask)
    if m.ndim == 1:
      m = m[:, None]
    if m.shape != y.shape:
      raise ValueError(f'{what}: mask has shape {m.shape}; expected {y.shape} like the labels.')
    if m.dtype.kind not in 'biuf' or not np.all((m == 0) | (m == 1)):
      raise ValueError(f'{what}: the mask must hold only 0 and 1 (1 = label known).')
    known = m.astype(bool)
  bad = known & ~((y == 0) | (y == 1))
  if bad.any():
    values = np.unique(y[bad])[:5].tolist()
    raise ValueError(f'{what}: labels where the mask is 1 must be 0 or 1; found {values}. '
                     'Raw codes (-1 uncertain, -2 unmentioned) need a label policy '
                     '(cxr_jax.data.labels.LabelPolicy) or a mask first.')
  if findings is None:
    findings = tuple(f'finding_{k}' for k in range(y.shape[1]))
  findings = tuple(str(name) for name in findings)
  if len(findings) != y.shape[1]:
    raise ValueError(f'{what}: {len(findings)} finding names for {y.shape[1]} label columns.')
  # Zeroed so that whatever a masked entry holds (even NaN) cannot reach the loss.
  y = np.where(known, y, 0).astype(np.float32)
  return y, known.astype(np.float32), findings


def _class_counts(y, m):
  positives = (y * m).sum(axis=0)
  return positives, m.sum(axis=0) - positives


def _check_both_classes(y, m, findings, what: str) -> None:
  positives, negatives = _class_counts(y, m)
  single = [f'{name} ({int(p)} positive, {int(n)} negative)'
            for name, p, n in zip(findings, positives, negatives) if p == 0 or n == 0]
  if single:
    raise ValueError(f'{what}: a probe needs labelled positives and negatives of every '
                     f'finding; these have a single class: {"; ".join(single)}. Leave them '
                     'out (findings / --findings) or add labelled examples.')


def _example_weights(y, m, class_weight: str) -> np.ndarray:
  """float32 [N, K]: mask x class weight, each column summing to 1 (0 if unlabelled)."""
  positives, negatives = _class_counts(y, m)
  if class_weight == 'balanced':
    # n / (2 n_class), divided by n: each class carries half of the finding's weight.
    weights = np.where(y > 0, 0.5 / np.maximum(positives, 1), 0.5 / np.maximum(negatives, 1))
    return (m * weights).astype(np.float32)
  return (m / np.maximum(positives + negatives, 1)).astype(np.float32)


def _split_validation(num_examples: int, fraction: float, seed: int):
  """Seeded (train, validation) index arrays; the validation part is never empty."""
  if num_examples < 2:
    raise ValueError(f'Holding out a validation split needs at least 2 training examples; '
                     f'got {num_examples}. Pass validation data instead.')
  order = np.random.default_rng([seed, num_examples]).permutation(num_examples)
  held_out = min(max(1, int(round(fraction * num_examples))), num_examples - 1)
  return np.sort(order[held_out:]), np.sort(order[:held_out])


# ----------------------------------------------------------------------------- math


def _logistic_loss(logits, targets):
  """Binary cross-entropy from logits, stable for any logit."""
  return jax.nn.softplus(logits) - targets * logits


def _feature_statistics(x: np.ndarray, chunk: int = 4096):
  """float32 mean and standard deviation per feature (1 where a feature is constant).

  NumPy, in row chunks: several times faster than XLA:CPU's column reductions or
  np.std's full-size temporaries at N=100,000, D=2,048.
  """
  mean = x.mean(axis=0)
  squares = np.zeros(x.shape[1], np.float64)
  for start in range(0, x.shape[0], chunk):
    centred = x[start:start + chunk] - mean
    squares += np.einsum('ij,ij->j', centred, centred)
  std = np.sqrt(squares / x.shape[0]).astype(np.float32)
  return mean, np.where(std > 0, std, 1).astype(np.float32)


def _standardised(x: np.ndarray, mean, scale, chunk: int = 4096) -> np.ndarray:
  """(x - mean) / scale, float32, in a 64-byte-aligned buffer.

  XLA:CPU uses an aligned NumPy array in place instead of copying it into every jit
  call (an 819 MB copy at N=100,000, D=2,048).
  """
  size = x.shape[0] * x.shape[1] * 4
  buffer = np.empty(size + 64, np.uint8)
  offset = -buffer.ctypes.data % 64
  features = buffer[offset:offset + size].view(np.float32).reshape(x.shape)
  for start in range(0, x.shape[0], chunk):
    rows = slice(start, start + chunk)
    np.subtract(x[rows], mean, out=features[rows])
    features[rows] /= scale
  return features


def _predict_logits(head, variables, mean, scale, x) -> np.ndarray:
  """Logits in chunks padded to a power of two: few compiled shapes for any N."""
  outputs = []
  for start in range(0, x.shape[0], _PREDICT_CHUNK):
    chunk = x[start:start + _PREDICT_CHUNK]
    rows = chunk.shape[0]
    padded = min(_PREDICT_CHUNK, max(64, 1 << (rows - 1).bit_length()))
    chunk = np.pad(chunk, ((0, padded - rows), (0, 0)), constant_values=0)
    outputs.append(np.asarray(_apply_head(variables, mean, scale, chunk, head=head))[:rows])
  return np.concatenate(outputs).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('head',))
def _apply_head(variables, mean, scale, x, *, head):
  return head.apply(variables, (x - mean) / scale, train=False)


def _orthonormal_columns(matrix: np.ndarray) -> np.ndarray:
  """An orthonormal basis of `matrix`'s column space, from the eigenvectors of its float64
  Gram matrix (LAPACK's QR slowed down 30x under thread contention here; this did not)."""
  matrix = matrix.astype(np.float64)
  values, vectors = np.linalg.eigh(matrix.T @ matrix)
  keep = values > values.max(initial=0.0) * 1e-12
  return (matrix @ (vectors[:, keep] / np.sqrt(values[keep]))).astype(np.float32)


def _covariance_eigenpairs(features: np.ndarray, rank: int, rows: int = 4096,
                           power_steps: int = 1):
  """Top eigenpairs of the features' covariance, and the mean of the other eigenvalues.

  A randomized range finder with power steps (Halko, Martinsson & Tropp 2011, alg.
  4.4) on at most `rows` evenly spaced rows: about 20 GFLOP at D=2,048 and rank
  256, where an exact eigendecomposition of the D x D covariance costs more than the
  whole solve on a CPU. Seeded, so repeatable.

  Returns:
    (values float32 [r], vectors float32 [D, r], rest float32), r <= rank.
  """
  sample = features[::max(1, features.shape[0] // rows)]
  size, dim = sample.shape
  basis = np.random.default_rng(0).standard_normal((dim, min(rank + 8, dim)))
  basis = _orthonormal_columns(sample.T @ (sample @ basis.astype(np.float32)))
  for _ in range(power_steps):
    basis = _orthonormal_columns(sample.T @ (sample @ basis))
  projected = sample @ basis
  values, vectors = np.linalg.eigh(projected.T @ projected / size)
  order = np.argsort(values)[::-1][:rank]
  values, vectors = np.maximum(values[order], 0), basis @ vectors[:, order]
  trace = float(np.einsum('ij,ij->', sample, sample)) / size
  remaining = dim - values.size
  rest = max(trace - float(values.sum()), 0.0) / remaining if remaining else 0.0
  return values.astype(np.float32), vectors.astype(np.float32), np.float32(rest)


@jax.jit
def _solve_linear(features, eigenpairs, targets, weights, l2, max_iter, tol):
  """L2-regularised logistic regression for K findings at once, to the optimum.

  The K objectives are summed (their optimum is each finding's own) and minimised by
  one optax.lbfgs over kernel [K, D] and bias [K]. L-BFGS runs in preconditioned
  variables: w_k = P_k^(-1/2) v_k with P_k = s_k * C + l2_k * I, C the features'
  covariance (its top `rank` eigenpairs, the rest of the spectrum at its mean) and s_k
  the logistic curvature p_k (1 - p_k) at the prior. P_k approximates finding k's
  Hessian, so the problem L-BFGS sees is close to isotropic: the objective and its
  optimum are unchanged, and the iterations needed drop several-fold on correlated
  embeddings (see BENCHMARKS.md).

  (Not a vmap of one L-BFGS per finding: optax's line search carries the objective's
  closed-over arrays through its loop, and under vmap that copied the [N, D] features
  K times.)

  Args:
    features: float32 [N, D], standardised.
    eigenpairs: `_covariance_eigenpairs` of the features.
    targets, weights: float32 [N, K]; each weight column sums to 1.
    l2: float32 [K], per-finding penalty.
    max_iter, tol: L-BFGS limits; it stops when every entry of the gradient (with
      respect to the kernel and bias) is below tol in absolute value, or when the
      line search finds no step at all.

  Returns:
    (kernel [K, D], bias [K], iterations, function evaluations in line searches,
    max |gradient| [K]).
  """
  prior = jnp.clip(jnp.sum(weights * targets, axis=0), 1e-6, 1 - 1e-6)
  curvature = prior * (1 - prior)
  values, vectors, rest = eigenpairs
  # Floored so that a direction without data or penalty (l2=0, D > N) stays finite.
  floor = 1e-6 * curvature[:, None]
  top = jnp.maximum(curvature[:, None] * values + l2[:, None], floor)     # [K, r]
  other = jnp.maximum(curvature * rest + l2, floor[:, 0])                  # [K]

  def scaled(kernel, power):
    """P^power @ kernel for each finding's row: shared eigenvectors, own scales."""
    along = kernel @ vectors                                              # [K, r]
    return (other ** power)[:, None] * kernel + (
        (top ** power - (other ** power)[:, None]) * along) @ vectors.T

  def to_params(preconditioned):
    kernel, bias = preconditioned
    return scaled(kernel, -0.5), bias * curvature ** -0.5

  def objective(preconditioned):
    kernel, bias = to_params(preconditioned)
    logits = features @ kernel.T + bias                                   # [N, K]
    return (jnp.sum(weights * _logistic_loss(logits, targets)) +
            0.5 * jnp.sum(l2 * jnp.sum(jnp.square(kernel), axis=1)))

  optimizer = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def largest_gradients(state):
    # The gradient in the original parameters: P^(1/2) times the preconditioned one.
    kernel_grad, bias_grad = otu.tree_get(state, 'grad')
    return jnp.maximum(jnp.max(jnp.abs(scaled(kernel_grad, 0.5)), axis=1),
                       jnp.abs(bias_grad * curvature ** 0.5))

  def step(carry):
    params, state, evaluations, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = optimizer.update(grad, state, params, value=value, grad=grad,
                                      value_fn=objective)
    evaluations += otu.tree_get(state, 'num_linesearch_steps')
    moved = otu.tree_max(jax.tree.map(jnp.abs, updates)) > 0
    return optax.apply_updates(params, updates), state, evaluations, moved

  def keep_going(carry):
    _, state, _, moved = carry
    count = otu.tree_get(state, 'count')
    return (count == 0) | ((count < max_iter) & moved &
                           (jnp.max(largest_gradients(state)) >= tol))

  # Starting at the weighted prior log-odds saves the first iterations' bias search.
  start = (jnp.zeros((targets.shape[1], features.shape[1]), jnp.float32),
           jnp.log(prior / (1 - prior)) * curvature ** 0.5)
  params, state, evaluations, _ = jax.lax.while_loop(
      keep_going, step, (start, optimizer.init(start), jnp.zeros((), jnp.int32),
                         jnp.array(True)))
  kernel, bias = to_params(params)
  return (kernel, bias, otu.tree_get(state, 'count'), evaluations,
          largest_gradients(state))


# ----------------------------------------------------------------------------- fitting


def fit(embeddings, labels, mask=None, *, kind: str = 'linear', config=None,
        validation=None, findings: Optional[Sequence[str]] = None, seed: int = 0) -> Probe:
  """Trains a probe on embeddings.

  Args:
    embeddings: [N, D] float.
    labels: [N, K] (or [N]) 0/1 targets; entries where mask is 0 are ignored.
    mask: optional [N, K], 1 where the label is known.
    kind: 'linear' (L2 logistic regression solved by L-BFGS) or 'mlp'.
    config: ProbeConfig, a mapping / ConfigDict of its fields, or None for defaults.
    validation: (mlp) (embeddings, labels) or (embeddings, labels, mask) for early
      stopping; None holds out config.validation_fraction of the training examples.
    findings: K names, used in errors and kept with the probe.
    seed: the seed of every random choice (validation split, init, order, dropout).

  Returns:
    A Probe.

  Raises:
    ValueError: bad shapes, NaN/inf embeddings, labels other than 0/1 where known,
      a finding with a single class, or validation data given to the linear probe.
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown probe kind {kind!r}; expected one of {KINDS}.')
  config = ProbeConfig.create(config)
  x = _check_embeddings(embeddings, 'training')
  y, m, findings = _check_targets(labels, mask, x.shape[0], findings, 'training')
  if kind == 'linear':
    if validation is not None:
      raise ValueError('The linear probe is solved to its L2-regularised optimum and uses '
                       'no validation data; pass validation only with kind="mlp".')
    _check_both_classes(y, m, findings, 'training')
    return _fit_linear(x, y, m, findings, config)
  if validation is None:
    train_rows, val_rows = _split_validation(x.shape[0], config.validation_fraction, seed)
    x_val, y_val, m_val = x[val_rows], y[val_rows], m[val_rows]
    x, y, m = x[train_rows], y[train_rows], m[train_rows]
    what = (f'training (after holding out {val_rows.size} of {x.shape[0] + val_rows.size} '
            'examples for validation)')
  else:
    if not isinstance(validation, (tuple, list)) or len(validation) not in (2, 3):
      raise ValueError('validation must be (embeddings, labels) or (embeddings, labels, '
                       f'mask); got {type(validation).__name__}.')
    x_val = _check_embeddings(validation[0], 'validation')
    if x_val.shape[1] != x.shape[1]:
      raise ValueError(f'validation: embeddings have {x_val.shape[1]} features; training '
                       f'has {x.shape[1]}.')
    y_val, m_val, _ = _check_targets(validation[1], validation[2] if len(validation) == 3
                                     else None, x_val.shape[0], findings, 'validation')
    if y_val.shape[1] != y.shape[1]:
      raise ValueError(f'validation: {y_val.shape[1]} label columns; training has '
                       f'{y.shape[1]}.')
    what = 'training'
  _check_both_classes(y, m, findings, what)
  return _fit_mlp(x, y, m, (x_val, y_val, m_val), findings, config, seed)


def _fit_linear(x, y, m, findings, config: ProbeConfig) -> Probe:
  labelled = m.sum(axis=0)
  l2 = 1.0 / labelled if config.l2 is None else np.full(len(findings), config.l2)
  weights = _example_weights(y, m, config.class_weight)
  mean, scale = _feature_statistics(x)
  features = _standardised(x, mean, scale)
  eigenpairs = _covariance_eigenpairs(features, _PRECONDITIONER_RANK)
  # XLA:CPU's products with K columns ran 20 % faster for K=16 than for K=14, so K
  # above 8 is padded to a multiple of 8 with findings of weight 0 (they stay at 0
  # and do not affect the others).
  num_findings = len(findings)
  padding = -num_findings % 8 if num_findings > 8 else 0
  pad = lambda array, value=0: np.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, padding)],
                                      constant_values=value)
  kernel, bias, iterations, evaluations, gradient = _solve_linear(
      features, eigenpairs, pad(y), pad(weights), pad(l2.astype(np.float32), 1),
      np.int32(config.max_iter), np.float32(config.tol))
  kernel, bias = np.asarray(kernel)[:num_findings], np.asarray(bias)[:num_findings]
  gradient = np.asarray(gradient)[:num_findings]
  unconverged = [f'{name} ({g:.2e})' for name, g in zip(findings, gradient)
                 if not g < config.tol]
  if unconverged:
    warnings.warn(f'Linear probe: L-BFGS stopped after {int(iterations)} iterations '
                  f'(max_iter={config.max_iter}) with max |gradient| above tol={config.tol} '
                  f'for {", ".join(unconverged)}; raise max_iter or l2, or loosen tol.',
                  ConvergenceWarning, stacklevel=3)
  return Probe(kind='linear', config=config, findings=findings,
               params={'dense': {'kernel': kernel.T, 'bias': bias}},
               model_state={}, mean=mean, scale=scale,
               history={'iterations': int(iterations), 'evaluations': int(evaluations),
                        'max_abs_gradient': gradient.tolist()})


def _kernel_l2(params):
  leaves = flax.traverse_util.flatten_dict(params)
  return sum(jnp.sum(jnp.square(value)) for path, value in leaves.items()
             if path[-1] == 'kernel')


@functools.partial(jax.jit, static_argnames=('head', 'dim'))
def _init_head(key, *, head, dim: int):
  # Jitted: flax's eager init of even a small MLP costs seconds of op-by-op dispatch.
  return head.init(key, jnp.zeros((1, dim), jnp.float32), train=False)


def _mlp_optimizer(learning_rate: float, total_steps: int):
  return optax.adam(optax.cosine_decay_schedule(learning_rate, total_steps))


@functools.partial(jax.jit, static_argnames=('head', 'learning_rate', 'total_steps'))
def _mlp_epoch(params, batch_stats, opt_state, order, key, features, targets, weights,
               loss_scale, l2, *, head, learning_rate: float, total_steps: int):
  """One epoch of minibatch Adam; `order` [steps, batch] holds each step's rows.

  Module-level and keyed on hashable settings, so repeated fits of the same shapes
  (data-efficiency draws) reuse one compilation.
  """
  optimizer = _mlp_optimizer(learning_rate, total_steps)

  def loss_fn(params, batch_stats, rows, step_key):
    logits, updates = head.apply(
        {'params': params, 'batch_stats': batch_stats}, features[rows], train=True,
        mutable=['batch_stats'], rngs={'dropout': step_key})
    data = loss_scale * jnp.sum(weights[rows] * _logistic_loss(logits, targets[rows]))
    return data + 0.5 * l2 * _kernel_l2(params), (updates['batch_stats'], data)

  def step(carry, inputs):
    params, batch_stats, opt_state = carry
    rows, step_key = inputs
    (_, (batch_stats, data)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, rows, step_key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), data

  keys = jax.random.split(key, order.shape[0])
  (params, batch_stats, opt_state), losses = jax.lax.scan(
      step, (params, batch_stats, opt_state), (order, keys))
  return params, batch_stats, opt_state, jnp.mean(losses) / targets.shape[1]


def _fit_mlp(x, y, m, validation, findings, config: ProbeConfig, seed: int) -> Probe:
  num_examples, num_findings = y.shape
  head = _make_head('mlp', num_findings, config)
  batch_size = min(config.batch_size, num_examples)
  # Every step sees a full batch (batch norm needs one); the examples left over change
  # from epoch to epoch with the order.
  steps = num_examples // batch_size
  settings = dict(head=head, learning_rate=float(config.learning_rate),
                  total_steps=config.epochs * steps)
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  variables = _init_head(init_key, head=head, dim=x.shape[1])
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = _mlp_optimizer(settings['learning_rate'], settings['total_steps']).init(params)
  mean, scale = _feature_statistics(x)
  weights = _example_weights(y, m, config.class_weight)
  # On the device once, not copied in every epoch.
  features, targets, weights = jax.device_put((_standardised(x, mean, scale), y, weights))
  # Weights sum to 1 per finding over the set, so num_examples / batch_size scales a
  # batch's sum to an estimate of the whole set's loss.
  loss_scale = np.float32(num_examples / batch_size)
  l2 = np.float32(0.0 if config.l2 is None else config.l2)

  x_val, y_val, m_val = validation
  # The validation loss weighs classes as training does, by the validation counts.
  val_weights = _example_weights(y_val, m_val, config.class_weight)
  val_positives, val_negatives = _class_counts(y_val, m_val)
  scorable = (val_positives > 0) & (val_negatives > 0)
  if config.early_stopping == 'auroc':
    if not scorable.any():
      raise ValueError('Early stopping on AUROC needs validation positives and negatives '
                       'of at least one finding; none has both. Use early_stopping="loss" '
                       'or more validation data.')
    if not scorable.all():
      logging.warning('Early stopping: no validation AUROC for %s (a single class); the '
                      'mean AUROC leaves them out.',
                      ', '.join(name for name, ok in zip(findings, scorable) if not ok))

  rng = np.random.default_rng([seed, 1])
  history = {'train_loss': [], 'validation_loss': [], 'validation_auroc': []}
  best = None
  for epoch in range(config.epochs):
    order = rng.permutation(num_examples)[:steps * batch_size].reshape(steps, batch_size)
    params, batch_stats, opt_state, train_loss = _mlp_epoch(
        params, batch_stats, opt_state, order, jax.random.fold_in(dropout_key, epoch),
        features, targets, weights, loss_scale, l2, **settings)
    val_logits = _predict_logits(head, {'params': params, 'batch_stats': batch_stats},
                                 mean, scale, x_val)
    val_loss = float(np.mean(np.sum(
        val_weights * np.asarray(_logistic_loss(val_logits, y_val)), axis=0)))
    val_auroc = float(np.mean([
        metrics.auroc(y_val[m_val[:, k] > 0, k], val_logits[m_val[:, k] > 0, k])
        for k in np.flatnonzero(scorable)])) if scorable.any() else float('nan')
    history['train_loss'].append(float(train_loss))
    history['validation_loss'].append(val_loss)
    history['validation_auroc'].append(val_auroc)
    score = val_loss if config.early_stopping == 'loss' else -val_auroc
    if best is None or score < best[0]:
      best = (score, epoch, params, batch_stats)
    elif epoch - best[1] >= config.patience:
      break
  _, best_epoch, params, batch_stats = best
  history.update(best_epoch=best_epoch, epochs_run=len(history['train_loss']))
  logging.info('MLP probe: best validation %s at epoch %d of %d.', config.early_stopping,
               best_epoch + 1, history['epochs_run'])
  return Probe(kind='mlp', config=config, findings=findings, params=jax.device_get(params),
               model_state={'batch_stats': jax.device_get(batch_stats)},
               mean=mean, scale=scale, history=history)


# ----------------------------------------------------------------------------- CLI


def _targets_of(data: Mapping[str, np.ndarray], path: str, selected: Sequence[str],
                policy: labels_lib.LabelPolicy):
  """(labels, mask) [N, len(selected)] from a file's raw label codes and its findings."""
  if 'labels' not in data or 'findings' not in data:
    raise ValueError(f'{path}: needs "labels" and "findings" keys to train or score a '
                     f'probe; it has {sorted(data)}.')
  names = [str(name) for name in data['findings']]
  missing = [name for name in selected if name not in names]
  if missing:
    raise ValueError(f'{path}: findings {missing} are not in the file; it has {names}.')
  codes = np.asarray(data['labels'])
  if codes.ndim != 2 or codes.shape[1] != len(names):
    raise ValueError(f'{path}: "labels" has shape {codes.shape}; expected [N, {len(names)}] '
                     'for its findings.')
  known_codes = (labels_lib.POSITIVE, labels_lib.NEGATIVE, labels_lib.UNCERTAIN,
                 labels_lib.UNMENTIONED)
  unknown = sorted(set(np.unique(codes).tolist()) - set(known_codes))
  if unknown:
    raise ValueError(f'{path}: label codes must be 1, 0, -1 (uncertain) or -2 (unmentioned); '
                     f'found {unknown[:5]}.')
  targets = policy.apply(codes.astype(np.int8), names)
  columns = [names.index(name) for name in selected]
  return targets['labels'][:, columns], targets['label_mask'][:, columns]


def run(train: str, eval_path: str, output: str, *, kind: str = 'linear',
        findings: Optional[Sequence[str]] = None, budget: Optional[int] = None,
        seed: int = 0, uncertain: str = 'ignore', config=None) -> Dict[str, Any]:
  """The command line's work: train on one embeddings file, predict and score another.

  Writes OUTPUT/probe.npz, OUTPUT/predictions.npz ('probability' [N, K], 'findings',
  the eval file's 'id' and metadata, and 'labels'/'label_mask' when it has labels) and
  OUTPUT/metrics.json (AUROC per finding; null where undefined). Returns the metrics.
  Both files are read and checked before any training.
  """
  train_data = embeddings_file.load_embeddings(train)
  eval_data = embeddings_file.load_embeddings(eval_path)
  if 'findings' not in train_data:
    raise ValueError(f'{train}: needs "labels" and "findings" keys to train a probe; it has '
                     f'{sorted(train_data)}.')
  if eval_data['embedding'].shape[1] != train_data['embedding'].shape[1]:
    raise ValueError(f'{eval_path}: embeddings have {eval_data["embedding"].shape[1]} '
                     f'features; {train} has {train_data["embedding"].shape[1]}.')
  selected = list(findings) if findings else [str(name) for name in train_data['findings']]
  policy = labels_lib.LabelPolicy(uncertain=uncertain)
  y, m = _targets_of(train_data, train, selected, policy)
  scored = 'labels' in eval_data
  if scored:
    y_eval, m_eval = _targets_of(eval_data, eval_path, selected, policy)
  else:
    logging.warning('%s has no labels: predictions are written, no metrics.', eval_path)
  rows = np.arange(y.shape[0])
  if budget is not None:
    rows = efficiency.sample_budget(y, budget, np.random.default_rng(seed), mask=m)
  fitted = fit(train_data['embedding'][rows], y[rows], m[rows], kind=kind, config=config,
               findings=selected, seed=seed)
  os.makedirs(output, exist_ok=True)
  fitted.save(os.path.join(output, 'probe.npz'))

  probabilities = fitted.predict(eval_data['embedding'])
  predictions = {'probability': probabilities, 'findings': np.array(selected, np.str_)}
  predictions.update({key: eval_data[key] for key in ('id',) + labels_lib.METADATA_KEYS
                      if key in eval_data})
  summary = dict(kind=kind, train=train, eval=eval_path, findings=selected,
                 num_train=int(rows.size), num_eval=int(probabilities.shape[0]),
                 budget=budget, seed=seed, uncertain=uncertain,
                 config=fitted.config.to_dict(), history=fitted.history)
  if scored:
    predictions.update(labels=y_eval, label_mask=m_eval)
    known = m_eval > 0
    aurocs = {name: metrics.auroc(y_eval[known[:, k], k], probabilities[known[:, k], k])
              for k, name in enumerate(selected)}
    defined = [value for value in aurocs.values() if np.isfinite(value)]
    summary.update(auroc=aurocs, mean_auroc=float(np.mean(defined)) if defined else None,
                   num_positive={name: int(y_eval[known[:, k], k].sum())
                                 for k, name in enumerate(selected)},
                   num_labelled={name: int(known[:, k].sum())
                                 for k, name in enumerate(selected)})
  np.savez(os.path.join(output, 'predictions.npz'), **predictions)
  report.write_json(os.path.join(output, 'metrics.json'), summary)
  return summary


FLAGS = flags.FlagValues()
flags.DEFINE_string('train', None, 'Embeddings file (or shard directory) with labels to '
                    'train on.', flag_values=FLAGS)
flags.DEFINE_string('eval', None, 'Embeddings file (or shard directory) to predict and, '
                    'when it has labels, score.', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Directory for probe.npz, predictions.npz and '
                    'metrics.json.', flag_values=FLAGS)
flags.DEFINE_enum('kind', 'linear', KINDS, 'Probe: L2 logistic regression or the MLP.',
                  flag_values=FLAGS)
flags.DEFINE_list('findings', [], 'Findings to train (default: all of the training file\'s).',
                  flag_values=FLAGS)
flags.DEFINE_integer('budget', None, 'Train on this many examples drawn with --seed '
                     '(both classes of every finding when possible); default: all.',
                     flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of the budget draw and of the probe.', flag_values=FLAGS)
flags.DEFINE_enum('uncertain', 'ignore', labels_lib.POLICIES, 'Uncertain (-1) labels: '
                  'masked (ignore), negative (zeros) or positive (ones).', flag_values=FLAGS)
flags.DEFINE_string('config', '', 'JSON object of ProbeConfig fields, e.g. '
                    '\'{"class_weight": "balanced", "l2": 0.001}\'.', flag_values=FLAGS)


def main(argv: Sequence[str]) -> dict:
  cli.parse(FLAGS, argv)
  missing = [f'--{n}' for n in ('train', 'eval', 'output') if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f'Missing {", ".join(missing)}.')
  try:
    config = json.loads(FLAGS.config) if FLAGS.config else None
  except json.JSONDecodeError as error:
    raise app.UsageError(f'--config is not a JSON object: {error}') from error
  summary = run(FLAGS.train, FLAGS.eval, FLAGS.output, kind=FLAGS.kind,
                findings=FLAGS.findings or None, budget=FLAGS.budget, seed=FLAGS.seed,
                uncertain=FLAGS.uncertain, config=config)
  auroc = summary.get('auroc', {})
  print(json.dumps(report.to_builtin({'output': FLAGS.output, 'auroc': auroc,
                                      'mean_auroc': summary.get('mean_auroc')})))
  return summary


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
