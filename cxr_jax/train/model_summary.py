"""Trainer 'model_summary': builds the configured model and reports size, cost and outputs.

Nothing is trained; this checks a recipe's model (and its pretrained weights, if
any) before spending accelerator time on it.
"""

import json
import os

from absl import logging
import flax
import jax
import jax.numpy as jnp

from cxr_jax import models
from cxr_jax.train.registry import TRAINERS


def summarize(model, variables, image_size: int, batch_size: int = 1) -> dict:
  """Parameter counts, forward FLOPs (XLA's cost analysis) and output shapes."""
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  outputs = jax.eval_shape(forward, variables, images)
  cost = forward.lower(variables, images).cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # Older JAX returns one dict per computation.
    cost = cost[0] if cost else {}
  params = variables['params']
  logits, aux = outputs
  return {
      'parameters': sum(x.size for x in jax.tree.leaves(params)),
      'parameters_by_scope': {k: sum(x.size for x in jax.tree.leaves(v))
                              for k, v in params.items()},
      'state_variables': {c: sum(x.size for x in jax.tree.leaves(v))
                          for c, v in variables.items() if c != 'params'},
      'forward_gflops_per_image': float(cost.get('flops', float('nan'))) / batch_size / 1e9,
      'image_shape': list(images.shape[1:]),
      'logits_shape': None if logits is None else list(logits.shape),
      'embedding_shape': list(aux['embedding'].shape),
      'feature_shapes': {k: list(v.shape) for k, v in aux['features'].items()},
  }


@TRAINERS.register('model_summary')
def model_summary(config, workdir: str) -> dict:
  model = models.build_model(config)
  if config.init.weights:
    variables = models.load_pretrained(model, config.init.weights, head=config.init.head)
  else:  # Shapes are all a summary needs.
    variables = jax.eval_shape(lambda: models.weights.init_variables(model))
  summary = {'model_name': config.model_name, 'model': config.model.to_dict(),
             **summarize(model, flax.core.unfreeze(variables), config.input.image_size)}
  path = os.path.join(workdir, 'model_summary.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2, default=str)
  print(format_summary(summary))
  logging.info('Model summary written to %s', path)
  return summary


def format_summary(summary: dict) -> str:
  lines = [f"{summary['model_name']}  {summary['model']}",
           f"  parameters: {summary['parameters']:,}",
           f"  forward GFLOPs per {summary['image_shape']} image: "
           f"{summary['forward_gflops_per_image']:.3f}",
           f"  logits: {summary['logits_shape']}  embedding: {summary['embedding_shape']}"]
  for scope, count in summary['parameters_by_scope'].items():
    lines.append(f'    {scope:<16} {count:>14,}')
  for name, shape in summary['feature_shapes'].items():
    lines.append(f'  feature {name:<10} {shape}')
  return '\n'.join(lines)
