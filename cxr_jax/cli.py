"""Command-line plumbing: every tool keeps its flags in its own FlagValues.

The tools (embed, export, probe, zero_shot, label_reports, the tokenizer trainer, the
dataset builder) define their flags in a private `flags.FlagValues`, so importing them
(from a notebook, a test or another tool) neither clashes with other flags nor needs
absl's global parsing; `main(argv)` may then run several times in one process.
`cxr_jax.main` is the exception: its `--config.key=value` overrides come from
ml_collections' config_flags, which parses absl's global flags.
"""

import sys
from typing import Callable, List, Sequence, Tuple, Type

from absl import app
from absl import flags


def parse(flag_values: flags.FlagValues, argv: Sequence[str], usage: str = '',
          num_positional: int = 0) -> List[str]:
  """Parses `argv` into `flag_values` afresh; returns the `num_positional` other arguments.

  Bad flags, or another number of arguments, are usage errors (`usage` says the form).
  """
  if flag_values.is_parsed():  # Called again in one process (tests, notebooks).
    flag_values.unparse_flags()
  try:
    rest = flag_values(list(argv))
  except flags.Error as e:
    raise app.UsageError(f'{e}\n\nFlags:\n{flag_values.get_help()}') from None
  if len(rest) - 1 != num_positional:
    raise app.UsageError(usage or f'Unexpected arguments: {" ".join(rest[1:])}')
  return rest[1:]


def run(main: Callable[[Sequence[str]], object], flag_values: flags.FlagValues,
        doc: str, one_line_errors: Tuple[Type[BaseException], ...] = ()) -> None:
  """`app.run(main)` with --help printing `doc` and the tool's own flags.

  Errors of a type in `one_line_errors` (bad input whose message names it) end the
  command with that message as one line and exit status 1, not a traceback.
  """

  def run_main(argv):
    if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
      print(f'{doc}\nFlags:\n{flag_values.get_help()}')
      return
    try:
      main(argv)  # Its return value is for callers in Python, not an exit status.
    except one_line_errors as e:
      # A progress line may be open on stderr; the error starts a line of its own.
      print(f'\nError: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
      sys.exit(1)

  def parse_absl_flags(argv):
    flags.FLAGS(argv[:1])  # absl's own flags keep their defaults; `main` parses ours.
    return argv

  app.run(run_main, flags_parser=parse_absl_flags)
