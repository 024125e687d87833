"""Optimizers and learning-rate schedules, built from `config.optimizer`.

`make_optimizer(config.optimizer, params, total_steps, batch_size)` returns an
`optax.GradientTransformation` and the learning-rate schedule it follows. Every
stage uses it: BiT pretraining and fine-tuning (SGD + momentum, step schedule),
SupCon / SimCLR (LARS, cosine), probes and LP-FT (AdamW or SGD with `freeze`).

Parameters are addressed by their '/'-joined paths, e.g.
'block1/unit01/a/standardized_conv2d/kernel' (BiT) or 'block2a/se_reduce/bias'
(EfficientNet); every regex below is applied with `re.search`, so anchor it
('^head/') when a prefix is meant.

Order of operations on one optimizer update, for trainable parameters:

  clip by global norm -> optimizer (with weight decay) -> x learning rate
  -> x per-parameter lr multiplier

Frozen parameters (`freeze`, or an lr multiplier of 0) get zero updates and no
optimizer state at all.

Step counting with `accumulate_steps = k`: the data pipeline yields micro-batches
of `batch_size` examples and the training loop calls `update` once per
micro-batch. Every k-th call applies one optimizer update on the mean of the k
micro-gradients; the other calls return zero updates. So

  * the effective batch is `batch_size * k` (and the lr scaling rule uses it);
  * `total_steps` counts optimizer updates; the loop runs `total_steps * k`
    micro-steps;
  * the schedule advances once per optimizer update: the lr in force at
    micro-step s is `schedule_fn(s // k)`.

Hence a recipe keeps its meaning when (batch_size, k) change with a fixed product.
"""

import re
import types
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'adamw', 'lars')
SCHEDULES = ('cosine', 'step', 'constant', 'linear')

# Biases and normalisation parameters: BiT GroupNorm gamma/beta, Flax BatchNorm /
# LayerNorm scale/bias. They shift and scale activations rather than fit features,
# so decaying them regularises little and can hurt (Goyal et al. 2017, SimCLR).
DEFAULT_WEIGHT_DECAY_EXCLUDE = r'(^|/)(bias|beta|gamma|scale)$'

TRAINABLE = 'trainable'
FROZEN = 'frozen'

# (regex, value) pairs; a dict is read in its insertion order.
Rules = Union[Mapping[str, Any], Sequence[Tuple[str, Any]]]


def default_config() -> ml_collections.ConfigDict:
  """The `config.optimizer` section; recipes copy it and override fields."""
  config = ml_collections.ConfigDict()
  config.name = 'sgd'  # sgd | adamw | lars.
  # Peak learning rate. With lr_reference_batch > 0 it is the rate per
  # lr_reference_batch examples: peak = learning_rate * effective_batch / lr_reference_batch,
  # effective_batch = batch_size * accumulate_steps.
  config.learning_rate = 0.03
  # 0: learning_rate is the peak as given. BiT: 0.03 per 512; SimCLR/SupCon LARS: 0.3 per 256.
  config.lr_reference_batch = 0

  # SGD and LARS.
  config.momentum = 0.9  # 0 gives plain SGD (no momentum buffer is allocated).
  config.nesterov = False
  # AdamW.
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  # LARS (You et al. 2017): per-tensor lr factor trust_coefficient * |w| / (|g + wd w| + trust_eps).
  config.trust_coefficient = 0.001
  config.trust_eps = 0.0

  # Weight decay. adamw: always decoupled, update -= lr * weight_decay * w.
  # lars: added to the gradient before the trust ratio (You et al., SimCLR).
  # sgd: see decoupled_weight_decay.
  config.weight_decay = 0.0
  # sgd only. False: classic L2, weight_decay * w is added to the gradient before
  # momentum (as BiT and the ResNet recipes). True: SGDW, lr * weight_decay * w is
  # added after momentum, so the decay does not accumulate in the momentum buffer.
  config.decoupled_weight_decay = False
  # Regex over parameter paths that get no weight decay; for lars these also skip
  # the trust-ratio adaptation. '' decays everything.
  config.weight_decay_exclude = DEFAULT_WEIGHT_DECAY_EXCLUDE

  # Ordered (regex, multiplier) pairs; a parameter takes the multiplier of the first
  # regex that matches its path (1 when none does); 0 freezes it. It scales the whole
  # update, weight decay included, as a per-parameter learning rate would. Pairs rather
  # than a dict because ConfigDict sorts its keys and rejects the dots regexes need.
  # E.g. (('^head/', 10.0),) or ((r'^block[12]/', 0.1),).
  config.lr_multipliers = ()
  # Regex of parameters that never change and get no optimizer state. Linear probe:
  # '^(?!head/)' (everything but the BiT head). '' freezes nothing.
  config.freeze = ''
  config.grad_clip_norm = 0.0  # Clip the global gradient norm of trainable params; 0 = off.
  # Optimizer update every this many micro-batches, on their mean gradient (see the
  # module docstring for how batch size and step counts follow).
  config.accumulate_steps = 1

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = 'cosine'  # cosine | step | constant | linear.
  config.schedule.warmup_steps = 0  # Linear warmup from 0 to the peak, in optimizer updates.
  # cosine and linear: decay from the peak to end_fraction * peak at total_steps.
  config.schedule.end_fraction = 0.0
  # step: multiply by step_factor at each of these fractions of total_steps (counted
  # from step 0, warmup included). BiT-HyperRule: 30%, 60%, 90%, factor 0.1.
  config.schedule.step_boundaries = (0.3, 0.6, 0.9)
  config.schedule.step_factor = 0.1
  return config


# ---------------------------------------------------------------------------
# Parameter paths and labels.


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _path_string(key_path) -> str:
  return '/'.join(_key_name(key) for key in key_path)


def param_paths(params) -> list:
  """'/'-joined paths of every leaf of `params`, in tree-flattening order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [_path_string(key_path) for key_path, _ in leaves]


def _map_paths(fn: Callable[[str], Any], tree):
  """Tree of fn(path) over the leaves of `tree` (which may hold optax MaskedNodes)."""
  return jax.tree_util.tree_map_with_path(lambda key_path, _: fn(_path_string(key_path)), tree)


def _compile(regex: str, what: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as error:
    raise ValueError(f'{what}: {regex!r} is not a valid regex: {error}.') from None


def _rule_pairs(rules: Rules, what: str) -> list:
  if isinstance(rules, ml_collections.ConfigDict):
    if len(rules) > 1:
      raise ValueError(f'{what}: a ConfigDict sorts its keys, so "first match wins" would not '
                       f'follow the written order; give (regex, value) pairs instead.')
    rules = rules.to_dict()
  items = rules.items() if isinstance(rules, Mapping) else rules
  pairs = []
  for item in items:
    if len(item) != 2:
      raise ValueError(f'{what}: expected (regex, value) pairs, got {item!r}.')
    pairs.append(item)
  return pairs


def _examples(paths, count=6) -> str:
  # One path per top-level scope first: the first few paths of a deep network all
  # sit in its first block and say little about how the tree is laid out.
  shown, scopes = [], set()
  for path in paths:
    scope = path.split('/')[0]
    if scope not in scopes and len(shown) < count:
      scopes.add(scope)
      shown.append(path)
  shown += [path for path in paths if path not in shown][:count - len(shown)]
  suffix = f', ... ({len(paths)} in all)' if len(paths) > len(shown) else ''
  return ', '.join(shown) + suffix


def _check_matches(pattern: re.Pattern, paths, what: str):
  if not any(pattern.search(path) for path in paths):
    raise ValueError(f'{what}: regex {pattern.pattern!r} matches no parameter; '
                     f'parameter paths look like: {_examples(paths)}.')


def _first_match(rules: Rules, default: Any, what: str) -> Callable[[str], Any]:
  """path -> value of the first regex in `rules` that matches it, else `default`."""
  pairs = [(_compile(regex, what), value) for regex, value in _rule_pairs(rules, what)]

  def lookup(path):
    for pattern, value in pairs:
      if pattern.search(path):
        return value
    return default

  return lookup


def _check_rules(rules: Rules, paths, what: str):
  for regex, _ in _rule_pairs(rules, what):
    _check_matches(_compile(regex, what), paths, what)


def label_params(params, rules: Rules, default: Any = None, *, what: str = 'label_params'):
  """Tree like `params` holding, per leaf, the value of the first regex matching its path.

  Args:
    params: a parameter pytree (arrays or abstract shapes; only its paths are read).
    rules: (regex, value) pairs, or a dict read in insertion order; regexes use re.search.
    default: value of leaves that no regex matches.
    what: names the rules in error messages (e.g. 'optimizer.lr_multipliers').

  Raises:
    ValueError: a regex is invalid or matches no parameter path.
  """
  _check_rules(rules, param_paths(params), what)
  return _map_paths(_first_match(rules, default, what), params)


def _lr_multiplier_fn(config) -> Callable[[str], float]:
  lookup = _first_match(config.lr_multipliers, 1.0, 'optimizer.lr_multipliers')
  return lambda path: float(lookup(path))


def _frozen_fn(config) -> Callable[[str], bool]:
  multiplier = _lr_multiplier_fn(config)
  freeze = _compile(config.freeze, 'optimizer.freeze') if config.freeze else None
  return lambda path: bool(freeze and freeze.search(path)) or multiplier(path) == 0.0


def frozen_mask(params, config) -> Any:
  """Tree of bools like `params`: True where `freeze` matches or the lr multiplier is 0."""
  config = _resolve_config(config)
  _validate_regexes(config, param_paths(params))
  return _map_paths(_frozen_fn(config), params)


def _validate_regexes(config, paths):
  """Every configured regex that takes effect must match at least one parameter."""
  _check_rules(config.lr_multipliers, paths, 'optimizer.lr_multipliers')
  if config.freeze:
    _check_matches(_compile(config.freeze, 'optimizer.freeze'), paths, 'optimizer.freeze')
  # The exclusion only takes effect where something is decayed or trust-scaled; a
  # default regex on a model without biases should not fail an undecayed run.
  if config.weight_decay_exclude and (config.weight_decay > 0 or config.name == 'lars'):
    _check_matches(_compile(config.weight_decay_exclude, 'optimizer.weight_decay_exclude'),
                   paths, 'optimizer.weight_decay_exclude')


# ---------------------------------------------------------------------------
# Config handling.


def _resolve_config(config) -> types.SimpleNamespace:
  """The optimizer settings with defaults filled in; an unknown field is an error."""
  if isinstance(config, types.SimpleNamespace):
    return config  # Already resolved.
  if 'optimizer' in config and 'name' not in config:
    config = config['optimizer']  # A whole experiment config was given.
  multipliers = config.get('lr_multipliers', ())
  # Checked before to_dict(), which would hide that a ConfigDict lost the written order.
  _rule_pairs(multipliers, 'optimizer.lr_multipliers')
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  given['lr_multipliers'] = multipliers
  defaults = default_config().to_dict()
  schedule = dict(given.pop('schedule', {}))
  for section, fields, valid in (('optimizer', given, defaults),
                                 ('optimizer.schedule', schedule, defaults['schedule'])):
    unknown = sorted(set(fields) - set(valid))
    if unknown:
      raise ValueError(f'{section}: unknown field(s) {unknown}; valid fields: {sorted(valid)}.')
  settings = types.SimpleNamespace(**{**defaults, **given})
  settings.schedule = types.SimpleNamespace(**{**defaults['schedule'], **schedule})
  return settings


# ---------------------------------------------------------------------------
# Learning-rate schedule.


def peak_learning_rate(config, batch_size: Optional[int] = None) -> float:
  """The schedule's peak: learning_rate, linearly scaled with the effective batch if asked."""
  config = _resolve_config(config)
  if config.lr_reference_batch <= 0:
    return float(config.learning_rate)
  if not batch_size or batch_size <= 0:
    raise ValueError(f'optimizer.lr_reference_batch={config.lr_reference_batch} scales the '
                     f'learning rate with the batch size, so make_optimizer needs batch_size '
                     f'(got {batch_size!r}).')
  effective_batch = batch_size * config.accumulate_steps
  return float(config.learning_rate) * effective_batch / config.lr_reference_batch


def make_schedule(config, total_steps: int, batch_size: Optional[int] = None) -> optax.Schedule:
  """Learning rate as a function of the optimizer-update count (not micro-steps)."""
  config = _resolve_config(config)
  schedule = config.schedule
  if schedule.name not in SCHEDULES:
    raise ValueError(f'optimizer.schedule.name={schedule.name!r} is unknown; '
                     f'choose one of {list(SCHEDULES)}.')
  if total_steps < 1:
    raise ValueError(f'total_steps={total_steps}: the schedule needs at least one update.')
  warmup_steps = int(schedule.warmup_steps)
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'optimizer.schedule.warmup_steps={warmup_steps} must lie in '
                     f'[0, total_steps={total_steps}).')
  peak = peak_learning_rate(config, batch_size)
  decay_steps = total_steps - warmup_steps

  if schedule.name == 'constant':
    main = optax.constant_schedule(peak)
  elif schedule.name == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=schedule.end_fraction)
  elif schedule.name == 'linear':
    main = optax.linear_schedule(peak, peak * schedule.end_fraction, decay_steps)
  else:
    main = _step_decay(schedule, total_steps, warmup_steps, peak)

  if not warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  # join_schedules hands `main` the count since the warmup ended.
  return optax.join_schedules([warmup, main], [warmup_steps])


def _step_decay(schedule, total_steps, warmup_steps, peak):
  fractions = tuple(schedule.step_boundaries)
  if list(fractions) != sorted(fractions) or any(not 0 < f <= 1 for f in fractions):
    raise ValueError(f'optimizer.schedule.step_boundaries={fractions} must be increasing '
                     f'fractions of total_steps in (0, 1].')
  scales = {}
  for fraction in fractions:
    boundary = round(fraction * total_steps)
    if boundary <= warmup_steps:
      raise ValueError(f'optimizer.schedule.step_boundaries: {fraction} of {total_steps} steps '
                       f'is step {boundary}, inside the {warmup_steps} warmup steps.')
    # Counted from the end of warmup, as join_schedules hands it to us; boundaries
    # that round to the same step compound.
    offset = boundary - warmup_steps
    scales[offset] = scales.get(offset, 1.0) * schedule.step_factor
  return optax.piecewise_constant_schedule(peak, scales)


# ---------------------------------------------------------------------------
# The optimizer.


def _scale_by_lr_multipliers(multiplier_fn: Callable[[str], float]) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's lr multiplier (stateless)."""

  def update(updates, state, params=None):
    del params
    multipliers = _map_paths(multiplier_fn, updates)
    scaled = jax.tree.map(lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype),
                          updates, multipliers)
    return scaled, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _base_optimizer(config, schedule, decay_mask) -> optax.GradientTransformation:
  """The named optimizer with its weight decay and the learning rate applied."""
  weight_decay = float(config.weight_decay)
  if config.name == 'adamw':
    return optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=weight_decay, mask=decay_mask)
  if config.name == 'lars':
    # The same exclusion skips both decay and trust-ratio adaptation (SimCLR practice).
    return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=decay_mask,
                      trust_coefficient=config.trust_coefficient, eps=config.trust_eps,
                      trust_ratio_mask=decay_mask, momentum=config.momentum,
                      nesterov=config.nesterov)
  if config.name == 'sgd':
    decay = [optax.add_decayed_weights(weight_decay, mask=decay_mask)] if weight_decay else []
    momentum = [optax.trace(config.momentum, config.nesterov)] if config.momentum else []
    if config.decoupled_weight_decay:
      parts = momentum + decay
    else:
      parts = decay + momentum
    return optax.chain(*parts, optax.scale_by_learning_rate(schedule))
  raise ValueError(f'optimizer.name={config.name!r} is unknown; choose one of {list(OPTIMIZERS)}.')


def make_optimizer(config, params, total_steps: int,
                   batch_size: Optional[int] = None
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optimizer that `config` describes for this parameter tree.

  Args:
    config: the `config.optimizer` section (see default_config; missing fields take
      their defaults). A whole config holding an `optimizer` section also works.
    params: the parameter tree to train; only its paths are read, so abstract
      shapes (jax.eval_shape) do as well as arrays.
    total_steps: number of optimizer updates, i.e. micro-steps / accumulate_steps.
    batch_size: examples per micro-batch (global, over all devices); needed only
      for lr_reference_batch scaling, which uses batch_size * accumulate_steps.

  Returns:
    (tx, schedule_fn): tx.update expects `params` (weight decay and LARS read them);
    schedule_fn(update_count) is the global learning rate (before lr multipliers).

  Raises:
    ValueError: unknown optimizer or schedule name or config field, a regex that is
      invalid or matches no parameter, or every parameter frozen.
  """
  config = _resolve_config(config)
  if config.name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name={config.name!r} is unknown; '
                     f'choose one of {list(OPTIMIZERS)}.')
  accumulate_steps = int(config.accumulate_steps)
  if accumulate_steps < 1:
    raise ValueError(f'optimizer.accumulate_steps={accumulate_steps} must be >= 1.')
  paths = param_paths(params)
  _validate_regexes(config, paths)
  schedule = make_schedule(config, total_steps, batch_size)

  exclude = (_compile(config.weight_decay_exclude, 'optimizer.weight_decay_exclude')
             if config.weight_decay_exclude else None)
  # Callables rather than fixed trees: inside multi_transform the inner transforms
  # see trees whose frozen leaves are MaskedNodes, and paths are all they need.
  decay_mask = lambda tree: _map_paths(lambda p: not (exclude and exclude.search(p)), tree)

  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(_base_optimizer(config, schedule, decay_mask))
  multiplier_fn = _lr_multiplier_fn(config)
  if any(multiplier_fn(path) != 1.0 for path in paths):
    parts.append(_scale_by_lr_multipliers(multiplier_fn))
  tx = optax.chain(*parts)
  if accumulate_steps > 1:
    # Inside the freeze split, so frozen parameters get no gradient accumulator either.
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps).gradient_transformation()

  frozen = _frozen_fn(config)
  num_frozen = sum(frozen(path) for path in paths)
  if num_frozen == len(paths):
    raise ValueError(f'optimizer.freeze={config.freeze!r} and lr_multipliers '
                     f'{config.lr_multipliers!r} freeze every parameter; nothing would train.')
  if num_frozen:
    labels = lambda tree: _map_paths(lambda p: FROZEN if frozen(p) else TRAINABLE, tree)
    tx = optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
