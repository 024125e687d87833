"""Task training at label budgets from several pretrained networks, judged in-site and
on external sites.

The third stage of the recipe, measured the way the published work measures it: for
one finding of a downstream dataset (another site than pretraining), and for each
label budget and draw of training labels,

  probes       linear and MLP probes on the frozen embeddings of each network
               (`config.networks`: name -> pretraining workdir);
  pixels       the baseline any network has to beat: a linear probe on the raw
               images, windowed and area-downsampled, with the size and the L2
               strength chosen on the validation split (never on test);
  fine-tuning  full fine-tuning and LP-FT from each network in `finetune.networks`,
               plus training from scratch (the network name 'scratch');

all trained on the downstream training split and scored by AUROC on its held-out test
split ('in_site') and on every external test set in `config.external` (name -> TFDS
dataset, split and, where the dataset spells it differently, the finding): the same
fitted probes and fine-tuned checkpoints, applied to another site's images, so the
two numbers differ only by the shift between sites. Outputs in WORKDIR: the embeddings
(embeddings/, external sets in embeddings/NAME/), each fine-tuning run (finetune/,
with its test outputs per test set), `results.csv` (one row per method, budget, draw
and test set), `summary.csv`, a data-efficiency plot per test set, t-SNE maps of the
in-site test embeddings before and after CXR pretraining, the SavedModel of
`export.network`, `report.md` (in-site and external AUROC side by side, the label-efficiency
factor, kNN separation of each embedding, and what came out for the published claims,
whatever it is) and `claims.json` (the claims' numbers in-site, and under 'external'
per external set when there are any).

Every part resumes: embeddings and fine-tuning runs are kept and reused, probes are
refitted (they take seconds).
"""

import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional

from absl import logging
import ml_collections
import numpy as np

from cxr_jax import embed
from cxr_jax import files
from cxr_jax import inference
from cxr_jax import probe as probe_lib
from cxr_jax import tf_process
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import transforms
from cxr_jax.eval import efficiency
from cxr_jax.eval import metrics
from cxr_jax.eval import report as report_lib
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import evaluator
from cxr_jax.train import trainer
from cxr_jax.train.registry import TRAINERS

IN_SITE = 'in_site'  # The `test_set` of scores on the downstream data's own test split.
PIXELS = 'pixels'  # The `network` of the raw-pixel baseline's rows.
EXTERNAL_KEYS = ('name', 'split', 'finding')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'transfer_study'
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic_cxr/site_b'
  c.data.data_dir = ''
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.validation_split = 'validation'  # Chooses the pixel baseline's settings.
  c.data.finding = 'airspace_opacity'  # The task; its labels follow label_policy.
  c.data.uncertain = 'ignore'  # Uncertain labels: ignore | zeros | ones.
  # External test sets, read from data.data_dir: NAME -> {'name': TFDS dataset,
  # 'split': its split ('' = 'test'), 'finding': the task's name there ('' = data.finding)}.
  # Nothing trains on them; every method trained on `data` is also scored on each.
  c.external = ml_collections.ConfigDict()
  c.networks = ml_collections.ConfigDict()  # name -> pretraining workdir.
  c.budgets = (10, 45, 100, 500)  # Training labels per draw; 'all' is allowed.
  c.draws = 3  # Draws of training labels per budget (probes).
  c.probes = ('linear', 'mlp')
  c.embed_batch_size = 64
  # Preprocessing of the downstream images for every network's embeddings (the same
  # for all, so they are compared on equal terms; a generic network's own pp_eval is
  # for natural images). '' = each run's own data.pp_eval.
  c.pp_eval = 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'
  c.finetune = ml_collections.ConfigDict()
  c.finetune.networks = ('cxr',)  # Networks fine-tuned; 'scratch' = random init.
  c.finetune.modes = ('full', 'lpft')  # Also for scratch: only 'full' applies there.
  c.finetune.draws = 1
  # Budgets fine-tuned at, each one of `budgets`; () = all of them. Fine-tuning runs
  # dominate a study's time; the probes and pixels still run at every budget.
  c.finetune.budgets = ()
  c.finetune.steps = 100
  c.finetune.lp_steps = 50
  c.finetune.batch_size = 32
  c.finetune.learning_rate = 3e-3  # AdamW peak (cosine); the probe phase of LP-FT: 10x.
  c.finetune.scratch_model = ''  # Model trained from scratch; '' = the first network's.
  c.finetune.pp = 'decode|window|random_crop(28)|flip_lr|value_range(-1, 1, 0, 1)|rgb'
  c.cxr_network = 'cxr'  # The network the published claims (report, claims.json) are about.
  # The raw-pixel baseline: a linear probe on the images after `pixels.pp`, area-
  # downsampled to each of `pixels.sizes` (a side in pixels), with the L2 strength
  # `l2_scales` x the probe's default (1 / labels); the size and strength are chosen per
  # budget and draw by AUROC on data.validation_split. sizes=() leaves it out.
  c.pixels = ml_collections.ConfigDict()
  c.pixels.sizes = (8, 16, 32)
  c.pixels.l2_scales = (0.1, 1.0, 10.0)
  c.pixels.pp = 'decode|window'
  # The label-efficiency factor: how many labels each baseline needs to reach what the
  # CXR network's linear probe reaches at this budget (report and claims.json).
  c.efficiency_budget = 45
  c.tsne = ('generic', 'cxr')  # Networks whose test embeddings get a t-SNE map.
  c.export = ml_collections.ConfigDict()
  c.export.network = 'cxr'  # Network exported as a SavedModel; '' = none.
  return c


def _task_labels(data: Dict[str, np.ndarray], finding: str, uncertain: str, path: str):
  findings = [str(f) for f in data.get('findings', [])]
  if finding not in findings:
    raise ValueError(f'Finding {finding!r} is not in {path}; it has {findings}.')
  policy = labels_lib.LabelPolicy.from_config({'uncertain': uncertain})
  out = policy.apply(data['labels'][:, findings.index(finding)][:, None], (finding,))
  return out['labels'][:, 0], out['label_mask'][:, 0] > 0


def _auroc(labels, known, scores) -> float:
  return float(metrics.auroc(labels[known].astype(np.int32), scores[known]))


@dataclasses.dataclass(frozen=True)
class EvalSet:
  """A labelled split that every trained method is scored on."""
  key: str  # IN_SITE, or the external set's name in config.external.
  dataset: str
  split: str
  finding: str

  @property
  def source(self) -> str:
    return f'{self.dataset}:{self.split}'


def eval_sets(config) -> List[EvalSet]:
  """The in-site test split, then `config.external` by name; bad specs are named."""
  data = config.data
  sets = [EvalSet(IN_SITE, data.name, data.test_split, data.finding)]
  for name, spec in (config.get('external') or {}).items():
    where = f'config.external.{name}'
    if name == IN_SITE:
      raise ValueError(f'{where}: {IN_SITE!r} is the name of the in-site test split; give '
                       'the external set another name.')
    if not isinstance(spec, (dict, ml_collections.ConfigDict)):
      raise ValueError(f"{where} must be a section {{'name': TFDS dataset, 'split': ..., "
                       f"'finding': ...}}; got {spec!r}.")
    unknown = sorted(set(spec.keys()) - set(EXTERNAL_KEYS))
    if unknown:
      raise ValueError(f'{where} has keys {unknown}; valid keys: {list(EXTERNAL_KEYS)}.')
    dataset = spec.get('name') or ''
    if not isinstance(dataset, str) or not dataset:
      raise ValueError(f'{where}.name={dataset!r}: name the TFDS dataset to test on.')
    split = spec.get('split') or 'test'
    if (dataset, split) == (data.name, data.train_split):
      raise ValueError(f'{where} is {dataset}:{split}, the split every method trains on; '
                       'an external test set must be other data.')
    sets.append(EvalSet(name, dataset, split, spec.get('finding') or data.finding))
  return sets


def finetune_budgets(config) -> tuple:
  """The budgets fine-tuned at: config.finetune.budgets, or every budget if empty."""
  chosen = tuple(config.finetune.budgets) or tuple(config.budgets)
  unknown = [b for b in chosen if b not in tuple(config.budgets)]
  if unknown:
    raise ValueError(f'config.finetune.budgets has {unknown}, which are not in config.budgets '
                     f'{tuple(config.budgets)}; fine-tuning reuses the probes\' label draws.')
  return chosen


class Study:

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.data_dir = config.data.data_dir or None
    self.rows: List[dict] = []
    self._models: Dict[str, inference.Model] = {}
    self._images, self._pixels = {}, {}
    if not config.networks:
      raise ValueError('config.networks is empty: name at least one pretrained workdir.')
    self.eval_sets = eval_sets(config)
    self.finetune_budgets = finetune_budgets(config)  # Unknown ones fail before any work.

  def model(self, workdir: str) -> inference.Model:
    model = inference.load_run(workdir)
    if not self.config.pp_eval:
      return model
    config = model.config.copy_and_resolve_references()
    config.data.pp_eval = self.config.pp_eval
    return inference.Model(config, model.network, model.variables, model.workdir, model.step)

  def _embed(self, network: str, source: str, output: str) -> Dict[str, np.ndarray]:
    if network not in self._models:
      self._models[network] = self.model(self.config.networks[network])
    embed.embed_dataset(self._models[network], source, output,
                        batch_size=self.config.embed_batch_size, data_dir=self.data_dir)
    return embed.load_embeddings(output)

  def embeddings(self, network: str, split: str) -> Dict[str, np.ndarray]:
    """`network`'s embeddings of a split of the downstream data (kept for re-runs)."""
    output = os.path.join(self.workdir, 'embeddings', f'{network}_{split}.npz')
    return self._embed(network, f'{self.config.data.name}:{split}', output)

  def test_embeddings(self, network: str, eval_set: EvalSet) -> Dict[str, np.ndarray]:
    if eval_set.key == IN_SITE:
      return self.embeddings(network, eval_set.split)
    output = os.path.join(self.workdir, 'embeddings', eval_set.key,
                          f'{network}_{eval_set.split}.npz')
    return self._embed(network, eval_set.source, output)

  def truth(self, eval_set: EvalSet):
    """(labels, known) of the task finding on `eval_set`, from its embeddings file."""
    first = next(iter(self.config.networks))
    return _task_labels(self.test_embeddings(first, eval_set), eval_set.finding,
                        self.config.data.uncertain, f'{eval_set.source} ({eval_set.key})')

  def pixels(self, source: str, size: int) -> Dict[str, np.ndarray]:
    """{'embedding': [N, size * size] raw pixels, 'labels', 'findings'} of 'NAME:SPLIT'."""
    key = (source, size)
    if key not in self._pixels:
      if source not in self._images:
        records = embed.open_source(source, data_dir=self.data_dir)
        pp = transforms.Preprocess(self.config.pixels.pp)
        rng = np.random.default_rng(0)  # Deterministic ops only; the rng is unused.
        images, labels = [], []
        for i in range(len(records)):
          record = records.record(i)
          images.append(pp({'image': record['image']}, rng)['image'])
          labels.append(record['labels'])
        self._images[source] = (images, np.stack(labels), list(records.findings))
      images, labels, findings = self._images[source]
      resize = transforms.Preprocess(f'resize({size})')
      flat = np.stack([resize({'image': image}, None)['image'].reshape(-1) for image in images])
      self._pixels[key] = {'embedding': flat.astype(np.float32), 'labels': labels,
                           'findings': findings}
    return self._pixels[key]

  def budget_draws(self, labels, known, draws: int):
    """{(budget, draw): training indices}, the same for every method."""
    pool = np.flatnonzero(known)
    out = {}
    for budget in self.config.budgets:
      for draw in range(draws):
        rng = np.random.default_rng([self.config.seed, draw])
        chosen = efficiency.sample_budget(labels[pool], budget, rng)
        out[(budget, draw)] = pool[chosen]
    return out

  def add(self, method, network, budget, draw, test_set, auroc, setting=''):
    row = {'method': method, 'network': network, 'budget': str(budget), 'draw': draw,
           'test_set': test_set, 'auroc': auroc, 'setting': setting}
    self.rows.append(row)
    logging.info('%s', row)
    print(f'{method:>10} {network:>8} budget {budget!s:>5} draw {draw} {test_set:>8}: '
          f'AUROC {auroc:.3f} {setting}', file=sys.stderr, flush=True)

  def run_probes(self, truth):
    """Probes per network, budget and draw, each fitted once and scored on every set."""
    config = self.config
    draws = None
    for network in config.networks:
      train = self.embeddings(network, config.data.train_split)
      tests = {s.key: self.test_embeddings(network, s)['embedding'] for s in self.eval_sets}
      y, known = _task_labels(train, config.data.finding, config.data.uncertain,
                              f'{network} {config.data.train_split}')
      draws = draws or self.budget_draws(y, known, config.draws)
      for (budget, draw), indices in draws.items():
        for kind in config.probes:
          fitted = probe_lib.fit(train['embedding'][indices], y[indices][:, None], kind=kind,
                                 findings=(config.data.finding,), seed=draw)
          for key, embedding in tests.items():
            scores = fitted.predict(embedding)[:, 0]
            self.add(f'{kind}_probe', network, budget, draw, key,
                     _auroc(*truth[key], scores=scores))
    return draws

  def run_pixels(self, draws, truth):
    """The raw-pixel baseline at the probes' budgets and draws, chosen on validation."""
    config = self.config
    if not config.pixels.sizes:
      return
    data = config.data
    source = lambda split: f'{data.name}:{split}'
    validation = self.pixels(source(data.validation_split), config.pixels.sizes[0])
    y_val, known_val = _task_labels(validation, data.finding, data.uncertain,
                                    f'{source(data.validation_split)} (pixels)')
    train_any = self.pixels(source(data.train_split), config.pixels.sizes[0])
    y, _ = _task_labels(train_any, data.finding, data.uncertain,
                        f'{source(data.train_split)} (pixels)')
    for (budget, draw), indices in draws.items():
      best = None
      for size in config.pixels.sizes:
        x = self.pixels(source(data.train_split), size)['embedding'][indices]
        x_val = self.pixels(source(data.validation_split), size)['embedding']
        for scale in config.pixels.l2_scales:
          fitted = probe_lib.fit(x, y[indices][:, None], kind='linear',
                                 findings=(data.finding,), config={'l2': scale / len(indices)})
          score = _auroc(y_val, known_val, fitted.predict(x_val)[:, 0])
          if best is None or score > best[0]:
            best = (score, size, scale, fitted)
      _, size, scale, fitted = best
      for eval_set in self.eval_sets:
        x_test = self.pixels(eval_set.source, size)['embedding']
        self.add('linear_probe', PIXELS, budget, draw, eval_set.key,
                 _auroc(*truth[eval_set.key], scores=fitted.predict(x_test)[:, 0]),
                 setting=f'{size}x{size} px, l2 {scale:g}/n')

  def separation(self, truth) -> List[dict]:
    """Leave-one-out kNN AUROC of the task finding on each in-site test embedding."""
    labels, known = truth[IN_SITE]
    split = self.config.data.test_split
    embeddings = {network: self.embeddings(network, split)['embedding']
                  for network in self.config.networks}
    for size in self.config.pixels.sizes:
      embeddings[f'{PIXELS} {size}x{size}'] = self.pixels(
          f'{self.config.data.name}:{split}', size)['embedding']
    rows = []
    for name, embedding in embeddings.items():
      x = embedding[known]
      x = x - x.mean(0)  # Cosine neighbours of centred features.
      scores = evaluator.knn_scores(x, labels[known][:, None].astype(np.float32))[:, 0]
      rows.append({'embedding': name, 'knn_auroc': float(metrics.auroc(
          labels[known].astype(np.int32), scores))})
    return rows

  def finetune_config(self, network: str, mode: str, indices, draw: int):
    config, study = config_lib.base_config(), self.config.finetune
    config.trainer, config.seed = 'finetune', self.config.seed + draw
    config.finetune.mode = mode
    if network == 'scratch':
      _, source_config, _ = checkpointing.read_checkpoint(
          self.config.networks[next(iter(self.config.networks))])
      config.model_name = study.scratch_model or source_config.model_name
    else:
      _, source_config, _ = checkpointing.read_checkpoint(self.config.networks[network])
      config.model_name = source_config.model_name
      config.init.workdir = self.config.networks[network]
    config.model.truncate = source_config.model.truncate
    config.total_steps = study.steps
    config.finetune.lp_steps = study.lp_steps
    config.finetune.lp_learning_rate = 10 * study.learning_rate
    config.batch_size = study.batch_size
    config.log_every = max(study.steps // 4, 1)
    config.checkpoint.every = study.steps
    config.checkpoint.keep = 1
    config.head.num_classes = 1
    config.data.name, config.data.data_dir = self.config.data.name, self.config.data.data_dir
    config.data.split = self.config.data.train_split
    config.data.records = tuple(int(i) for i in indices)
    config.data.findings = (self.config.data.finding,)
    config.data.label_policy.uncertain = self.config.data.uncertain
    config.data.pp = study.pp
    config.data.pp_eval = self.config.pp_eval or config.data.pp_eval
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = study.learning_rate
    config.optimizer.schedule.name = 'cosine'
    config.optimizer.schedule.warmup_steps = max(study.steps // 10, 1)
    return config

  def run_finetuning(self, draws, truth):
    study = self.config.finetune
    for network in study.networks:
      modes = ('full',) if network == 'scratch' else study.modes
      for mode in modes:
        for (budget, draw), indices in draws.items():
          if draw >= study.draws or budget not in self.finetune_budgets:
            continue
          run_dir = os.path.join(self.workdir, 'finetune', f'{network}_{mode}_{budget}_{draw}')
          trainer.train(self.finetune_config(network, mode, indices, draw), run_dir)
          model = self.model(run_dir)
          method = 'finetune' if mode == 'full' else mode
          for eval_set in self.eval_sets:  # The same checkpoint on every test set.
            suffix = '' if eval_set.key == IN_SITE else f'_{eval_set.key}'
            output = os.path.join(run_dir, f'test_outputs{suffix}.npz')
            embed.embed_dataset(model, eval_set.source, output,
                                batch_size=self.config.embed_batch_size, data_dir=self.data_dir)
            logits = embed.load_embeddings(output)['logits'][:, 0]
            self.add(method, network, budget, draw, eval_set.key,
                     _auroc(*truth[eval_set.key], scores=logits))

  def run(self):
    truth = {s.key: self.truth(s) for s in self.eval_sets}
    draws = self.run_probes(truth)
    self.run_pixels(draws, truth)
    self.run_finetuning(draws, truth)
    report_lib.write_csv(os.path.join(self.workdir, 'results.csv'), self.rows)
    summary = self.summarise()
    report_lib.write_csv(os.path.join(self.workdir, 'summary.csv'), summary)
    figures = self.figures(summary, *truth[IN_SITE])
    exported = self.export()
    self.write_report(summary, figures, exported, truth, self.separation(truth))
    return summary

  def summarise(self) -> List[dict]:
    groups = {}
    for row in self.rows:
      key = (row['method'], row['network'], row['budget'], row['test_set'])
      groups.setdefault(key, []).append(row['auroc'])
    summary = []
    for (method, network, budget, test_set), values in groups.items():
      values = np.asarray(values, np.float64)
      summary.append({'method': method, 'network': network, 'budget': budget,
                      'test_set': test_set, 'draws': len(values),
                      'auroc_mean': float(np.nanmean(values)),
                      'auroc_min': float(np.nanmin(values)),
                      'auroc_max': float(np.nanmax(values))})
    return summary

  def figures(self, summary, test_labels, test_known) -> Dict[str, str]:
    """Data-efficiency curves per test set (in-site: data_efficiency.png), t-SNE maps."""
    from cxr_jax.eval import plots  # pylint: disable=g-import-not-at-top
    figures = {}
    for eval_set in self.eval_sets:
      curves = {}
      for row in _rows_of(summary, eval_set.key):
        if row['budget'] == 'all':
          continue
        curves.setdefault(f"{row['method']} ({row['network']})", []).append(
            {'metric': 'auroc', 'budget': int(row['budget']),
             'num_examples': int(row['budget']), 'mean': row['auroc_mean'],
             'low': row['auroc_min'], 'high': row['auroc_max']})
      if not curves:  # Only 'all' budgets: no curve to draw.
        continue
      name = ('data_efficiency' if eval_set.key == IN_SITE
              else f'data_efficiency_{eval_set.key}')
      where = 'in-site test' if eval_set.key == IN_SITE else f'external: {eval_set.key}'
      path = os.path.join(self.workdir, f'{name}.png')
      plots.plot_data_efficiency(curves, path, title=f'{self.config.data.finding}: AUROC '
                                 f'against training labels ({where})', ylabel='test AUROC')
      figures[name] = os.path.basename(path)
    for network in self.config.tsne:
      if network not in self.config.networks:
        continue
      test = self.embeddings(network, self.config.data.test_split)
      colour = np.where(test_known, test_labels, -1).astype(int).astype(str)
      colour = np.where(colour == '-1', 'unknown', np.where(colour == '1', 'present', 'absent'))
      path = os.path.join(self.workdir, f'tsne_{network}.png')
      plots.plot_tsne(test['embedding'], colour, path, seed=self.config.seed,
                      title=f't-SNE of {network} embeddings', label_name=self.config.data.finding)
      figures[f'tsne_{network}'] = os.path.basename(path)
    return figures

  def export(self) -> str:
    network = self.config.export.network
    if not network:
      return ''
    output = os.path.join(self.workdir, 'saved_model')
    if os.path.exists(os.path.join(output, 'saved_model.pb')):
      return output
    tf_process.run_python(['-m', 'cxr_jax.export', '--workdir', self.config.networks[network],
                           '--output', output], os.path.join(self.workdir, 'export.log'),
                          f'Exporting {network}')
    return output

  def write_report(self, summary, figures, exported, truth, separation):
    config = self.config
    doc = report_lib.Report(f'Transfer study: {config.data.finding} on {config.data.name}')
    labels, known = truth[IN_SITE]
    doc.paragraph(
        f'Test set: {int(known.sum())} images of `{config.data.name}:{config.data.test_split}` '
        f'with a known `{config.data.finding}` label ({int(labels[known].sum())} positive). '
        f'Training labels are drawn from `{config.data.train_split}`: {config.draws} draws per '
        f'budget for probes, {config.finetune.draws} for fine-tuning; the same draws for every '
        'method. Numbers are test AUROC: mean over draws [min, max].')
    external = [s for s in self.eval_sets if s.key != IN_SITE]
    if external:
      described = '; '.join(
          f'`{s.key}`: {int(truth[s.key][1].sum())} images of `{s.source}` with a known '
          f'`{s.finding}` label ({int(truth[s.key][0][truth[s.key][1]].sum())} positive)'
          for s in external)
      doc.paragraph(f'External test sets (other sites; nothing trains on them, every probe '
                    f'and fine-tuned network above is applied to them as it is): {described}.')
    budgets = [str(b) for b in config.budgets]
    doc.section('AUROC by method and label budget (in-site test set)')
    doc.table(_budget_table(_rows_of(summary, IN_SITE)), ['method', 'network'] + budgets)
    if external:
      doc.section('In-site and external AUROC, side by side')
      doc.paragraph('Mean test AUROC over draws on each test set, and the change from in-site '
                    'to each external set (negative: the method lost AUROC at the new site).')
      columns = {'method': 'method', 'network': 'network', 'budget': 'labels',
                 IN_SITE: 'in-site'}
      for eval_set in external:
        columns[eval_set.key] = eval_set.key
        columns[f'change_{eval_set.key}'] = f'change ({eval_set.key})'
      table = side_by_side(summary, [s.key for s in external])
      for row in table:
        for eval_set in external:
          row[f'change_{eval_set.key}'] = _signed(row[f'change_{eval_set.key}'])
      doc.table(table, columns)
    doc.section('The published claims, on this run')
    for line in claims(summary, budgets, cxr=config.cxr_network):
      doc.paragraph(line)
    efficiency_values = label_efficiency(summary, config.efficiency_budget,
                                         cxr=config.cxr_network)
    for line in efficiency_lines(efficiency_values, config.efficiency_budget,
                                 cxr=config.cxr_network):
      doc.paragraph(line)
    for eval_set in external:
      doc.paragraph(f'On the external test set `{eval_set.key}`:')
      for line in claims(summary, budgets, test_set=eval_set.key, cxr=config.cxr_network):
        doc.paragraph(line)
    if 'data_efficiency' in figures:
      doc.image(figures['data_efficiency'], 'Test AUROC against the number of training labels.')
    doc.section('Separation of the test embeddings')
    doc.paragraph(f'Leave-one-out kNN AUROC of `{config.data.finding}` on the in-site test '
                  f'set ({evaluator.KNN_NEIGHBOURS} cosine neighbours of the centred '
                  'embedding; no training labels): how far each embedding places positives '
                  'near positives.')
    doc.table([{**row, 'knn_auroc': f"{row['knn_auroc']:.3f}"} for row in separation],
              {'embedding': 'embedding', 'knn_auroc': 'kNN AUROC'})
    for eval_set in external:
      if f'data_efficiency_{eval_set.key}' in figures:
        doc.image(figures[f'data_efficiency_{eval_set.key}'],
                  f'AUROC on the external test set {eval_set.key} against the number of '
                  'training labels.')
    tsne = [k for k in figures if k.startswith('tsne_')]
    if tsne:
      doc.section('Embeddings of the test set')
      for key in tsne:
        doc.image(figures[key], f'{key[5:]} network, coloured by {config.data.finding}.')
    if exported:
      doc.section('Export')
      doc.paragraph(f'The `{config.export.network}` network is exported as a SavedModel in '
                    f'`{os.path.relpath(exported, self.workdir)}` (signatures take images or '
                    'PNG bytes and return embeddings).')
    doc.write(os.path.join(self.workdir, 'report.md'))
    values = claim_values(summary, budgets, cxr=config.cxr_network)
    values['label_efficiency'] = efficiency_values
    values['knn_auroc'] = {row['embedding']: row['knn_auroc'] for row in separation}
    if external:
      values['external'] = {s.key: claim_values(summary, budgets, test_set=s.key,
                                                cxr=config.cxr_network) for s in external}
    with files.write_atomically(os.path.join(self.workdir, 'claims.json')) as f:
      json.dump(values, f, indent=2)


def _rows_of(summary, test_set: str) -> List[dict]:
  """Summary rows of one test set; rows without a test_set are in-site."""
  return [row for row in summary if row.get('test_set', IN_SITE) == test_set]


def _budget_table(summary) -> List[dict]:
  """One row per (method, network), one 'mean [min, max]' cell per budget."""
  table = {}
  for row in summary:
    cell = f"{row['auroc_mean']:.3f}"
    if row['draws'] > 1:
      cell += f" [{row['auroc_min']:.3f}, {row['auroc_max']:.3f}]"
    table.setdefault((row['method'], row['network']), {
        'method': row['method'], 'network': row['network']})[row['budget']] = cell
  return list(table.values())


def side_by_side(summary, external: List[str]) -> List[dict]:
  """Per (method, network, budget): in-site mean AUROC, each external set's, and the change.

  Keys: 'method', 'network', 'budget', IN_SITE, then NAME and 'change_NAME' (NAME minus
  in-site) per external set; None where a test set has no score for that method.
  """
  means = {}
  for row in summary:
    key = (row['method'], row['network'], row['budget'])
    means.setdefault(key, {})[row.get('test_set', IN_SITE)] = row['auroc_mean']
  # Grouped by method, then network, in the order they were run; budgets in their order.
  methods = list(dict.fromkeys(method for method, _, _ in means))
  networks = list(dict.fromkeys(network for _, network, _ in means))
  order = sorted(means, key=lambda k: (methods.index(k[0]), networks.index(k[1])))
  table = []
  for method, network, budget in order:
    by_set = means[(method, network, budget)]
    in_site = by_set.get(IN_SITE)
    out = {'method': method, 'network': network, 'budget': budget, IN_SITE: in_site}
    for name in external:
      out[name] = by_set.get(name)
      out[f'change_{name}'] = None if None in (in_site, out[name]) else out[name] - in_site
    table.append(out)
  return table


def _signed(value) -> Optional[str]:
  if value is None:
    return None
  return 'n/a' if np.isnan(value) else f'{value:+.3f}'


def _mean(summary, method, network, budget):
  for row in summary:
    if (row['method'], row['network'], row['budget']) == (method, network, budget):
      return row['auroc_mean']
  return None


def claim_values(summary, budgets, test_set: str = IN_SITE,
                 cxr: str = 'cxr') -> Dict[str, Dict[str, list]]:
  """Per claim and budget on `test_set`: (value of the claimed-better method, of the baseline).

  `cxr` names the CXR network the claims are about.
  """
  pairs = {
      'cxr_beats_generic_linear_probe': (('linear_probe', cxr), ('linear_probe', 'generic')),
      'cxr_beats_pixels_linear_probe': (('linear_probe', cxr), ('linear_probe', PIXELS)),
      'pretraining_beats_scratch': (('finetune', cxr), ('finetune', 'scratch')),
      'finetune_beats_pixels': (('finetune', cxr), ('linear_probe', PIXELS)),
      'lpft_at_least_finetune': (('lpft', cxr), ('finetune', cxr)),
  }
  summary = _rows_of(summary, test_set)
  out = {}
  for claim, (better, baseline) in pairs.items():
    values = {b: (_mean(summary, *better, b), _mean(summary, *baseline, b)) for b in budgets}
    out[claim] = {b: v for b, v in values.items() if None not in v}
  return out


def claims(summary, budgets, test_set: str = IN_SITE, cxr: str = 'cxr') -> List[str]:
  text = {
      'cxr_beats_generic_linear_probe': 'CXR-specific pretraining beats generic pretraining '
                                        '(linear probe on the embeddings)',
      'cxr_beats_pixels_linear_probe': 'The CXR embedding beats the raw pixels (linear probes)',
      'pretraining_beats_scratch': 'Pretraining beats training from scratch (full fine-tuning)',
      'finetune_beats_pixels': 'Fine-tuning the CXR network beats the raw pixels',
      'lpft_at_least_finetune': 'LP-FT is at least as good as fine-tuning alone',
  }
  lines = []
  for claim, values in claim_values(summary, budgets, test_set, cxr).items():
    if not values:
      lines.append(f'**{text[claim]}**: not measured in this run.')
      continue
    held = [b for b, (a, z) in values.items() if a >= z]
    detail = '; '.join(f'{b} labels: {a:.3f} vs {z:.3f}' for b, (a, z) in values.items())
    verdict = ('holds at every budget' if len(held) == len(values) else
               f'holds at {len(held)} of {len(values)} budgets' if held else 'does not hold')
    lines.append(f'**{text[claim]}**: {verdict} ({detail}).')
  return lines


def labels_to_reach(curve: Dict[int, float], target: float) -> Optional[float]:
  """Labels a method needs to reach `target` AUROC on its budget curve {budget: mean}.

  Linear in log(budget) between the two budgets that bracket the first crossing; the
  smallest budget if it is already there; None if the curve never gets there.
  """
  budgets = sorted(curve)
  if not budgets:
    return None
  if curve[budgets[0]] >= target:
    return float(budgets[0])
  for low, high in zip(budgets, budgets[1:]):
    if curve[high] >= target:
      t = (target - curve[low]) / (curve[high] - curve[low])
      return float(np.exp(np.log(low) + t * (np.log(high) - np.log(low))))
  return None


def label_efficiency(summary, at: int, test_set: str = IN_SITE, cxr: str = 'cxr',
                     method: str = 'linear_probe') -> Dict[str, dict]:
  """Per baseline network: the labels it needs to match the CXR probe at `at` labels.

  {network: {'target': CXR AUROC at `at`, 'labels': needed (None: not within the
  largest budget), 'factor': labels / at, or the largest budget / at as a lower bound,
  'at_least': whether 'factor' is only a lower bound}}. Empty when the CXR probe has no
  score at `at` labels. Numeric budgets only ('all' has no size here).
  """
  curves = {}
  for row in _rows_of(summary, test_set):
    if row['method'] == method and row['budget'] != 'all':
      curves.setdefault(row['network'], {})[int(row['budget'])] = row['auroc_mean']
  target = curves.get(cxr, {}).get(int(at))
  if target is None:
    return {}
  out = {}
  for network, curve in curves.items():
    if network == cxr:
      continue
    needed = labels_to_reach(curve, target)
    out[network] = {'target': target, 'labels': needed,
                    'factor': (needed if needed is not None else max(curve)) / int(at),
                    'at_least': needed is None}
  return out


def efficiency_lines(values: Dict[str, dict], at: int, cxr: str = 'cxr') -> List[str]:
  if not values:
    return [f'**Label efficiency**: not measured (no linear probe of `{cxr}` at {at} labels).']
  lines = []
  for network, v in values.items():
    if v['at_least']:
      detail = (f'does not reach it within {round(v["factor"] * at)} labels: '
                f'**>= {v["factor"]:.0f}x**')
    else:
      detail = f'needs {v["labels"]:.0f} labels: **{v["factor"]:.1f}x**'
    lines.append(f'**Label efficiency against `{network}`**: the `{cxr}` linear probe '
                 f'reaches {v["target"]:.3f} AUROC with {at} labels; a linear probe on '
                 f'`{network}` {detail}.')
  return lines


def run_study(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  return Study(config, workdir).run()


TRAINERS.add('transfer_study', run_study)
