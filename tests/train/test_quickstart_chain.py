"""The quickstart's machinery at CI size: datasets generated, stages chained, and the
transfer study's table, claims and figures written. (Each stage's resume is tested with
the trainer; this run is kept small because it compiles every stage's programs.)"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OVERRIDES = {
    'synthetic.natural.args.num_train': 64, 'synthetic.natural.args.num_test': 16,
    'synthetic.natural.args.num_classes': 4, 'synthetic.site_a.args.num_examples': 96,
    'synthetic.site_b.args.num_examples': 300,
    'stages.generic.head.num_classes': 4, 'stages.generic.total_steps': 3,
    'stages.generic.batch_size': 8, 'stages.generic.eval.every': 3,
    'stages.generic.optimizer.schedule.warmup_steps': 1,
    'stages.cxr.total_steps': 3, 'stages.cxr.batch_size': 8, 'stages.cxr.eval.every': 3,
    'stages.cxr.optimizer.schedule.warmup_steps': 1,
    'stages.study.budgets': '(10, 20)', 'stages.study.draws': 1,
    'stages.study.probes': "('linear',)", 'stages.study.finetune.steps': 2,
    'stages.study.finetune.modes': "('full',)", 'stages.study.finetune.networks': "('cxr',)",
    'stages.study.finetune.batch_size': 8, 'stages.study.export.network': '',
}


def run_quickstart(workdir):
  args = [sys.executable, '-m', 'cxr_jax.main', '--config', 'configs/quickstart.py',
          '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  with open(f'{workdir}.log', 'a') as log:  # A file, not a pipe, which could fill and block.
    code = subprocess.call(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                           stdout=log, stderr=subprocess.STDOUT, timeout=1200)
  with open(f'{workdir}.log') as f:
    assert code == 0, f.read()[-4000:]


@pytest.mark.slow
def test_quickstart_chain_runs_and_writes_its_report(tmp_path):
  workdir = tmp_path / 'quickstart'
  run_quickstart(workdir)
  study = workdir / 'study'
  report = (study / 'report.md').read_text()
  assert '| method | network | 10 | 20 |' in report
  assert 'CXR-specific pretraining beats generic pretraining' in report
  for figure in ('data_efficiency.png', 'tsne_generic.png', 'tsne_cxr.png'):
    assert os.path.getsize(study / figure) > 1000, figure
  claims = json.loads((study / 'claims.json').read_text())
  assert set(claims['cxr_beats_generic_linear_probe']) == {'10', '20'}
  assert claims['pretraining_beats_scratch'] == {}  # Not run at this size: no scratch.
  rows = (study / 'results.csv').read_text().splitlines()
  # 2 networks x 2 budgets x 1 draw of linear probes, then 2 fine-tuning runs.
  assert len(rows) == 1 + 4 + 2
  assert sorted(os.listdir(study / 'finetune')) == ['cxr_full_10_0', 'cxr_full_20_0']
