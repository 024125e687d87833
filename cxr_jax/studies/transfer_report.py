"""The transfer study's report: what its scores are written up as.

From the study's summary rows (one per method, network, budget and test set;
`transfer_study` computes them), this writes the data-efficiency plots and t-SNE maps,
`report.md` (AUROC tables in-site and external side by side, the published claims'
verdicts, label-efficiency factors, kNN separation) and `claims.json`. Nothing here
trains a network, embeds an image or fits a probe: every number comes in as an argument.
"""

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from cxr_jax import files
from cxr_jax.eval import report as report_lib
from cxr_jax.train import evaluator

IN_SITE = 'in_site'  # The `test_set` of scores on the downstream data's own test split.
PIXELS = 'pixels'  # The `network` of the raw-pixel baseline's rows.


def figures(config, workdir: str, eval_sets: Sequence, summary, test_labels, test_known,
            test_embedding: Callable[[str], np.ndarray]) -> Dict[str, str]:
  """Data-efficiency curves per test set (in-site: data_efficiency.png), t-SNE maps.

  `test_embedding(network)` is that network's in-site test embedding [N, D], asked for
  one network at a time; the t-SNE maps colour it by (test_labels, test_known).
  Returns {figure name: file name in `workdir`}.
  """
  # matplotlib loads only when a study draws, not with every `cxr_jax.main` run.
  from cxr_jax.eval import plots  # pylint: disable=g-import-not-at-top
  drawn = {}
  for eval_set in eval_sets:
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
    path = os.path.join(workdir, f'{name}.png')
    plots.plot_data_efficiency(curves, path, title=f'{config.data.finding}: AUROC '
                               f'against training labels ({where})', ylabel='test AUROC')
    drawn[name] = os.path.basename(path)
  for network in config.tsne:
    if network not in config.networks:
      continue
    colour = np.where(test_known, test_labels, -1).astype(int).astype(str)
    colour = np.where(colour == '-1', 'unknown', np.where(colour == '1', 'present', 'absent'))
    path = os.path.join(workdir, f'tsne_{network}.png')
    plots.plot_tsne(test_embedding(network), colour, path, seed=config.seed,
                    title=f't-SNE of {network} embeddings', label_name=config.data.finding)
    drawn[f'tsne_{network}'] = os.path.basename(path)
  return drawn


def write(config, workdir: str, eval_sets: Sequence, summary, figures: Dict[str, str],
          exported: str, truth: Dict[str, Tuple[np.ndarray, np.ndarray]],
          separation: List[dict]) -> None:
  """WORKDIR/report.md and WORKDIR/claims.json.

  `eval_sets` are the study's test sets (in-site first), `truth` their (labels, known)
  by key, `figures` what `figures()` drew, `exported` the SavedModel's path ('': none),
  `separation` the kNN AUROC rows {'embedding', 'knn_auroc'}.
  """
  doc = report_lib.Report(f'Transfer study: {config.data.finding} on {config.data.name}')
  labels, known = truth[IN_SITE]
  doc.paragraph(
      f'Test set: {int(known.sum())} images of `{config.data.name}:{config.data.test_split}` '
      f'with a known `{config.data.finding}` label ({int(labels[known].sum())} positive). '
      f'Training labels are drawn from `{config.data.train_split}`: {config.draws} draws per '
      f'budget for probes, {config.finetune.draws} for fine-tuning; the same draws for every '
      'method. Numbers are test AUROC: mean over draws [min, max].')
  external = [s for s in eval_sets if s.key != IN_SITE]
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
                  f'`{os.path.relpath(exported, workdir)}` (signatures take images or '
                  'PNG bytes and return embeddings).')
  doc.write(os.path.join(workdir, 'report.md'))
  values = claim_values(summary, budgets, cxr=config.cxr_network)
  values['label_efficiency'] = efficiency_values
  values['knn_auroc'] = {row['embedding']: row['knn_auroc'] for row in separation}
  if external:
    values['external'] = {s.key: claim_values(summary, budgets, test_set=s.key,
                                              cxr=config.cxr_network) for s in external}
  with files.write_atomically(os.path.join(workdir, 'claims.json')) as f:
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
