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
per external set when there are any). This module runs the study and writes the CSVs;
`transfer_report` draws the plots and writes report.md and claims.json.

Every part resumes: embeddings and fine-tuning runs are kept and reused, probes are
refitted (they take seconds).
"""

import dataclasses
import os
import sys
from typing import Dict, List, Tuple

from absl import logging
import ml_collections
import numpy as np

from cxr_jax import embed
from cxr_jax import embeddings_file
from cxr_jax import inference
from cxr_jax import probe as probe_lib
from cxr_jax import tf_process
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import sources
from cxr_jax.data import transforms
from cxr_jax.eval import efficiency
from cxr_jax.eval import metrics
from cxr_jax.eval import report as report_lib
from cxr_jax.studies import transfer_report
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import evaluator
from cxr_jax.train import trainer
from cxr_jax.train.registry import CONFIG_CHECKS
from cxr_jax.train.registry import TRAINERS

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
  key: str  # transfer_report.IN_SITE, or the external set's name in config.external.
  dataset: str
  split: str
  finding: str

  @property
  def source(self) -> str:
    return f'{self.dataset}:{self.split}'


def eval_sets(config) -> List[EvalSet]:
  """The in-site test split, then `config.external` by name; bad specs are named."""
  data = config.data
  sets = [EvalSet(transfer_report.IN_SITE, data.name, data.test_split, data.finding)]
  for name, spec in (config.get('external') or {}).items():
    where = f'config.external.{name}'
    if name == transfer_report.IN_SITE:
      raise ValueError(f'{where}: {transfer_report.IN_SITE!r} is the name of the in-site test '
                       'split; give the external set another name.')
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


def check_config(config) -> Tuple[List[EvalSet], tuple]:
  """(eval sets, fine-tuning budgets), or a ValueError for what no run would survive."""
  if not config.networks:
    raise ValueError('config.networks is empty: name at least one pretrained workdir.')
  return eval_sets(config), finetune_budgets(config)


class Study:

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.data_dir = config.data.data_dir or None
    self.rows: List[dict] = []
    self._models: Dict[str, inference.Model] = {}
    self._images, self._pixels = {}, {}
    self.eval_sets, self.finetune_budgets = check_config(config)

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
    return embeddings_file.load_embeddings(output)

  def embeddings(self, network: str, split: str) -> Dict[str, np.ndarray]:
    """`network`'s embeddings of a split of the downstream data (kept for re-runs)."""
    output = os.path.join(self.workdir, 'embeddings', f'{network}_{split}.npz')
    return self._embed(network, f'{self.config.data.name}:{split}', output)

  def test_embeddings(self, network: str, eval_set: EvalSet) -> Dict[str, np.ndarray]:
    if eval_set.key == transfer_report.IN_SITE:
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
        records = sources.from_spec(source, data_dir=self.data_dir)
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
        self.add('linear_probe', transfer_report.PIXELS, budget, draw, eval_set.key,
                 _auroc(*truth[eval_set.key], scores=fitted.predict(x_test)[:, 0]),
                 setting=f'{size}x{size} px, l2 {scale:g}/n')

  def separation(self, truth) -> List[dict]:
    """Leave-one-out kNN AUROC of the task finding on each in-site test embedding."""
    labels, known = truth[transfer_report.IN_SITE]
    split = self.config.data.test_split
    embeddings = {network: self.embeddings(network, split)['embedding']
                  for network in self.config.networks}
    for size in self.config.pixels.sizes:
      embeddings[f'{transfer_report.PIXELS} {size}x{size}'] = self.pixels(
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
            suffix = '' if eval_set.key == transfer_report.IN_SITE else f'_{eval_set.key}'
            output = os.path.join(run_dir, f'test_outputs{suffix}.npz')
            embed.embed_dataset(model, eval_set.source, output,
                                batch_size=self.config.embed_batch_size, data_dir=self.data_dir)
            logits = embeddings_file.load_embeddings(output)['logits'][:, 0]
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
    test_split = self.config.data.test_split
    figures = transfer_report.figures(
        self.config, self.workdir, self.eval_sets, summary, *truth[transfer_report.IN_SITE],
        test_embedding=lambda network: self.embeddings(network, test_split)['embedding'])
    exported = self.export()
    transfer_report.write(self.config, self.workdir, self.eval_sets, summary, figures, exported,
                          truth, self.separation(truth))
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


def run_study(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  return Study(config, workdir).run()


TRAINERS.add('transfer_study', run_study)
CONFIG_CHECKS.add('transfer_study', check_config)
