"""User .npz files that are not .npz files are named as such; pickling is never suggested."""

import numpy as np
import pytest

from cxr_jax import embeddings_file
from cxr_jax import npz_files
from cxr_jax import probe


def test_a_text_file_is_not_called_pickled_data(tmp_path):
  path = tmp_path / 'embeddings.npz'
  path.write_text('id,embedding\na,0.1\n')
  for load, what in ((embeddings_file.load_embeddings, 'embeddings .npz file'),
                     (probe.load, 'probe file')):
    with pytest.raises(ValueError, match=rf"embeddings.npz: not a {what}: an .npz is a zip "
                       r"archive written by numpy.savez, but this file starts with b'id,e'"
                       ) as e:
      load(str(path))
    assert 'pickle' not in str(e.value)


def test_object_arrays_are_refused_without_suggesting_pickling(tmp_path):
  path = str(tmp_path / 'objects.npz')
  np.savez(path, embedding=np.array([{'a': 1}], dtype=object))
  with pytest.raises(ValueError, match='holds Python objects, which are never read') as e:
    npz_files.read(path)
  assert 'allow_pickle' not in str(e.value)
  np.savez(path, embedding=np.zeros((2, 3), np.float32))
  assert npz_files.read(path)['embedding'].shape == (2, 3)
