"""Random streams: every example's random state, derived from (seed, site, keys).

Each component of a study (block, patient, chronic and acute findings, study,
labels, report, devices) and each natural image draws from its own stream, so
changing one leaves the others alone and any example can be regenerated alone.
"""

import zlib

import numpy as np

_BLOCK, _PATIENT, _CHRONIC, _STUDY, _ACUTE, _LABELS, _REPORT, _DEVICES = range(8)
_NATURAL = 1000


def _site_key(site: str) -> int:
  return zlib.crc32(site.encode())


def _rng(seed: int, site: str, *keys: int) -> np.random.Generator:
  return np.random.default_rng(
      np.random.SeedSequence(seed, spawn_key=(_site_key(site), *keys)))


def _pick(rng, options):
  """One element of a sequence (much cheaper than Generator.choice for small tuples)."""
  return options[int(rng.integers(len(options)))]


def _check_seed_index(seed, index):
  if not (isinstance(index, (int, np.integer)) and index >= 0):
    raise ValueError(f'index must be a non-negative integer, got {index!r}.')
  if not (isinstance(seed, (int, np.integer)) and seed >= 0):
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
