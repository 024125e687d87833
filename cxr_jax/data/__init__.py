"""Data: sources, synthetic datasets, TFDS builders, decoding, label policies, pipelines."""
