"""BiT-HyperRule against the published numbers (Kolesnikov et al. 2020; bit_hyperrule.py)."""

import numpy as np
import pytest

from cxr_jax.train import config_lib
from cxr_jax.train import hyperrule
from cxr_jax.train import optimizers


def published_rate(step, dataset_size, base_lr=0.003):
  """The released rule's rate at 0-based update `step` (batch 512), written out here:
  supports [warmup end, decay, decay, decay, end] by size tier, linear warmup, then
  the base rate divided by 10 for every decay point strictly before `step`."""
  if dataset_size < 20_000:
    supports = [100, 200, 300, 400, 500]
  elif dataset_size < 500_000:
    supports = [500, 3000, 6000, 9000, 10_000]
  else:
    supports = [500, 6000, 12_000, 18_000, 20_000]
  if step < supports[0]:
    return base_lr * step / supports[0]
  return base_lr / 10 ** sum(s < step for s in supports[1:])


@pytest.mark.parametrize('size,image,steps,warmup,decays,mixup,resolution', [
    (1_000, 32, 500, 100, (200, 300, 400), 0.0, (160, 128)),  # CIFAR-sized few-shot.
    (19_999, (224, 224), 500, 100, (200, 300, 400), 0.0, (512, 480)),
    (20_000, (95, 96), 10_000, 500, (3000, 6000, 9000), 0.1, (160, 128)),
    (86_524, 512, 10_000, 500, (3000, 6000, 9000), 0.1, (512, 480)),  # NIH ChestX-ray14.
    (499_999, 96, 10_000, 500, (3000, 6000, 9000), 0.1, (512, 480)),
    (500_000, 512, 20_000, 500, (6000, 12_000, 18_000), 0.1, (512, 480)),
    (1_281_167, (224, 256), 20_000, 500, (6000, 12_000, 18_000), 0.1, (512, 480)),
])
def test_rule_by_dataset_size_and_resolution(size, image, steps, warmup, decays, mixup,
                                             resolution):
  rule = hyperrule.hyperrule(size, image)
  assert (rule.steps, rule.warmup_steps, rule.decay_steps) == (steps, warmup, decays)
  assert rule.mixup_alpha == mixup
  assert (rule.resize, rule.crop) == resolution
  np.testing.assert_allclose(np.array(rule.step_boundaries) * steps, decays)


@pytest.mark.parametrize('size', [5_000, 86_524, 1_281_167])
def test_schedule_at_batch_512_follows_the_published_rule(size):
  config = config_lib.base_config()
  config.batch_size = 512
  assert hyperrule.apply_hyperrule(config, size, 224) == (512, 480)
  rule = hyperrule.hyperrule(size, 224)
  assert config.total_steps == rule.steps
  schedule = optimizers.make_schedule(config.optimizer, config.total_steps, config.batch_size)
  steps = np.arange(config.total_steps)
  ours = np.array(schedule(steps))
  reference = np.array([published_rate(s, size) for s in steps])
  # The released code lowers the rate one update after each decay point; ours at it.
  at_decay = np.isin(steps, rule.decay_steps)
  np.testing.assert_allclose(ours[~at_decay], reference[~at_decay], rtol=1e-4)  # float32.
  np.testing.assert_allclose(ours[at_decay], reference[np.flatnonzero(at_decay) + 1],
                             rtol=1e-4)
  optimizer = config.optimizer
  assert (optimizer.name, optimizer.momentum, optimizer.weight_decay) == ('sgd', 0.9, 0.0)
  assert config.data.batch_pp == ('' if size < 20_000 else 'mixup(0.1)')


@pytest.mark.parametrize('batch,accumulate,updates,warmup,peak', [
    (512, 1, 10_000, 500, 0.003),
    (128, 1, 40_000, 2000, 0.00075),  # Same examples seen: 4x the updates at 1/4 the rate.
    (128, 4, 10_000, 500, 0.003),  # Accumulating to 512: the published schedule.
    (1024, 1, 5000, 250, 0.006),
    (96, 1, 53_333, 2667, 0.0005625),  # Rounded to the nearest update.
])
def test_other_batch_sizes_see_the_same_examples(batch, accumulate, updates, warmup, peak):
  config = config_lib.base_config()
  config.batch_size, config.optimizer.accumulate_steps = batch, accumulate
  hyperrule.apply_hyperrule(config, 86_524, 512)
  assert config.total_steps == updates * accumulate  # Batches; updates x accumulate_steps.
  assert config.optimizer.schedule.warmup_steps == warmup
  assert config.optimizer.schedule.step_boundaries == (0.3, 0.6, 0.9)
  schedule = optimizers.make_schedule(config.optimizer, updates, batch)
  assert float(schedule(warmup)) == pytest.approx(peak)
  assert float(schedule(round(0.3 * updates))) == pytest.approx(peak / 10)


def test_later_batch_overrides_rescale_the_schedule():
  config = config_lib.base_config()
  config.batch_size = 512
  hyperrule.apply_hyperrule(config, 5_000, 32)
  config.lock()
  config.batch_size = 64  # As `--config.batch_size=64` after get_config.
  assert (config.total_steps, config.optimizer.schedule.warmup_steps) == (4000, 800)
  config.optimizer.accumulate_steps = 2
  assert (config.total_steps, config.optimizer.schedule.warmup_steps) == (4000, 400)
  resolved = config.copy_and_resolve_references()
  assert resolved.total_steps == 4000 and resolved.to_dict()['total_steps'] == 4000


def test_scaled_steps_counts_batches():
  config = config_lib.base_config()
  config.batch_size, config.optimizer.accumulate_steps = 128, 4
  assert hyperrule.scaled_updates(config, 2000).get() == 2000
  assert hyperrule.scaled_steps(config, 2000).get() == 8000


@pytest.mark.parametrize('size,image,message', [
    (0, 224, 'dataset_size'),
    (-5, 224, 'dataset_size'),
    (2.5, 224, 'dataset_size'),
    (1000, 0, 'image height'),
    (1000, (224, -1), 'image width'),
])
def test_bad_arguments_are_named(size, image, message):
  with pytest.raises(ValueError, match=message):
    hyperrule.hyperrule(size, image)


def test_batch_beyond_the_schedule_is_an_error():
  config = config_lib.base_config()
  config.batch_size = 512 * 501
  with pytest.raises(ValueError, match='exceeds all 256000 examples'):
    hyperrule.apply_hyperrule(config, 100, 224)
