"""The CXR network with an EfficientNet backbone: SupCon on CheXpert at the variant's resolution.

The same recipe as configs/supcon_chexpert.py (abnormal-label positives, temperature
0.1, LARS at 0.3 per 256 with weight decay 1e-6, cosine decay, 10,000 updates of 1024
images), with an EfficientNet from the published Keras ImageNet weights. The argument
picks the variant, b0 (default) to b7, and with it the resolution EfficientNet was
designed for (`cxr_jax.models.efficientnet.RESOLUTION`: 224, 240, 260, 300, 380, 456,
528, 600 px):

  configs/efficientnet_supcon_cxr.py:b0
  configs/efficientnet_supcon_cxr.py:b3
  configs/efficientnet_supcon_cxr.py:b7

EfficientNet takes pixel values in [0, 255] and normalises them itself. Views are
random crops of 50-100% of the film resized to the variant's resolution.
The CXR builders store images of at most 512 px; for b6 and b7 build the data at
higher resolution (`--max_side 1024`, read as `cxr_chexpert/full_1024`) and pass
`--config.data.name=cxr_chexpert/full_1024`. `--config.data.name=mimic_cxr/chexpert`
trains on MIMIC-CXR instead.

Weights: the published Keras application files (`efficientnetb0_notop.h5` ...
`efficientnetb7_notop.h5`, what `keras.applications.EfficientNetB0(weights='imagenet',
include_top=False)` downloads to ~/.keras/models), by default in weights/
(`--config.init.weights=PATH`; a `.weights.h5` saved by Keras 3 reads too).

Large batch on few devices: the effective batch is 1024 = batch_size x
optimizer.accumulate_steps, with more accumulation for the larger variants (b0-b2:
4 batches of 256; b3: 8 of 128; b4: 16 of 64; b5, b6: 32 of 32; b7: 64 of 16), sized
for about 8 accelerators and not measured; change accumulate_steps to fit yours
(batch_size and the step counts follow). BatchNorm statistics and the contrastive
loss then see one batch of that size, so for b5-b7 more devices (and
`--config.mesh.fsdp`) serve better than accumulation.

Data: `python -m cxr_jax.data.build cxr_chexpert/full --data_dir ~/tensorflow_datasets
--manual_dir ~/data/CheXpert-v1.0`.

Hardware and time (estimated from FLOPs, not measured): forward GFLOPs per view
(XLA count) are 0.8 (b0), 3.8 (b3), 21 (b5), 78 (b7); a training image costs six
times that (two views, forward and backward), so 10.2M images are about 5e16 (b0),
2.3e17 (b3), 1.3e18 (b5), 4.8e18 (b7) FLOPs: from minutes (b0) to about 2.7 hours
(b7) at a sustained 0.5 PFLOP/s (roughly 8 A100s). EfficientNet's depthwise
convolutions usually reach a lower fraction of peak than ResNets, so expect longer.

  python -m cxr_jax.main --config configs/efficientnet_supcon_cxr.py:b3 \\
      --workdir runs/supcon_effnet_b3 --config.init.weights=weights/efficientnetb3_notop.h5
"""

from cxr_jax.models import efficientnet
from cxr_jax.train import config_lib

VARIANTS = ('b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7')
ACCUMULATE = {'b0': 4, 'b1': 4, 'b2': 4, 'b3': 8, 'b4': 16, 'b5': 32, 'b6': 32, 'b7': 64}
EFFECTIVE_BATCH = 1024
UPDATES = 10_000
EVALUATIONS = 20


def get_config(variant: str = 'b0'):
  variant = variant or 'b0'
  if variant not in VARIANTS:
    raise ValueError(f'configs/efficientnet_supcon_cxr.py:{variant}: the argument is the '
                     f'EfficientNet variant, one of {list(VARIANTS)}.')
  model_name = f'efficientnet-{variant}'
  size = efficientnet.RESOLUTION[model_name]
  c = config_lib.base_config()
  c.trainer = 'supcon'
  c.model_name = model_name
  # bf16 compute for accelerators; on CPU float32 is faster (XLA:CPU has no fast bf16
  # matmuls): add --config.model.dtype=float32 there.
  c.model.dtype = 'bfloat16'  # Parameters stay float32; the loss is computed in float32.
  c.init.weights = f'weights/efficientnet{variant}_notop.h5'
  c.optimizer.accumulate_steps = ACCUMULATE[variant]
  c.batch_size = EFFECTIVE_BATCH // c.optimizer.get_ref('accumulate_steps')
  c.total_steps = UPDATES * c.optimizer.get_ref('accumulate_steps')
  c.log_every = 50
  c.data.name = 'cxr_chexpert/full'
  c.data.pp = (f'decode|resize({size})|window|two_views|inception_crop({size}, area_min=50)'
               '|affine|contrast|value_range(0, 255, 0, 1)|rgb')
  c.data.pp_eval = f'decode|resize({size})|window|value_range(0, 255, 0, 1)|rgb'
  c.data.workers = 16
  c.loss.positives = 'abnormal'
  c.loss.temperature = 0.1
  c.optimizer.name = 'lars'
  c.optimizer.learning_rate = 0.3  # Per 256 examples: 1.2 at 1024.
  c.optimizer.lr_reference_batch = 256
  c.optimizer.weight_decay = 1e-6
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 500  # Updates.
  c.eval.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  c.eval.split = 'validation'
  c.eval.batch_size = 128
  c.eval.best_metric = 'knn_auroc_mean'
  c.checkpoint.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  return c
