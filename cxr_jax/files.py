"""Output files written whole or not at all, and failed writes that say what failed.

A full disk (ENOSPC) or a quota hit midway through a write would otherwise leave a
truncated file that a re-run takes as finished or cannot parse. `write_atomically`
writes to a temporary name beside the target, syncs it, and renames it into place;
when anything fails it removes the temporary file and raises `OSError` (same errno)
naming the target and the cause.
"""

import contextlib
import errno
import os
from typing import IO, Iterator

# What a failed write reports: the disk or quota is full, the file too large, the
# file system read-only or failing. Other OSErrors (a missing input) are not writes.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


def is_write_failure(error: BaseException) -> bool:
  """Whether `error`, or one it was raised from, is a failed write (libraries such as
  TFDS re-raise an OSError with their own message and no errno)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def failure(path: str, error: OSError, left: str = 'Nothing of it was left behind') -> OSError:
  """An OSError naming `path` and the cause, keeping `error`'s errno (ENOSPC, ...)."""
  cause = error.strerror or str(error)
  code = error.errno
  while code is None and (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__  # The errno of the write under a re-raise.
    code = getattr(error, 'errno', None)
  return OSError(code, f'Writing {path} failed: {cause}. {left}; free space (or fix '
                 'the cause) and re-run the same command.')


@contextlib.contextmanager
def write_atomically(path: str, mode: str = 'w', left: str = 'Nothing of it was left behind',
                     **open_kwargs) -> Iterator[IO]:
  """`with write_atomically(path) as f: ...` writes `path` whole, or raises and leaves none.

  `left`: what the error says was left behind (see `failure`).
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    raise failure(path, e, left) from e
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
