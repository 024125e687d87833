"""The command line: summary trainer end to end, config overrides, clear errors."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'cxr_jax.main', '--workdir', str(workdir), *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_model_summary_writes_config_and_summary(tmp_path):
  result = run_main('--config', 'configs/model_summary.py:bit-tiny',
                    '--config.model.num_classes=3', '--config.model.truncate=1',
                    '--config.input.image_size=64', workdir=tmp_path)
  assert result.returncode == 0, result.stderr
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model'] == {'dtype': 'float32', 'num_classes': 3, 'truncate': 1}
  summary = json.loads((tmp_path / 'model_summary.json').read_text())
  assert summary['logits_shape'] == [1, 3]
  assert summary['embedding_shape'] == [1, 512]  # block3 of bit-tiny: 4 * 32 * 4.
  assert 'block4' not in summary['feature_shapes']
  assert summary['forward_gflops_per_image'] > 0
  assert summary['parameters'] == sum(summary['parameters_by_scope'].values())
  assert 'parameters:' in result.stdout


@pytest.mark.parametrize('override,expected', [
    ('--config.modle.truncate=1', "config has no key 'modle'. Valid keys of config: "
                                  'init, input, model, model_name, trainer.'),
    ('--config.model.trunc=1', "config.model has no key 'trunc'. Valid keys of config.model: "
                               'dtype, num_classes, truncate.'),
])
def test_unknown_config_key_names_valid_keys(tmp_path, override, expected):
  result = run_main('--config', 'configs/model_summary.py:bit-tiny', override, workdir=tmp_path)
  assert result.returncode != 0
  assert expected in result.stderr
  assert 'Traceback' not in result.stderr


def test_unknown_model_and_trainer_are_named(tmp_path):
  result = run_main('--config', 'configs/model_summary.py:bit-nope', workdir=tmp_path)
  assert result.returncode != 0 and "Unknown model 'bit-nope'" in result.stderr
  result = run_main('--config', 'configs/model_summary.py', '--config.trainer=nope',
                    workdir=tmp_path)
  assert result.returncode != 0 and "Unknown trainer 'nope' in config.trainer. Known:" in (
      result.stderr)
  assert 'model_summary' in result.stderr and 'supcon' in result.stderr
  assert 'Traceback' not in result.stderr


def test_help_lists_the_flags(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'cxr_jax.main', '--help'], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0
  assert '--config' in result.stdout and '--workdir' in result.stdout
