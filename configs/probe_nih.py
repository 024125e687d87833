"""Task training on NIH ChestX-ray14 from the CXR network (a SupCon run's workdir).

Trains the 14 ChestX-ray14 findings (one sigmoid output each) on the backbone of
`config.init.workdir` (default runs/supcon_chexpert, from configs/supcon_chexpert.py;
its projection head is discarded). The argument picks how, through finetune.mode:

  configs/probe_nih.py:linear   frozen backbone, linear head (the embedding's quality)
  configs/probe_nih.py:mlp      frozen backbone, MLP head [512, 256] with dropout
  configs/probe_nih.py:full     every layer trains (BiT-HyperRule schedule)
  configs/probe_nih.py:lpft     linear probe first (2000 updates, in WORKDIR/linear_probe),
                                then full fine-tuning from it (Kumar et al. 2022)

Pick the mode with the argument rather than `--config.finetune.mode`: the optimizer
differs. Probes: AdamW at 1e-3 with cosine decay, 5000 updates of 512 images (about
33 epochs). Fine-tuning: BiT-HyperRule for NIH's size (cxr_jax/train/hyperrule.py:
SGD with momentum from 0.003 per 512, 10,000 updates, rate x0.1 at 30/60/90%, mixup
0.1, no weight decay) at the CXR network's 448 px rather than the rule's 480: the
features were learnt at that scale. The LP-FT probe uses the same optimizer, the rate
at which BiT trains its zero-initialised head. Every run evaluates on the validation
split ten times (AUROC per finding) and keeps the best checkpoint by mean AUROC in
WORKDIR/best. Images: squared to 512, random 448 crop and flip; evaluation resizes the
whole film to 448.

Data: `python -m cxr_jax.data.build nih_cxr14 --data_dir ~/tensorflow_datasets
--manual_dir ~/data/nih` (splits train/validation by patient from train_val_list.txt,
test from test_list.txt). The model_name must be the SupCon run's (bit-r50x1).

Hardware and time (estimated from FLOPs, not measured; BiT-R50x1 at 448 px is 32.6
GFLOPs per image forward): a probe runs the frozen backbone forward only, 2.6M images,
about 8e16 FLOPs: 3 minutes at a sustained 0.5 PFLOP/s (roughly 8 A100s); decoding is
likely the limit (`config.data.workers`). For many probes of one network, embed the
images once and train probes on the embeddings (cxr_jax/probe.py) instead. Full
fine-tuning: 5.1M images forward and backward, about 5e17 FLOPs, 17 minutes at that
rate; it accumulates 4 batches of 128 into each update of 512 for few devices
(`--config.optimizer.accumulate_steps=1` on a pod slice; the step counts follow).

  python -m cxr_jax.main --config configs/probe_nih.py:linear --workdir runs/nih_linear \\
      --config.init.workdir=runs/supcon_chexpert
"""

from cxr_jax.data import labels
from cxr_jax.train import config_lib
from cxr_jax.train import hyperrule

MODES = ('linear', 'mlp', 'full', 'lpft')
# Images in train_val_list.txt; the train split is about 90% of them. It only picks
# BiT-HyperRule's tier (20k-500k), which either count gives.
NIH_TRAIN_VAL_IMAGES = 86_524
PROBE_BATCH = 512
PROBE_UPDATES = 5000
LP_UPDATES = 2000  # LP-FT's probe phase, at 512 examples per update.
EVALUATIONS = 10


def get_config(mode: str = 'linear'):
  mode = mode or 'linear'
  if mode not in MODES:
    raise ValueError(f'configs/probe_nih.py:{mode}: the argument is the finetune.mode, '
                     f'one of {list(MODES)}.')
  c = config_lib.base_config()
  c.trainer = 'finetune'
  c.finetune.mode = mode
  c.model_name = 'bit-r50x1'
  # bf16 compute for accelerators; on CPU float32 is faster (XLA:CPU has no fast bf16
  # matmuls): add --config.model.dtype=float32 there.
  c.model.dtype = 'bfloat16'  # Parameters stay float32.
  c.init.workdir = 'runs/supcon_chexpert'
  c.data.name = 'nih_cxr14'
  c.data.pp = ('decode|resize(512)|window|random_crop(448)|flip_lr'
               '|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = 'decode|resize(448)|window|value_range(-1, 1, 0, 1)|rgb'
  c.data.workers = 16
  c.head.num_classes = len(labels.NIH_FINDINGS)
  if mode in ('linear', 'mlp'):
    c.batch_size = PROBE_BATCH
    c.total_steps = PROBE_UPDATES
    c.optimizer.name = 'adamw'
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule.name = 'cosine'
    c.optimizer.schedule.warmup_steps = 200
  else:
    c.optimizer.accumulate_steps = 4
    c.batch_size = hyperrule.REFERENCE_BATCH // c.optimizer.get_ref('accumulate_steps')
    hyperrule.apply_hyperrule(c, NIH_TRAIN_VAL_IMAGES, 512)  # Its 480 px unused: see above.
    if mode == 'lpft':
      c.finetune.lp_steps = hyperrule.scaled_steps(c, LP_UPDATES)
  c.log_every = 50
  c.eval.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  c.eval.split = 'validation'
  c.eval.batch_size = 256
  c.eval.best_metric = 'auroc_mean'
  c.checkpoint.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  return c
