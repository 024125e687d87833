"""Prepares a dataset: `python -m cxr_jax.data.build NAME[/CONFIG] --data_dir DIR`.

  python -m cxr_jax.data.build cxr_chexpert/small --data_dir ~/tfds \\
      --manual_dir ~/data/CheXpert-v1.0-small
  python -m cxr_jax.data.build nih_cxr14 --data_dir ~/tfds --manual_dir ~/data/nih \\
      --max_side 1024 --on_error skip
  python -m cxr_jax.data.build mimic_cxr/chexpert --data_dir ~/tfds \\
      --manual_dir ~/data/mimic-cxr-jpg --builder_arg reports_dir=~/data/mimic-cxr
  python -m cxr_jax.data.build cxr_manifest --data_dir ~/tfds --manual_dir ~/data/hospital_a

Writes ArrayRecord files under DIR/NAME/CONFIG/VERSION, then prints each split's
size, how many records were skipped, and the name to read the dataset by.

`--max_side` other than the config's (512 by default) builds a separate dataset
named CONFIG_<max_side> (e.g. `cxr_chexpert/small_1024`), so datasets stored at
different resolutions never overwrite each other (for cxr_manifest it replaces the
manifest's `max_side`; the name stays the manifest's). `--raw_size N` stores N x N
uncompressed arrays instead of PNG (the fast training form, see builders/base.py) as
CONFIG_rawN (e.g. `cxr_chexpert/small_raw256`; naming that config implies it).
A dataset that is already prepared is left as it is. `--on_error skip` skips
unreadable images and bad CSV rows and lists each in the dataset's metadata
(`info.metadata['skipped']`).

Building may use TensorFlow; reading the result (cxr_jax.data.pipeline) does not.
"""

import dataclasses
import os
import re
import sys
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from cxr_jax import cli
from cxr_jax import files
from cxr_jax.data import builders  # noqa: F401  Registers the project's builders.
from cxr_jax.data.builders import base

FLAGS = flags.FlagValues()
flags.DEFINE_string('data_dir', None, 'TFDS data directory to write into.', flag_values=FLAGS)
flags.DEFINE_string(
    'manual_dir', None, 'The unpacked download (CheXpert, NIH, MIMIC), or the folder with '
    'manifest.json (cxr_manifest).', flag_values=FLAGS)
flags.DEFINE_integer(
    'max_side', None, 'Longest stored image side; default: the config\'s (512).',
    flag_values=FLAGS)
flags.DEFINE_integer(
    'raw_size', None, 'Store N x N uncompressed arrays (what decode|resize(N) gives) '
    'instead of PNG, for fast training input; the dataset is named CONFIG_rawN.',
    flag_values=FLAGS)
flags.DEFINE_enum('on_error', 'raise', base.ON_ERROR,
                  'raise: stop at the first bad record; skip: skip and list it.',
                  flag_values=FLAGS)
flags.DEFINE_multi_string(
    'builder_arg', [], 'KEY=VALUE passed to the builder, e.g. reports_dir=DIR for mimic_cxr.',
    flag_values=FLAGS)
USAGE = ('Usage: python -m cxr_jax.data.build NAME[/CONFIG] --data_dir DIR '
         '[--manual_dir DIR] [--max_side N] [--raw_size N] [--on_error raise|skip]')

RESOLUTION_SUFFIX = re.compile(r'^(?P<config>.+)_(?P<max_side>\d+)$')
RAW_SUFFIX = re.compile(r'^(?P<config>.+)_raw(?P<raw_size>\d+)$')


def parse_name(name: str) -> Tuple[str, Optional[str]]:
  dataset, _, config = name.partition('/')
  if not dataset or '/' in config:
    raise ValueError(f'Dataset name {name!r} is not of the form NAME or NAME/CONFIG.')
  return dataset, config or None


def parse_builder_args(args: Sequence[str]) -> Dict[str, Any]:
  parsed = {}
  for arg in args:
    key, sep, value = arg.partition('=')
    if not sep or not key.isidentifier():
      raise ValueError(f'--builder_arg {arg!r} is not KEY=VALUE.')
    parsed[key] = os.path.expanduser(value) if value.startswith('~') else value
  return parsed


def project_builders() -> Sequence[str]:
  return sorted(tfds.core.naming.camelcase_to_snakecase(cls.__name__)
                for cls in _subclasses(base.CxrBuilder))


def _subclasses(cls):
  for sub in cls.__subclasses__():
    yield sub
    yield from _subclasses(sub)


def builder_class(dataset: str):
  try:
    return tfds.builder_cls(dataset)
  except Exception:  # tfds raises DatasetNotFoundError with a long registry dump.
    raise ValueError(f'Unknown dataset {dataset!r}; this project builds: '
                     f'{", ".join(project_builders())}.') from None


def resolve_config(cls, config_name: Optional[str], manual_dir: Optional[str],
                   max_side: Optional[int], raw_size: Optional[int] = None):
  """The config to build: a registered one, or one derived for another resolution
  (`max_side`) or stored form (`raw_size`)."""
  match = RAW_SUFFIX.match(config_name or '')
  if match:
    if raw_size and raw_size != int(match['raw_size']):
      raise ValueError(f'{cls.name}/{config_name} stores {match["raw_size"]}-pixel raw '
                       f'arrays, but --raw_size is {raw_size}.')
    config_name, raw_size = match['config'], int(match['raw_size'])
  if raw_size is not None and raw_size < 1:
    raise ValueError(f'--raw_size must be a positive side in pixels, got {raw_size}.')
  config = _resolve_stored_size(cls, config_name, manual_dir, max_side)
  if raw_size:
    if not hasattr(config, 'raw_size'):
      raise ValueError(f'{cls.name} does not take --raw_size.')
    config = dataclasses.replace(config, name=f'{config.name}_raw{raw_size}', raw_size=raw_size)
  return config


def _resolve_stored_size(cls, config_name: Optional[str], manual_dir: Optional[str],
                         max_side: Optional[int]):
  if hasattr(cls, 'config_from_manual_dir'):  # Manifests carry their own config.
    if not manual_dir:
      raise ValueError(f'{cls.name} needs --manual_dir: the folder with manifest.json.')
    return cls.config_from_manual_dir(manual_dir, config_name, max_side)
  registered = cls.builder_configs
  if not registered:  # A builder without configs (a generated dataset, say).
    if config_name or max_side:
      raise ValueError(f'{cls.name} has no configs and takes no --max_side.')
    return None
  if config_name is None:
    config = cls.BUILDER_CONFIGS[0]
  elif config_name in registered:
    config = registered[config_name]
  else:
    match = RESOLUTION_SUFFIX.match(config_name)
    if not (match and match['config'] in registered):
      raise ValueError(f'{cls.name} has no config {config_name!r}; it has '
                       f'{", ".join(registered)} (add _<max_side>, e.g. '
                       f'{next(iter(registered))}_1024, for another resolution).')
    config, suffix_side = registered[match['config']], int(match['max_side'])
    if max_side and max_side != suffix_side:
      raise ValueError(f'{cls.name}/{config_name} is the {suffix_side}-pixel dataset, but '
                       f'--max_side is {max_side}.')
    max_side = suffix_side
  if max_side and not hasattr(config, 'max_side'):
    raise ValueError(f'{cls.name} does not take --max_side.')
  if max_side and max_side != config.max_side:
    # TFDS forbids a custom config under a registered name; the name also keeps
    # datasets at different resolutions in different directories.
    config = dataclasses.replace(config, name=f'{config.name}_{max_side}', max_side=max_side)
  return config


def build(name: str, data_dir: str, manual_dir: Optional[str] = None,
          max_side: Optional[int] = None, on_error: str = 'raise',
          builder_args: Optional[Mapping[str, Any]] = None, raw_size: Optional[int] = None):
  """Prepares dataset `name` ('NAME' or 'NAME/CONFIG') in `data_dir`; returns its builder."""
  dataset, config_name = parse_name(name)
  cls = builder_class(dataset)
  if manual_dir:
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    if not os.path.exists(manual_dir):
      raise FileNotFoundError(f'--manual_dir {manual_dir} does not exist.')
  config = resolve_config(cls, config_name, manual_dir, max_side, raw_size)
  kwargs = dict(builder_args or {})
  if issubclass(cls, base.CxrBuilder):
    kwargs['on_error'] = on_error
  builder = cls(config=config, data_dir=os.path.expanduser(data_dir), **kwargs)
  if builder.is_prepared():
    print(f'{full_name(builder)} is already prepared in {builder.data_dir}; delete that '
          'folder to rebuild it.')
    return builder
  if manual_dir is None and getattr(cls, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    raise ValueError(f'{builder.name} needs --manual_dir:\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if hasattr(config, 'root'):
    manual_dir = config.root  # A manifest given as its JSON file: its folder.
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except OSError as e:
    if not files.is_write_failure(e):
      raise  # A missing input file, say: its message names it.
    # TFDS writes into an 'incomplete.*' folder that it removes on failure, so nothing
    # partial remains; the cause of a failed write (a full disk) names no file itself.
    raise files.failure(f'dataset {full_name(builder)} in {builder.data_dir}', e,
                        'Its partial files were removed') from e
  return builder


def full_name(builder) -> str:
  config = builder.builder_config
  return f'{builder.name}/{config.name}' if config else builder.name


def summary(builder, data_dir: str) -> str:
  """Split sizes, skipped records (with the first few reasons) and the name to read."""
  skipped = (builder.info.metadata or {}).get('skipped', {})
  lines = [f'{full_name(builder)} in {builder.data_dir}:']
  for split, info in sorted(builder.info.splits.items()):
    bad = skipped.get(split, [])
    lines.append(f'  {split}: {info.num_examples} examples, {len(bad)} skipped')
    lines += [f'    skipped {item["source"]}: {item["reason"]}' for item in bad[:5]]
    if len(bad) > 5:
      lines.append(f'    ... and {len(bad) - 5} more (info.metadata["skipped"])')
    unparsed = ((builder.info.metadata or {}).get('unparsed') or {}).get(split, [])
    if unparsed:
      lines.append(f'  {split}: {len(unparsed)} metadata cells not parsed, stored as unknown')
      lines += [f'    {item["source"]}: {item["field"]} {item["value"]!r}: {item["reason"]}'
                for item in unparsed[:5]]
      if len(unparsed) > 5:
        lines.append(f'    ... and {len(unparsed) - 5} more (info.metadata["unparsed"])')
  lines.append(f"Read it with name='{full_name(builder)}', "
               f"data_dir='{data_dir}'.")
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  name, = cli.parse(FLAGS, argv, usage=USAGE, num_positional=1)
  if not FLAGS.data_dir:
    raise app.UsageError(f'--data_dir is required.\n{USAGE}')
  try:
    builder = build(name, FLAGS.data_dir, FLAGS.manual_dir, FLAGS.max_side, FLAGS.on_error,
                    parse_builder_args(FLAGS.builder_arg), FLAGS.raw_size)
  except (ValueError, OSError) as e:  # OSError: FileNotFoundError, a full disk, ...
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(summary(builder, FLAGS.data_dir))


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
