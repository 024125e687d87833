"""The image-only stages: supervised, supcon, simclr and finetune (with LP-FT).

  supervised  softmax CE on `label` (natural images), or masked sigmoid CE on
              `labels`/`label_mask` (CXR findings); linear head.
  supcon      supervised contrastive loss on two views; positives from `abnormal`,
              any shared finding, or Jaccard overlap (config.loss.positives);
              projection head, discarded afterwards.
  simclr      the same contrastive machinery with only the other view as positive.
  finetune    task training from a pretrained backbone, supervised loss;
              config.finetune.mode: linear (frozen backbone, linear head), mlp
              (frozen backbone, MLP head), full (everything trains, linear head) or
              lpft (a linear probe run, then full fine-tuning from it).

Image-text pretraining is its own stage module (image_text.py); both register with
`trainer.add_stage`.
"""

import os

import jax.numpy as jnp

from cxr_jax.models import networks
from cxr_jax.train import losses
from cxr_jax.train import trainer


def apply_network(network, params, model_state, inputs, rng, train: bool):
  """network.apply on `inputs` (a tuple): (output, aux, new model state).

  In training, collections besides params (batch statistics) are updated.
  """
  variables = {'params': params, **model_state}
  if train and model_state:
    (output, aux), new_state = network.apply(variables, *inputs, train=True,
                                             mutable=list(model_state), rngs={'dropout': rng})
    return output, aux, new_state
  output, aux = network.apply(variables, *inputs, train=train, rngs={'dropout': rng})
  return output, aux, model_state


def supervised_loss(network, config, params, model_state, batch, rng):
  logits, _, new_state = apply_network(network, params, model_state, (batch['image'],), rng,
                                       True)
  if 'label' in batch:  # Single-label classes (natural images); soft after mixup.
    per_example = losses.softmax_cross_entropy(
        logits, batch['label'], label_smoothing=config.loss.label_smoothing)
    loss = jnp.mean(per_example)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == (
        batch['label'] if batch['label'].ndim == 1 else jnp.argmax(batch['label'], -1)))
    return loss, (new_state, {'accuracy': accuracy})
  loss = losses.sigmoid_cross_entropy_mean(logits, batch['labels'], batch['label_mask'])
  return loss, (new_state, {})


def contrastive_loss(kind: str, config, features, batch):
  """(loss, stats) of SupCon ('supcon') or SimCLR ('simclr') on [B, 2, D] projections.

  SupCon takes its positives from config.loss.positives.
  """
  if kind == 'simclr':
    per_anchor, stats = losses.simclr_loss(features, temperature=config.loss.temperature)
    return losses.mean_over_valid(per_anchor, stats.pop('anchor_has_positive')), stats
  if config.loss.positives == 'abnormal':
    weights = losses.positive_weights(batch['abnormal'], 'same_label')
  else:
    weights = losses.positive_weights(batch['labels'], config.loss.positives,
                                      mask=batch.get('label_mask'))
  return losses.supcon_loss_mean(features, weights, temperature=config.loss.temperature,
                                 base_temperature=config.loss.base_temperature)


def _two_view_loss(kind: str, network, config, params, model_state, batch, rng):
  images = batch['image']
  if images.ndim != 5 or images.shape[1] != 2:
    raise ValueError(f'Contrastive stages need two views per image ([B, 2, H, W, C]); got '
                     f'{images.shape}. Put two_views in config.data.pp.')
  flat = images.reshape(-1, *images.shape[2:])
  projected, _, new_state = apply_network(network, params, model_state, (flat,), rng, True)
  features = projected.reshape(images.shape[0], 2, -1)
  loss, stats = contrastive_loss(kind, config, features, batch)
  return loss, (new_state, stats)


def supcon_loss(network, config, params, model_state, batch, rng):
  return _two_view_loss('supcon', network, config, params, model_state, batch, rng)


def simclr_loss(network, config, params, model_state, batch, rng):
  return _two_view_loss('simclr', network, config, params, model_state, batch, rng)


def finetune_phases(config, workdir: str):
  """LP-FT (Kumar et al., 2022): fit a linear head on the frozen backbone first, so that
  full fine-tuning starts from a good head and distorts the pretrained features less.

  The probe is its own run in WORKDIR/linear_probe (finetune.lp_steps steps, rate
  finetune.lp_learning_rate); fine-tuning then starts from its backbone and head. Each
  phase resumes on its own, so re-running the command continues wherever it stopped.
  Other modes are one run.
  """
  if config.finetune.mode != 'lpft':
    return [(config, workdir)]
  if config.finetune.lp_steps <= 0:
    raise ValueError('finetune.mode=lpft needs finetune.lp_steps > 0 (the probe phase).')
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    probe.finetune.mode = 'linear'
    probe.total_steps = config.finetune.lp_steps
    probe.optimizer.learning_rate = (config.finetune.lp_learning_rate
                                     or config.optimizer.learning_rate)
    probe.eval.best_metric = ''  # The fine-tuning phase keeps the best checkpoint.
  probe_dir = os.path.join(workdir, 'linear_probe')
  full = config.copy_and_resolve_references()
  with full.unlocked():
    full.finetune.mode = 'full'
    full.init.weights, full.init.workdir, full.init.head = '', probe_dir, True
  return [(probe, probe_dir), (full, workdir)]


trainer.add_stage('supervised', trainer.Stage(networks.classifier, supervised_loss))
trainer.add_stage('supcon', trainer.Stage(networks.contrastive, supcon_loss))
trainer.add_stage('simclr', trainer.Stage(networks.contrastive, simclr_loss))
trainer.add_stage('finetune', trainer.Stage(networks.finetune, supervised_loss,
                                            phases=finetune_phases))
