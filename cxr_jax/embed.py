"""Images -> embeddings files, from a training workdir or an exported SavedModel.

    python -m cxr_jax.embed --model runs/supcon --data synthetic_cxr/site_b:test \\
        --data_dir ~/tfds --output embeddings/site_b_test

`--model` is a training workdir (read with `inference.load_run`, run in JAX; this
path never imports TensorFlow) or a directory written by `cxr_jax.export` (run with
TensorFlow). Both apply the run's own evaluation preprocessing to the same raw
pixels and agree to 1e-4. `--data` is one of

  NAME:SPLIT    a TFDS dataset (`--data_dir`); the project's CXR datasets also give
                their raw label codes, finding names and patient metadata;
  a folder      every PNG/JPEG/DICOM file under it (recursively, sorted by path;
                files without an extension are taken when they carry DICOM's magic);
                ids are the paths relative to the folder;
  a CSV file    one image per row in `--path_column` (relative paths start at the
                CSV's folder); `--label_columns` are read as label codes (1, 0, -1,
                blank) and metadata columns named patient_id, study_id, sex, age,
                view or site are kept.

The output, read back by `load_embeddings`, is the project's embeddings format:
'embedding' float32 [N, D], 'id' str [N], 'labels' int8 [N, K] with 'findings'
str [K] when known, metadata arrays, 'logits' float32 [N, K'] (and 'logit_names'
when the run names them) for classifier runs, and 'embed_spec', a JSON string of the
model and data the file came from. An `--output` ending in .npz is one file; any
other is a directory of shards `embeddings-00000-of-000NN.npz`, `--shard_size`
images each.

An image-text run's files also hold 'image_embedding' float32 [N, E], the image in
the joint image-text space (what zero-shot scoring compares with text embeddings).
Such a run embeds texts too:

    python -m cxr_jax.embed --model RUN_OR_SAVEDMODEL --texts prompts.txt --output t.npz

`--texts` is a text file (UTF-8, one text per line) or a CSV file, FILE.csv[:COLUMN]
(default column 'text'). The .npz holds 'text_embedding' float32 [N, E]
(L2-normalised), 'text' str [N], 'id' str [N] (the text's line number in the file, or
its CSV row number with the header as row 1) and 'embed_spec'. Texts are encoded as
given, with the run's tokenizer (a SavedModel carries it in its assets). An empty line
or cell, a missing column, or a model without a text tower stops the run with an
error naming the file, line or model.

Resuming: each file is written to a temporary name and renamed when complete, so a
file that exists is whole. A re-run keeps files whose 'embed_spec' matches and
computes only the missing ones, with the same batches as before, so the result is
identical to an uninterrupted run; files of another model or data stop the run
rather than mix. A progress line (batch, total, images/s, ETA) goes to stderr. An
image that cannot be read or embedded stops the run with one error line naming the
file (or the dataset record) and the reason.

Gray films stored as RGB(A) are read when their channels are equal (colour images are
refused). Any input size is accepted: a run whose pp_eval crops before resizing sees
inputs resized to its training images' size first (`inference.Model.input_pp`), so a
2000 px film is never embedded through a small central crop.
"""

import abc
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
import warnings

from absl import app
from absl import flags
import numpy as np

from cxr_jax import cli
from cxr_jax import export
from cxr_jax import inference
from cxr_jax import npz_files
from cxr_jax.data import images as images_lib
from cxr_jax.data import labels as labels_lib
from cxr_jax.train import metrics as metrics_lib

# Keys that describe the whole set rather than one row each.
PER_SET_KEYS = ('findings', 'logit_names', 'embed_spec')
REQUIRED_KEYS = ('embedding', 'id')
SHARD_PATTERN = re.compile(r'^embeddings-(\d{5})-of-(\d{5})\.npz$')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg') + images_lib.DICOM_EXTENSIONS
DEFAULT_SHARD_SIZE = 10000
_PROGRESS_SECONDS = 2.0


def shard_name(index: int, count: int) -> str:
  return f'embeddings-{index:05d}-of-{count:05d}.npz'


# --- models ----------------------------------------------------------------------------


class SavedModelEmbedder:
  """An exported SavedModel, with the `inference.Model` methods the embedding tool uses."""

  def __init__(self, path: str):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self.path = os.path.abspath(path)
    self.metadata = export.read_metadata(path)
    self._tf = tf
    self.loaded = tf.saved_model.load(path)  # Its signatures can be called directly too.

  @property
  def findings(self) -> Tuple[str, ...]:
    return tuple(self.metadata['findings'])

  @property
  def has_logits(self) -> bool:
    return bool(self.metadata['has_logits'])

  @property
  def embedding_dim(self) -> int:
    return int(self.metadata['embedding_dim'])

  @property
  def has_text(self) -> bool:
    return bool(self.metadata.get('has_text'))

  def _output_keys(self) -> List[str]:
    return (['embedding'] + (['logits'] if self.has_logits else [])
            + (['image_embedding'] if self.has_text else []))

  def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Texts -> float32 [N, E] text embeddings (`export.embed_texts` on this export)."""
    return export.embed_texts(self.path, texts, batch_size=batch_size, loaded=self.loaded)

  def embed_arrays(self, images: Sequence[Any], batch_size: int = 32) -> Dict[str, np.ndarray]:
    """Raw images (2-D or [H, W, 1] uint8/uint16/float arrays, or PNG bytes) -> outputs.

    Arrays go through `embed_images` in runs of equal shape and dtype, bytes through
    `embed_png`; the order of the inputs is kept.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = list(images[start:start + batch_size])
      for group in _runs(batch):
        outputs.append(self._embed_group(group))
    if not outputs:
      sizes = {'embedding': self.embedding_dim, 'logits': int(self.metadata['num_classes']),
               'image_embedding': int(self.metadata.get('text', {}).get(
                   'joint_embedding_dim', 0))}
      return {k: np.zeros((0, sizes[k]), np.float32) for k in self._output_keys()}
    return {k: np.concatenate([o[k] for o in outputs]) for k in self._output_keys()}

  def _embed_group(self, group) -> Dict[str, np.ndarray]:
    tf = self._tf
    if isinstance(group[0], (bytes, np.bytes_)):
      if not all(bytes(g).startswith(images_lib.PNG_SIGNATURE) for g in group):
        raise ValueError('A SavedModel embeds encoded images through embed_png, which takes '
                         'PNG only; read other formats with data.images.read_image.')
      out = self.loaded.signatures['embed_png'](png=tf.constant([bytes(g) for g in group]))
    else:
      out = self.loaded.embed_images(tf.constant(np.stack(group)))
    return {k: v.numpy() for k, v in out.items()}


def _as_model_input(image):
  if isinstance(image, (bytes, np.bytes_)):
    return image
  image = np.asarray(image)
  if image.dtype == np.float64:
    image = image.astype(np.float32)
  if image.dtype not in (np.uint8, np.uint16, np.float32):
    raise ValueError(f'Images must be uint8, uint16 or float32 arrays; got {image.dtype}.')
  return image


def _runs(batch) -> List[List[Any]]:
  """Consecutive items of one kind: PNG bytes, or arrays of one shape and dtype."""
  runs, key = [], None
  for item in map(_as_model_input, batch):
    item_key = 'bytes' if isinstance(item, (bytes, np.bytes_)) else (item.shape, item.dtype)
    if item_key != key:
      runs.append([])
      key = item_key
    runs[-1].append(item)
  return runs


Embedder = Union[inference.Model, SavedModelEmbedder]


def load_model(path: str, step: Optional[int] = None, best: bool = False) -> Embedder:
  """A SavedModel export (TensorFlow) or a training workdir (JAX), told apart by content."""
  if export.is_export(path):
    if step is not None or best:
      raise ValueError(f'{path} is a SavedModel; --step and --best choose checkpoints of a '
                       'training workdir.')
    return SavedModelEmbedder(path)
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return inference.load_run(path, step=step, best=best)
  raise FileNotFoundError(f'{path} is neither a SavedModel directory (with saved_model.pb) '
                          'nor a training workdir (with checkpoints/).')


def describe_model(model: Embedder) -> Dict[str, Any]:
  if isinstance(model, SavedModelEmbedder):
    return {'saved_model': model.path}
  return {'workdir': os.path.abspath(model.workdir), 'step': model.step,
          'pp_eval': model.pp_eval}


# --- data --------------------------------------------------------------------------------


class Source(abc.ABC):
  """Images with ids, and what is known about them, read one record at a time.

  `description` identifies the data in the files' embed_spec; `findings` name the
  columns of each record's 'labels' (none: no labels).
  """
  description: Dict[str, Any]
  findings: Tuple[str, ...] = ()

  @abc.abstractmethod
  def __len__(self) -> int:
    ...

  @abc.abstractmethod
  def record(self, index: int) -> Dict[str, Any]:
    """{'image': raw image or encoded bytes, 'id': str, 'labels'?: int8 [K], metadata...}"""

  def name_of(self, index: int, image_id: str) -> str:
    """Where record `index` (id `image_id`) comes from, for error messages."""
    return image_id


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, (bytes, np.bytes_)) else str(value)


class TfdsSource(Source):
  """A split of a prepared TFDS dataset, read by random access without TensorFlow."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    from cxr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    self.source, info = pipeline.open_source(name, split, data_dir)
    self.name, self.split = name, split
    self.findings = tuple(pipeline.findings_of(info))
    features = set(info.features)
    if 'image' not in features:
      raise ValueError(f'Dataset {name!r} has no image feature; it has {sorted(features)}.')
    self.metadata_keys = tuple(k for k in labels_lib.METADATA_KEYS if k in features)
    self.has_class_label = 'label' in features
    self.description = {'tfds': f'{name}:{split}', 'data_dir': os.path.abspath(
        os.path.expanduser(data_dir)) if data_dir else ''}

  def __len__(self):
    return len(self.source)

  def name_of(self, index, image_id):
    return f'{self.name}:{self.split} record {index} (image {image_id})'

  def record(self, index):
    element = self.source[index]
    out = {'image': element['image'],
           'id': _text(element['image_id']) if 'image_id' in element
                 else f'{self.name}:{self.split}:{index}'}
    if self.findings:
      out['labels'] = np.asarray(element['labels'], np.int8)
    if self.has_class_label:
      out['label'] = int(element['label'])
    for key in self.metadata_keys:
      out[key] = int(element[key]) if key == 'age' else _text(element[key])
    return out


def _is_image_file(path: str) -> bool:
  name = os.path.basename(path)
  if name.startswith('.'):
    return False
  if name.lower().endswith(IMAGE_EXTENSIONS):
    return True
  if os.path.splitext(name)[1]:
    return False
  try:  # Extensionless files are common in DICOM exports; their magic says so.
    with open(path, 'rb') as f:
      head = f.read(images_lib.DICOM_MAGIC_OFFSET + 4)
  except OSError:
    return False
  return head[images_lib.DICOM_MAGIC_OFFSET:] == images_lib.DICOM_MAGIC


class FolderSource(Source):
  """Every image file under a folder, sorted by path; ids are paths relative to it."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    paths = []
    for directory, subdirectories, files in os.walk(self.root):
      subdirectories[:] = sorted(d for d in subdirectories if not d.startswith('.'))
      paths.extend(os.path.join(directory, f) for f in files
                   if _is_image_file(os.path.join(directory, f)))
    self.paths = sorted(paths, key=lambda p: os.path.relpath(p, self.root))
    if not self.paths:
      raise FileNotFoundError(f'No PNG, JPEG or DICOM files under {root}.')
    self.description = {'folder': self.root}

  def __len__(self):
    return len(self.paths)

  def name_of(self, index, image_id):
    return self.paths[index]

  def record(self, index):
    path = self.paths[index]
    return {'image': images_lib.read_image(path),
            'id': os.path.relpath(path, self.root).replace(os.sep, '/')}


class CsvSource(Source):
  """One image per CSV row; label columns as codes, metadata columns by their names."""

  def __init__(self, csv_path: str, path_column: str = 'path',
               label_columns: Sequence[str] = ()):
    from cxr_jax.data.builders import base  # pylint: disable=g-import-not-at-top
    self.csv_path = os.path.abspath(csv_path)
    header = base.read_csv_header(csv_path)
    rows = base.read_csv(csv_path, required_columns=[path_column, *label_columns])
    if not rows:
      raise ValueError(f'{csv_path}: the CSV has no rows.')
    self.findings = tuple(label_columns)
    self.metadata_keys = tuple(k for k in labels_lib.METADATA_KEYS if k in header)
    folder = os.path.dirname(self.csv_path)
    self.ids, self.paths, self.rows = [], [], []
    for number, row in enumerate(rows, start=2):  # Row 1 is the header.
      cell = (row[path_column] or '').strip()
      if not cell:
        raise ValueError(f'{csv_path}, row {number}: empty {path_column!r} cell.')
      self.ids.append(cell)
      self.paths.append(os.path.join(folder, os.path.expanduser(cell)))
      self.rows.append(self._parse_row(row, number))
    self.description = {'csv': self.csv_path, 'path_column': path_column,
                        'label_columns': list(label_columns)}

  def _parse_row(self, row, number) -> Dict[str, Any]:
    where = f'{self.csv_path}, row {number}'
    out = {}
    if self.findings:
      out['labels'] = np.array([labels_lib.parse_code(row[c], source=f'{where}, column {c!r}')
                                for c in self.findings], np.int8)
    for key in self.metadata_keys:
      value = (row[key] or '').strip()
      if key != 'age':
        out[key] = value
        continue
      try:
        out[key] = int(round(float(value))) if value else -1
      except ValueError:
        raise ValueError(f'{where}: age {value!r} is not a number.') from None
    return out

  def __len__(self):
    return len(self.paths)

  def name_of(self, index, image_id):
    return f'{self.paths[index]} ({self.csv_path}, row {index + 2})'

  def record(self, index):
    return {'image': images_lib.read_image(self.paths[index]), 'id': self.ids[index],
            **self.rows[index]}


def open_source(data: str, data_dir: Optional[str] = None, path_column: str = 'path',
                label_columns: Sequence[str] = ()) -> Source:
  """A folder, a CSV file, or a TFDS 'name:split', told apart in that order."""
  if os.path.isdir(data):
    return FolderSource(data)
  if os.path.isfile(data):
    if not data.lower().endswith(('.csv', '.csv.gz')):
      raise ValueError(f'{data}: a data file must be a CSV (.csv or .csv.gz).')
    return CsvSource(data, path_column, label_columns)
  if ':' not in data:
    raise FileNotFoundError(f'--data {data!r} is not a folder, a CSV file, or a TFDS '
                            "'name:split'.")
  name, split = data.rsplit(':', 1)
  return TfdsSource(name, split, data_dir)


# --- writing -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Shard:
  path: str
  start: int
  stop: int


def _plan(output: str, num_examples: int, shard_size: int) -> List[_Shard]:
  if output.endswith('.npz'):
    return [_Shard(output, 0, num_examples)]
  count = -(-num_examples // shard_size)
  return [_Shard(os.path.join(output, shard_name(i, count)), i * shard_size,
                 min((i + 1) * shard_size, num_examples)) for i in range(count)]


def _is_complete(shard: _Shard, spec: str) -> bool:
  """Whether `shard` was already written for this spec; a file of another spec stops."""
  if not os.path.exists(shard.path):
    return False
  try:
    with np.load(shard.path, allow_pickle=False) as f:
      written_spec = str(f['embed_spec']) if 'embed_spec' in f.files else None
      rows = f['id'].shape[0] if 'id' in f.files else -1
  except (OSError, ValueError, EOFError) as e:
    warnings.warn(f'{shard.path} is unreadable ({e}); computing it again.')
    return False
  if written_spec is None:
    raise ValueError(f'{shard.path} exists but was not written by cxr_jax.embed (it has no '
                     'embed_spec). Use another --output or delete it.')
  if written_spec != spec:
    raise ValueError(f'{shard.path} holds embeddings of another model or dataset '
                     f'({written_spec}); this run is {spec}. Use another --output or delete '
                     'the old files.')
  return rows == shard.stop - shard.start


_TEMPORARY = re.compile(r'^(?P<target>.+)\.tmp-(?P<pid>\d+)$')


def _write_atomically(path: str, arrays: Dict[str, np.ndarray]) -> None:
  """Writes `path` whole or not at all; a failed write (a full disk) leaves nothing."""
  temporary = f'{path}.tmp-{os.getpid()}'
  try:
    with open(temporary, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, path)
  except OSError as e:
    raise OSError(e.errno, f'Writing {path} failed: {e.strerror or e}. Nothing of it was '
                  'left behind; files already written are kept, and re-running the same '
                  'command continues from them.') from e
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _remove_stale_temporaries(directory: str) -> None:
  """Removes the partial files of writers that died (kill -9) before cleaning up."""
  for name in os.listdir(directory):
    match = _TEMPORARY.match(name)
    if not match or not match['target'].endswith('.npz'):
      continue
    try:
      os.kill(int(match['pid']), 0)  # Signal 0 only asks whether the process exists.
      continue  # A live process is still writing it.
    except ProcessLookupError:
      pass
    except PermissionError:  # Someone else's live process.
      continue
    os.remove(os.path.join(directory, name))


class _Progress:
  """'step 12/40  images 384  51.2 img/s  ETA 0m33s' on stderr, every few seconds."""

  def __init__(self, total_batches: int, batch_size: int):
    self.total, self.done, self.images = total_batches, 0, 0
    self._line = metrics_lib.Progress(total_batches, batch_size)
    self._shown = time.perf_counter()

  def step(self, images: int):
    self.done += 1
    self.images += images
    now = time.perf_counter()
    if now - self._shown >= _PROGRESS_SECONDS or self.done == self.total:
      self._line.show(self.done, {'images': self.images})
      self._shown = now


def _first_line(error: BaseException) -> str:
  """The message of `error` without TensorFlow's graph trace (lines after the first)."""
  text = str(getattr(error, 'message', '') or error).strip()
  lines = [line for line in text.splitlines() if line.strip()]
  asserted = [line for line in lines if 'embed_png' in line or 'central_crop' in line]
  return (asserted or lines or [type(error).__name__])[0].strip()


def _embed_records(model: Embedder, source: Source, indices, records, batch_size: int
                   ) -> Dict[str, np.ndarray]:
  """model.embed_arrays of the records' images; a failure names the image at fault."""
  try:
    return model.embed_arrays([r['image'] for r in records], batch_size=batch_size)
  except Exception as batch_error:  # pylint: disable=broad-except  Narrowed down below.
    for index, record in zip(indices, records):
      try:
        model.embed_arrays([record['image']], batch_size=batch_size)
      except Exception as e:  # pylint: disable=broad-except  Preprocessing and TF raise many.
        raise images_lib.ImageError(
            f'{source.name_of(index, record["id"])}: cannot be embedded: '
            f'{type(e).__name__}: {_first_line(e)}') from e
    raise batch_error  # Each image alone is fine: the batch itself is at fault.


def _embed_shard(model: Embedder, source: Source, shard: _Shard, batch_size: int,
                 progress: _Progress) -> Dict[str, np.ndarray]:
  columns: Dict[str, List[Any]] = {}
  outputs: Dict[str, List[np.ndarray]] = {}
  for start in range(shard.start, shard.stop, batch_size):
    records = [source.record(i) for i in range(start, min(start + batch_size, shard.stop))]
    for key in records[0]:
      if key != 'image':
        columns.setdefault(key, []).extend(r[key] for r in records)
    batch_out = _embed_records(model, source, range(start, start + len(records)), records,
                               batch_size)
    for key in ('embedding', 'logits', 'image_embedding'):
      if key in batch_out:
        outputs.setdefault(key, []).append(np.asarray(batch_out[key], np.float32))
    progress.step(len(records))
  arrays = {key: np.concatenate(parts) for key, parts in outputs.items()}
  for key, values in columns.items():
    if key == 'labels':
      arrays[key] = np.stack(values).astype(np.int8)
    elif key in ('age', 'label'):
      arrays[key] = np.asarray(values, np.int32)
    else:
      arrays[key] = np.asarray(values, dtype=str)
  return arrays


def embed_dataset(model: Union[str, Embedder], source: Union[str, Source], output: str, *,
                  batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
                  data_dir: Optional[str] = None) -> str:
  """Embeds every image of `source` with `model` into `output` (see the module docstring).

  `model` is a path (workdir or SavedModel) or a loaded model; `source` a data spec
  string or a `Source`. Returns the output path. Files already complete for this
  model and data are kept.
  """
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f'batch_size and shard_size must be positive, got {batch_size}, '
                     f'{shard_size}.')
  model = load_model(model) if isinstance(model, str) else model
  source = open_source(source, data_dir) if isinstance(source, str) else source
  if not len(source):
    raise ValueError(f'No images in {source.description}.')
  spec = json.dumps({'model': describe_model(model), 'data': source.description,
                     'num_examples': len(source)}, sort_keys=True)
  shards = _plan(output, len(source), shard_size)
  os.makedirs(os.path.dirname(os.path.abspath(shards[0].path)), exist_ok=True)
  _remove_stale_temporaries(os.path.dirname(os.path.abspath(shards[0].path)))
  todo = [s for s in shards if not _is_complete(s, spec)]
  if len(todo) < len(shards):
    print(f'{len(shards) - len(todo)} of {len(shards)} embedding files already complete in '
          f'{output}; computing {len(todo)}.', file=sys.stderr)
  per_set = {'embed_spec': np.asarray(spec)}
  if source.findings:
    per_set['findings'] = np.asarray(source.findings, dtype=str)
  if model.has_logits and model.findings:
    per_set['logit_names'] = np.asarray(model.findings, dtype=str)
  progress = _Progress(sum(-(-(s.stop - s.start) // batch_size) for s in todo), batch_size)
  for shard in todo:
    arrays = _embed_shard(model, source, shard, batch_size, progress)
    _write_atomically(shard.path, {**arrays, **per_set})
  return output


# --- texts -------------------------------------------------------------------------------

DEFAULT_TEXT_COLUMN = 'text'


def read_texts(spec: str) -> Tuple[List[str], List[str], Dict[str, Any]]:
  """(texts, ids, description) of a text file or 'FILE.csv[:COLUMN]' (module docstring).

  Raises ValueError naming the file and line (or row) of an empty text, the column
  when it is missing, and FileNotFoundError when the file does not exist.
  """
  path, column = spec, None
  if not os.path.isfile(spec):
    head, sep, tail = spec.rpartition(':')
    if sep and head.lower().endswith(('.csv', '.csv.gz')) and os.path.isfile(head):
      path, column = head, tail
    else:
      raise FileNotFoundError(f'--texts {spec!r}: no such file (expected a text file with one '
                              'text per line, or FILE.csv[:COLUMN]).')
  if path.lower().endswith(('.csv', '.csv.gz')):
    return _read_text_csv(path, column or DEFAULT_TEXT_COLUMN)
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      content = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e}).') from None
  lines = content.split('\n')
  if lines[-1] == '':  # The newline that ends the last line.
    lines.pop()
  texts, ids = [], []
  for number, line in enumerate(lines, start=1):
    line = line.rstrip('\r')
    if not line.strip():
      raise ValueError(f'{path}, line {number}: empty line; the file must hold one text per '
                       'line, with no blank lines.')
    texts.append(line)
    ids.append(str(number))
  if not texts:
    raise ValueError(f'{path}: no texts in the file.')
  return texts, ids, {'texts': os.path.abspath(path)}


def _read_text_csv(path: str, column: str) -> Tuple[List[str], List[str], Dict[str, Any]]:
  from cxr_jax.data.builders import base  # pylint: disable=g-import-not-at-top
  rows = base.read_csv(path, required_columns=[column], keep=[column])
  if not rows:
    raise ValueError(f'{path}: the CSV has no rows.')
  texts, ids = [], []
  for number, row in enumerate(rows, start=2):  # Row 1 is the header.
    text = row[column] or ''
    if not text.strip():
      raise ValueError(f'{path}, row {number}: empty {column!r} cell.')
    texts.append(text)
    ids.append(str(number))
  return texts, ids, {'texts': os.path.abspath(path), 'column': column}


def embed_text_file(model: Union[str, Embedder], texts: str, output: str, *,
                    batch_size: int = 32) -> str:
  """Embeds the texts of `texts` (see `read_texts`) with an image-text `model` into the
  .npz `output`: 'text_embedding', 'text', 'id', 'embed_spec'. Returns `output`."""
  if not output.endswith('.npz'):
    raise ValueError(f'--output {output!r}: text embeddings are written to one .npz file.')
  model = load_model(model) if isinstance(model, str) else model
  values, ids, description = read_texts(texts)
  # A model without a text tower raises here, naming itself.
  embeddings = model.embed_texts(values, batch_size=batch_size)
  spec = json.dumps({'model': describe_model(model), 'data': description,
                     'num_texts': len(values)}, sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  _write_atomically(output, {'text_embedding': embeddings, 'text': np.asarray(values, str),
                             'id': np.asarray(ids, str), 'embed_spec': np.asarray(spec)})
  return output


# --- reading -----------------------------------------------------------------------------


def _shard_files(directory: str) -> List[str]:
  names = sorted(n for n in os.listdir(directory) if SHARD_PATTERN.match(n))
  if not names:
    raise FileNotFoundError(f'No embeddings files (embeddings-NNNNN-of-NNNNN.npz) in '
                            f'{directory}.')
  counts = {int(SHARD_PATTERN.match(n).group(2)) for n in names}
  if len(counts) > 1:
    raise ValueError(f'{directory} mixes shard sets of different sizes {sorted(counts)}.')
  count = counts.pop()
  missing = [shard_name(i, count) for i in range(count) if shard_name(i, count) not in names]
  if missing:
    raise FileNotFoundError(f'{directory} lacks {len(missing)} of its {count} shards, e.g. '
                            f'{missing[0]} (an unfinished run? re-run cxr_jax.embed).')
  return [os.path.join(directory, n) for n in names]


def _read_file(path: str) -> Dict[str, np.ndarray]:
  arrays = npz_files.read(path, 'embeddings .npz file')
  missing = [k for k in REQUIRED_KEYS if k not in arrays]
  if missing:
    raise KeyError(f'{path}: embeddings file has no {missing}; it has {sorted(arrays)}.')
  embedding = arrays['embedding']
  if embedding.ndim != 2 or not np.issubdtype(embedding.dtype, np.floating):
    raise ValueError(f'{path}: "embedding" must be a float [N, D] array, got '
                     f'{embedding.dtype}{list(embedding.shape)}.')
  rows = embedding.shape[0]
  for key, value in arrays.items():
    if key not in PER_SET_KEYS and (value.ndim == 0 or value.shape[0] != rows):
      raise ValueError(f'{path}: {key!r} has {value.shape[0] if value.ndim else 0} rows, but '
                       f'"embedding" has {rows}.')
  if 'labels' in arrays:
    if 'findings' not in arrays:
      raise KeyError(f'{path}: has "labels" but no "findings" naming their columns.')
    if arrays['labels'].ndim != 2 or arrays['labels'].shape[1] != len(arrays['findings']):
      raise ValueError(f'{path}: "labels" {list(arrays["labels"].shape)} does not match the '
                       f'{len(arrays["findings"])} findings.')
  return arrays


def load_embeddings(path: str) -> Dict[str, Any]:
  """An embeddings file, or a directory of shards concatenated in order, checked.

  Per-row arrays (embedding, id, labels, logits, metadata) are concatenated;
  'findings', 'logit_names' and 'embed_spec' describe the set and must agree across
  shards. Errors name the file and the key at fault.
  """
  files = _shard_files(path) if os.path.isdir(path) else [path]
  if not os.path.exists(files[0]):
    raise FileNotFoundError(f'{path}: no such embeddings file or directory.')
  parts = [_read_file(f) for f in files]
  first = parts[0]
  for file, part in zip(files[1:], parts[1:]):
    if set(part) != set(first):
      raise KeyError(f'{file}: keys {sorted(part)} differ from {files[0]}: {sorted(first)}.')
    for key in PER_SET_KEYS:
      if key in part and not np.array_equal(part[key], first[key]):
        raise ValueError(f'{file}: {key!r} differs from {files[0]}; the shards come from '
                         'different runs.')
  out = {k: np.concatenate([p[k] for p in parts]) for k in first if k not in PER_SET_KEYS}
  for key in PER_SET_KEYS:
    if key in first:
      out[key] = str(first[key]) if key == 'embed_spec' else first[key]
  return out


# --- command line ------------------------------------------------------------------------

# Flags live in their own FlagValues, so that importing this module and
# cxr_jax.export together defines no flag twice.
FLAGS = flags.FlagValues()
flags.DEFINE_string('model', None, 'Training workdir or SavedModel directory.', flag_values=FLAGS)
flags.DEFINE_string('data', None, "TFDS 'name:split', a folder of images, or a CSV file.",
                    flag_values=FLAGS)
flags.DEFINE_string('texts', None, 'Texts to embed instead of images (image-text runs): a '
                    'file with one text per line, or FILE.csv[:COLUMN] (default column '
                    f'{DEFAULT_TEXT_COLUMN!r}).', flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, 'TFDS data directory, for name:split data.',
                    flag_values=FLAGS)
flags.DEFINE_string('output', None, 'A .npz file, or a directory for shards.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 32, 'Images per batch.', flag_values=FLAGS)
flags.DEFINE_integer('shard_size', DEFAULT_SHARD_SIZE, 'Images per shard file.',
                     flag_values=FLAGS)
flags.DEFINE_string('path_column', 'path', 'CSV column with image paths.', flag_values=FLAGS)
flags.DEFINE_list('label_columns', [], 'CSV columns holding label codes.', flag_values=FLAGS)
flags.DEFINE_integer('step', None, 'Checkpoint step of a training workdir (default latest).',
                     flag_values=FLAGS)
flags.DEFINE_bool('best', False, "The workdir's best checkpoint.", flag_values=FLAGS)


def main(argv: Sequence[str]) -> str:
  cli.parse(FLAGS, argv)
  if FLAGS.data and FLAGS.texts:
    raise app.UsageError('Pass --data (images) or --texts, not both.')
  missing = [f'--{n}' for n in ('model', 'output') if not FLAGS[n].value]
  if not FLAGS.data and not FLAGS.texts:
    missing.insert(1, '--data (or --texts)')
  if missing:
    raise app.UsageError(f'Missing {", ".join(missing)}.')
  if FLAGS.step is not None and FLAGS.best:
    raise app.UsageError('Pass --step or --best, not both.')
  model = load_model(FLAGS.model, step=FLAGS.step, best=FLAGS.best)
  if FLAGS.texts:
    path = embed_text_file(model, FLAGS.texts, FLAGS.output, batch_size=FLAGS.batch_size)
    print(f'Text embeddings written to {path}', file=sys.stderr)
    return path
  source = open_source(FLAGS.data, FLAGS.data_dir, FLAGS.path_column, FLAGS.label_columns)
  path = embed_dataset(model, source, FLAGS.output, batch_size=FLAGS.batch_size,
                       shard_size=FLAGS.shard_size)
  print(f'Embeddings of {len(source)} images written to {path}', file=sys.stderr)
  return path


if __name__ == '__main__':
  # An image that cannot be read or embedded is the user's data, not a bug: one line.
  cli.run(main, FLAGS, __doc__, one_line_errors=(images_lib.ImageError,))
