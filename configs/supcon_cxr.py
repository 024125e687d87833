"""SupCon CXR pretraining on `synthetic_cxr/site_a` with its noisy report-mined labels.

Positives are images with the same normal/abnormal label (the CXR-network recipe);
`--config.loss.positives=any_shared` or `jaccard` use the findings instead. Start
from a generic stage with `--config.init.workdir=runs/natural`, or from published
BiT weights with `--config.init.weights=BiT-M-R50x1.npz --config.model_name=bit-r50x1`.
Continuing this stage on another site's data (domain-adaptive pretraining) is the
same recipe with `--config.data.name` of that site and `--config.init.workdir` of this run.

Data: `python -m cxr_jax.data.build synthetic_cxr/site_a --data_dir ~/tensorflow_datasets`.

  python -m cxr_jax.main --config configs/supcon_cxr.py --workdir runs/supcon
"""

from cxr_jax.train import config_lib


def get_config():
  c = config_lib.base_config()
  c.trainer = 'supcon'
  c.model_name = 'bit-tiny'
  c.total_steps = 2000
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_a'
  c.data.pp = ('decode|resize(64)|window|two_views|inception_crop(56, area_min=50)|affine'
               '|contrast|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.loss.positives = 'abnormal'
  c.loss.temperature = 0.1
  c.optimizer.name = 'lars'
  c.optimizer.learning_rate = 0.3  # 0.3 x batch / 256, as for SimCLR/SupCon with LARS.
  c.optimizer.lr_reference_batch = 256
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 100
  return c
