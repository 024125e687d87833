"""Two processes joined by jax.distributed train like one process with the same global batch.

Each process is `python -c CHILD` with one CPU device and the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables that
`sharding.initialize_distributed` reads. JAX 0.10's CPU client joins processes with
gloo collectives by default (`jax_cpu_collectives_implementation`), so nothing more
is needed for cross-process reductions on CPU. Gloo sets up its connections for a
set of devices at the first collective over them and gives up when a peer is 30 s
late, which compile times on a loaded machine can exceed. So each process has one
device (the mesh then spans the same device set as JAX's one-device-per-process
barriers), and the processes run a barrier right after joining, while they are in
step. (Several devices per process are covered by test_trainer's 8-device test.)

Each process reads its own shard of the records (as on a pod), so the one-process
reference reads what the two processes read together: the same `trainer.train`, with
each global batch assembled from both processes' per-process batches.

Orbax saves and restores in both processes: after the straight SupCon run, its
last checkpoint is deleted and the same two processes resume from the one before;
the resumed run must end bit for bit where the straight one did. A process with other
devices than the run's (here: one process reading the two-process run) reads it too.
"""

import json
import os
import socket
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from cxr_jax.data import pipeline
from cxr_jax.train import checkpointing
from cxr_jax.train import trainer
from test_trainer import config_for, data_dir, overrides  # noqa: F401  data_dir is a fixture.

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 1
STAGES = ('supervised', 'supcon')
RESUMED_STAGE = 'supcon'
FLAGS = {'total_steps': 3, 'checkpoint.every': 2}  # Checkpoints at steps 2 and 3.
TIMEOUT_S = 900

# Runs in every process: each stage straight through; RESUMED_STAGE then loses its
# last checkpoint and runs again from the one before. Process 0 writes each run's
# final parameters to WORKDIR/STAGE-RUN.npz.
CHILD = '''
import json, os, shutil, sys
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec['tests_dir'])
from test_trainer import config_for, overrides
import flax, jax, numpy as np
from jax.experimental import multihost_utils
from cxr_jax.train import sharding, trainer

sharding.initialize_distributed()  # train() finds the cluster joined.
multihost_utils.sync_global_devices('joined')  # Gloo connects all devices now, in step.

def train(stage, run):
  config = config_for(stage, overrides(spec['data_dir'], stage, **spec['flags']))
  workdir = os.path.join(spec['workdir'], stage)
  params = trainer.train(config, workdir)['params']
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  assert all(x.is_fully_replicated for x in flat.values())  # Any local copy is the whole.
  if jax.process_index() == 0:
    np.savez(f'{workdir}-{run}.npz', **{k: np.asarray(x.addressable_data(0))
                                         for k, x in flat.items()})

for stage in spec['stages']:
  train(stage, 'straight')
if jax.process_index() == 0:
  shutil.rmtree(os.path.join(spec['workdir'], spec['resumed_stage'], 'checkpoints',
                             str(spec['flags']['total_steps'])))
multihost_utils.sync_global_devices('last checkpoint deleted')
train(spec['resumed_stage'], 'resumed')
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _tail(path, chars=3000):
  with open(path) as f:
    return f.read()[-chars:]


def run_processes(spec, log_prefix):
  """Runs CHILD in NUM_PROCESSES processes of one cluster; fails with the logs if one fails.

  Output goes to files, not pipes (a full pipe would block a process mid-collective).
  A failure or the timeout SIGKILLs every process: the others would wait on their
  collectives forever, and SIGTERM would make the trainer save a checkpoint first.
  """
  port = _free_port()
  logs = [f'{log_prefix}.process{i}.log' for i in range(NUM_PROCESSES)]
  processes = []
  try:
    for index, log in enumerate(logs):
      env = dict(
          os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
          XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}',
          JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=str(NUM_PROCESSES),
          JAX_PROCESS_ID=str(index),
          # The test session's compilation cache (conftest.py) serves these processes too.
          JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or '',
          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(
              jax.config.jax_persistent_cache_min_compile_time_secs))
      with open(log, 'w') as out:
        processes.append(subprocess.Popen(
            [sys.executable, '-c', CHILD, json.dumps(spec)], cwd=REPO, env=env, stdout=out,
            stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in processes):
      failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
      if failed:
        pytest.fail(f'Process {failed[0]} failed:\n{_tail(logs[failed[0]])}')
      if time.monotonic() > deadline:
        pytest.fail(f'Timed out after {TIMEOUT_S} s; process 0:\n{_tail(logs[0])}')
      time.sleep(0.2)
    for index, p in enumerate(processes):
      assert p.returncode == 0, f'Process {index} failed:\n{_tail(logs[index])}'
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope='module')
def cluster(data_dir, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """The workdir of the two-process runs (one subdirectory per stage)."""
  directory = tmp_path_factory.mktemp('cluster')
  spec = {'tests_dir': os.path.dirname(os.path.abspath(__file__)), 'data_dir': data_dir,
          'workdir': str(directory), 'stages': STAGES, 'resumed_stage': RESUMED_STAGE,
          'flags': FLAGS}
  run_processes(spec, str(directory / 'log'))
  return directory


class _SideBySide:
  """One process reading what `shards` (one per process) read: their batches concatenated.

  The rows are in the order `pipeline.to_global` lays out the processes' rows.
  Checkpoints store every shard's position.
  """

  def __init__(self, shards):
    self.findings = shards[0].findings
    self._shards = shards

  def __iter__(self):
    return _SideBySideIterator([iter(shard) for shard in self._shards])


class _SideBySideIterator:

  def __init__(self, iterators):
    self._iterators = iterators

  def __next__(self):
    batches = [next(iterator) for iterator in self._iterators]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *batches)

  def get_state(self) -> bytes:
    return json.dumps([it.get_state().decode() for it in self._iterators]).encode()


def read_as_processes(monkeypatch, num_processes):
  """Makes `trainer.train`, in this one process, read what `num_processes` processes read."""
  original = pipeline.pipeline_from_config

  def side_by_side(data_config, **kwargs):
    return _SideBySide([original(data_config, process_index=p, process_count=num_processes,
                                 **kwargs) for p in range(num_processes)])

  monkeypatch.setattr(pipeline, 'pipeline_from_config', side_by_side)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def saved_params(workdir, run):
  with np.load(f'{workdir}-{run}.npz') as f:
    return dict(f)


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_exactly(
    cluster, data_dir, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  read_as_processes(monkeypatch, NUM_PROCESSES)
  total = FLAGS['total_steps']
  for stage in STAGES:
    workdir = cluster / stage
    state = trainer.train(config_for(stage, overrides(data_dir, stage, **FLAGS)),
                          str(tmp_path / stage))
    expected = flax.traverse_util.flatten_dict(jax.device_get(state['params']), sep='/')
    one = read_metrics(tmp_path / stage)
    lines = read_metrics(workdir)  # Process 0 wrote them.
    for key in ('loss', 'grad_norm'):
      # Two processes sum the gradients in another order than one: SupCon's grad norms
      # (about 15) have differed by 7e-7 of their size, six float32 roundings.
      np.testing.assert_allclose([m[key] for m in lines[:total]], [m[key] for m in one],
                                 rtol=2e-6, atol=1e-5, err_msg=f'{stage} {key}')
    params = saved_params(workdir, 'straight')
    assert params.keys() == expected.keys()
    for key in expected:
      np.testing.assert_allclose(params[key], expected[key], rtol=0, atol=1e-5,
                                 err_msg=f'{stage} {key}')

  # Each process saved its own data position; the resumed run started from the
  # checkpoint before the deleted one and repeated the last step exactly (parameters
  # below), logging it once: the line written past the checkpoint was dropped.
  workdir = cluster / RESUMED_STAGE
  assert {f'process_{i}-of-{NUM_PROCESSES}.json' for i in range(NUM_PROCESSES)} <= set(
      os.listdir(workdir / 'checkpoints' / str(total) / 'data'))
  lines = read_metrics(workdir)
  assert [m['step'] for m in lines] == list(range(1, total + 1))
  straight, resumed = saved_params(workdir, 'straight'), saved_params(workdir, 'resumed')
  for key in straight:
    np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)


@pytest.mark.slow
def test_one_process_reads_the_checkpoint_of_two(cluster):  # pylint: disable=redefined-outer-name
  state, config, step = checkpointing.read_checkpoint(str(cluster / 'supervised'))
  assert (step, config.trainer) == (FLAGS['total_steps'], 'supervised')
  params = flax.traverse_util.flatten_dict(jax.device_get(state['params']), sep='/')
  expected = saved_params(cluster / 'supervised', 'straight')
  for key in expected:
    np.testing.assert_array_equal(params[key], expected[key], err_msg=key)
