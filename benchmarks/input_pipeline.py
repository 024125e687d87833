"""Input pipeline throughput by stored form, and grain vs tf.data on the same work.

  python benchmarks/input_pipeline.py --num_images 256 --batch_size 32

Work per image: decode the stored image, Inception-style random crop resized to 224,
random left-right flip, scale to [-1, 1], gray -> 3 channels. Stored forms: 512x512
16-bit PNG (the builders' default, full resolution), and the training form of
`build --raw_size 256` (raw uint16 / uint8 arrays of what `resize(256)` gives the
PNG), plus 256-pixel PNG to separate the codec from the image size. All pipelines
read the same encoded bytes from memory, so storage speed is left out.

Reported per row: images/s (wall clock) and images per CPU-second of this process
(all its threads), which is the per-core figure on a machine shared with other jobs;
worker rows spend their CPU in child processes, so they give wall clock only. OpenCV
runs one thread (`--cv2_threads`) so that one core means one core. Also: bytes per
stored image, on the benchmark's images and on synthetic CXR phantoms.
"""

import argparse
import os
import platform
import time

import cv2
import numpy as np

from cxr_jax.data import images
from cxr_jax.data import pipeline
from cxr_jax.data import synthetic
from cxr_jax.data import transforms

PP = 'decode|inception_crop(224)|flip_lr|value_range(-1, 1)|rgb'
# The same without a resize: what the stored form costs when the crop needs none.
PP_NO_RESIZE = 'decode|random_crop(224)|flip_lr|value_range(-1, 1)|rgb'


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


def resized(image: np.ndarray, size: int) -> np.ndarray:
  """What `build --raw_size` stores: the pipeline's resize(size) of the stored image."""
  return transforms.Preprocess(f'resize({size})')({'image': image[..., None]}, None)['image']


def stored_forms(pngs: list, size: int) -> dict:
  """name -> encoded images, each form made from the same 16-bit PNGs."""
  small16 = [resized(cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_UNCHANGED), size)
             for p in pngs]
  small8 = [(image >> 8).astype(np.uint8) for image in small16]  # What 8-bit sources hold.
  return {
      'PNG 16-bit 512 px': pngs,
      f'PNG 16-bit {size} px': [cv2.imencode('.png', i)[1].tobytes() for i in small16],
      f'raw uint16 {size} px': [images.encode_raw(i) for i in small16],
      f'raw uint8 {size} px': [images.encode_raw(i) for i in small8],
      f'PNG 8-bit {size} px': [cv2.imencode('.png', i)[1].tobytes() for i in small8],
  }


def phantom_sizes(count: int, size: int) -> dict:
  """Mean bytes per stored image for synthetic CXR phantoms (smoother than the noise images)."""
  phantoms = [resized(synthetic.generate_cxr(i, seed=0, site='A', image_size=512)['image'],
                      size) for i in range(count)]
  forms = {f'PNG 16-bit {size} px': lambda i: cv2.imencode('.png', i)[1],
           f'PNG 8-bit {size} px': lambda i: cv2.imencode('.png', (i >> 8).astype(np.uint8))[1],
           f'raw uint16 {size} px': images.encode_raw,
           f'raw uint8 {size} px': lambda i: images.encode_raw((i >> 8).astype(np.uint8))}
  return {name: np.mean([len(encode(i)) for i in phantoms]) for name, encode in forms.items()}


class BytesSource:
  def __init__(self, pngs):
    self.pngs = pngs

  def __len__(self):
    return len(self.pngs)

  def __getitem__(self, i):
    return {'image': self.pngs[i]}

  def __repr__(self):
    return f'BytesSource({len(self)})'


def time_batches(iterator, num_batches: int, batch_size: int):
  """(images/s wall clock, images per CPU-second of this process)."""
  next(iterator)  # Start-up (worker processes, tracing) is not throughput.
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  count = num_batches * batch_size
  return count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)


def grain_rate(pngs, batch_size, num_batches, workers, pp=PP):
  loader = pipeline.make_pipeline(BytesSource(pngs), pp=pp, batch_size=batch_size, seed=0,
                                  workers=workers, process_index=0, process_count=1)
  iterator = iter(loader)
  try:
    return time_batches(iterator, num_batches, batch_size)
  finally:
    pipeline.close(iterator)


def tf_rate(pngs, batch_size, num_batches, threads):
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
  parser.add_argument('--stored_size', type=int, default=256,
                      help='side of the raw (and small PNG) stored forms')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--num_batches', type=int, default=12)
  parser.add_argument('--workers', type=int, default=os.cpu_count())
  parser.add_argument('--cv2_threads', type=int, default=1)
  parser.add_argument('--grain_only', action='store_true',
                      help='leave out the tf.data rows (hosts without TensorFlow)')
  parser.add_argument('--phantoms', type=int, default=16,
                      help='synthetic CXR phantoms to measure stored sizes on (0: none)')
  args = parser.parse_args()
  cv2.setNumThreads(args.cv2_threads)

  forms = stored_forms(make_pngs(args.num_images, args.image_size), args.stored_size)
  png = forms['PNG 16-bit 512 px']
  raw = forms[f'raw uint16 {args.stored_size} px']
  batches = args.batch_size, args.num_batches
  rows = [(f'grain, in-process (1 core), {name}', *grain_rate(data, *batches, 0))
          for name, data in forms.items()]
  rows.append((f'grain, in-process (1 core), raw uint16 {args.stored_size} px, random_crop '
               'instead of inception_crop', *grain_rate(raw, *batches, 0, PP_NO_RESIZE)))
  if not args.grain_only:
    rows.append(('tf.data, 1 thread, PNG 16-bit 512 px', *tf_rate(png, *batches, 1)))
  for name, data in (('PNG 16-bit 512 px', png), (f'raw uint16 {args.stored_size} px', raw)):
    rows.append((f'grain, {args.workers} workers, {name}',
                 grain_rate(data, *batches, args.workers)[0], None))
  if not args.grain_only:
    rows.append((f'tf.data, {args.workers} threads, PNG 16-bit 512 px',
                 tf_rate(png, *batches, args.workers)[0], None))

  print(f'host: {platform.machine()}, {os.cpu_count()} cores; {args.num_images} '
        f'{args.image_size}px 16-bit PNGs and their stored forms; batch {args.batch_size}; '
        f'OpenCV threads {args.cv2_threads}\n')
  print('| pipeline, stored form | images/s | images per CPU-second |\n|---|---|---|')
  for name, rate, per_cpu in rows:
    print(f'| {name} | {rate:.1f} | {"-" if per_cpu is None else f"{per_cpu:.1f}"} |')
  rates = {name: (rate, per_cpu) for name, rate, per_cpu in rows}
  base = rates['grain, in-process (1 core), PNG 16-bit 512 px']
  fast = rates[f'grain, in-process (1 core), raw uint16 {args.stored_size} px']
  tf_one = rates.get('tf.data, 1 thread, PNG 16-bit 512 px')
  print(f'\nratio raw uint16 {args.stored_size} / PNG 512, 1 core: {fast[0] / base[0]:.2f} wall, '
        f'{fast[1] / base[1]:.2f} per CPU-second' +
        (f'; grain/tf.data (PNG 512, 1 core): {base[0] / tf_one[0]:.2f}' if tf_one else ''))

  print('\n| stored form | bytes per image, benchmark images | bytes per image, CXR phantoms |'
        '\n|---|---|---|')
  phantoms = phantom_sizes(args.phantoms, args.stored_size) if args.phantoms else {}
  for name, data in forms.items():
    phantom = phantoms.get(name)
    print(f'| {name} | {np.mean([len(d) for d in data]):,.0f} | '
          f'{"-" if phantom is None else f"{phantom:,.0f}"} |')


if __name__ == '__main__':
  main()
