"""Training-step memory at scale, from XLA's compiled memory analysis (no accelerator).

  python benchmarks/memory.py --models bit-r50x1:224 --stages supervised \
      --dtypes float32,bfloat16 --remat 0,1 --batches 2,4

For each model, resolution, stage (supervised: linear head, SGD; supcon: two views,
projection head, LARS), compute dtype and remat setting, the trainer's own jitted,
state-donating step (`trainer.make_train_step`) is lowered on abstract shapes and
compiled for the local backend, and `compiled.memory_analysis()` gives the bytes of
its arguments, outputs, aliased (donated) buffers and temporaries. Peak = arguments +
outputs - aliased + temporaries. Nothing is run, so the largest models fit in the
memory of a laptop, but the compile itself takes minutes for them on a small CPU.

Peak memory is close to linear in the batch (parameters and optimizer state are
fixed, activations grow with it), so each row is compiled at two batch sizes and
the largest per-device batch that fits a memory budget is extrapolated from the
line through them. This is the CPU compiler's buffer assignment: an accelerator's
compiler fuses and schedules differently, so the figures are an estimate of the
accelerator's, not a measurement of it (XLA:CPU also computes some bf16 operations
in float32, which overstates bf16 peaks).
"""

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

from cxr_jax.train import config_lib
from cxr_jax.train import optimizers
from cxr_jax.train import trainer

GIB = 2**30
BUDGETS_GB = (80, 141)  # H100 80 GB and H200 141 GB (decimal GB, as sold).


def step_config(model: str, stage: str, dtype: str, remat: bool, batch: int):
  """The trainer config of one row; `batch` counts images (SupCon: two views each)."""
  config = config_lib.base_config()
  config.trainer = stage
  config.model_name = model
  config.model.dtype = dtype
  config.model.remat = remat
  if model.startswith('bit'):
    # The accelerator's program: on CPU 'auto' would compile BiT's convolutions as
    # im2col matrix products, which store kh*kw copies of their inputs.
    config.model.conv_impl = 'conv'
  config.batch_size = batch
  if stage == 'supcon':
    config.optimizer.name = 'lars'
  else:
    config.head.num_classes = 14
    config.optimizer.name = 'sgd'
  return config


def abstract_batch(config, size: int) -> dict:
  b = config.batch_size
  views = (2,) if config.trainer == 'supcon' else ()
  f32 = jnp.float32
  return {'image': jax.ShapeDtypeStruct((b, *views, size, size, 3), f32),
          'labels': jax.ShapeDtypeStruct((b, 14), f32),
          'label_mask': jax.ShapeDtypeStruct((b, 14), f32),
          'abnormal': jax.ShapeDtypeStruct((b,), jnp.int32)}


def peak_bytes(config, size: int) -> dict:
  """Compiles the train step for abstract inputs; returns its memory analysis in bytes."""
  network = trainer.build_network(config)
  config.init_image_size = 32  # Parameter shapes do not depend on the image size.
  variables = jax.eval_shape(
      lambda: trainer.initial_variables(network, config, jax.random.PRNGKey(0)))
  params = variables.pop('params')
  tx, _ = optimizers.make_optimizer(config.optimizer, params, 1000,
                                    batch_size=config.batch_size)
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
           'opt_state': jax.eval_shape(tx.init, params), 'model_state': variables,
           'rng': jax.eval_shape(lambda: jax.random.PRNGKey(0))}
  step = jax.jit(trainer.make_train_step(network, config, tx), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, abstract_batch(config, size)).compile()
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes,
         'alias': m.alias_size_in_bytes, 'temp': m.temp_size_in_bytes,
         'compile_s': round(seconds, 1)}
  out['peak'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  out['params'] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  return out


def max_batch(b1: int, p1: float, b2: int, p2: float, budget: float) -> int:
  per_image = (p2 - p1) / (b2 - b1)
  fixed = p1 - per_image * b1
  return max(0, int((budget - fixed) // per_image)) if per_image > 0 else -1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='bit-r50x1:224',
                      help='model:resolution pairs, comma-separated')
  parser.add_argument('--stages', default='supervised,supcon')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--remat', default='0,1')
  parser.add_argument('--batches', default='2,4', help='the two batch sizes compiled')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  b1, b2 = (int(b) for b in args.batches.split(','))
  print(f'# backend {jax.default_backend()}, jax {jax.__version__}, '
        f'{platform.processor() or platform.machine()}; peak linear in batch from '
        f'batches {b1} and {b2}')
  print('| model | px | stage | dtype | remat | params GiB | peak GiB @b1 | @b2 | '
        'GiB/image | max batch 80 GB | 141 GB | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  for pair in args.models.split(','):
    model, size = pair.split(':')
    for stage in args.stages.split(','):
      for dtype in args.dtypes.split(','):
        for remat in (bool(int(r)) for r in args.remat.split(',')):
          m1 = peak_bytes(step_config(model, stage, dtype, remat, b1), int(size))
          m2 = peak_bytes(step_config(model, stage, dtype, remat, b2), int(size))
          fits = [max_batch(b1, m1['peak'], b2, m2['peak'], gb * 1e9) for gb in BUDGETS_GB]
          row = {'model': model, 'size': int(size), 'stage': stage, 'dtype': dtype,
                 'remat': remat, 'b1': m1, 'b2': m2, 'max_batch': dict(zip(BUDGETS_GB, fits))}
          rows.append(row)
          print(f"| {model} | {size} | {stage} | {dtype} | {int(remat)} | "
                f"{m1['params'] / GIB:.2f} | {m1['peak'] / GIB:.2f} | {m2['peak'] / GIB:.2f} | "
                f"{(m2['peak'] - m1['peak']) / (b2 - b1) / GIB:.3f} | {fits[0]} | {fits[1]} | "
                f"{m1['compile_s']} + {m2['compile_s']} |", flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
