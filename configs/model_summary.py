"""Builds a model and reports parameters, FLOPs and output shapes; trains nothing.

Usage:
  python -m cxr_jax.main --config configs/model_summary.py:bit-m-r50x1 --workdir runs/summary
  ... --config.init.weights=/path/BiT-M-R50x1.npz --config.model.truncate=1

The argument is any registered model name (default bit-m-r50x1).
"""

import ml_collections


def get_config(arg: str = 'bit-m-r50x1'):
  config = ml_collections.ConfigDict()
  config.trainer = 'model_summary'
  config.model_name = arg or 'bit-m-r50x1'  # Any name in cxr_jax.models.model_names().
  config.model = ml_collections.ConfigDict()
  # Classifier outputs; None keeps the registered default, 0 builds no classifier.
  config.model.num_classes = ml_collections.config_dict.placeholder(int)
  config.model.truncate = 0  # Final stages removed (CheXtransfer-style truncation).
  config.model.dtype = 'float32'  # Compute dtype; parameters stay float32.
  config.init = ml_collections.ConfigDict()
  config.init.weights = ''  # Local published weights (.npz BiT, .h5 Keras EfficientNet).
  config.init.head = 'auto'  # auto | keep | replace: what to do with the file's classifier.
  config.input = ml_collections.ConfigDict()
  config.input.image_size = 224
  return config
