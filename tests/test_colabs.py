"""The Colab notebooks run top to bottom on generated data and write what they promise.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the `python3` kernel,
which jupyter_client starts with this Python), with its parameters in CXR_JAX_*
environment variables as a user would set them; the embeddings notebook starts in
colabs/, as Jupyter starts it, the others in the repository root. The networks
are the two tiny runs of `test_inference.trained_runs` (shared with the inference,
export and embedding tests); the data is a separate 160-image synthetic site-B set,
large enough that its test split holds positives and negatives of several findings.
The numbers the notebooks write are checked against scikit-learn and NumPy on the
stored labels and embeddings, read here independently of the notebooks.
"""

import csv
import json
import os

import jax
import nbclient
import nbformat
import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from sklearn import neighbors as sk_neighbors

from cxr_jax import embed
from cxr_jax import embeddings_file
from cxr_jax.data import pipeline
from cxr_jax.data.builders import synthetic as synthetic_builders
from test_inference import REPO  # pylint: disable=g-bad-import-order
from test_inference import _recipe  # pylint: disable=g-bad-import-order
from test_inference import shared_model  # pylint: disable=g-bad-import-order
from test_inference import trained_runs  # pylint: disable=g-bad-import-order

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
POSITIVE, UNCERTAIN = 1, -1
EMBEDDING_DIM = 256  # bit-tiny with its last two stages truncated (test_inference).


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Runs, a 160-image dataset, its test labels read directly, and test-split embeddings."""
  runs = trained_runs(tmp_path_factory)
  data_dir = str(tmp_path_factory.mktemp('colab_tfds'))
  dataset = synthetic_builders.prepare(synthetic_builders.make_cxr_config(
      'B', image_size=32, num_examples=160, label_noise=0.0), data_dir)
  source, info = pipeline.open_source(dataset, 'test', data_dir)
  findings = list(pipeline.findings_of(info))
  records = [source[i] for i in range(len(source))]
  codes = {r['image_id'].decode(): np.asarray(r['labels'], np.int8) for r in records}
  positives = np.sum([c == POSITIVE for c in codes.values()], axis=0)
  # The data-efficiency task: the finding with the most test positives.
  task = findings[int(np.argmax(positives))]
  embeddings = str(tmp_path_factory.mktemp('colab_embeddings') / 'test.npz')
  embed.embed_dataset(shared_model(runs['supcon']), f'{dataset}:test', embeddings,
                      data_dir=data_dir, batch_size=8)
  return {'runs': runs, 'data_dir': data_dir, 'dataset': dataset, 'findings': findings,
          'codes': codes, 'task': task, 'embeddings': embeddings}


def execute(name, tmp_path, monkeypatch, start_in=REPO, **parameters):
  """Runs colabs/NAME in a new kernel started in `start_in`, with `parameters` as
  environment variables."""
  for key, value in parameters.items():
    monkeypatch.setenv(key, str(value))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')
  # The kernel shares the test session's compilation cache (tests/conftest.py).
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
  notebook = nbformat.read(os.path.join(REPO, 'colabs', name), as_version=4)
  assert not any(cell.get('outputs') or cell.get('execution_count')
                 for cell in notebook.cells if cell.cell_type == 'code'), (
                     f'{name} is committed with outputs; clear them.')
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': start_in}})
  try:
    client.execute()
  finally:  # Kept for reading when a cell fails.
    nbformat.write(notebook, str(tmp_path / name))
  return notebook


def outputs_of(notebook, kind):
  return [output for cell in notebook.cells if cell.cell_type == 'code'
          for output in cell.outputs if kind in output.get('data', {})]


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def assert_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE, path


def reference_auroc(codes, scores):
  """AUROC with uncertain labels left out and unmentioned ones negative; None if one class."""
  known = codes != UNCERTAIN
  labels = codes[known] == POSITIVE
  if labels.all() or not labels.any():
    return None
  return sk_metrics.roc_auc_score(labels, scores[known])


def reference_knn_auroc(embeddings, codes, neighbours):
  """Leave-one-out kNN AUROC by scikit-learn's cosine neighbour search (no uncertain codes)."""
  assert not np.any(codes == UNCERTAIN)
  labels = (codes == POSITIVE).astype(np.float64)
  if labels.all() or not labels.any():
    return None
  search = sk_neighbors.NearestNeighbors(n_neighbors=neighbours + 1, metric='cosine')
  _, indices = search.fit(embeddings).kneighbors(embeddings)
  others = [[j for j in row if j != i][:neighbours] for i, row in enumerate(indices)]
  return sk_metrics.roc_auc_score(labels, labels[np.array(others)].mean(axis=1))


@pytest.mark.slow  # A kernel, JAX, embeddings, probes and a bootstrap.
def test_probing_notebook(setup, tmp_path, monkeypatch):
  workdir = tmp_path / 'probing'
  notebook = execute(
      'probing.ipynb', tmp_path, monkeypatch, CXR_JAX_MODEL=setup['runs']['supcon'],
      CXR_JAX_DATA=setup['dataset'], CXR_JAX_DATA_DIR=setup['data_dir'],
      CXR_JAX_TASK=setup['task'], CXR_JAX_BUDGETS='10,all', CXR_JAX_DRAWS=2,
      CXR_JAX_WORKDIR=workdir)
  assert len(outputs_of(notebook, 'image/png')) >= 2  # The AUROC bars, the efficiency curve.
  assert len(outputs_of(notebook, 'text/markdown')) >= 4  # Tables.
  for figure in ('auroc.png', 'data_efficiency.png', 'linear_probe_reliability.png',
                 'mlp_probe_reliability.png'):
    assert_png(workdir / figure)

  predictions = np.load(workdir / 'predictions.npz')
  findings = [str(f) for f in predictions['findings']]
  assert setup['task'] in findings and set(findings) <= set(setup['findings'])
  ids = [str(i) for i in predictions['id']]
  assert sorted(ids) == sorted(setup['codes'])
  codes = np.stack([setup['codes'][i] for i in ids])[:, [setup['findings'].index(f)
                                                         for f in findings]]
  defined = 0
  for kind in ('linear', 'mlp'):
    probabilities = predictions[kind]
    assert probabilities.shape == codes.shape and np.all((probabilities >= 0) &
                                                         (probabilities <= 1))
    rows = {row['finding']: row for row in read_csv(workdir / f'{kind}_probe_per_finding.csv')}
    assert list(rows) == findings
    for k, finding in enumerate(findings):
      expected = reference_auroc(codes[:, k], probabilities[:, k])
      auroc, low, high = (float(rows[finding][key]) for key in ('auroc', 'auroc_low',
                                                                 'auroc_high'))
      if expected is None:
        assert np.isnan(auroc) and rows[finding]['note'], (kind, finding)
        continue
      defined += 1
      assert auroc == pytest.approx(expected, abs=1e-9), (kind, finding)
      assert 0 <= low <= auroc <= high <= 1, (kind, finding, low, auroc, high)
    metrics = json.loads((workdir / f'{kind}_probe_metrics.json').read_text())
    assert 0 <= metrics['mean_auroc'] <= 1 and metrics['bootstrap']['patient_level']
  assert defined >= 2  # The task finding at least, for both probes.

  pool = int(np.sum(np.load(workdir / 'embeddings' / 'train.npz')['labels'][
      :, setup['findings'].index(setup['task'])] != UNCERTAIN))
  for kind in ('linear', 'mlp'):
    draws = read_csv(workdir / f'{kind}_efficiency_draws.csv')
    assert [(row['budget'], row['num_examples']) for row in draws] == [
        ('10', '10'), ('10', '10'), ('all', str(pool))]
    assert all(0 <= float(row['auroc']) <= 1 for row in draws)
    summary = read_csv(workdir / f'{kind}_efficiency_summary.csv')
    assert [(row['budget'], row['metric'], row['num_draws']) for row in summary] == [
        ('10', 'auroc', '2'), ('all', 'auroc', '1')]
    for row in summary:
      scores = [float(d['auroc']) for d in draws if d['budget'] == row['budget']]
      assert float(row['mean']) == pytest.approx(np.mean(scores))


@pytest.mark.slow  # A kernel, JAX, four t-SNE maps and a second network.
def test_embeddings_notebook(setup, tmp_path, monkeypatch):
  workdir = tmp_path / 'embeddings'
  query, neighbours = 3, 4
  notebook = execute(
      # Started in colabs/, as Jupyter starts it: the notebook moves to the repository root.
      'embeddings.ipynb', tmp_path, monkeypatch, start_in=os.path.join(REPO, 'colabs'),
      CXR_JAX_MODEL=setup['runs']['supcon'],
      CXR_JAX_EMBEDDINGS=setup['embeddings'], CXR_JAX_DATA=setup['dataset'],
      CXR_JAX_DATA_DIR=setup['data_dir'], CXR_JAX_SPLIT='test', CXR_JAX_FINDING=setup['task'],
      CXR_JAX_QUERY=query, CXR_JAX_NEIGHBOURS=neighbours,
      CXR_JAX_COMPARE_MODEL=setup['runs']['classifier'], CXR_JAX_WORKDIR=workdir)
  data = embeddings_file.load_embeddings(setup['embeddings'])
  vectors = data['embedding'].astype(np.float64)
  count = len(vectors)

  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['images'] == count and summary['dimensions'] == EMBEDDING_DIM
  cosine = sk_metrics.pairwise.cosine_similarity(vectors)
  assert summary['mean cosine similarity of two images'] == pytest.approx(
      cosine[~np.eye(count, dtype=bool)].mean(), abs=1e-6)
  assert summary['mean L2 norm'] == pytest.approx(np.linalg.norm(vectors, axis=1).mean(),
                                                  rel=1e-6)

  rows = read_csv(workdir / 'neighbours.csv')
  expected = [query] + [i for i in np.argsort(-cosine[query], kind='stable') if i != query][
      :neighbours]
  assert [int(row['row']) for row in rows] == expected
  assert [row['id'] for row in rows] == [str(data['id'][i]) for i in expected]
  for row in rows:
    assert float(row['cosine']) == pytest.approx(cosine[query, int(row['row'])], abs=1e-6)
  assert_png(workdir / 'neighbours.png')

  for name in (setup['task'], 'sex', f'compare_{setup["task"]}'):
    assert_png(workdir / f'tsne_{name}.png')
  assert len(outputs_of(notebook, 'image/png')) >= 5  # Three t-SNE maps, neighbours, compare.

  compared = embeddings_file.load_embeddings(str(workdir / 'compare_embeddings.npz'))
  assert compared['embedding'].shape == (count, EMBEDDING_DIM)
  assert list(compared['id']) == list(data['id'])
  knn = {row['finding']: row for row in read_csv(workdir / 'knn_auroc.csv')}
  assert list(knn) == setup['findings']
  defined = 0
  for network, embeddings in (('this network', vectors), ('compared network',
                                                          compared['embedding'])):
    for k, finding in enumerate(setup['findings']):
      expected = reference_knn_auroc(embeddings, data['labels'][:, k], count // 5)
      value = float(knn[finding][network])
      if expected is None:
        assert np.isnan(value), (network, finding)
      else:
        defined += 1
        assert value == pytest.approx(expected, abs=1e-9), (network, finding)
  assert defined >= 2


def test_probing_notebook_without_a_model_says_what_to_run(tmp_path, monkeypatch):
  missing = tmp_path / 'no_such_run'
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    execute('probing.ipynb', tmp_path, monkeypatch, CXR_JAX_MODEL=missing)
  message = str(error.value)
  assert f'No model at {missing}' in message
  assert 'python -m cxr_jax.main --config configs/quickstart.py' in message


def test_notebook_default_data_is_the_quickstart_site_b():
  """With no CXR_JAX_DATA, the notebooks build the quickstart's site-B set from its recipe."""
  site_b = _recipe('quickstart').synthetic.site_b
  assert site_b.kind == 'cxr'
  config = synthetic_builders.make_cxr_config(**site_b.args.to_dict())
  assert config.site == 'B'
  for name in ('probing.ipynb', 'embeddings.ipynb'):
    notebook = nbformat.read(os.path.join(REPO, 'colabs', name), as_version=4)
    source = '\n'.join(cell.source for cell in notebook.cells)
    assert 'quickstart.get_config().synthetic.site_b.args' in source, name
