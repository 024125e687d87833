"""A 1x1 convolution as XLA's convolution or as a matrix product, forward and with gradients.

  python benchmarks/conv_impl.py

BiT's bottleneck units are mostly 1x1 convolutions; `bit.StandardizedConv` computes
the unstrided ones as `jnp.dot` over channels. This times both
forms on the shapes of bit-tiny at 28 px and of BiT-R50x1 at 224 px, in alternating
rounds in one process (median of the rounds), and checks they agree.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = (  # (batch, side, in, out, stride)
    (64, 7, 32, 128, 1),  # bit-tiny at 28 px, block1.
    (64, 28, 32, 128, 1),  # bit-tiny at 112 px, block1.
    (8, 56, 64, 256, 1),  # BiT-R50x1 at 224 px, block1.
    (8, 56, 256, 512, 2),  # BiT-R50x1 at 224 px, block2's strided projection (kept a conv).
    (8, 14, 1024, 256, 1),  # BiT-R50x1 at 224 px, block3.
)


def as_conv(x, w, stride):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def as_dot(x, w, stride):
  return jnp.dot(x[:, ::stride, ::stride, :], w[0, 0])


def timed(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()
  print('| shape (B, side, in, out, stride) | forward conv / dot ms | ratio | '
        'forward+backward conv / dot ms | ratio | max abs difference |')
  print('|---|---|---|---|---|---|')
  for batch, side, cin, cout, stride in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((1, 1, cin, cout), np.float32) / np.sqrt(cin))
    fns = {}
    for name, impl in (('conv', as_conv), ('dot', as_dot)):
      fns[name] = (jax.jit(lambda x, w, impl=impl: impl(x, w, stride)),
                   jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(impl(x, w, stride) ** 2),
                                    argnums=(0, 1))))
    difference = float(jnp.max(jnp.abs(fns['conv'][0](x, w) - fns['dot'][0](x, w))))
    times = {(name, k): [] for name in fns for k in (0, 1)}
    for _ in range(args.rounds):
      for name in fns:
        for k in (0, 1):
          times[(name, k)].append(timed(fns[name][k], x, w, repeats=args.repeats))
    med = {key: 1e3 * float(np.median(value)) for key, value in times.items()}
    print(f'| {(batch, side, cin, cout, stride)} | {med[("conv", 0)]:.1f} / {med[("dot", 0)]:.1f} '
          f'| {med[("conv", 0)] / med[("dot", 0)]:.1f}x | {med[("conv", 1)]:.1f} / '
          f'{med[("dot", 1)]:.1f} | {med[("conv", 1)] / med[("dot", 1)]:.1f}x | '
          f'{difference:.1e} |', flush=True)


if __name__ == '__main__':
  main()
