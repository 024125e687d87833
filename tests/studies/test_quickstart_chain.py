"""The quickstart at CI size: datasets generated, stages chained, the report written with
the pixel baseline beside the networks, and the probes reading the finding.

CI size: the quickstart's datasets, generic stage and SupCon recipe, with SupCon at
batch 32 instead of 64 (half its time; the whole suite has to fit in 25 minutes on 2
cores). Mean linear-probe AUROC over the quickstart's 3 draws, CXR vs generic, measured
on the dev machine at this size: 0.544 vs 0.531 at 10 labels, 0.566 vs 0.498 at 45 and
0.613 vs 0.559 at 100 (2026-11-22); 0.615 vs 0.571, 0.597 vs 0.577 and 0.652 vs 0.624
(2026-12-03, mined labels); 0.577 vs 0.587, 0.589 vs 0.552 and 0.605 vs 0.619 once BiT's
convolutions ran as im2col products on CPU (2026-12-03, the same arithmetic to 1e-6).
So "CXR beats generic" flips with float rounding at this size; this test asserted it at
45 and 100 labels until the last change, and no longer does: SupCon at this scale
barely moves the embedding (issue 13, BENCHMARKS.md). What holds with room to spare is
asserted instead: the pixels read the finding (0.753 at 100 labels in every run, so the
data and labels line up) and so does the CXR embedding (0.605-0.652 at 100, asserted
above 0.55; an embedding that lost the image would sit near 0.5).
The study keeps the linear probes; fine-tuning, MLP probes and the export are covered by
tests/studies/test_transfer_study.py.
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


def run_quickstart(workdir):
  args = [sys.executable, '-m', 'cxr_jax.main', '--config', 'configs/quickstart.py',
          '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  with open(f'{workdir}.log', 'a') as log:  # A file, not a pipe, which could fill and block.
    code = subprocess.call(args, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                           stdout=log, stderr=subprocess.STDOUT, timeout=1500)
  with open(f'{workdir}.log') as f:
    assert code == 0, f.read()[-4000:]


@pytest.mark.slow
def test_quickstart_chain_reports_probes_that_read_the_finding(tmp_path):
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
  cxr, pixels = claims['cxr_beats_pixels_linear_probe']['100']
  assert pixels > 0.70, (pixels, report)  # Measured 0.753.
  assert cxr > 0.55, (cxr, report)  # Measured 0.605-0.652.
