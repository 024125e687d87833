"""Builders for CheXpert, NIH ChestX-ray14, MIMIC-CXR-JPG and manifests, on tiny copies.

Each dataset is laid out as its real download is (same file names, same CSV columns),
with a few 40x32 images, then built with `cxr_jax.data.build.build` and read back
the way the training pipeline reads it (`as_data_source` with SkipDecoding).
"""

import csv
import gzip
import json
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
from PIL import Image
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
import pytest
import tensorflow_datasets as tfds

from cxr_jax.data import build as build_lib
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import transforms
from cxr_jax.data.builders import base

SHAPE = (40, 32)
UNMENTIONED = labels_lib.UNMENTIONED
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- helpers -----------------------------------------------------------------------------


def pixels(seed: int, bits: int = 8) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 2**bits, SHAPE).astype(np.uint8 if bits == 8 else np.uint16)


def write_jpeg(path, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels(seed)).save(path, format='JPEG')


def write_png(path, seed=0, bits=8):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, pixels(seed, bits))


def write_corrupt(path, seed=0):
  del seed
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0' + b'\x00' * 50)  # A JPEG that ends inside its header.


def write_dicom(path, seed=0):
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.MediaStorageSOPClassUID = uids.DigitalXRayImageStorageForPresentation
  ds.file_meta.MediaStorageSOPInstanceUID = uids.generate_uid()
  ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
  ds.SOPClassUID, ds.SOPInstanceUID = (ds.file_meta.MediaStorageSOPClassUID,
                                       ds.file_meta.MediaStorageSOPInstanceUID)
  ds.Rows, ds.Columns = SHAPE
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME1'
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
  ds.PixelData = pixels(seed, 12).tobytes()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def write_csv(path, header, rows, compress=False):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with (gzip.open if compress else open)(path, 'wt', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def build(name, data_dir, manual_dir, on_error='raise', **kwargs):
  return build_lib.build(name, str(data_dir), str(manual_dir), on_error=on_error, **kwargs)


def read_split(builder, split):
  source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def by_id(records):
  return {text(r['image_id']): r for r in records}


def text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def decode(encoded) -> np.ndarray:
  return cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)


def reopened(builder):
  """The same dataset as a later reader sees it: metadata from disk."""
  return tfds.builder(f'{builder.name}/{builder.builder_config.name}',
                      data_dir=os.path.dirname(os.path.dirname(os.path.dirname(
                          builder.data_dir))))


def assert_patient_disjoint(builder):
  owners = {}
  for split in builder.info.splits:
    for record in read_split(builder, split):
      owners.setdefault(text(record['patient_id']), set()).add(split)
  crossing = {p: s for p, s in owners.items() if len(s) > 1}
  assert not crossing, crossing


def codes(values: dict, findings) -> list:
  return [labels_lib.parse_code(values.get(f, ''), source='test') for f in findings]


# --- CheXpert --------------------------------------------------------------------------

CHEXPERT_HEADER = ['Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA', *labels_lib.CHEXPERT_FINDINGS]
CHEXPERT_TRAIN = [
    ('patient00001/study1/view1_frontal.jpg', 'Female', '68', 'Frontal', 'AP',
     {'No Finding': '1.0'}),
    ('patient00001/study1/view2_lateral.jpg', 'Female', '68', 'Lateral', '',
     {'Cardiomegaly': '-1.0', 'Edema': '0.0'}),
    ('patient00002/study1/view1_frontal.jpg', 'Male', '87', 'Frontal', 'PA',
     {'Pleural Effusion': '1.0', 'Support Devices': '1.0', 'Lung Opacity': '-1.0'}),
    ('patient00002/study2/view1_frontal.jpg', 'Male', '87', 'Frontal', 'AP', {}),
    ('patient00003/study1/view1_frontal.jpg', 'Unknown', '', 'Frontal', '', {'Fracture': '0.0'}),
]
CHEXPERT_VALID = [
    ('patient64541/study1/view1_frontal.jpg', 'Male', '73', 'Frontal', 'AP',
     {f: '0.0' for f in labels_lib.CHEXPERT_FINDINGS} | {'Cardiomegaly': '1.0'}),
]


def make_chexpert(parent, folder='CheXpert-v1.0-small', bad_rows=(), drop_column=None,
                  release='CheXpert-v1.0-small'):
  """CheXpert's layout under parent/folder; CSV paths start with `release` as released."""
  root = os.path.join(str(parent), folder)
  for split, csv_name, rows in (('train', 'train.csv', CHEXPERT_TRAIN + list(bad_rows)),
                                ('valid', 'valid.csv', CHEXPERT_VALID)):
    table = []
    for i, (path, sex, age, frontal, ap_pa, values) in enumerate(rows):
      image = os.path.join(root, split, path)
      if not values.get('_missing'):
        (write_corrupt if values.get('_corrupt') else write_jpeg)(image, seed=i)
      cells = {'Path': f'{release}/{split}/{path}', 'Sex': sex, 'Age': age,
               'Frontal/Lateral': frontal, 'AP/PA': ap_pa, **values}
      table.append([cells.get(c, '') for c in CHEXPERT_HEADER if c != drop_column])
    write_csv(os.path.join(root, csv_name), [c for c in CHEXPERT_HEADER if c != drop_column],
              table)
  return root


@pytest.fixture(scope='module')
def chexpert(tmp_path_factory):
  """A built CheXpert-small, shared by the tests that only read it."""
  tmp = tmp_path_factory.mktemp('chexpert')
  return build('cxr_chexpert/small', tmp / 'tfds', make_chexpert(tmp))


def test_chexpert_labels_metadata_and_splits(chexpert):
  assert chexpert.info.file_format.value == 'array_record'
  assert list(chexpert.info.metadata['findings']) == list(labels_lib.CHEXPERT_FINDINGS)
  train, valid = by_id(read_split(chexpert, 'train')), by_id(read_split(chexpert, 'validation'))
  assert len(train) == len(CHEXPERT_TRAIN) and len(valid) == len(CHEXPERT_VALID)
  for rows, records, split in ((CHEXPERT_TRAIN, train, 'train'), (CHEXPERT_VALID, valid, 'valid')):
    for path, sex, age, _, _, values in rows:
      record = records[f'CheXpert-v1.0-small/{split}/{path}']
      np.testing.assert_array_equal(record['labels'],
                                    codes(values, labels_lib.CHEXPERT_FINDINGS))
      assert text(record['sex']) == {'Female': 'F', 'Male': 'M'}.get(sex, 'U')
      assert record['age'] == (int(age) if age else -1)
      image = decode(record['image'])
      assert image.dtype == np.uint8 and image.shape == SHAPE
  first = train['CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg']
  assert text(first['patient_id']) == 'patient00001'
  assert text(first['study_id']) == 'patient00001/study1'
  views = [text(train[f'CheXpert-v1.0-small/train/{row[0]}']['view']) for row in CHEXPERT_TRAIN]
  assert views == ['AP', 'LATERAL', 'PA', 'AP', 'FRONTAL']
  # The codes the label policy sees: 1, 0, -1 and blank all survive the round trip.
  all_codes = np.stack([r['labels'] for r in train.values()])
  assert set(np.unique(all_codes)) == {1, 0, -1, UNMENTIONED}
  assert chexpert.info.metadata['skipped'] == {'train': [], 'validation': []}
  assert_patient_disjoint(chexpert)


def test_chexpert_paths_resolve_in_a_renamed_folder(tmp_path):
  # The user unpacked into 'chexpert/' while the CSV says 'CheXpert-v1.0-small/...'.
  builder = build('cxr_chexpert/small', tmp_path / 'tfds', make_chexpert(tmp_path, 'chexpert'))
  assert builder.info.splits['train'].num_examples == len(CHEXPERT_TRAIN)


def test_chexpert_wrong_release_is_an_error(tmp_path):
  with pytest.raises(ValueError, match="build cxr_chexpert/small instead of cxr_chexpert/full"):
    build('cxr_chexpert/full', tmp_path / 'tfds', make_chexpert(tmp_path))


def test_chexpert_other_resolution_is_its_own_config(tmp_path):
  builder = build('cxr_chexpert/small', tmp_path / 'tfds', make_chexpert(tmp_path), max_side=16)
  assert builder.builder_config.name == 'small_16'
  image = decode(read_split(builder, 'train')[0]['image'])
  assert max(image.shape) == 16
  assert reopened(builder).info.metadata['max_side'] == 16


def test_chexpert_raw_config_stores_the_png_images_resized(tmp_path):
  manual = make_chexpert(tmp_path)
  png = build('cxr_chexpert/small', tmp_path / 'tfds', manual)
  raw = build('cxr_chexpert/small', tmp_path / 'tfds', manual, raw_size=24)
  assert raw.builder_config.name == 'small_raw24'
  assert reopened(raw).info.metadata['raw_size'] == 24
  assert reopened(png).info.metadata['raw_size'] == 0
  from_png = transforms.Preprocess('decode|resize(24)')
  png_records, raw_records = by_id(read_split(png, 'train')), by_id(read_split(raw, 'train'))
  assert png_records.keys() == raw_records.keys()
  for key, record in raw_records.items():
    stored = transforms.Preprocess('decode')(record, None)['image']
    assert stored.dtype == np.uint8 and stored.shape == (24, 24, 1)
    np.testing.assert_array_equal(stored, from_png(png_records[key], None)['image'])
  # The name alone says the stored form, as the other resolutions' names do.
  again = build('cxr_chexpert/small_raw24', tmp_path / 'tfds', manual)
  assert again.builder_config.raw_size == 24 and again.is_prepared()


def test_raw_size_conflicts_are_errors(tmp_path):
  manual = make_chexpert(tmp_path)
  with pytest.raises(ValueError, match='stores 24-pixel raw arrays, but --raw_size is 32'):
    build('cxr_chexpert/small_raw24', tmp_path / 'tfds', manual, raw_size=32)
  with pytest.raises(ValueError, match='--raw_size must be a positive side'):
    build('cxr_chexpert/small', tmp_path / 'tfds', manual, raw_size=-4)


BAD_CHEXPERT_ROWS = {
    'missing file': ('patient00004/study1/view1_frontal.jpg', 'Male', '50', 'Frontal', 'PA',
                     {'_missing': True}),
    'label value': ('patient00005/study1/view1_frontal.jpg', 'Male', '50', 'Frontal', 'PA',
                    {'Edema': 'yes'}),
    'corrupt': ('patient00006/study1/view1_frontal.jpg', 'Male', '50', 'Frontal', 'PA',
                {'_corrupt': True}),
}
BAD_REASONS = {'missing file': 'file not found', 'label value': "label value 'yes'",
               'corrupt': 'truncated or corrupt jpeg'}


@pytest.mark.parametrize('problem', sorted(BAD_CHEXPERT_ROWS))
def test_bad_record_raises_naming_file_and_reason(tmp_path, problem):
  row = BAD_CHEXPERT_ROWS[problem]
  manual = make_chexpert(tmp_path, bad_rows=[row])
  with pytest.raises(base.RecordError) as error:
    build('cxr_chexpert/small', tmp_path / 'tfds', manual)
  message = str(error.value)
  assert row[0] in message and BAD_REASONS[problem] in message.lower(), message
  assert 'on_error=skip' in message


def test_bad_records_skipped_and_listed(tmp_path):
  rows = [BAD_CHEXPERT_ROWS[p] for p in sorted(BAD_CHEXPERT_ROWS)]
  builder = build('cxr_chexpert/small', tmp_path / 'tfds', make_chexpert(tmp_path, bad_rows=rows),
                  on_error='skip')
  assert builder.info.splits['train'].num_examples == len(CHEXPERT_TRAIN)
  skipped = reopened(builder).info.metadata['skipped']
  assert skipped['validation'] == []
  assert len(skipped['train']) == 3
  for problem, item in zip(sorted(BAD_CHEXPERT_ROWS), skipped['train']):
    assert BAD_CHEXPERT_ROWS[problem][0] in item['reason']
    assert BAD_REASONS[problem] in item['reason'].lower()
  summary = build_lib.summary(builder, str(tmp_path / 'tfds'))
  assert 'train: 5 examples, 3 skipped' in summary


def test_interrupted_build_reruns_cleanly(tmp_path):
  bad = BAD_CHEXPERT_ROWS['corrupt']
  manual = make_chexpert(tmp_path, bad_rows=[bad])
  with pytest.raises(base.RecordError):
    build('cxr_chexpert/small', tmp_path / 'tfds', manual)
  version_dir = tmp_path / 'tfds' / 'cxr_chexpert' / 'small'
  assert not (version_dir / '1.0.0').exists()  # Nothing half-written is left to read.
  write_jpeg(os.path.join(manual, 'train', bad[0]), seed=99)  # The user fixes the file.
  builder = build('cxr_chexpert/small', tmp_path / 'tfds', manual)
  assert builder.info.splits['train'].num_examples == len(CHEXPERT_TRAIN) + 1
  assert sorted(os.listdir(version_dir)) == ['1.0.0']


def test_csv_missing_column_names_csv_and_column(tmp_path):
  manual = make_chexpert(tmp_path, drop_column='Pleural Effusion')
  with pytest.raises(ValueError) as error:
    build('cxr_chexpert/small', tmp_path / 'tfds', manual)
  assert os.path.join(manual, 'train.csv') in str(error.value)
  assert "'Pleural Effusion'" in str(error.value)


# --- NIH ChestX-ray14 --------------------------------------------------------------------

# The 2017 file's header, whose bracketed column names contain commas (and a trailing one).
NIH_HEADER = ('Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,'
              'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],')


def nih_patients():
  """Patient ids whose hash sends them to train (2) and validation (1), plus a test one."""
  train, validation = [], []
  for pid in range(1, 500):
    split = labels_lib.patient_split(str(pid), {'train': 0.9, 'validation': 0.1},
                                     salt='nih_cxr14')
    (train if split == 'train' else validation).append(pid)
  return train[0], train[1], validation[0], 30805


def nih_rows():
  a, b, val, test = nih_patients()
  return [  # (image, labels, follow-up, patient, age, sex, view, official list)
      (f'{a:08d}_000.png', 'Cardiomegaly|Effusion', 0, a, '58', 'M', 'PA', 'train_val'),
      (f'{a:08d}_001.png', 'No Finding', 1, a, '58', 'M', 'AP', 'train_val'),
      (f'{b:08d}_000.png', 'Hernia', 0, b, '045Y', 'F', 'PA', 'train_val'),
      (f'{val:08d}_000.png', 'Infiltration|Mass', 0, val, '33', 'F', 'PA', 'train_val'),
      (f'{test:08d}_000.png', 'Pneumothorax', 0, test, '70', 'M', 'AP', 'test'),
      (f'{test:08d}_001.png', 'No Finding', 1, test, '70', 'M', 'AP', 'test'),
  ]


def make_nih(root, rows=None, google=False, extra_rows=()):
  root = str(root)
  rows = list(rows or nih_rows()) + list(extra_rows)
  lines = [NIH_HEADER]
  for i, (image, found, follow_up, patient, age, sex, view, _) in enumerate(rows):
    folder = 'images_001' if i % 2 == 0 else 'images_002'  # The Kaggle layout.
    if found != '_missing':
      write_png(os.path.join(root, folder, 'images', image), seed=i)
    found = 'No Finding' if found == '_missing' else found
    lines.append(f'{image},{found},{follow_up},{patient},{age},{sex},{view},2500,2048,0.143,0.143')
  with open(os.path.join(root, 'Data_Entry_2017.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  for group, name in (('train_val', 'train_val_list.txt'), ('test', 'test_list.txt')):
    with open(os.path.join(root, name), 'w') as f:
      f.write(''.join(f'{r[0]}\n' for r in rows if r[7] == group))
  if google:
    header = ['Image Index', 'Patient ID', 'Fracture', 'Pneumothorax', 'Airspace opacity',
              'Nodule or mass']
    validation = [r for r in rows if r[7] == 'train_val'][:2]
    test = [r for r in rows if r[7] == 'test']
    write_csv(os.path.join(root, 'google', 'four_findings_expert_labels_validation_labels.csv'),
              header, [[validation[0][0], validation[0][3], 'NO', 'NO', 'YES', 'NO'],
                       [validation[1][0], validation[1][3], 'NO', 'NO', 'NO', 'NO']])
    write_csv(os.path.join(root, 'google', 'four_findings_expert_labels_test_labels.csv'),
              header, [[test[0][0], test[0][3], 'NO', 'YES', 'NO', 'NO'],
                       [test[1][0], test[1][3], 'YES', 'NO', 'NO', 'YES']])
  return root


def test_nih_binary_labels_metadata_and_patient_splits(tmp_path):
  builder = build('nih_cxr14', tmp_path / 'tfds', make_nih(tmp_path / 'nih'))
  a, b, val, test = nih_patients()
  splits = {s: by_id(read_split(builder, s)) for s in ('train', 'validation', 'test')}
  assert {text(r['patient_id']) for r in splits['train'].values()} == {str(a), str(b)}
  assert {text(r['patient_id']) for r in splits['validation'].values()} == {str(val)}
  assert {text(r['patient_id']) for r in splits['test'].values()} == {str(test)}
  records = {**splits['train'], **splits['validation'], **splits['test']}
  for image, found, follow_up, patient, age, sex, view, _ in nih_rows():
    record = records[image]
    expected = [int(f in found.split('|')) for f in labels_lib.NIH_FINDINGS]  # Absent is 0.
    np.testing.assert_array_equal(record['labels'], expected)
    assert record['age'] == int(age.rstrip('Y'))
    assert (text(record['sex']), text(record['view'])) == (sex, view)
    assert text(record['study_id']) == f'{patient}/{follow_up}'
    assert decode(record['image']).shape == SHAPE
  assert list(builder.info.metadata['findings']) == list(labels_lib.NIH_FINDINGS)
  assert_patient_disjoint(builder)


def test_nih_bad_records(tmp_path):
  a = nih_patients()[0]
  extra = [(f'{a:08d}_002.png', 'Cardiomegaly|Pneumonitis', 2, a, '58', 'M', 'PA', 'train_val'),
           (f'{a:08d}_003.png', '_missing', 3, a, '58', 'M', 'PA', 'train_val'),
           (f'{a:08d}_004.png', 'No Finding', 4, a, '58', 'M', 'PA', 'unlisted')]
  manual = make_nih(tmp_path / 'nih', extra_rows=extra)
  with pytest.raises(base.RecordError, match="Pneumonitis"):
    build('nih_cxr14', tmp_path / 'tfds', manual)
  builder = build('nih_cxr14', tmp_path / 'tfds', manual, on_error='skip')
  skipped = reopened(builder).info.metadata['skipped']
  reasons = [item['reason'] for item in skipped['train']]
  assert len(reasons) == 3 and not skipped.get('validation') and not skipped.get('test')
  assert 'Data_Entry_2017.csv line 8' in reasons[0]
  assert "unknown finding(s) ['Pneumonitis']" in reasons[0]
  assert f'{a:08d}_003.png: file not found' in reasons[1]
  assert reasons[2].endswith(f'line 10 ({a:08d}_004.png): listed in neither '
                             'train_val_list.txt nor test_list.txt, so it has no split.')


def test_nih_google_expert_labels(tmp_path):
  builder = build('nih_cxr14/google_expert', tmp_path / 'tfds', make_nih(tmp_path, google=True))
  assert list(builder.info.metadata['findings']) == ['Fracture', 'Pneumothorax',
                                                     'Airspace opacity', 'Nodule or mass']
  assert set(builder.info.splits) == {'validation', 'test'}
  test = by_id(read_split(builder, 'test'))
  test_patient = nih_patients()[3]
  np.testing.assert_array_equal(test[f'{test_patient:08d}_000.png']['labels'], [0, 1, 0, 0])
  np.testing.assert_array_equal(test[f'{test_patient:08d}_001.png']['labels'], [1, 0, 0, 1])
  assert test[f'{test_patient:08d}_000.png']['age'] == 70  # Joined from Data_Entry.
  validation = read_split(builder, 'validation')
  assert sorted(r['labels'].tolist() for r in validation) == [[0, 0, 0, 0], [0, 0, 1, 0]]


def test_nih_missing_column(tmp_path):
  manual = make_nih(tmp_path)
  with open(os.path.join(manual, 'Data_Entry_2017.csv')) as f:
    content = f.read().replace('Patient Gender', 'Sex')
  with open(os.path.join(manual, 'Data_Entry_2017.csv'), 'w') as f:
    f.write(content)
  with pytest.raises(ValueError,
                     match=r"Data_Entry_2017.csv: missing column\(s\) \['Patient Gender'\]"):
    build('nih_cxr14', tmp_path / 'tfds', manual)


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------

MIMIC_LABEL_COLUMNS = ['subject_id', 'study_id', *sorted(labels_lib.CHEXPERT_FINDINGS)]
MIMIC_METADATA_HEADER = ['dicom_id', 'subject_id', 'study_id', 'PerformedProcedureStepDescription',
                         'ViewPosition', 'Rows', 'Columns', 'StudyDate', 'StudyTime',
                         'ProcedureCodeSequence_CodeMeaning', 'ViewCodeSequence_CodeMeaning',
                         'PatientOrientationCodeSequence_CodeMeaning']
MIMIC_IMAGES = [  # (dicom_id, subject, study, view, split)
    ('02aa804e-bde0afdd-112c0b34-7bc16630-4e384014', '10000032', '50414267', 'PA', 'train'),
    ('174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962', '10000032', '50414267', 'LATERAL', 'train'),
    ('2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab', '10000032', '53189527', 'AP', 'train'),
    ('68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714', '10000764', '57375967', 'AP', 'validate'),
    ('096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4', '19999987', '55368167', 'LL', 'test'),
]
MIMIC_CHEXPERT = {
    '50414267': {'No Finding': '1.0'},
    '53189527': {'Pleural Effusion': '-1.0', 'Cardiomegaly': '1.0', 'Edema': '0.0'},
    '57375967': {'Pneumonia': '1.0', 'Lung Opacity': '-1.0'},
    # 55368167 has no row: its findings are all unmentioned.
}
MIMIC_NEGBIO = {'50414267': {'No Finding': '1.0'}, '53189527': {'Cardiomegaly': '0.0'},
                '57375967': {'Pneumonia': '-1.0'}}
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def make_mimic(root, chexpert_values=None, corrupt=()):
  root = str(root)
  subject_of = {study: subject for _, subject, study, _, _ in MIMIC_IMAGES}

  def label_rows(values):
    return [[subject_of[study], study] + [cells.get(f, '') for f in MIMIC_LABEL_COLUMNS[2:]]
            for study, cells in values.items()]

  write_csv(os.path.join(root, 'mimic-cxr-2.0.0-chexpert.csv.gz'), MIMIC_LABEL_COLUMNS,
            label_rows(chexpert_values or MIMIC_CHEXPERT), compress=True)
  write_csv(os.path.join(root, 'mimic-cxr-2.0.0-negbio.csv'), MIMIC_LABEL_COLUMNS,
            label_rows(MIMIC_NEGBIO))
  write_csv(os.path.join(root, 'mimic-cxr-2.0.0-metadata.csv'), MIMIC_METADATA_HEADER,
            [[d, s, st, 'CHEST (PA AND LAT)', v, 40, 32, 21800506, 213014.531, 'CHEST',
              'postero-anterior', 'Erect'] for d, s, st, v, _ in MIMIC_IMAGES])
  write_csv(os.path.join(root, 'mimic-cxr-2.0.0-split.csv.gz'),
            ['dicom_id', 'study_id', 'subject_id', 'split'],
            [[d, st, s, split] for d, s, st, _, split in MIMIC_IMAGES], compress=True)
  write_csv(os.path.join(root, 'patients.csv'), ['subject_id', 'gender', 'anchor_age',
                                                 'anchor_year', 'anchor_year_group', 'dod'],
            [['10000032', 'F', '52', '2180', '2014 - 2016', '2180-09-09'],
             ['10000764', 'M', '86', '2132', '2014 - 2016', '']])
  for i, (dicom, subject, study, _, _) in enumerate(MIMIC_IMAGES):
    path = os.path.join(root, 'files', f'p{subject[:2]}', f'p{subject}', f's{study}',
                        f'{dicom}.jpg')
    (write_corrupt if dicom in corrupt else write_jpeg)(path, seed=i)
  report = os.path.join(root, 'files', 'p10', 'p10000032', 's50414267.txt')
  with open(report, 'w') as f:
    f.write(MIMIC_REPORT)
  return root


def test_mimic_labels_reports_and_official_splits(tmp_path):
  builder = build('mimic_cxr/chexpert', tmp_path / 'tfds', make_mimic(tmp_path / 'mimic'))
  records = {}
  for split, official in (('train', 'train'), ('validation', 'validate'), ('test', 'test')):
    got = by_id(read_split(builder, split))
    assert set(got) == {i[0] for i in MIMIC_IMAGES if i[4] == official}
    records.update(got)
  views = {'PA': 'PA', 'LATERAL': 'LATERAL', 'AP': 'AP', 'LL': 'LATERAL'}
  for dicom, subject, study, view, _ in MIMIC_IMAGES:
    record = records[dicom]
    np.testing.assert_array_equal(
        record['labels'], codes(MIMIC_CHEXPERT.get(study, {}), labels_lib.CHEXPERT_FINDINGS))
    assert (text(record['patient_id']), text(record['study_id'])) == (subject, study)
    assert text(record['view']) == views[view]
  first = records[MIMIC_IMAGES[0][0]]
  assert (text(first['sex']), first['age']) == ('F', 52)
  assert (text(records[MIMIC_IMAGES[4][0]]['sex']), records[MIMIC_IMAGES[4][0]]['age']) == ('U', -1)
  report = text(first['report'])
  assert report == ('FINDINGS: There is no focal consolidation, pleural effusion or '
                    'pneumothorax. Bilateral nodular opacities that most likely represent '
                    'nipple shadows.\nIMPRESSION: No acute cardiopulmonary process.')
  assert text(records[MIMIC_IMAGES[1][0]]['report']) == report  # Same study, same report.
  assert text(records[MIMIC_IMAGES[2][0]]['report']) == ''  # No report file.
  assert np.all(records[MIMIC_IMAGES[4][0]]['labels'] == UNMENTIONED)
  assert_patient_disjoint(builder)


def test_mimic_negbio_config_reads_its_own_labels(tmp_path):
  builder = build('mimic_cxr/negbio', tmp_path / 'tfds', make_mimic(tmp_path / 'mimic'))
  records = by_id(read_split(builder, 'train'))
  np.testing.assert_array_equal(records[MIMIC_IMAGES[2][0]]['labels'],
                                codes(MIMIC_NEGBIO['53189527'], labels_lib.CHEXPERT_FINDINGS))


def test_mimic_mined_config_labels_the_reports(tmp_path):
  from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top
  manual = make_mimic(tmp_path / 'mimic')

  def write_report(subject, study, report):
    with open(os.path.join(manual, 'files', f'p{subject[:2]}', f'p{subject}',
                           f's{study}.txt'), 'w') as f:
      f.write(report)

  write_report('10000764', '57375967', 'IMPRESSION: Right lower lobe pneumonia.')
  write_report('19999987', '55368167', 'IMPRESSION: No acute process.')
  # A study without a report is a bad record, named.
  with pytest.raises(base.RecordError, match=r'no report for study 53189527'):
    build('mimic_cxr/mined', tmp_path / 'tfds0', manual)
  write_report('10000032', '53189527',
               'FINDINGS: Moderate cardiomegaly. Small left effusion.\nIMPRESSION: CHF.')
  builder = build('mimic_cxr/mined', tmp_path / 'tfds', manual)
  findings = list(builder.info.metadata['findings'])
  assert findings == list(labels_lib.CHEXPERT_FINDINGS) + ['Abnormal']
  assert builder.info.metadata['labels']['labeler'] == labeler.LABELER_VERSION
  records = by_id(read_split(builder, 'train'))
  assert set(records) == {i[0] for i in MIMIC_IMAGES[:3]}
  normal = dict(zip(findings, records[MIMIC_IMAGES[0][0]]['labels'].tolist()))
  assert normal['No Finding'] == 1 and normal['Abnormal'] == 0  # Nipple shadows: normal.
  assert normal['Pleural Effusion'] == normal['Pneumothorax'] == normal['Consolidation'] == 0
  sick = dict(zip(findings, records[MIMIC_IMAGES[2][0]]['labels'].tolist()))
  assert (sick['Cardiomegaly'], sick['Pleural Effusion'], sick['Edema'], sick['Abnormal']) == (
      1, 1, 1, 1)


def test_mimic_bad_label_and_corrupt_image_skipped(tmp_path):
  values = dict(MIMIC_CHEXPERT, **{'53189527': {'Edema': '2.0'}})
  manual = make_mimic(tmp_path / 'mimic', values, corrupt={MIMIC_IMAGES[1][0]})
  builder = build('mimic_cxr', tmp_path / 'tfds', manual, on_error='skip')
  skipped = reopened(builder).info.metadata['skipped']
  assert builder.info.splits['train'].num_examples == 1
  assert [len(skipped[s]) for s in ('train', 'validation', 'test')] == [2, 0, 0]
  corrupt, bad_label = skipped['train']
  assert MIMIC_IMAGES[1][0] in corrupt['source'] and 'corrupt jpeg' in corrupt['reason'].lower()
  assert bad_label['reason'].startswith(MIMIC_IMAGES[2][0])
  assert "line 3 (study 53189527), column 'Edema'" in bad_label['reason']
  assert 'mimic-cxr-2.0.0-chexpert.csv.gz' in bad_label['reason']


def test_mimic_missing_column(tmp_path):
  manual = make_mimic(tmp_path / 'mimic')
  metadata = os.path.join(manual, 'mimic-cxr-2.0.0-metadata.csv')
  write_csv(metadata, ['dicom_id', 'subject_id', 'study_id'], [])
  with pytest.raises(ValueError, match=r"metadata.csv: missing column\(s\) \['ViewPosition'\]"):
    build('mimic_cxr', tmp_path / 'tfds', manual)


def test_split_with_every_record_skipped_is_an_error(tmp_path):
  manual = make_mimic(tmp_path / 'mimic', corrupt={MIMIC_IMAGES[3][0]})  # Validation's only.
  with pytest.raises(base.RecordError, match='mimic_cxr/validation: all 1 records were skipped'):
    build('mimic_cxr', tmp_path / 'tfds', manual, on_error='skip')


# --- manifests -------------------------------------------------------------------------

MANIFEST_ROWS = [  # file, mrn, accession, gender, age, projection, split, ptx, effusion, notes
    ('png/a1.png', 'MRN1', 'ACC1', 'female', '61', 'PA', 'train', 'yes', 'no', 'Small left PTX.'),
    ('jpg/a2.jpg', 'MRN1', 'ACC2', 'female', '61', 'LL', 'train', 'no', '', ''),
    ('dcm/b1.dcm', 'MRN2', 'ACC3', 'male', '45.5', 'AP', 'val', 'maybe', '1', 'Effusion.'),
    ('png/c1.png', 'MRN3', 'ACC4', '', '', '', 'test', '0', 'no', ''),
]
MANIFEST_HEADER = ['file', 'mrn', 'accession', 'gender', 'age_years', 'projection', 'split',
                   'pneumothorax', 'effusion', 'notes']
MANIFEST_SPEC = {
    'name': 'hospital_a', 'csv': 'labels.csv', 'image_column': 'file', 'image_root': 'images',
    'labels': ['pneumothorax', 'effusion'], 'label_values': {'yes': 1, 'no': 0, 'maybe': -1},
    'columns': {'patient_id': 'mrn', 'study_id': 'accession', 'sex': 'gender',
                'age': 'age_years', 'view': 'projection', 'report': 'notes'},
    'split_column': 'split',
}


def make_manifest(root, spec=None, rows=MANIFEST_ROWS):
  root = str(root)
  for i, row in enumerate(rows):
    path = os.path.join(root, 'images', row[0])
    if path.endswith('.png'):
      write_png(path, seed=i, bits=16)
    elif path.endswith('.jpg'):
      write_jpeg(path, seed=i)
    elif path.endswith('.dcm'):
      write_dicom(path, seed=i)
  write_csv(os.path.join(root, 'labels.csv'), MANIFEST_HEADER, rows)
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(spec or MANIFEST_SPEC, f)
  return root


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('manifest')
  return build('cxr_manifest', tmp / 'tfds', make_manifest(tmp / 'hospital_a'))


def test_manifest_labels_metadata_and_mixed_formats(manifest):
  assert manifest.builder_config.name == 'hospital_a'
  assert list(manifest.info.metadata['findings']) == ['pneumothorax', 'effusion']
  assert manifest.info.metadata['manifest']['image_column'] == 'file'
  assert set(manifest.info.splits) == {'train', 'validation', 'test'}
  records = {}
  for split in manifest.info.splits:
    records.update(by_id(read_split(manifest, split)))
  expected_codes = {'png/a1.png': [1, 0], 'jpg/a2.jpg': [0, UNMENTIONED], 'dcm/b1.dcm': [-1, 1],
                    'png/c1.png': [0, 0]}
  for path, want in expected_codes.items():
    np.testing.assert_array_equal(records[path]['labels'], want)
    image = decode(records[path]['image'])
    assert image.dtype == np.uint16 and image.shape == SHAPE  # Every format stored 16-bit.
  np.testing.assert_array_equal(decode(records['png/a1.png']['image']), pixels(0, 16))
  np.testing.assert_array_equal(decode(records['jpg/a2.jpg']['image']) // 257,
                                np.asarray(Image.open(os.path.join(
                                    manifest.builder_config.root, 'images', 'jpg', 'a2.jpg'))))
  b1 = records['dcm/b1.dcm']
  assert (text(b1['patient_id']), text(b1['study_id']), text(b1['sex']), b1['age'],
          text(b1['view']), text(b1['report']), text(b1['site'])) == (
              'MRN2', 'ACC3', 'M', 45, 'AP', 'Effusion.', 'hospital_a')
  assert text(records['jpg/a2.jpg']['view']) == 'LATERAL'
  assert (text(records['png/c1.png']['sex']), records['png/c1.png']['age']) == ('U', -1)


def _mining_spec(**changes):
  spec = {k: v for k, v in MANIFEST_SPEC.items() if k not in ('labels', 'label_values')}
  return dict(spec, **changes)


MINED_ROWS = [  # The label columns are there but not named: the reports are read.
    ('png/a1.png', 'MRN1', 'ACC1', 'F', '61', 'PA', 'train', '', '',
     'INDICATION: Rule out pneumonia.\nFINDINGS: Small left PTX. No effusion.'),
    ('png/a2.png', 'MRN2', 'ACC2', 'F', '61', 'PA', 'train', '', '',
     'IMPRESSION: Normal chest. Degenerative changes of the spine.'),
    ('png/a3.png', 'MRN3', 'ACC3', 'M', '50', 'PA', 'test', '', '',
     'IMPRESSION: No acute cardiopulmonary process.'),
]


def test_manifest_mines_labels_from_reports(tmp_path):
  from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top
  builder = build('cxr_manifest', tmp_path / 'tfds',
                  make_manifest(tmp_path / 'h', _mining_spec(), MINED_ROWS))
  findings = list(builder.info.metadata['findings'])
  assert findings == list(labeler.OBSERVATIONS) + ['Abnormal']
  assert builder.info.metadata['labels'] == {
      'source': 'mined', 'labeler': labeler.LABELER_VERSION, 'report_column': 'notes',
      'devices_abnormal': False}
  records = by_id(read_split(builder, 'train'))
  records.update(by_id(read_split(builder, 'test')))
  code = {path: dict(zip(findings, r['labels'].tolist())) for path, r in records.items()}
  assert code['png/a1.png']['Pneumothorax'] == 1 and code['png/a1.png']['Pneumonia'] == UNMENTIONED
  assert code['png/a1.png']['Pleural Effusion'] == 0 and code['png/a1.png']['Abnormal'] == 1
  # Outside the 14: only "Abnormal" says so; derive_abnormal reads it.
  assert code['png/a2.png']['Abnormal'] == 1 and code['png/a2.png']['No Finding'] == UNMENTIONED
  assert code['png/a3.png']['Abnormal'] == 0 and code['png/a3.png']['No Finding'] == 1
  abnormal = labels_lib.derive_abnormal(
      np.stack([records[p]['labels'] for p in ('png/a1.png', 'png/a2.png', 'png/a3.png')]),
      findings)
  assert abnormal.tolist() == [1, 1, 0]


def test_manifest_mining_problems(tmp_path):
  rows = [MINED_ROWS[0], MINED_ROWS[1][:9] + ('  ',), MINED_ROWS[2]]
  with pytest.raises(ValueError, match=r"labels.csv line 3 \(png/a2.png\), column 'notes': "
                                       'empty report'):
    build('cxr_manifest', tmp_path / 'tfds', make_manifest(tmp_path / 'h', _mining_spec(), rows))
  skipped = build('cxr_manifest', tmp_path / 'tfds2',
                  make_manifest(tmp_path / 'h2', _mining_spec(), rows), on_error='skip')
  assert 'empty report' in str(skipped.info.metadata['skipped'])
  # Asked for with label columns, or with no report column: errors naming the manifest.
  with pytest.raises(ValueError, match='"mine_labels" is true, so labels come from the reports'):
    make_manifest(tmp_path / 'h3', dict(MANIFEST_SPEC, mine_labels=True), MINED_ROWS)
    build('cxr_manifest', tmp_path / 'tfds3', tmp_path / 'h3')
  spec = _mining_spec(mine_labels=True, columns={'patient_id': 'mrn'})
  with pytest.raises(ValueError, match='needs a report column'):
    build('cxr_manifest', tmp_path / 'tfds4', make_manifest(tmp_path / 'h4', spec, MINED_ROWS))
  # Unlabelled without "auto" mining stays unlabelled.
  plain = build('cxr_manifest', tmp_path / 'tfds5', make_manifest(
      tmp_path / 'h5', _mining_spec(mine_labels=False), MINED_ROWS))
  assert list(plain.info.metadata['findings']) == []
  assert plain.info.metadata['labels'] == {'source': 'columns', 'columns': []}


def test_manifest_patient_fraction_split(tmp_path):
  spec = {k: v for k, v in MANIFEST_SPEC.items() if k != 'split_column'}
  spec['split_fractions'] = {'train': 0.5, 'test': 0.5}
  rows = [(f'png/{i}.png', f'MRN{i // 2}', f'ACC{i}', 'F', '50', 'PA', '', '0', '1', '')
          for i in range(12)]
  builder = build('cxr_manifest', tmp_path / 'tfds', make_manifest(tmp_path / 'h', spec, rows))
  for split in builder.info.splits:
    for record in read_split(builder, split):
      patient = text(record['patient_id'])
      assert labels_lib.patient_split(patient, spec['split_fractions'], salt='hospital_a') == split
  assert_patient_disjoint(builder)


def test_manifest_problems(tmp_path):
  spec = dict(MANIFEST_SPEC, colums={})
  root = make_manifest(tmp_path / 'typo', spec)
  with pytest.raises(ValueError, match=r"manifest.json: unknown key\(s\) \['colums'\]"):
    build('cxr_manifest', tmp_path / 'tfds', root)
  root = make_manifest(tmp_path / 'column', dict(MANIFEST_SPEC, labels=['pneumothorax',
                                                                      'nodule']))
  with pytest.raises(ValueError, match=r"labels.csv: missing column\(s\) \['nodule'\]"):
    build('cxr_manifest', tmp_path / 'tfds', root)
  rows = MANIFEST_ROWS[:3] + [('png/c1.png', 'MRN1', 'ACC4', '', '', '', 'test', '0', 'no', '')]
  root = make_manifest(tmp_path / 'leak', rows=rows)
  with pytest.raises(ValueError, match=r'MRN1 in \[.test., .train.\]'):
    build('cxr_manifest', tmp_path / 'tfds', root)
  rows = MANIFEST_ROWS + [('png/a1.png', 'MRN1', 'ACC1', 'F', '61', 'PA', 'train', 'perhaps',
                           'no', '')]
  root = make_manifest(tmp_path / 'bad', rows=rows)
  builder = build('cxr_manifest', tmp_path / 'tfds2', root, on_error='skip')
  reasons = [item['reason'] for item in reopened(builder).info.metadata['skipped']['train']]
  assert reasons and 'line 6' in reasons[0] and 'listed again (first on line 2)' in reasons[0]


# --- reading without TensorFlow ----------------------------------------------------------


def test_reading_built_datasets_does_not_import_tensorflow(chexpert, manifest):
  data_dirs = [str(chexpert.data_dir).split('/cxr_chexpert/')[0],
               str(manifest.data_dir).split('/cxr_manifest/')[0]]
  script = textwrap.dedent(f"""
      import sys
      from cxr_jax.data import pipeline
      for name, data_dir in (('cxr_chexpert/small', {data_dirs[0]!r}),
                             ('cxr_manifest/hospital_a', {data_dirs[1]!r})):
        source, info = pipeline.open_source(name, 'train', data_dir)
        loader = pipeline.make_pipeline(
            source, pp='decode|resize(16)|value_range(0, 1)', batch_size=2, seed=0,
            num_epochs=1, findings_all=pipeline.findings_of(info), process_index=0,
            process_count=1)
        batch = next(iter(loader))
        assert batch['image'].shape == (2, 16, 16, 1), batch['image'].shape
        assert batch['labels'].shape[0] == 2
      assert 'tensorflow' not in sys.modules, 'tensorflow was imported'
      print('ok')
  """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def test_cli_builds_and_reports(tmp_path):
  manual = make_manifest(tmp_path / 'hospital_b', dict(MANIFEST_SPEC, name='hospital_b'))
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  command = [sys.executable, '-m', 'cxr_jax.data.build', 'cxr_manifest',
             f'--data_dir={tmp_path / "tfds"}', f'--manual_dir={manual}', '--max_side=20']
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train: 2 examples, 0 skipped' in result.stdout
  assert "name='cxr_manifest/hospital_b'" in result.stdout
  result = subprocess.run(command[:3] + ['nih_cxr14/nope', f'--data_dir={tmp_path}'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and "nih_cxr14 has no config 'nope'" in result.stderr


# --- hospital files as they come: encodings, free-text metadata -----------------------


def test_manifest_in_cp1252_needs_its_encoding_and_names_the_line(tmp_path):
  rows = [MANIFEST_ROWS[0], MANIFEST_ROWS[1][:9] + ('Pleural effusion – small, “right”.',)]
  root = make_manifest(tmp_path / 'hospital_a', rows=rows)
  csv_path = os.path.join(root, 'labels.csv')
  text_cells = open(csv_path, encoding='utf-8').read()
  with open(csv_path, 'w', encoding='cp1252', newline='') as f:  # As Excel saves it.
    f.write(text_cells)
  with pytest.raises(ValueError, match=r'labels.csv, line 3: cannot be decoded as utf-8.*'
                     r'"encoding": "cp1252"'):
    build('cxr_manifest', tmp_path / 'tfds', root)
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(dict(MANIFEST_SPEC, encoding='cp1252'), f)
  builder = build('cxr_manifest', tmp_path / 'tfds', root)
  records = by_id(read_split(builder, 'train'))
  assert text(records['jpg/a2.jpg']['report']) == 'Pleural effusion – small, “right”.'
  with open(os.path.join(root, 'manifest.json'), 'w') as f:
    json.dump(dict(MANIFEST_SPEC, name='other', encoding='klingon'), f)
  with pytest.raises(ValueError, match=r'"encoding" is .klingon., not an encoding'):
    build('cxr_manifest', tmp_path / 'tfds', root)


AGE_VIEW_ROWS = [  # file, age cell, view cell -> stored age, stored view, listed fields
    ('png/a.png', '50+', 'AP erect', -1, 'UNKNOWN', ['age', 'view']),
    ('png/b.png', 'early 40s', 'pa', -1, 'PA', ['age']),
    ('png/c.png', 'abc', 'LL', -1, 'LATERAL', ['age']),
    ('png/d.png', '0', 'AP', -1, 'AP', ['age']),  # A bare 0 is how exports write "missing".
    ('png/e.png', '000Y', 'Ap', 0, 'AP', []),  # A newborn, deliberately: stored as 0.
    ('png/f.png', '006M', 'AP supine', 0, 'AP', []),  # Mapped by "view_values".
    ('png/g.png', '047Y', '', 47, 'UNKNOWN', []),
    ('png/h.png', '155', 'lateral', -1, 'LATERAL', ['age']),
    ('png/i.png', '', 'oblique', -1, 'UNKNOWN', ['view']),
]


def test_manifest_unparseable_age_and_view_are_listed_not_coerced(tmp_path):
  rows = [(file, f'MRN{i}', f'ACC{i}', 'F', age, view, 'train', '1', '0', '')
          for i, (file, age, view, *_) in enumerate(AGE_VIEW_ROWS)]
  root = make_manifest(tmp_path / 'hospital_a',
                       dict(MANIFEST_SPEC, view_values={'AP supine': 'AP'}), rows)
  builder = build('cxr_manifest', tmp_path / 'tfds', root)
  records = by_id(read_split(builder, 'train'))
  listed = builder.info.metadata['unparsed']['train']
  for line, (file, age, view, want_age, want_view, fields) in enumerate(AGE_VIEW_ROWS, 2):
    assert (records[file]['age'], text(records[file]['view'])) == (want_age, want_view), file
    mine = [item for item in listed if f'({file})' in item['source']]
    assert [item['field'] for item in mine] == fields, (file, mine)
    for item in mine:
      assert item['source'].endswith(f'labels.csv line {line} ({file})')
      assert item['value'] == {'age': age, 'view': view}[item['field']] and item['reason']
  assert len(listed) == 7
  summary = build_lib.summary(builder, str(tmp_path / 'tfds'))
  assert 'train: 7 metadata cells not parsed, stored as unknown' in summary
  assert "age '50+': not a number of years" in summary
  # The metadata survives reopening the prepared dataset.
  assert len(reopened(builder).info.metadata['unparsed']['train']) == 7


def test_chexpert_train_and_valid_must_be_patient_disjoint(tmp_path):
  root = make_chexpert(tmp_path)
  with open(os.path.join(root, 'valid.csv'), 'a', newline='') as f:
    row = {'Path': 'CheXpert-v1.0-small/valid/patient00002/study9/view1_frontal.jpg',
           'Sex': 'Male', 'Age': '87', 'Frontal/Lateral': 'Frontal', 'AP/PA': 'PA'}
    csv.writer(f).writerow([row.get(c, '') for c in CHEXPERT_HEADER])
  write_jpeg(os.path.join(root, 'valid', 'patient00002/study9/view1_frontal.jpg'))
  with pytest.raises(ValueError, match=r'train.csv and .*valid.csv share 1 patients '
                     r'\(e.g. patient00002\); a patient in both splits leaks'):
    build('cxr_chexpert/small', tmp_path / 'tfds', root)


def test_chexpert_age_zero_is_listed_as_unknown(tmp_path):
  rows = [CHEXPERT_TRAIN[0], ('patient00009/study1/view1_frontal.jpg', 'Male', '0', 'Frontal',
                              'AP', {})]
  root = make_chexpert(tmp_path, bad_rows=rows[1:])
  builder = build('cxr_chexpert/small', tmp_path / 'tfds', root)
  records = by_id(read_split(builder, 'train'))
  key = 'CheXpert-v1.0-small/train/patient00009/study1/view1_frontal.jpg'
  assert records[key]['age'] == -1
  assert [item['value'] for item in builder.info.metadata['unparsed']['train']] == ['0']


def test_nih_google_relabels_under_bucket_names_take_metadata_from_v2020(tmp_path):
  """Google's bucket layout, label files carrying 2017 columns (one age 155), and
  Data_Entry_2017_v2020.csv beside them: the table's metadata wins."""
  root = make_nih(tmp_path / 'nih')
  a, b, _, test = nih_patients()
  os.rename(os.path.join(root, 'Data_Entry_2017.csv'),
            os.path.join(root, 'Data_Entry_2017_v2020.csv'))
  header = ['Image Index', 'Follow-up #', 'Patient ID', 'Patient Age', 'Patient Gender',
            'View Position', 'Fracture', 'Pneumothorax', 'Airspace opacity', 'Nodule or mass']
  folder = os.path.join(root, 'four_findings_expert_labels')
  # Stale copies: ages 155 and 12, sex and view swapped.
  write_csv(os.path.join(folder, 'validation_labels.csv'), header,
            [[f'{a:08d}_000.png', 0, a, '155', 'F', 'AP', 'NO', 'NO', 'YES', 'NO'],
             [f'{b:08d}_000.png', 0, b, '12', 'M', 'AP', 'NO', 'NO', 'NO', 'NO']])
  write_csv(os.path.join(folder, 'test_labels.csv'), header,
            [[f'{test:08d}_000.png', 0, test, '155', 'F', 'PA', 'NO', 'YES', 'NO', 'NO']])
  builder = build('nih_cxr14/google_expert', tmp_path / 'tfds', root)
  validation = by_id(read_split(builder, 'validation'))
  first = validation[f'{a:08d}_000.png']
  assert (first['age'], text(first['sex']), text(first['view'])) == (58, 'M', 'PA')
  assert validation[f'{b:08d}_000.png']['age'] == 45  # '045Y' in the table.
  np.testing.assert_array_equal(first['labels'], [0, 0, 1, 0])
  only = by_id(read_split(builder, 'test'))[f'{test:08d}_000.png']
  assert (only['age'], text(only['sex']), text(only['view'])) == (70, 'M', 'AP')
  assert builder.info.metadata['unparsed'] == {'validation': [], 'test': []}
