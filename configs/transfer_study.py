"""Task training at label budgets from pretrained networks, on one held-out test set.

Linear and MLP probes on each network's embeddings, full fine-tuning and LP-FT, and
training from scratch, at several label budgets for one finding of a downstream site;
writes results.csv, summary.csv, plots and report.md (cxr_jax/train/transfer_study.py).
The quickstart runs it as its last stage; on its own, name the pretrained runs:

  python -m cxr_jax.main --config configs/transfer_study.py --workdir runs/study \\
      --config.networks.cxr=runs/supcon --config.networks.generic=runs/natural \\
      --config.data.name=synthetic_cxr/site_b --config.data.finding=airspace_opacity

Data: `python -m cxr_jax.data.build synthetic_cxr/site_b --data_dir ~/tensorflow_datasets`
(or your own site, e.g. a `cxr_manifest/NAME` dataset). Hardware: a CPU is enough for
the synthetic sizes; the fine-tuning runs dominate the time.
"""

import ml_collections

from cxr_jax.train import transfer_study


def get_config():
  c = transfer_study.default_config()
  c.networks = ml_collections.ConfigDict({'cxr': '', 'generic': ''})
  return c
