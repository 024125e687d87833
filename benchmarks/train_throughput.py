"""Training throughput: the trainer's step against the bare model step, in one run.

  python benchmarks/train_throughput.py --batch 8 --steps 2 --rounds 2

For each model and stage (supervised: masked sigmoid cross-entropy on the 7
synthetic_cxr findings, linear head, SGD; supcon: two views, projection head, LARS)
the step is the trainer's own: `trainer.build_network`, `optimizers.make_optimizer`
and the jitted, state-donating `trainer.make_train_step` on a `sharding` mesh. It is
timed (a) on a synthetic batch held in host memory and handed to the step through
`pipeline.to_global` each time, as the training loop does, and (b) reading batches
from the real grain pipeline over a synthetic_cxr dataset built at 256 px (built in a
subprocess, since building imports TensorFlow).

The bare model step is `model_throughput.bench_model`'s forward+backward, timed in
the same process. Both run the same number of network inputs per step: `--batch`
images for supervised, `--batch / 2` images x 2 views for SupCon, so the ratio
train step time / bare step time is the trainer's overhead (optimizer update,
metrics, head, data hand-off). The issue asks for at most 1.10.

Every time is the median over `--steps` timed steps after one warm-up (compile)
step. Other jobs on a shared machine change its speed from minute to minute, so the
bare step and the trainer's steps are timed in `--rounds` alternating rounds and
each ratio is the median of the ratios within a round (the table gives their range).
Utilisation = 3 x the model's forward FLOPs per input (XLA's count, as in
model_throughput) x inputs/s / the FLOP/s of a large matmul measured in the same
process. On CPU, the N-device rows run in a subprocess with N forced host devices
(the N devices share the same cores, so those rows measure sharding overhead, not
scaling); on GPU/TPU they use the first N real devices.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

from cxr_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from cxr_jax.train import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cxr_jax.train import optimizers  # pylint: disable=g-import-not-at-top,wrong-import-position
from cxr_jax.train import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_IMAGE_SIZE = 256
DATA_EXAMPLES = 64
NUM_FINDINGS = 7  # synthetic_cxr's findings.
STAGES = ('supervised', 'supcon')
# Augmentation as in the CXR recipes, at full size; BiT takes [-1, 1], EfficientNet
# [0, 255] (it normalises inside).
PP = 'decode|window|{views}inception_crop({size})|flip_lr|value_range({low}, {high}, 0, 1)|rgb'

BUILD_SCRIPT = '''
import sys
from cxr_jax.data.builders import synthetic
print(synthetic.prepare(synthetic.make_cxr_config(
    'A', image_size=int(sys.argv[2]), num_examples=int(sys.argv[3])), sys.argv[1]))
'''


def build_dataset(data_dir: str) -> str:
  """Builds the synthetic CXR set in a subprocess (building imports TensorFlow)."""
  result = subprocess.run(
      [sys.executable, '-c', BUILD_SCRIPT, data_dir, str(DATA_IMAGE_SIZE), str(DATA_EXAMPLES)],
      cwd=REPO, capture_output=True, text=True, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu'))
  if result.returncode:
    raise RuntimeError(f'Building the benchmark dataset in {data_dir} failed:\n'
                       f'{result.stderr[-3000:]}')
  return result.stdout.strip().splitlines()[-1]


def stage_config(model: str, stage: str, batch: int, image_size: int, dataset: str,
                 data_dir: str, workers: int, dtype: str = 'float32'):
  """The trainer config of one benchmark run; `batch` counts network inputs."""
  config = config_lib.base_config()
  config.trainer = stage
  config.model_name = model
  config.model.dtype = dtype  # Compute dtype; parameters and the loss stay float32.
  config.batch_size = batch // 2 if stage == 'supcon' else batch
  config.total_steps = 1000
  config.data.name, config.data.data_dir, config.data.workers = dataset, data_dir, workers
  low, high = (0, 255) if model.startswith('efficientnet') else (-1, 1)
  config.data.pp = PP.format(views='two_views|' if stage == 'supcon' else '',
                             size=image_size, low=low, high=high)
  if stage == 'supcon':
    config.optimizer.name = 'lars'
    config.optimizer.learning_rate = 0.3
  else:
    config.head.num_classes = NUM_FINDINGS
    config.optimizer.name = 'sgd'
  return config


def synthetic_batch(config, image_size: int) -> dict:
  """A host batch shaped like the pipeline's for `config` (the content does not matter)."""
  rng = np.random.default_rng(0)
  images = config.batch_size
  views = (2,) if config.trainer == 'supcon' else ()
  return {
      'image': rng.uniform(-1, 1, (images, *views, image_size, image_size, 3)).astype(
          np.float32),
      'labels': rng.integers(0, 2, (images, NUM_FINDINGS)).astype(np.float32),
      'label_mask': np.ones((images, NUM_FINDINGS), np.float32),
      'abnormal': rng.integers(0, 2, (images,)).astype(np.int32),
  }


def stage_timer(config, image_size: int, num_devices: int, steps: int):
  """Builds the trainer's step for `config`; returns a function that times it.

  Each call of the returned function gives the median seconds per step on a synthetic
  batch and on the real pipeline; the state and the data iterator carry on between
  calls, and the step compiles once.
  """
  mesh = sharding.make_mesh(config.mesh.fsdp, num_devices)
  network = trainer.build_network(config)
  variables = trainer.initial_variables(network, config, jax.random.PRNGKey(0))
  params = variables.pop('params')
  tx, _ = optimizers.make_optimizer(config.optimizer, params, config.total_steps,
                                    batch_size=config.batch_size)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'model_state': variables, 'rng': jax.random.PRNGKey(1)}
  state_sharding = sharding.state_shardings(jax.eval_shape(lambda: state), mesh)
  step_fn = jax.jit(trainer.make_train_step(network, config, tx), donate_argnums=(0,),
                    out_shardings=(state_sharding, sharding.replicated(mesh)))
  batch_sharding = sharding.batch_sharding(mesh)
  current = {'state': jax.device_put(state, state_sharding)}
  host_batch = synthetic_batch(config, image_size)
  data = None
  if config.data.name:  # '' with --synthetic_only: no dataset, no pipeline rows.
    data = iter(pipeline.pipeline_from_config(config.data, batch_size=config.batch_size,
                                              seed=0, train=True))

  def run_step(next_batch):
    def step():
      current['state'], metrics = step_fn(current['state'],
                                          pipeline.to_global(next_batch(), batch_sharding))
      return metrics
    return step

  def time_steps() -> dict:
    times = {'synthetic': model_throughput.timed(run_step(lambda: host_batch), repeats=steps)}
    if data is not None:
      times['pipeline'] = model_throughput.timed(run_step(lambda: next(data)), repeats=steps)
    return times

  return time_steps


def _progress(row) -> None:
  print(f"{row['model']} {row['stage']} {row['data']} on {row['devices']} device(s): "
        f"{row['step_s']:.2f} s/step, ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)


def bench_devices(args, num_devices: int) -> dict:
  """All rows for `num_devices` devices, in this process.

  Other jobs on a shared machine change the speed over minutes, so the bare step
  and the trainer's steps are timed in alternating rounds, and each ratio is the
  median over rounds of the ratio within a round. The bare step re-traces every
  round; the persistent compilation cache spares it the compile.
  """
  rows, peaks = [], []
  for model in args.models.split(','):
    configs = {stage: stage_config(model, stage, args.batch, args.image_size, args.dataset,
                                   args.data_dir, args.workers, args.dtype) for stage in STAGES}
    timers = {stage: stage_timer(config, args.image_size, num_devices, args.steps)
              for stage, config in configs.items()}
    rounds = []  # Per round: {(stage, data): seconds}, bare included.
    for _ in range(args.rounds):
      peaks.append(model_throughput.matmul_peak(args.matmul_size, jnp.dtype(args.dtype),
                                                args.steps))
      bare = next(r for r in model_throughput.bench_model(
          model, args.batch, args.image_size, jnp.dtype(args.dtype), args.steps, {})
                  if r['mode'] == 'forward+backward')
      times = {('bare model', '-'): args.batch / bare['images_per_s']}
      for stage, timer in timers.items():
        times.update({(stage, data): s for data, s in timer().items()})
      rounds.append((times, peaks[-1]))
      for (stage, data), seconds in times.items():
        print(f'{model} {stage} {data} on {num_devices} device(s), round {len(rounds)}: '
              f'{seconds:.2f} s/step', file=sys.stderr, flush=True)
    flops_per_step = bare['gflops_per_image'] * 1e9 * args.batch
    for stage, data in rounds[0][0]:
      seconds = [times[stage, data] for times, _ in rounds]
      ratios = [times[stage, data] / times['bare model', '-'] for times, _ in rounds]
      images = configs[stage].batch_size if stage in configs else args.batch
      rows.append({
          'model': model, 'stage': stage, 'data': data,
          'devices': num_devices if stage in configs else 1, 'images': images,
          'views': 2 if stage == 'supcon' else 1, 'step_s': float(np.median(seconds)),
          'images_per_s': images / float(np.median(seconds)),
          'ratio': float(np.median(ratios)), 'ratio_min': min(ratios), 'ratio_max': max(ratios),
          'utilization': float(np.median([flops_per_step / t[stage, data] / peak
                                          for t, peak in rounds]))})
      _progress(rows[-1])
    del timers  # Frees the model's states before the next model.
  return {'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
          'matmul_tflops': float(np.median(peaks)) / 1e12, 'rows': rows}


def bench_devices_in_subprocess(args, num_devices: int) -> dict:
  """The rows for `num_devices` forced CPU devices, from a fresh process."""
  with tempfile.NamedTemporaryFile(suffix='.json') as out:
    command = [sys.executable, os.path.abspath(__file__), '--models', args.models,
               '--batch', str(args.batch), '--steps', str(args.steps),
               '--rounds', str(args.rounds),
               '--image_size', str(args.image_size), '--matmul_size', str(args.matmul_size),
               '--workers', str(args.workers), '--data_dir', args.data_dir,
               '--dtype', args.dtype,
               '--dataset', args.dataset, '--in_process_devices', str(num_devices),
               '--json', out.name]
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    subprocess.run(command, cwd=REPO, env=env, check=True)
    with open(out.name) as f:
      return json.load(f)


def print_table(results) -> None:
  print('| model | stage | data | devices | images x views | step s | images/s | '
        'ratio to bare (range) | utilization |')
  print('|---|---|---|---|---|---|---|---|---|')
  for result in results:
    for r in result['rows']:
      print(f"| {r['model']} | {r['stage']} | {r['data']} | {r['devices']} | "
            f"{r['images']} x {r['views']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
            f"{r['ratio']:.3f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | "
            f"{r['utilization']:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='bit-r50x1,efficientnet-b0')
  parser.add_argument('--batch', type=int, default=8,
                      help='Network inputs per step: images (supervised) or 2 x images (SupCon).')
  parser.add_argument('--steps', type=int, default=2, help='Timed steps (median) after a warm-up.')
  parser.add_argument('--rounds', type=int, default=2,
                      help='Alternating rounds of bare and trainer steps (median ratio).')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--devices', default='',
                      help="Comma-separated device counts; '' = 1 and all devices (GPU/TPU) "
                      'or 1 and 2 forced host devices (CPU).')
  parser.add_argument('--workers', type=int, default=0, help='grain worker processes.')
  parser.add_argument('--matmul_size', type=int, default=4096)
  parser.add_argument('--data_dir', default='',
                      help='Where the 256 px synthetic_cxr set is (built if missing); '
                      "'' = a temporary directory.")
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='Compute dtype (parameters and losses stay float32).')
  parser.add_argument('--synthetic_only', action='store_true',
                      help='Skip the grain-pipeline rows (building their dataset needs '
                      'TensorFlow, which accelerator hosts may lack).')
  parser.add_argument('--json', default='')
  # Set by the parent for its forced-device subprocesses.
  parser.add_argument('--dataset', default='', help=argparse.SUPPRESS)
  parser.add_argument('--in_process_devices', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.batch % 2:
    raise SystemExit(f'--batch={args.batch}: must be even (SupCon runs batch / 2 images x 2 '
                     'views).')
  # With a persistent compilation cache, re-tracing the bare step each round costs no
  # compile (see bench_devices). The parent sets its directory for its subprocesses.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

  if args.in_process_devices:  # A forced-device subprocess of the run below.
    results = [bench_devices(args, args.in_process_devices)]
  else:
    accelerator = jax.default_backend() != 'cpu'
    counts = ([int(n) for n in args.devices.split(',')] if args.devices
              else [1, jax.device_count() if accelerator else 2])
    for n in counts:
      if (args.batch // 2) % n:
        raise SystemExit(f'--batch={args.batch}: SupCon shards its {args.batch // 2} images '
                         f'over {n} devices; use a batch with batch / 2 divisible by {n}.')
    with tempfile.TemporaryDirectory() as scratch:
      if not jax.config.jax_compilation_cache_dir:
        jax.config.update('jax_compilation_cache_dir', os.path.join(scratch, 'jax_cache'))
      args.data_dir = args.data_dir or scratch
      args.dataset = '' if args.synthetic_only else build_dataset(args.data_dir)
      results = []
      for n in dict.fromkeys(counts):
        if accelerator or n == 1:
          results.append(bench_devices(args, n))
        else:
          results.append(bench_devices_in_subprocess(args, n))
    print(f'device: {results[0]["device"]} ({results[0]["backend"]}), host: '
          f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'jax {jax.__version__}; {args.image_size} px, {args.dtype}')
    for n, result in zip(dict.fromkeys(counts), results):
      print(f'{n} device(s): matmul {args.matmul_size}^3 {args.dtype} '
            f'{result["matmul_tflops"]:.3f} TFLOP/s')
    print()
    print_table(results)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results if not args.in_process_devices else results[0], f, indent=2)


if __name__ == '__main__':
  main()
