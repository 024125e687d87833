"""A full disk (ENOSPC) midway through a write, in every writer of outputs: checkpoints,
SavedModel exports, dataset builds and the transfer study's result files. Each failure
names what was being written and the cause, leaves nothing partial behind, and the
same call with space again succeeds."""

import errno
import os

from etils import epath
import jax.numpy as jnp
import matplotlib
from matplotlib.figure import Figure
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cxr_jax import export
from cxr_jax import files
from cxr_jax.data import build as build_lib
from cxr_jax.eval import plots
from cxr_jax.eval import report
from cxr_jax.train import checkpointing

matplotlib.use('Agg')

FULL = r'No space left on device'


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tree(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, dirs, names in os.walk(directory) for name in dirs + names)


@pytest.mark.parametrize('asynchronous', [False, True])
def test_checkpoint_write_fails_cleanly_and_the_rerun_resumes(tmp_path, monkeypatch,
                                                              asynchronous):
  directory = str(tmp_path / 'checkpoints')
  state, config = {'w': jnp.arange(6.0)}, ml_collections.ConfigDict({'lr': 0.1})
  saver = checkpointing.Checkpointer(directory, asynchronous=asynchronous)
  saver.save(1, state, None, config)
  saver.wait()
  real_write = epath.Path.write_text

  def write_then_fill(self, text, *args, **kwargs):  # Part of a file, then the disk is full.
    real_write(self, text[:len(text) // 2])
    _disk_full()

  monkeypatch.setattr(epath.Path, 'write_text', write_then_fill)
  with pytest.raises(OSError, match=rf'Writing checkpoint step 2 in {directory}.* failed: '
                     rf'{FULL}.*latest: 1') as error:
    saver.save(2, {'w': jnp.arange(6.0) + 1}, None, config)
    saver.wait()
  assert error.value.errno == errno.ENOSPC
  monkeypatch.undo()
  saver.close()
  assert sorted(os.listdir(directory)) == ['1']  # No partial step 2 left.
  # A re-run (a new process opening the directory) resumes from step 1 and saves on.
  rerun = checkpointing.Checkpointer(directory, asynchronous=asynchronous)
  assert rerun.latest_step() == 1
  rerun.save(2, {'w': jnp.arange(6.0) + 1}, None, config)
  rerun.close()
  restored, _, step = checkpointing.read_checkpoint(str(tmp_path))
  assert step == 2
  np.testing.assert_array_equal(restored['w'], np.arange(6.0) + 1)


def test_a_killed_writers_partial_checkpoint_is_removed_by_the_rerun(tmp_path):
  directory = tmp_path / 'checkpoints'
  saver = checkpointing.Checkpointer(str(directory), asynchronous=False)
  saver.save(1, {'w': jnp.zeros(3)}, None, ml_collections.ConfigDict({'a': 1}))
  saver.close()
  (directory / '2.orbax-checkpoint-tmp-1234').mkdir()  # As kill -9 inside a save leaves.
  (directory / '2.orbax-checkpoint-tmp-1234' / 'state').write_text('partial')
  rerun = checkpointing.Checkpointer(str(directory), asynchronous=False)
  assert rerun.latest_step() == 1
  rerun.close()
  assert sorted(os.listdir(directory)) == ['1']


class _PartialExport:
  """Writes part of a SavedModel (and its assets), then finds the disk full."""

  def __init__(self, model, platforms):
    del model, platforms

  def save(self, directory):
    os.makedirs(os.path.join(directory, 'variables'))
    with open(os.path.join(directory, 'variables', 'variables.data-00000-of-00001'),
              'wb') as f:
      f.write(b'\0' * 4096)
    os.makedirs(directory + '.assets')
    _disk_full()


def test_export_write_fails_cleanly_naming_the_output(tmp_path, monkeypatch):
  output = str(tmp_path / 'exported')
  monkeypatch.setattr(export, '_Exported', _PartialExport)
  with pytest.raises(OSError, match=rf'Writing the SavedModel {output} failed: {FULL}') as e:
    export.export_model(None, output)
  assert e.value.errno == errno.ENOSPC
  assert os.listdir(tmp_path) == []
  # What an export killed outright left is removed by the next one.
  os.makedirs(f'{output}.tmp-999999999/variables')
  os.makedirs(f'{output}.tmp-999999999.assets')
  class _Whole(_PartialExport):
    def save(self, directory):
      os.makedirs(directory)
      open(os.path.join(directory, 'saved_model.pb'), 'wb').close()

  monkeypatch.setattr(export, '_Exported', _Whole)
  export.export_model(None, output)
  assert os.listdir(tmp_path) == ['exported']


def _tiny_manifest(root):
  import cv2  # pylint: disable=g-import-not-at-top
  images = root / 'images'
  images.mkdir(parents=True)
  rows = ['path,patient_id,split,Cardiomegaly']
  for i in range(6):
    cv2.imwrite(str(images / f'{i}.png'), np.full((16, 12), 40 * i, np.uint8))
    rows.append(f'images/{i}.png,p{i},{"train" if i < 4 else "test"},{i % 2}')
  (root / 'labels.csv').write_text('\n'.join(rows) + '\n')
  (root / 'manifest.json').write_text(
      '{"name": "tiny", "csv": "labels.csv", "image_column": "path", '
      '"split_column": "split", "labels": ["Cardiomegaly"]}')
  return str(root)


def test_dataset_build_fails_cleanly_and_the_rerun_builds(tmp_path, monkeypatch):
  manual = _tiny_manifest(tmp_path / 'hospital')
  data_dir = str(tmp_path / 'tfds')
  adapter = tfds.core.file_adapters.ArrayRecordFileAdapter
  real = adapter.write_examples.__func__

  def write_then_fill(cls, path, iterator):
    with open(os.fspath(path), 'wb') as f:
      f.write(b'\0' * 100)
    _disk_full()

  monkeypatch.setattr(adapter, 'write_examples', classmethod(write_then_fill))
  with pytest.raises(OSError, match=rf'Writing dataset cxr_manifest/tiny in .*{FULL}'):
    build_lib.build('cxr_manifest', data_dir, manual)
  leftovers = [p for p in _tree(data_dir) if 'incomplete' in p or p.endswith('1.0.0')]
  assert not leftovers, leftovers
  monkeypatch.setattr(adapter, 'write_examples', classmethod(real))
  builder = build_lib.build('cxr_manifest', data_dir, manual)
  assert builder.info.splits['train'].num_examples == 4


def test_study_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
  rows = [{'method': 'linear', 'auroc': 0.7}]
  doc = report.Report('Study').paragraph('text')
  figure = Figure()
  figure.add_subplot().plot([0, 1], [0.5, 0.7])
  writers = {'results.csv': lambda p: report.write_csv(p, rows),
             'claims.json': lambda p: report.write_json(p, {'a': 1}),
             'report.md': doc.write,
             'data_efficiency.png': lambda p: plots._save(figure, p)}
  real_fsync = os.fsync
  for name, write in writers.items():
    monkeypatch.setattr(os, 'fsync', _disk_full)  # The data is written, then cannot land.
    with pytest.raises(OSError, match=rf'Writing {tmp_path / name} failed: {FULL}'):
      write(str(tmp_path / name))
    assert os.listdir(tmp_path) == [], name
    monkeypatch.setattr(os, 'fsync', real_fsync)
  for name, write in writers.items():
    write(str(tmp_path / name))
  assert sorted(os.listdir(tmp_path)) == sorted(writers)
  assert (tmp_path / 'results.csv').read_text().splitlines()[1] == 'linear,0.7'
  with files.write_atomically(str(tmp_path / 'x.txt')) as f:
    f.write('whole')
  assert (tmp_path / 'x.txt').read_text() == 'whole'
