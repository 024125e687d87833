"""Can a network learn a synthetic finding better than a linear model on its raw pixels?

The sanity check under the quickstart's claims (issue 13): on one synthetic site, the
raw-pixel baseline (logistic regression on windowed, area-downsampled images) at label
budgets and on all labels, against a network trained from scratch on all labels with
the project's trainer step. If the network cannot beat the pixels with every label,
no pretraining recipe will make its embedding beat them with a few.

  python benchmarks/learnability.py                                  # quickstart's world
  python benchmarks/learnability.py --variability 2.5                # more positioning spread
  python benchmarks/learnability.py --opacity_texture 1              # mottled opacities
  python benchmarks/learnability.py --steps 400 --crop 56 \\
      --pp "decode|resize(64)|window|random_crop(56)|flip_lr|value_range(-1, 1, 0, 1)|rgb" \\
      --pp_eval "decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb"

Data: `synthetic.generate_cxr` for --site (true labels, no report noise), split by a
hash of the patient id into 70 % train, 10 % validation, 20 % test. Pixels: sizes 8
and 16, L2 strength (scikit-learn's C) chosen on validation per budget and draw, 3
draws per budget. Network: --model from scratch, AdamW with cosine decay, --steps at
batch 64, sigmoid loss on --finding; test AUROC printed four times during training.
"""

import argparse
import functools
import json
import multiprocessing
import time
import zlib

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_jax.data import synthetic
from cxr_jax.data import transforms
from cxr_jax.train import config_lib
from cxr_jax.train import optimizers
from cxr_jax.train import trainer


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--site', default='B')
  p.add_argument('--num_examples', type=int, default=4000)
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--severity', type=float, nargs=2, default=(0.8, 1.0))
  p.add_argument('--variability', type=float, default=1.0)
  p.add_argument('--opacity_texture', type=float, default=0.0)
  p.add_argument('--finding', default='airspace_opacity')
  p.add_argument('--model', default='bit-tiny')
  p.add_argument('--steps', type=int, default=800, help='network steps; 0 = pixels only')
  p.add_argument('--learning_rate', type=float, default=3e-3)
  p.add_argument('--crop', type=int, default=28)
  p.add_argument('--pp', default='decode|window|random_crop(28)|flip_lr|value_range(-1, 1, 0, 1)|rgb')
  p.add_argument('--pp_eval', default='decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb')
  return p.parse_args()


def _render(index, args):
  e = synthetic.generate_cxr(index, site=args.site, image_size=args.size, label_noise=0.0,
                             severity_range=tuple(args.severity), variability=args.variability,
                             opacity_texture=args.opacity_texture)
  return e['image'], e['true_labels'], e['patient_id']


def generate(args):
  with multiprocessing.get_context('fork').Pool() as pool:
    out = pool.map(functools.partial(_render, args=args), range(args.num_examples), chunksize=64)
  images, labels, patients = zip(*out)
  bucket = np.array([zlib.crc32(p.encode()) % 100 for p in patients])
  splits = {'train': np.flatnonzero(bucket < 70),
            'validation': np.flatnonzero((bucket >= 70) & (bucket < 80)),
            'test': np.flatnonzero(bucket >= 80)}
  y = np.stack(labels)[:, synthetic.CXR_FINDINGS.index(args.finding)].astype(np.int32)
  return np.stack(images), y, splits


def pixels(images, size):
  x = images.reshape(len(images), images.shape[1], images.shape[2]).astype(np.float32)
  lo = np.percentile(x, 0.5, axis=(1, 2), keepdims=True)
  hi = np.percentile(x, 99.5, axis=(1, 2), keepdims=True)
  x = np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
  return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
                   for im in x]).reshape(len(x), -1)


def _fit_score(x_train, y_train, x_test, y_test, c):
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  model = LogisticRegression(C=c, max_iter=2000).fit((x_train - mean) / std, y_train)
  return roc_auc_score(y_test, model.decision_function((x_test - mean) / std))


def pixel_curve(features, y, splits, budgets=(10, 45, 100, 500, 'all'), draws=3,
                cs=(0.001, 0.01, 0.1, 1.0)):
  """{budget: (mean, min, max)} test AUROC; C chosen on validation."""
  train, val, test = splits['train'], splits['validation'], splits['test']
  out = {}
  for budget in budgets:
    scores = []
    for draw in range(1 if budget == 'all' else draws):
      rng = np.random.default_rng([0, draw])
      index = train
      while budget != 'all':  # Both classes in the draw.
        index = rng.choice(train, budget, replace=False)
        if 0 < y[index].sum() < budget:
          break
      best = max(cs, key=lambda c: _fit_score(features[index], y[index], features[val],
                                               y[val], c))
      scores.append(_fit_score(features[index], y[index], features[test], y[test], best))
    out[str(budget)] = [round(float(f(scores)), 3) for f in (np.mean, np.min, np.max)]
  return out


def train_network(args, images, y, splits):
  c = config_lib.base_config()
  c.trainer, c.finetune.mode, c.model_name = 'finetune', 'full', args.model
  c.head.num_classes, c.init_image_size = 1, args.crop
  c.total_steps, c.batch_size = args.steps, 64
  c.optimizer.name, c.optimizer.learning_rate = 'adamw', args.learning_rate
  c.optimizer.lr_reference_batch, c.optimizer.weight_decay = 0, 1e-4
  c.optimizer.schedule.name, c.optimizer.schedule.warmup_steps = 'cosine', args.steps // 10
  network = trainer.build_network(c)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(0))
  variables = trainer.initial_variables(network, c, init_rng)
  params = variables.pop('params')
  tx, _ = optimizers.make_optimizer(c.optimizer, params, c.total_steps, batch_size=c.batch_size)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'model_state': variables, 'rng': state_rng}
  step = jax.jit(trainer.make_train_step(network, c, tx))
  forward = jax.jit(lambda s, x: network.apply({'params': s['params'], **s['model_state']},
                                               x)[0][:, 0])
  pp, pp_eval = transforms.Preprocess(args.pp), transforms.Preprocess(args.pp_eval)
  rng = np.random.default_rng(0)
  test = splits['test']
  x_test = np.stack([pp_eval({'image': images[i]}, rng)['image'] for i in test])
  start, history = time.time(), []
  for i in range(args.steps):
    index = rng.choice(splits['train'], c.batch_size, replace=False)
    batch = {'image': np.stack([pp({'image': images[k]}, rng)['image'] for k in index]),
             'labels': y[index][:, None].astype(np.float32),
             'label_mask': np.ones((c.batch_size, 1), np.float32)}
    state, metrics = step(state, batch)
    if (i + 1) % max(args.steps // 4, 1) == 0:
      scores = np.concatenate([np.asarray(forward(state, x_test[j:j + 256]))
                               for j in range(0, len(x_test), 256)])
      history.append({'step': i + 1, 'train_loss': round(float(metrics['loss']), 3),
                      'test_auroc': round(float(roc_auc_score(y[test], scores)), 3),
                      'seconds': round(time.time() - start)})
      print(json.dumps(history[-1]), flush=True)
  return history


def main():
  args = parse_args()
  images, y, splits = generate(args)
  print(json.dumps({k: [len(v), int(y[v].sum())] for k, v in splits.items()}), flush=True)
  for size in (8, 16):
    print(json.dumps({f'pixels {size}x{size}': pixel_curve(pixels(images, size), y, splits)}),
          flush=True)
  if args.steps:
    train_network(args, images, y, splits)


if __name__ == '__main__':
  main()
