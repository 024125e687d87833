"""Test-session setup shared by every test module."""

import os

import jax
import pytest

# Many tests build the same small models in fresh closures; a persistent
# compilation cache turns those repeated XLA compiles into cache hits.
_CACHE_DIR = os.environ.get('CXR_JAX_TEST_COMPILATION_CACHE',
                            os.path.join(os.path.dirname(__file__), '..', '.jax_test_cache'))
jax.config.update('jax_compilation_cache_dir', os.path.abspath(_CACHE_DIR))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
# The same for the tests' subprocesses (restarted runs, the command line, the chain),
# which read JAX's settings from the environment.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.abspath(_CACHE_DIR))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


@pytest.fixture(autouse=True)
def _quiet_tensorflow(monkeypatch):
  monkeypatch.setenv('TF_CPP_MIN_LOG_LEVEL', '3')


# The longest test (the quickstart's pretraining, minutes) goes first, so that under
# pytest-xdist one worker starts it while the other works through the rest, instead of
# it starting last and running alone. Only whole modules move, so module fixtures are
# still set up once.
_LONGEST_FIRST = ('test_quickstart_chain.py',)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: os.path.basename(str(item.fspath)) not in _LONGEST_FIRST)
