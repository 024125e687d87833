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


# Under pytest-xdist (`-n 2`, CI's two cores) the slowest modules go first, longest
# first: one worker starts the quickstart's test (about 16 minutes) at once while the
# other works through the rest from the slowest down, and the quick tests left at the end
# keep both workers busy, instead of a long test starting last and running alone.
# pyproject.toml's --maxschedchunk=1 has xdist hand out tests one at a time in this
# order; by default it queues an eighth of the suite on each worker up front, and the
# quickstart's worker would run its share only after the quickstart. xdist still gives
# each worker two tests at the start, so the module after the quickstart's begins with
# quick tests (the second test waits for the quickstart). Whole modules move, in this
# order, so module fixtures are set up once, and the modules sharing
# test_inference.trained_runs (a session fixture built once per worker) stay together.
# The order is fixed, so every worker collects the same list.
_SLOWEST_FIRST = (
    'test_quickstart_chain.py',  # The quickstart's pretraining and probes.
    'test_chain.py',  # A chain stopped and resumed in 5 processes.
    'test_distributed.py',  # Two processes joined by jax.distributed.
    'test_trainer.py',  # SIGKILL and SIGTERM runs, 8 devices.
    'test_embed.py',  # The trained_runs family: runs, exports and an image-text run,
    'test_export.py',  # then embeddings, SavedModels,
    'test_inference.py',
    'test_colabs.py',  # and the notebooks.
    'test_zero_shot.py',  # A short image-text run.
    'test_image_text.py',  # 8 devices.
    'test_efficientnet.py',  # Keras references, remat.
    'test_bit.py',  # Remat.
    'test_transfer_study.py',
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  # A stable sort: each module keeps its tests' order, the rest keep pytest's.
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
