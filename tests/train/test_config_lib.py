"""config_lib.load: a recipe file, its argument and overrides, as the command line reads them."""

import os

import pytest

from cxr_jax.train import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def recipe(name):
  return os.path.join(REPO, 'configs', name)


def test_load_passes_the_argument_and_applies_overrides():
  config = config_lib.load(recipe('dapt_cxr.py:simclr'),
                           {'total_steps': 7, 'model.dtype': 'bfloat16'})
  assert config.trainer == 'simclr'
  assert config.total_steps == 7 and config.model.dtype == 'bfloat16'
  assert config_lib.load(recipe('supcon_cxr.py')).total_steps != 7


def test_an_override_without_a_field_names_the_valid_keys():
  with pytest.raises(ValueError, match=r"model.trunc: config.model has no key 'trunc'. Valid "
                                       r'keys of config.model: dtype, remat, truncate.'):
    config_lib.load(recipe('supcon_cxr.py'), {'model.trunc': 1})
  with pytest.raises(ValueError, match=r'config.seed is a value, not a section'):
    config_lib.load(recipe('supcon_cxr.py'), {'seed.x': 1})


def test_load_module_gives_the_recipe_constants():
  assert config_lib.load_module(recipe('supcon_chexpert.py')).AUGMENT
