"""Synthetic reports: they follow the mined codes, vary their dictation, and
`mine_labels` reads the labels back from them."""

import numpy as np

from cxr_jax.data import synthetic
# As reports_lib: `reports` is a local name in the tests below.
from cxr_jax.data.synthetic import reports as reports_lib
from cxr_jax.data.synthetic import (CXR_FINDINGS, NEGATIVE, POSITIVE, UNCERTAIN,
                                    UNMENTIONED)


def test_reports_follow_the_mined_labels():
  """The report labeler reads the generator's codes back from the varied report text."""
  metas = [synthetic.study_metadata(i, label_noise=0.4) for i in range(400)]
  reports = [meta['report'] for meta in metas]
  codes = np.stack([meta['labels'] for meta in metas])
  mined = synthetic.mine_report_labels(reports)
  # Every code kind of every finding occurs at this noise level, so each is checked.
  for k, name in enumerate(CXR_FINDINGS):
    assert set(codes[:, k].tolist()) == {POSITIVE, NEGATIVE, UNCERTAIN, UNMENTIONED}, name
  agreement = np.mean(mined == codes, axis=0)
  assert np.all(agreement >= 0.99), dict(zip(CXR_FINDINGS, agreement))
  for meta in metas:
    if meta['abnormal'] == NEGATIVE:
      impression = meta['report'].lower().rsplit('impression:', 1)[1]
      assert any(p.lower() in impression for p in reports_lib._NORMAL_IMPRESSIONS), meta['report']


def test_reports_use_varied_dictation():
  text = '\n'.join(synthetic.study_metadata(i, label_noise=0.4)['report'] for i in range(400))
  # Sections, negation, uncertainty, change language, abbreviations, typos, placeholders.
  for construction in ('INDICATION:', 'rule out pneumonia', 'free of', 'has resolved',
                       'without', 'cannot be excluded', 'Cannot exclude', 'may represent',
                       'likely', 'Unchanged', 'No change in', 'Not only', 'PTX',
                       'effusoin', 'pneumothroax', '___', 'XXXX', 'Findings:', '\n\n',
                       '1. '):
    assert construction in text, construction


def test_mine_labels_option(monkeypatch):
  plain = synthetic.study_metadata(7, label_noise=0.3)
  mined = synthetic.study_metadata(7, label_noise=0.3, mine_labels=True)
  assert mined['report'] == plain['report']
  np.testing.assert_array_equal(mined['true_labels'], plain['true_labels'])
  np.testing.assert_array_equal(mined['labels'],
                                synthetic.mine_report_labels([plain['report']])[0])
  # The labels come from the labeler's reading of this report, whatever it says.
  seen = []
  fake = np.array([[UNCERTAIN] * len(CXR_FINDINGS)], np.int8)
  monkeypatch.setattr(reports_lib, 'mine_report_labels', lambda r: seen.extend(r) or fake)
  forced = synthetic.study_metadata(7, label_noise=0.3, mine_labels=True)
  assert seen == [plain['report']]
  np.testing.assert_array_equal(forced['labels'], fake[0])
  assert forced['abnormal'] == UNCERTAIN and forced['no_finding'] == NEGATIVE
  image_example = synthetic.generate_cxr(7, label_noise=0.3, image_size=32, mine_labels=True)
  np.testing.assert_array_equal(image_example['labels'], fake[0])
