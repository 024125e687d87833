"""Everything `config.trainer` can name. Each trainer is `fn(config, workdir)`."""

from cxr_jax.train.registry import TRAINERS

# Importing a trainer module registers it.
from cxr_jax.train import model_summary as _model_summary  # noqa: F401
from cxr_jax.train import trainer as _trainer  # noqa: F401
from cxr_jax.train import chain as _chain  # noqa: F401
from cxr_jax.train import transfer_study as _transfer_study  # noqa: F401

__all__ = ['TRAINERS']
