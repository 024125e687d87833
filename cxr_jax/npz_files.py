"""Reading user-supplied .npz files (embeddings, probes) with errors that say what is wrong.

numpy's own message for a file that is not an .npz at all (a CSV, a text file) is
"Cannot load file containing pickled data when allow_pickle=False", which reads like a
hint to enable pickling; loading a pickle from a user's file runs arbitrary code, so
the project never suggests it.
"""

from typing import Dict
import zipfile

import numpy as np

_ZIP_MAGIC = (b'PK\x03\x04', b'PK\x05\x06')  # A zip with members; an empty zip.


def read(path: str, what: str = '.npz file') -> Dict[str, np.ndarray]:
  """Every array of the .npz at `path`; ValueError naming the file and the problem."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if head not in _ZIP_MAGIC:
    raise ValueError(f'{path}: not a {what}: an .npz is a zip archive written by numpy.savez, '
                     f'but this file starts with {head!r}.')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    if 'pickle' in str(error):
      raise ValueError(f'{path}: a {what} holds only numeric and string arrays, but this one '
                       'holds Python objects, which are never read from files.') from None
    raise ValueError(f'{path}: not a readable {what} ({error}).') from None
