"""Task training at label budgets from pretrained networks, judged in-site and at other sites.

Linear and MLP probes on each network's embeddings, full fine-tuning and LP-FT, and
training from scratch, at several label budgets for one finding of a downstream site;
each is scored on that site's test split and on every external test set; writes
results.csv, summary.csv, plots and report.md (cxr_jax/studies/transfer_study.py). The
quickstart runs it as its last stage; on its own, name the pretrained runs:

  python -m cxr_jax.main --config configs/transfer_study.py --workdir runs/study \\
      --config.networks.cxr=runs/supcon --config.networks.generic=runs/natural \\
      --config.data.name=synthetic_cxr/site_b --config.data.finding=airspace_opacity

The argument adds external test sets, `NAME=DATASET[:SPLIT]` separated by commas (the
split defaults to test; the data directory is data.data_dir), e.g. site C, whose
scanner neither pretraining nor the downstream site saw:

  python -m cxr_jax.main --config configs/transfer_study.py:site_c=synthetic_cxr/site_c:test \\
      --workdir runs/study --config.networks.cxr=runs/supcon --config.networks.generic=runs/natural

Where an external dataset spells the finding differently (NIH 'Effusion', CheXpert
'Pleural Effusion'), set `--config.external.NAME.finding`.

Data: `python -m cxr_jax.data.build synthetic_cxr/site_b --data_dir ~/tensorflow_datasets`
(and site_c; or your own site, e.g. a `cxr_manifest/NAME` dataset). Hardware: a CPU is
enough for the synthetic sizes; the fine-tuning runs dominate the time.
"""

import ml_collections

from cxr_jax.studies import transfer_study


def parse_external(arg: str) -> ml_collections.ConfigDict:
  """'NAME=DATASET[:SPLIT],...' -> config.external ({NAME: {name, split, finding}})."""
  external = ml_collections.ConfigDict()
  for item in filter(None, (part.strip() for part in arg.split(','))):
    name, equals, source = item.partition('=')
    dataset, _, split = source.rpartition(':') if ':' in source else (source, '', '')
    if not equals or not name.isidentifier() or not dataset:
      raise ValueError(f'configs/transfer_study.py:{arg}: {item!r} is not '
                       'NAME=DATASET[:SPLIT] with NAME a Python identifier.')
    if name in external:
      raise ValueError(f'configs/transfer_study.py:{arg}: external set {name!r} is named twice.')
    external[name] = {'name': dataset, 'split': split or 'test', 'finding': ''}
  return external


def get_config(external: str = ''):
  c = transfer_study.default_config()
  c.networks = ml_collections.ConfigDict({'cxr': '', 'generic': ''})
  c.external = parse_external(external)
  return c
