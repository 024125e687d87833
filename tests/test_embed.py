"""The embedding tool: every data source and both model kinds, shards, resuming, errors;
image-text runs' joint image embeddings and text embeddings."""

import os
import re
import subprocess
import sys

from absl import app
import cv2
import numpy as np
import pytest

from cxr_jax import embed
from cxr_jax import embeddings_file
from cxr_jax.data import images as images_lib
from cxr_jax.data import pipeline
from cxr_jax.data import sources
from test_export import PROMPTS  # pylint: disable=g-bad-import-order
from test_export import exported_runs  # pylint: disable=g-bad-import-order
from test_export import image_text_run  # pylint: disable=g-bad-import-order
from test_export import shared_embedder  # pylint: disable=g-bad-import-order
from test_inference import shared_model  # pylint: disable=g-bad-import-order
from test_inference import trained_runs  # pylint: disable=g-bad-import-order

TOLERANCE = 1e-4
LABEL_COLUMNS = ('cardiomegaly', 'nodule')
CODE_CELLS = {1: '1', 0: '0', -1: '-1', -2: ''}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """Models of both kinds, and the test split as TFDS, as a folder of PNGs and as a CSV."""
  runs = trained_runs(tmp_path_factory)
  exports = exported_runs(tmp_path_factory)
  root = tmp_path_factory.mktemp('embed_data')
  source, info = pipeline.open_source(runs['dataset'], 'test', runs['data_dir'])
  findings = pipeline.findings_of(info)
  rows = ['path,' + ','.join(LABEL_COLUMNS) + ',patient_id,age']
  records = {}
  for index in range(len(source)):
    record = source[index]
    image_id, patient = record['image_id'].decode(), record['patient_id'].decode()
    relative = f'{patient}/{image_id}.png'
    os.makedirs(root / 'images' / patient, exist_ok=True)
    (root / 'images' / relative).write_bytes(record['image'])  # The stored PNG itself.
    codes = [int(record['labels'][findings.index(c)]) for c in LABEL_COLUMNS]
    rows.append(f'images/{relative},' + ','.join(CODE_CELLS[c] for c in codes)
                + f',{patient},{record["age"]}')
    png = record['image']
    records[image_id] = {'labels': np.asarray(record['labels'], np.int8), 'age': record['age'],
                         'patient_id': patient}
  header, body = rows[0], rows[1:]
  # Listed in reverse, so that rows must be matched by id, not by position.
  (root / 'list.csv').write_text('\n'.join([header] + body[::-1]) + '\n')
  models = {kind: {'workdir': shared_model(runs[kind]),
                   'saved_model': shared_embedder(exports[kind])}
            for kind in ('classifier', 'supcon')}
  return {'runs': runs, 'exports': exports, 'models': models, 'findings': findings,
          'records': records, 'png': png, 'folder': str(root / 'images'),
          'csv': str(root / 'list.csv'), 'tfds': f'{runs["dataset"]}:test', 'data_dir': runs['data_dir']}


def _image_id(row_id: str) -> str:
  return os.path.splitext(os.path.basename(row_id))[0]


@pytest.mark.parametrize('kind', ['classifier', 'supcon'])
def test_every_source_and_model_kind_gives_the_same_embeddings(setup, kind, tmp_path):
  results = {}
  for model_kind, model in setup['models'][kind].items():
    for data in ('tfds', 'folder', 'csv'):
      output = str(tmp_path / f'{model_kind}_{data}')
      source = sources.from_spec(setup[data], setup['data_dir'], label_columns=LABEL_COLUMNS)
      embed.embed_dataset(model, source, output, batch_size=4, shard_size=8)
      results[model_kind, data] = embeddings_file.load_embeddings(output)
  reference = results['workdir', 'tfds']
  order = {_image_id(i): n for n, i in enumerate(reference['id'])}
  assert sorted(order) == sorted(setup['records'])
  for (model_kind, data), result in results.items():
    rows = [order[_image_id(i)] for i in result['id']]
    assert sorted(rows) == list(range(len(order))), (model_kind, data)
    for key in ('embedding', 'logits'):
      assert (key in result) == (key in reference) == (kind == 'classifier' or key == 'embedding')
      if key in result:
        np.testing.assert_allclose(result[key], reference[key][rows], atol=TOLERANCE,
                                   err_msg=f'{model_kind} {data} {key}')
  tfds = results['saved_model', 'tfds']
  assert list(tfds['findings']) == list(setup['findings'])
  for row, image_id in enumerate(tfds['id']):
    np.testing.assert_array_equal(tfds['labels'][row], setup['records'][image_id]['labels'])
    assert tfds['age'][row] == setup['records'][image_id]['age']
  csv = results['workdir', 'csv']
  assert list(csv['findings']) == list(LABEL_COLUMNS)
  columns = [list(setup['findings']).index(c) for c in LABEL_COLUMNS]
  for row, path in enumerate(csv['id']):
    record = setup['records'][_image_id(path)]
    np.testing.assert_array_equal(csv['labels'][row], record['labels'][columns])
    assert csv['patient_id'][row] == record['patient_id']
  folder = results['saved_model', 'folder']
  assert 'labels' not in folder and all(i.endswith('.png') and '/' in i for i in folder['id'])
  if kind == 'classifier':
    assert list(tfds['logit_names']) == list(setup['findings'])


class _Interrupted(BaseException):
  """A kill, not an error: not an Exception, so embed does not take it for a bad image."""


class _FailsAfter:
  """A model that raises on its n-th batch, as if the job were killed there."""

  def __init__(self, model, batches):
    self.model, self.left = model, batches

  def __getattr__(self, name):
    return getattr(self.model, name)

  def embed_arrays(self, *args, **kwargs):
    self.left -= 1
    if self.left < 0:
      raise _Interrupted()
    return self.model.embed_arrays(*args, **kwargs)


def test_resume_is_identical_to_an_uninterrupted_run(setup, tmp_path, capfd):
  model = setup['models']['supcon']['workdir']
  straight = str(tmp_path / 'straight')
  embed.embed_dataset(model, setup['tfds'], straight, batch_size=4, shard_size=4,
                      data_dir=setup['data_dir'])
  expected = embeddings_file.load_embeddings(straight)
  shards = sorted(os.listdir(straight))
  assert len(shards) >= 2 and shards[0].endswith(f'-of-{len(shards):05d}.npz')

  # Killed in the second shard: the first is complete, nothing else is left behind.
  resumed = str(tmp_path / 'resumed')
  with pytest.raises(_Interrupted):
    embed.embed_dataset(_FailsAfter(model, 1), setup['tfds'], resumed, batch_size=4,
                        shard_size=4, data_dir=setup['data_dir'])
  assert sorted(os.listdir(resumed)) == shards[:1]
  first_written = os.path.getmtime(os.path.join(resumed, shards[0]))
  embed.embed_dataset(model, setup['tfds'], resumed, batch_size=4, shard_size=4,
                      data_dir=setup['data_dir'])
  assert os.path.getmtime(os.path.join(resumed, shards[0])) == first_written
  assert sorted(os.listdir(resumed)) == shards

  # The last shard removed and computed again.
  os.remove(os.path.join(resumed, shards[-1]))
  capfd.readouterr()
  embed.embed_dataset(model, setup['tfds'], resumed, batch_size=4, shard_size=4,
                      data_dir=setup['data_dir'])
  log = capfd.readouterr().err
  assert f'{len(shards) - 1} of {len(shards)} embedding files already complete' in log
  last_batches = -(-(len(expected['id']) - 4 * (len(shards) - 1)) // 4)
  assert f'step {last_batches}/{last_batches}' in log
  result = embeddings_file.load_embeddings(resumed)
  assert set(result) == set(expected)
  for key in expected:
    np.testing.assert_array_equal(result[key], expected[key], err_msg=key)


def test_files_of_another_run_are_not_mixed_in(setup, tmp_path):
  output = str(tmp_path / 'out')
  embed.embed_dataset(setup['models']['supcon']['workdir'], setup['folder'], output,
                      batch_size=4)
  with pytest.raises(ValueError, match='another model or dataset'):
    embed.embed_dataset(setup['models']['classifier']['workdir'], setup['folder'], output,
                        batch_size=4)


def test_unreadable_image_is_named(setup, tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  data = setup['png']
  (folder / 'a_good.png').write_bytes(data)
  (folder / 'b_truncated.png').write_bytes(data[:len(data) // 2])
  (folder / 'notes.txt').write_text('not an image, not listed')
  with pytest.raises(images_lib.ImageError, match='b_truncated.png: truncated or corrupt PNG'):
    embed.embed_dataset(setup['models']['supcon']['workdir'], str(folder),
                        str(tmp_path / 'out.npz'), batch_size=4)
  assert not os.path.exists(tmp_path / 'out.npz')


def test_a_bad_image_ends_the_command_in_one_line_naming_the_file(setup, tmp_path):
  folder = tmp_path / 'images'
  folder.mkdir()
  (folder / 'a_good.png').write_bytes(setup['png'])
  gray = cv2.imdecode(np.frombuffer(setup['png'], np.uint8), cv2.IMREAD_UNCHANGED)
  colour = np.stack([gray, gray // 2, gray], axis=-1)  # Real colour: not a gray film.
  cv2.imwrite(str(folder / 'b_colour.png'), colour)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'cxr_jax.embed', '--model', setup['runs']['supcon'], '--data',
       str(folder), '--output', str(tmp_path / 'out.npz')], cwd=repo, capture_output=True,
      text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: ') and str(folder / 'b_colour.png') in last, last
  assert 'colour PNG' in last, last
  assert not os.path.exists(tmp_path / 'out.npz')


def test_an_image_that_cannot_be_embedded_is_named(setup, tmp_path):
  # Read, but no image this network can take: a row of pixels.
  records = [{'image': np.zeros((32, 32), np.uint16), 'id': 'fine'},
             {'image': np.zeros((32,), np.uint16), 'id': 'flat'}]

  class Tiny(sources.Source):
    description = {'test': 'flat'}

    def __len__(self):
      return len(records)

    def record(self, index):
      return dict(records[index])

  with pytest.raises(images_lib.ImageError, match=r'^flat: cannot be embedded: \w+'):
    embed.embed_dataset(setup['models']['supcon']['workdir'], Tiny(), str(tmp_path / 'o.npz'))


def test_command_line_writes_one_file_for_an_npz_output(setup, tmp_path):
  output = str(tmp_path / 'embeddings.npz')
  embed.main(['embed', '--model', setup['exports']['classifier'], '--data', setup['csv'],
              '--output', output, '--label_columns', ','.join(LABEL_COLUMNS),
              '--batch_size', '4'])
  result = embeddings_file.load_embeddings(output)
  assert os.listdir(tmp_path) == ['embeddings.npz']
  assert result['embedding'].shape == (len(setup['records']), 256)
  assert result['logits'].shape == (len(setup['records']), 7)
  assert list(result['findings']) == list(LABEL_COLUMNS)
  assert '"saved_model"' in result['embed_spec']
  with pytest.raises(app.UsageError, match='Missing --data'):
    embed.main(['embed', '--model', setup['exports']['classifier'], '--output', output])


def test_bad_data_and_model_paths(setup, tmp_path):
  with pytest.raises(FileNotFoundError, match='neither a SavedModel'):
    embed.load_model(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a folder, a CSV file, or a TFDS 'name:split'"):
    sources.from_spec(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No PNG, JPEG or DICOM files'):
    sources.from_spec(str(tmp_path / 'empty'))
  bad = tmp_path / 'bad.csv'
  bad.write_text('path,cardiomegaly\nimages/x.png,maybe\n')
  with pytest.raises(ValueError, match=r"bad.csv, row 2, column 'cardiomegaly'.*'maybe'"):
    sources.from_spec(str(bad), label_columns=['cardiomegaly'])
  with pytest.raises(ValueError, match=r"missing column\(s\) \['nodule'\]"):
    sources.from_spec(str(bad), label_columns=['nodule'])


@pytest.mark.slow
def test_workdir_path_never_imports_tensorflow(setup, tmp_path):
  script = (
      'import sys\n'
      'from cxr_jax import embed\n'
      f'embed.embed_dataset({setup["runs"]["supcon"]!r}, {setup["folder"]!r}, '
      f'{str(tmp_path / "out.npz")!r})\n'
      'assert "tensorflow" not in sys.modules, "TensorFlow was imported"\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', script], cwd=repo, capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert result.returncode == 0, result.stderr[-6000:]
  assert embeddings_file.load_embeddings(str(tmp_path / 'out.npz'))['embedding'].shape[0] == len(
      setup['records'])


@pytest.mark.slow
def test_image_text_run_embeds_images_and_texts(setup, tmp_path_factory, tmp_path):
  run = image_text_run(tmp_path_factory)
  models = {'workdir': shared_model(run['workdir']),
            'saved_model': shared_embedder(run['export'])}
  images = {}
  for kind, model in models.items():
    output = str(tmp_path / f'images_{kind}.npz')
    embed.embed_dataset(model, setup['folder'], output, batch_size=4)
    images[kind] = embeddings_file.load_embeddings(output)
    assert images[kind]['image_embedding'].shape == (len(setup['records']), 16)
  for key in ('embedding', 'image_embedding'):
    np.testing.assert_allclose(images['saved_model'][key], images['workdir'][key],
                               atol=TOLERANCE, err_msg=key)

  lines = tmp_path / 'prompts.txt'
  lines.write_text('\n'.join(PROMPTS) + '\n')
  table = tmp_path / 'prompts.csv'
  table.write_text('finding,prompt\n' + ''.join(f'f{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
  with_commas = 'Heart size is normal, lungs are clear.'  # A quoted cell with a comma.
  table.write_text(table.read_text() + f'f3,"{with_commas}"\n')
  expected = models['workdir'].embed_texts(PROMPTS + [with_commas])
  from_export = str(tmp_path / 'texts_export.npz')
  embed.main(['embed', '--model', run['export'], '--texts', str(lines), '--output',
              from_export])
  from_workdir = str(tmp_path / 'texts_workdir.npz')
  embed.main(['embed', '--model', run['workdir'], '--texts', f'{table}:prompt', '--output',
              from_workdir])
  with np.load(from_export) as f:
    assert list(f['text']) == PROMPTS and list(f['id']) == ['1', '2', '3']
    assert '"saved_model"' in str(f['embed_spec'])
    np.testing.assert_allclose(f['text_embedding'], expected[:3], atol=TOLERANCE)
  with np.load(from_workdir) as f:
    assert list(f['text']) == PROMPTS + [with_commas]
    assert list(f['id']) == ['2', '3', '4', '5']  # CSV rows, the header being row 1.
    np.testing.assert_array_equal(f['text_embedding'], expected)

  # A model without a text tower, named with the path given.
  supcon = setup['exports']['supcon']
  with pytest.raises(ValueError, match=f'{re.escape(supcon)} is not an image-text run'):
    embed.main(['embed', '--model', supcon, '--texts', str(lines), '--output', from_export])
  with pytest.raises(ValueError, match=f"{re.escape(setup['runs']['supcon'])} .* is not an "
                                       'image-text run'):
    embed.embed_text_file(setup['runs']['supcon'], str(lines), from_export)
  # Files: blank lines, missing columns, empty cells, a missing file.
  blank = tmp_path / 'blank.txt'
  blank.write_text('No effusion.\n \nCardiomegaly.\n')
  with pytest.raises(ValueError, match=r'blank.txt, line 2: empty line'):
    embed.read_texts(str(blank))
  with pytest.raises(ValueError, match=r"prompts.csv: missing column\(s\) \['text'\]; the "
                                       r"header has \['finding', 'prompt'\]"):
    embed.read_texts(str(table))
  table.write_text('text\nCardiomegaly.\n""\n')
  with pytest.raises(ValueError, match=r"prompts.csv, row 3: empty 'text' cell"):
    embed.read_texts(f'{table}:text')
  with pytest.raises(FileNotFoundError, match='missing.txt'):
    embed.read_texts(str(tmp_path / 'missing.txt'))
  with pytest.raises(ValueError, match='one .npz file'):
    embed.embed_text_file(models['workdir'], str(lines), str(tmp_path / 'texts'))
  with pytest.raises(app.UsageError, match='--data .images. or --texts, not both'):
    embed.main(['embed', '--model', run['export'], '--texts', str(lines), '--data',
                setup['folder'], '--output', from_export])
