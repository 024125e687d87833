"""What every CXR dataset builder shares: features, label metadata, image handling, errors.

A concrete builder lists its records (path or pixels, label codes, metadata) per split;
this base reads each image, resizes it to at most `max_side` pixels, stores it as a
lossless PNG (16-bit where the dataset's images are), and either stops at the first
bad record naming the file and the reason (`on_error='raise'`, the default) or skips
it and records every skipped file with its reason in the dataset's metadata
(`on_error='skip'`). TFDS builds into a temporary directory and renames it when done,
so an interrupted build leaves nothing half-written and re-running starts clean.

The error policy is a builder argument, not part of the config: it changes how a build
reacts to bad files, not what the dataset is, so `cxr_chexpert/small/on_error=skip`
builds into the same directory as `cxr_chexpert/small`. Builders write ArrayRecord
files unless told otherwise, because training reads them by random access.
"""

import abc
import csv
import dataclasses
import gzip
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from absl import logging
import cv2
import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import images

ON_ERROR = ('raise', 'skip')


@dataclasses.dataclass
class CxrBuilderConfig(tfds.core.BuilderConfig):
  max_side: int = 512
  on_error: str = 'raise'


@dataclasses.dataclass
class Record:
  """One image as a builder lists it, before the image is read."""
  key: str
  labels: Sequence[int]
  image_path: Optional[str] = None
  pixels: Optional[np.ndarray] = None  # Given directly instead of a path (synthetic data).
  patient_id: str = ''
  study_id: str = ''
  sex: str = 'U'
  age: int = -1
  view: str = 'UNKNOWN'
  site: str = ''
  report: str = ''


class RecordError(ValueError):
  """A bad record; the message names the file and what is wrong."""


def _open_csv(path: str):
  opener = gzip.open if path.endswith('.gz') else open
  return opener(path, 'rt', newline='', encoding='utf-8-sig')


def read_csv_header(path) -> List[str]:
  """The CSV's column names, stripped (as `read_csv` matches them)."""
  path = os.fspath(path)
  try:
    with _open_csv(path) as f:
      return [name.strip() for name in next(csv.reader(f), [])]
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: CSV file not found.') from None
  except (UnicodeDecodeError, csv.Error, gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f'{path}: unreadable CSV ({e}).') from None


def read_csv(path, required_columns: Sequence[str] = (),
             keep: Optional[Sequence[str]] = None) -> List[Dict[str, str]]:
  """A CSV (plain or .gz) as a list of row dicts; a missing file or column names the CSV.

  `keep` limits each row to those columns (when present), which matters for the
  hundreds of thousands of rows of MIMIC-CXR's tables.
  """
  path = os.fspath(path)
  try:
    with _open_csv(path) as f:
      reader = csv.DictReader(f)
      header = [name.strip() for name in (reader.fieldnames or [])]
      missing = [c for c in required_columns if c not in header]
      if missing:
        raise ValueError(f'{path}: missing column(s) {missing}; the header has {header}.')
      # Header cells are stripped so that 'Patient ID ' and 'Patient ID' both match.
      reader.fieldnames = header
      if keep is None:
        return list(reader)
      kept = [c for c in keep if c in header]
      return [{c: row[c] for c in kept} for row in reader]
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: CSV file not found.') from None
  except (UnicodeDecodeError, csv.Error, gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f'{path}: unreadable CSV ({e}).') from None


def resize_max_side(image: np.ndarray, max_side: int) -> np.ndarray:
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  scale = max_side / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def to_stored_dtype(image: np.ndarray, dtype, source: str) -> np.ndarray:
  """Gray uint8/uint16 -> the dataset's stored dtype; 8-bit to 16-bit is exact (x257)."""
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[..., 0]
  if image.ndim != 2:
    raise RecordError(f'{source}: expected a grayscale image, got shape {image.shape}')
  if image.dtype == dtype:
    return image
  if image.dtype == np.uint8 and dtype == np.uint16:
    return image.astype(np.uint16) * 257
  if image.dtype == np.uint16 and dtype == np.uint8:
    raise RecordError(f'{source}: 16-bit image in a dataset stored as 8-bit; build the '
                      'dataset with 16-bit storage.')
  raise RecordError(f'{source}: unsupported pixel type {image.dtype}')


class CxrBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the project's CXR builders; subclasses define FINDINGS and `_records`."""

  FINDINGS: Tuple[str, ...] = ()
  IMAGE_DTYPE = np.uint8
  BUILDER_CONFIGS = [CxrBuilderConfig(name='default')]

  def __init__(self, *, on_error: Optional[str] = None, **kwargs):
    # Set before super().__init__, which calls _info.
    self._on_error = on_error
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  @property
  def on_error(self) -> str:
    """'raise' or 'skip': the builder argument if given, else the config's."""
    return self._on_error or self.builder_config.on_error

  def _findings(self) -> Tuple[str, ...]:
    """The stored label names, in column order; builders whose labels come from their
    config (manifests) override this."""
    return tuple(self.FINDINGS)

  def _info(self) -> tfds.core.DatasetInfo:
    if self.on_error not in ON_ERROR:
      raise ValueError(f'on_error={self.on_error!r}; expected one of {ON_ERROR}.')
    findings = self._findings()
    text = tfds.features.Text()
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 1), dtype=self.IMAGE_DTYPE,
                                         encoding_format='png'),
            'labels': tfds.features.Tensor(shape=(len(findings),), dtype=np.int8),
            'image_id': text, 'patient_id': text, 'study_id': text, 'sex': text,
            'age': np.int32, 'view': text, 'site': text, 'report': text,
        }),
        metadata=tfds.core.MetadataDict(findings=list(findings), skipped={},
                                        max_side=self.builder_config.max_side),
        supervised_keys=None,
    )

  @abc.abstractmethod
  def _records(self, split: str, manual_dir) -> Iterator[Union[Record, RecordError]]:
    """Yields the split's records, and a RecordError (yielded, not raised) per bad row.

    Problems that make the whole listing unusable (a missing CSV or column) are raised.
    """

  @abc.abstractmethod
  def _split_names(self) -> Sequence[str]:
    ...

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split, dl_manager.manual_dir)
            for split in self._split_names()}

  def _read_pixels(self, record: Record) -> np.ndarray:
    if record.pixels is not None:
      return record.pixels
    return images.read_image(record.image_path)

  def _generate_examples(self, split: str, manual_dir):
    skipped: List[Dict[str, str]] = []
    num_findings = len(self._findings())
    written = 0
    for record in self._records(split, manual_dir):
      if isinstance(record, RecordError):
        self._on_bad_record(record, f'{self.name}/{split}', skipped)
        continue
      source = record.image_path or record.key
      try:
        image = to_stored_dtype(self._read_pixels(record), self.IMAGE_DTYPE, source)
        labels = np.asarray(record.labels, np.int8)
        if labels.shape != (num_findings,):
          raise RecordError(f'{source}: {labels.shape[0]} labels, expected {num_findings}')
      except (RecordError, ValueError, OSError) as e:
        self._on_bad_record(e, source, skipped)
        continue
      image = resize_max_side(image, self.builder_config.max_side)[..., None]
      written += 1
      yield record.key, {
          'image': image, 'labels': labels, 'image_id': record.key,
          'patient_id': record.patient_id, 'study_id': record.study_id, 'sex': record.sex,
          'age': record.age, 'view': record.view, 'site': record.site, 'report': record.report,
      }
    if not written:
      # TFDS cannot write an empty split; say why it is empty.
      if skipped:
        raise RecordError(f'{self.name}/{split}: all {len(skipped)} records were skipped, '
                          f'e.g. {skipped[0]["source"]}: {skipped[0]["reason"]}')
      raise ValueError(f'{self.name}/{split}: the listing has no records for this split.')
    if skipped:
      logging.warning('%s/%s: skipped %d records (on_error=skip): %s', self.name, split,
                      len(skipped), skipped[:20])
    self.info.metadata['skipped'][split] = skipped

  def _on_bad_record(self, error: Exception, source: str, skipped):
    if self.on_error == 'raise':
      raise RecordError(f'{error} (build with on_error=skip to skip bad records)') from error
    skipped.append({'source': source, 'reason': str(error)})
