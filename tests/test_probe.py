"""Probes on embeddings: parity with scikit-learn, masks, class weights, early stopping,
the MLP on a non-linear task, determinism, save/load, the CLI and bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_jax import probe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One MLP setting (and data shapes) for every MLP test, so they share one compilation.
MLP_CONFIG = dict(hidden=(32, 16), batch_size=64, learning_rate=1e-2, epochs=40)
FINDINGS = ('effusion', 'nodule', 'edema')


def structured_embeddings(n, seed, d=24, k=3):
  """Embeddings shaped like pooled CNN features, and findings that depend on them.

  Six latent factors mixed into d features plus noise, through softplus (non-negative,
  skewed, correlated), each feature with its own scale; finding j is logistic in the
  factors with prevalence about 30 %, 15 % and 8 %. The model is fixed; `seed` draws
  the examples.
  """
  model = np.random.default_rng(1234)
  mixing = model.standard_normal((6, d))
  feature_scale = model.uniform(0.1, 10.0, d)
  effects = model.standard_normal((6, k))
  bias = np.log(np.array([0.3, 0.15, 0.08])[:k] / np.array([0.7, 0.85, 0.92])[:k]) - 0.5
  rng = np.random.default_rng(seed)
  factors = rng.standard_normal((n, 6))
  x = np.logaddexp(0, factors @ mixing + 0.5 * rng.standard_normal((n, d))) * feature_scale
  y = rng.uniform(size=(n, k)) < 1 / (1 + np.exp(-(factors @ effects + bias)))
  return x.astype(np.float32), y.astype(np.float32)


def xor_data(n, seed):
  """24 uniform features (the shape of `structured_embeddings`, so that compilations
  are shared). Finding 0 is the XOR of the signs of features 0 and 1 (no linear
  signal); findings 1 and 2 are linear."""
  x = np.random.default_rng(seed).uniform(-1, 1, (n, 24)).astype(np.float32)
  y = np.stack([(x[:, 0] * x[:, 1]) > 0, x[:, 2] > 0, x[:, 3] + x[:, 4] > 0], axis=1)
  return x, y.astype(np.float32)


@pytest.fixture(scope='module')
def xor_probes():
  x, y = xor_data(600, 0)
  validation = xor_data(200, 1)
  names = ('xor', 'sign', 'sum')
  mlp = probe.fit(x, y, kind='mlp', config=dict(MLP_CONFIG, patience=40),
                  validation=validation, findings=names)
  linear = probe.fit(x, y, kind='linear', findings=names)
  return mlp, linear


def test_mlp_learns_xor_that_the_linear_probe_cannot(xor_probes):
  mlp, linear = xor_probes
  x_test, y_test = xor_data(1000, 2)
  mlp_scores, linear_scores = mlp.predict(x_test), linear.predict(x_test)
  assert mlp_scores.shape == (1000, 3) and mlp.findings == ('xor', 'sign', 'sum')
  assert roc_auc_score(y_test[:, 0], linear_scores[:, 0]) < 0.6
  assert roc_auc_score(y_test[:, 0], mlp_scores[:, 0]) > 0.9
  # Both learn the linear findings: the heads are per finding.
  for j in (1, 2):
    assert roc_auc_score(y_test[:, j], linear_scores[:, j]) > 0.95
    assert roc_auc_score(y_test[:, j], mlp_scores[:, j]) > 0.95


@pytest.mark.parametrize('class_weight, l2', [('none', None), ('balanced', 0.02)])
def test_linear_probe_matches_sklearn(class_weight, l2):
  x, y = structured_embeddings(600, seed=0)
  x_test, y_test = structured_embeddings(2000, seed=1)
  mask = np.ones_like(y)
  mask[np.random.default_rng(5).uniform(size=600) < 0.2, 1] = 0   # Unknown labels.
  fitted = probe.fit(x, y, mask, config={'class_weight': class_weight, 'l2': l2,
                                         'tol': 1e-6})
  mean, std = x.astype(np.float64).mean(0), x.astype(np.float64).std(0)
  np.testing.assert_allclose(fitted.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(fitted.scale, std, rtol=1e-4)
  scores = fitted.predict(x_test)
  for j in range(y.shape[1]):
    rows = mask[:, j] > 0
    # sklearn's C * sum of losses + ||w||^2 / 2 is the probe's mean loss + l2/2 ||w||^2
    # scaled by 1 / (l2 n_j); l2=None means C=1.
    c = 1.0 if l2 is None else 1.0 / (l2 * rows.sum())
    reference = LogisticRegression(
        C=c, tol=1e-10, max_iter=10000,
        class_weight=None if class_weight == 'none' else 'balanced').fit(
            ((x - mean) / std)[rows], y[rows, j])
    expected = reference.predict_proba((x_test - mean) / std)[:, 1]
    assert abs(roc_auc_score(y_test[:, j], scores[:, j]) -
               roc_auc_score(y_test[:, j], expected)) < 0.005
    np.testing.assert_allclose(scores[:, j], expected, atol=2e-3)
  assert max(fitted.history['max_abs_gradient']) < 1e-6


def test_findings_are_fitted_independently():
  # Nine findings (three, each three times with its own mask) must give the same
  # heads as the three alone: no finding's fit depends on the others trained with it.
  x, y = structured_embeddings(600, seed=8)
  mask = (np.random.default_rng(1).uniform(size=(600, 9)) > 0.1).astype(np.float32)
  alone = [probe.fit(x, y, mask[:, 3 * i:3 * i + 3], config={'tol': 1e-6}).predict(x)
           for i in range(3)]
  together = probe.fit(x, np.tile(y, 3), mask, config={'tol': 1e-6}).predict(x)
  np.testing.assert_allclose(together, np.concatenate(alone, axis=1), atol=2e-4)


def test_masked_labels_do_not_matter():
  x, y = structured_embeddings(600, seed=3)
  mask = (np.random.default_rng(0).uniform(size=y.shape) > 0.3).astype(np.float32)
  flipped = y.copy()
  flipped[mask == 0] = 1 - flipped[mask == 0]
  garbage = y.copy()
  garbage[mask == 0] = np.nan
  reference = probe.fit(x, y, mask).predict(x)
  np.testing.assert_array_equal(probe.fit(x, flipped, mask).predict(x), reference)
  np.testing.assert_array_equal(probe.fit(x, garbage, mask).predict(x), reference)
  # Without the mask the flipped labels do count.
  assert np.abs(probe.fit(x, flipped).predict(x) - reference).max() > 0.05


def test_class_weighting_balances_the_classes():
  x, y = structured_embeddings(600, seed=4)
  plain = probe.fit(x, y, config={'tol': 1e-6}).predict(x)
  balanced = probe.fit(x, y, config={'tol': 1e-6, 'class_weight': 'balanced'}).predict(x)
  positive = y > 0
  for j in range(y.shape[1]):
    # At the optimum the bias gradient vanishes: unweighted, the mean probability is
    # the prevalence; balanced, the positives' mean miss equals the negatives' mean
    # false alarm.
    np.testing.assert_allclose(plain[:, j].mean(), y[:, j].mean(), atol=1e-4)
    np.testing.assert_allclose(1 - balanced[positive[:, j], j].mean(),
                               balanced[~positive[:, j], j].mean(), atol=1e-4)
  rare = 2   # About 8 % positive: weighting raises recall at 0.5 a lot.
  recall = lambda p: np.mean(p[positive[:, rare], rare] > 0.5)
  assert recall(balanced) > recall(plain) + 0.2


def test_linear_probe_warns_when_it_stops_before_tol():
  x, y = structured_embeddings(600, seed=7)
  with pytest.warns(probe.ConvergenceWarning, match=r'after 2 iterations.*effusion \('):
    fitted = probe.fit(x, y, config={'max_iter': 2}, findings=FINDINGS)
  assert fitted.history['iterations'] == 2


@pytest.mark.parametrize('criterion', ['loss', 'auroc'])
def test_early_stopping_restores_the_best_epoch(criterion):
  # Labels are noise, so the MLP can only overfit: validation gets worse after a while.
  x, _ = xor_data(600, 3)
  rng = np.random.default_rng(4)
  y = (rng.uniform(size=(600, 3)) < 0.5).astype(np.float32)
  x_val, _ = xor_data(200, 5)
  y_val = (rng.uniform(size=(200, 3)) < 0.5).astype(np.float32)
  fitted = probe.fit(x, y, kind='mlp', validation=(x_val, y_val),
                     config=dict(MLP_CONFIG, patience=4, early_stopping=criterion))
  history = fitted.history
  curve = np.array(history['validation_loss' if criterion == 'loss' else
                           'validation_auroc'])
  best = int(np.argmin(curve) if criterion == 'loss' else np.argmax(curve))
  assert history['best_epoch'] == best
  assert history['epochs_run'] == best + 1 + 4 < MLP_CONFIG['epochs']
  # The returned parameters are the best epoch's, not the last: recompute its score.
  scores = fitted.predict(x_val).astype(np.float64)
  if criterion == 'loss':
    loss = -(y_val * np.log(scores) + (1 - y_val) * np.log(1 - scores)).mean(0).mean()
    np.testing.assert_allclose(loss, curve[best], rtol=1e-4)
  else:
    auroc = np.mean([roc_auc_score(y_val[:, j], scores[:, j]) for j in range(3)])
    np.testing.assert_allclose(auroc, curve[best], rtol=1e-6)
  assert curve[-1] != curve[best]


def test_seeded_and_deterministic(xor_probes):
  x, y = xor_data(750, 0)
  # The held-out validation split is seeded too (no validation passed); 600 examples
  # remain for training, the shape of the other MLP tests.
  config = dict(MLP_CONFIG, patience=3, validation_fraction=0.2)
  first = probe.fit(x, y, kind='mlp', config=config, seed=7).predict(x)
  again = probe.fit(x, y, kind='mlp', config=config, seed=7).predict(x)
  other = probe.fit(x, y, kind='mlp', config=config, seed=8).predict(x)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  _, linear = xor_probes
  np.testing.assert_array_equal(probe.fit(x[:600], y[:600]).predict(x),
                                linear.predict(x))


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_save_and_load(tmp_path, xor_probes, kind):
  fitted = xor_probes[0 if kind == 'mlp' else 1]
  path = str(tmp_path / 'sub' / 'probe.npz')
  fitted.save(path)
  loaded = probe.load(path)
  x, _ = xor_data(50, 9)
  np.testing.assert_array_equal(loaded.predict(x), fitted.predict(x))
  assert (loaded.kind, loaded.findings, loaded.config) == (kind, fitted.findings,
                                                           fitted.config)
  assert loaded.history['best_epoch' if kind == 'mlp' else 'iterations'] == (
      fitted.history['best_epoch' if kind == 'mlp' else 'iterations'])


def test_load_errors_name_the_file(tmp_path, xor_probes):
  not_a_probe = str(tmp_path / 'embeddings.npz')
  np.savez(not_a_probe, embedding=np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r'embeddings\.npz: not a probe file.*missing'):
    probe.load(not_a_probe)
  tampered = str(tmp_path / 'tampered.npz')
  xor_probes[0].save(tampered)
  with np.load(tampered) as data:
    arrays = dict(data)
  arrays['config'] = np.array(json.dumps(dict(xor_probes[0].config.to_dict(), hidden=[8])))
  np.savez(tampered, **arrays)
  with pytest.raises(ValueError, match=r'tampered\.npz: .*do not fit its config'):
    probe.load(tampered)


def test_bad_inputs_are_named():
  x, y = structured_embeddings(600, seed=6)
  bad = x.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match='1 embedding rows hold NaN or inf.*row 3'):
    probe.fit(bad, y)
  with pytest.raises(ValueError, match='600 embeddings but 599 label rows'):
    probe.fit(x, y[:599])
  codes = y.copy()
  codes[0, 0] = -1
  with pytest.raises(ValueError, match=r'found \[-1\.0\].*label policy'):
    probe.fit(x, codes)
  single = y.copy()
  single[:, 1] = 0
  with pytest.raises(ValueError, match=r'single class: nodule \(0 positive, 600 negative\)'):
    probe.fit(x, single, findings=FINDINGS)
  with pytest.raises(ValueError, match=r'mask has shape \(600, 2\)'):
    probe.fit(x, y, np.ones((600, 2)))
  with pytest.raises(ValueError, match='Unknown probe kind'):
    probe.fit(x, y, kind='svm')
  with pytest.raises(ValueError, match="Unknown probe config keys.*'epoch'.*valid keys: "
                     'class_weight'):
    probe.fit(x, y, config={'epoch': 3})
  with pytest.raises(ValueError, match='class_weight=.balance.; expected one of'):
    probe.fit(x, y, config={'class_weight': 'balance'})
  with pytest.raises(ValueError, match='uses no validation data'):
    probe.fit(x, y, validation=(x, y))
  with pytest.raises(ValueError, match='validation: embeddings have 5 features; training '
                     'has 24'):
    probe.fit(x, y, kind='mlp', validation=(x[:, :5], y))
  with pytest.raises(ValueError, match='3 finding names for 2 label columns'):
    probe.fit(x, y[:, :2], findings=FINDINGS)
  fitted = probe.fit(x, y)
  with pytest.raises(ValueError, match='embeddings have 5 features; this probe was '
                     'trained on 24'):
    fitted.predict(x[:, :5])


def _embeddings_file(path, n, seed, with_labels=True):
  """An embeddings file as cxr_jax.embed writes it, with raw label codes."""
  x, y = structured_embeddings(n, seed)
  codes = y.astype(np.int8)
  rng = np.random.default_rng(seed)
  codes[rng.uniform(size=y.shape) < 0.1] = -1     # uncertain
  codes[rng.uniform(size=y.shape) < 0.1] = -2     # unmentioned
  data = dict(embedding=x, id=np.array([f'img{seed}_{i}' for i in range(n)]),
              patient_id=np.array([f'p{i // 2}' for i in range(n)]))
  if with_labels:
    data.update(labels=codes, findings=np.array(FINDINGS))
  np.savez(path, **data)
  return x, codes


def test_cli_end_to_end(tmp_path):
  train, evaluation, output = (str(tmp_path / 'train.npz'), str(tmp_path / 'eval.npz'),
                               str(tmp_path / 'out'))
  _embeddings_file(train, 800, seed=10)
  x_eval, codes = _embeddings_file(evaluation, 300, seed=11)
  # The child shares this session's compilation cache (tests/conftest.py).
  env = dict(os.environ, PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '',
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  result = subprocess.run(
      [sys.executable, '-m', 'cxr_jax.probe', '--train', train, '--eval', evaluation,
       '--output', output, '--findings', 'edema,effusion,nodule', '--uncertain', 'ignore',
       '--budget', '600', '--seed', '1'],
      cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  fitted = probe.load(os.path.join(output, 'probe.npz'))
  assert fitted.findings == ('edema', 'effusion', 'nodule')
  with np.load(os.path.join(output, 'predictions.npz')) as predictions:
    np.testing.assert_allclose(predictions['probability'], fitted.predict(x_eval), atol=1e-6)
    assert list(predictions['findings']) == ['edema', 'effusion', 'nodule']
    assert predictions['id'][0] == 'img11_0' and predictions['patient_id'][3] == 'p1'
  with open(os.path.join(output, 'metrics.json')) as f:
    metrics = json.load(f)
  # U-Ignore: uncertain masked; unmentioned counts as negative.
  for column, name in ((0, 'effusion'), (2, 'edema')):
    known = codes[:, column] != -1
    expected = roc_auc_score(codes[known, column] == 1,
                             fitted.predict(x_eval)[known, fitted.findings.index(name)])
    assert metrics['auroc'][name] == pytest.approx(expected, abs=1e-9)
  assert (metrics['num_train'], metrics['budget'], metrics['kind']) == (600, 600, 'linear')


def test_run_reads_shards_and_applies_the_label_policy(tmp_path):
  train = str(tmp_path / 'train.npz')
  _embeddings_file(train, 800, seed=10)
  shards = tmp_path / 'eval'
  shards.mkdir()
  x0, codes0 = _embeddings_file(str(shards / 'embeddings-00000-of-00002.npz'), 60, seed=13)
  x1, codes1 = _embeddings_file(str(shards / 'embeddings-00001-of-00002.npz'), 40, seed=14)
  codes = np.concatenate([codes0, codes1])
  summary = probe.run(train, str(shards), str(tmp_path / 'out'), budget=600, seed=3,
                      uncertain='ones')
  assert summary['num_train'] == 600 and summary['num_eval'] == 100
  assert summary['findings'] == list(FINDINGS)
  fitted = probe.load(str(tmp_path / 'out' / 'probe.npz'))
  with np.load(str(tmp_path / 'out' / 'predictions.npz')) as predictions:
    np.testing.assert_allclose(predictions['probability'],
                               fitted.predict(np.concatenate([x0, x1])), atol=1e-6)
    # U-Ones: an uncertain code is a known positive; unmentioned a known negative.
    np.testing.assert_array_equal(predictions['labels'], (codes == 1) | (codes == -1))
    assert predictions['label_mask'].min() == 1


def test_run_errors_name_the_file(tmp_path):
  unlabelled = str(tmp_path / 'unlabelled.npz')
  _embeddings_file(unlabelled, 20, seed=15, with_labels=False)
  with pytest.raises(ValueError, match=r'unlabelled\.npz: needs "labels" and "findings"'):
    probe.run(unlabelled, unlabelled, str(tmp_path / 'out'))
  labelled = str(tmp_path / 'labelled.npz')
  _embeddings_file(labelled, 20, seed=16)
  with pytest.raises(ValueError, match=r"labelled\.npz: findings \['fracture'\] are not in"):
    probe.run(labelled, labelled, str(tmp_path / 'out'), findings=['fracture'])
  broken = str(tmp_path / 'broken.npz')
  np.savez(broken, embedding=np.zeros((4, 3)), id=np.array(['a', 'b']))
  with pytest.raises(ValueError, match=r"broken\.npz: 'id' has 2 rows"):
    probe.run(labelled, broken, str(tmp_path / 'out'))
