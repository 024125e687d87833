"""What every CXR dataset builder shares: features, label metadata, image handling, errors.

A concrete builder lists its records (path or pixels, label codes, metadata) per split;
this base reads each image, resizes it to at most `max_side` pixels, stores it as a
lossless PNG (16-bit where the dataset's images are), and either stops at the first
bad record naming the file and the reason (`on_error='raise'`, the default) or skips
it and records every skipped file with its reason in the dataset's metadata
(`on_error='skip'`). TFDS builds into a temporary directory and renames it when done,
so an interrupted build leaves nothing half-written and re-running starts clean.

`raw_size=N` (config field; `build --raw_size N`, dataset CONFIG_rawN) stores instead
each image resized to N x N, exactly as the pipeline's `resize(N)` op would resize the
PNG-stored image, as an uncompressed array in the dataset's dtype (`images.encode_raw`).
`decode` reads it with no codec, which is what lets one core feed about a thousand
224-pixel training images a second (BENCHMARKS.md, "Input pipeline"); it costs more disk
per pixel than PNG and fixes the resolution, so full-resolution work keeps PNG.

The error policy is a builder argument, not part of the config: it changes how a build
reacts to bad files, not what the dataset is, so `cxr_chexpert/small/on_error=skip`
builds into the same directory as `cxr_chexpert/small`. Builders write ArrayRecord
files unless told otherwise, because training reads them by random access.
"""

import abc
import codecs
import csv
import dataclasses
import gzip
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from absl import logging
import cv2
import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import images
from cxr_jax.data import transforms

ON_ERROR = ('raise', 'skip')


@dataclasses.dataclass
class CxrBuilderConfig(tfds.core.BuilderConfig):
  max_side: int = 512
  on_error: str = 'raise'
  # 0: PNG at up to max_side. N: raw N x N arrays, what `decode|resize(N)` gives the PNG.
  raw_size: int = 0


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
  # Metadata cells that could not be parsed and were stored as unknown, each
  # {'source': file and line, 'field': ..., 'value': the cell, 'reason': ...}.
  unparsed: List[Dict[str, str]] = dataclasses.field(default_factory=list)


MAX_AGE = 120  # Older is a typing error (NIH's 2017 table has ages up to 414).


def parse_age(text: str) -> Tuple[int, str]:
  """(age in whole years, '') or (-1, why the cell is not an age); blank is -1, ''.

  A number of years ('47', '47.5') or a DICOM age string ('047Y', '006M', '010W',
  '003D'). A bare '0' is not taken as an age: exports write 0 where the age is
  missing, so it is reported and stored as unknown; a newborn's age is written with
  its unit ('000Y', '003M'), which is deliberate and stored as 0. Ages above 120 are
  reported as implausible. Nothing is guessed from text like '50+' or 'early 40s'.
  """
  text = (text or '').strip()
  if not text:
    return -1, ''
  match = re.fullmatch(r'(\d{1,3})([DWMY])', text.upper())
  if match:
    per_year = {'D': 365.25, 'W': 52.18, 'M': 12, 'Y': 1}[match.group(2)]
    years = int(int(match.group(1)) / per_year)
  elif re.fullmatch(r'\d+(\.\d+)?', text):
    years = int(float(text))
    if float(text) == 0:
      return -1, ('0 is read as a missing age (exports write 0 for one); write a newborn\'s '
                  "age with its unit, e.g. '000Y' or '003M'")
  else:
    return -1, 'not a number of years or a DICOM age string like 047Y'
  if years > MAX_AGE:
    return -1, f'implausible age (over {MAX_AGE} years)'
  return years, ''


class RecordError(ValueError):
  """A bad record; the message names the file and what is wrong."""


DEFAULT_ENCODING = 'utf-8'


def _python_encoding(encoding: str) -> str:
  # UTF-8 files from Excel start with a byte-order mark; utf-8-sig reads both kinds.
  return 'utf-8-sig' if codecs.lookup(encoding).name == 'utf-8' else encoding


def _open_csv(path: str, encoding: str = DEFAULT_ENCODING):
  opener = gzip.open if path.endswith('.gz') else open
  return opener(path, 'rt', newline='', encoding=_python_encoding(encoding))


def _undecodable(path: str, encoding: str, error: UnicodeDecodeError) -> ValueError:
  """The error for a CSV that is not in `encoding`, naming the first line that fails."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    for number, line in enumerate(f, start=1):
      try:
        line.decode(_python_encoding(encoding))
      except UnicodeDecodeError as e:
        return ValueError(
            f'{path}, line {number}: cannot be decoded as {encoding} (byte '
            f'{line[e.start:e.start + 1]!r} at column {e.start + 1}: {e.reason}). Say how '
            'the file is encoded, e.g. "encoding": "cp1252" in manifest.json for a CSV '
            'saved by Excel on Windows.')
  return ValueError(f'{path}: cannot be decoded as {encoding} ({error}).')


def read_csv_header(path, encoding: str = DEFAULT_ENCODING) -> List[str]:
  """The CSV's column names, stripped (as `read_csv` matches them)."""
  path = os.fspath(path)
  try:
    with _open_csv(path, encoding) as f:
      return [name.strip() for name in next(csv.reader(f), [])]
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: CSV file not found.') from None
  except UnicodeDecodeError as e:
    raise _undecodable(path, encoding, e) from None
  except (csv.Error, gzip.BadGzipFile, EOFError) as e:
    raise ValueError(f'{path}: unreadable CSV ({e}).') from None


def read_csv(path, required_columns: Sequence[str] = (),
             keep: Optional[Sequence[str]] = None,
             encoding: str = DEFAULT_ENCODING) -> List[Dict[str, str]]:
  """A CSV (plain or .gz) as a list of row dicts; a missing file or column names the CSV.

  `keep` limits each row to those columns (when present), which matters for the
  hundreds of thousands of rows of MIMIC-CXR's tables. `encoding` is the file's text
  encoding (UTF-8, with or without a byte-order mark, by default); a byte that does not
  decode is an error naming the line.
  """
  path = os.fspath(path)
  try:
    with _open_csv(path, encoding) as f:
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
  except UnicodeDecodeError as e:
    raise _undecodable(path, encoding, e) from None
  except (csv.Error, gzip.BadGzipFile, EOFError) as e:
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
    raw_size = self.builder_config.raw_size
    if not (isinstance(raw_size, int) and raw_size >= 0):
      raise ValueError(f'raw_size={raw_size!r}; expected 0 (store PNG) or a side in pixels.')
    findings = self._findings()
    text = tfds.features.Text()
    if raw_size:  # .npy bytes (shape and dtype in their header), decoded by `decode`.
      image = tfds.features.Tensor(shape=(), dtype=np.object_)
    else:
      image = tfds.features.Image(shape=(None, None, 1), dtype=self.IMAGE_DTYPE,
                                  encoding_format='png')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': image,
            'labels': tfds.features.Tensor(shape=(len(findings),), dtype=np.int8),
            'image_id': text, 'patient_id': text, 'study_id': text, 'sex': text,
            'age': np.int32, 'view': text, 'site': text, 'report': text,
        }),
        metadata=tfds.core.MetadataDict(findings=list(findings), skipped={}, unparsed={},
                                        max_side=self.builder_config.max_side,
                                        raw_size=raw_size),
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
    raw_size = self.builder_config.raw_size
    # The pipeline's own op, so that raw records equal `decode|resize(N)` of the PNG ones.
    resize_raw = transforms.Preprocess(f'resize({raw_size})') if raw_size else None
    skipped: List[Dict[str, str]] = []
    unparsed: List[Dict[str, str]] = []
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
      if resize_raw:
        image = images.encode_raw(resize_raw({'image': image}, None)['image'])
      written += 1
      unparsed.extend(record.unparsed)
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
    if unparsed:
      logging.warning('%s/%s: %d metadata cells could not be parsed and are stored as '
                      'unknown: %s', self.name, split, len(unparsed), unparsed[:20])
    self.info.metadata['unparsed'][split] = unparsed

  def _on_bad_record(self, error: Exception, source: str, skipped):
    if self.on_error == 'raise':
      raise RecordError(f'{error} (build with on_error=skip to skip bad records)') from error
    skipped.append({'source': source, 'reason': str(error)})
