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

`cxr_jax.data.sources` reads each kind. The output, read back by
`cxr_jax.embeddings_file.load_embeddings`, is the project's embeddings file:
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

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from absl import app
from absl import flags
import numpy as np

from cxr_jax import cli
from cxr_jax import embeddings_file
from cxr_jax import export
from cxr_jax import inference
from cxr_jax.data import images as images_lib
from cxr_jax.data import sources
from cxr_jax.train import metrics as metrics_lib

DEFAULT_SHARD_SIZE = 10000
_PROGRESS_SECONDS = 2.0


# --- models ----------------------------------------------------------------------------


class SavedModelEmbedder:
  """An exported SavedModel, with the `inference.Model` methods the embedding tool uses."""

  def __init__(self, path: str):
    # TensorFlow only for exports: embedding from a workdir never imports it.
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



# --- images ------------------------------------------------------------------------------


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


def _embed_records(model: Embedder, source: sources.Source, indices, records,
                   batch_size: int) -> Dict[str, np.ndarray]:
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


def _embed_shard(model: Embedder, source: sources.Source, shard: embeddings_file.Shard,
                 batch_size: int, progress: _Progress) -> Dict[str, np.ndarray]:
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


def embed_dataset(model: Union[str, Embedder], source: Union[str, sources.Source], output: str,
                  *, batch_size: int = 32, shard_size: int = DEFAULT_SHARD_SIZE,
                  data_dir: Optional[str] = None) -> str:
  """Embeds every image of `source` with `model` into `output` (see the module docstring).

  `model` is a path (workdir or SavedModel) or a loaded model; `source` a data spec
  string (`sources.from_spec`) or a `sources.Source`. Returns the output path. Files
  already complete for this model and data are kept.
  """
  if batch_size < 1 or shard_size < 1:
    raise ValueError(f'batch_size and shard_size must be positive, got {batch_size}, '
                     f'{shard_size}.')
  model = load_model(model) if isinstance(model, str) else model
  source = sources.from_spec(source, data_dir) if isinstance(source, str) else source
  if not len(source):
    raise ValueError(f'No images in {source.description}.')
  spec = json.dumps({'model': describe_model(model), 'data': source.description,
                     'num_examples': len(source)}, sort_keys=True)
  shards = embeddings_file.plan(output, len(source), shard_size)
  os.makedirs(os.path.dirname(os.path.abspath(shards[0].path)), exist_ok=True)
  embeddings_file.remove_stale_temporaries(os.path.dirname(os.path.abspath(shards[0].path)))
  todo = [s for s in shards if not embeddings_file.is_complete(s, spec)]
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
    embeddings_file.write(shard.path, {**arrays, **per_set})
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
  # builders.base imports TFDS, which only CSV texts need.
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
  embeddings_file.write(output, {'text_embedding': embeddings, 'text': np.asarray(values, str),
                                 'id': np.asarray(ids, str), 'embed_spec': np.asarray(spec)})
  return output


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
  source = sources.from_spec(FLAGS.data, FLAGS.data_dir, FLAGS.path_column,
                             FLAGS.label_columns)
  path = embed_dataset(model, source, FLAGS.output, batch_size=FLAGS.batch_size,
                       shard_size=FLAGS.shard_size)
  print(f'Embeddings of {len(source)} images written to {path}', file=sys.stderr)
  return path


if __name__ == '__main__':
  # An image that cannot be read or embedded is the user's data, not a bug: one line.
  cli.run(main, FLAGS, __doc__, one_line_errors=(images_lib.ImageError,))
