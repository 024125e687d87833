"""Generic supervised pretraining of a small BiT on `synthetic_natural` (CPU-sized).

Data: `python -m cxr_jax.data.build synthetic_natural --data_dir ~/tensorflow_datasets`.
Hardware: a laptop CPU; about 1 s per step at batch 64 on 2 cores.

  python -m cxr_jax.main --config configs/supervised_natural.py --workdir runs/natural
"""

from cxr_jax.train import config_lib


def get_config():
  c = config_lib.base_config()
  c.trainer = 'supervised'
  c.model_name = 'bit-tiny'
  c.head.num_classes = 100
  c.total_steps = 2000
  c.batch_size = 64
  c.data.name = 'synthetic_natural'
  c.data.pp = 'decode|inception_crop(48, area_min=40)|flip_lr|value_range(-1, 1)'
  c.data.pp_eval = 'decode|resize_small(56)|central_crop(48)|value_range(-1, 1)'
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.03  # BiT upstream: 0.03 per 256 images, scaled to the batch.
  c.optimizer.lr_reference_batch = 256
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 100
  return c
