"""The whole three-stage recipe, in miniature, on generated data: the README's main job.

  1. generic  supervised pretraining of a small BiT on `synthetic_natural`;
  2. cxr      CXR pretraining of that network on `synthetic_cxr` site A with a sigmoid
              loss on the 7 findings mined from its reports by the project's labeler
              (cxr_jax/text/labeler.py; configs/supervised_cxr.py): noisy labels, as the
              published CXR network's were, and another scanner than site B's;
  3. study    on one finding at site B (another scanner, clean labels): linear and MLP
              probes on the generic and the CXR embeddings at 10, 45, 100 and 500 labels
              beside a linear probe on the raw pixels (the baseline to beat); full
              fine-tuning and LP-FT from the CXR network and training from scratch at 45
              and 500; a SavedModel of the CXR network; and WORKDIR/study/report.md with
              the AUROC table, the label-efficiency factor, the data-efficiency plot,
              t-SNE maps and kNN separation before and after CXR pretraining, and what
              came out for the published claims.

Why not SupCon, the published objective (configs/supcon_cxr.py), for stage 2: at this
scale (a 4,000-film site, batch 64, minutes of CPU) SupCon with report-mined
normal/abnormal positives left the site-B probes where the generic network had them
(its cosines collapse together; BENCHMARKS.md, "What the networks learn against raw
pixels"), while the sigmoid loss on the same reports' findings learns what the finding
looks like. The task's own finding is one of the seven, with site A's report errors.

The datasets are generated into WORKDIR/tensorflow_datasets first. Each stage runs in
WORKDIR/<stage> with its own recipe (configs/supervised_natural.py, supervised_cxr.py,
transfer_study.py) and resumes if the command is run again. Images are rendered at 32
px and upsampled to 64 for the CXR network (so BiT's stride-4 root keeps 14x14
positions); findings have severity 0.8 to 1 only (`severity_range`; the full range is
0 to 1), and positioning, size and exposure vary twice as widely as the generator's
default (`variability`), so that raw pixels stop being a strong classifier. The whole
job took 11 min 9 s on an idle 2-core CPU (2026-12-04; README).

  python -m cxr_jax.main --config configs/quickstart.py --workdir runs/quickstart

`--config.stages.cxr.total_steps=...` and the like override any stage's field.
"""

import os

import ml_collections

from cxr_jax.train import config_lib

FINDING = 'airspace_opacity'  # The downstream task (site B's true labels).
SEVERITY = (0.8, 1.0)
# Positioning, size, exposure and tone spread twice as wide as the generator's default:
# at 1 a linear model on raw pixels reads the finding about as well as any network can
# (BENCHMARKS.md, "What the networks learn against raw pixels").
VARIABILITY = 2.0


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
          'severity_range': SEVERITY, 'variability': VARIABILITY, 'mine_labels': True}},
      'site_b': {'kind': 'cxr', 'args': {
          'site': 'B', 'image_size': 32, 'num_examples': 4000, 'label_noise': 0.0,
          'severity_range': SEVERITY, 'variability': VARIABILITY}},
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

  cxr = _recipe('supervised_cxr.py')
  cxr.init.workdir = '@generic'
  cxr.data.name, cxr.data.data_dir = '@site_a', '@data_dir'
  cxr.log_every = 50

  study = _recipe('transfer_study.py')
  study.networks = ml_collections.ConfigDict({'cxr': '@cxr', 'generic': '@generic'})
  study.data.name, study.data.data_dir = '@site_b', '@data_dir'
  study.data.finding = FINDING
  # Every network is embedded, and fine-tuned, as the CXR stage saw its images
  # (upsampled, 56-px crop).
  study.pp_eval = cxr.data.pp_eval
  study.finetune.pp = _recipe('finetune_cxr.py').data.pp
  study.finetune.networks = ('cxr', 'scratch')
  # 6 fine-tuning runs instead of 12: they are most of the study's time.
  study.finetune.budgets = (45, 500)

  c.stages = ml_collections.ConfigDict({'generic': generic, 'cxr': cxr, 'study': study})
  return c
