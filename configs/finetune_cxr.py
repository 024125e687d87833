"""Task training on a held-out site: probe or fine-tune a pretrained CXR backbone.

`--config.finetune.mode` picks linear (frozen backbone + linear head), mlp (frozen
backbone + the [512, 256] MLP head) or full fine-tuning. Start from a SupCon run with
`--config.init.workdir=runs/supcon`. Site B's labels are radiologist-grade (no report
mining noise, unlike site A); `--config.data.findings` picks the tasks.

Data: `python -m cxr_jax.data.build synthetic_cxr/site_b --data_dir ~/tensorflow_datasets`.

  python -m cxr_jax.main --config configs/finetune_cxr.py --workdir runs/probe \\
      --config.init.workdir=runs/supcon --config.finetune.mode=linear
"""

from cxr_jax.train import config_lib


def get_config():
  c = config_lib.base_config()
  c.trainer = 'finetune'
  c.finetune.mode = 'linear'
  c.model_name = 'bit-tiny'
  c.total_steps = 500
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_b'
  c.data.pp = 'decode|resize(64)|window|random_crop(56)|flip_lr|value_range(-1, 1, 0, 1)|rgb'
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.data.label_policy.uncertain = 'ignore'
  c.head.num_classes = 7  # One sigmoid output per finding of synthetic_cxr.
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 20
  return c
