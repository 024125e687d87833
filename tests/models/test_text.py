"""The report encoder: padding invariance, sizes, dtype, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.models import text


def tiny(**kwargs):
  return text.get_text_encoder('text-tiny', vocab_size=50, max_len=24, **kwargs)


def padded(rows, length):
  """Token rows (lists without padding) right-padded with 0 to `length`."""
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return jnp.asarray(out)


ROWS = [[1, 7, 8, 9, 2], [1, 30, 2], [1, 5, 6, 7, 8, 9, 10, 11, 2]]


@pytest.fixture(scope='module')
def model_and_variables():
  model = tiny()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), padded(ROWS, 12))
  return model, variables


def test_output_ignores_padding(model_and_variables):
  model, variables = model_and_variables
  apply = jax.jit(model.apply)
  short = apply(variables, padded(ROWS, 9))
  assert short.shape == (3, 32) and short.dtype == jnp.float32
  for length in (12, 24):
    np.testing.assert_allclose(apply(variables, padded(ROWS, length)), short, atol=1e-6)
  # Each row on its own, with as little padding as it needs, gives the same vector.
  for i, row in enumerate(ROWS):
    np.testing.assert_allclose(apply(variables, padded([row], len(row)))[0], short[i],
                               atol=1e-6)
  # ... while every real token matters, including those after the first.
  changed = [list(r) for r in ROWS]
  changed[0][3] = 40
  moved = apply(variables, padded(changed, 9))
  assert np.max(np.abs(moved[0] - short[0])) > 1e-3
  np.testing.assert_allclose(moved[1:], short[1:], atol=1e-6)


def test_sizes_match_their_parameter_counts():
  vocab, max_len = 1000, 77

  def expected(width, depth, mlp_dim, **_):
    block = (4 * (width * width + width)  # query, key, value, output (with biases)
             + 2 * 2 * width  # two LayerNorms
             + width * mlp_dim + mlp_dim + mlp_dim * width + width)
    return vocab * width + max_len * width + depth * block + 2 * width

  tokens = jnp.zeros((1, max_len), jnp.int32)
  for name, size in text.SIZES.items():
    model = text.get_text_encoder(name, vocab_size=vocab, max_len=max_len)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == expected(**size), name
  assert set(text.SIZES) == {'text-tiny', 'text-small', 'text-base'}
  with pytest.raises(KeyError, match="Unknown text encoder 'text-huge'"):
    text.get_text_encoder('text-huge', vocab_size=10, max_len=8)


def test_bfloat16_compute_keeps_float32_parameters_and_output(model_and_variables):
  _, variables = model_and_variables
  model = tiny(dtype='bfloat16')
  tokens = padded(ROWS, 12)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  low = jax.jit(model.apply)(variables, tokens)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, jax.jit(tiny().apply)(variables, tokens), atol=0.1)


def test_bad_tokens_are_named(model_and_variables):
  model, variables = model_and_variables
  with pytest.raises(ValueError, match='25 tokens per text, more than the max_len=24'):
    model.apply(variables, jnp.ones((1, 25), jnp.int32))
  with pytest.raises(ValueError, match=r'tokens must be integer ids \[B, L\]'):
    model.apply(variables, jnp.ones((1, 5), jnp.float32))
