"""Report text: the tokenizer and sections for image-text pretraining, and the labeler.

The report labeler (`cxr_jax.text.labeler`, command line `python -m cxr_jax.label_reports`)
mines CheXpert codes and normal/abnormal from free-text reports.

A plain library: it reads no datasets. Training the tokenizer on datasets' reports is
`cxr_jax.train.tokenizer`; the text encoder and the image-text network are in
`cxr_jax.models` (text.py, image_text.py), their loss in `cxr_jax.train.image_text`,
zero-shot classification in `cxr_jax.eval.zero_shot`.
"""

from cxr_jax.text.labeler import LABELER_VERSION, OBSERVATIONS, ReportLabeler, label_reports
from cxr_jax.text.tokenizer import SECTIONS, Tokenizer, load_cached, select_sections

__all__ = ['LABELER_VERSION', 'OBSERVATIONS', 'ReportLabeler', 'SECTIONS', 'Tokenizer',
           'label_reports', 'load_cached', 'select_sections']
