"""Training: the loop, its stages, and the other trainers `config.trainer` can name.

Each trainer is `fn(config, workdir)` in `TRAINERS`; the loop's stages are also in
`trainer.STAGES`; a trainer may add `check(config)` to `CONFIG_CHECKS`, which a chain
runs for every stage before the first one starts. Importing this package registers the stages and trainers of this
layer; the studies built on trained runs (`cxr_jax.studies`: chain, transfer_study)
register theirs when that package is imported (`cxr_jax.main` imports it).
"""

from cxr_jax.train.registry import CONFIG_CHECKS
from cxr_jax.train.registry import TRAINERS

# Importing a trainer module registers it.
from cxr_jax.train import model_summary as _model_summary  # noqa: F401
from cxr_jax.train import stages as _stages  # noqa: F401
from cxr_jax.train import image_text as _image_text  # noqa: F401
from cxr_jax.train import tokenizer as _tokenizer  # noqa: F401

__all__ = ['CONFIG_CHECKS', 'TRAINERS']
