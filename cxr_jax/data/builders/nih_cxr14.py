"""NIH ChestX-ray14 (Wang et al., 2017) from the user's download, as `nih_cxr14`.

Point `--manual_dir` at the folder holding `Data_Entry_2017_v2020.csv` (or
`Data_Entry_2017.csv`), `train_val_list.txt`, `test_list.txt` and the PNGs, either
in `images/` (the NIH box download, tarballs extracted in place) or in
`images_001/images/`, `images_002/images/`, ... (the Kaggle layout).

Configs:
  * `default`: the 14 text-mined findings. NIH labels are binary: a finding absent
    from `Finding Labels` is NEGATIVE (0), never UNMENTIONED. Splits: `test` from
    `test_list.txt`; `train_val_list.txt` is divided by patient (a stable hash,
    `labels.patient_split`) into `train` and `validation`.
  * `google_expert`: the radiologist labels of Majkowska et al. (2019) for four
    findings (Fracture, Pneumothorax, Airspace opacity, Nodule or mass; YES/NO),
    from `four_findings_expert_labels_{validation,test}_labels.csv` (the NIH box
    names) or `four_findings_expert_labels/{validation,test}_labels.csv` (Google's
    bucket) in the manual dir or one folder below it. Splits: `validation` and
    `test`, as released. When a Data_Entry table is in the manual dir, its patient,
    age, sex, view and follow-up win over the label files' 2017 copies of them.

Ages are parsed strictly (`base.parse_age`: '58' or '058Y'); one that is not an age
(the 2017 table's 414, say) is stored as unknown and listed in
`info.metadata['unparsed']`.
"""

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import labels as labels_lib
from cxr_jax.data.builders import base

DATA_ENTRY_CSVS = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')  # Newest first.
IMAGE, FINDING_LABELS, FOLLOW_UP = 'Image Index', 'Finding Labels', 'Follow-up #'
PATIENT, AGE, SEX, VIEW = 'Patient ID', 'Patient Age', 'Patient Gender', 'View Position'
NO_FINDING = 'No Finding'
SPLIT_LISTS = {'train_val': 'train_val_list.txt', 'test': 'test_list.txt'}

GOOGLE_FINDINGS = ('Fracture', 'Pneumothorax', 'Airspace opacity', 'Nodule or mass')
# The NIH box folder's flat names, then the names in Google's bucket
# (gs://gcs-public-data--healthcare-nih-chest-xray-labels/four_findings_expert_labels/).
GOOGLE_CSVS = ('four_findings_expert_labels_{split}_labels.csv',
               'four_findings_expert_labels/{split}_labels.csv')
# Columns the label files repeat from the 2017 Data_Entry table; the table's own (its
# 2020 revision corrected ages, for one) wins over these copies when it is there.
ENTRY_COLUMNS = (PATIENT, AGE, SEX, VIEW, FOLLOW_UP)
GOOGLE_VALUES = {'YES': labels_lib.POSITIVE, 'NO': labels_lib.NEGATIVE,
                 '': labels_lib.UNMENTIONED}


@dataclasses.dataclass
class NihConfig(base.CxrBuilderConfig):
  labels: str = 'nih'  # 'nih' (14 findings) or 'google' (4 expert-labelled findings).
  validation_fraction: float = 0.1  # Of train_val patients, for the `validation` split.


def google_code(value: str, source: str) -> int:
  text = (value or '').strip().upper()
  if text not in GOOGLE_VALUES:
    raise ValueError(f'{source}: label value {value!r} is not YES, NO or blank.')
  return GOOGLE_VALUES[text]


def normalize_patient(text: str) -> str:
  # 'Patient ID' is 1 in one file and 00001 in another; compare them as numbers.
  text = (text or '').strip()
  return str(int(text)) if text.isdigit() else text


def parse_sex(text: str) -> str:
  return {'M': 'M', 'F': 'F', 'MALE': 'M', 'FEMALE': 'F'}.get((text or '').strip().upper(), 'U')


def parse_view(text: str) -> str:
  view = (text or '').strip().upper()
  return view if view in ('PA', 'AP') else ('LATERAL' if view in ('LL', 'LATERAL') else
                                           view or 'UNKNOWN')


def find_images(manual_dir: str) -> Dict[str, str]:
  """Image file name -> path, over `images/` and `images_*/images/`."""
  folders = [os.path.join(manual_dir, 'images')]
  for entry in sorted(os.listdir(manual_dir)):
    if entry.startswith('images_'):
      folders += [os.path.join(manual_dir, entry, 'images'), os.path.join(manual_dir, entry)]
  index = {}
  for folder in folders:
    if os.path.isdir(folder):
      with os.scandir(folder) as entries:
        for entry in entries:
          if entry.name.lower().endswith('.png'):
            index.setdefault(entry.name, entry.path)
  return index


def first_existing(manual_dir: str, names: Sequence[str], what: str) -> str:
  for name in names:
    path = os.path.join(manual_dir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f'{manual_dir}: no {what} (looked for {", ".join(names)}).')


def find_nearby(manual_dir: str, name: str) -> Optional[str]:
  """`name` in the manual dir or one folder below it (image folders excluded)."""
  candidates = [os.path.join(manual_dir, name)] + [
      os.path.join(manual_dir, entry, name) for entry in sorted(os.listdir(manual_dir))
      if not entry.startswith('images')]
  return next((c for c in candidates if os.path.isfile(c)), None)


class NihCxr14(base.CxrBuilder):
  """NIH ChestX-ray14 frontal radiographs with text-mined or expert labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  FINDINGS = labels_lib.NIH_FINDINGS
  IMAGE_DTYPE = np.uint8
  BUILDER_CONFIGS = [
      NihConfig(name='default', labels='nih',
                description='14 text-mined findings; train/validation/test.'),
      NihConfig(name='google_expert', labels='google',
                description='Google radiologist labels for 4 findings; validation/test.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (extract every
  images_*.tar.gz in place) or from Kaggle (nih-chest-xrays/data), and pass the folder
  holding Data_Entry_2017*.csv, train_val_list.txt and test_list.txt as --manual_dir.
  For config `google_expert`, also put four_findings_expert_labels_validation_labels.csv
  and four_findings_expert_labels_test_labels.csv (from the same NIH box folder), or
  Google's four_findings_expert_labels/ folder with its validation_labels.csv and
  test_labels.csv, there.
  """

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._image_index: Optional[Dict[str, str]] = None

  def _findings(self):
    return GOOGLE_FINDINGS if self.builder_config.labels == 'google' else self.FINDINGS

  def _split_names(self) -> Sequence[str]:
    if self.builder_config.labels == 'google':
      return ('validation', 'test')
    return ('train', 'validation', 'test')

  def _images(self, manual_dir: str) -> Dict[str, str]:
    if self._image_index is None:  # One directory scan serves every split.
      self._image_index = find_images(manual_dir)
    return self._image_index

  def _records(self, split: str, manual_dir) -> Iterator[Union[base.Record, base.RecordError]]:
    manual_dir = os.fspath(manual_dir)
    if self.builder_config.labels == 'google':
      yield from self._google_records(split, manual_dir)
    else:
      yield from self._nih_records(split, manual_dir)

  def _split_of(self, manual_dir: str) -> Dict[str, str]:
    """Image name -> split, from the official lists plus the patient-level validation carve."""
    lists = {}
    for name, file_name in SPLIT_LISTS.items():
      path = first_existing(manual_dir, [file_name], f'official split list {file_name}')
      with open(path) as f:
        lists[name] = {line.strip() for line in f if line.strip()}
    both = lists['train_val'] & lists['test']
    if both:
      raise ValueError(f'{manual_dir}: {len(both)} images are in both train_val_list.txt and '
                       f'test_list.txt, e.g. {sorted(both)[:3]}.')
    split = {name: 'test' for name in lists['test']}
    split.update({name: 'train_val' for name in lists['train_val']})
    return split

  def _nih_records(self, split: str, manual_dir: str):
    csv_path = first_existing(manual_dir, DATA_ENTRY_CSVS, 'data entry CSV')
    rows = base.read_csv(csv_path, (IMAGE, FINDING_LABELS, PATIENT, AGE, SEX, VIEW))
    official = self._split_of(manual_dir)
    fraction = self.builder_config.validation_fraction
    test_patients = {normalize_patient(r[PATIENT]) for r in rows
                     if official.get(r[IMAGE].strip()) == 'test'}
    images = self._images(manual_dir)
    known = set(self.FINDINGS)
    for line, row in enumerate(rows, start=2):
      name, patient = row[IMAGE].strip(), normalize_patient(row[PATIENT])
      group = official.get(name)
      if group is None:
        if split == 'train':  # Reported once (each split reads the table), never dropped.
          yield base.RecordError(f'{csv_path} line {line} ({name}): listed in neither '
                                 'train_val_list.txt nor test_list.txt, so it has no split.')
        continue
      if group == 'train_val':
        if patient in test_patients:
          raise ValueError(f'{csv_path}: patient {patient} has images in both '
                           'train_val_list.txt and test_list.txt.')
        group = labels_lib.patient_split(
            patient, {'train': 1 - fraction, 'validation': fraction}, salt='nih_cxr14')
      if group != split:
        continue
      found = [t.strip() for t in row[FINDING_LABELS].split('|')]
      unknown = [t for t in found if t not in known and t != NO_FINDING]
      if unknown:
        yield base.RecordError(f'{csv_path} line {line} ({name}): unknown finding(s) '
                               f'{unknown} in {FINDING_LABELS!r}; expected '
                               f'{NO_FINDING!r} or names from {list(self.FINDINGS)}.')
        continue
      codes = [labels_lib.POSITIVE if f in found else labels_lib.NEGATIVE
               for f in self.FINDINGS]
      yield self._record(name, codes, row, images, manual_dir, f'{csv_path} line {line}')

  def _record(self, name: str, codes: List[int], row: Dict[str, str], images, manual_dir,
              where: str):
    patient = normalize_patient(row.get(PATIENT, ''))
    follow_up = (row.get(FOLLOW_UP) or '').strip()
    # Strict: the 2017 table has ages like 414, which the 2020 revision corrected.
    age, problem = base.parse_age(row.get(AGE, ''))
    unparsed = [{'source': f'{where} ({name})', 'field': 'age', 'value': row.get(AGE, ''),
                 'reason': problem}] if problem else []
    return base.Record(
        key=name, labels=codes,
        # A missing image fails when read, with this path in the message.
        image_path=images.get(name, os.path.join(manual_dir, 'images', name)),
        patient_id=patient,
        # Every image is its own visit; 'Follow-up #' numbers the patient's visits.
        study_id=f'{patient}/{follow_up}' if follow_up else os.path.splitext(name)[0],
        sex=parse_sex(row.get(SEX, '')), age=age, view=parse_view(row.get(VIEW, '')),
        site='nih', unparsed=unparsed)

  def _google_records(self, split: str, manual_dir: str):
    names = [name.format(split=split) for name in GOOGLE_CSVS]
    csv_path = next(filter(None, (find_nearby(manual_dir, n) for n in names)), None)
    if csv_path is None:
      raise FileNotFoundError(f'{manual_dir}: no {" or ".join(names)} (in it or one folder '
                              'below).')
    rows = base.read_csv(csv_path, (IMAGE, PATIENT) + GOOGLE_FINDINGS)
    entries = {}
    for entry_csv in DATA_ENTRY_CSVS:  # Optional: age, sex and view for the same images.
      if os.path.exists(os.path.join(manual_dir, entry_csv)):
        entries = {r[IMAGE].strip(): {k: v for k, v in r.items() if k in ENTRY_COLUMNS}
                   for r in base.read_csv(os.path.join(manual_dir, entry_csv), (IMAGE,))}
        break
    images = self._images(manual_dir)
    for line, row in enumerate(rows, start=2):
      name = row[IMAGE].strip()
      try:
        codes = [google_code(row[finding], f'{csv_path} line {line} ({name}), column '
                             f'{finding!r}') for finding in GOOGLE_FINDINGS]
      except ValueError as e:
        yield base.RecordError(str(e))
        continue
      # The label file's copies of the metadata are from 2017; the table's win.
      yield self._record(name, codes, {**row, **entries.get(name, {})}, images, manual_dir,
                         f'{csv_path} line {line}')
