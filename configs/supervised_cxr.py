"""CXR pretraining with a sigmoid loss on the findings mined from `synthetic_cxr/site_a`'s reports.

The supervised alternative to SupCon (configs/supcon_cxr.py) for stage 2: one sigmoid
output per finding the report labeler found (CheXpert-style labels, with the reports'
own errors), uncertain mentions left out of the loss. It is the quickstart's CXR stage:
at CPU scale SupCon on mined labels does not move the embedding (BENCHMARKS.md, "What
the networks learn against raw pixels"), this loss does. Start from a generic stage with
`--config.init.workdir=runs/natural`; `--config.data.findings` picks the findings (and
`--config.head.num_classes` must match their number).

Images are upsampled from the 32-px render to 64 before a 56-px crop: BiT's stride-4
root leaves the first stage 14x14 positions instead of 7x7, which is what lets the
network beat a linear model on the raw pixels at this size (BENCHMARKS.md).

Data: `python -m cxr_jax.data.build synthetic_cxr/site_a --data_dir ~/tensorflow_datasets`.
Hardware: a laptop CPU; about 0.25 s per step at batch 64 on 2 cores.

  python -m cxr_jax.main --config configs/supervised_cxr.py --workdir runs/cxr \\
      --config.init.workdir=runs/natural
"""

from cxr_jax.data.synthetic import sampling
from cxr_jax.train import config_lib


def get_config():
  c = config_lib.base_config()
  c.trainer = 'supervised'
  c.model_name = 'bit-tiny'
  c.total_steps = 1500
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_a'
  c.data.findings = sampling.CXR_FINDINGS
  c.head.num_classes = len(sampling.CXR_FINDINGS)
  c.head.bias_init = -2.0  # Most findings are rare: start near their prevalence.
  # Views differ as scanners do (tone curve, contrast, exposure) and by a small shift.
  c.data.pp = ('decode|resize(64)|window|random_crop(56)|gamma(0.7, 1.4)'
               '|contrast(0.75, 1.25)|brightness(0.08)|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.init_image_size = 56
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.lr_reference_batch = 0
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 100
  return c
