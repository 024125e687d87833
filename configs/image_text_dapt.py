"""Multimodal domain-adaptive pretraining: image-text pretraining continued on a new site.

Starts from an image-text run (`config.init.workdir`, default runs/image_text from
configs/image_text_cxr.py) and continues the same objective on another hospital's
images and reports: here `synthetic_cxr/site_b`, or your own data built as
`cxr_manifest/NAME` with a report column (`--config.data.name=cxr_manifest/NAME`).
Everything continues from that run: image tower, report encoder, projections and
temperature, so the tokenizer must be the run's own (`config.text.tokenizer`; the
vocabulary is part of the text tower). Afterwards, train the new site's tasks with
configs/finetune_cxr.py and `--config.init.workdir` of this run (linear probe, then
fine-tuning).

  python -m cxr_jax.data.build synthetic_cxr/site_b --data_dir ~/tensorflow_datasets
  python -m cxr_jax.main --config configs/image_text_dapt.py --workdir runs/image_text_dapt \\
      --config.init.workdir=runs/image_text

Sized for a CPU: a quarter of the pretraining schedule (about 18 minutes where
configs/image_text_cxr.py takes 70) at a third of its learning rate, so the new site
adapts the model rather than retraining it.
"""

from cxr_jax.train import config_lib
from cxr_jax.train import image_text


def get_config():
  c = image_text.add_config_fields(config_lib.base_config())
  c.trainer = 'image_text'
  c.model_name = 'bit-tiny'
  c.text.encoder = 'text-tiny'
  c.text.tokenizer = 'runs/tokenizer.json'  # The tokenizer of the run continued.
  c.text.max_len = 96
  c.init.workdir = 'runs/image_text'
  c.total_steps = 500
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_b'
  c.data.pp = (image_text.tokenize_op(c) + '|decode|resize(64)|window|inception_crop(56, '
               'area_min=50)|affine|contrast|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.head.embed_dim = 128  # Must match the run continued.
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-4
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.1
  c.optimizer.weight_decay_exclude = image_text.WEIGHT_DECAY_EXCLUDE
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 50
  return c
