"""BiT-HyperRule: fine-tuning hyperparameters chosen from the dataset's size and resolution.

Source: Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual Representation
Learning", section 3.3, and the released rule (`bit_hyperrule.py` in
github.com/google-research/big_transfer). At batch 512, with SGD (momentum 0.9,
no weight decay) from a peak rate of 0.003:

  training examples   updates   warmup   rate x0.1 at updates   mixup
  < 20k                   500      100   200, 300, 400          none
  < 500k               10,000      500   3,000, 6,000, 9,000    alpha 0.1
  otherwise            20,000      500   6,000, 12,000, 18,000  alpha 0.1

Images are resized to a square and randomly cropped (plus a random horizontal flip):
to 160 then 128 px when the original is smaller than 96 x 96 pixels in area, else to
512 then 480 px; evaluation resizes to the crop size.

Other batch sizes keep the number of examples seen: a recipe at effective batch B
(`batch_size * optimizer.accumulate_steps`) runs 512 / B times as many updates, with
the warmup scaled the same way, the decays at the same fractions of training and the
rate scaled linearly (0.003 per 512 examples, through `optimizer.lr_reference_batch`).
Step counts are FieldReferences on `batch_size` and `optimizer.accumulate_steps`, so
`--config.batch_size=...` on the command line rescales the schedule too.

One difference from the released code: it divides the rate just after each decay
step (from update s + 1), `optimizers.make_schedule` at it (from update s).
"""

import dataclasses
from typing import Sequence, Tuple, Union

import ml_collections

REFERENCE_BATCH = 512
LEARNING_RATE = 0.003  # Peak rate per REFERENCE_BATCH examples.
MOMENTUM = 0.9
DECAY_FACTOR = 0.1
MIXUP_ALPHA = 0.1
SMALL_DATASET = 20_000  # Fewer training examples than this: the short schedule, no mixup.
LARGE_DATASET = 500_000  # At least this many: the long schedule.
SMALL_IMAGE_AREA = 96 * 96  # Originals smaller than this (in pixels) train at 128 px.

# (updates, warmup, updates at which the rate drops) at REFERENCE_BATCH, by dataset tier.
_SCHEDULES = {
    'small': (500, 100, (200, 300, 400)),
    'medium': (10_000, 500, (3_000, 6_000, 9_000)),
    'large': (20_000, 500, (6_000, 12_000, 18_000)),
}
_RESOLUTIONS = {'small': (160, 128), 'large': (512, 480)}  # (resize, crop).


@dataclasses.dataclass(frozen=True)
class HyperRule:
  """The rule's choices for one dataset, with steps counted at REFERENCE_BATCH."""
  steps: int
  warmup_steps: int
  decay_steps: Tuple[int, ...]
  mixup_alpha: float  # 0: no mixup.
  resize: int
  crop: int

  @property
  def step_boundaries(self) -> Tuple[float, ...]:
    """The decay steps as fractions of training (`optimizer.schedule.step_boundaries`)."""
    return tuple(step / self.steps for step in self.decay_steps)


def _positive_int(value, what: str) -> int:
  if isinstance(value, bool) or int(value) != value or value <= 0:
    raise ValueError(f'BiT-HyperRule: {what} must be a positive integer, got {value!r}.')
  return int(value)


def hyperrule(dataset_size: int, image_size: Union[int, Sequence[int]]) -> HyperRule:
  """BiT-HyperRule for `dataset_size` training examples of `image_size` (int or (h, w))."""
  dataset_size = _positive_int(dataset_size, 'dataset_size (training examples)')
  try:
    height, width = image_size
  except TypeError:  # One number: a square image.
    height = width = image_size
  area = _positive_int(height, 'image height') * _positive_int(width, 'image width')
  if dataset_size < SMALL_DATASET:
    tier = 'small'
  elif dataset_size < LARGE_DATASET:
    tier = 'medium'
  else:
    tier = 'large'
  steps, warmup, decays = _SCHEDULES[tier]
  resize, crop = _RESOLUTIONS['small' if area < SMALL_IMAGE_AREA else 'large']
  return HyperRule(steps=steps, warmup_steps=warmup, decay_steps=decays,
                   mixup_alpha=0.0 if tier == 'small' else MIXUP_ALPHA,
                   resize=resize, crop=crop)


def scaled_updates(config: ml_collections.ConfigDict, updates: int,
                   reference_batch: int = REFERENCE_BATCH) -> ml_collections.FieldReference:
  """Optimizer updates that see as many examples as `updates` at `reference_batch` do.

  A FieldReference on config.batch_size and config.optimizer.accumulate_steps (the
  effective batch is their product), rounded to the nearest update.
  """
  effective_batch = config.get_ref('batch_size') * config.optimizer.get_ref('accumulate_steps')
  return (updates * reference_batch + effective_batch // 2) // effective_batch


def scaled_steps(config: ml_collections.ConfigDict, updates: int,
                 reference_batch: int = REFERENCE_BATCH) -> ml_collections.FieldReference:
  """Like `scaled_updates`, in batches (config.total_steps' unit): updates x accumulate_steps."""
  return (scaled_updates(config, updates, reference_batch)
          * config.optimizer.get_ref('accumulate_steps'))


def apply_hyperrule(config: ml_collections.ConfigDict, dataset_size: int,
                    image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  """Sets the rule's schedule, optimizer and mixup in `config`; returns (resize, crop).

  Sets total_steps, optimizer.* (SGD, momentum 0.9, no weight decay, 0.003 per 512,
  step schedule with warmup and decays at the rule's fractions) and data.batch_pp
  (mixup or none). The returned sizes are for the recipe's preprocessing strings, e.g.
  `resize(resize)|random_crop(crop)|flip_lr` for training and `resize(crop)` for
  evaluation.
  """
  rule = hyperrule(dataset_size, image_size)
  effective_batch = config.batch_size * config.optimizer.accumulate_steps
  if effective_batch > rule.steps * REFERENCE_BATCH:
    raise ValueError(f'BiT-HyperRule: effective batch {effective_batch} (batch_size x '
                     f'optimizer.accumulate_steps) exceeds all {rule.steps * REFERENCE_BATCH} '
                     'examples of the schedule.')
  config.total_steps = scaled_steps(config, rule.steps)
  optimizer = config.optimizer
  optimizer.name = 'sgd'
  optimizer.momentum = MOMENTUM
  optimizer.nesterov = False
  optimizer.weight_decay = 0.0  # BiT transfers without weight decay (paper, section 3.3).
  optimizer.learning_rate = LEARNING_RATE
  optimizer.lr_reference_batch = REFERENCE_BATCH
  optimizer.schedule.name = 'step'
  optimizer.schedule.warmup_steps = scaled_updates(config, rule.warmup_steps)
  optimizer.schedule.step_boundaries = rule.step_boundaries
  optimizer.schedule.step_factor = DECAY_FACTOR
  config.data.batch_pp = f'mixup({rule.mixup_alpha})' if rule.mixup_alpha else ''
  return rule.resize, rule.crop
