"""The embeddings file format: reading checks every file and shard and names what is
wrong; a failed write leaves nothing behind, and a killed writer's partial file is
removed by the next run."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cxr_jax import embeddings_file


def _save(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_load_embeddings_errors(tmp_path):
  good = {'embedding': np.zeros((2, 3), np.float32), 'id': np.array(['a', 'b'])}
  with pytest.raises(KeyError, match=r"no_embedding.npz: embeddings file has no \['embedding'\]"):
    embeddings_file.load_embeddings(_save(tmp_path / 'no_embedding.npz', id=good['id']))
  with pytest.raises(ValueError, match="short_id.npz: 'id' has 1 rows, but \"embedding\" has 2"):
    embeddings_file.load_embeddings(_save(tmp_path / 'short_id.npz',
                                          embedding=good['embedding'], id=np.array(['a'])))
  with pytest.raises(KeyError, match='no "findings"'):
    embeddings_file.load_embeddings(_save(tmp_path / 'labels.npz',
                                          labels=np.zeros((2, 1), np.int8), **good))
  with pytest.raises(FileNotFoundError, match='no such embeddings file'):
    embeddings_file.load_embeddings(str(tmp_path / 'missing.npz'))
  shards = tmp_path / 'shards'
  shards.mkdir()
  for index in (0, 2):
    _save(shards / embeddings_file.shard_name(index, 3), embed_spec=np.asarray('{}'), **good)
  with pytest.raises(FileNotFoundError, match='embeddings-00001-of-00003.npz'):
    embeddings_file.load_embeddings(str(shards))
  _save(shards / embeddings_file.shard_name(1, 3), embed_spec=np.asarray('{"other": 1}'), **good)
  with pytest.raises(ValueError, match="00001-of-00003.npz: 'embed_spec' differs"):
    embeddings_file.load_embeddings(str(shards))
  _save(shards / embeddings_file.shard_name(1, 3), embed_spec=np.asarray('{}'), **good)
  loaded = embeddings_file.load_embeddings(str(shards))
  assert loaded['embedding'].shape == (6, 3) and list(loaded['id']) == ['a', 'b'] * 3


def test_a_full_disk_leaves_nothing_behind_and_names_the_file(tmp_path, monkeypatch):
  path = str(tmp_path / embeddings_file.shard_name(2, 4))

  def savez_until_full(f, **arrays):
    f.write(b'x' * 1000)  # Part of the file, then the disk is full.
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(np, 'savez', savez_until_full)
  with pytest.raises(OSError, match=r'Writing .*embeddings-00002-of-00004.npz failed: No space '
                     r'left on device') as e:
    embeddings_file.write(path, {'embedding': np.zeros((2, 3), np.float32)})
  assert e.value.errno == 28
  assert os.listdir(tmp_path) == []
  monkeypatch.undo()
  # A partial file of a writer killed outright is removed by the next run; a live
  # writer's (this process's) is left alone.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  (tmp_path / f'{embeddings_file.shard_name(1, 4)}.tmp-{dead}').write_bytes(b'partial')
  (tmp_path / f'{embeddings_file.shard_name(3, 4)}.tmp-{os.getpid()}').write_bytes(b'partial')
  embeddings_file.remove_stale_temporaries(str(tmp_path))
  assert os.listdir(tmp_path) == [f'{embeddings_file.shard_name(3, 4)}.tmp-{os.getpid()}']
