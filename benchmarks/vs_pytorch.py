"""cxr_jax's BiT against a PyTorch BiT on the same CPU: training and inference images/s.

  python benchmarks/vs_pytorch.py --torch_python /path/to/venv/bin/python \\
      --depth 50 --width 1 --batch 8 --size 224 --steps 3 --rounds 3

The PyTorch side (benchmarks/torch_bit.py, written from the published architecture)
runs in its own interpreter, `--torch_python`, since torch is never a dependency of
the package: `python -m venv VENV && VENV/bin/pip install torch numpy`. The JAX side
is the package's model (`models.get_model('bit-rDxW')`) under `jax.jit`.

  training   forward, sigmoid cross-entropy on 14 findings, backward and an SGD
             (momentum 0.9) update: `optax.sgd` in a jitted, state-donating step;
             `torch.optim.SGD` with `loss.backward()`;
  inference  the forward pass alone (`jax.jit`; `torch.inference_mode`).

Each round runs the JAX process, then the PyTorch process, each timing `--steps`
steps after a warm-up step (JAX's compile) and printing the median; the ratio is
JAX / PyTorch images/s within a round, and the table gives the median and range over
rounds, so that a machine whose speed drifts with other jobs does not favour either
side. Both use every core (XLA's and torch's default thread pools). Before timing,
round 1 runs the same weights and images through both and reports the largest logit
difference: the two programs compute the same function, so the times compare the same
work.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 14


def _median_seconds(fn, steps: int) -> float:
  fn()  # Warm-up: compilation, allocator, thread pools.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _inputs(args):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
  labels = (rng.random((args.batch, NUM_CLASSES)) < 0.3).astype(np.float32)
  return images, labels


def jax_worker(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from cxr_jax import models  # pylint: disable=g-import-not-at-top

  model = models.get_model(f'bit-r{args.depth}x{args.width}', num_classes=NUM_CLASSES,
                           zero_head=False)
  params = models.weights.init_variables(model)['params']
  images, labels = _inputs(args)
  if args.dump:  # The weights, images and logits the PyTorch side must reproduce.
    flat = {'/'.join(str(k.key) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(args.dump, 'weights.npz'), **flat)
    np.save(os.path.join(args.dump, 'images.npy'), images)
    np.save(os.path.join(args.dump, 'logits.npy'),
            np.asarray(model.apply({'params': params}, images)[0]))

  x, y = jnp.asarray(images), jnp.asarray(labels)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x)[0])
  tx = optax.sgd(0.003, momentum=0.9)

  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      return jnp.mean(optax.sigmoid_binary_cross_entropy(model.apply({'params': p}, x)[0], y))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  state = [params, tx.init(params)]

  def train():
    state[0], state[1], loss = step(state[0], state[1], x, y)
    loss.block_until_ready()

  infer = lambda: forward(state[0], x).block_until_ready()
  return {'framework': 'jax', 'version': jax.__version__,
          'train_s': _median_seconds(train, args.steps),
          'inference_s': _median_seconds(infer, args.steps)}


def torch_worker(args) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, HERE)
  import torch_bit  # pylint: disable=g-import-not-at-top

  model = torch_bit.BiT(args.depth, args.width, NUM_CLASSES)
  images, labels = _inputs(args)
  out = {'framework': 'torch', 'version': torch.__version__, 'threads': torch.get_num_threads()}
  if args.dump:
    model.load_flat(dict(np.load(os.path.join(args.dump, 'weights.npz'))))
    with torch.inference_mode():
      mine = model(torch.from_numpy(np.load(os.path.join(args.dump, 'images.npy'))
                                    .transpose(0, 3, 1, 2).copy())).numpy()
    theirs = np.load(os.path.join(args.dump, 'logits.npy'))
    out['max_logit_difference'] = float(np.max(np.abs(mine - theirs)))
    out['max_logit'] = float(np.max(np.abs(theirs)))
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  y = torch.from_numpy(labels)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)

  def train():
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    optimizer.step()

  def infer():
    model.eval()
    with torch.inference_mode():
      model(x)

  out.update(train_s=_median_seconds(train, args.steps),
             inference_s=_median_seconds(infer, args.steps))
  return out


def _run_worker(python: str, framework: str, args, dump: str) -> dict:
  command = [python, os.path.abspath(__file__), '--worker', framework,
             '--depth', str(args.depth), '--width', str(args.width), '--batch', str(args.batch),
             '--size', str(args.size), '--steps', str(args.steps), '--dump', dump]
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
  if result.returncode:
    raise RuntimeError(f'The {framework} worker failed ({" ".join(command)}):\n'
                       f'{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--torch_python', default='',
                      help='an interpreter with torch and numpy (required unless --worker)')
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--width', type=int, default=1)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--json', default='', help='also write the rounds to this file')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--dump', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps((jax_worker if args.worker == 'jax' else torch_worker)(args)))
    return
  if not args.torch_python:
    parser.error('--torch_python is required: an interpreter with torch installed.')

  rounds = []
  for r in range(args.rounds):
    with tempfile.TemporaryDirectory() as tmp:
      dump = tmp if r == 0 else ''
      jax_row = _run_worker(sys.executable, 'jax', args, dump)
      torch_row = _run_worker(args.torch_python, 'torch', args, dump)
    rounds.append({'jax': jax_row, 'torch': torch_row})
    if r == 0:
      print(f"# same weights and images: largest logit difference "
            f"{torch_row['max_logit_difference']:.2e} (largest logit {torch_row['max_logit']:.2f})")
    print(f"# round {r + 1}: " + json.dumps(rounds[-1]), flush=True)

  print(f'# {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
        f"jax {rounds[0]['jax']['version']}, torch {rounds[0]['torch']['version']} "
        f"({rounds[0]['torch']['threads']} threads); BiT-R{args.depth}x{args.width}, "
        f'{args.size} px, batch {args.batch}, float32; {args.rounds} rounds of '
        f'{args.steps} steps')
  print('| mode | cxr_jax img/s | PyTorch img/s | ratio (median, range) |')
  print('|---|---|---|---|')
  for mode in ('train', 'inference'):
    jax_rate = [args.batch / r['jax'][f'{mode}_s'] for r in rounds]
    torch_rate = [args.batch / r['torch'][f'{mode}_s'] for r in rounds]
    ratios = [a / b for a, b in zip(jax_rate, torch_rate)]
    print(f'| {mode} | {np.median(jax_rate):.2f} | {np.median(torch_rate):.2f} | '
          f'**{np.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'rounds': rounds}, f, indent=1)


if __name__ == '__main__':
  main()
