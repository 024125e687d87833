"""CheXpert (Irvin et al., 2019) from the user's download, as `cxr_chexpert`.

TFDS ships an unrelated `chexpert` builder, hence the prefix. Configs:
  * `small`: CheXpert-v1.0-small (downsampled JPEGs, about 11 GB).
  * `full`: CheXpert v1.0 (original resolution JPEGs, about 440 GB).

Point `--manual_dir` at the unpacked folder that holds `train.csv`, `valid.csv` and
the `train/` and `valid/` image trees. The CSV's `Path` column starts with the
release folder's name (`CheXpert-v1.0-small/train/patient00001/study1/
view1_frontal.jpg`), so it is resolved against the manual dir's parent, or the
manual dir itself, or with that first component dropped (a renamed folder).

Labels are stored in the CSV's convention: 1 positive, 0 negative, -1 uncertain,
blank unmentioned (`labels.UNMENTIONED`). Splits: `train` and `validation`
(`valid.csv`, labelled by radiologists); the two are patient-disjoint as released.
"""

import dataclasses
import os
from typing import Iterator, Sequence, Tuple, Union

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import labels as labels_lib
from cxr_jax.data.builders import base

PATH, SEX, AGE, FRONTAL_LATERAL, AP_PA = 'Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA'
SPLIT_CSVS = {'train': 'train.csv', 'validation': 'valid.csv'}
RELEASE_FOLDERS = {'small': 'CheXpert-v1.0-small', 'full': 'CheXpert-v1.0'}
SEXES = {'male': 'M', 'female': 'F'}


def view_of(frontal_lateral: str, ap_pa: str) -> str:
  """'PA'/'AP' for frontal films, 'LATERAL' for lateral ones, 'FRONTAL' when AP/PA is blank."""
  if frontal_lateral.strip().lower() == 'lateral':
    return 'LATERAL'
  if frontal_lateral.strip().lower() == 'frontal':
    projection = ap_pa.strip().upper()
    return projection if projection in ('AP', 'PA') else 'FRONTAL'
  return 'UNKNOWN'


@dataclasses.dataclass
class ChexpertConfig(base.CxrBuilderConfig):
  release: str = 'small'  # A key of RELEASE_FOLDERS.


class PathResolver:
  """Finds an image from a CSV path, trying the layouts users unpack into.

  Remembers which layout worked last, so resolving costs one stat per image.
  """

  def __init__(self, manual_dir: str):
    manual_dir = os.path.abspath(manual_dir)  # dirname of 'a/b/' would be 'a/b'.
    self.layouts = [
        lambda p: os.path.join(os.path.dirname(manual_dir), p),  # Path includes the folder.
        lambda p: os.path.join(manual_dir, p),  # Path relative to the manual dir.
        lambda p: os.path.join(manual_dir, p.split('/', 1)[-1]),  # Folder was renamed.
    ]

  def __call__(self, csv_path: str) -> str:
    candidates = [layout(csv_path) for layout in self.layouts]
    for i, candidate in enumerate(candidates):
      if os.path.exists(candidate):
        self.layouts.insert(0, self.layouts.pop(i))
        return candidate
    return candidates[0]  # Reading it then fails with 'file not found' naming this path.


def patient_and_study(relative: str) -> Tuple[str, str]:
  """(patient, study) of '.../<patient>/<study>/<view>.jpg'; study numbers restart for
  every patient. ('', '') for a path without those parts."""
  parts = relative.split('/')
  return (parts[-3], parts[-2]) if len(parts) >= 3 else ('', '')


class CxrChexpert(base.CxrBuilder):
  """CheXpert chest radiographs with the CheXpert labeler's 14 observations."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  FINDINGS = labels_lib.CHEXPERT_FINDINGS
  IMAGE_DTYPE = np.uint8
  BUILDER_CONFIGS = [
      ChexpertConfig(name='small', release='small',
                     description='CheXpert-v1.0-small (downsampled).'),
      ChexpertConfig(name='full', release='full',
                     description='CheXpert v1.0 (original resolution).'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register and download CheXpert from https://stanfordmlgroup.github.io/competitions/chexpert/
  (CheXpert-v1.0-small.zip for config `small`, CheXpert-v1.0.zip for `full`), unzip it,
  and pass the unpacked folder (the one with train.csv and valid.csv) as --manual_dir.
  """

  def _split_names(self) -> Sequence[str]:
    return tuple(SPLIT_CSVS)

  def _records(self, split: str, manual_dir) -> Iterator[Union[base.Record, base.RecordError]]:
    manual_dir = os.fspath(manual_dir)
    self._check_patient_disjoint(manual_dir)
    csv_path = os.path.join(manual_dir, SPLIT_CSVS[split])
    rows = base.read_csv(csv_path, (PATH, SEX, AGE, FRONTAL_LATERAL, AP_PA) + self.FINDINGS)
    self._check_release(csv_path, rows)
    resolve = PathResolver(manual_dir)
    for line, row in enumerate(rows, start=2):  # Line 1 is the header.
      relative = row[PATH].strip()
      try:
        codes = [labels_lib.parse_code(row[name], source=f'{csv_path} line {line} '
                                       f'({relative}), column {name!r}')
                 for name in self.FINDINGS]
      except ValueError as e:
        yield base.RecordError(str(e))
        continue
      patient, study = patient_and_study(relative)
      # Stored as unknown and listed: CheXpert writes Age 0 for a few patients whose
      # age is missing (adults in an adult hospital).
      age, problem = base.parse_age(row[AGE])
      unparsed = [{'source': f'{csv_path} line {line} ({relative})', 'field': 'age',
                   'value': row[AGE].strip(), 'reason': problem}] if problem else []
      yield base.Record(
          key=relative, labels=codes, image_path=resolve(relative), patient_id=patient,
          study_id=f'{patient}/{study}' if patient else '',
          sex=SEXES.get(row[SEX].strip().lower(), 'U'), age=age,
          view=view_of(row[FRONTAL_LATERAL], row[AP_PA]), site='stanford', unparsed=unparsed)

  def _check_patient_disjoint(self, manual_dir: str) -> None:
    """Raises naming the patients that are in both train.csv and valid.csv.

    The release keeps them apart, but a copy edited or merged by hand may not, and a
    patient in both would leak between training and validation.
    """
    if getattr(self, '_disjoint_checked', False):
      return
    patients = {}
    for split, name in SPLIT_CSVS.items():
      path = os.path.join(manual_dir, name)
      rows = base.read_csv(path, (PATH,), keep=(PATH,))
      patients[split] = {patient_and_study(row[PATH].strip())[0] for row in rows} - {''}
    (first, a), (second, b) = list(patients.items())[:2]
    both = sorted(a & b)
    if both:
      raise ValueError(
          f'{os.path.join(manual_dir, SPLIT_CSVS[first])} and '
          f'{os.path.join(manual_dir, SPLIT_CSVS[second])} share {len(both)} patients '
          f'(e.g. {", ".join(both[:5])}); a patient in both splits leaks between training '
          'and validation. Use the release\'s CSVs, or remove those rows from one of them.')
    self._disjoint_checked = True

  def _check_release(self, csv_path: str, rows):
    # Both releases share a layout; building `full` from the small download (or the
    # reverse) would succeed and mislabel the dataset, so the paths' folder decides.
    folders = {row[PATH].strip().split('/', 1)[0] for row in rows[:100]}
    for release, folder in RELEASE_FOLDERS.items():
      if release != self.builder_config.release and folder in folders:
        raise ValueError(f'{csv_path}: paths start with {folder!r}, the {release!r} release; '
                         f'build cxr_chexpert/{release} instead of '
                         f'cxr_chexpert/{self.builder_config.name}.')
