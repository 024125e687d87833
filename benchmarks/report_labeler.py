"""The report labeler (cxr_jax.text.labeler): accuracy and speed.

  taskset -c 0 python benchmarks/report_labeler.py --synthetic 2000 --speed_reports 4000

Accuracy:
  - annotated: the hand-written reports of tests/text/data/annotated_reports.txt (the
    labeler's development set, so an upper bound, not a held-out estimate): per
    observation F1 of "positive" and normal/abnormal accuracy.
  - synthetic: site-A studies (label_noise 0.1, as the pretraining site): F1 of each
    finding against the generator's ground truth (`true_labels`) for the mined labels
    and, for comparison, for the generator's own noisy codes; abnormal accuracy of
    both against `true_abnormal` (abnormal = any finding positive or uncertain); and
    how often the mined code equals the generator's code (which the report was
    written from).
Speed: reports per second of `ReportLabeler.label` (sectioning, normalisation, spaCy
pipeline, aggregation) in this process, after one warm-up call; run it under
`taskset -c 0` for one core. Also the extrapolated time for MIMIC-CXR's 227,835
reports, at the measured rate on reports of the measured mean length.
Output: Markdown tables on stdout; --json writes the numbers too.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from cxr_jax.data import synthetic
from cxr_jax.text import annotations
from cxr_jax.text import labeler as labeler_lib

ANNOTATED = os.path.join(os.path.dirname(__file__), '..', 'tests', 'text', 'data',
                         'annotated_reports.txt')
MIMIC_REPORTS = 227835


def annotated_scores(labeler):
  records = annotations.read_annotated(ANNOTATED)
  out = labeler.label([r.report for r in records])
  expected = annotations.expected_codes(records, out.names)
  return len(records), annotations.score(expected, out.codes, out.names,
                                         np.array([r.abnormal for r in records]),
                                         out.abnormal)


def synthetic_scores(count, label_noise, seed):
  metas = [synthetic.study_metadata(i, seed=seed, site='A', label_noise=label_noise)
           for i in range(count)]
  reports = [m['report'] for m in metas]
  truth = np.stack([m['true_labels'] for m in metas]).astype(bool)
  noisy = np.stack([m['labels'] for m in metas])
  mined = synthetic.mine_report_labels(reports)
  true_abnormal = truth.any(axis=1)
  rows = {}
  for k, name in enumerate(synthetic.CXR_FINDINGS):
    rows[name] = {
        'prevalence': float(truth[:, k].mean()),
        'f1_mined': annotations.f1(truth[:, k], mined[:, k] == 1),
        'f1_generator': annotations.f1(truth[:, k], noisy[:, k] == 1),
        'mined_equals_generator': float(np.mean(mined[:, k] == noisy[:, k])),
    }

  def abnormal(codes):
    return np.isin(codes, (1, -1)).any(axis=1)

  summary = {
      'abnormal_accuracy_mined': float(np.mean(abnormal(mined) == true_abnormal)),
      'abnormal_accuracy_generator': float(np.mean(abnormal(noisy) == true_abnormal)),
      'mined_equals_generator': float(np.mean(mined == noisy)),
  }
  return reports, rows, summary


def speed(labeler, reports, repeats):
  labeler.label(reports[:50])  # Warm-up: spaCy's lazy initialisation.
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    labeler.label(reports)
    rates.append(len(reports) / (time.perf_counter() - start))
  return float(np.median(rates))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--synthetic', type=int, default=2000)
  parser.add_argument('--label_noise', type=float, default=0.1)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--speed_reports', type=int, default=4000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', default=None)
  args = parser.parse_args()

  start = time.perf_counter()
  labeler = labeler_lib.ReportLabeler()
  build_s = time.perf_counter() - start
  count, annotated = annotated_scores(labeler)
  reports, rows, summary = synthetic_scores(args.synthetic, args.label_noise, args.seed)

  print(f'labeler {labeler_lib.LABELER_VERSION}; {platform.processor() or platform.machine()}, '
        f'{len(os.sched_getaffinity(0))} core(s) available; built in {build_s:.1f} s\n')
  print(f'Annotated reports ({count}): abnormal accuracy {annotated["abnormal_accuracy"]:.3f}\n')
  print('| observation | positives | F1 |\n|---|---:|---:|')
  for name in labeler_lib.OBSERVATIONS[1:]:
    print(f'| {name} | {annotated[f"n_pos/{name}"]} | {annotated[f"f1/{name}"]:.3f} |')
  print(f'\nSynthetic site A ({args.synthetic} studies, label_noise {args.label_noise}): '
        f'abnormal accuracy mined {summary["abnormal_accuracy_mined"]:.3f}, generator codes '
        f'{summary["abnormal_accuracy_generator"]:.3f}; mined = generator code '
        f'{summary["mined_equals_generator"]:.4f}\n')
  print('| finding | prevalence | F1 mined vs truth | F1 generator vs truth | mined = generator |')
  print('|---|---:|---:|---:|---:|')
  for name, row in rows.items():
    print(f'| {name} | {row["prevalence"]:.3f} | {row["f1_mined"]:.3f} | '
          f'{row["f1_generator"]:.3f} | {row["mined_equals_generator"]:.4f} |')

  records = annotations.read_annotated(ANNOTATED)
  annotated_texts = [r.report for r in records]
  sets = {
      'synthetic': (reports * (args.speed_reports // len(reports) + 1))[:args.speed_reports],
      'annotated': (annotated_texts * (args.speed_reports // len(annotated_texts) + 1)
                    )[:args.speed_reports],
  }
  print('\n| reports | mean chars | reports/s | MIMIC-CXR (227,835) at this rate |\n'
        '|---|---:|---:|---:|')
  speeds = {}
  for name, texts in sets.items():
    rate = speed(labeler, texts, args.repeats)
    chars = float(np.mean([len(t) for t in texts]))
    speeds[name] = {'reports_per_s': rate, 'mean_chars': chars,
                    'mimic_minutes': MIMIC_REPORTS / rate / 60}
    print(f'| {name} | {chars:.0f} | {rate:.0f} | {MIMIC_REPORTS / rate / 60:.1f} min |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'annotated': annotated, 'synthetic': rows, 'synthetic_summary': summary,
                 'speed': speeds, 'build_s': build_s,
                 'labeler': labeler_lib.LABELER_VERSION}, f, indent=1)


if __name__ == '__main__':
  main()
