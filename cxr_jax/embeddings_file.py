"""The embeddings file: what `cxr_jax.embed` writes and `probe` and the studies read.

One .npz file, or a directory of shards `embeddings-00000-of-000NN.npz` read back in
order. Per row: 'embedding' float32 [N, D] and 'id' str [N] (always), 'labels' int8
[N, K] (raw label codes) with 'findings' str [K] naming their columns, metadata arrays
(patient_id, sex, age, ...), 'logits' float32 [N, K'] for classifier runs (with
'logit_names' when the run names them) and, for image-text runs, 'image_embedding'
float32 [N, E]. Per set: 'findings', 'logit_names' and 'embed_spec', a JSON string of
the model and data the file came from, the same in every shard. Text embeddings are a
single .npz with 'text_embedding', 'text', 'id' and 'embed_spec'.

Each file is written to a temporary name and renamed when complete, so a file that
exists is whole; `is_complete` tells a resuming writer which shards it can keep.
"""

import dataclasses
import os
import re
from typing import Any, Dict, List
import warnings

import numpy as np

from cxr_jax import files
from cxr_jax import npz_files

# Keys that describe the whole set rather than one row each.
PER_SET_KEYS = ('findings', 'logit_names', 'embed_spec')
REQUIRED_KEYS = ('embedding', 'id')
SHARD_PATTERN = re.compile(r'^embeddings-(\d{5})-of-(\d{5})\.npz$')


def shard_name(index: int, count: int) -> str:
  return f'embeddings-{index:05d}-of-{count:05d}.npz'


# --- writing -----------------------------------------------------------------------------


@dataclasses.dataclass
class Shard:
  """The rows [start, stop) of a set, written to `path`."""
  path: str
  start: int
  stop: int


def plan(output: str, num_examples: int, shard_size: int) -> List[Shard]:
  """One shard for an `output` ending in .npz, else `shard_size` rows per shard file."""
  if output.endswith('.npz'):
    return [Shard(output, 0, num_examples)]
  count = -(-num_examples // shard_size)
  return [Shard(os.path.join(output, shard_name(i, count)), i * shard_size,
                min((i + 1) * shard_size, num_examples)) for i in range(count)]


def is_complete(shard: Shard, spec: str) -> bool:
  """Whether `shard` was already written for this spec; a file of another spec stops."""
  if not os.path.exists(shard.path):
    return False
  try:
    with np.load(shard.path, allow_pickle=False) as f:
      written_spec = str(f['embed_spec']) if 'embed_spec' in f.files else None
      rows = f['id'].shape[0] if 'id' in f.files else -1
  except (OSError, ValueError, EOFError) as e:
    warnings.warn(f'{shard.path} is unreadable ({e}); computing it again.')
    return False
  if written_spec is None:
    raise ValueError(f'{shard.path} exists but was not written by cxr_jax.embed (it has no '
                     'embed_spec). Use another --output or delete it.')
  if written_spec != spec:
    raise ValueError(f'{shard.path} holds embeddings of another model or dataset '
                     f'({written_spec}); this run is {spec}. Use another --output or delete '
                     'the old files.')
  return rows == shard.stop - shard.start


_TEMPORARY = re.compile(r'^(?P<target>.+)\.tmp-(?P<pid>\d+)$')


def write(path: str, arrays: Dict[str, np.ndarray]) -> None:
  """Writes `path` whole or not at all; a failed write (a full disk) leaves nothing."""
  # The temporary name (PATH.tmp-PID) is what remove_stale_temporaries looks for.
  with files.write_atomically(path, 'wb', left='Nothing of it was left behind (the shards '
                              'already written are kept and the re-run continues from '
                              'them)') as f:
    np.savez(f, **arrays)


def remove_stale_temporaries(directory: str) -> None:
  """Removes the partial files of writers that died (kill -9) before cleaning up."""
  for name in os.listdir(directory):
    match = _TEMPORARY.match(name)
    if not match or not match['target'].endswith('.npz'):
      continue
    try:
      os.kill(int(match['pid']), 0)  # Signal 0 only asks whether the process exists.
      continue  # A live process is still writing it.
    except ProcessLookupError:
      pass
    except PermissionError:  # Someone else's live process.
      continue
    os.remove(os.path.join(directory, name))


# --- reading -----------------------------------------------------------------------------


def _shard_files(directory: str) -> List[str]:
  names = sorted(n for n in os.listdir(directory) if SHARD_PATTERN.match(n))
  if not names:
    raise FileNotFoundError(f'No embeddings files (embeddings-NNNNN-of-NNNNN.npz) in '
                            f'{directory}.')
  counts = {int(SHARD_PATTERN.match(n).group(2)) for n in names}
  if len(counts) > 1:
    raise ValueError(f'{directory} mixes shard sets of different sizes {sorted(counts)}.')
  count = counts.pop()
  missing = [shard_name(i, count) for i in range(count) if shard_name(i, count) not in names]
  if missing:
    raise FileNotFoundError(f'{directory} lacks {len(missing)} of its {count} shards, e.g. '
                            f'{missing[0]} (an unfinished run? re-run cxr_jax.embed).')
  return [os.path.join(directory, n) for n in names]


def _read_file(path: str) -> Dict[str, np.ndarray]:
  arrays = npz_files.read(path, 'embeddings .npz file')
  missing = [k for k in REQUIRED_KEYS if k not in arrays]
  if missing:
    raise KeyError(f'{path}: embeddings file has no {missing}; it has {sorted(arrays)}.')
  embedding = arrays['embedding']
  if embedding.ndim != 2 or not np.issubdtype(embedding.dtype, np.floating):
    raise ValueError(f'{path}: "embedding" must be a float [N, D] array, got '
                     f'{embedding.dtype}{list(embedding.shape)}.')
  rows = embedding.shape[0]
  for key, value in arrays.items():
    if key not in PER_SET_KEYS and (value.ndim == 0 or value.shape[0] != rows):
      raise ValueError(f'{path}: {key!r} has {value.shape[0] if value.ndim else 0} rows, but '
                       f'"embedding" has {rows}.')
  if 'labels' in arrays:
    if 'findings' not in arrays:
      raise KeyError(f'{path}: has "labels" but no "findings" naming their columns.')
    if arrays['labels'].ndim != 2 or arrays['labels'].shape[1] != len(arrays['findings']):
      raise ValueError(f'{path}: "labels" {list(arrays["labels"].shape)} does not match the '
                       f'{len(arrays["findings"])} findings.')
  return arrays


def load_embeddings(path: str) -> Dict[str, Any]:
  """An embeddings file, or a directory of shards concatenated in order, checked.

  Per-row arrays (embedding, id, labels, logits, metadata) are concatenated;
  'findings', 'logit_names' and 'embed_spec' describe the set and must agree across
  shards. Errors name the file and the key at fault.
  """
  files = _shard_files(path) if os.path.isdir(path) else [path]
  if not os.path.exists(files[0]):
    raise FileNotFoundError(f'{path}: no such embeddings file or directory.')
  parts = [_read_file(f) for f in files]
  first = parts[0]
  for file, part in zip(files[1:], parts[1:]):
    if set(part) != set(first):
      raise KeyError(f'{file}: keys {sorted(part)} differ from {files[0]}: {sorted(first)}.')
    for key in PER_SET_KEYS:
      if key in part and not np.array_equal(part[key], first[key]):
        raise ValueError(f'{file}: {key!r} differs from {files[0]}; the shards come from '
                         'different runs.')
  out = {k: np.concatenate([p[k] for p in parts]) for k in first if k not in PER_SET_KEYS}
  for key in PER_SET_KEYS:
    if key in first:
      out[key] = str(first[key]) if key == 'embed_spec' else first[key]
  return out
