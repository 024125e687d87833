"""Domain-adaptive pretraining (DAPT): continue contrastive pretraining on a new site's data.

A CXR network pretrained at one hospital meets another hospital's scanners and
patients. Before training that site's tasks, continue the contrastive stage on its
images: this recipe starts from an earlier CXR run's workdir (`config.init.workdir`,
default runs/supcon from configs/supcon_cxr.py), backbone AND projection head, so the
loss resumes where that run ended, and trains on `synthetic_cxr/site_b`, or your own
images built as `cxr_manifest/NAME` (`--config.data.name=cxr_manifest/NAME`). The
argument picks the objective:

  configs/dapt_cxr.py:supcon   SupCon with the site's normal/abnormal labels (default)
  configs/dapt_cxr.py:simclr   SimCLR: no labels needed, for a site without them

Afterwards train the site's tasks from this run: configs/finetune_cxr.py with
`--config.init.workdir=runs/dapt`.

Sized for a CPU like configs/supcon_cxr.py (bit-tiny, 56 px views, batch 64): a
quarter of its schedule (500 steps) at a third of its learning rate, so the network
adapts to the site rather than being retrained. Measured: about 5 s per step (13
images/s) on a 2-core x86-64 CPU shared with other jobs (load average 12), so about
40 minutes for the run there; less on an idle machine. On the full-scale network use
configs/supcon_chexpert.py's settings with this init and data. A k-nearest-neighbour
AUROC of the embedding on the site's validation split is measured every 100 steps;
the best checkpoint is kept.

Data: `python -m cxr_jax.data.build synthetic_cxr/site_b --data_dir ~/tensorflow_datasets`.

  python -m cxr_jax.main --config configs/dapt_cxr.py:supcon --workdir runs/dapt \\
      --config.init.workdir=runs/supcon
"""

from cxr_jax.train import config_lib

OBJECTIVES = ('supcon', 'simclr')


def get_config(objective: str = 'supcon'):
  objective = objective or 'supcon'
  if objective not in OBJECTIVES:
    raise ValueError(f'configs/dapt_cxr.py:{objective}: the argument is the contrastive '
                     f'objective, one of {list(OBJECTIVES)}.')
  c = config_lib.base_config()
  c.trainer = objective
  c.model_name = 'bit-tiny'  # Must be the continued run's.
  c.init.workdir = 'runs/supcon'
  c.init.head = True  # Continue the projection head too (both objectives use one).
  c.total_steps = 500
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_b'
  c.data.pp = ('decode|resize(64)|window|two_views|inception_crop(56, area_min=50)|affine'
               '|contrast|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.loss.positives = 'abnormal'  # supcon only.
  c.loss.temperature = 0.1
  c.optimizer.name = 'lars'
  c.optimizer.learning_rate = 0.1  # Per 256 examples; configs/supcon_cxr.py uses 0.3.
  c.optimizer.lr_reference_batch = 256
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 25
  c.eval.every = 100
  c.eval.split = 'validation'
  c.eval.best_metric = 'knn_auroc_mean'
  return c
