"""One call from predictions to evaluation files: `evaluate_predictions`.

Probes, fine-tuned runs, zero-shot scoring and the quickstart all end with scores
for a labelled test set. This module turns those into the same outputs everywhere:

  OUTPUT_DIR/NAME_metrics.json      summary + per-finding rows + subgroup gaps
  OUTPUT_DIR/NAME_per_finding.csv   AUROC/AUPRC with bootstrap CIs, ECE, per finding
  OUTPUT_DIR/NAME_subgroups.csv     per group of sex/age band/view/site (with metadata)
  OUTPUT_DIR/NAME_subgroup_gaps.csv the largest gap per finding and attribute
  OUTPUT_DIR/NAME_reliability.png   reliability diagram, one line per finding

and `add_to_report` lays the same numbers out in a Markdown `report.Report`.
Labels come either as 0/1 with a mask, or as the stored int8 codes (1, 0, -1
uncertain, -2 unmentioned) with mask=None, in which case a label policy (default:
uncertain ignored, unmentioned negative) decides what counts.
"""

import os
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import special

from cxr_jax.data import labels as labels_lib
from cxr_jax.eval import metrics
from cxr_jax.eval import plots
from cxr_jax.eval import report
from cxr_jax.eval import subgroups


def _targets(labels, mask, findings, label_policy):
  """(labels, mask) as 0/1 targets and known-mask, from codes or from labels + mask."""
  labels = np.asarray(labels)
  if mask is not None:
    if label_policy is not None:
      raise ValueError('Pass either a mask (labels are 0/1 targets) or a label_policy '
                       '(labels are raw codes), not both.')
    return labels, np.asarray(mask)
  policy = labels_lib.LabelPolicy.from_config(label_policy or {})
  if labels.ndim != 2 or labels.shape[1] != len(findings):
    raise ValueError(f'Expected label codes of shape [N, {len(findings)}] (one column per '
                     f'finding), got {labels.shape}.')
  codes = {labels_lib.POSITIVE, labels_lib.NEGATIVE, labels_lib.UNCERTAIN,
           labels_lib.UNMENTIONED}
  unknown = sorted(set(np.unique(labels).tolist()) - codes)
  if unknown:
    raise ValueError(f'Label codes must be 1, 0, -1 (uncertain) or -2 (unmentioned); '
                     f'found {unknown[:5]}.')
  targets = policy.apply(labels.astype(np.int8), findings)
  return targets['labels'], targets['label_mask']


def _probabilities(scores, mask, logits: bool):
  scores = np.asarray(scores, np.float64)
  if logits:
    return special.expit(scores)
  known = scores[np.asarray(mask).astype(bool)]
  if known.size and (np.nanmin(known) < 0 or np.nanmax(known) > 1):
    raise ValueError(f'Scores range from {np.nanmin(known):.4g} to {np.nanmax(known):.4g}, '
                     'outside [0, 1]; pass logits=True if they are logits.')
  return scores


def _mean(values) -> float:
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float('nan')


def evaluate_predictions(labels, mask, scores, findings: Sequence[str], *, output_dir: str,
                         patient_ids=None, metadata: Optional[Mapping] = None,
                         name: str = 'eval', logits: bool = False,
                         label_policy: Optional[Mapping] = None, num_samples: int = 1000,
                         level: float = 0.95, seed: int = 0, num_bins: int = 15,
                         age_edges: Sequence[float] = subgroups.DEFAULT_AGE_EDGES,
                         min_cases: int = 10) -> dict:
  """Evaluates scores for K findings and writes JSON, CSV and PNG files.

  Args:
    labels: [N, K] 0/1 targets (with `mask`) or int8 label codes (mask=None).
    mask: [N, K], 1 where the label is known; None when `labels` are codes.
    scores: [N, K] probabilities, or logits with logits=True.
    findings: K finding names, the column order.
    output_dir: where the files go (created).
    patient_ids: optional [N] ids; the bootstrap then resamples patients.
    metadata: optional {attribute: [N] values} with any of sex, age, view, site
      (other keys are ignored, so an embeddings dict can be passed as is).
    name: prefix of the file names.
    logits: scores are logits; probabilities (for calibration) are their sigmoid.
    label_policy: with label codes, a `LabelPolicy.from_config` dict.
    num_samples, level, seed: bootstrap settings (num_samples=0: no intervals).
    num_bins: calibration bins.
    age_edges, min_cases: subgroup settings (see `subgroups.subgroup_rows`).

  Returns:
    The summary also written to NAME_metrics.json: name, num_cases, mean_auroc,
    mean_auprc, mean_ece (over findings where defined), undefined_findings,
    per_finding rows, subgroup_gaps, bootstrap settings, and files (names
    relative to output_dir).
  """
  findings = [str(finding) for finding in findings]
  labels, mask = _targets(labels, mask, findings, label_policy)
  labels, known, _ = metrics.check_table(labels, mask, scores, findings)
  probs = _probabilities(scores, known, logits)
  rows = metrics.per_finding_table(labels, known, scores, findings, patient_ids=patient_ids,
                                   num_samples=num_samples, level=level, seed=seed)
  curves = {}
  for k, row in enumerate(rows):
    if known[:, k].any():
      finding_labels, finding_probs = labels[known[:, k], k], probs[known[:, k], k]
      row['ece'] = metrics.expected_calibration_error(finding_labels, finding_probs, num_bins)
      curves[f'{row["finding"]} (ECE {row["ece"]:.3f})'] = metrics.reliability_curve(
          finding_labels, finding_probs, num_bins)
    else:
      row['ece'] = float('nan')
  files = {'metrics': f'{name}_metrics.json', 'per_finding': f'{name}_per_finding.csv'}
  if curves:
    files['reliability'] = f'{name}_reliability.png'
    plots.plot_reliability(curves, os.path.join(output_dir, files['reliability']),
                           title=f'Reliability ({name})')
  gaps = []
  if metadata is not None:
    subgroup_rows, gaps = subgroups.subgroup_table(
        labels, known, scores, findings, metadata, age_edges=age_edges, min_cases=min_cases,
        patient_ids=patient_ids, num_samples=0, seed=seed)
    if subgroup_rows:
      files['subgroups'] = f'{name}_subgroups.csv'
      files['subgroup_gaps'] = f'{name}_subgroup_gaps.csv'
      report.write_csv(os.path.join(output_dir, files['subgroups']), subgroup_rows)
      report.write_csv(os.path.join(output_dir, files['subgroup_gaps']), gaps)
  summary = dict(
      name=name, num_cases=int(labels.shape[0]), findings=findings,
      mean_auroc=_mean([row['auroc'] for row in rows]),
      mean_auprc=_mean([row['auprc'] for row in rows]),
      mean_ece=_mean([row['ece'] for row in rows]),
      undefined_findings=[row['finding'] for row in rows if not np.isfinite(row['auroc'])],
      bootstrap=dict(num_samples=num_samples, level=level, seed=seed,
                     patient_level=patient_ids is not None),
      per_finding=rows, subgroup_gaps=gaps, files=files)
  report.write_csv(os.path.join(output_dir, files['per_finding']), rows)
  report.write_json(os.path.join(output_dir, files['metrics']), summary)
  return summary


def add_to_report(document: report.Report, summary: Mapping, *,
                  title: Optional[str] = None) -> report.Report:
  """Adds a section for one `evaluate_predictions` summary to a Markdown report.

  `summary` is the dict `evaluate_predictions` returned. Image links are its file
  names, so the report must be written into the same output_dir as those files.
  """
  document.section(title or f'Evaluation: {summary["name"]}')
  interval = summary['bootstrap']
  resampling = 'patients' if interval['patient_level'] else 'images'
  document.paragraph(
      f'{summary["num_cases"]} cases. Mean AUROC {summary["mean_auroc"]:.3f}, mean AUPRC '
      f'{summary["mean_auprc"]:.3f}, mean ECE {summary["mean_ece"]:.3f} over findings '
      f'with a defined value. Intervals: {interval["level"]:.0%} bootstrap over '
      f'{resampling}, {interval["num_samples"]} resamples.')
  if summary['undefined_findings']:
    document.paragraph('Undefined (one class only in the test set): ' +
                       ', '.join(summary['undefined_findings']) + '.')
  document.table(summary['per_finding'], columns={
      'finding': 'finding', 'n': 'n', 'n_pos': 'positives', 'auroc': 'AUROC',
      'auroc_low': 'low', 'auroc_high': 'high', 'auprc': 'AUPRC', 'ece': 'ECE',
      'note': 'note'})
  gaps = [gap for gap in summary['subgroup_gaps'] if np.isfinite(gap['gap'])]
  if gaps:
    document.section('Largest subgroup gaps', level=3)
    document.table(gaps, columns={
        'finding': 'finding', 'attribute': 'attribute', 'gap': 'AUROC gap',
        'best_group': 'best group', 'best_auroc': 'best AUROC', 'worst_group': 'worst group',
        'worst_auroc': 'worst AUROC'})
  if 'reliability' in summary['files']:
    document.image(summary['files']['reliability'], f'Reliability diagram ({summary["name"]})')
  return document
