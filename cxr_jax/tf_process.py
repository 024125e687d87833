"""Runs a Python program that imports TensorFlow in its own interpreter.

TensorFlow (dataset building, SavedModel export) must not share a process with
training: it claims accelerators and threads, and JAX and TensorFlow builds of the
same libraries may clash. Studies that need it for a step run that step here.
"""

import os
import subprocess
import sys
from typing import Sequence


def run_python(args: Sequence[str], log_path: str, what: str) -> str:
  """`python ARGS` in a fresh interpreter; its stdout, also appended to `log_path`.

  stderr goes to `log_path` (a file, not a pipe, so a chatty program cannot block).
  Raises RuntimeError naming `what`, with the log's tail, when the program fails.
  """
  os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
  with open(log_path, 'a') as log:
    result = subprocess.run([sys.executable, *args], stdout=subprocess.PIPE, stderr=log,
                            text=True)
    log.write(result.stdout)
  if result.returncode:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'{what} failed; see {log_path}:\n{tail}')
  return result.stdout
