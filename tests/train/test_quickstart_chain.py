"""The quickstart at CI size: datasets generated, stages chained, the report written, and
the first published claim reproduced: on a finding whose label no pretraining stage saw,
at a site neither pretraining stage saw, a linear probe on the SupCon CXR network's
embedding beats one on the generic network's at small label budgets.

CI size: the datasets and both pretraining stages are the quickstart's own (shorter
pretraining did not reproduce the claim: after 500 SupCon steps the CXR probe lost to
the generic one at 10 labels, 0.509 vs 0.536). The study keeps what the claim needs,
linear probes at 10 and 45 labels with the quickstart's draws, and two-step fine-tuning
runs that exercise that machinery; it skips the MLP probes, the larger budgets, the
real fine-tuning runs and the export.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OVERRIDES = {
    'stages.study.budgets': '(10, 45)', 'stages.study.probes': "('linear',)",
    'stages.study.finetune.steps': 2, 'stages.study.finetune.modes': "('full',)",
    'stages.study.finetune.networks': "('cxr',)", 'stages.study.export.network': '',
}


def run_quickstart(workdir):
  args = [sys.executable, '-m', 'cxr_jax.main', '--config', 'configs/quickstart.py',
          '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  with open(f'{workdir}.log', 'a') as log:  # A file, not a pipe, which could fill and block.
    code = subprocess.call(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                           stdout=log, stderr=subprocess.STDOUT, timeout=1500)
  with open(f'{workdir}.log') as f:
    assert code == 0, f.read()[-4000:]


@pytest.mark.slow
def test_quickstart_reproduces_cxr_beats_generic_at_small_budgets(tmp_path):
  workdir = tmp_path / 'quickstart'
  run_quickstart(workdir)
  study = workdir / 'study'
  report = (study / 'report.md').read_text()
  assert '| method | network | 10 | 45 |' in report
  for figure in ('data_efficiency.png', 'tsne_generic.png', 'tsne_cxr.png'):
    assert os.path.getsize(study / figure) > 1000, figure
  rows = (study / 'results.csv').read_text().splitlines()
  # 2 networks x 2 budgets x 3 draws of linear probes, then 2 fine-tuning runs.
  assert len(rows) == 1 + 12 + 2
  assert sorted(os.listdir(study / 'finetune')) == ['cxr_full_10_0', 'cxr_full_45_0']

  claims = json.loads((study / 'claims.json').read_text())
  assert claims['pretraining_beats_scratch'] == {}  # Not run at this size: no scratch.
  values = claims['cxr_beats_generic_linear_probe']
  assert set(values) == {'10', '45'}
  for budget, (cxr, generic) in values.items():
    assert cxr > generic, (budget, cxr, generic, report)
  assert 'CXR-specific pretraining beats generic pretraining (linear probe on the ' \
         'embeddings)**: holds at every budget' in report
