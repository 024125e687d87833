"""Model throughput: images/s and utilisation for forward and forward+backward.

  python benchmarks/model_throughput.py --batch_size 16 --models bit-r50x1,efficientnet-b0

Utilisation is the model's achieved FLOP/s over the FLOP/s of a large matmul
measured in the same process on the same device, so the ratio holds on a shared,
noisy machine. Model FLOPs are XLA's count of the compiled forward pass, and three
times that for forward+backward (the usual convention: XLA's own count of the
gradient step miscounts grouped convolutions, e.g. EfficientNet's depthwise ones). Results go to stdout as a Markdown table and, with
--json, to a file.
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import models


def timed(fn, *args, repeats: int) -> float:
  """Median seconds per call after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def flops_of(jitted, *args) -> float:
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def matmul_peak(size: int, dtype, repeats: int) -> float:
  """FLOP/s of an n x n x n matmul: the device's practical dense peak for `dtype`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return 2 * size**3 / timed(matmul, a, a, repeats=repeats)


def bench_model(name: str, batch_size: int, image_size: int, dtype, repeats: int,
                overrides: dict) -> list:
  model = models.get_model(name, num_classes=1000, dtype=dtype, **overrides)
  variables = models.weights.init_variables(model)
  images = jnp.asarray(
      np.random.default_rng(0).uniform(-1, 1, (batch_size, image_size, image_size, 3)),
      jnp.float32)
  labels = jnp.zeros((batch_size,), jnp.int32)
  state = {k: v for k, v in variables.items() if k != 'params'}

  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])

  def loss_fn(params, x, y):
    # train=True exercises batch statistics and drop-connect where the model has them.
    (logits, _), new_state = model.apply(
        {'params': params, **state}, x, train=True, mutable=list(state),
        rngs={'dropout': jax.random.PRNGKey(0)})
    onehot = jax.nn.one_hot(y, logits.shape[-1])
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), new_state

  grad_step = jax.jit(jax.grad(loss_fn, has_aux=True))
  forward_flops = flops_of(forward, variables, images)
  rows = []
  for mode, fn, args, flops in [
      ('forward', forward, (variables, images), forward_flops),
      ('forward+backward', grad_step, (variables['params'], images, labels), 3 * forward_flops)]:
    seconds = timed(fn, *args, repeats=repeats)
    label = name + ''.join(f' {k}={v}' for k, v in overrides.items())
    rows.append({'model': label, 'mode': mode, 'batch': batch_size, 'image': image_size,
                 'dtype': jnp.dtype(dtype).name, 'images_per_s': batch_size / seconds,
                 'gflops_per_image': flops / batch_size / 1e9, 'tflops_per_s': flops / seconds / 1e12})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='bit-r50x1,efficientnet-b0',
                      help='Comma-separated; NAME:key=value overrides a model field, e.g. '
                      'efficientnet-b0:depthwise_impl=conv.')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--matmul_size', type=int, default=4096)
  parser.add_argument('--json', default='')
  args = parser.parse_args()

  device = jax.devices()[0]
  dtype = jnp.dtype(args.dtype)
  peak = matmul_peak(args.matmul_size, dtype, args.repeats)
  rows = []
  for spec in args.models.split(','):
    name, _, override = spec.partition(':')
    overrides = dict(kv.split('=') for kv in override.split(';') if kv)
    for row in bench_model(name, args.batch_size, args.image_size, dtype, args.repeats,
                           overrides):
      row['utilization'] = row['tflops_per_s'] * 1e12 / peak
      rows.append(row)

  print(f'device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), '
        f'host: {platform.processor() or platform.machine()}, jax {jax.__version__}')
  print(f'matmul {args.matmul_size}^3 {args.dtype}: {peak / 1e12:.3f} TFLOP/s\n')
  print('| model | mode | batch | dtype | images/s | GFLOPs/image | TFLOP/s | utilization |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['dtype']} | {r['images_per_s']:.1f} "
          f"| {r['gflops_per_image']:.2f} | {r['tflops_per_s']:.3f} | {r['utilization']:.2f} |")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'device': device.device_kind, 'matmul_tflops': peak / 1e12, 'rows': rows}, f,
                indent=2)


if __name__ == '__main__':
  main()
