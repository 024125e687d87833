"""The project's TFDS builders; importing this package registers them with TFDS.

Builder modules import TensorFlow Datasets but not TensorFlow, so registering them
keeps the training path free of TensorFlow.
"""

# Datasets the user downloads (built with --manual_dir).
from cxr_jax.data.builders import chexpert  # noqa: F401
from cxr_jax.data.builders import manifest  # noqa: F401
from cxr_jax.data.builders import mimic_cxr  # noqa: F401
from cxr_jax.data.builders import nih_cxr14  # noqa: F401

# Generated datasets (no download) are registered below.
from cxr_jax.data.builders import synthetic  # noqa: F401
