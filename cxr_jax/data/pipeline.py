"""The one input pipeline: source -> shuffle -> repeat -> decode/transforms -> batch -> shard.

Sources are random-access (TFDS ArrayRecord through `tfds.data_source`, which reads
without TensorFlow), so grain can shuffle globally, give each JAX process its own
shard of the indices, and checkpoint its position as a few integers. Images arrive
as encoded bytes and are decoded by the `decode` op in grain's workers.

Each record the model sees is a dict: `image` float32 [H, W, C] (or [2, H, W, C]
after `two_views`), and for CXR datasets `labels`/`label_mask` float32 [K] from the
configured uncertainty policy plus `abnormal`; natural-image datasets keep their
integer `label`.
"""

import dataclasses
import hashlib
import multiprocessing
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import flags
import grain.python as grain
import jax
import numpy as np

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import transforms

# Feature keys that hold encoded images; TFDS is told not to decode them.
IMAGE_KEYS = ('image',)


def open_source(name: str, split: str, data_dir: Optional[str] = None):
  """A TFDS dataset's split as a random-access source, images left encoded."""
  # TFDS (and the builders, which register with it) bring TensorFlow: only here, so that
  # training from other sources never imports it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from cxr_jax.data import builders  # noqa: F401  Registers the project's builders.
  if data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
    # Else TFDS reports the dataset's config as unknown, which sends users looking in
    # the wrong place.
    raise FileNotFoundError(f'data_dir {data_dir!r} does not exist (expected the folder the '
                            f'dataset {name!r} was built into).')
  try:
    builder = tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
  except Exception as e:  # tfds raises several types for unknown names.
    # Its message goes on to list every registered dataset (hundreds of lines).
    raise ValueError(f'Unknown dataset {name!r}: {str(e).strip().splitlines()[0]}') from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Dataset {name!r} is not prepared in {builder.data_dir}. Build it first: '
        f'`python -m cxr_jax.data.build {name} --data_dir DIR` (add --manual_dir for '
        'datasets you downloaded yourself).')
  decoders = {k: tfds.decode.SkipDecoding() for k in IMAGE_KEYS if k in builder.info.features}
  try:
    source = builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:
    raise ValueError(f'Dataset {name!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)} ({e}).') from None
  return source, builder.info


class Subset:
  """The records of `source` at `indices`, in that order (label-budget experiments)."""

  def __init__(self, source, indices: Sequence[int]):
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1 or not len(indices):
      raise ValueError('A subset needs a non-empty list of record indices.')
    bad = indices[(indices < 0) | (indices >= len(source))]
    if len(bad):
      raise ValueError(f'Record indices {bad[:5].tolist()} are outside the source\'s '
                       f'{len(source)} records.')
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]

  def __repr__(self):  # Grain checks that a restored iterator reads the same source.
    digest = hashlib.sha1(self.indices.tobytes()).hexdigest()[:12]
    return f'Subset({self.source!r}, {len(self)} records, indices sha1 {digest})'


class RecordError(ValueError):
  """A record that could not be read or preprocessed, named."""


# The key NamedSource adds to each record for Preprocess to name it by; popped there.
WHERE_KEY = '_where'


class NamedSource:
  """A TFDS split's records; one that cannot be read, or whose preprocessing fails, is
  named by dataset, split, file, record index and (when stored) image id.

  files: (filename, skip, take) of the split's shards in order, as TFDS's
  file_instructions give them.
  """

  def __init__(self, source, name: str, split: str, files: Sequence[Tuple[str, int, int]]):
    self.source, self.name, self.split = source, name, split
    self.files = [(os.path.basename(f), int(skip), int(take)) for f, skip, take in files]
    self._ends = np.cumsum([take for _, _, take in self.files])

  def __len__(self):
    return len(self.source)

  def __repr__(self):  # Unchanged, so that checkpoints of earlier runs still restore.
    return repr(self.source)

  def where(self, index: int, image_id=None) -> str:
    text = f'dataset {self.name!r}, split {self.split!r}, record {index}'
    shard = int(np.searchsorted(self._ends, index, side='right'))
    if shard < len(self.files):
      filename, skip, take = self.files[shard]
      text += f' (file {filename}, its record {skip + index - (self._ends[shard] - take)})'
    if image_id is not None:
      text += f', image id {image_id.decode() if isinstance(image_id, bytes) else image_id}'
    return text

  def __getitem__(self, index):
    try:
      record = self.source[index]
    except Exception as e:  # pylint: disable=broad-except  Readers raise assorted types.
      raise RecordError(f'Cannot read {self.where(index)}: {type(e).__name__}: {e}') from e
    if isinstance(record, dict):
      record = {**record, WHERE_KEY: self.where(index, record.get('image_id'))}
    return record


def findings_of(info) -> Sequence[str]:
  """Label names stored by the project's CXR builders (empty for other datasets)."""
  return tuple((info.metadata or {}).get('findings', ())) if info is not None else ()


class ApplyLabelPolicy(grain.MapTransform):
  """Stored label codes -> `labels`, `label_mask` (for the chosen findings) and `abnormal`."""

  def __init__(self, all_findings: Sequence[str], findings: Sequence[str],
               policy: labels_lib.LabelPolicy):
    unknown = [f for f in findings if f not in all_findings]
    if unknown:
      raise ValueError(f'Findings {unknown} are not in the dataset; it has {list(all_findings)}.')
    self.all_findings = tuple(all_findings)
    self.findings = tuple(findings) or self.all_findings
    self.columns = np.array([self.all_findings.index(f) for f in self.findings])
    self.policy = policy

  def map(self, element):
    codes = np.asarray(element['labels'], np.int8)
    element = dict(element)
    element['abnormal'] = labels_lib.derive_abnormal(codes, self.all_findings)
    element.update(self.policy.apply(codes[self.columns], self.findings))
    return element


_WATCHING_PARENT = False


def _exit_with_parent() -> None:
  """In a grain worker process: exit as soon as the process that started it is gone.

  Killed outright (SIGKILL, the OOM killer), a trainer cannot stop its workers; they
  would live on, reparented to init, holding memory and CPU. multiprocessing has no
  option for this, and Linux's PR_SET_PDEATHSIG follows the thread that started the
  worker, which in grain is not the main one; a parent that changed is unambiguous.
  """
  global _WATCHING_PARENT
  if _WATCHING_PARENT or multiprocessing.parent_process() is None:
    return
  _WATCHING_PARENT = True
  # The parent's pid from multiprocessing, not getppid(): a worker still starting up
  # when the parent died is already an orphan here.
  parent = multiprocessing.parent_process().pid

  def watch():
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)  # pylint: disable=protected-access  Nothing left to clean up for.

  threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()


class Preprocess(grain.RandomMapTransform):
  def __init__(self, pp: str):
    self.pp = transforms.Preprocess(pp)

  def __setstate__(self, state):
    # Unpickled in each grain worker, which is where the watch must run.
    self.__dict__.update(state)
    _exit_with_parent()

  def random_map(self, element, rng: np.random.Generator):
    if WHERE_KEY not in element:
      return self.pp(element, rng)
    element = dict(element)
    where = element.pop(WHERE_KEY)
    try:
      return self.pp(element, rng)
    except Exception as e:  # pylint: disable=broad-except  Any op can meet a bad record.
      raise RecordError(f'Preprocessing {where} failed: {type(e).__name__}: {e}') from e


class BatchPreprocess(grain.RandomMapTransform):
  def __init__(self, pp: str):
    self.pp = transforms.BatchPreprocess(pp)

  def random_map(self, element, rng: np.random.Generator):
    return self.pp(element, rng)


class DropText(grain.MapTransform):
  """Strings cannot go to devices; text is re-read from the source when it is needed."""

  def map(self, element):
    return {k: v for k, v in element.items()
            if not isinstance(v, (bytes, str, np.bytes_, np.str_))}


@dataclasses.dataclass
class Pipeline:
  """A configured loader; iterate it for per-process batches of NumPy arrays."""
  loader: grain.DataLoader
  num_records: int
  findings: Sequence[str]
  process_batch_size: int

  def __iter__(self):
    return iter(self.loader)


def close(iterator) -> None:
  """Stops an iterator's worker processes and threads now, not at interpreter exit.

  grain's DataLoaderIterator has no close() of its own; the dataset iterator it wraps
  does. Left to exit, the workers' finalizers print tracebacks ('handle is closed',
  leaked shared memory) below whatever error ended the run.
  """
  inner = getattr(iterator, '_iterator', None)  # pylint: disable=protected-access
  if inner is not None and hasattr(inner, 'close'):
    inner.close()


def make_pipeline(source, *, pp: str, batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: Optional[int] = None, findings_all: Sequence[str] = (),
                  findings: Sequence[str] = (), label_policy: Optional[Mapping] = None,
                  batch_pp: str = '', workers: int = 0, prefetch: int = 2,
                  drop_remainder: bool = True, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, keep_text: bool = False) -> Pipeline:
  """Builds the grain loader over a random-access `source`.

  Args:
    batch_size: the global batch size; each process gets batch_size / process_count.
    seed: shuffle and augmentation seed. The same seed, process count and worker
      count give the same batches in the same order (grain batches inside each
      worker), and a restored iterator continues exactly.
    num_epochs: None repeats forever (training); 1 reads each record once (evaluation,
      where `drop_remainder=False` keeps the last partial batch).
    workers: grain worker processes; 0 decodes in the calling process.
    prefetch: batches buffered per worker (and read threads when workers=0).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size % process_count:
    raise ValueError(f'Global batch size {batch_size} is not divisible by the '
                     f'{process_count} processes.')
  process_batch = batch_size // process_count
  if len(source) < process_count:
    raise ValueError(f'The source has {len(source)} records, fewer than {process_count} '
                     'processes.')
  sampler = grain.IndexSampler(
      num_records=len(source),
      shard_options=grain.ShardOptions(process_index, process_count, drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  if workers and not flags.FLAGS.is_parsed():
    # Grain's workers read absl flags; outside `main` (notebooks, tests) use defaults.
    flags.FLAGS.mark_as_parsed()
  operations = []
  if findings_all:
    policy = labels_lib.LabelPolicy.from_config(label_policy or {})
    operations.append(ApplyLabelPolicy(findings_all, findings, policy))
  operations.append(Preprocess(pp))
  if not keep_text:
    operations.append(DropText())
  operations.append(grain.Batch(process_batch, drop_remainder=drop_remainder))
  if batch_pp:
    operations.append(BatchPreprocess(batch_pp))
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, operations=operations, worker_count=workers,
      worker_buffer_size=max(prefetch, 1),
      read_options=grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=16 * prefetch))
  selected = tuple(findings) or tuple(findings_all)
  return Pipeline(loader, len(source), selected, process_batch)


def pipeline_from_config(data_config, *, batch_size: int, seed: int, train: bool,
                         split: Optional[str] = None, **kwargs) -> Pipeline:
  """The pipeline a recipe's `config.data` (or an evaluator's data section) describes."""
  split = split or data_config.split
  source, info = open_source(data_config.name, split, data_config.get('data_dir'))
  source = NamedSource(source, data_config.name, split, [
      (f.filename, f.skip, f.take) for f in info.splits[split].file_instructions])
  if train and data_config.get('records'):
    source = Subset(source, data_config.records)
  return make_pipeline(
      source, pp=data_config.pp, batch_size=batch_size, seed=seed, shuffle=train,
      num_epochs=None if train else 1, drop_remainder=train,
      findings_all=findings_of(info), findings=tuple(data_config.get('findings', ()) or ()),
      label_policy=data_config.get('label_policy'), batch_pp=data_config.get('batch_pp', ''),
      workers=data_config.get('workers', 0), prefetch=data_config.get('prefetch', 2), **kwargs)


def to_global(batch: Dict[str, Any], sharding) -> Dict[str, jax.Array]:
  """Per-process NumPy batch -> global arrays laid out by `sharding` (batch axis sharded)."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
