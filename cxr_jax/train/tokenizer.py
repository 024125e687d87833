"""The `tokenizer` trainer and command line: a report tokenizer trained on dataset splits.

  python -m cxr_jax.train.tokenizer --data synthetic_cxr/site_a:train \\
      --data_dir ~/tensorflow_datasets --vocab_size 2000 --output runs/tokenizer.json

(`python -m cxr_jax.text.tokenizer ...`, the command's earlier name, runs the same.)
The tokenizer itself is `cxr_jax.text.tokenizer`. As the `tokenizer` trainer (`run`,
config `default_config()`) a chain (cxr_jax/studies/chain.py) trains the tokenizer its
image-text stage reads: it writes WORKDIR/tokenizer.json and, like every trainer,
resumes: a file already there is kept when it was trained as the config asks, and is an
error otherwise.
"""

import json
import os
from typing import Iterator, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import ml_collections

from cxr_jax import cli
from cxr_jax.data import pipeline
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train.registry import TRAINERS

FLAGS = flags.FlagValues()
flags.DEFINE_multi_string('data', None, 'NAME:SPLIT of a TFDS dataset with reports; '
                          'repeat to train on several.', flag_values=FLAGS)
flags.DEFINE_string('data_dir', '', 'TFDS data directory ("" = TFDS default).',
                    flag_values=FLAGS)
flags.DEFINE_integer('vocab_size', 2000, 'Vocabulary size, special tokens and the 256 '
                     'byte symbols included (BPE stops earlier if it runs out of merges).',
                     flag_values=FLAGS)
flags.DEFINE_enum('sections', 'both', tokenizer_lib.SECTIONS, 'Report sections to train on, '
                  'and the default of the tokenize op.', flag_values=FLAGS)
flags.DEFINE_integer('min_frequency', 2, 'A merge must occur this often.', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Tokenizer JSON file to write.', flag_values=FLAGS)


def reports_of(name: str, split: str, data_dir: Optional[str] = None) -> Iterator[str]:
  """The `report` text of every record of a dataset split, in stored order."""
  source, info = pipeline.open_source(name, split, data_dir)
  if 'report' not in info.features:
    raise ValueError(f'Dataset {name!r} has no report feature (it has '
                     f'{sorted(info.features)}); image-text training needs reports.')
  for index in range(len(source)):
    yield tokenizer_lib.as_text(source[index]['report'])


def _parse_data(spec: str) -> Tuple[str, str]:
  name, sep, split = spec.rpartition(':')
  if not sep or not name or not split:
    raise ValueError(f'--data {spec!r}: expected NAME:SPLIT, e.g. synthetic_cxr/site_a:train.')
  return name, split


def train_on_datasets(data: Sequence[Tuple[str, str]], vocab_size: int, *,
                      data_dir: Optional[str] = None, sections: str = 'both',
                      min_frequency: int = 2) -> tokenizer_lib.Tokenizer:
  """`Tokenizer.train` on the reports of dataset splits `data`, (NAME, SPLIT) pairs, in order.

  The corpus' source is recorded as 'NAME:SPLIT,NAME:SPLIT...'.
  """
  def reports():
    for name, split in data:
      yield from reports_of(name, split, data_dir or None)

  return tokenizer_lib.Tokenizer.train(
      reports(), vocab_size, sections=sections, min_frequency=min_frequency,
      source=','.join(f'{name}:{split}' for name, split in data))


def _summary(tokenizer: tokenizer_lib.Tokenizer, output: str) -> dict:
  return {'output': output, 'vocab_size': tokenizer.vocab_size, **tokenizer.corpus}


# --- the `tokenizer` trainer (chain stage) ---------------------------------------------

OUTPUT = 'tokenizer.json'  # The file the trainer writes in its workdir.


def default_config() -> ml_collections.ConfigDict:
  """The `tokenizer` trainer's config: the command line's settings, one dataset split."""
  c = ml_collections.ConfigDict()
  c.trainer = 'tokenizer'
  c.data = ml_collections.ConfigDict()
  c.data.name = ''  # TFDS name of a dataset with reports, e.g. 'synthetic_cxr/site_a'.
  c.data.split = 'train'
  c.data.data_dir = ''  # TFDS data directory; '' = the TFDS default.
  c.vocab_size = 2000  # Special tokens and the 256 byte symbols included.
  c.sections = 'both'  # Report sections trained on, and the tokenize op's default.
  c.min_frequency = 2  # A merge must occur this often.
  return c


def run(config, workdir: str) -> dict:
  """Trains on config.data's reports and writes WORKDIR/tokenizer.json; returns a summary.

  A tokenizer.json already there is kept (a re-run resumes) when it was trained on the
  same split with the same settings; a different one is an error naming the differences,
  never a silently mismatched vocabulary.
  """
  if not config.data.name:
    raise ValueError('config.data.name is empty: the tokenizer trainer needs a dataset with '
                     "reports, e.g. 'synthetic_cxr/site_a'.")
  output = os.path.join(workdir, OUTPUT)
  source = f'{config.data.name}:{config.data.split}'
  if os.path.exists(output):
    tokenizer = tokenizer_lib.Tokenizer.load(output)
    asked = {'source': source, 'sections': config.sections,
             'max_vocab_size': config.vocab_size, 'min_frequency': config.min_frequency}
    found = {'sections': tokenizer.sections,
             **{k: tokenizer.corpus.get(k) for k in asked if k != 'sections'}}
    differences = {k: (found[k], asked[k]) for k in asked if found[k] != asked[k]}
    if differences:
      raise ValueError(f'{output} exists but was trained otherwise than the config asks '
                       f'(file, config): {differences}. Delete it to train again.')
    logging.info('%s exists and matches the config; not training again.', output)
    return _summary(tokenizer, output)
  tokenizer = train_on_datasets([(config.data.name, config.data.split)], config.vocab_size,
                                data_dir=config.data.data_dir, sections=config.sections,
                                min_frequency=config.min_frequency)
  os.makedirs(workdir, exist_ok=True)
  tokenizer.save(output)
  logging.info('Wrote %s: %d tokens from %d reports.', output, tokenizer.vocab_size,
               tokenizer.corpus['reports'])
  return _summary(tokenizer, output)


# --- the command line ------------------------------------------------------------------


def main(argv: Sequence[str]) -> dict:
  cli.parse(FLAGS, argv)
  missing = [f'--{n}' for n in ('data', 'output') if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f'{" and ".join(missing)} required.')
  tokenizer = train_on_datasets([_parse_data(spec) for spec in FLAGS.data], FLAGS.vocab_size,
                                data_dir=FLAGS.data_dir, sections=FLAGS.sections,
                                min_frequency=FLAGS.min_frequency)
  tokenizer.save(FLAGS.output)
  corpus = tokenizer.corpus
  logging.info('Wrote %s: %d tokens from %d reports (%d without the %s section(s), %d empty).',
               FLAGS.output, tokenizer.vocab_size, corpus['reports'],
               corpus['section_fallbacks'], FLAGS.sections, corpus['empty'])
  summary = _summary(tokenizer, FLAGS.output)
  print(json.dumps(summary))
  return summary


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
else:  # Run as a program, this file is a second copy: cxr_jax.train registered the first.
  TRAINERS.add('tokenizer', run)
