"""The whole three-stage recipe, in miniature, on generated data: the README's main job.

  1. generic  supervised pretraining of a small BiT on `synthetic_natural`;
  2. cxr      SupCon CXR pretraining of that network on `synthetic_cxr` site A, with
              labels mined from its reports by the project's labeler
              (cxr_jax/text/labeler.py): positives are images the reports call
              abnormal (or normal) alike, the published CXR network's recipe;
  3. study    on one finding at site B (another scanner, clean labels), whose own label
              no pretraining stage used: linear and MLP probes on the generic and the
              CXR embeddings at 10, 45, 100 and 500 labels beside a linear probe on
              the raw pixels (the baseline to beat); full fine-tuning and LP-FT from
              the CXR network and training from scratch at 45 and 500; a SavedModel of
              the CXR network; and WORKDIR/study/report.md with the AUROC table, the
              data-efficiency plot, t-SNE maps before and after CXR pretraining, and what
              came out for the published claims.

The datasets are generated into WORKDIR/tensorflow_datasets first. Each stage runs in
WORKDIR/<stage> with its own recipe (configs/supervised_natural.py, supcon_cxr.py,
transfer_study.py) and resumes if the command is run again. Images are 32 px so that
the whole job runs in about 16 minutes on an idle 2-core CPU (meant to fit in 15; issue
13); at that size a subtle finding covers a fraction of a pixel, so the CXR sites draw
findings of severity 0.8 to 1 only (`severity_range`; the full range is 0 to 1).

  python -m cxr_jax.main --config configs/quickstart.py --workdir runs/quickstart

`--config.stages.cxr.total_steps=...` and the like override any stage's field.
"""

import os

import ml_collections

from cxr_jax.train import config_lib

FINDING = 'airspace_opacity'  # The downstream task; its label is unseen in pretraining.
SEVERITY = (0.8, 1.0)


def _recipe(name: str) -> ml_collections.ConfigDict:
  return config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))


def get_config():
  c = ml_collections.ConfigDict()
  c.trainer = 'chain'
  c.data_dir = ''  # '' = WORKDIR/tensorflow_datasets.
  c.synthetic = ml_collections.ConfigDict({
      'natural': {'kind': 'natural', 'args': {
          'num_classes': 10, 'image_size': 32, 'num_train': 6000, 'num_test': 500}},
      # Site A's labels are mined from its reports by cxr_jax.text.labeler, as the
      # published CXR network's were; label_noise is how often the report itself errs.
      'site_a': {'kind': 'cxr', 'args': {
          'site': 'A', 'image_size': 32, 'num_examples': 4000, 'label_noise': 0.1,
          'severity_range': SEVERITY, 'mine_labels': True}},
      'site_b': {'kind': 'cxr', 'args': {
          'site': 'B', 'image_size': 32, 'num_examples': 4000, 'label_noise': 0.0,
          'severity_range': SEVERITY}},
  })
  c.order = ('generic', 'cxr', 'study')

  generic = _recipe('supervised_natural.py')
  generic.head.num_classes = 10
  generic.total_steps = 400
  generic.data.name, generic.data.data_dir = '@natural', '@data_dir'
  generic.data.pp = 'decode|random_crop(28)|flip_lr|value_range(-1, 1)'
  generic.data.pp_eval = 'decode|central_crop(28)|value_range(-1, 1)'
  generic.init_image_size = 28
  generic.optimizer.learning_rate = 0.1
  generic.optimizer.lr_reference_batch = 0
  generic.optimizer.schedule.warmup_steps = 40
  generic.eval.every, generic.eval.split = 400, 'test'
  generic.log_every = 20

  cxr = _recipe('supcon_cxr.py')
  cxr.total_steps = 1000
  cxr.init.workdir = '@generic'
  cxr.data.name, cxr.data.data_dir = '@site_a', '@data_dir'
  # The published CXR network's positives: the report's normal/abnormal. The task
  # finding's own label is never used; it is one of the abnormalities SupCon groups.
  cxr.loss.positives = 'abnormal'
  # Views differ as scanners do (tone curve, contrast, exposure) and by a small shift,
  # but are not cropped apart: at 32 px a crop can cut the finding out of one view.
  cxr.data.pp = ('decode|window|two_views|random_crop(28)|gamma(0.7, 1.4)'
                 '|contrast(0.75, 1.25)|brightness(0.08)|value_range(-1, 1, 0, 1)|rgb')
  cxr.data.pp_eval = 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'
  cxr.init_image_size = 28
  # LARS at this small batch and model collapsed every embedding onto one direction
  # (all similarities -> 0.99, loss at its uniform value); AdamW trains steadily. At
  # 1e-3 with the default 2048-wide projection head, T = 0.1 and cropped views, 400
  # steps left the embedding the probes use where it was; 3e-3, a 256-wide head,
  # T = 0.2 and the views above over 1000 steps raised a site-B airspace-opacity linear
  # probe at 100 labels from 0.57 to 0.62 (severity 0.8-1; changed together, not one at
  # a time; benchmarks/supcon_recipe.py, BENCHMARKS.md).
  cxr.optimizer.name = 'adamw'
  cxr.optimizer.learning_rate = 3e-3
  cxr.optimizer.lr_reference_batch = 0
  cxr.optimizer.weight_decay = 1e-4
  cxr.optimizer.schedule.warmup_steps = 100
  cxr.head.projection_hidden = 256
  cxr.loss.temperature = 0.2
  cxr.eval.every = 1000
  cxr.log_every = 50

  study = _recipe('transfer_study.py')
  study.networks = ml_collections.ConfigDict({'cxr': '@cxr', 'generic': '@generic'})
  study.data.name, study.data.data_dir = '@site_b', '@data_dir'
  study.data.finding = FINDING
  study.finetune.networks = ('cxr', 'scratch')
  # 6 fine-tuning runs instead of 12: they were half the study's time (about 25 s each).
  study.finetune.budgets = (45, 500)

  c.stages = ml_collections.ConfigDict({'generic': generic, 'cxr': cxr, 'study': study})
  return c
