"""The CXR network: SupCon pretraining of BiT-M-R50x1 on CheXpert or MIMIC-CXR.

Starts from the published BiT-M-R50x1 weights (ImageNet-21k) and trains it with the
supervised contrastive loss (Khosla et al. 2020) on chest X-rays whose labels were
mined from radiology reports. Positives are images with the same normal/abnormal
label (`abnormal`: any finding other than No Finding / Support Devices positive or
uncertain), the CXR-network recipe: the coarse label is the least noisy thing report
mining gives. The argument picks the data:

  configs/supcon_chexpert.py:chexpert   cxr_chexpert/full, train split (223,414 images)
  configs/supcon_chexpert.py:mimic      mimic_cxr/chexpert, train split (MIMIC-CXR-JPG
                                        with the CheXpert labeler's labels)

`--config.data.name=cxr_chexpert/small` trains on the downsampled CheXpert release
(about 390 x 320 px, upsampled here).

Recipe: two views per image (random crop of 50-100% of the area to 448 px, small
rotation/translation/zoom, contrast), temperature 0.1, projection head to 128-d,
LARS with 0.3 per 256 examples and weight decay 1e-6 (SimCLR, Chen et al. 2020),
cosine decay after 500 warmup updates, 10,000 updates of 1024 images (about 46 epochs
of CheXpert, 28 of MIMIC). Twenty times per run a k-nearest-neighbour AUROC of the
embedding on the validation split measures progress; the best checkpoint is kept.

Large batch on few devices: the effective batch is 1024 = batch_size x
optimizer.accumulate_steps. The default accumulates 4 batches of 256 (512 views of
448 px, 64 per device on 8 devices); where memory runs out accumulate more
(`--config.optimizer.accumulate_steps=8`), and on a TPU pod slice with room for the
whole batch use `--config.optimizer.accumulate_steps=1`: batch_size, total_steps and
the evaluation interval follow, so the schedule is unchanged. Accumulation gives
LARS the large batch's gradient, but the contrastive loss compares images within
each batch of 256 only (510 negatives per anchor rather than 2046), so more devices
are better than more accumulation.

Data (you download the datasets):
  python -m cxr_jax.data.build cxr_chexpert/full --data_dir ~/tensorflow_datasets \\
      --manual_dir ~/data/CheXpert-v1.0
  python -m cxr_jax.data.build mimic_cxr/chexpert --data_dir ~/tensorflow_datasets \\
      --manual_dir ~/data/mimic-cxr-jpg
Weights: BiT-M-R50x1.npz from https://github.com/google-research/big_transfer, by
default at weights/BiT-M-R50x1.npz.

Hardware and time (estimated from FLOPs, not measured): BiT-R50x1 at 448 px costs 32.6
GFLOPs per view forward (XLA count), about 196 GFLOPs per training image (two views,
forward and backward); 10.2M images are about 2.0e18 FLOPs: about 1.1 hours at a
sustained 0.5 PFLOP/s (roughly 8 A100s or a TPU v4-8), more if decoding cannot keep
up (`config.data.workers`, one per free host core).

  python -m cxr_jax.main --config configs/supcon_chexpert.py:chexpert \\
      --workdir runs/supcon_chexpert --config.init.weights=weights/BiT-M-R50x1.npz

Next: configs/probe_nih.py (task training on NIH ChestX-ray14 from this run).
"""

from cxr_jax.train import config_lib

DATASETS = {'chexpert': 'cxr_chexpert/full', 'mimic': 'mimic_cxr/chexpert'}
EFFECTIVE_BATCH = 1024
UPDATES = 10_000
EVALUATIONS = 20
AUGMENT = ('inception_crop(448, area_min=50)|affine|contrast|value_range(-1, 1, 0, 1)|rgb')
EVAL_PP = 'decode|resize(448)|window|value_range(-1, 1, 0, 1)|rgb'


def get_config(dataset: str = 'chexpert'):
  dataset = dataset or 'chexpert'
  if dataset not in DATASETS:
    raise ValueError(f'configs/supcon_chexpert.py:{dataset}: the argument picks the data, '
                     f'one of {sorted(DATASETS)}.')
  c = config_lib.base_config()
  c.trainer = 'supcon'
  c.model_name = 'bit-r50x1'
  # bf16 compute for accelerators; on CPU float32 is faster (XLA:CPU has no fast bf16
  # matmuls): add --config.model.dtype=float32 there.
  c.model.dtype = 'bfloat16'  # Parameters stay float32; the loss is computed in float32.
  c.init.weights = 'weights/BiT-M-R50x1.npz'
  c.optimizer.accumulate_steps = 4
  c.batch_size = EFFECTIVE_BATCH // c.optimizer.get_ref('accumulate_steps')
  c.total_steps = UPDATES * c.optimizer.get_ref('accumulate_steps')
  c.log_every = 50
  c.data.name = DATASETS[dataset]
  # Whole films, squared, windowed once; then two independently augmented views. The
  # evaluation view is the whole film: a central crop would cut off costophrenic angles.
  c.data.pp = 'decode|resize(512)|window|two_views|' + AUGMENT
  c.data.pp_eval = EVAL_PP
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
  c.eval.batch_size = 256
  c.eval.best_metric = 'knn_auroc_mean'
  c.checkpoint.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  return c
