"""SavedModel export: in-graph preprocessing op by op, and the round trip against JAX.

The in-graph ops are checked against the NumPy ops of `data.transforms`, and integer
resizing also against OpenCV directly (float64 INTER_AREA rounded half to even when
shrinking, INTER_LINEAR_EXACT when enlarging). Exported runs are loaded back with
`tf.saved_model.load` and must agree with `inference.Model` to 1e-4. An image-text run
exports its text tower too: text embeddings, the joint image embedding and zero-shot
scores computed from the export agree with the JAX run and `eval.zero_shot`.
"""

import json
import os
import re

import cv2
import numpy as np
import pytest
import tensorflow as tf

from cxr_jax import embed
from cxr_jax import export
from cxr_jax import inference
from cxr_jax import zero_shot as zero_shot_tool
from cxr_jax.data import pipeline
from cxr_jax.data import transforms
from cxr_jax.eval import zero_shot
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train import image_text as image_text_lib
from cxr_jax.train import tokenizer as tokenizer_trainer
from cxr_jax.train import trainer
from test_inference import CLASSIFIER_PP_EVAL  # pylint: disable=g-bad-import-order
from test_inference import _recipe  # pylint: disable=g-bad-import-order
from test_inference import _tiny  # pylint: disable=g-bad-import-order
from test_inference import shared_model  # pylint: disable=g-bad-import-order
from test_inference import trained_runs  # pylint: disable=g-bad-import-order

TOLERANCE = 1e-4


def reference_resize(image, height, width):
  """Integer resizing with reproducible rounding, straight from OpenCV; [H, W, C]."""
  info = np.iinfo(image.dtype)
  if height <= image.shape[0] and width <= image.shape[1]:
    out = cv2.resize(image.astype(np.float64), (width, height), interpolation=cv2.INTER_AREA)
    out = np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
  else:
    out = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR_EXACT)
  return out.reshape(height, width, -1)


def exported_runs(tmp_path_factory):
  """The runs of `trained_runs`, exported once per session: {'classifier', 'supcon'} dirs."""
  runs = trained_runs(tmp_path_factory)
  root = tmp_path_factory.getbasetemp() / 'h3_exports'
  done = root / 'exports.json'
  if done.exists():
    return json.loads(done.read_text())
  exports = {name: str(root / name) for name in ('classifier', 'supcon')}
  # The command line, with the default platforms (CPU, CUDA and TPU lowerings).
  export.main(['export', '--workdir', runs['classifier'], '--output', exports['classifier']])
  export.export_run(runs['supcon'], exports['supcon'], platforms=('cpu',))
  done.write_text(json.dumps(exports))
  return exports


TEXT_MAX_LEN = 48


def image_text_run(tmp_path_factory):
  """A tiny image-text run (bit-tiny, text-tiny, 2 steps) on `trained_runs`' dataset, and
  its tokenizer trained on that dataset's reports: once per session (and worker)."""
  runs = trained_runs(tmp_path_factory)
  root = tmp_path_factory.getbasetemp() / 'h3_image_text'
  done = root / 'run.json'
  if done.exists():
    return json.loads(done.read_text())
  root.mkdir(exist_ok=True)
  tokenizer = str(root / 'tokenizer.json')
  tokenizer_lib.Tokenizer.train(
      tokenizer_trainer.reports_of(runs['dataset'], 'train', runs['data_dir']), 400).save(tokenizer)
  config = _tiny(_recipe('image_text_cxr'), runs['data_dir'], runs['dataset'])
  config.text.tokenizer = tokenizer
  config.text.max_len = TEXT_MAX_LEN
  config.head.embed_dim = 16
  config.data.pp = (image_text_lib.tokenize_op(config)
                    + '|decode|window|random_crop(28)|value_range(-1, 1, 0, 1)|rgb')
  config.data.pp_eval = CLASSIFIER_PP_EVAL
  run = {'workdir': str(root / 'run'), 'tokenizer': tokenizer, 'export': str(root / 'export'),
         'dataset': runs['dataset'], 'data_dir': runs['data_dir']}
  trainer.train(config, run['workdir'])
  export.export_run(run['workdir'], run['export'], platforms=('cpu',))
  done.write_text(json.dumps(run))
  return run


_EMBEDDERS = {}


def shared_embedder(path) -> embed.SavedModelEmbedder:
  """One loaded SavedModel per export per session; TF compiles its network once per shape."""
  if path not in _EMBEDDERS:
    _EMBEDDERS[path] = embed.SavedModelEmbedder(path)
  return _EMBEDDERS[path]


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  runs = trained_runs(tmp_path_factory)
  paths = exported_runs(tmp_path_factory)
  return {name: (shared_embedder(paths[name]).loaded, shared_model(runs[name]), paths[name])
          for name in ('classifier', 'supcon')}


def _images(dtype, shape, seed=0):
  rng = np.random.default_rng(seed)
  if dtype == np.float32:
    return rng.random(shape, np.float32)
  return rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def _numpy_op(pp, image):
  return transforms.Preprocess(pp)({'image': image}, np.random.default_rng(0))['image']


# --- ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize('pp', [
    'decode', 'decode(3)', 'value_range', 'value_range(0, 255)', 'value_range(-1, 1, 0.1, 0.9)',
    'window', 'window(2, 98)|value_range(-1, 1, 0, 1)', 'rgb', 'central_crop(20)',
    'central_crop((11, 30))', "keep('image')", 'decode|window|central_crop(28)|rgb'])
def test_exact_ops_match_numpy(pp, dtype):
  images = _images(dtype, (2, 33, 30, 1))
  graph = export.graph_preprocess(pp)(tf.constant(images)).numpy()
  numpy = np.stack([_numpy_op(pp, image) for image in images])
  assert graph.dtype == numpy.dtype
  np.testing.assert_array_equal(graph, numpy)


# One side shrinks, the other grows: area averaging applies only when no side grows,
# so these are bilinear in both implementations.
MIXED_SHRINKING = (((50, 20), (30, 24)), ((9, 1), (4, 2)))
SIZES = [((37, 41), (20, 23)),  # Shrink by uneven factors: weighted areas.
         ((36, 40), (18, 20)),  # Halve: OpenCV's whole-factor fast path.
         ((36, 42), (12, 14)),  # Third.
         ((20, 24), (33, 47)),  # Enlarge.
         ((40, 20), (30, 30)), ((1, 9), (4, 5))] + list(MIXED_SHRINKING)


@pytest.mark.parametrize('sizes', SIZES)
def test_float_resize_matches_numpy(sizes):
  (in_h, in_w), (h, w) = sizes
  images = _images(np.float32, (2, in_h, in_w, 1))
  graph = export.resize(tf.constant(images), h, w).numpy()
  numpy = np.stack([_numpy_op(f'resize(({h}, {w}))', image) for image in images])
  assert graph.shape == (2, h, w, 1) and graph.dtype == np.float32
  np.testing.assert_allclose(graph, numpy, atol=1e-5)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
@pytest.mark.parametrize('sizes', SIZES)
def test_integer_resize_reproduces_opencv(sizes, dtype):
  (in_h, in_w), (h, w) = sizes
  images = _images(dtype, (2, in_h, in_w, 1), seed=h)
  graph = export.resize(tf.constant(images), h, w).numpy()
  np.testing.assert_array_equal(graph, np.stack([reference_resize(i, h, w) for i in images]))


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_integer_resize_matches_numpy(dtype):
  for (in_h, in_w), (h, w) in SIZES:
    images = _images(dtype, (2, in_h, in_w, 1), seed=w)
    graph = export.resize(tf.constant(images), h, w).numpy()
    numpy = np.stack([_numpy_op(f'resize(({h}, {w}))', image) for image in images])
    np.testing.assert_array_equal(graph, numpy)


@pytest.mark.parametrize('dtype', [
    np.uint16, np.float32])
def test_resize_small_matches_numpy(dtype):
  for shape in ((2, 45, 30, 1), (2, 12, 50, 1), (2, 20, 20, 1), (2, 41, 61, 1)):
    images = _images(dtype, shape)
    graph = export.graph_preprocess('resize_small(20)')(tf.constant(images)).numpy()
    numpy = np.stack([_numpy_op('resize_small(20)', image) for image in images])
    assert graph.shape == numpy.shape
    np.testing.assert_allclose(graph, numpy, atol=1e-5)


@pytest.mark.parametrize('pp, op', [('decode|flip_lr|rgb', 'flip_lr'),
                                    ('decode|random_crop(8)', 'random_crop'),
                                    ('decode|inception_crop(8)|rgb', 'inception_crop'),
                                    ('window|contrast', 'contrast')])
def test_ops_without_graph_version_are_named(pp, op):
  with pytest.raises(ValueError, match=f"op '{op}' in pp_eval .* no in-graph version"):
    export.graph_preprocess(pp)
  with pytest.raises(ValueError, match='two_views'):
    export.graph_preprocess('decode|two_views|rgb')
  with pytest.raises(ValueError, match='Unknown preprocessing op'):
    export.graph_preprocess('decode|sharpen')


def test_crop_larger_than_image_fails_at_run_time():
  with pytest.raises(tf.errors.InvalidArgumentError, match='cannot crop 20x20'):
    export.graph_preprocess('central_crop(20)')(tf.zeros([1, 10, 30, 1]))


# --- the SavedModel -----------------------------------------------------------------------


def _compare(loaded, model, images):
  out = loaded.embed_images(images)
  expected = model.embed_arrays(list(images), batch_size=4)
  assert set(expected) <= set(out)
  for key, value in expected.items():
    np.testing.assert_allclose(out[key].numpy(), value, atol=TOLERANCE, rtol=0, err_msg=key)
  return out


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize('kind', ['classifier', 'supcon'])
def test_savedmodel_matches_jax_at_the_stored_size(exported, kind, dtype, batch):
  loaded, model, _ = exported[kind]
  _compare(loaded, model, _images(dtype, (batch, 32, 32)))


@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('size', [(48, 40), (20, 26)])
@pytest.mark.parametrize('kind', ['classifier', 'supcon'])
def test_savedmodel_matches_jax_on_float_images_of_other_sizes(exported, kind, size, batch):
  loaded, model, _ = exported[kind]
  _compare(loaded, model, _images(np.float32, (batch,) + size + (1,)))


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
@pytest.mark.parametrize('kind', ['classifier', 'supcon'])
def test_savedmodel_matches_jax_on_integer_images_of_other_sizes(exported, kind, dtype):
  loaded, model, _ = exported[kind]
  for batch, size in ((1, (48, 40)), (3, (20, 26))):
    _compare(loaded, model, _images(dtype, (batch,) + size, seed=batch))


def _png(image):
  ok, data = cv2.imencode('.png', image)
  assert ok
  return data.tobytes()


def test_signatures_and_outputs(exported):
  loaded, model, _ = exported['classifier']
  assert {'serving_default', 'embed_images', 'embed_images_uint8', 'embed_images_uint16',
          'embed_png', 'metadata'} <= set(loaded.signatures)
  images = _images(np.float32, (3, 32, 32, 1))
  served = loaded.signatures['serving_default'](images=tf.constant(images))
  out = _compare(loaded, model, images)
  assert set(served) == {'embedding', 'logits', 'probabilities'}
  for key in served:
    np.testing.assert_allclose(served[key].numpy(), out[key].numpy(), atol=1e-6)
  np.testing.assert_allclose(served['probabilities'].numpy(),
                             1 / (1 + np.exp(-served['logits'].numpy())), atol=1e-6)
  sixteen = _images(np.uint16, (3, 32, 32, 1))
  np.testing.assert_allclose(
      loaded.signatures['embed_images_uint16'](images=tf.constant(sixteen))['logits'].numpy(),
      model.embed_arrays(list(sixteen))['logits'], atol=TOLERANCE)
  supcon, _, _ = exported['supcon']
  assert set(supcon.embed_images(images)) == {'embedding'}


@pytest.mark.parametrize('kind', ['classifier', 'supcon'])
def test_embed_png_matches_jax(exported, kind):
  loaded, model, _ = exported[kind]
  pngs = [_png(_images(np.uint16, (32, 32), seed=1)), _png(_images(np.uint8, (32, 32), seed=2)),
          _png(_images(np.uint16, (32, 32), seed=3))]
  out = loaded.signatures['embed_png'](png=tf.constant(pngs))
  expected = model.embed_arrays(pngs)
  for key, value in expected.items():
    np.testing.assert_allclose(out[key].numpy(), value, atol=TOLERANCE, err_msg=key)


def test_embed_png_takes_images_of_different_sizes(exported):
  loaded, model, _ = exported['classifier']
  pngs = [_png(_images(np.uint16, (50, 41))), _png(_images(np.uint8, (20, 30)))]
  out = loaded.signatures['embed_png'](png=tf.constant(pngs))
  np.testing.assert_allclose(out['embedding'].numpy(), model.embed_arrays(pngs)['embedding'],
                             atol=TOLERANCE)


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16])
def test_embed_png_takes_gray_films_stored_as_rgb(exported, dtype):
  loaded, model, _ = exported['classifier']
  gray = _images(dtype, (36, 30), seed=4)
  rgb, rgba = np.stack([gray] * 3, axis=-1), np.stack([gray] * 4, axis=-1)
  out = loaded.signatures['embed_png'](png=tf.constant([_png(rgb), _png(gray), _png(rgba)]))
  expected = model.embed_arrays([gray])['embedding'][0]
  for row in out['embedding'].numpy():
    np.testing.assert_allclose(row, expected, atol=TOLERANCE)


def test_embed_png_rejects_colour(exported):
  loaded, _, _ = exported['supcon']
  colour = _png(_images(np.uint8, (32, 32, 3)))
  with pytest.raises(tf.errors.InvalidArgumentError, match='channels that differ'):
    loaded.signatures['embed_png'](png=tf.constant([colour]))


def test_batch_size_is_polymorphic(exported):
  loaded, _, _ = exported['supcon']
  assert loaded.signatures['embed_images'].structured_input_signature[1][
      'images'].shape.as_list() == [None, None, None, 1]
  images = _images(np.float32, (3, 32, 32))
  alone = loaded.embed_images(images[2:3])['embedding'].numpy()
  together = loaded.embed_images(images)['embedding'].numpy()
  # Each batch size compiles on its own, so agreement is to rounding, not bit for bit.
  np.testing.assert_allclose(together[2:3], alone, atol=1e-5)
  assert together.shape == (3, 256)


def test_metadata(exported):
  loaded, model, path = exported['classifier']
  metadata = export.read_metadata(path)
  assert metadata['findings'] == list(model.findings)
  assert metadata['embedding_dim'] == model.embedding_dim and metadata['num_classes'] == 7
  assert metadata['pp_eval'] == model.pp_eval and metadata['model_name'] == 'bit-tiny'
  assert metadata['step'] == 2 and metadata['workdir'] == os.path.abspath(model.workdir)
  assert metadata['model_input_shape'] == [28, 28, 3]
  assert metadata['platforms'] == ['cpu', 'cuda', 'tpu']
  assert metadata['outputs'] == ['embedding', 'logits', 'probabilities']
  tensors = loaded.signatures['metadata']()
  assert [f.decode() for f in tensors['findings'].numpy()] == list(model.findings)
  assert int(tensors['embedding_dim']) == model.embedding_dim
  assert json.loads(tensors['json'].numpy()) == metadata
  assert export.read_metadata(exported['supcon'][2])['outputs'] == ['embedding']


def test_export_errors(exported, tmp_path):
  _, model, path = exported['supcon']
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export_model(model, path)
  config = model.config.copy_and_resolve_references()
  config.data.pp_eval = 'decode|resize(32)|flip_lr|rgb'
  augmenting = inference.Model(config=config, network=model.network, variables=model.variables)
  with pytest.raises(ValueError, match="'flip_lr'"):
    export.export_model(augmenting, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')
  with pytest.raises(FileNotFoundError, match='not a cxr_jax SavedModel'):
    export.read_metadata(str(tmp_path))


# --- image-text runs -----------------------------------------------------------------------


@pytest.fixture(scope='module')
def image_text(tmp_path_factory):
  """(loaded SavedModel, JAX model, export dir, run) of `image_text_run`."""
  run = image_text_run(tmp_path_factory)
  return (shared_embedder(run['export']).loaded, shared_model(run['workdir']), run['export'],
          run)


PROMPTS = ['No pleural effusion.', 'There is a pneumothorax with a visible pleural line.',
           'The heart is enlarged, in keeping with cardiomegaly.']


@pytest.mark.slow
def test_image_text_export_matches_jax_text_and_image_embeddings(image_text):
  loaded, model, path, run = image_text
  assert model.has_text and not model.has_logits
  from_export = export.embed_texts(path, PROMPTS, loaded=loaded)
  from_jax = model.embed_texts(PROMPTS)
  assert from_export.shape == from_jax.shape == (3, 16) and from_export.dtype == np.float32
  np.testing.assert_allclose(from_export, from_jax, atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(from_export, axis=1), 1, atol=1e-5)
  assert len({tuple(np.round(row, 3)) for row in from_export}) == 3  # Distinct texts differ.
  # Loading the export itself, and batches of two (the second one padded).
  np.testing.assert_allclose(export.embed_texts(path, PROMPTS, batch_size=2), from_jax,
                             atol=TOLERANCE, rtol=0)

  # The signature takes any length up to max_len: padding is added in the graph.
  tokens = tokenizer_lib.Tokenizer.load(run['tokenizer']).encode(PROMPTS, TEXT_MAX_LEN)
  needed = int((tokens != 0).sum(axis=1).max())  # The longest prompt's length.
  assert needed < TEXT_MAX_LEN
  signature = loaded.signatures['embed_text']
  assert signature.structured_input_signature[1]['tokens'].shape.as_list() == [None, None]
  for length in (needed, TEXT_MAX_LEN):
    out = signature(tokens=tf.constant(tokens[:, :length]))['text_embedding'].numpy()
    np.testing.assert_allclose(out, from_jax, atol=TOLERANCE, rtol=0, err_msg=str(length))

  # The image signatures add the joint-space embedding to the backbone's.
  images = _images(np.uint16, (3, 32, 32))
  out = _compare(loaded, model, images)
  assert set(out) == {'embedding', 'image_embedding'}
  assert out['embedding'].shape == (3, 256) and out['image_embedding'].shape == (3, 16)

  metadata = export.read_metadata(path)
  assert metadata['has_text'] and 'embed_text' in metadata['signatures']
  assert metadata['outputs'] == ['embedding', 'image_embedding']
  text = metadata['text']
  assert text['max_len'] == TEXT_MAX_LEN and text['joint_embedding_dim'] == 16
  assert text['vocab_size'] == model.tokenizer.vocab_size and text['encoder'] == 'text-tiny'
  np.testing.assert_allclose(text['logit_scale'], model.logit_scale, rtol=1e-6)
  with open(os.path.join(path, 'assets', text['tokenizer']), 'rb') as f:
    with open(run['tokenizer'], 'rb') as original:
      assert f.read() == original.read()
  tensors = loaded.signatures['metadata']()
  assert os.path.isfile(tensors['tokenizer_file'].numpy().decode())
  assert int(tensors['text_max_len']) == TEXT_MAX_LEN


@pytest.mark.slow
def test_zero_shot_from_exported_embeddings_matches_eval_zero_shot(image_text):
  loaded, _, path, run = image_text
  findings = ['cardiomegaly', 'pleural_effusion', 'pneumothorax']
  expected = zero_shot_tool.zero_shot_from_workdir(run['workdir'], split='test',
                                                   findings=findings)

  # The same test images as stored PNGs, and the same prompts, through the SavedModel.
  source, _ = pipeline.open_source(run['dataset'], 'test', run['data_dir'])
  records = [source[i] for i in range(len(source))]
  assert 2 <= len(records) == len(expected['id'])
  images = loaded.signatures['embed_png'](png=tf.constant([r['image'] for r in records]))[
      'image_embedding'].numpy().astype(np.float64)
  groups = [zero_shot.DEFAULT_PROMPTS[f][side] for side in (0, 1) for f in findings]
  phrases = export.embed_texts(path, [p for group in groups for p in group], loaded=loaded)
  bounds = np.cumsum([0] + [len(group) for group in groups])
  prompts = np.stack([phrases[a:b].astype(np.float64).mean(axis=0)
                      for a, b in zip(bounds[:-1], bounds[1:])])
  prompts /= np.linalg.norm(prompts, axis=1, keepdims=True)
  positive, negative = prompts[:len(findings)], prompts[len(findings):]
  scale = export.read_metadata(path)['text']['logit_scale']
  scores = 1 / (1 + np.exp(-scale * (images @ positive.T - images @ negative.T)))

  row = {image_id: n for n, image_id in enumerate(expected['id'])}
  order = [row[r['image_id'].decode()] for r in records]
  np.testing.assert_allclose(scores, expected['scores'][order], atol=1e-4, rtol=0)
  assert np.ptp(scores) > 1e-3  # Scores that differ, not a constant that trivially agrees.


def test_text_errors(image_text, exported):
  loaded, model, path, _ = image_text
  signature = loaded.signatures['embed_text']
  tokens = np.ones((2, TEXT_MAX_LEN + 1), np.int32)
  with pytest.raises(tf.errors.InvalidArgumentError, match=f'max_len={TEXT_MAX_LEN}'):
    signature(tokens=tf.constant(tokens))
  tokens[1, 3] = model.tokenizer.vocab_size
  with pytest.raises(tf.errors.InvalidArgumentError, match='token ids must lie in'):
    signature(tokens=tf.constant(tokens[:, :TEXT_MAX_LEN]))
  _, supcon, supcon_path = exported['supcon']
  with pytest.raises(ValueError, match=f'{re.escape(supcon_path)} is not an image-text run'):
    export.embed_texts(supcon_path, PROMPTS)
  with pytest.raises(ValueError, match=re.escape(
      f"{supcon.workdir} (trainer 'supcon') is not an image-text run")):
    supcon.embed_texts(PROMPTS)
  assert not export.read_metadata(supcon_path)['has_text']
  for embed_texts in (model.embed_texts, lambda texts: export.embed_texts(path, texts,
                                                                          loaded=loaded)):
    with pytest.raises(ValueError, match='Text 1 is empty'):
      embed_texts(['Cardiomegaly.', '  '])
    with pytest.raises(TypeError, match='wrap a single text in a list'):
      embed_texts('Cardiomegaly.')
  with pytest.warns(UserWarning, match=r'1 of 2 texts are longer than the 46 subwords'):
    cut = model.embed_texts(['Cardiomegaly.', 'pleural effusion ' * 40])
  assert cut.shape == (2, 16)
