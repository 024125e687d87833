"""How much a SupCon stage at the quickstart's scale moves a generic network's embedding.

  python benchmarks/supcon_recipe.py --generic runs/quickstart/generic      # the quickstart's
  python benchmarks/supcon_recipe.py --generic runs/quickstart/generic --severity 0 1 \\
      --set optimizer.learning_rate=1e-3 head.projection_hidden=2048 loss.temperature=0.1 \\
      total_steps=400 optimizer.schedule.warmup_steps=40 \\
      "data.pp=decode|window|two_views|inception_crop(28, area_min=50)|affine|contrast|flip_lr|value_range(-1, 1, 0, 1)|rgb"
                                       # the quickstart's recipe before session 4

The SupCon recipe the quickstart's `cxr` stage ran until session 9 (configs/supcon_cxr.py
with the settings in QUICKSTART_SUPCON; `--set KEY=VALUE` overrides them) run in memory instead of through the chain, so that recipes can be compared in
minutes and the same process scores the embedding before and after:

- Data: `synthetic_cxr` sites A (report-mined labels, noise 0.1) and B (true labels) at
  --size px with --severity, rendered by `synthetic.generate_cxr` and cached in
  --cache_dir. Site A trains; batches are drawn at random, with the stage's `data.pp`
  and `abnormal` as the pipeline derives it, and the findings' `labels`/`label_mask`
  (uncertain codes masked, unmentioned negative) for the finding-based positives
  (`--set loss.positives=jaccard` or `any_shared`).
- Training: the trainer's own network, initialisation from --generic, optimizer and
  train step (`trainer.build_network`, `initial_variables`, `make_train_step`).
- Score: linear probes (scikit-learn logistic regression, C=0.1, standardised
  features) on the backbone embedding (`data.pp_eval`) of site B's first 60 %, tested on
  the rest, for --finding and for `abnormal` (true labels), at 10, 45 and 100 labels
  (5 draws, each holding a positive and a negative) and all labels. Printed before
  and after training.
"""

import argparse
import ast
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import synthetic
from cxr_jax.data import transforms
from cxr_jax.train import config_lib
from cxr_jax.train import optimizers
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--generic', required=True, help='workdir of the generic stage to start from')
  p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                 help='overrides of QUICKSTART_SUPCON and configs/supcon_cxr.py')
  p.add_argument('--size', type=int, default=32)
  p.add_argument('--severity', type=float, nargs=2, default=(0.8, 1.0))
  p.add_argument('--site_a', type=int, default=3000, help='site A images (training)')
  p.add_argument('--site_b', type=int, default=2000, help='site B images (probes)')
  p.add_argument('--finding', default='airspace_opacity')
  p.add_argument('--cache_dir', default='/tmp/cxr_jax_supcon_recipe')
  p.add_argument('--json', default='', help='also write the scores to this file')
  return p.parse_args()


# The quickstart's SupCon stage before its CXR stage became a sigmoid loss on the mined
# findings (configs/supervised_cxr.py), which the numbers in BENCHMARKS.md measured.
QUICKSTART_SUPCON = {
    'total_steps': 1000, 'loss.positives': 'abnormal', 'loss.temperature': 0.2,
    'data.pp': ('decode|window|two_views|random_crop(28)|gamma(0.7, 1.4)'
                '|contrast(0.75, 1.25)|brightness(0.08)|value_range(-1, 1, 0, 1)|rgb'),
    'data.pp_eval': 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb',
    'init_image_size': 28, 'optimizer.name': 'adamw', 'optimizer.learning_rate': 3e-3,
    'optimizer.lr_reference_batch': 0, 'optimizer.weight_decay': 1e-4,
    'optimizer.schedule.warmup_steps': 100, 'head.projection_hidden': 256,
}


def stage_config(generic: str, overrides):
  """QUICKSTART_SUPCON from `generic`, with KEY=VALUE `overrides` of its fields."""
  values = dict(QUICKSTART_SUPCON, **{'init.workdir': generic})
  for item in overrides:
    key, _, text = item.partition('=')
    try:
      values[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      values[key] = text
  return config_lib.load(os.path.join(REPO, 'configs', 'supcon_cxr.py'), values)


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
    data[f'{site}_image'] = np.stack([e['image'] for e in examples])
    data[f'{site}_labels'] = np.stack([e['labels'] for e in examples])
    data[f'{site}_true'] = np.stack([e['true_labels'] for e in examples])
  np.savez(path, **data)
  return data


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
  config = stage_config(args.generic, args.set)
  data = load_data(args)
  findings = list(synthetic.CXR_FINDINGS)
  tasks = {args.finding: data['b_true'][:, findings.index(args.finding)].astype(int),
           'abnormal': data['b_true'].any(1).astype(int)}
  abnormal = labels_lib.derive_abnormal(data['a_labels'], findings).astype(np.float32)
  codes = data['a_labels']
  finding_labels = (codes == labels_lib.POSITIVE).astype(np.float32)
  finding_mask = (codes != labels_lib.UNCERTAIN).astype(np.float32)

  network = trainer.build_network(config)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = trainer.initial_variables(network, config, init_rng)
  params = variables.pop('params')
  tx, _ = optimizers.make_optimizer(config.optimizer, params, config.total_steps,
                                    batch_size=config.batch_size)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'model_state': variables, 'rng': state_rng}
  train_step = jax.jit(trainer.make_train_step(network, config, tx))

  pp_train = transforms.Preprocess(config.data.pp)
  pp_eval = transforms.Preprocess(config.data.pp_eval)
  rng = np.random.default_rng(config.seed)
  eval_images = np.stack([pp_eval({'image': im}, rng)['image'] for im in data['b_image']])
  embed = jax.jit(lambda s, x: network.apply({'params': s['params'], **s['model_state']},
                                             x)[1]['embedding'])

  def embedding_scores(s):
    out = [np.asarray(embed(s, eval_images[i:i + 256])) for i in range(0, len(eval_images), 256)]
    return probe_scores(np.concatenate(out), tasks)

  results = {'config': config.to_dict(), 'args': vars(args), 'before': embedding_scores(state)}
  print('before', json.dumps(results['before']), flush=True)
  start = time.time()
  for i in range(config.total_steps):
    index = rng.choice(len(abnormal), config.batch_size, replace=False)
    batch = {'image': np.stack([pp_train({'image': data['a_image'][k]}, rng)['image']
                                for k in index]),
             'abnormal': abnormal[index], 'labels': finding_labels[index],
             'label_mask': finding_mask[index]}
    state, metrics = train_step(state, batch)
    if i % 100 == 0 or i == config.total_steps - 1:
      print(f'step {i + 1}: loss {float(metrics["loss"]):.3f}, positive cosine '
            f'{float(metrics["positive_similarity"]):.3f}, negative cosine '
            f'{float(metrics["negative_similarity"]):.3f}, {time.time() - start:.0f} s',
            flush=True)
  results['train_seconds'] = time.time() - start
  results['after'] = embedding_scores(state)
  print('after ', json.dumps(results['after']), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1, default=str)


if __name__ == '__main__':
  main()
