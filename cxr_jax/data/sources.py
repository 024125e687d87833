"""Images to embed, one record at a time: a TFDS split, a folder of files, or a CSV list.

A `Source` gives each image (raw pixels or encoded bytes) with its id and what is known
about it: label codes with the findings naming them, and metadata (patient_id, sex,
age, ...). `from_spec` opens what a `--data` string names: a folder (every
PNG/JPEG/DICOM file under it, sorted by path), a CSV file (one image per row, label and
metadata columns), or a TFDS 'name:split' (through `pipeline.open_source`, without
TensorFlow). The embedding tool and the studies read images this way; training reads
them through `pipeline`.
"""

import abc
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from cxr_jax.data import images as images_lib
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import pipeline

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg') + images_lib.DICOM_EXTENSIONS


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
    # builders.base imports TFDS, which only CSV sources need.
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


def from_spec(data: str, data_dir: Optional[str] = None, path_column: str = 'path',
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
