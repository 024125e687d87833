"""A hospital's own chest X-rays, described by a CSV and a `manifest.json`, as `cxr_manifest`.

Put `manifest.json` next to the CSV and pass that folder (or the JSON file itself) as
`--manual_dir`:

    python -m cxr_jax.data.build cxr_manifest --manual_dir /data/hospital_a --data_dir D

Training then reads the dataset as `cxr_manifest/<name>` from `D`. A minimal manifest:

    {"name": "hospital_a", "csv": "labels.csv", "image_column": "path",
     "labels": ["Pneumothorax", "Pleural Effusion"]}

Every key (only `name`, `image_column` and `labels` are usually needed):
  name             The config name the dataset is read by (letters, digits, _ . -).
                   Default: the manifest folder's name.
  csv              The CSV, relative to the manifest's folder. Default 'manifest.csv'.
  image_column     Column with the image path (PNG, JPEG or DICOM, mixed freely),
                   absolute or relative to `image_root`. Default 'path'.
  image_root       Folder the image paths are relative to, relative to the manifest's
                   folder. Default: the manifest's folder.
  labels           Label columns, in order; their names are the dataset's findings. Cells
                   hold 1 / 0 / -1 / blank (positive, negative, uncertain, unmentioned).
                   May be empty (unlabelled data for self-supervised pretraining).
  label_values     Extra cell spellings, case-insensitive, e.g. {"yes": 1, "no": 0,
                   "possible": -1}; values must be 1, 0, -1 or -2 (unmentioned).
  columns          Metadata columns: {"patient_id": ..., "study_id": ..., "sex": ...,
                   "age": ..., "view": ..., "site": ..., "report": ...}. A field not
                   named here is read from a column of the same name when there is one.
  site             Site name stored for rows without a site column. Default: `name`.
  split_column     Column with each row's split ('train', 'validation', 'test', or any
                   other word; 'val'/'valid'/'validate'/'dev' mean 'validation').
  split_fractions  Instead of a split column: patient-level fractions, e.g.
                   {"train": 0.8, "validation": 0.1, "test": 0.1}; needs patient ids.
                   Without either, every row is in 'train'.
  split_salt       Changes the patient-level assignment. Default: `name`.
  allow_patient_overlap  With a split column, a patient in two splits is an error
                   unless this is true.
  mine_labels      "auto" (default), true or false. Mining reads each row's report (the
                   "report" column, see `columns`) with `cxr_jax.text.labeler` at build
                   time; the findings are then CheXpert's 14 observations plus
                   "Abnormal" (any abnormality, also those outside the 14). "auto" mines
                   when `labels` is empty and there is a report column; true mines
                   (and `labels` must be empty); false never mines. A row with an empty
                   report is a bad record naming its line. Mined datasets record
                   {"source": "mined", "labeler": version, ...} in
                   `info.metadata['labels']`, others {"source": "columns"}.
  devices_abnormal Whether a support device alone makes a mined report abnormal
                   (default false).
  encoding         The CSV's text encoding. Default "utf-8" (a byte-order mark is
                   fine); Excel on Windows saves "cp1252". A line that does not decode
                   is an error naming it.
  view_values      Extra view spellings, case-insensitive, e.g. {"AP erect": "AP",
                   "PA upright": "PA"}; values must be PA, AP, LATERAL or UNKNOWN.
  image_bits       8 or 16 (default): how images are stored. DICOMs need 16.
  max_side         Longest stored side in pixels (default 512; --max_side overrides).
  description      Free text, kept in the dataset's info.

The manifest is stored in the dataset's metadata (`info.metadata['manifest']`).

Metadata cells are parsed strictly (`base.parse_age`, `parse_view`): a cell that is not an
age ('50+', 'early 40s', 'abc', a bare 0, over 120) or a known view ('AP erect'
without a "view_values" entry) is stored as unknown (-1, 'UNKNOWN') and listed, with
its file, line, value and reason, in `info.metadata['unparsed'][split]`; the build's
summary counts them. The image is kept: its labels and pixels are sound.
"""

import codecs
import dataclasses
import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import labels as labels_lib
from cxr_jax.data.builders import base

SPEC_FILE = 'manifest.json'
METADATA_FIELDS = ('patient_id', 'study_id', 'sex', 'age', 'view', 'site', 'report')
SPEC_DEFAULTS: Dict[str, Any] = {
    'name': None, 'csv': 'manifest.csv', 'image_column': 'path', 'image_root': '.',
    'labels': [], 'label_values': {}, 'columns': {}, 'site': None, 'split_column': None,
    'split_fractions': None, 'split_salt': None, 'allow_patient_overlap': False,
    'image_bits': 16, 'max_side': 512, 'description': '', 'mine_labels': 'auto',
    'devices_abnormal': False, 'encoding': 'utf-8', 'view_values': {},
}
VIEWS = ('PA', 'AP', 'LATERAL')
VIEW_ALIASES = {'LL': 'LATERAL', 'RL': 'LATERAL', 'LAT': 'LATERAL'}
MINED_ABNORMAL = 'Abnormal'  # The 15th finding of a mined dataset.
SPLIT_ALIASES = {'val': 'validation', 'valid': 'validation', 'validate': 'validation',
                 'dev': 'validation', 'training': 'train', 'testing': 'test'}
CODES = (labels_lib.POSITIVE, labels_lib.NEGATIVE, labels_lib.UNCERTAIN, labels_lib.UNMENTIONED)
NAME_PATTERN = re.compile(r'^[A-Za-z0-9][\w.\-]*$')


@dataclasses.dataclass
class ManifestConfig(base.CxrBuilderConfig):
  spec: Dict[str, Any] = dataclasses.field(default_factory=dict)  # manifest.json, defaults filled.
  root: str = ''  # The manifest's folder; relative paths in the spec start here.


def load_spec(path: str) -> Dict[str, Any]:
  """manifest.json -> a checked spec with defaults filled in; errors name the file and key."""
  try:
    with open(path) as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: manifest not found (see cxr_jax/data/builders/'
                            'manifest.py for its format).') from None
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(spec, dict):
    raise ValueError(f'{path}: expected a JSON object, got {type(spec).__name__}.')
  unknown = sorted(set(spec) - set(SPEC_DEFAULTS))
  if unknown:
    raise ValueError(f'{path}: unknown key(s) {unknown}; valid keys are {sorted(SPEC_DEFAULTS)}.')
  spec = {**SPEC_DEFAULTS, **spec}
  root = os.path.dirname(os.path.abspath(path))
  spec['name'] = spec['name'] or re.sub(r'[^\w.\-]', '_', os.path.basename(root))

  def fail(key, problem):
    raise ValueError(f'{path}: "{key}" {problem}.')

  if not NAME_PATTERN.match(spec['name']):
    fail('name', f'is {spec["name"]!r}; use letters, digits, _, . and -')
  if not (isinstance(spec['labels'], list) and all(isinstance(c, str) for c in spec['labels'])):
    fail('labels', 'must be a list of column names')
  if len(set(spec['labels'])) != len(spec['labels']):
    fail('labels', 'lists a column twice')
  values = spec['label_values']
  if not isinstance(values, dict) or any(v not in CODES for v in values.values()):
    fail('label_values', f'must map cell text to one of {CODES}')
  columns = spec['columns']
  if not isinstance(columns, dict) or set(columns) - set(METADATA_FIELDS):
    fail('columns', f'may only name {list(METADATA_FIELDS)}')
  if spec['split_column'] and spec['split_fractions']:
    fail('split_fractions', 'cannot be combined with "split_column"; choose one')
  fractions = spec['split_fractions']
  if fractions is not None:
    if not isinstance(fractions, dict) or not fractions:
      fail('split_fractions', 'must map split names to fractions')
    if not np.isclose(sum(fractions.values()), 1.0):
      fail('split_fractions', f'sum to {sum(fractions.values())}, not 1')
    for name in fractions:
      check_split_name(name, f'{path}: "split_fractions"')
  if spec['mine_labels'] not in ('auto', True, False):
    fail('mine_labels', 'must be "auto", true or false')
  if spec['mine_labels'] is True and spec['labels']:
    fail('mine_labels', 'is true, so labels come from the reports; leave "labels" empty')
  if not isinstance(spec['devices_abnormal'], bool):
    fail('devices_abnormal', 'must be true or false')
  try:
    codecs.lookup(str(spec['encoding']))
  except LookupError:
    fail('encoding', f'is {spec["encoding"]!r}, not an encoding Python knows (e.g. "utf-8", '
         '"cp1252", "latin-1")')
  views = spec['view_values']
  if not isinstance(views, dict) or any(
      v not in VIEWS + ('UNKNOWN',) for v in views.values()):
    fail('view_values', f'must map cell text to one of {list(VIEWS) + ["UNKNOWN"]}')
  if spec['image_bits'] not in (8, 16):
    fail('image_bits', 'must be 8 or 16')
  if not isinstance(spec['max_side'], int) or spec['max_side'] < 1:
    fail('max_side', 'must be a positive integer')
  return spec


def check_split_name(name: str, source: str) -> str:
  if not re.fullmatch(r'[A-Za-z]\w*', name or ''):
    raise ValueError(f'{source}: split {name!r} is not a valid split name (letters, digits, _).')
  return name


def normalize_split(text: str) -> str:
  split = (text or '').strip().lower()
  return SPLIT_ALIASES.get(split, split)


def normalize_sex(text: str) -> str:
  return {'M': 'M', 'MALE': 'M', 'F': 'F', 'FEMALE': 'F'}.get((text or '').strip().upper(), 'U')


def parse_view(text: str, extra: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
  """(view, '') or ('UNKNOWN', why): PA, AP or LATERAL (LL, RL, LAT), case-insensitive,
  or a spelling the manifest's "view_values" maps; blank is 'UNKNOWN', ''."""
  view = ' '.join((text or '').split()).upper()
  extra = {' '.join(str(k).split()).upper(): v for k, v in (extra or {}).items()}
  if view in extra:
    return extra[view], ''
  if not view:
    return 'UNKNOWN', ''
  view = VIEW_ALIASES.get(view, view)
  if view in VIEWS:
    return view, ''
  return 'UNKNOWN', (f'not one of {list(VIEWS)} (or LL, RL, LAT); map it with "view_values" '
                     'in manifest.json, e.g. {"AP erect": "AP"}')


class CxrManifest(base.CxrBuilder):
  """Any CSV-described CXR collection; labels and columns come from its manifest."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = []  # Every manifest brings its own: config_from_manual_dir.
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Pass the folder holding manifest.json and its CSV as --manual_dir (see the module
  docstring of cxr_jax/data/builders/manifest.py for the manifest's keys).
  """

  def __init__(self, *, config=None, **kwargs):
    if not isinstance(config, ManifestConfig):
      raise ValueError(
          f'cxr_manifest{"/" + str(config) if config else ""} is not prepared here, and a '
          'manifest dataset can only be built from its manifest.json: run `python -m '
          'cxr_jax.data.build cxr_manifest --manual_dir FOLDER --data_dir DIR`, then read it '
          'as cxr_manifest/<name> from DIR.')
    self._listing: Optional[Dict[str, List[Union[base.Record, base.RecordError]]]] = None
    super().__init__(config=config, **kwargs)

  @classmethod
  def config_from_manual_dir(cls, manual_dir: str, name: Optional[str] = None,
                             max_side: Optional[int] = None) -> ManifestConfig:
    """The config a manifest describes; `manual_dir` is its folder or the JSON file itself."""
    path = manual_dir if manual_dir.endswith('.json') else os.path.join(manual_dir, SPEC_FILE)
    spec = load_spec(path)
    if name and name != spec['name']:
      raise ValueError(f'{path}: its name is {spec["name"]!r}, but cxr_manifest/{name} was '
                       'asked for; change one of them.')
    if max_side:
      spec['max_side'] = max_side
    return ManifestConfig(name=spec['name'], max_side=spec['max_side'], spec=spec,
                          root=os.path.dirname(os.path.abspath(path)),
                          description=spec['description'] or f'Manifest dataset {spec["name"]}.')

  @property
  def IMAGE_DTYPE(self):  # pylint: disable=invalid-name  Per manifest, not per class.
    return np.uint16 if self.builder_config.spec['image_bits'] == 16 else np.uint8

  def _mines(self) -> bool:
    """Whether labels are mined from reports (the spec's "mine_labels", "auto" resolved)."""
    spec = self.builder_config.spec
    if spec['mine_labels'] != 'auto':
      return spec['mine_labels']
    if spec['labels']:
      return False
    csv_path = self._path(spec['csv'])
    return 'report' in self._metadata_columns(csv_path)

  def _findings(self) -> Tuple[str, ...]:
    if self._mines():
      from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy: only here.
      return tuple(labeler.OBSERVATIONS) + (MINED_ABNORMAL,)
    return tuple(self.builder_config.spec['labels'])

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    spec = self.builder_config.spec
    info.metadata['manifest'] = dict(spec)
    if self._mines():
      from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy.
      columns = self._metadata_columns(self._path(spec['csv']))
      info.metadata['labels'] = {
          'source': 'mined', 'labeler': labeler.LABELER_VERSION,
          'report_column': columns.get('report'),
          'devices_abnormal': spec['devices_abnormal']}
    else:
      info.metadata['labels'] = {'source': 'columns', 'columns': list(spec['labels'])}
    return info

  def _split_names(self) -> Sequence[str]:
    return sorted(self._list())

  def _split_generators(self, dl_manager):
    del dl_manager  # Paths are relative to the manifest's folder, known from the config.
    return {split: self._generate_examples(split, self.builder_config.root)
            for split in self._split_names()}

  def _records(self, split: str, manual_dir) -> Iterator[Union[base.Record, base.RecordError]]:
    del manual_dir
    yield from self._list()[split]

  # --- listing --------------------------------------------------------------------

  def _path(self, relative: str) -> str:
    return os.path.join(self.builder_config.root, relative)

  def _list(self) -> Dict[str, List[Union[base.Record, base.RecordError]]]:
    """split -> its records, from one pass over the CSV."""
    if self._listing is not None:
      return self._listing
    spec = self.builder_config.spec
    csv_path = self._path(spec['csv'])
    columns = self._metadata_columns(csv_path)
    required = [spec['image_column'], *spec['labels'], *columns.values()]
    if spec['split_column']:
      required.append(spec['split_column'])
    rows = base.read_csv(csv_path, required, encoding=spec['encoding'])
    if spec['split_fractions'] and 'patient_id' not in columns:
      raise ValueError(f'{csv_path}: "split_fractions" splits by patient, but there is no '
                       'patient_id column; add one, name it in "columns", or use '
                       '"split_column".')
    listing: Dict[str, List[Union[base.Record, base.RecordError]]] = {}
    unassigned = []  # Rows whose split cell is unusable.
    first_line_of: Dict[str, int] = {}
    splits_of_patient: Dict[str, set] = {}
    for line, row in enumerate(rows, start=2):
      where = f'{csv_path} line {line}'
      try:
        split = self._split_of(row, columns, where)
      except ValueError as e:
        unassigned.append(base.RecordError(str(e)))
        continue
      record = self._record(row, columns, where, first_line_of, line)
      listing.setdefault(split, []).append(record)
      if isinstance(record, base.Record) and record.patient_id:
        splits_of_patient.setdefault(record.patient_id, set()).add(split)
    crossing = {p: s for p, s in splits_of_patient.items() if len(s) > 1}
    if crossing and not spec['allow_patient_overlap']:
      examples = ', '.join(f'{p} in {sorted(s)}' for p, s in sorted(crossing.items())[:3])
      raise ValueError(f'{csv_path}: {len(crossing)} patients are in more than one split '
                       f'({examples}); images of one patient in two splits leak between '
                       'training and evaluation. Fix the split column or set '
                       '"allow_patient_overlap": true.')
    if not listing:
      raise ValueError(f'{csv_path}: no usable rows ({len(rows)} rows, '
                       f'{len(unassigned)} without a valid split).')
    # Rows without a split are reported (or skipped) with the first split.
    listing[min(listing)][:0] = unassigned
    if self._mines():
      self._mine(listing, csv_path, columns, first_line_of)
    self._listing = listing
    return listing

  def _mine(self, listing, csv_path: str, columns: Dict[str, str],
            line_of: Dict[str, int]) -> None:
    """Replaces each record's labels by the labeler's reading of its report."""
    from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy.
    if 'report' not in columns:
      raise ValueError(f'{csv_path}: "mine_labels" needs a report column; add a "report" '
                       'column or name one in "columns".')
    spec = self.builder_config.spec
    records = [(split, i, r) for split, rs in listing.items() for i, r in enumerate(rs)
               if isinstance(r, base.Record)]
    usable = []
    for split, i, record in records:
      if record.report.strip():
        usable.append(record)
      else:
        listing[split][i] = base.RecordError(
            f'{csv_path} line {line_of[record.key]} ({record.key}), column '
            f'{columns["report"]!r}: empty report; mining labels needs one.')
    if not usable:
      raise ValueError(f'{csv_path}: no row has a report to mine labels from (column '
                       f'{columns["report"]!r}).')
    mined = labeler.ReportLabeler(devices_abnormal=spec['devices_abnormal']).label(
        [r.report for r in usable])
    for record, codes, abnormal in zip(usable, mined.codes, mined.abnormal):
      record.labels = [int(c) for c in codes] + [int(abnormal)]

  def _metadata_columns(self, csv_path: str) -> Dict[str, str]:
    """Metadata field -> CSV column: those the spec names, plus same-named columns."""
    named = dict(self.builder_config.spec['columns'])
    header = set(base.read_csv_header(csv_path, self.builder_config.spec['encoding']))
    for field in METADATA_FIELDS:
      if field not in named and field in header:
        named[field] = field
    return named

  def _split_of(self, row: Dict[str, str], columns: Dict[str, str], where: str) -> str:
    spec = self.builder_config.spec
    if spec['split_column']:
      split = normalize_split(row[spec['split_column']])
      if not split:
        raise ValueError(f'{where}: empty {spec["split_column"]!r} (split) cell.')
      return check_split_name(split, where)
    if spec['split_fractions']:
      patient = row[columns['patient_id']].strip()
      if not patient:
        raise ValueError(f'{where}: empty patient id; "split_fractions" needs one per row.')
      return labels_lib.patient_split(patient, spec['split_fractions'],
                                      salt=spec['split_salt'] or spec['name'])
    return 'train'

  def _code(self, value: str, source: str) -> int:
    extra = {str(k).strip().lower(): v for k, v in self.builder_config.spec['label_values'].items()}
    text = (value or '').strip().lower()
    if text in extra:
      return extra[text]
    try:
      return labels_lib.parse_code(value, source=source)
    except ValueError:
      allowed = ['1', '0', '-1', 'blank'] + sorted(extra)
      raise ValueError(f'{source}: label value {value!r} is not one of {allowed} (add '
                       'spellings with "label_values" in the manifest).') from None

  def _record(self, row, columns, where, first_line_of, line):
    spec = self.builder_config.spec
    relative = row[spec['image_column']].strip()
    if not relative:
      return base.RecordError(f'{where}: empty {spec["image_column"]!r} (image path) cell.')
    if relative in first_line_of:
      return base.RecordError(f'{where}: image {relative} is listed again (first on line '
                              f'{first_line_of[relative]}).')
    first_line_of[relative] = line
    try:
      codes = [self._code(row[c], f'{where} ({relative}), column {c!r}') for c in spec['labels']]
    except ValueError as e:
      return base.RecordError(str(e))

    def field(name):
      return (row.get(columns[name]) or '').strip() if name in columns else ''

    unparsed = []
    age, problem = base.parse_age(field('age'))
    if problem:
      unparsed.append({'source': f'{where} ({relative})', 'field': 'age',
                       'value': field('age'), 'reason': problem})
    view, problem = parse_view(field('view'), spec['view_values'])
    if problem:
      unparsed.append({'source': f'{where} ({relative})', 'field': 'view',
                       'value': field('view'), 'reason': problem})
    return base.Record(
        key=relative, labels=codes,
        image_path=os.path.join(self._path(spec['image_root']), relative),
        patient_id=field('patient_id'), study_id=field('study_id'),
        sex=normalize_sex(field('sex')), age=age, view=view,
        site=field('site') or spec['site'] or spec['name'], report=field('report'),
        unparsed=unparsed)
