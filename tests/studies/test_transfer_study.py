"""The transfer study: external-site scores side by side with in-site ones and the pixel
baseline (checked against scikit-learn on the files it keeps), its settings checked.
Its report's verdicts on the published claims: test_transfer_report.py."""

import csv
import json
import os

import cv2
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from cxr_jax import embeddings_file
from cxr_jax import probe as probe_lib
from cxr_jax.data import pipeline
from cxr_jax.studies import chain
from cxr_jax.studies import transfer_study
from cxr_jax.train import config_lib
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FINDING = 'airspace_opacity'
PP = 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'


def _study_config(**external):
  config = transfer_study.default_config()
  config.networks = ml_collections.ConfigDict({'cxr': '/runs/cxr'})
  config.external = ml_collections.ConfigDict(external)
  return config


@pytest.mark.parametrize('external,message', [
    ({'in_site': {'name': 'x'}}, "'in_site' is the name of the in-site test split"),
    ({'site_c': {'name': 'x', 'spilt': 'test'}},
     r"config.external.site_c has keys \['spilt'\]; valid keys: \['name', 'split', 'finding'\]"),
    ({'site_c': {'split': 'test'}}, r"config.external.site_c.name=''"),
    ({'site_c': 'synthetic_cxr/site_c'}, 'config.external.site_c must be a section'),
    ({'site_c': {'name': 'synthetic_cxr/site_b', 'split': 'train'}},
     'the split every method trains on'),
])
def test_bad_external_sets_are_named(external, message):
  with pytest.raises(ValueError, match=message):
    transfer_study.Study(_study_config(**external), '/unused')


def test_external_sets_come_from_the_recipe_argument_and_chain_references():
  path = os.path.join(REPO, 'configs', 'transfer_study.py')
  config = config_lib.load(path + ':site_c=@site_c, nih=nih_cxr14')
  recipe = config_lib.load_module(path)
  sets = transfer_study.eval_sets(chain.resolve(config, {'site_c': 'synthetic_cxr/c_32px'}))
  assert [(s.key, s.source, s.finding) for s in sets] == [
      ('in_site', 'synthetic_cxr/site_b:test', FINDING), ('nih', 'nih_cxr14:test', FINDING),
      ('site_c', 'synthetic_cxr/c_32px:test', FINDING)]
  assert recipe.get_config('c=a/b:validation').external.c.split == 'validation'
  for bad in ('site_c', '=a/b', 'my-site=a/b', 'c=a/b,c=a/d'):
    with pytest.raises(ValueError, match='configs/transfer_study.py:'):
      recipe.get_config(bad)


@pytest.fixture(scope='module')
def tiny_study(tmp_path_factory):
  """A study of one tiny SupCon network, run first in-site only, then again in the same
  workdir with site C's train split (another scanner) as an external test set."""
  from cxr_jax.data.builders import synthetic as sb  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('study')
  data_dir = str(root / 'tfds')
  site_b = sb.prepare(sb.make_cxr_config('B', image_size=32, num_examples=300,
                                         label_noise=0.0), data_dir)
  site_c = sb.prepare(sb.make_cxr_config('C', image_size=32, num_examples=60,
                                         label_noise=0.0), data_dir)
  network = config_lib.base_config()
  network.trainer, network.model_name = 'supcon', 'bit-tiny'
  network.total_steps, network.batch_size, network.checkpoint.every = 2, 8, 2
  network.data.name, network.data.data_dir = site_b, data_dir
  network.data.pp = 'decode|window|two_views|random_crop(28)|value_range(-1, 1, 0, 1)|rgb'
  network.data.pp_eval = PP
  network.init_image_size = 28
  # Why this size: half of bit-tiny's stages (as test_inference's runs) compile in about
  # half the time; what is checked here is how the study scores and reports, not how well.
  network.model.truncate = 2
  network.optimizer.schedule.warmup_steps = 1
  trainer.train(network, str(root / 'cxr'))

  config = transfer_study.default_config()
  config.data.name, config.data.data_dir, config.data.finding = site_b, data_dir, FINDING
  config.networks = ml_collections.ConfigDict({'cxr': str(root / 'cxr')})
  config.budgets, config.draws, config.probes = (20,), 1, ('linear',)
  config.efficiency_budget = 20
  config.finetune.networks, config.finetune.modes = ('cxr',), ('full',)
  config.finetune.steps, config.finetune.batch_size = 2, 8
  config.tsne, config.export.network = (), ''
  workdir = str(root / 'study')

  def outputs():
    with open(os.path.join(workdir, 'results.csv')) as f:
      results = list(csv.DictReader(f))
    with open(os.path.join(workdir, 'summary.csv')) as f:
      summary = list(csv.DictReader(f))
    with open(os.path.join(workdir, 'claims.json')) as f:
      claims = json.load(f)
    with open(os.path.join(workdir, 'report.md')) as f:
      report = f.read()
    return {'results': results, 'summary': summary, 'claims': claims, 'report': report}

  transfer_study.run_study(config, workdir)
  before = outputs()
  config.external = ml_collections.ConfigDict(
      {'site_c': {'name': site_c, 'split': 'train', 'finding': ''}})
  transfer_study.run_study(config, workdir)
  return {'config': config, 'workdir': workdir, 'site_c': site_c, 'data_dir': data_dir,
          'before': before, 'after': outputs()}


def _truth(data):
  """(labels, known) of FINDING from raw codes: 1 positive; 0 and unmentioned negative."""
  codes = data['labels'][:, list(data['findings']).index(FINDING)]
  return (codes == 1).astype(int), codes != -1


@pytest.mark.slow
def test_external_scores_sit_beside_unchanged_in_site_scores(tiny_study):
  workdir, before, after = tiny_study['workdir'], tiny_study['before'], tiny_study['after']
  # In-site rows are what they were without the external set; each gained its twin.
  in_site = [r for r in after['results'] if r['test_set'] == 'in_site']
  assert in_site == before['results']
  assert [(r['method'], r['network'], r['test_set']) for r in after['results']] == [
      ('linear_probe', 'cxr', 'in_site'), ('linear_probe', 'cxr', 'site_c'),
      ('linear_probe', 'pixels', 'in_site'), ('linear_probe', 'pixels', 'site_c'),
      ('finetune', 'cxr', 'in_site'), ('finetune', 'cxr', 'site_c')]
  assert {r['test_set'] for r in after['summary']} == {'in_site', 'site_c'}
  external = {r['method']: float(r['auroc']) for r in after['results']
              if r['test_set'] == 'site_c' and r['network'] == 'cxr'}

  # The probe: refitted on the same training draw, applied to site C's embeddings.
  study = transfer_study.Study(tiny_study['config'], workdir)
  train = embeddings_file.load_embeddings(os.path.join(workdir, 'embeddings', 'cxr_train.npz'))
  site_c = embeddings_file.load_embeddings(
      os.path.join(workdir, 'embeddings', 'site_c', 'cxr_train.npz'))
  source, _ = pipeline.open_source(tiny_study['site_c'], 'train', tiny_study['data_dir'])
  assert len(site_c['id']) == len(source)
  assert json.loads(str(site_c['embed_spec']))['data']['tfds'] == f"{tiny_study['site_c']}:train"
  y, known = _truth(train)
  (indices,) = study.budget_draws(y, known, 1).values()
  fitted = probe_lib.fit(train['embedding'][indices], y[indices][:, None], kind='linear',
                         findings=(FINDING,), seed=0)
  y_c, known_c = _truth(site_c)
  assert 0 < y_c[known_c].sum() < known_c.sum()  # Both classes: the AUROC is defined.
  scores = fitted.predict(site_c['embedding'])[:, 0]
  assert external['linear_probe'] == pytest.approx(
      sk_metrics.roc_auc_score(y_c[known_c], scores[known_c]), abs=1e-6)

  # The fine-tuned checkpoint, applied to site C: its kept outputs.
  outputs = embeddings_file.load_embeddings(os.path.join(
      workdir, 'finetune', 'cxr_full_20_0', 'test_outputs_site_c.npz'))
  np.testing.assert_array_equal(outputs['id'], site_c['id'])
  assert external['finetune'] == pytest.approx(sk_metrics.roc_auc_score(
      y_c[known_c], outputs['logits'][known_c, 0]), abs=1e-6)

  # Report: the in-site table as before, then both test sets side by side.
  report = after['report']
  assert '| method | network | 20 |' in report
  assert '| method | network | labels | in-site | site_c | change (site_c) |' in report
  in_site_probe = float(in_site[0]['auroc'])
  change = external['linear_probe'] - in_site_probe
  assert (f"| linear_probe | cxr | 20 | {in_site_probe:.3f} | {external['linear_probe']:.3f} "
          f'| {change:+.3f} |') in report
  assert f"`{tiny_study['site_c']}:train`" in report
  assert os.path.getsize(os.path.join(workdir, 'data_efficiency_site_c.png')) > 1000
  # claims.json: in-site claims unchanged, external ones under their own key.
  claims = dict(after['claims'])
  assert set(claims.pop('external')) == {'site_c'}
  assert claims == before['claims']


@pytest.mark.slow
def test_pixel_baseline_is_chosen_on_validation_and_scored_on_test(tiny_study):
  config, workdir = tiny_study['config'], tiny_study['workdir']
  rows = [r for r in tiny_study['after']['results'] if r['network'] == 'pixels']
  assert [r['test_set'] for r in rows] == ['in_site', 'site_c']
  study = transfer_study.Study(config, workdir)
  name, data_dir = config.data.name, tiny_study['data_dir']

  def pixels(split, size):
    """Windowed (0.5-99.5 percentiles), area-downsampled, flattened: written out here."""
    source, _ = pipeline.open_source(name, split, data_dir)
    out, labels = [], []
    for i in range(len(source)):
      image = cv2.imdecode(np.frombuffer(source[i]['image'], np.uint8),
                           cv2.IMREAD_UNCHANGED).astype(np.float64)
      lo, hi = np.percentile(image, (0.5, 99.5))
      image = np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)
      out.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).reshape(-1))
      labels.append(source[i]['labels'])
    return {'embedding': np.stack(out), 'labels': np.stack(labels),
            'findings': list(pipeline.findings_of(pipeline.open_source(name, split, data_dir)[1]))}

  train, validation, test = (pixels(split, 16) for split in ('train', 'validation', 'test'))
  np.testing.assert_allclose(study.pixels(f'{name}:train', 16)['embedding'],
                             train['embedding'], atol=1e-5)
  y, known = _truth(train)
  (indices,) = study.budget_draws(y, known, 1).values()
  # Every setting's validation AUROC; the row's setting must be the best of them.
  y_val, known_val = _truth(validation)
  scores = {}
  for size in config.pixels.sizes:
    x = study.pixels(f'{name}:train', size)['embedding'][indices]
    x_val = study.pixels(f'{name}:validation', size)['embedding']
    for scale in config.pixels.l2_scales:
      fitted = probe_lib.fit(x, y[indices][:, None], kind='linear', findings=(FINDING,),
                             config={'l2': scale / len(indices)})
      scores[(size, scale)] = (sk_metrics.roc_auc_score(
          y_val[known_val], fitted.predict(x_val)[known_val, 0]), fitted)
  size, scale = max(scores, key=lambda k: scores[k][0])
  assert rows[0]['setting'] == f'{size}x{size} px, l2 {scale:g}/n'
  y_test, known_test = _truth(pixels('test', size))
  test_scores = scores[(size, scale)][1].predict(
      study.pixels(f'{name}:test', size)['embedding'])[:, 0]
  assert float(rows[0]['auroc']) == pytest.approx(
      sk_metrics.roc_auc_score(y_test[known_test], test_scores[known_test]), abs=1e-6)
  # The report and claims.json carry the baseline, its efficiency and the kNN table.
  report, claims = tiny_study['after']['report'], tiny_study['after']['claims']
  assert '| linear_probe | pixels |' in report
  assert 'Separation of the test embeddings' in report
  assert set(claims['knn_auroc']) == {'cxr', 'pixels 8x8', 'pixels 16x16', 'pixels 32x32'}
  assert set(claims['label_efficiency']) == {'pixels'}  # The efficiency budget is 20 here.
  assert claims['cxr_beats_pixels_linear_probe']['20'][1] == pytest.approx(
      float(rows[0]['auroc']))


def test_finetune_budgets_default_to_every_budget_and_must_be_among_them():
  config = transfer_study.default_config()
  config.budgets = (10, 45, 'all')
  assert transfer_study.finetune_budgets(config) == (10, 45, 'all')
  config.finetune.budgets = ('all',)
  assert transfer_study.finetune_budgets(config) == ('all',)
  config.finetune.budgets = (45, 500)
  with pytest.raises(ValueError, match=r"finetune.budgets has \[500\], which are not in "
                                       r"config.budgets \(10, 45, 'all'\)"):
    transfer_study.finetune_budgets(config)
