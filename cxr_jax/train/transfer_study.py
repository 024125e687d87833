"""Task training at label budgets from several pretrained networks, judged on one test set.

The third stage of the recipe, measured the way the published work measures it: for
one finding of a downstream dataset (another site than pretraining), and for each
label budget and draw of training labels,

  probes       linear and MLP probes on the frozen embeddings of each network
               (`config.networks`: name -> pretraining workdir);
  fine-tuning  full fine-tuning and LP-FT from each network in `finetune.networks`,
               plus training from scratch (the network name 'scratch');

all scored by AUROC on the same held-out test split. Outputs in WORKDIR: the embeddings
(embeddings/), each fine-tuning run (finetune/), `results.csv` (one row per method,
budget and draw), `summary.csv`, a data-efficiency plot, t-SNE maps of the test
embeddings before and after CXR pretraining, the SavedModel of `export.network`, and
`report.md`, which states what came out for the published claims, whatever it is.

Every part resumes: embeddings and fine-tuning runs are kept and reused, probes are
refitted (they take seconds).
"""

import json
import os
import subprocess
import sys
from typing import Dict, List

from absl import logging
import ml_collections
import numpy as np

from cxr_jax import embed
from cxr_jax import inference
from cxr_jax import probe as probe_lib
from cxr_jax.data import labels as labels_lib
from cxr_jax.eval import efficiency
from cxr_jax.eval import metrics
from cxr_jax.eval import report as report_lib
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train.registry import TRAINERS


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'transfer_study'
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.name = 'synthetic_cxr/site_b'
  c.data.data_dir = ''
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.finding = 'airspace_opacity'  # The task; its labels follow label_policy.
  c.data.uncertain = 'ignore'  # Uncertain labels: ignore | zeros | ones.
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
  c.finetune.steps = 100
  c.finetune.lp_steps = 50
  c.finetune.batch_size = 32
  c.finetune.learning_rate = 3e-3  # AdamW peak (cosine); the probe phase of LP-FT: 10x.
  c.finetune.scratch_model = ''  # Model trained from scratch; '' = the first network's.
  c.finetune.pp = 'decode|window|random_crop(28)|flip_lr|value_range(-1, 1, 0, 1)|rgb'
  c.tsne = ('generic', 'cxr')  # Networks whose test embeddings get a t-SNE map.
  c.export = ml_collections.ConfigDict()
  c.export.network = 'cxr'  # Network exported as a SavedModel; '' = none.
  c.bootstrap_samples = 1000
  return c


def _task_labels(data: Dict[str, np.ndarray], finding: str, uncertain: str, path: str):
  findings = [str(f) for f in data.get('findings', [])]
  if finding not in findings:
    raise ValueError(f'Finding {finding!r} is not in {path}; it has {findings}.')
  policy = labels_lib.LabelPolicy.from_config({'uncertain': uncertain})
  out = policy.apply(data['labels'][:, findings.index(finding)][:, None], (finding,))
  return out['labels'][:, 0], out['label_mask'][:, 0] > 0


def _auroc(labels, scores, known) -> float:
  return float(metrics.auroc(labels[known].astype(np.int32), scores[known]))


class Study:

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.data_dir = config.data.data_dir or None
    self.rows: List[dict] = []
    self._models: Dict[str, inference.Model] = {}
    if not config.networks:
      raise ValueError('config.networks is empty: name at least one pretrained workdir.')

  def model(self, workdir: str) -> inference.Model:
    model = inference.load_run(workdir)
    if not self.config.pp_eval:
      return model
    config = model.config.copy_and_resolve_references()
    config.data.pp_eval = self.config.pp_eval
    return inference.Model(config, model.network, model.variables, model.workdir, model.step)

  def embeddings(self, network: str, split: str) -> Dict[str, np.ndarray]:
    output = os.path.join(self.workdir, 'embeddings', f'{network}_{split}.npz')
    if network not in self._models:
      self._models[network] = self.model(self.config.networks[network])
    embed.embed_dataset(self._models[network], f'{self.config.data.name}:{split}', output,
                        batch_size=self.config.embed_batch_size, data_dir=self.data_dir)
    return embed.load_embeddings(output)

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

  def add(self, method, network, budget, draw, auroc):
    row = {'method': method, 'network': network, 'budget': str(budget), 'draw': draw,
           'auroc': auroc}
    self.rows.append(row)
    logging.info('%s', row)
    print(f'{method:>10} {network:>8} budget {budget!s:>5} draw {draw}: AUROC {auroc:.3f}',
          file=sys.stderr, flush=True)

  def run_probes(self, test_labels, test_known):
    config = self.config
    draws = None
    for network in config.networks:
      train = self.embeddings(network, config.data.train_split)
      test = self.embeddings(network, config.data.test_split)
      y, known = _task_labels(train, config.data.finding, config.data.uncertain,
                              f'{network} {config.data.train_split}')
      draws = draws or self.budget_draws(y, known, config.draws)
      for (budget, draw), indices in draws.items():
        for kind in config.probes:
          fitted = probe_lib.fit(train['embedding'][indices], y[indices][:, None], kind=kind,
                                 findings=(config.data.finding,), seed=draw)
          scores = fitted.predict(test['embedding'])[:, 0]
          self.add(f'{kind}_probe', network, budget, draw,
                   _auroc(test_labels, scores, test_known))
    return draws

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

  def run_finetuning(self, draws, test_labels, test_known):
    from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
    study = self.config.finetune
    for network in study.networks:
      modes = ('full',) if network == 'scratch' else study.modes
      for mode in modes:
        for (budget, draw), indices in draws.items():
          if draw >= study.draws:
            continue
          run_dir = os.path.join(self.workdir, 'finetune', f'{network}_{mode}_{budget}_{draw}')
          trainer.train(self.finetune_config(network, mode, indices, draw), run_dir)
          output = os.path.join(run_dir, 'test_outputs.npz')
          embed.embed_dataset(self.model(run_dir),
                              f'{self.config.data.name}:{self.config.data.test_split}',
                              output, batch_size=self.config.embed_batch_size,
                              data_dir=self.data_dir)
          logits = embed.load_embeddings(output)['logits'][:, 0]
          method = 'finetune' if mode == 'full' else mode
          self.add(method, network, budget, draw, _auroc(test_labels, logits, test_known))

  def run(self):
    config = self.config
    first = next(iter(config.networks))
    test = self.embeddings(first, config.data.test_split)
    test_labels, test_known = _task_labels(test, config.data.finding, config.data.uncertain,
                                           f'{first} {config.data.test_split}')
    draws = self.run_probes(test_labels, test_known)
    self.run_finetuning(draws, test_labels, test_known)
    report_lib.write_csv(os.path.join(self.workdir, 'results.csv'), self.rows)
    summary = self.summarise()
    report_lib.write_csv(os.path.join(self.workdir, 'summary.csv'), summary)
    figures = self.figures(summary, test_labels, test_known)
    exported = self.export()
    self.write_report(summary, figures, exported, int(test_known.sum()),
                      int(test_labels[test_known].sum()))
    return summary

  def summarise(self) -> List[dict]:
    groups = {}
    for row in self.rows:
      groups.setdefault((row['method'], row['network'], row['budget']), []).append(row['auroc'])
    summary = []
    for (method, network, budget), values in groups.items():
      values = np.asarray(values, np.float64)
      summary.append({'method': method, 'network': network, 'budget': budget,
                      'draws': len(values), 'auroc_mean': float(np.nanmean(values)),
                      'auroc_min': float(np.nanmin(values)),
                      'auroc_max': float(np.nanmax(values))})
    return summary

  def figures(self, summary, test_labels, test_known) -> Dict[str, str]:
    from cxr_jax.eval import plots  # pylint: disable=g-import-not-at-top
    figures = {}
    curves = {}
    for row in summary:
      if row['budget'] == 'all':
        continue
      curves.setdefault(f"{row['method']} ({row['network']})", []).append(
          {'metric': 'auroc', 'budget': int(row['budget']),
           'num_examples': int(row['budget']), 'mean': row['auroc_mean'],
           'low': row['auroc_min'], 'high': row['auroc_max']})
    path = os.path.join(self.workdir, 'data_efficiency.png')
    plots.plot_data_efficiency(curves, path, title=f'{self.config.data.finding}: AUROC '
                               'against training labels', ylabel='test AUROC')
    figures['data_efficiency'] = os.path.basename(path)
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
    log_path = os.path.join(self.workdir, 'export.log')
    with open(log_path, 'w') as log:  # TensorFlow stays out of this process.
      code = subprocess.call([sys.executable, '-m', 'cxr_jax.export', '--workdir',
                              self.config.networks[network], '--output', output],
                             stdout=log, stderr=subprocess.STDOUT)
    if code:
      raise RuntimeError(f'Exporting {network} failed; see {log_path}.')
    return output

  def write_report(self, summary, figures, exported, num_test, num_positive):
    config = self.config
    doc = report_lib.Report(f'Transfer study: {config.data.finding} on {config.data.name}')
    doc.paragraph(
        f'Test set: {num_test} images of `{config.data.name}:{config.data.test_split}` with a '
        f'known `{config.data.finding}` label ({num_positive} positive). Training labels are '
        f'drawn from `{config.data.train_split}`: {config.draws} draws per budget for probes, '
        f'{config.finetune.draws} for fine-tuning; the same draws for every method. '
        'Numbers are test AUROC: mean over draws [min, max].')
    doc.section('AUROC by method and label budget')
    budgets = [str(b) for b in config.budgets]
    table = {}
    for row in summary:
      key = (row['method'], row['network'])
      cell = f"{row['auroc_mean']:.3f}"
      if row['draws'] > 1:
        cell += f" [{row['auroc_min']:.3f}, {row['auroc_max']:.3f}]"
      table.setdefault(key, {'method': row['method'], 'network': row['network']})[
          row['budget']] = cell
    doc.table(list(table.values()), ['method', 'network'] + budgets)
    doc.section('The published claims, on this run')
    for line in claims(summary, budgets):
      doc.paragraph(line)
    if 'data_efficiency' in figures:
      doc.image(figures['data_efficiency'], 'Test AUROC against the number of training labels.')
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
    with open(os.path.join(self.workdir, 'claims.json'), 'w') as f:
      json.dump(claim_values(summary, budgets), f, indent=2)


def _mean(summary, method, network, budget):
  for row in summary:
    if (row['method'], row['network'], row['budget']) == (method, network, budget):
      return row['auroc_mean']
  return None


def claim_values(summary, budgets) -> Dict[str, Dict[str, list]]:
  """Per claim and budget: (value of the claimed-better method, of the baseline)."""
  pairs = {
      'cxr_beats_generic_linear_probe': (('linear_probe', 'cxr'), ('linear_probe', 'generic')),
      'pretraining_beats_scratch': (('finetune', 'cxr'), ('finetune', 'scratch')),
      'lpft_at_least_finetune': (('lpft', 'cxr'), ('finetune', 'cxr')),
  }
  out = {}
  for claim, (better, baseline) in pairs.items():
    values = {b: (_mean(summary, *better, b), _mean(summary, *baseline, b)) for b in budgets}
    out[claim] = {b: v for b, v in values.items() if None not in v}
  return out


def claims(summary, budgets) -> List[str]:
  text = {
      'cxr_beats_generic_linear_probe': 'CXR-specific pretraining beats generic pretraining '
                                        '(linear probe on the embeddings)',
      'pretraining_beats_scratch': 'Pretraining beats training from scratch (full fine-tuning)',
      'lpft_at_least_finetune': 'LP-FT is at least as good as fine-tuning alone',
  }
  lines = []
  for claim, values in claim_values(summary, budgets).items():
    if not values:
      lines.append(f'**{text[claim]}**: not measured in this run.')
      continue
    held = [b for b, (a, z) in values.items() if a >= z]
    detail = '; '.join(f'{b} labels: {a:.3f} vs {z:.3f}' for b, (a, z) in values.items())
    verdict = ('holds at every budget' if len(held) == len(values) else
               f'holds at {len(held)} of {len(values)} budgets' if held else 'does not hold')
    lines.append(f'**{text[claim]}**: {verdict} ({detail}).')
  return lines


def run_study(config, workdir: str):
  os.makedirs(workdir, exist_ok=True)
  return Study(config, workdir).run()


TRAINERS.add('transfer_study', run_study)
