"""Evaluation suite: metrics with confidence intervals, subgroups, data efficiency, plots, reports.

- `metrics`: AUROC, AUPRC, bootstrap CIs (patient-level when ids exist), DeLong test,
  calibration, per-finding tables.
- `subgroups`: the same metrics by sex, age band, view and site, with the largest gap.
- `efficiency`: data-efficiency curves (score against number of training labels).
- `plots`: PNG figures (data efficiency, reliability, t-SNE), never on screen.
- `report`: Markdown, JSON and CSV writers.
- `evaluate`: `evaluate_predictions`, the one call that writes all of the above for
  a set of predictions.
- `zero_shot`: finding scores from text prompts with an image-text network.

Import the submodule you need (`from cxr_jax.eval import metrics`): this package
imports nothing itself, so probes and training code that only need a metric do
not pay for matplotlib.
"""
