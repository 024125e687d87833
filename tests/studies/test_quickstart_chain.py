"""The quickstart at CI size: datasets generated, stages chained, the report written, and
the first published claim reproduced: on a finding whose label no pretraining stage saw,
at a site neither pretraining stage saw, a linear probe on the SupCon CXR network's
embedding beats one on the generic network's at small label budgets.

CI size: the quickstart's datasets, generic stage and SupCon recipe, with SupCon at
batch 32 instead of 64 (half its time; the whole suite has to fit in 20 minutes on 2
cores). Measured on the dev machine at this size, mean linear-probe AUROC over the
quickstart's 3 draws, CXR vs generic: 0.544 vs 0.531 at 10 labels, 0.566 vs 0.498 at 45
and 0.613 vs 0.559 at 100 (2026-11-22); with mined labels and BiT's 1x1 convolutions as
matrix products (2026-12-03): 0.615 vs 0.571, 0.597 vs 0.577 and 0.652 vs 0.624. The
10-label margin has been too thin to assert on machines whose floating point differs,
so the test asserts 45 and 100. The raw pixels beat both at 45 and 100 (0.698 and
0.753); issue 13 is open on that, so nothing here asserts it. (Shorter SupCon did not hold:
500 steps after a 150-step generic stage lost at 10 labels, 0.509 vs 0.536, and at 45.)
The study keeps what the claim needs, linear probes; fine-tuning, MLP probes and the
export are covered by tests/studies/test_transfer_study.py.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OVERRIDES = {
    'stages.cxr.batch_size': 32,
    'stages.study.budgets': '(10, 45, 100)', 'stages.study.probes': "('linear',)",
    'stages.study.finetune.networks': '()', 'stages.study.finetune.budgets': '()',
    'stages.study.export.network': '',
}
ASSERTED_BUDGETS = ('45', '100')


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
  assert '| method | network | 10 | 45 | 100 |' in report
  for figure in ('data_efficiency.png', 'tsne_generic.png', 'tsne_cxr.png'):
    assert os.path.getsize(study / figure) > 1000, figure
  rows = (study / 'results.csv').read_text().splitlines()
  # 2 networks and the raw pixels x 3 budgets x 3 draws of linear probes.
  assert len(rows) == 1 + 3 * 3 * 3

  claims = json.loads((study / 'claims.json').read_text())
  assert claims['pretraining_beats_scratch'] == {}  # Not run at this size.
  values = claims['cxr_beats_generic_linear_probe']
  assert set(values) == {'10', '45', '100'}
  print('CXR vs generic linear probe, mean AUROC by budget:', values)
  for budget in ASSERTED_BUDGETS:
    cxr, generic = values[budget]
    assert cxr > generic, (budget, cxr, generic, report)
