"""Every recipe in configs/ is a valid config, for every argument its docstring documents.

A recipe is checked the way `python -m cxr_jax.main` would use it, without data or
accelerators:
  * `get_config()` (when it has no required argument) and `get_config(ARG)` for each
    `configs/NAME.py:ARG` its docstring shows return a ConfigDict whose trainer is
    registered;
  * its keys are exactly those of its trainer's schema (`base_config()`, plus
    image-text's fields for that trainer): a misspelt key is an error here, not a
    field the trainer silently never reads; values keep the schema's types;
  * what the trainer needs at start holds (accumulation divides total_steps, a best
    metric has evaluations, intervals are at least 1, the schedule builds);
  * its preprocessing strings parse and turn an encoded 512 px image into what the
    backbone expects (3 channels, its input range, the same size for training and
    evaluation);
  * its network builds: `jax.eval_shape` of init (shapes only, so big models cost only
    tracing), with a classifier sized to the dataset's findings or classes, and its
    optimizer builds on those parameters (names, regexes).
`test_checks_catch_planted_mistakes` shows each check failing on a broken recipe.
Multi-stage recipes whose trainer has its own schema are checked through the stage
configs they hold (any nested section with a `trainer` field).
"""

import functools
import glob
import inspect
import os
import re

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax import models
from cxr_jax import studies  # noqa: F401  Registers 'chain' and 'transfer_study'.
from cxr_jax import train
from cxr_jax.data import transforms
from cxr_jax.models import heads
from cxr_jax.train import config_lib
from cxr_jax.train import optimizers
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
# Backbone input ranges (README, Models): BiT takes [-1, 1], EfficientNet [0, 255].
INPUT_RANGES = {'bit-': (-1.0, 1.0), 'efficientnet-': (0.0, 255.0)}
PREPROCESSING_KEYS = ('pp', 'pp_eval')
IMAGE_SIDE = 512  # What the CXR builders store.
SMALL_IMAGE = 32  # Parameter shapes do not depend on the image size.


def _schema(trainer_name):
  """The config a recipe of this trainer starts from, or None when the trainer only runs
  other recipes (a chain) or has no recipe fields of its own to compare with."""
  if trainer_name == 'image_text':
    from cxr_jax.train import image_text  # pylint: disable=g-import-not-at-top
    return image_text.add_config_fields(config_lib.base_config())
  if trainer_name in trainer.STAGES:
    return config_lib.base_config()
  if trainer_name in train.TRAINERS:  # A trainer of its own kind, e.g. transfer_study.
    module = inspect.getmodule(train.TRAINERS.get(trainer_name))
    if hasattr(module, 'default_config'):
      return module.default_config()
  return None


def trains_a_network(stage):
  """Stages of the one training loop (base_config recipes): model, data, optimizer."""
  return stage.trainer in trainer.STAGES or stage.trainer == 'image_text'


@functools.lru_cache(maxsize=None)
def _module(path):
  return config_lib.load_module(path)


def documented_args(path):
  """ARGs of `configs/NAME.py:ARG` in the recipe's text, in order, without repeats."""
  name = os.path.basename(path)
  with open(path) as f:
    found = re.findall(r'configs/' + re.escape(name) + r':([\w./:,=+-]+)', f.read())
  return list(dict.fromkeys(arg.rstrip('.,:') for arg in found))


def _defaults(path):
  """get_config's default arguments, or None when one of its parameters has none."""
  parameters = inspect.signature(_module(path).get_config).parameters.values()
  if any(p.default is inspect.Parameter.empty for p in parameters):
    return None
  return [p.default for p in parameters]


def _specs():
  """(path, arg) per recipe: its documented arguments, and no argument unless the
  default is one of those."""
  specs = []
  for path in CONFIG_FILES:
    name, args, defaults = os.path.basename(path), documented_args(path), _defaults(path)
    if defaults is not None and not set(defaults) & set(args):
      specs.append(pytest.param(path, None, id=name))
    specs += [pytest.param(path, arg, id=f'{name}:{arg}') for arg in args]
  return specs


SPECS = _specs()


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  """A tiny report tokenizer, for recipes whose preprocessing reads one."""
  from cxr_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from cxr_jax.text import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tokenizer') / 'tokenizer.json')
  reports = [synthetic.study_metadata(i, site='A')['report'] for i in range(50)]
  tokenizer_lib.Tokenizer.train(reports, 300).save(path)
  return path


def _sections(config, where='config'):
  """(where, section) for `config` and every section below it."""
  yield where, config
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _sections(value, f'{where}.{key}')


def load(path, arg, tokenizer_path=None):
  """The recipe's config as `cxr_jax.main` gets it (locked), its tokenizer made local."""
  module = _module(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  assert isinstance(config, ml_collections.ConfigDict), (
      f'{path}: get_config returned {type(config).__name__}, not an ml_collections.ConfigDict.')
  for _, section in _sections(config):
    if tokenizer_path and 'text' in section and 'tokenizer' in section.text:
      section.text.tokenizer = tokenizer_path
  config.lock()
  return config


def stage_configs(config, where='config'):
  """The recipes a trainer runs: `config` itself when its trainer has a schema, else the
  recipes it holds (sections with a `trainer` field, e.g. a chain's stages)."""
  if 'trainer' in config and _schema(config.trainer) is not None:
    return [(where, config)]
  found = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      found += stage_configs(value, f'{where}.{key}')
  return found


def _leaves(config, open_sections=(), prefix=''):
  """{'a.b': value} over a config; an empty section of the schema (a mapping such as
  label_policy.per_finding) is open: a recipe's keys under it are its values."""
  out = {}
  for key, value in config.items():
    path = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict) and value and path not in open_sections:
      out.update(_leaves(value, open_sections, path + '.'))
    else:
      out[path] = value
  return out


def _compatible(value, default):
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, (int, float)):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def _example_image():
  """An encoded 512 px RGB PNG whose every 16 x 16 patch runs from black to white, so
  any crop, and any resize by up to 8x, still holds dark and bright pixels."""
  ramp = np.arange(IMAGE_SIDE) % 16
  image = (ramp[:, None] + ramp[None, :]) * (255 / 30)
  image = np.stack([image, image[::-1], image[:, ::-1]], axis=-1)
  ok, encoded = cv2.imencode('.png', np.round(image).astype(np.uint8))
  assert ok
  return encoded.tobytes()


EXAMPLE = {'image': _example_image(),
           'report': 'FINDINGS: The lungs are clear. IMPRESSION: No acute disease.'}


def _input_range(model_name):
  for prefix, value_range in INPUT_RANGES.items():
    if model_name.startswith(prefix):
      return value_range
  raise AssertionError(f'No input range known for model {model_name!r}; add its family to '
                       'INPUT_RANGES in tests/test_configs.py.')


def dataset_classes(name, findings, data_dir):
  """Outputs a classifier on dataset `name` needs, from its builder (no data needed); None
  when the builder cannot say (a manifest, an unknown name)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cxr_jax.data import builders  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    info = tfds.builder(name, data_dir=data_dir).info
  except Exception:  # pylint: disable=broad-except
    return None
  known = tuple((info.metadata or {}).get('findings', ()))
  if known:
    unknown = [f for f in findings if f not in known]
    assert not unknown, f'data.findings {unknown} are not findings of {name}: {list(known)}.'
    return len(findings or known)
  if 'label' in info.features:
    return info.features['label'].num_classes
  return None


def _network_and_inputs(config):
  """The network the trainer builds for `config` and the positional/keyword init inputs."""
  images = jnp.zeros((1, SMALL_IMAGE, SMALL_IMAGE, 3), jnp.float32)
  if config.trainer == 'image_text':
    from cxr_jax.models import image_text  # pylint: disable=g-import-not-at-top
    return image_text.build_network(config), (images,), {
        'tokens': image_text.init_inputs(config)['tokens']}
  if config.trainer == 'model_summary':
    return models.build_model(config), (images,), {}
  return trainer.build_network(config), (images,), {}


_SHAPES = {}


def _forward_shapes(config):
  """The network and eval_shape of its `init_with_output`: (outputs, variables) as shapes.

  Cached per network and inputs: recipes that differ only in training settings share it.
  """
  network, args, kwargs = _network_and_inputs(config)
  key = (repr(network), tuple((k, v.shape) for k, v in sorted(kwargs.items())))
  if key not in _SHAPES:
    _SHAPES[key] = jax.eval_shape(
        lambda rng: network.init_with_output(rng, *args, train=False, **kwargs),
        jax.random.PRNGKey(0))
  return network, _SHAPES[key]


# --- the checks (each raises AssertionError naming what is wrong) ------------------------


def check_keys(config):
  for where, stage in stage_configs(config):
    expected = _leaves(_schema(stage.trainer))
    open_sections = [k for k, v in expected.items() if isinstance(v, ml_collections.ConfigDict)]
    got = _leaves(stage, open_sections)
    unknown = sorted(set(got) - set(expected))
    missing = sorted(set(expected) - set(got))
    assert not unknown, f'{where} has keys its trainer does not read: {unknown}.'
    assert not missing, f'{where} lacks keys of its schema: {missing}.'
    mistyped = {k: (got[k], expected[k]) for k in got if not _compatible(got[k], expected[k])}
    assert not mistyped, f'{where} has values of the wrong type (value, schema\'s): {mistyped}.'


def training_stages(config):
  return [(where, stage) for where, stage in stage_configs(config) if trains_a_network(stage)]


def check_run_settings(config):
  for where, stage in training_stages(config):
    accumulate = stage.optimizer.accumulate_steps
    assert stage.total_steps % accumulate == 0, (
        f'{where}: total_steps={stage.total_steps} is not a multiple of '
        f'optimizer.accumulate_steps={accumulate}.')
    for key, value in (('batch_size', stage.batch_size), ('log_every', stage.log_every),
                       ('checkpoint.every', stage.checkpoint.every)):
      assert value >= 1, f'{where}: {key}={value} must be at least 1.'
    if stage.eval.best_metric:
      assert stage.eval.every > 0, f'{where}: eval.best_metric needs eval.every > 0.'
    # Raises ValueError naming the field: unknown schedule, warmup or boundaries off.
    optimizers.make_schedule(stage.optimizer, stage.total_steps // accumulate, stage.batch_size)
    if stage.trainer == 'finetune' and stage.finetune.mode == 'lpft':
      lp_steps = stage.finetune.lp_steps
      assert lp_steps > 0 and lp_steps % accumulate == 0, (
          f'{where}: finetune.lp_steps={lp_steps} must be a positive multiple of '
          f'optimizer.accumulate_steps={accumulate}.')
      optimizers.make_schedule(stage.optimizer, lp_steps // accumulate, stage.batch_size)


def _preprocessed(pp, where):
  """The views `pp` makes of EXAMPLE, [V, H, W, C]; checks what every backbone needs."""
  out = transforms.Preprocess(pp)(dict(EXAMPLE), np.random.default_rng(0))
  image = np.asarray(out['image'])
  views = image if image.ndim == 4 else image[None]
  assert views.ndim == 4 and views.shape[-1] == 3 and views.dtype == np.float32, (
      f'{where}={pp!r} gives {image.dtype} {image.shape}; backbones take float32 [H, W, 3].')
  assert np.all(np.isfinite(views)), f'{where}={pp!r} gives non-finite values.'
  return views


def check_preprocessing(config):
  """Every preprocessing string in the recipe; for training stages, the backbone's input."""
  strings = 0
  for where, section in _sections(config):
    for key in PREPROCESSING_KEYS:
      if isinstance(section.get(key), str) and section[key]:
        _preprocessed(section[key], f'{where}.{key}')
        strings += 1
    if isinstance(section.get('batch_pp'), str):
      transforms.BatchPreprocess(section.batch_pp)
  for where, stage in training_stages(config):
    low, high = _input_range(stage.model_name)
    sizes = {}
    for key in PREPROCESSING_KEYS:
      pp = stage.data[key]
      views = _preprocessed(pp, f'{where}.data.{key}')
      assert low - 1e-3 <= views.min() and views.max() <= high + 1e-3, (
          f'{where}.data.{key}={pp!r} gives values in [{views.min()}, {views.max()}]; '
          f'{stage.model_name} takes [{low}, {high}].')
      middle = (low + high) / 2  # Dark and bright pixels must land on either side.
      assert views.min() < middle < views.max(), (
          f'{where}.data.{key}={pp!r} maps a black-to-white image to [{views.min()}, '
          f'{views.max()}], not across {stage.model_name}\'s input range [{low}, {high}].')
      sizes[key] = views.shape[1:3]
    assert sizes['pp'] == sizes['pp_eval'], (
        f'{where}: training images are {sizes["pp"]}, evaluation images {sizes["pp_eval"]}.')
  return strings


def networks_of(config):
  """(where, recipe) of every network the recipe builds."""
  if config.trainer == 'model_summary':
    return [('config', config)]
  return training_stages(config)


def check_network(config, data_dir):
  for where, stage in networks_of(config):
    network, (outputs, variables) = _forward_shapes(stage)
    assert jax.tree.leaves(variables['params']), f'{where}: the network has no parameters.'
    _, aux = outputs
    assert aux['embedding'].ndim == 2 and aux['embedding'].shape[0] == 1
    if isinstance(getattr(network, 'head', None), (heads.LinearHead, heads.MLPHead)):
      classes = stage.head.num_classes
      assert classes >= 1, f'{where}: a classifier head needs head.num_classes >= 1.'
      assert outputs[0].shape == (1, classes)
      expected = dataset_classes(stage.data.name, tuple(stage.data.findings), data_dir)
      assert expected in (None, classes), (
          f'{where}: head.num_classes={classes}, but {stage.data.name} has {expected} '
          'findings or classes to predict.')
    if 'optimizer' in stage:
      # Names and regexes (freeze, weight-decay exclusion) against the real parameter paths.
      accumulate = stage.optimizer.accumulate_steps
      optimizers.make_optimizer(stage.optimizer, variables['params'],
                                stage.total_steps // accumulate, stage.batch_size)


# --- the tests ---------------------------------------------------------------------------


def test_recipes_are_found():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'supcon_cxr.py', 'bit_hyperrule_finetune.py', 'probe_nih.py'} <= names
  assert documented_args(os.path.join(REPO, 'configs', 'probe_nih.py')) == [
      'linear', 'mlp', 'full', 'lpft']


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_recipe_without_default_argument_documents_one(path):
  assert hasattr(_module(path), 'get_config'), f'{path} defines no get_config.'
  assert _defaults(path) is not None or documented_args(path), (
      f'{path}: get_config needs an argument, but the docstring shows no '
      f'`configs/{os.path.basename(path)}:ARG` example.')


@pytest.mark.parametrize('path,arg', SPECS)
def test_trainer_is_registered(path, arg):
  config = load(path, arg)
  for where, stage in [('config', config)] + stage_configs(config):
    name = stage.get('trainer')
    assert name in train.TRAINERS.names(), (
        f'{path}:{arg}: {where}.trainer={name!r} is not registered; known: '
        f'{list(train.TRAINERS.names())}.')


@pytest.mark.parametrize('path,arg', SPECS)
def test_keys_match_the_trainers_schema(path, arg):
  config = load(path, arg)
  if not stage_configs(config):
    pytest.skip(f'trainer {config.trainer!r} has no recipe schema and holds no recipes.')
  check_keys(config)


@pytest.mark.parametrize('path,arg', SPECS)
def test_run_settings_are_consistent(path, arg):
  config = load(path, arg)
  if not training_stages(config):
    pytest.skip(f'{config.trainer!r} runs no training loop of its own.')
  check_run_settings(config)


@pytest.mark.parametrize('path,arg', SPECS)
def test_preprocessing_gives_the_backbone_its_input(path, arg, tokenizer_path):
  if not check_preprocessing(load(path, arg, tokenizer_path)):
    pytest.skip('no preprocessing in this recipe.')


@pytest.mark.parametrize('path,arg', SPECS)
def test_network_builds(path, arg, tokenizer_path, tmp_path):
  config = load(path, arg, tokenizer_path)
  if not networks_of(config):
    pytest.skip(f'{config.trainer!r} builds its networks from other runs.')
  check_network(config, str(tmp_path))


def _planted(mistake):
  """configs/finetune_cxr.py (a small recipe) with one mistake made in it."""
  config = load(os.path.join(REPO, 'configs', 'finetune_cxr.py'), None)
  with config.unlocked():
    mistake(config)
  return config


@pytest.mark.parametrize('check,mistake,message', [
    (check_keys, lambda c: setattr(c.optimizer, 'learning_rte', 0.1),
     r"keys its trainer does not read: \['optimizer.learning_rte'\]"),
    (check_keys, lambda c: setattr(c, 'data', ml_collections.ConfigDict({'name': 'x'})),
     r'lacks keys of its schema: \[.*data.pp'),
    (check_keys, lambda c: c.data.label_policy.update(per_finding={'nodule': 'ones'}), None),
    (check_run_settings, lambda c: setattr(c.optimizer, 'accumulate_steps', 3),
     'not a multiple of optimizer.accumulate_steps=3'),
    (check_run_settings, lambda c: setattr(c.eval, 'best_metric', 'auroc_mean'),
     'needs eval.every > 0'),
    (check_run_settings, lambda c: setattr(c.checkpoint, 'every', 0),
     'checkpoint.every=0 must be at least 1'),
    (check_preprocessing, lambda c: setattr(c, 'model_name', 'efficientnet-b0'),
     r'efficientnet-b0 takes \[0.0, 255.0\]'),
    (check_preprocessing, lambda c: setattr(c.data, 'pp', c.data.pp.replace(
        'value_range(-1, 1, 0, 1)|', '')), r'not across bit-tiny\'s input range'),
    (check_preprocessing, lambda c: setattr(c.data, 'pp_eval', c.data.pp_eval.replace(
        'central_crop(56)', 'central_crop(48)')), r'evaluation images \(48, 48\)'),
    (check_preprocessing, lambda c: setattr(c.data, 'pp', 'decode|resize(56)'),
     'backbones take float32'),
    (check_network, lambda c: setattr(c.head, 'num_classes', 5),
     'but synthetic_cxr/site_b has 7 findings'),
    (check_network, lambda c: setattr(c.head, 'num_classes', 0), 'needs head.num_classes >= 1'),
])
def test_checks_catch_planted_mistakes(check, mistake, message, tmp_path):
  config = _planted(mistake)
  args = (config, str(tmp_path)) if check is check_network else (config,)
  if message is None:  # Not a mistake: the check passes.
    check(*args)
    return
  with pytest.raises(AssertionError, match=message):
    check(*args)
