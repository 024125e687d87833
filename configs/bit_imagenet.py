"""Generic supervised pretraining of BiT on ImageNet-1k (ILSVRC-2012), as for BiT-S.

The BiT-S upstream recipe (Kolesnikov et al. 2020, "Big Transfer", section 3.1):
ResNet-v2 with GroupNorm and weight standardisation, softmax cross-entropy over the
1000 classes, SGD with momentum 0.9 from 0.03 per 256 examples (linear scaling) at a
global batch of 4096, linear warmup over 5000 updates, the rate divided by 10 after 30,
60 and 80 of 90 epochs, weight decay 1e-4; Inception-style random crops of 224 px and
horizontal flips. Here weight decay skips biases and GroupNorm parameters (the
optimizer's default exclusion). The argument picks the architecture:
`configs/bit_imagenet.py:bit-r101x1` (default bit-r50x1; any `bit-r{50,101,152}x{1..4}`).

The usual path is NOT to run this: Google released these networks (BiT-S trained
on ImageNet-1k, BiT-M on ImageNet-21k). Download e.g. `BiT-M-R50x1.npz` from
https://github.com/google-research/big_transfer and start the CXR stage from it with
`--config.init.weights=PATH/BiT-M-R50x1.npz` (configs/supcon_chexpert.py). Run this
recipe to pretrain a variant nobody published, or to study the generic stage.

Data: TFDS `imagenet2012`. Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
(registration at image-net.org) into ~/data/imagenet, then build it as ArrayRecord,
which the pipeline reads by random access (this needs TensorFlow, once):

  tfds build imagenet2012 --data_dir ~/tensorflow_datasets --manual_dir ~/data/imagenet \\
      --file_format=array_record

Hardware and time (estimated from FLOPs, not measured): bit-r50x1 costs 8.1 GFLOPs
per 224-px image forward (XLA count), about 24 GFLOPs per training image, so 90 epochs
(1.28M images) are about 2.8e18 FLOPs: about 1.6 hours at a sustained 0.5 PFLOP/s
(roughly what ResNet-50 training reaches on 8 A100s or a TPU v3-8), in practice a few
hours with GroupNorm's extra memory traffic. JPEG decoding at that rate needs many
host cores (`config.data.workers`). x3 widths cost about 9x, R101 and R152 about 2x
and 3x. The global batch of 4096 fits a TPU pod slice; on 8 GPUs accumulate
gradients: `--config.optimizer.accumulate_steps=8` (batch_size follows: 512 per step).

  python -m cxr_jax.main --config configs/bit_imagenet.py --workdir runs/bit_imagenet
"""

from cxr_jax.train import config_lib

IMAGENET_TRAIN_EXAMPLES = 1_281_167
GLOBAL_BATCH = 4096
EPOCHS = 90
DECAY_EPOCHS = (30, 60, 80)


def get_config(model_name: str = 'bit-r50x1'):
  c = config_lib.base_config()
  c.trainer = 'supervised'
  c.model_name = model_name or 'bit-r50x1'
  # bf16 compute for accelerators; on CPU float32 is faster (XLA:CPU has no fast bf16
  # matmuls): add --config.model.dtype=float32 there.
  c.model.dtype = 'bfloat16'  # Parameters stay float32.
  c.head.num_classes = 1000
  updates = -(-EPOCHS * IMAGENET_TRAIN_EXAMPLES // GLOBAL_BATCH)  # 28,151.
  # The global batch stays 4096 whatever accumulate_steps is; steps count batches.
  c.batch_size = GLOBAL_BATCH // c.optimizer.get_ref('accumulate_steps')
  c.total_steps = updates * c.optimizer.get_ref('accumulate_steps')
  c.log_every = 100
  c.data.name = 'imagenet2012'
  c.data.pp = 'decode(3)|inception_crop(224)|flip_lr|value_range(-1, 1)'
  c.data.pp_eval = 'decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)'
  c.data.workers = 32  # JPEG decoding; about one per free host core.
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = 0.03  # Per 256 examples: 0.48 at 4096.
  c.optimizer.lr_reference_batch = 256
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule.name = 'step'
  c.optimizer.schedule.warmup_steps = 5000
  c.optimizer.schedule.step_boundaries = tuple(e / EPOCHS for e in DECAY_EPOCHS)
  c.optimizer.schedule.step_factor = 0.1
  c.eval.every = 5000
  c.eval.split = 'validation'
  c.eval.best_metric = 'accuracy'
  c.checkpoint.every = 1000
  return c
