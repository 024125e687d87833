"""Figures are written as real PNGs; t-SNE is seeded, subsampled and keeps clusters apart."""

import matplotlib
from matplotlib import image as mpl_image
import numpy as np
import pytest

from cxr_jax.eval import efficiency
from cxr_jax.eval import metrics
from cxr_jax.eval import plots


def _read_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  pixels = mpl_image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
  # Not a blank canvas.
  assert pixels[..., :3].std() > 0.05
  return pixels


def test_data_efficiency_plot(tmp_path):
  labels = np.random.default_rng(0).integers(0, 2, 200)
  curves = {}
  for method, offset in (('linear', 0.0), ('mlp', 0.05)):
    result = efficiency.data_efficiency(
        lambda indices, offset=offset: {'auroc': 0.6 + offset + 0.1 * np.log10(indices.size)
                                        + 0.01 * (indices[0] % 3), 'auprc': 0.4},
        labels, budgets=(10, 45, 100, 'all'), draws=3)
    curves[method] = result['summary']
  backend = matplotlib.get_backend()
  path = tmp_path / 'figs' / 'efficiency.png'
  plots.plot_data_efficiency(curves, str(path), metric='auroc')
  _read_png(path)
  assert matplotlib.get_backend() == backend
  with pytest.raises(ValueError, match=r"metrics \['auprc', 'auroc'\]; pass metric="):
    plots.plot_data_efficiency(curves, str(path))
  with pytest.raises(ValueError, match="No rows for metric 'ece'"):
    plots.plot_data_efficiency(curves, str(path), metric='ece')


def test_reliability_plot(tmp_path):
  rng = np.random.default_rng(1)
  probs = rng.uniform(size=400)
  labels = (rng.uniform(size=400) < probs ** 2).astype(int)
  curves = {'calibrated': metrics.reliability_curve(labels, probs ** 2, 10),
            'overconfident': metrics.reliability_curve(labels, probs, 10)}
  path = tmp_path / 'reliability.png'
  plots.plot_reliability(curves, str(path))
  _read_png(path)


def test_tsne_is_seeded_subsampled_and_keeps_clusters_apart(tmp_path):
  rng = np.random.default_rng(2)
  cluster = np.repeat([0, 1, 2], 25)
  embeddings = rng.normal(size=(75, 16)) + 8.0 * np.eye(16)[cluster]
  path = tmp_path / 'tsne.png'
  coordinates, indices = plots.plot_tsne(embeddings, np.array(['a', 'b', 'c'])[cluster],
                                         str(path), max_points=60, seed=3)
  _read_png(path)
  assert coordinates.shape == (60, 2) and indices.shape == (60,)
  assert np.unique(indices).size == 60 and indices.max() < 75
  again, again_indices = plots.plot_tsne(embeddings, cluster, str(path), max_points=60, seed=3)
  np.testing.assert_array_equal(indices, again_indices)
  np.testing.assert_allclose(coordinates, again, atol=1e-5)
  # Each point's nearest neighbour in the 2-D map comes from its own cluster.
  distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1)
  np.fill_diagonal(distances, np.inf)
  plotted = cluster[indices]
  assert np.mean(plotted[distances.argmin(axis=1)] == plotted) > 0.95


def test_tsne_colour_bar_for_numbers_and_errors(tmp_path):
  rng = np.random.default_rng(4)
  embeddings = rng.normal(size=(30, 5))
  coordinates, _ = plots.plot_tsne(embeddings, rng.uniform(20, 90, 30), str(tmp_path / 'a.png'),
                                   label_name='age')
  assert coordinates.shape == (30, 2)
  with pytest.raises(ValueError, match=r'colour_by has shape \(29,\); expected \(30,\)'):
    plots.plot_tsne(embeddings, np.zeros(29), str(tmp_path / 'b.png'))
  embeddings[3, 1] = np.nan
  with pytest.raises(ValueError, match='1 embeddings hold non-finite'):
    plots.plot_tsne(embeddings, np.zeros(30), str(tmp_path / 'b.png'))
