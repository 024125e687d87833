"""merge_variables: the one way a stage's starting weights go over a fresh initialisation."""

import numpy as np
import pytest

from cxr_jax.train import initialization


def fresh():
  return {'params': {'backbone': {'conv': {'kernel': np.zeros((3, 2))}},
                     'head': {'dense': {'kernel': np.zeros((2, 4)), 'bias': np.zeros(4)}}},
          'batch_stats': {'head': {'norm': {'mean': np.zeros(4)}}}}


def test_a_part_that_fits_replaces_the_fresh_one_and_the_rest_stays():
  loaded = {'backbone': {'params': {'conv': {'kernel': np.ones((3, 2))}}}}
  merged = initialization.merge_variables(fresh(), loaded, 'run')
  np.testing.assert_array_equal(merged['params']['backbone']['conv']['kernel'], 1)
  np.testing.assert_array_equal(merged['params']['head']['dense']['bias'], 0)
  assert set(merged) == {'params', 'batch_stats'}


def test_shapes_must_agree_and_the_error_names_the_leaf():
  loaded = {'backbone': {'params': {'conv': {'kernel': np.ones((3, 5))}}}}
  for partial in (False, True):
    with pytest.raises(ValueError, match=r'run: params/backbone/conv/kernel has shape \(3, 5\), '
                                         r'the model expects \(3, 2\). Same model.'):
      initialization.merge_variables(fresh(), loaded, 'run', partial=partial, hint='Same model.')


def test_missing_leaves_are_an_error_unless_partial():
  loaded = {'head': {'params': {'dense': {'kernel': np.ones((2, 4))}},
                     'batch_stats': {'norm': {'mean': np.ones(4)}}}}
  with pytest.raises(ValueError, match=r"the head does not fit .*missing \['head/dense/bias'\]"):
    initialization.merge_variables(fresh(), loaded, 'run')
  merged = initialization.merge_variables(fresh(), loaded, 'run', partial=True)
  np.testing.assert_array_equal(merged['params']['head']['dense']['kernel'], 1)
  np.testing.assert_array_equal(merged['params']['head']['dense']['bias'], 0)  # Fresh.
  np.testing.assert_array_equal(merged['batch_stats']['head']['norm']['mean'], 1)
