"""Label codes, uncertainty policies, abnormal derivation, patient-level splits."""

import numpy as np
import pytest

from cxr_jax.data import labels

P, N, U, B = labels.POSITIVE, labels.NEGATIVE, labels.UNCERTAIN, labels.UNMENTIONED


@pytest.mark.parametrize('cell,code', [('1.0', P), ('1', P), ('0.0', N), ('-1.0', U), ('', B),
                                       (None, B), ('nan', B), (' 0 ', N)])
def test_parse_code(cell, code):
  assert labels.parse_code(cell, source='train.csv row 2') == code


def test_parse_code_names_the_cell():
  with pytest.raises(ValueError, match=r"train.csv row 7 column Edema: label value '2' "):
    labels.parse_code('2', source='train.csv row 7 column Edema')


def test_policies_per_finding():
  findings = ('Atelectasis', 'Edema', 'Cardiomegaly')
  codes = np.array([[U, U, U], [P, N, B]], np.int8)
  policy = labels.LabelPolicy(uncertain='ignore',
                              per_finding=(('Atelectasis', 'ones'), ('Edema', 'zeros')))
  out = policy.apply(codes, findings)
  np.testing.assert_array_equal(out['labels'], [[1, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(out['label_mask'], [[1, 1, 0], [1, 1, 1]])
  ignore_blank = labels.LabelPolicy(unmentioned='ignore').apply(codes, findings)
  np.testing.assert_array_equal(ignore_blank['label_mask'], [[0, 0, 0], [1, 1, 0]])


def test_policy_errors_name_the_problem():
  with pytest.raises(ValueError, match="'Edema' is 'twos'"):
    labels.LabelPolicy(per_finding=(('Edema', 'twos'),))
  with pytest.raises(ValueError, match=r"\['Edma'\] that the dataset lacks"):
    labels.LabelPolicy(per_finding=(('Edma', 'ones'),)).apply(np.zeros((1, 1)), ('Edema',))


def test_from_config():
  policy = labels.LabelPolicy.from_config(
      {'uncertain': 'zeros', 'per_finding': {'Edema': 'ones'}, 'unmentioned': 'ignore'})
  assert policy == labels.LabelPolicy('zeros', (('Edema', 'ones'),), 'ignore')


def test_abnormal():
  findings = ('No Finding', 'Cardiomegaly', 'Support Devices', 'Edema')
  codes = np.array([[P, N, P, B], [N, P, N, N], [B, N, N, U], [B, B, B, B]], np.int8)
  np.testing.assert_array_equal(labels.derive_abnormal(codes, findings), [0, 1, 1, 0])


def test_patient_split_is_stable_and_proportional():
  fractions = {'train': 0.7, 'validation': 0.1, 'test': 0.2}
  splits = [labels.patient_split(f'patient{i:05d}', fractions) for i in range(5000)]
  assert splits == [labels.patient_split(f'patient{i:05d}', fractions) for i in range(5000)]
  assert abs(splits.count('train') / 5000 - 0.7) < 0.03
  assert abs(splits.count('test') / 5000 - 0.2) < 0.03
  assert labels.patient_split('patient00001', fractions) == labels.patient_split(
      'patient00001', fractions)
  with pytest.raises(ValueError, match='sum to'):
    labels.patient_split('x', {'train': 0.5})
