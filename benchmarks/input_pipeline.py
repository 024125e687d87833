"""Input pipeline throughput: grain (this project's pipeline) vs tf.data, same work, same run.

  python benchmarks/input_pipeline.py --num_images 256 --batch_size 32

Work per image: decode a 512x512 16-bit PNG, Inception-style random crop resized to
224, random left-right flip, scale to [-1, 1], gray -> 3 channels. Both pipelines
read the same encoded bytes from memory, so storage speed is left out. Reported:
images/s with one core's worth of parallelism (grain: decoding in the main process;
tf.data: one parallel call on a one-thread pool) and with all workers, plus the
ratio grain / tf.data.
"""

import argparse
import os
import platform
import time

import cv2
import numpy as np

from cxr_jax.data import pipeline

PP = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)|rgb'


def make_pngs(n: int, size: int) -> list:
  """Smooth random 16-bit images: compress like radiographs rather than like noise."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    small = rng.uniform(0, 65535, (size // 16, size // 16)).astype(np.float32)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 300, image.shape).astype(np.float32)
    out.append(cv2.imencode('.png', np.clip(image, 0, 65535).astype(np.uint16))[1].tobytes())
  return out


class BytesSource:
  def __init__(self, pngs):
    self.pngs = pngs

  def __len__(self):
    return len(self.pngs)

  def __getitem__(self, i):
    return {'image': self.pngs[i]}

  def __repr__(self):
    return f'BytesSource({len(self)})'


def time_batches(iterator, num_batches: int, batch_size: int) -> float:
  next(iterator)  # Start-up (worker processes, tracing) is not throughput.
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def grain_rate(pngs, batch_size, num_batches, workers) -> float:
  loader = pipeline.make_pipeline(BytesSource(pngs), pp=PP, batch_size=batch_size, seed=0,
                                  workers=workers, process_index=0, process_count=1)
  return time_batches(iter(loader), num_batches, batch_size)


def tf_rate(pngs, batch_size, num_batches, threads) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def augment(data):
    image = tf.io.decode_png(data, channels=1, dtype=tf.uint16)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([0, 0, 4], tf.float32), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = tf.image.resize(image, (224, 224), method='area')
    image = tf.image.random_flip_left_right(image)
    image = image / 65535.0 * 2 - 1
    return tf.image.grayscale_to_rgb(image)

  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  ds = (tf.data.Dataset.from_tensor_slices(pngs).shuffle(len(pngs)).repeat()
        .map(augment, num_parallel_calls=threads).batch(batch_size, drop_remainder=True)
        .prefetch(2).with_options(options))
  return time_batches(iter(ds.as_numpy_iterator()), num_batches, batch_size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=256)
  parser.add_argument('--image_size', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_batches', type=int, default=12)
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  args = parser.parse_args()

  pngs = make_pngs(args.num_images, args.image_size)
  rows = [
      ('grain, in-process (1 core)', grain_rate(pngs, args.batch_size, args.num_batches, 0)),
      ('tf.data, 1 thread', tf_rate(pngs, args.batch_size, args.num_batches, 1)),
      (f'grain, {args.workers} workers', grain_rate(pngs, args.batch_size, args.num_batches,
                                                    args.workers)),
      (f'tf.data, {args.workers} threads', tf_rate(pngs, args.batch_size, args.num_batches,
                                                   args.workers)),
  ]
  print(f'host: {platform.machine()}, {os.cpu_count()} cores; {args.num_images} '
        f'{args.image_size}px 16-bit PNGs; batch {args.batch_size}\n')
  print('| pipeline | images/s |\n|---|---|')
  for name, rate in rows:
    print(f'| {name} | {rate:.1f} |')
  print(f'\nratio grain/tf.data, 1 core: {rows[0][1] / rows[1][1]:.2f}; '
        f'{args.workers} workers: {rows[2][1] / rows[3][1]:.2f}')


if __name__ == '__main__':
  main()
