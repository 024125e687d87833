"""Runs one recipe: `python -m cxr_jax.main --config configs/NAME.py[:ARG] --workdir DIR`.

The config file's `get_config(arg)` returns a locked ConfigDict; `--config.key=value`
overrides any field, and an unknown key is an error naming the valid ones.
`config.trainer` picks what runs. The resolved config is written to
`DIR/config.json` before anything else, so every run records what it did.

Exit status: 0 when the run (every stage of a chain) finished; EXIT_PREEMPTED (75,
sysexits' EX_TEMPFAIL: "try again") when SIGTERM stopped it after saving, so that a
scheduler or script can tell the two apart and re-run the command, which continues where
it stopped; 1 on an error.
"""

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import studies  # noqa: F401  Registers the studies' trainers (chain, ...).
from cxr_jax import train
from cxr_jax.train import config_lib
from cxr_jax.train import trainer

EXIT_PREEMPTED = 75

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe file whose get_config(arg) returns a ConfigDict; '
    'append ":ARG" to pass an argument.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for the resolved config, checkpoints, metrics and '
    'outputs. Re-running with the same workdir resumes.')
flags.mark_flags_as_required(['config', 'workdir'])


def write_config(config, workdir: str) -> str:
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config.get('trainer') not in train.TRAINERS:
    raise app.UsageError(f'Unknown trainer {config.get("trainer")!r} in config.trainer. '
                         f'Known: {", ".join(train.TRAINERS.names())}.')
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  logging.info('Resolved config written to %s', write_config(config, workdir))
  try:
    train.TRAINERS.get(config.trainer)(config, workdir)
  except trainer.Preempted as e:
    print(f'{e}\nExit status {EXIT_PREEMPTED}: preempted, re-run to continue.',
          file=sys.stderr, flush=True)
    sys.exit(EXIT_PREEMPTED)
  except Exception:  # pylint: disable=broad-except
    # The error must be the last thing printed. Interpreter shutdown still runs (it
    # releases the data workers' semaphores and the like), but with its output
    # discarded: in it, libraries' unfinished background work (Orbax's restore
    # coroutines after a failed resume) prints tracebacks of its own below the error.
    traceback.print_exc()
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(1)


def unknown_override_message(argv, config) -> str:
  """Names the first `--config.a.b=v` whose path the config lacks, with the valid keys."""
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      message = config_lib.unknown_key_message(config, arg[len('--config.'):].split('=', 1)[0])
      if message:
        return f'{arg}: {message}'
  return ''


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except SystemExit:  # absl exits 1 after printing --help; asking for help is no error.
    if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
      sys.exit(0)
    raise
  except (KeyError, AttributeError) as e:  # An override names a key the config lacks.
    spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if spec is None and '--config' in argv[:-1]:
      spec = argv[argv.index('--config') + 1]
    message = unknown_override_message(argv, config_lib.load(spec)) if spec else ''
    sys.exit(f'FATAL Flags parsing error: {message or e}')


def run():
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
