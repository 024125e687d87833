"""BiT's convolutions as XLA's convolution or as matrix products, forward and with gradients.

  python benchmarks/conv_impl.py

`bit.StandardizedConv` computes unstrided 1x1 convolutions as a matrix product over
channels everywhere; with `conv_impl='auto'` on CPU (`bit.cpu_conv`) every other one is
XLA's convolution forward and, under gradients, one matrix product over the kernel's
strided views (`bit.conv_as_matmul`, im2col). This times XLA's convolution against that
product on the shapes of bit-tiny at 28 px (two SupCon views of
64) and of BiT-R50x1 at 224 px, in alternating rounds in one process (median of the
rounds), and checks they agree.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.models import bit

SHAPES = (  # (batch, side, in, out, kernel, stride); padding kernel // 2 on each side.
    (128, 28, 3, 32, 7, 2),  # bit-tiny at 28 px: root.
    (128, 7, 32, 32, 3, 1),  # bit-tiny at 28 px: block1's 3x3.
    (128, 2, 256, 256, 3, 2),  # bit-tiny at 28 px: block4's strided 3x3 (2x2 -> 1x1).
    (128, 7, 32, 128, 1, 1),  # bit-tiny at 28 px: block1's 1x1.
    (8, 224, 3, 64, 7, 2),  # BiT-R50x1 at 224 px: root.
    (8, 56, 64, 64, 3, 1),  # BiT-R50x1 at 224 px: block1's 3x3.
    (8, 56, 128, 128, 3, 2),  # BiT-R50x1 at 224 px: block2's strided 3x3.
    (8, 56, 256, 512, 1, 2),  # BiT-R50x1 at 224 px: block2's strided projection.
    (8, 56, 64, 256, 1, 1),  # BiT-R50x1 at 224 px: block1's 1x1.
)


def as_conv(x, w, stride):
  pad = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def as_matmul(x, w, stride):
  pad = w.shape[0] // 2
  if w.shape[:2] == (1, 1) and stride == 1:
    return jnp.dot(x, w[0, 0])
  return bit.conv_as_matmul(x, w, stride, ((pad, pad), (pad, pad)))


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
  print('| shape (B, side, in, out, kernel, stride) | forward conv / matmul ms | ratio | '
        'forward+backward conv / matmul ms | ratio | max abs difference |')
  print('|---|---|---|---|---|---|')
  for batch, side, cin, cout, kernel, stride in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, side, side, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout), np.float32)
                    / np.sqrt(kernel * kernel * cin))
    fns = {}
    for name, impl in (('conv', as_conv), ('matmul', as_matmul)):
      fns[name] = (jax.jit(lambda x, w, impl=impl: impl(x, w, stride)),
                   jax.jit(jax.grad(lambda x, w, impl=impl: jnp.sum(impl(x, w, stride) ** 2),
                                    argnums=(0, 1))))
    difference = float(jnp.max(jnp.abs(fns['conv'][0](x, w) - fns['matmul'][0](x, w))))
    times = {(name, k): [] for name in fns for k in (0, 1)}
    for _ in range(args.rounds):
      for name in fns:
        for k in (0, 1):
          times[(name, k)].append(timed(fns[name][k], x, w, repeats=args.repeats))
    med = {key: 1e3 * float(np.median(value)) for key, value in times.items()}
    print(f'| {(batch, side, cin, cout, kernel, stride)} | {med[("conv", 0)]:.1f} / '
          f'{med[("matmul", 0)]:.1f} | {med[("conv", 0)] / med[("matmul", 0)]:.1f}x | '
          f'{med[("conv", 1)]:.1f} / {med[("matmul", 1)]:.1f} | '
          f'{med[("conv", 1)] / med[("matmul", 1)]:.1f}x | '
          f'{difference:.1e} |', flush=True)


if __name__ == '__main__':
  main()
