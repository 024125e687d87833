"""How much a SupCon recipe moves a generic network's embedding at CPU size.

  python benchmarks/supcon_recipe.py --generic runs/quickstart/generic          # quickstart's
  python benchmarks/supcon_recipe.py --generic DIR --lr 1e-3 --hidden 2048 --temperature 0.1 \\
      --size 48 --crop 40 --shift 4 --steps 300 --severity 0.5 1.0                 # older one

Searches for the quickstart's SupCon recipe run here rather than through the chain: the
data stay in memory, and the same process scores the embedding before and after.

- Data: `synthetic_cxr` sites A (report-mined labels, noise 0.1) and B (true labels)
  rendered by `synthetic.generate_cxr` at --size with --severity, windowed as the
  `window` op does; cached in --cache_dir.
- Training: SupCon (`losses.supcon_loss_mean`) with `abnormal` positives on site A,
  starting from --generic's backbone, AdamW with warmup and cosine decay. Each view is
  a --crop crop shifted by up to --shift pixels from the centre, then random gamma
  (0.7-1.4), contrast (0.75-1.25), brightness (+-0.08) and a little noise.
- Score: linear probes (scikit-learn logistic regression, C=0.1, standardised
  features) on the backbone embedding of site B's first 60 %, tested on the rest, for
  --finding and for `abnormal`, at 10, 45 and 100 labels (5 draws, each holding a
  positive and a negative) and all labels. Printed before and after training.
"""

import argparse
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_jax import models
from cxr_jax.data import synthetic
from cxr_jax.models import heads
from cxr_jax.train import losses
from cxr_jax.train import trainer


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--generic', required=True, help='workdir of the generic stage to start from')
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--crop', type=int, default=28)
  p.add_argument('--shift', type=int, default=2)
  p.add_argument('--severity', type=float, nargs=2, default=(0.8, 1.0))
  p.add_argument('--site_a', type=int, default=3000, help='site A images (training)')
  p.add_argument('--site_b', type=int, default=2000, help='site B images (probes)')
  p.add_argument('--finding', default='airspace_opacity')
  p.add_argument('--steps', type=int, default=1000)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--lr', type=float, default=3e-3)
  p.add_argument('--weight_decay', type=float, default=1e-4)
  p.add_argument('--hidden', type=int, default=256, help='projection head width')
  p.add_argument('--temperature', type=float, default=0.2)
  p.add_argument('--model', default='bit-tiny')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--cache_dir', default='/tmp/cxr_jax_supcon_recipe')
  p.add_argument('--json', default='', help='also write the scores to this file')
  return p.parse_args()


def window(image):
  image = image.astype(np.float32)
  lo, hi = np.percentile(image, (0.5, 99.5))
  return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def load_data(args):
  os.makedirs(args.cache_dir, exist_ok=True)
  low, high = args.severity
  path = os.path.join(args.cache_dir, f'{args.size}px_{low}-{high}_{args.site_a}_{args.site_b}.npz')
  if os.path.exists(path):
    return dict(np.load(path))
  data = {}
  for site, count, noise in (('a', args.site_a, 0.1), ('b', args.site_b, 0.0)):
    examples = [synthetic.generate_cxr(i, site=site.upper(), image_size=args.size,
                                       label_noise=noise, severity_range=(low, high))
                for i in range(count)]
    data[f'{site}_image'] = np.stack([window(e['image']) for e in examples])
    data[f'{site}_labels'] = np.stack([e['labels'] for e in examples])
    data[f'{site}_true'] = np.stack([e['true_labels'] for e in examples])
  np.savez(path, **data)
  return data


def to_model_input(images):
  return np.repeat((images * 2 - 1)[..., None], 3, -1).astype(np.float32)


def probe_scores(embeddings, labels_by_task):
  train = int(len(embeddings) * 0.6)
  mean, std = embeddings[:train].mean(0), embeddings[:train].std(0) + 1e-6
  x_train, x_test = (embeddings[:train] - mean) / std, (embeddings[train:] - mean) / std
  scores = {}
  for task, y in labels_by_task.items():
    y_train, y_test = y[:train], y[train:]
    for budget in (10, 45, 100, train):
      rng = np.random.default_rng(0)
      aurocs = []
      for _ in range(5 if budget < train else 1):
        must = [rng.choice(np.flatnonzero(y_train)), rng.choice(np.flatnonzero(1 - y_train))]
        rest = rng.choice(np.setdiff1d(np.arange(train), must), budget - 2, replace=False)
        index = np.concatenate([must, rest])
        clf = LogisticRegression(C=0.1, max_iter=3000).fit(x_train[index], y_train[index])
        aurocs.append(roc_auc_score(y_test, clf.decision_function(x_test)))
      scores[f'{task}@{"all" if budget == train else budget}'] = round(float(np.mean(aurocs)), 3)
  return scores


def main():
  args = parse_args()
  data = load_data(args)
  findings = list(synthetic.CXR_FINDINGS)
  tasks = {args.finding: data['b_true'][:, findings.index(args.finding)].astype(int),
           'abnormal': data['b_true'].any(1).astype(int)}
  offset = (args.size - args.crop) // 2
  centre = lambda x: x[:, offset:offset + args.crop, offset:offset + args.crop]

  network = heads.Network(models.get_model(args.model, num_classes=None),
                          heads.ProjectionHead(hidden=args.hidden))
  variables = flax.core.unfreeze(jax.jit(lambda r: network.init(
      r, jnp.zeros((1, args.crop, args.crop, 3)), train=False))(jax.random.PRNGKey(args.seed)))
  for collection, tree in trainer.variables_from_workdir(args.generic)['backbone'].items():
    variables[collection]['backbone'] = tree
  params = variables.pop('params')
  model_state = variables

  embed_fn = jax.jit(lambda p, s, x: network.apply({'params': p, **s}, x)[1]['embedding'])

  def embedding_scores(p, s):
    images = data['b_image']
    out = [np.asarray(embed_fn(p, s, to_model_input(centre(images[i:i + 256]))))
           for i in range(0, len(images), 256)]
    return probe_scores(np.concatenate(out), tasks)

  results = {'args': vars(args), 'before': embedding_scores(params, model_state)}
  print('before', json.dumps(results['before']), flush=True)

  schedule = optax.warmup_cosine_decay_schedule(0, args.lr, max(1, args.steps // 10), args.steps)
  tx = optax.adamw(schedule, weight_decay=args.weight_decay)
  opt_state = tx.init(params)

  def loss_fn(p, s, images, weights):
    (z, _), new_state = network.apply({'params': p, **s}, images, train=True,
                                      mutable=['batch_stats'])
    z = z.reshape(2, len(weights), -1).transpose(1, 0, 2)  # [N, 2 views, D]
    loss, stats = losses.supcon_loss_mean(z, weights, args.temperature)
    return loss, (new_state, stats)

  @jax.jit
  def step(p, s, o, images, weights):
    (loss, (new_state, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        p, s, images, weights)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), {**s, **new_state}, o, loss, stats

  rng = np.random.default_rng(args.seed)

  def views(images):
    n = len(images)
    shifts = rng.integers(-args.shift, args.shift + 1, (n, 2)) + offset
    out = np.stack([im[dy:dy + args.crop, dx:dx + args.crop]
                    for im, (dy, dx) in zip(images, shifts)])
    out = out ** np.exp(rng.uniform(np.log(0.7), np.log(1.4), (n, 1, 1)))
    mean = out.mean((1, 2), keepdims=True)
    out = (out - mean) * rng.uniform(0.75, 1.25, (n, 1, 1)) + mean
    out += rng.uniform(-0.08, 0.08, (n, 1, 1))
    out += rng.normal(0, 0.03, out.shape) * rng.uniform(0, 1, (n, 1, 1))
    return np.clip(out, 0, 1)

  abnormal = (data['a_labels'] == synthetic.POSITIVE).any(1).astype(np.float32)
  start = time.time()
  for i in range(args.steps):
    index = rng.choice(len(abnormal), args.batch, replace=False)
    batch = data['a_image'][index]
    images = to_model_input(np.concatenate([views(batch), views(batch)]))
    weights = losses.positive_weights(abnormal[index], 'same_label')
    params, model_state, opt_state, loss, stats = step(params, model_state, opt_state,
                                                       images, weights)
    if i % 100 == 0 or i == args.steps - 1:
      print(f'step {i + 1}: loss {float(loss):.3f}, positive cosine '
            f'{float(stats["positive_similarity"]):.3f}, negative cosine '
            f'{float(stats["negative_similarity"]):.3f}, {time.time() - start:.0f} s', flush=True)
  results['after'] = embedding_scores(params, model_state)
  results['train_seconds'] = time.time() - start
  print('after ', json.dumps(results['after']), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
