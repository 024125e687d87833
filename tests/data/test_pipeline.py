"""The grain pipeline over a random-access source: determinism, sharding, exact resume."""

import os
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from cxr_jax.data import images
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import pipeline

FINDINGS = ('No Finding', 'Edema', 'Cardiomegaly')


class PngSource:
  """Random access over encoded 16-bit PNGs, laid out like the CXR builders' records."""

  def __init__(self, n=40):
    rng = np.random.default_rng(0)
    codes = [labels_lib.POSITIVE, labels_lib.NEGATIVE, labels_lib.UNCERTAIN,
             labels_lib.UNMENTIONED]
    self.records = []
    for i in range(n):
      image = np.full((24, 20), i * 1000, np.uint16)
      self.records.append({
          'image': cv2.imencode('.png', image)[1].tobytes(),
          'labels': rng.choice(codes, size=3).astype(np.int8),
          'image_id': f'img{i}'.encode(), 'age': np.int32(40 + i)})

  def __len__(self):
    return len(self.records)

  def __repr__(self):  # Grain checks that a restored state belongs to the same source.
    return f'PngSource({len(self)})'

  def __getitem__(self, index):
    return self.records[index]


PP = 'decode|resize(16)|random_crop(12)|flip_lr|value_range(0, 1)'


def ids(batches):
  # The image value encodes the record index: 1000 * i / 65535 after value_range(0, 1).
  return [np.rint(b['image'].mean(axis=(1, 2, 3)) * 65535 / 1000).astype(int).tolist()
          for b in batches]


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def make(source=None, **kwargs):
  args = dict(pp=PP, batch_size=8, seed=3, findings_all=FINDINGS, process_index=0,
              process_count=1)
  args.update(kwargs)
  return pipeline.make_pipeline(source or PngSource(), **args)


def test_batches_are_arrays_with_policy_labels():
  batch = next(iter(make(findings=('Edema', 'Cardiomegaly'),
                         label_policy={'uncertain': 'ones', 'unmentioned': 'ignore'})))
  assert batch['image'].shape == (8, 12, 12, 1) and batch['image'].dtype == np.float32
  assert batch['labels'].shape == (8, 2) and batch['label_mask'].shape == (8, 2)
  assert batch['abnormal'].shape == (8,)
  assert 'image_id' not in batch  # Text never reaches the device.
  source = PngSource()
  for row, index in enumerate(ids([batch])[0]):
    codes = source[index]['labels'][1:]
    np.testing.assert_array_equal(batch['labels'][row],
                                  np.isin(codes, [labels_lib.POSITIVE, labels_lib.UNCERTAIN]))
    np.testing.assert_array_equal(batch['label_mask'][row], codes != labels_lib.UNMENTIONED)


def test_same_seed_same_batches_other_seed_other_order():
  first = take(iter(make()), 6)
  again = take(iter(make()), 6)
  other = take(iter(make(seed=4)), 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert ids(first) != ids(other)


def test_epochs_cover_every_record_and_repeat():
  seen = sum(ids(take(iter(make()), 10)), [])  # 80 = two epochs of 40.
  assert sorted(seen[:40]) == list(range(40)) and sorted(seen[40:]) == list(range(40))


def test_a_subset_reads_only_its_records():
  subset = pipeline.Subset(PngSource(), [5, 17, 3, 30])
  seen = sum(ids(take(iter(make(subset, batch_size=4)), 3)), [])
  assert sorted(seen[:4]) == sorted(seen[4:8]) == [3, 5, 17, 30]
  with pytest.raises(ValueError, match=r'Record indices \[40\] are outside'):
    pipeline.Subset(PngSource(), [0, 40])


def test_processes_read_disjoint_shards():
  shards = [sum(ids(take(iter(make(batch_size=8, process_index=p, process_count=2)), 5)), [])
            for p in (0, 1)]
  assert all(len(s) == 20 for s in shards)  # Per-process batch 4, 5 batches = one epoch each.
  assert set(shards[0]).isdisjoint(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(40))


def test_restored_iterator_continues_exactly():
  iterator = iter(make())
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 4)
  restored = iter(make())
  restored.set_state(state)
  for a, b in zip(expected, take(restored, 4)):
    np.testing.assert_array_equal(a['image'], b['image'])  # Augmentation included.
    np.testing.assert_array_equal(a['labels'], b['labels'])


def test_evaluation_reads_each_record_once_keeping_the_remainder():
  batches = list(make(batch_size=16, shuffle=False, num_epochs=1, drop_remainder=False))
  assert [len(b['image']) for b in batches] == [16, 16, 8]
  assert sum(ids(batches), []) == list(range(40))


@pytest.mark.slow
def test_worker_processes_are_deterministic_and_cover_the_epoch():
  # Grain batches inside each worker, so the worker count is part of what fixes the
  # order; for a given count the batches repeat exactly.
  first = take(iter(make(workers=2)), 10)
  second = take(iter(make(workers=2)), 10)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert sorted(sum(ids(first), [])) == sorted(list(range(40)) * 2)  # Two whole epochs.


def test_bad_configuration_is_named():
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    make(batch_size=8, process_count=3)
  with pytest.raises(ValueError, match=r"\['Edma'\] are not in the dataset"):
    make(findings=('Edma',))
  with pytest.raises(ValueError, match="Unknown preprocessing op 'decod'"):
    make(pp='decod')


GLOBAL_ARRAYS_SCRIPT = '''
import jax, numpy as np, sys
sys.path.insert(0, {tests_dir!r})
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from test_pipeline import make
from cxr_jax.data import pipeline
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
local = next(iter(make(batch_size=16)))
batch = pipeline.to_global(local, NamedSharding(mesh, P(('data', 'fsdp'))))
assert batch['image'].shape == (16, 12, 12, 1), batch['image'].shape
assert len(batch['image'].addressable_shards) == 8
assert all(s.data.shape[0] == 2 for s in batch['image'].addressable_shards)
np.testing.assert_array_equal(np.asarray(batch['labels']), local['labels'])
print('ok')
'''


def test_batches_become_global_arrays_on_a_mesh():
  import os
  import subprocess
  import sys
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', GLOBAL_ARRAYS_SCRIPT.format(tests_dir=tests_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def test_a_missing_data_dir_and_an_unknown_name_are_said_plainly(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data_dir '.*/nowhere' does not exist"):
    pipeline.open_source('synthetic_cxr/site_a_32px', 'train', str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'") as e:
    pipeline.open_source('no_such_dataset', 'train', str(tmp_path))
  assert len(str(e.value).splitlines()) == 1 and len(str(e.value)) < 500, str(e.value)[:2000]


class CorruptSource(PngSource):
  """Record 25 fails to read, as a damaged ArrayRecord chunk does; record 7's image
  bytes are no image."""

  def __init__(self):
    super().__init__()
    self.records[7] = dict(self.records[7], image=b'not an image')

  def __getitem__(self, index):
    if index == 25:
      raise RuntimeError('Corrupted Riegeli/records file: chunk data hash mismatch')
    return super().__getitem__(index)


def test_a_bad_record_is_named_by_dataset_split_file_index_and_image_id():
  files = [('/d/ds-train.array_record-00000-of-00002', 0, 20),
           ('/d/ds-train.array_record-00001-of-00002', 0, 20)]
  named = pipeline.NamedSource(CorruptSource(), 'ds/config', 'train', files)
  assert repr(named) == repr(PngSource())  # Earlier checkpoints still restore.
  with pytest.raises(pipeline.RecordError, match=(
      r"Cannot read dataset 'ds/config', split 'train', record 25 \(file "
      r"ds-train.array_record-00001-of-00002, its record 5\): RuntimeError: Corrupted Riegeli")):
    named[25]
  loader = make(pipeline.Subset(named, [7]), batch_size=1)
  with pytest.raises(Exception, match=(
      r"Preprocessing dataset 'ds/config', split 'train', record 7 \(file "
      r"ds-train.array_record-00000-of-00002, its record 7\), image id img7 failed: "
      r"ValueError: image bytes could not be decoded")):
    next(iter(loader))
  batch = next(iter(make(pipeline.Subset(named, [8]), batch_size=1)))
  assert pipeline.WHERE_KEY not in batch  # Used for naming only, never batched.


def test_a_raw_record_of_the_wrong_size_is_named():
  source = PngSource()
  # A raw stored image cut short by one byte, as a damaged or mis-built record would be.
  raw = images.encode_raw(np.zeros((24, 20, 1), np.uint16))[:-1]
  source.records[3] = dict(source.records[3], image=raw)
  named = pipeline.NamedSource(source, 'ds/config_raw24', 'train',
                               [('/d/ds-train.array_record-00000-of-00001', 0, 40)])
  with pytest.raises(Exception, match=(
      r"Preprocessing dataset 'ds/config_raw24', split 'train', record 3 \(file "
      r"ds-train.array_record-00000-of-00001, its record 3\), image id img3 failed: "
      r"ImageError: raw image: the header describes uint16\[24, 20, 1\] \(960 bytes\) "
      r"but the record holds 959 bytes")):
    next(iter(make(pipeline.Subset(named, [3]), batch_size=1)))


ORPHAN_SCRIPT = '''
import sys, time
sys.path.insert(0, {tests_dir!r})
from test_pipeline import make
iterator = iter(make(workers=2))
next(iterator)
print('ready', flush=True)
time.sleep(600)
'''


def test_data_workers_exit_when_their_parent_is_killed():
  import psutil  # pylint: disable=g-import-not-at-top
  script = ORPHAN_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
  parent = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    assert parent.stdout.readline().strip() == 'ready'
    children = psutil.Process(parent.pid).children(recursive=True)
    assert len(children) >= 2  # The workers (and multiprocessing's resource tracker).
  finally:
    parent.kill()
    parent.wait()


  def running(process):  # An exited orphan may stay a zombie where init does not reap.
    try:
      return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
      return False

  deadline = time.time() + 30  # A worker may still be starting (importing) on a busy host.
  while time.time() < deadline and any(map(running, children)):
    time.sleep(0.2)
  alive = [p for p in children if running(p)]
  names = [' '.join(p.cmdline()[-2:]) for p in alive]
  for process in alive:
    process.kill()
  assert not alive, names
