"""Chaining recipes: references between stages and datasets, and bad chains named."""

import ml_collections
import pytest

from cxr_jax.train import chain
from cxr_jax.train import config_lib


def test_references_resolve_to_datasets_and_stage_workdirs():
  stage = config_lib.base_config()
  stage.data.name, stage.data.data_dir, stage.init.workdir = '@site_a', '@data_dir', '@generic'
  resolved = chain.resolve(stage, {'site_a': 'synthetic_cxr/site_a_32px', 'data_dir': '/d',
                                   'generic': '/w/generic'})
  assert (resolved.data.name, resolved.data.data_dir, resolved.init.workdir) == (
      'synthetic_cxr/site_a_32px', '/d', '/w/generic')
  assert stage.data.name == '@site_a'  # The recipe itself is left as it was.
  with pytest.raises(ValueError, match=r"config.init.workdir='@generic' refers to nothing"):
    chain.resolve(stage, {'site_a': 'x', 'data_dir': '/d'})


def test_bad_chains_are_named(tmp_path):
  config = ml_collections.ConfigDict({'trainer': 'chain', 'data_dir': str(tmp_path),
                                      'synthetic': {}, 'order': ('a', 'b'),
                                      'stages': {'a': config_lib.base_config()}})
  with pytest.raises(ValueError, match=r"names stages \['b'\] that config.stages lacks"):
    chain.run_chain(config, str(tmp_path))
  with pytest.raises(ValueError, match="synthetic.x.kind must be 'cxr' or 'natural'"):
    chain.build_synthetic({'x': {'kind': 'photos', 'args': {}}}, str(tmp_path))
  config.order = ('a',)
  config.stages.a.trainer = 'chain'
  with pytest.raises(ValueError, match="Stage 'a' has trainer 'chain'"):
    chain.run_chain(config, str(tmp_path))
