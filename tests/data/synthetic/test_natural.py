"""Natural-like images: shapes, labels, balance, classes not given away by colour."""

import numpy as np

from cxr_jax.data import synthetic


def test_natural_images_shapes_labels_and_balance():
  labels = []
  for i in range(30):
    example = synthetic.generate_natural(i, num_classes=10, image_size=48)
    assert example['image'].dtype == np.uint8 and example['image'].shape == (48, 48, 3)
    assert isinstance(example['label'], int)
    labels.append(example['label'])
  assert labels == [i % 10 for i in range(30)]
  definitions = {synthetic.natural_class(c) for c in range(synthetic.MAX_NATURAL_CLASSES)}
  assert len(definitions) == synthetic.MAX_NATURAL_CLASSES


def test_natural_classes_are_not_separable_by_mean_colour():
  num_classes = 10
  features, labels = [], []
  for i in range(400):
    example = synthetic.generate_natural(i, num_classes=num_classes, image_size=32)
    features.append(example['image'].reshape(-1, 3).mean(0))
    labels.append(example['label'])
  features, labels = np.array(features), np.array(labels)
  train, test = slice(0, 300), slice(300, 400)
  centroids = np.stack([features[train][labels[train] == c].mean(0)
                        for c in range(num_classes)])
  predicted = np.argmin(((features[test][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  assert (predicted == labels[test]).mean() < 0.35
