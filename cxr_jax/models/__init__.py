"""Model zoo: `get_model(name, **kw)` builds a Flax module, `load_pretrained` fills it.

Every model is called as `model.apply(variables, images, train=...)` and returns
`(logits_or_None, aux)`, with `aux['embedding']` the pooled pre-logits vector and
`aux['features']` a dict of per-stage feature maps.

Every network a stage trains is built here too: heads and the backbone+head network
(`heads`), the builders of the image-only stages and the finetune modes (`networks`),
the report encoder (`text`) and the image-text network (`image_text`).
"""

from cxr_jax.models.registry import MODELS, build_model, get_model, model_names
from cxr_jax.models.weights import load_pretrained

# Importing the architecture modules registers their names.
from cxr_jax.models import bit as _bit  # noqa: F401
from cxr_jax.models import efficientnet as _efficientnet  # noqa: F401

__all__ = ['MODELS', 'build_model', 'get_model', 'model_names', 'load_pretrained']
