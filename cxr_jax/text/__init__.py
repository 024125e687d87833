"""The text side of image-text pretraining: the report tokenizer and report sections.

The text encoder is in `cxr_jax.models.text`, the image-text network and its loss in
`cxr_jax.train.image_text`, zero-shot classification in `cxr_jax.eval.zero_shot`.
"""

from cxr_jax.text.tokenizer import SECTIONS, Tokenizer, load_cached, select_sections

__all__ = ['SECTIONS', 'Tokenizer', 'load_cached', 'select_sections']
