"""Full fine-tuning of BiT on a CXR findings dataset with BiT-HyperRule (no tuning).

The argument is `NAME:SIZE[:SIDE]`: the dataset, the number of examples in its train
split (`python -m cxr_jax.data.build` prints it), and the side in pixels of its stored
images (default 512, what the CXR builders store). `cxr_jax/train/hyperrule.py` picks
from them the schedule (500, 10k or 20k updates of 512 examples, warmup, rate x0.1 at
three fixed points), mixup (alpha 0.1 from 20k examples on) and the resolution (resize
512, random crop 480 and flip; evaluation resizes to 480; 160/128 for images smaller
than 96 x 96). SGD with momentum 0.9 from 0.003 per 512 examples, no weight decay,
every layer trains, one sigmoid output per finding (the CXR builders' findings are
known here; for `cxr_manifest/NAME` give `--config.head.num_classes`). Examples:

  configs/bit_hyperrule_finetune.py:nih_cxr14:86524
  configs/bit_hyperrule_finetune.py:cxr_chexpert/small:223414
  configs/bit_hyperrule_finetune.py:synthetic_cxr/site_b:5000:128

(86,524 images are in NIH's train_val_list.txt; the `train` split the builder makes
is about 90% of them; both sizes fall in the same 20k-500k tier, so the rule is
the same.) The run evaluates on the validation split ten times and keeps the best
checkpoint by mean AUROC.

Weights: BiT-M-R50x1 from https://github.com/google-research/big_transfer, by default
at weights/BiT-M-R50x1.npz (`--config.init.weights=PATH`). To fine-tune a CXR network
instead: `--config.init.weights= --config.init.workdir=runs/supcon_chexpert`.

Data: `python -m cxr_jax.data.build nih_cxr14 --data_dir ~/tensorflow_datasets
--manual_dir ~/data/nih` (see the README's data table for the others).

Hardware and time (estimated from FLOPs, not measured): BiT-R50x1 at 480 px costs 37.5
GFLOPs per image forward, about 112 per training image; the 10k-update schedule sees
5.1M images, about 5.8e17 FLOPs: 20 minutes at a sustained 0.5 PFLOP/s (roughly 8
A100s); 500 updates take a minute, 20k updates twice the 10k. The effective batch is
512 = batch_size x accumulate_steps; the default accumulates 4 batches of 128 to fit
few devices; on a pod slice use `--config.optimizer.accumulate_steps=1` (batch_size
and the step counts follow).

  python -m cxr_jax.main --config configs/bit_hyperrule_finetune.py:nih_cxr14:86524 \\
      --workdir runs/bit_nih --config.init.weights=weights/BiT-M-R50x1.npz
"""

from cxr_jax.data import labels
from cxr_jax.data import synthetic
from cxr_jax.train import config_lib
from cxr_jax.train import hyperrule

# Findings of the project's CXR builders, by dataset (all configs of one builder share them).
FINDINGS = {
    'nih_cxr14': labels.NIH_FINDINGS,
    'cxr_chexpert': labels.CHEXPERT_FINDINGS,
    'mimic_cxr': labels.CHEXPERT_FINDINGS,
    'synthetic_cxr': synthetic.CXR_FINDINGS,
}
MANIFEST = 'cxr_manifest'  # Findings come from the user's manifest.json.
STORED_SIDE = 512  # The CXR builders' default --max_side.
EFFECTIVE_BATCH = hyperrule.REFERENCE_BATCH
EVALUATIONS = 10


def parse_arg(arg: str):
  """'NAME:SIZE[:SIDE]' -> (name, size, side); errors name the argument."""
  parts = arg.split(':')
  usage = (f'configs/bit_hyperrule_finetune.py:{arg}: expected NAME:SIZE[:SIDE], e.g. '
           'nih_cxr14:86524 or synthetic_cxr/site_b:5000:128')
  if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
    raise ValueError(usage)
  name = parts[0].strip()
  try:
    numbers = [int(p) for p in parts[1:]]
  except ValueError:
    raise ValueError(f'{usage} (SIZE and SIDE are integers).') from None
  size, side = numbers[0], numbers[1] if len(numbers) == 2 else STORED_SIDE
  family = name.split('/')[0]
  if family not in FINDINGS and family != MANIFEST:
    raise ValueError(f'{usage}. This recipe trains on CXR findings; {name!r} is not one of '
                     f'the CXR datasets {sorted(FINDINGS)} or {MANIFEST}/NAME.')
  return name, size, side


def get_config(arg: str = 'nih_cxr14:86524'):
  name, size, side = parse_arg(arg)
  c = config_lib.base_config()
  c.trainer = 'finetune'
  c.finetune.mode = 'full'
  c.model_name = 'bit-r50x1'
  # bf16 compute for accelerators; on CPU float32 is faster (XLA:CPU has no fast bf16
  # matmuls): add --config.model.dtype=float32 there.
  c.model.dtype = 'bfloat16'  # Parameters stay float32.
  c.init.weights = 'weights/BiT-M-R50x1.npz'
  c.optimizer.accumulate_steps = 4
  c.batch_size = EFFECTIVE_BATCH // c.optimizer.get_ref('accumulate_steps')
  resize, crop = hyperrule.apply_hyperrule(c, size, side)
  c.data.name = name
  c.data.pp = (f'decode|resize({resize})|window|random_crop({crop})|flip_lr'
               '|value_range(-1, 1, 0, 1)|rgb')
  c.data.pp_eval = f'decode|resize({crop})|window|value_range(-1, 1, 0, 1)|rgb'
  c.data.workers = 16  # PNG decoding and resizing; about one per free host core.
  c.data.label_policy.uncertain = 'ignore'
  family = name.split('/')[0]
  c.head.num_classes = len(FINDINGS[family]) if family in FINDINGS else 0
  c.log_every = 50
  c.eval.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  c.eval.split = 'validation'
  c.eval.best_metric = 'auroc_mean'
  c.checkpoint.every = (c.get_ref('total_steps') + EVALUATIONS - 1) // EVALUATIONS
  return c
