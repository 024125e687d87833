"""The report tokenizer: sections, round trip, layout, determinism, errors, the op, the
trainer and the CLI."""

import json
import os
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from cxr_jax.data import synthetic
from cxr_jax.data import transforms
from cxr_jax.data.builders import synthetic as synthetic_builders
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train import tokenizer as tokenizer_trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPORTS = [synthetic.study_metadata(i, site='A')['report'] for i in range(150)]


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  tokenizer_lib.Tokenizer.train(REPORTS, 500, sections='both', source='synthetic').save(path)
  return path


def normalised(text):
  """What the tokenizer promises to give back: NFKC, lower case, single spaces."""
  return ' '.join(unicodedata.normalize('NFKC', text).lower().split())


def test_sections_are_parsed_case_insensitively_and_fall_back():
  report = ('EXAMINATION: PA chest radiograph.\nFINDINGS: No  pleural effusion.\n'
            'Heart normal.\nCOMPARISON: None.\nIMPRESSION: Normal chest.')
  select = tokenizer_lib.select_sections
  assert select(report, 'findings') == ('No pleural effusion. Heart normal.', True)
  assert select(report, 'impression') == ('Normal chest.', True)
  assert select(report, 'both') == ('No pleural effusion. Heart normal. Normal chest.', True)
  assert select(report, 'all') == (' '.join(report.split()), True)
  one_line = 'Findings: lungs clear. impression : no acute process.'
  assert select(one_line, 'both') == ('lungs clear. no acute process.', True)
  # Missing sections fall back to what is there, and say so.
  assert select('FINDINGS: small effusion.', 'impression') == ('small effusion.', False)
  assert select('FINDINGS: small effusion.', 'both') == ('small effusion.', False)
  assert select('Heart size normal.', 'findings') == ('Heart size normal.', False)
  assert select('', 'both') == ('', False)
  with pytest.raises(ValueError, match="Unknown report sections 'summary'"):
    select(report, 'summary')


def test_round_trip_and_layout(tokenizer_path):
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  texts = [tokenizer_lib.select_sections(r, 'both')[0] for r in REPORTS[:5]]
  texts += ['Ünusual  TEXT\twith\nnew words: 12.5 cm, ½ zone; émigré']
  ids = tokenizer.encode(texts, 256)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), 256)
  for row, text in zip(ids, texts):
    length = int(np.sum(row != 0))
    assert row[0] == tokenizer_lib.BOS_ID and row[length - 1] == tokenizer_lib.EOS_ID
    assert np.all(row[length:] == 0) and np.all(row[1:length - 1] > 2)
    assert np.all(row < tokenizer.vocab_size)
    assert tokenizer.decode(row) == normalised(text)
  # Subwords, not characters: the corpus' words are single tokens.
  assert len(tokenizer.token_ids('no pleural effusion')) == 3
  # A long text is cut, still ending with <eos>; an empty one is <bos> <eos>.
  cut = tokenizer.encode([texts[0], ''], 6)
  np.testing.assert_array_equal(cut[0, [0, 5]], [1, 2])
  np.testing.assert_array_equal(cut[0, 1:5], ids[0, 1:5])
  np.testing.assert_array_equal(cut[1], [1, 2, 0, 0, 0, 0])


def test_training_and_encoding_are_deterministic(tokenizer_path, tmp_path):
  again = str(tmp_path / 'again.json')
  tokenizer_lib.Tokenizer.train(REPORTS, 500, sections='both', source='synthetic').save(again)
  with open(tokenizer_path) as a, open(again) as b:
    assert json.load(a) == json.load(b)
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  texts = [tokenizer_lib.select_sections(r, 'both')[0] for r in REPORTS[:20]]
  np.testing.assert_array_equal(tokenizer.encode(texts, 64), tokenizer.encode(texts, 64))
  np.testing.assert_array_equal(tokenizer.encode(texts, 64),
                                tokenizer_lib.Tokenizer.load(again).encode(texts, 64))


def test_training_records_sections_and_counts(tmp_path):
  reports = ['FINDINGS: no effusion.\nIMPRESSION: normal.'] * 5
  reports += ['IMPRESSION: cardiomegaly.', '', b'FINDINGS: nodule.']
  tokenizer = tokenizer_lib.Tokenizer.train(reports, 300, sections='both', min_frequency=1)
  assert tokenizer.sections == 'both'
  assert tokenizer.corpus['reports'] == 8
  assert tokenizer.corpus['section_fallbacks'] == 2
  assert tokenizer.corpus['empty'] == 1
  tokenizer.save(str(tmp_path / 't.json'))
  loaded = tokenizer_lib.Tokenizer.load(str(tmp_path / 't.json'))
  assert loaded.corpus == tokenizer.corpus and loaded.vocab_size == tokenizer.vocab_size


def test_bad_input_errors(tokenizer_path, tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.json does not exist'):
    tokenizer_lib.Tokenizer.load(str(tmp_path / 'nowhere.json'))
  (tmp_path / 'bad.json').write_text('{not json')
  with pytest.raises(ValueError, match='bad.json is not JSON'):
    tokenizer_lib.Tokenizer.load(str(tmp_path / 'bad.json'))
  (tmp_path / 'other.json').write_text('{"version": "1.0"}')
  with pytest.raises(ValueError, match="other.json is not a cxr_jax tokenizer file"):
    tokenizer_lib.Tokenizer.load(str(tmp_path / 'other.json'))
  with pytest.raises(ValueError, match='vocab_size=100 is too small'):
    tokenizer_lib.Tokenizer.train(REPORTS, 100)
  with pytest.raises(ValueError, match='No report text'):
    tokenizer_lib.Tokenizer.train(['', ''], 300)
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  with pytest.raises(TypeError, match='sequence of texts'):
    tokenizer.encode('one text', 8)
  with pytest.raises(ValueError, match='max_len=1'):
    tokenizer.encode(['a'], 1)


def test_tokenize_op(tokenizer_path):
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  report = REPORTS[3]
  pp = transforms.Preprocess(f"tokenize('{tokenizer_path}', 48)|keep('text')")
  out = pp({'report': report.encode('utf-8'), 'image': np.zeros((2, 2, 1))},
           np.random.default_rng(0))
  assert list(out) == ['text'] and out['text'].dtype == np.int32
  # The tokenizer's own sections ('both') by default; others when asked.
  both = tokenizer_lib.select_sections(report, 'both')[0]
  np.testing.assert_array_equal(out['text'], tokenizer.encode([both], 48)[0])
  impression = transforms.Preprocess(f"tokenize('{tokenizer_path}', 16, 'impression')")(
      {'report': report}, np.random.default_rng(0))['text']
  assert tokenizer.decode(impression) == normalised(report.split('IMPRESSION:')[1])
  # Fallbacks are counted.
  before = tokenizer_lib.SECTION_FALLBACKS['impression']
  pp({'report': 'FINDINGS: no effusion.'}, np.random.default_rng(0))
  transforms.Preprocess(f"tokenize('{tokenizer_path}', 16, 'impression')")(
      {'report': 'FINDINGS: no effusion.'}, np.random.default_rng(0))
  assert tokenizer_lib.SECTION_FALLBACKS['impression'] == before + 1
  with pytest.raises(KeyError, match='has no report'):
    pp({'image': np.zeros((2, 2, 1))}, np.random.default_rng(0))
  with pytest.raises(FileNotFoundError, match='tokenizer.json does not exist'):
    transforms.Preprocess("tokenize('/no/such/tokenizer.json', 16)")
  with pytest.raises(ValueError, match='No tokenizer file given'):
    transforms.Preprocess("tokenize('', 16)")
  with pytest.raises(ValueError, match='max_len must be an integer of at least 2'):
    transforms.Preprocess(f"tokenize('{tokenizer_path}', 1)")
  with pytest.raises(ValueError, match='sections must be one of'):
    transforms.Preprocess(f"tokenize('{tokenizer_path}', 16, 'body')")


@pytest.fixture(scope='module')
def site_a(tmp_path_factory):
  """(TFDS name, data_dir) of a tiny synthetic site A, with reports."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  name = synthetic_builders.prepare(synthetic_builders.make_cxr_config(
      'A', image_size=32, num_examples=40), data_dir)
  return name, data_dir


def _trainer_config(name, data_dir, **settings):
  config = tokenizer_trainer.default_config()
  config.data.name, config.data.data_dir = name, data_dir
  config.update(settings)
  return config


def _content(path):
  with open(path) as f:
    return json.load(f)


def test_trainer_writes_the_tokenizer_and_resumes(site_a, tmp_path):
  name, data_dir = site_a
  config = _trainer_config(name, data_dir, vocab_size=350, sections='findings')
  summary = tokenizer_trainer.run(config, str(tmp_path / 'run'))
  output = str(tmp_path / 'run' / 'tokenizer.json')
  # The reference: the split's reports read here, trained on directly.
  reports = list(tokenizer_trainer.reports_of(name, 'train', data_dir))
  reference = tokenizer_lib.Tokenizer.train(reports, 350, sections='findings',
                                            source=f'{name}:train')
  reference.save(str(tmp_path / 'reference.json'))
  assert _content(output) == _content(str(tmp_path / 'reference.json'))
  assert summary == {'output': output, 'vocab_size': reference.vocab_size, **reference.corpus}
  assert summary['reports'] == len(reports) > 0 and summary['max_vocab_size'] == 350

  # A re-run keeps the file as it is (the same inode and time), and says what it holds.
  before = os.stat(output)
  assert tokenizer_trainer.run(config, str(tmp_path / 'run')) == summary
  after = os.stat(output)
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  # ... unless the config asks for another tokenizer: an error, not a silent mismatch.
  with pytest.raises(ValueError, match=r"'max_vocab_size': \(350, 500\)"):
    tokenizer_trainer.run(_trainer_config(name, data_dir, vocab_size=500, sections='findings'),
                      str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='config.data.name is empty'):
    tokenizer_trainer.run(_trainer_config('', data_dir), str(tmp_path / 'empty'))

  # Several splits, as the command line takes them: read in order, all recorded.
  both = tokenizer_trainer.train_on_datasets([(name, 'train'), (name, 'validation')], 350,
                                         data_dir=data_dir)
  assert both.corpus['source'] == f'{name}:train,{name}:validation'
  assert both.corpus['reports'] == len(reports) + len(list(
      tokenizer_trainer.reports_of(name, 'validation', data_dir)))


def test_command_line_writes_what_the_trainer_writes(site_a, tmp_path):
  name, data_dir = site_a
  output = tmp_path / 'tok.json'
  result = subprocess.run(
      [sys.executable, '-m', 'cxr_jax.text.tokenizer', f'--data={name}:train',
       f'--data_dir={data_dir}', '--vocab_size=400', '--sections=impression',
       '--min_frequency=3', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary['reports'] == len(list(tokenizer_trainer.reports_of(name, 'train', data_dir))) > 0
  tokenizer = tokenizer_lib.Tokenizer.load(str(output))
  assert tokenizer.sections == 'impression'
  assert tokenizer.corpus['source'] == f'{name}:train'
  assert tokenizer.vocab_size <= 400
  config = _trainer_config(name, data_dir, vocab_size=400, sections='impression',
                           min_frequency=3)
  assert tokenizer_trainer.run(config, str(tmp_path / 'run'))['output'] == str(
      tmp_path / 'run' / 'tokenizer.json')
  assert _content(str(tmp_path / 'run' / 'tokenizer.json')) == _content(str(output))
  bad = subprocess.run([sys.executable, '-m', 'cxr_jax.text.tokenizer', '--data=nosplit',
                        f'--output={output}'], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode != 0 and 'expected NAME:SPLIT' in bad.stderr
