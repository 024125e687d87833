"""MIMIC-CXR-JPG (Johnson et al., 2019) from the user's PhysioNet download, as `mimic_cxr`.

Point `--manual_dir` at the MIMIC-CXR-JPG folder, which holds (plain or gzipped):
  * `mimic-cxr-2.0.0-chexpert.csv` / `mimic-cxr-2.0.0-negbio.csv`: one row per
    study (`subject_id, study_id` and the 14 CheXpert observations, 1/0/-1/blank);
    the config picks the labeler (`chexpert` or `negbio`).
  * `mimic-cxr-2.0.0-metadata.csv`: one row per image (`dicom_id, subject_id,
    study_id, ViewPosition, ...`).
  * `mimic-cxr-2.0.0-split.csv`: the official split per image (train/validate/test),
    patient-disjoint as released; `validate` becomes the `validation` split.
  * `files/p10/p10000032/s50414267/<dicom_id>.jpg`: the images.
Optional:
  * Free-text reports `files/p10/p10000032/s50414267.txt` (MIMIC-CXR's
    mimic-cxr-reports.zip), found in the manual dir, in `mimic-cxr-reports/` below
    it, or in the folder given as the builder argument `reports_dir`. The stored
    `report` keeps the FINDINGS and IMPRESSION sections (the last paragraph when a
    report has neither), the text image-text training uses.
  * MIMIC-IV `patients.csv(.gz)` (`subject_id, gender, anchor_age`), for sex and age.

A study without a labels row (the labeler found no findings/impression section)
stores every finding as UNMENTIONED.

The `mined` config reads no label file: it labels each study's free-text report with
`cxr_jax.text.labeler` at build time (the 14 observations plus `Abnormal`, any
abnormality including those outside the 14) and records the labeler's version in
`info.metadata['labels']`; a study without a report is a bad record naming its path.
"""

import dataclasses
import os
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import labels as labels_lib
from cxr_jax.data.builders import base

PREFIX = 'mimic-cxr-2.0.0-'
DICOM, SUBJECT, STUDY, VIEW, SPLIT = 'dicom_id', 'subject_id', 'study_id', 'ViewPosition', 'split'
SPLITS = {'train': 'train', 'validate': 'validation', 'test': 'test'}
REPORT_SECTIONS = ('FINDINGS', 'IMPRESSION')
# A section header: capitals at the start of a line, then a colon ('FINDINGS:').
SECTION_HEADER = re.compile(r'^[ \t]*([A-Z][A-Z /&()\-]*[A-Z)])[ \t]*:', re.MULTILINE)


@dataclasses.dataclass
class MimicConfig(base.CxrBuilderConfig):
  labeler: str = 'chexpert'  # Which labels: 'chexpert' or 'negbio' file, or 'mined'.


def find_table(manual_dir: str, name: str, required: bool = True) -> Optional[str]:
  for candidate in (name, name + '.gz'):
    path = os.path.join(manual_dir, candidate)
    if os.path.exists(path):
      return path
  if required:
    raise FileNotFoundError(f'{manual_dir}: no {name} (or {name}.gz).')
  return None


def study_folder(subject: str, study: str) -> str:
  """'files/p10/p10000032/s50414267' (relative), MIMIC-CXR's layout."""
  return os.path.join('files', f'p{subject[:2]}', f'p{subject}', f's{study}')


def report_text(text: str) -> str:
  """The FINDINGS and IMPRESSION sections, whitespace collapsed; else the last paragraph."""
  headers = list(SECTION_HEADER.finditer(text))
  sections = {}
  for header, following in zip(headers, headers[1:] + [None]):
    body = text[header.end():following.start() if following else len(text)]
    sections.setdefault(header.group(1).strip(), ' '.join(body.split()))
  kept = [f'{name}: {sections[name]}' for name in REPORT_SECTIONS if sections.get(name)]
  if kept:
    return '\n'.join(kept)
  paragraphs = [p for p in re.split(r'\n\s*\n', text) if p.strip()]
  return ' '.join(paragraphs[-1].split()) if paragraphs else ''


def parse_view(text: str) -> str:
  view = (text or '').strip().upper()
  if view in ('LATERAL', 'LL'):
    return 'LATERAL'
  return view or 'UNKNOWN'


class MimicCxr(base.CxrBuilder):
  """MIMIC-CXR-JPG radiographs with CheXpert- or NegBio-labeler findings and reports."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release (MIMIC-CXR-JPG 2.0.0 / 2.1.0 files).'}
  FINDINGS = labels_lib.CHEXPERT_FINDINGS
  IMAGE_DTYPE = np.uint8
  BUILDER_CONFIGS = [
      MimicConfig(name='chexpert', labeler='chexpert', description='CheXpert labeler labels.'),
      MimicConfig(name='negbio', labeler='negbio', description='NegBio labeler labels.'),
      MimicConfig(name='mined', labeler='mined',
                  description='Labels mined from the reports by cxr_jax.text.labeler.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Get credentialed access to MIMIC-CXR-JPG on PhysioNet (https://physionet.org/content/
  mimic-cxr-jpg/), download it, and pass the folder holding mimic-cxr-2.0.0-*.csv(.gz) and
  files/ as --manual_dir. Optionally unzip mimic-cxr-reports.zip (from MIMIC-CXR) into the
  same folder, or pass its folder as the builder argument reports_dir.
  """

  def __init__(self, *, reports_dir: Optional[str] = None, **kwargs):
    self._reports_dir = reports_dir
    self._tables: Optional[Tables] = None
    super().__init__(**kwargs)

  def _mined(self) -> bool:
    return self.builder_config.labeler == 'mined'

  def _findings(self) -> Tuple[str, ...]:
    return tuple(self.FINDINGS) + (('Abnormal',) if self._mined() else ())

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    if self._mined():
      from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy: only here.
      info.metadata['labels'] = {'source': 'mined', 'labeler': labeler.LABELER_VERSION,
                                 'from': 'FINDINGS and IMPRESSION of the free-text reports'}
    else:
      info.metadata['labels'] = {'source': f'{PREFIX}{self.builder_config.labeler}.csv'}
    return info

  def _split_names(self) -> Sequence[str]:
    return tuple(SPLITS.values())

  def _records(self, split: str, manual_dir) -> Iterator[Union[base.Record, base.RecordError]]:
    manual_dir = os.fspath(manual_dir)
    if self._tables is None:  # Read and joined once for the three splits.
      self._tables = self._read_tables(manual_dir)
    tables = self._tables
    reports = ReportFinder(manual_dir, self._reports_dir)
    if self._mined():
      yield from self._mined_records(split, manual_dir, tables, reports)
      return
    for row in tables.images:
      dicom, subject, study = row[DICOM].strip(), row[SUBJECT].strip(), row[STUDY].strip()
      if tables.split_of.get(dicom) != split:
        continue
      codes = tables.codes_of.get(study, [labels_lib.UNMENTIONED] * len(self.FINDINGS))
      if isinstance(codes, base.RecordError):  # A bad label row fails each of its images.
        yield base.RecordError(f'{dicom}: {codes}')
        continue
      sex, age = tables.demographics.get(subject, ('U', -1))
      folder = study_folder(subject, study)
      yield base.Record(
          key=dicom, labels=codes, image_path=os.path.join(manual_dir, folder, dicom + '.jpg'),
          patient_id=subject, study_id=study, sex=sex, age=age, view=parse_view(row[VIEW]),
          site='mimic', report=reports(folder))
    reports.log_summary(split)

  def _mined_records(self, split, manual_dir, tables, reports):
    """The split's records with labels mined from their reports, in one labeler batch."""
    from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy.
    records = []
    for row in tables.images:
      dicom, subject, study = row[DICOM].strip(), row[SUBJECT].strip(), row[STUDY].strip()
      if tables.split_of.get(dicom) != split:
        continue
      sex, age = tables.demographics.get(subject, ('U', -1))
      folder = study_folder(subject, study)
      records.append(base.Record(
          key=dicom, labels=[], image_path=os.path.join(manual_dir, folder, dicom + '.jpg'),
          patient_id=subject, study_id=study, sex=sex, age=age, view=parse_view(row[VIEW]),
          site='mimic', report=reports(folder)))
    reports.log_summary(split)
    texts = sorted({r.report for r in records if r.report.strip()})
    mined = labeler.ReportLabeler().label(texts) if texts else None
    row_of = {text: i for i, text in enumerate(texts)}
    for record in records:
      if record.report.strip():
        i = row_of[record.report]
        record.labels = [int(c) for c in mined.codes[i]] + [int(mined.abnormal[i])]
        yield record
      else:
        yield base.RecordError(
            f'{record.key}: no report for study {record.study_id} (looked for '
            f'{study_folder(record.patient_id, record.study_id)}.txt under {reports.roots}); '
            'the mined config labels images from their reports.')

  def _read_tables(self, manual_dir: str) -> 'Tables':
    if self._mined():
      labels_csv, label_rows = None, []
    else:
      labels_csv = find_table(manual_dir, f'{PREFIX}{self.builder_config.labeler}.csv')
      label_rows = base.read_csv(labels_csv, (SUBJECT, STUDY) + self.FINDINGS)
    metadata_csv = find_table(manual_dir, f'{PREFIX}metadata.csv')
    split_csv = find_table(manual_dir, f'{PREFIX}split.csv')
    images = base.read_csv(metadata_csv, (DICOM, SUBJECT, STUDY, VIEW),
                           keep=(DICOM, SUBJECT, STUDY, VIEW))
    official = base.read_csv(split_csv, (DICOM, STUDY, SUBJECT, SPLIT), keep=(DICOM, SPLIT))
    split_of = {}
    for line, row in enumerate(official, start=2):
      name = row[SPLIT].strip()
      if name not in SPLITS:
        raise ValueError(f'{split_csv} line {line}: split {name!r} is not one of {list(SPLITS)}.')
      split_of[row[DICOM].strip()] = SPLITS[name]
    unsplit = sum(row[DICOM].strip() not in split_of for row in images)
    if unsplit:
      logging.warning('%s: %d images are not in %s and belong to no split.', metadata_csv,
                      unsplit, split_csv)
    return Tables(images, split_of, self._codes_by_study(labels_csv, label_rows),
                  self._demographics(manual_dir))

  def _codes_by_study(self, labels_csv: str, rows) -> Dict[str, Union[List[int], base.RecordError]]:
    codes_of = {}
    for line, row in enumerate(rows, start=2):
      study = row[STUDY].strip()
      try:
        codes_of[study] = [labels_lib.parse_code(row[name], source=f'{labels_csv} line {line} '
                                                 f'(study {study}), column {name!r}')
                           for name in self.FINDINGS]
      except ValueError as e:
        codes_of[study] = base.RecordError(str(e))
    return codes_of

  def _demographics(self, manual_dir: str) -> Dict[str, Tuple[str, int]]:
    path = find_table(manual_dir, 'patients.csv', required=False)
    if path is None:
      return {}
    rows = base.read_csv(path, (SUBJECT, 'gender', 'anchor_age'),
                         keep=(SUBJECT, 'gender', 'anchor_age'))
    out = {}
    for row in rows:
      age = row['anchor_age'].strip()
      out[row[SUBJECT].strip()] = ({'M': 'M', 'F': 'F'}.get(row['gender'].strip().upper(), 'U'),
                                   int(age) if age.isdigit() else -1)
    return out


@dataclasses.dataclass
class Tables:
  images: List[Dict[str, str]]  # metadata.csv rows.
  split_of: Dict[str, str]  # dicom_id -> split.
  codes_of: Dict[str, Union[List[int], base.RecordError]]  # study_id -> codes.
  demographics: Dict[str, Tuple[str, int]]  # subject_id -> (sex, age).


class ReportFinder:
  """Finds `<study folder>.txt` under the roots reports are unpacked into."""

  def __init__(self, manual_dir: str, reports_dir: Optional[str]):
    roots = [reports_dir] if reports_dir else []
    roots += [manual_dir, os.path.join(manual_dir, 'mimic-cxr-reports')]
    if reports_dir and not os.path.isdir(reports_dir):
      raise FileNotFoundError(f'reports_dir {reports_dir} does not exist.')
    self.roots = [r for r in roots if os.path.isdir(os.path.join(r, 'files'))]
    self.found = self.missing = 0
    self._last = ('', '')  # Images of a study are listed together: read its report once.

  def __call__(self, folder: str) -> str:
    if folder != self._last[0]:
      self._last = (folder, self._read(folder))
    if self._last[1]:
      self.found += 1
    else:
      self.missing += 1
    return self._last[1]

  def _read(self, folder: str) -> str:
    for root in self.roots:
      path = os.path.join(root, folder + '.txt')
      if os.path.exists(path):
        with open(path, encoding='utf-8', errors='replace') as f:
          return report_text(f.read())
    return ''

  def log_summary(self, split: str):
    if self.found and self.missing:
      logging.warning('MIMIC-CXR %s: %d images have a report, %d do not (stored empty).',
                      split, self.found, self.missing)
    elif not self.found:
      logging.info('MIMIC-CXR %s: no reports under %s; `report` is empty.', split, self.roots)
