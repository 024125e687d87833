"""Tests for cxr_jax.train.optimizers: schedules, masks, and one-step updates vs NumPy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.train import optimizers

# Paths shaped like BiT's (group_norm gamma/beta, head/conv2d) and EfficientNet's (bn scale/bias).
SHAPES = {
    'block1': {'unit01': {'standardized_conv2d': {'kernel': (3, 3, 2, 4)},
                          'group_norm': {'gamma': (4,), 'beta': (4,)}}},
    'block2': {'conv': {'kernel': (1, 1, 4, 6)}, 'bn': {'scale': (6,), 'bias': (6,)}},
    'head': {'conv2d': {'kernel': (1, 1, 6, 3), 'bias': (3,)}},
}
DECAYED = ('block1/unit01/standardized_conv2d/kernel', 'block2/conv/kernel', 'head/conv2d/kernel')


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _random_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s), jnp.float32), SHAPES,
                      is_leaf=_is_shape)


def _by_path(tree):
  return dict(zip(optimizers.param_paths(tree), (np.asarray(x) for x in jax.tree.leaves(tree))))


def _config(**overrides):
  config = optimizers.default_config()
  schedule = overrides.pop('schedule', {})
  config.update(overrides)
  config.schedule.update({'name': 'constant', **schedule})
  return config


def _run(config, params, grads_seq, total_steps=100, batch_size=None):
  """Applies the gradients in turn; returns the list of updates (path -> array) and final state."""
  tx, _ = optimizers.make_optimizer(config, params, total_steps, batch_size=batch_size)
  state = tx.init(params)
  step = jax.jit(tx.update)
  all_updates = []
  for grads in grads_seq:
    updates, state = step(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    all_updates.append(_by_path(updates))
  return all_updates, state, params


def _state_size(state):
  # Scalars are step counters; only per-parameter buffers cost memory.
  return sum(x.size for x in jax.tree.leaves(state) if np.ndim(x) > 0)


def _size(paths_to_arrays, predicate):
  return sum(a.size for p, a in paths_to_arrays.items() if predicate(p))


# ---------------------------------------------------------------------------
# Paths and labels.


def test_param_paths_are_slash_joined_in_flatten_order():
  assert optimizers.param_paths(_random_tree(0)) == [
      'block1/unit01/group_norm/beta', 'block1/unit01/group_norm/gamma',
      'block1/unit01/standardized_conv2d/kernel', 'block2/bn/bias', 'block2/bn/scale',
      'block2/conv/kernel', 'head/conv2d/bias', 'head/conv2d/kernel']


def test_label_params_first_match_wins_and_default():
  labels = optimizers.label_params(_random_tree(0), [('^head/', 'h'), ('kernel$', 'k')], 'x')
  labels = dict(zip(optimizers.param_paths(labels), jax.tree.leaves(labels)))
  assert labels['head/conv2d/kernel'] == 'h'
  assert labels['block2/conv/kernel'] == 'k'
  assert labels['block2/bn/scale'] == 'x'


def test_default_exclusion_matches_biases_and_norm_params_of_real_models():
  from cxr_jax.models import get_model
  for name in ('bit-tiny', 'efficientnet-tiny'):
    model = get_model(name, num_classes=2)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    labels = optimizers.label_params(variables['params'],
                                     [(optimizers.DEFAULT_WEIGHT_DECAY_EXCLUDE, True)], False)
    for path, excluded in zip(optimizers.param_paths(labels), jax.tree.leaves(labels)):
      assert excluded == (not path.endswith('kernel')), (name, path)


# ---------------------------------------------------------------------------
# Schedules.


def _schedule(total_steps=100, batch_size=None, **config):
  return optimizers.make_schedule(_config(**config), total_steps, batch_size)


def test_cosine_with_warmup():
  fn = _schedule(learning_rate=2.0, schedule=dict(name='cosine', warmup_steps=10,
                                                  end_fraction=0.1))
  np.testing.assert_allclose([fn(0), fn(5), fn(10), fn(55), fn(100), fn(150)],
                             [0.0, 1.0, 2.0, 2.0 * (0.1 + 0.9 * 0.5), 0.2, 0.2], rtol=1e-6)


def test_step_schedule_bit_hyperrule_boundaries_count_from_step_zero():
  for warmup in (0, 10):
    fn = _schedule(learning_rate=1.0, schedule=dict(name='step', warmup_steps=warmup))
    values = [fn(t) for t in (29, 30, 59, 60, 89, 90, 99)]
    np.testing.assert_allclose(values, [1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  fn = _schedule(learning_rate=1.0, schedule=dict(name='step', warmup_steps=10))
  np.testing.assert_allclose([fn(0), fn(5), fn(10)], [0.0, 0.5, 1.0], rtol=1e-6)


def test_linear_and_constant_schedules():
  fn = _schedule(learning_rate=1.0, schedule=dict(name='linear', end_fraction=0.0))
  np.testing.assert_allclose([fn(0), fn(25), fn(100)], [1.0, 0.75, 0.0], atol=1e-7)
  fn = _schedule(learning_rate=0.5, schedule=dict(name='constant', warmup_steps=4))
  np.testing.assert_allclose([fn(2), fn(4), fn(99)], [0.25, 0.5, 0.5], rtol=1e-6)


def test_learning_rate_scales_linearly_with_effective_batch():
  assert optimizers.peak_learning_rate(_config(learning_rate=0.03)) == pytest.approx(0.03)
  bit = _config(learning_rate=0.03, lr_reference_batch=512)
  assert optimizers.peak_learning_rate(bit, 1024) == pytest.approx(0.06)
  simclr = _config(name='lars', learning_rate=0.3, lr_reference_batch=256, accumulate_steps=4)
  # 128 per micro-batch x 4 micro-batches = 512 examples per update.
  assert optimizers.peak_learning_rate(simclr, 128) == pytest.approx(0.6)
  fn = optimizers.make_schedule(bit, 100, batch_size=256)
  np.testing.assert_allclose(fn(0), 0.015, rtol=1e-6)
  with pytest.raises(ValueError, match='batch_size'):
    optimizers.peak_learning_rate(bit)


# ---------------------------------------------------------------------------
# Weight decay.


@pytest.mark.parametrize('name, extra', [
    ('sgd', dict(momentum=0.0)),
    ('sgd', dict(momentum=0.9, decoupled_weight_decay=True)),
    ('adamw', {}),
])
def test_weight_decay_skips_excluded_params(name, extra):
  params = _random_tree(1)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  config = _config(name=name, learning_rate=0.5, weight_decay=0.1, **extra)
  (updates,), _, _ = _run(config, params, [zero_grads])
  for path, param in _by_path(params).items():
    expected = -0.5 * 0.1 * param if path in DECAYED else np.zeros_like(param)
    np.testing.assert_allclose(updates[path], expected, rtol=1e-5, atol=1e-7, err_msg=path)


def test_sgd_coupled_weight_decay_enters_the_momentum_buffer():
  params, g1, g2 = _random_tree(1), _random_tree(2), _random_tree(3)
  config = _config(name='sgd', learning_rate=0.1, momentum=0.9, weight_decay=0.01)
  updates, _, _ = _run(config, params, [g1, g2])
  p0, grads1, grads2 = _by_path(params), _by_path(g1), _by_path(g2)
  for path in p0:
    wd = 0.01 if path in DECAYED else 0.0
    v1 = grads1[path] + wd * p0[path]
    p1 = p0[path] - 0.1 * v1
    v2 = 0.9 * v1 + grads2[path] + wd * p1
    np.testing.assert_allclose(updates[0][path], -0.1 * v1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(updates[1][path], -0.1 * v2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# One-step updates against hand computations.


def test_sgd_nesterov_momentum_two_steps():
  params, g1, g2 = _random_tree(1), _random_tree(2), _random_tree(3)
  config = _config(name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True)
  updates, _, _ = _run(config, params, [g1, g2])
  for path, (a, b) in {p: (_by_path(g1)[p], _by_path(g2)[p]) for p in _by_path(params)}.items():
    v1 = a
    v2 = 0.9 * v1 + b
    np.testing.assert_allclose(updates[0][path], -0.1 * (a + 0.9 * v1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(updates[1][path], -0.1 * (b + 0.9 * v2), rtol=1e-5, atol=1e-7)


def test_adamw_one_step():
  params, grads = _random_tree(1), _random_tree(2)
  config = _config(name='adamw', learning_rate=1e-3, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05)
  (updates,), _, _ = _run(config, params, [grads])
  for path, g in _by_path(grads).items():
    p = _by_path(params)[path]
    m_hat = (1 - 0.8) * g / (1 - 0.8)
    v_hat = (1 - 0.95) * g * g / (1 - 0.95)
    wd = 0.05 if path in DECAYED else 0.0
    expected = -1e-3 * (m_hat / (np.sqrt(v_hat) + 1e-6) + wd * p)
    np.testing.assert_allclose(updates[path], expected, rtol=1e-5, atol=1e-9, err_msg=path)


def test_lars_trust_ratio_per_tensor_two_steps():
  params, g1, g2 = _random_tree(1), _random_tree(2, 0.01), _random_tree(3, 0.01)
  config = _config(name='lars', learning_rate=0.6, weight_decay=1e-4, momentum=0.9,
                   trust_coefficient=0.001)
  updates, _, _ = _run(config, params, [g1, g2])

  def scaled(p, g, path):
    if path not in DECAYED:  # Biases and norm params: plain SGD, no decay, no trust ratio.
      return 0.6 * g
    g = g + 1e-4 * p
    return 0.6 * (0.001 * np.linalg.norm(p) / np.linalg.norm(g)) * g

  for path, p0 in _by_path(params).items():
    v1 = scaled(p0, _by_path(g1)[path], path)
    v2 = 0.9 * v1 + scaled(p0 - v1, _by_path(g2)[path], path)
    np.testing.assert_allclose(updates[0][path], -v1, rtol=1e-5, atol=1e-9, err_msg=path)
    np.testing.assert_allclose(updates[1][path], -v2, rtol=1e-4, atol=1e-9, err_msg=path)


def test_grad_clipping_equals_update_on_clipped_grads():
  params, grads = _random_tree(1), _random_tree(2, 10.0)
  norm = np.sqrt(sum(np.sum(g ** 2) for g in _by_path(grads).values()))
  assert norm > 1.0
  (clipped_run,), _, _ = _run(_config(name='adamw', grad_clip_norm=1.0), params, [grads])
  clipped = jax.tree.map(lambda g: g / norm, grads)
  (reference,), _, _ = _run(_config(name='adamw'), params, [clipped])
  for path in reference:
    np.testing.assert_allclose(clipped_run[path], reference[path], rtol=1e-4, atol=1e-8)
  # Plain SGD makes the scale visible (Adam is nearly scale-invariant).
  (sgd,), _, _ = _run(_config(momentum=0.0, learning_rate=1.0, grad_clip_norm=1.0), params, [grads])
  for path, g in _by_path(grads).items():
    np.testing.assert_allclose(sgd[path], -g / norm, rtol=1e-5, atol=1e-7)


def test_grad_clipping_ignores_frozen_gradients():
  params, grads = _random_tree(1), _random_tree(2, 10.0)
  head_norm = np.sqrt(sum(np.sum(g ** 2) for p, g in _by_path(grads).items()
                          if p.startswith('head/')))
  config = _config(momentum=0.0, learning_rate=1.0, grad_clip_norm=1.0, freeze='^(?!head/)')
  (updates,), _, _ = _run(config, params, [grads])
  for path, g in _by_path(grads).items():
    expected = -g / head_norm if path.startswith('head/') else np.zeros_like(g)
    np.testing.assert_allclose(updates[path], expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Freezing and lr multipliers.


@pytest.mark.parametrize('accumulate_steps', [1, 2])
def test_frozen_params_do_not_change_and_have_no_state(accumulate_steps):
  params = _random_tree(1)
  grads = [_random_tree(10 + i) for i in range(4)]
  config = _config(name='adamw', weight_decay=0.1, freeze='^block1/',
                   accumulate_steps=accumulate_steps)
  _, state, final = _run(config, params, grads)
  before, after = _by_path(params), _by_path(final)
  frozen = lambda path: path.startswith('block1/')
  for path in before:
    assert np.array_equal(before[path], after[path]) == frozen(path), path
  trainable_size = _size(before, lambda p: not frozen(p))
  # Adam's mu and nu, plus MultiSteps' gradient accumulator when accumulating.
  buffers = 2 + (accumulate_steps > 1)
  assert _state_size(state) == buffers * trainable_size
  mask = optimizers.frozen_mask(params, config)
  assert dict(zip(optimizers.param_paths(mask), jax.tree.leaves(mask))) == {
      p: frozen(p) for p in before}


def test_linear_probe_trains_only_the_head():
  params = _random_tree(1)
  config = _config(name='sgd', momentum=0.9, freeze='^(?!head/)')
  _, state, final = _run(config, params, [_random_tree(2), _random_tree(3)])
  before, after = _by_path(params), _by_path(final)
  for path in before:
    assert np.array_equal(before[path], after[path]) != path.startswith('head/'), path
  assert _state_size(state) == _size(before, lambda p: p.startswith('head/'))


def test_lr_multipliers_scale_sgd_updates_exactly_first_match_wins():
  params, grads = _random_tree(1), _random_tree(2)
  multipliers = (('^head/', 10.0), ('^block1/', 0.25), ('^block', 0.5))
  config = _config(name='sgd', momentum=0.0, learning_rate=0.1, lr_multipliers=multipliers)
  (updates,), _, _ = _run(config, params, [grads])
  for path, g in _by_path(grads).items():
    multiplier = 10.0 if path.startswith('head/') else 0.25 if path.startswith('block1/') else 0.5
    np.testing.assert_allclose(updates[path], -0.1 * multiplier * g, rtol=1e-6, err_msg=path)
  # A plain dict works too (read in insertion order).
  config = _config(name='sgd', momentum=0.0, learning_rate=0.1)
  tx, _ = optimizers.make_optimizer(_resolved(config, lr_multipliers=dict(multipliers)), params, 10)
  dict_updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in _by_path(dict_updates).items():
    np.testing.assert_allclose(u, updates[path], rtol=1e-6)


def _resolved(config, **overrides):
  values = config.to_dict()
  values.update(overrides)
  return values


def test_zero_lr_multiplier_freezes():
  params = _random_tree(1)
  config = _config(name='sgd', momentum=0.9, lr_multipliers=(('^block2/', 0.0),))
  _, state, final = _run(config, params, [_random_tree(2), _random_tree(3)])
  before, after = _by_path(params), _by_path(final)
  for path in before:
    assert np.array_equal(before[path], after[path]) == path.startswith('block2/'), path
  assert _state_size(state) == _size(before, lambda p: not p.startswith('block2/'))


# ---------------------------------------------------------------------------
# Gradient accumulation.


def test_accumulation_equals_one_step_on_mean_gradient():
  params = _random_tree(1)
  micro_grads = [_random_tree(10 + i) for i in range(3)]
  mean = jax.tree.map(lambda *g: sum(g) / 3, *micro_grads)
  config = dict(name='adamw', weight_decay=0.1, grad_clip_norm=2.0,
                lr_multipliers=(('^head/', 3.0),))
  accumulated, _, _ = _run(_config(accumulate_steps=3, **config), params, micro_grads)
  (reference,), _, _ = _run(_config(**config), params, [mean])
  for updates in accumulated[:2]:
    assert all(not np.any(u) for u in updates.values())
  for path in reference:
    np.testing.assert_allclose(accumulated[2][path], reference[path], rtol=1e-5, atol=1e-8)


def test_schedule_advances_once_per_accumulated_update():
  params = _random_tree(1)
  grads = jax.tree.map(jnp.ones_like, params)
  config = _config(name='sgd', momentum=0.0, learning_rate=1.0, accumulate_steps=2,
                   schedule=dict(name='linear', end_fraction=0.0))
  updates, _, _ = _run(config, params, [grads] * 4, total_steps=4)
  path = 'head/conv2d/kernel'
  np.testing.assert_allclose([updates[i][path][0, 0, 0, 0] for i in range(4)],
                             [0.0, -1.0, 0.0, -0.75], rtol=1e-6)


# ---------------------------------------------------------------------------
# Configs and errors.


def test_accepts_whole_config_and_fills_missing_fields():
  experiment = ml_collections.ConfigDict({'optimizer': _config(name='adamw')})
  optimizers.make_optimizer(experiment, _random_tree(0), 10)
  optimizers.make_optimizer({'name': 'adamw', 'learning_rate': 1e-3}, _random_tree(0), 10)


@pytest.mark.parametrize('overrides, message', [
    (dict(name='adam'),
     r"optimizer.name='adam' is unknown; choose one of \['sgd', 'adamw', 'lars'\]"),
    (dict(schedule=dict(name='exp')), r"schedule.name='exp' is unknown"),
    (dict(freeze='^heads/'), r"optimizer.freeze: regex '\^heads/' matches no parameter; "
                             r"parameter paths look like: block1/unit01/group_norm/beta"),
    (dict(lr_multipliers=(('^head/', 2.0), ('^stem/', 0.1))),
     r"lr_multipliers: regex '\^stem/' matches no parameter.*head/conv2d/bias"),
    (dict(weight_decay=0.1, weight_decay_exclude='norm_scale$'),
     r"weight_decay_exclude: regex 'norm_scale\$' matches no parameter"),
    (dict(freeze='['), r'optimizer.freeze.*not a valid regex'),
    (dict(freeze='.'), r'freeze every parameter'),
    (dict(schedule=dict(name='cosine', warmup_steps=100)), r'warmup_steps=100'),
    (dict(schedule=dict(name='step', warmup_steps=40)), r'inside the 40 warmup steps'),
])
def test_errors_name_the_problem(overrides, message):
  with pytest.raises(ValueError, match=message):
    optimizers.make_optimizer(_config(**overrides), _random_tree(0), 100)


def test_unknown_field_lists_valid_ones():
  message = r"unknown field\(s\) \['weight_decy'\]; valid fields: .*'weight_decay'"
  with pytest.raises(ValueError, match=message):
    optimizers.make_optimizer({'name': 'sgd', 'weight_decy': 0.1}, _random_tree(0), 10)


def test_configdict_multipliers_with_several_regexes_are_rejected():
  config = _config().to_dict()  # The tuple-typed field refuses a ConfigDict itself.
  config['lr_multipliers'] = ml_collections.ConfigDict({'^head/': 10.0, '^block1/': 0.1})
  with pytest.raises(ValueError, match='pairs'):
    optimizers.make_optimizer(config, _random_tree(0), 10)
