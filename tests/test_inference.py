"""Loading trained runs for inference: networks, weights, preprocessing, errors.

`trained_runs` (also used by test_export.py and test_embed.py) builds a small synthetic
CXR dataset and two tiny runs once per test session: a classifier (MLP probe, whose
batch-norm statistics exercise model state) and a SupCon run (projection head, no
classifier). Their pp_eval resizes to 32 px, the stored size, so the embedding tests
see exactly the stored pixels; the export tests feed other sizes.
"""

import json
import os

import cv2
import flax
import numpy as np
import pytest

from cxr_jax import inference
from cxr_jax.data import transforms
from cxr_jax.data.builders import synthetic as synthetic_builders
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSIFIER_PP_EVAL = 'decode|resize(32)|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'
SUPCON_PP_EVAL = 'decode|resize_small(32)|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'


def _recipe(name):
  return config_lib.load(os.path.join(REPO, 'configs', f'{name}.py'))


def _tiny(config, data_dir, dataset):
  config.data.name, config.data.data_dir = dataset, data_dir
  config.batch_size, config.total_steps, config.log_every = 8, 2, 1
  config.checkpoint.every = 1
  config.optimizer.schedule.warmup_steps = 1
  config.init_image_size = 32
  config.model.truncate = 2  # Half of bit-tiny's stages: a quicker compile, same code paths.
  return config


def trained_runs(tmp_path_factory):
  """{'data_dir', 'dataset', 'classifier', 'supcon'}: built once per session (and worker)."""
  root = tmp_path_factory.getbasetemp() / 'h3_trained_runs'
  done = root / 'runs.json'
  if done.exists():
    return json.loads(done.read_text())
  data_dir = str(root / 'tfds')
  dataset = synthetic_builders.prepare(synthetic_builders.make_cxr_config(
      'A', image_size=32, num_examples=40), data_dir)
  classifier = _tiny(_recipe('finetune_cxr'), data_dir, dataset)
  classifier.finetune.mode = 'mlp'
  classifier.data.pp = 'decode|random_crop(28)|window|value_range(-1, 1, 0, 1)|rgb'
  classifier.data.pp_eval = CLASSIFIER_PP_EVAL
  supcon = _tiny(_recipe('supcon_cxr'), data_dir, dataset)
  supcon.data.pp = 'decode|window|two_views|random_crop(28)|flip_lr|value_range(-1, 1, 0, 1)|rgb'
  supcon.data.pp_eval = SUPCON_PP_EVAL
  runs = {'data_dir': data_dir, 'dataset': dataset}
  for name, config in (('classifier', classifier), ('supcon', supcon)):
    runs[name] = str(root / name)
    trainer.train(config, runs[name])
  done.write_text(json.dumps(runs))
  return runs


_MODELS = {}


def shared_model(workdir) -> inference.Model:
  """One loaded Model per run per session, so that its compiled functions are reused."""
  if workdir not in _MODELS:
    _MODELS[workdir] = inference.load_run(workdir)
  return _MODELS[workdir]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return trained_runs(tmp_path_factory)


def test_classifier_run_loads_with_its_findings_and_preprocessing(runs):
  model = inference.load_run(runs['classifier'])
  assert model.step == 2 and model.has_logits and model.num_classes == 7
  assert model.findings == ('airspace_opacity', 'atelectasis', 'cardiomegaly', 'nodule',
                            'pleural_effusion', 'pneumothorax', 'tuberculosis')
  assert model.pp_eval == CLASSIFIER_PP_EVAL and model.model_name == 'bit-tiny'
  assert model.config.model.truncate == 2 and model.embedding_dim == 256
  assert 'batch_stats' in model.variables  # The MLP head's batch norm.
  image = np.random.default_rng(0).integers(0, 65536, (40, 36), dtype=np.uint16)
  expected = transforms.Preprocess(CLASSIFIER_PP_EVAL)({'image': image},
                                                       np.random.default_rng(1))['image']
  np.testing.assert_array_equal(model.preprocess(image), expected)
  assert model.preprocess(image).shape == (28, 28, 3)


def test_classifier_logits_are_the_head_applied_to_the_embedding(runs):
  """Logits recomputed in NumPy from the checkpoint's MLP head weights and batch stats."""
  model = shared_model(runs['classifier'])
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 65536, (32, 32), dtype=np.uint16) for _ in range(3)]
  out = model.embed_arrays(images, batch_size=4)
  assert out['embedding'].shape == (3, model.embedding_dim) and out['logits'].shape == (3, 7)
  assert out['embedding'].dtype == out['logits'].dtype == np.float32
  state, _, _ = checkpointing.read_checkpoint(runs['classifier'])
  head = {'/'.join(k): np.asarray(v, np.float64) for k, v in
          flax.traverse_util.flatten_dict(state['params']['head']).items()}
  stats = {'/'.join(k): np.asarray(v, np.float64) for k, v in
           flax.traverse_util.flatten_dict(state['model_state']['batch_stats']['head']).items()}
  x = out['embedding'].astype(np.float64)
  for i in range(2):
    x = x @ head[f'hidden{i}/kernel'] + head[f'hidden{i}/bias']
    x = (x - stats[f'norm{i}/mean']) / np.sqrt(stats[f'norm{i}/var'] + 1e-5)
    x = np.maximum(x * head[f'norm{i}/scale'] + head[f'norm{i}/bias'], 0)
  logits = x @ head['dense/kernel'] + head['dense/bias']
  np.testing.assert_allclose(out['logits'], logits, atol=1e-4, rtol=1e-4)


def test_supcon_run_gives_embeddings_only(runs):
  model = shared_model(runs['supcon'])
  assert not model.has_logits and model.num_classes == 0
  images = [np.random.default_rng(3).random((32, 40), np.float32) for _ in range(2)]
  out = model.embed_arrays(images, batch_size=4)
  assert set(out) == {'embedding'} and out['embedding'].shape == (2, model.embedding_dim)


def test_embed_arrays_pads_batches_without_changing_results(runs):
  model = shared_model(runs['supcon'])
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (36, 32), dtype=np.uint8) for _ in range(6)]
  batched = model.embed_arrays(images, batch_size=4)['embedding']  # 4 and 2 padded to 4.
  first, second = (model.apply(np.stack([model.preprocess(i) for i in part]))['embedding']
                   for part in (images[:4], images[2:]))
  whole = np.concatenate([first, second])
  np.testing.assert_allclose(batched, whole[[0, 1, 2, 3, 6, 7]], atol=1e-5)
  assert model.embed_arrays([], batch_size=4)['embedding'].shape == (0, model.embedding_dim)


def test_missing_checkpoints_and_steps_are_clear_errors(runs, tmp_path):
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*checkpoints/ directory'):
    inference.load_run(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r'No checkpoint for step 7 .* it has \[1, 2\]'):
    inference.load_run(runs['supcon'], step=7)
  assert inference.load_run(runs['supcon'], step=1).step == 1


def test_apply_rejects_unbatched_images(runs):
  model = shared_model(runs['supcon'])
  with pytest.raises(ValueError, match='batch'):
    model.apply(np.zeros((28, 28, 3), np.float32))


CROP_ONLY_PP_EVAL = 'decode|window|central_crop(28)|value_range(-1, 1, 0, 1)|rgb'


def _with_pp_eval(model, pp_eval, **data):
  config = model.config.copy_and_resolve_references()
  config.data.pp_eval = pp_eval
  for key, value in data.items():
    config.data[key] = value
  return inference.Model(config, model.network, model.variables, model.workdir, model.step)


def test_a_large_film_is_seen_at_the_training_resolution_and_field_of_view(runs):
  """A pp_eval that crops without resizing first resizes inputs to the training images'
  size (32 px here) first: a 2000 px film is not seen through its central 28 px, and
  images of the stored size are preprocessed exactly as before."""
  model = _with_pp_eval(shared_model(runs['classifier']), CROP_ONLY_PP_EVAL)
  assert model.input_pp == ('decode|resize((32, 32))|window|central_crop(28)|'
                            'value_range(-1, 1, 0, 1)|rgb')
  rng = np.random.default_rng(5)
  stored = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
  pp_eval = transforms.Preprocess(CROP_ONLY_PP_EVAL)
  np.testing.assert_array_equal(
      model.preprocess(stored), pp_eval({'image': stored}, np.random.default_rng(0))['image'])
  film = cv2.resize(stored, (2000, 2000), interpolation=cv2.INTER_LINEAR_EXACT)
  film[:, :1000] //= 2  # The film's two halves differ; its centre alone hides that.
  seen = model.preprocess(film)
  small = transforms.Preprocess('decode|resize(32)')({'image': film}, None)['image']
  np.testing.assert_array_equal(seen, pp_eval({'image': small}, None)['image'])
  centre = pp_eval({'image': film}, None)['image']
  assert not np.allclose(seen, centre)
  assert model.embed_arrays([film])['embedding'].shape == (1, model.embedding_dim)


def test_unknown_training_size_refuses_rather_than_crop_a_small_centre(runs, tmp_path):
  model = _with_pp_eval(shared_model(runs['classifier']), CROP_ONLY_PP_EVAL,
                        data_dir=str(tmp_path / 'gone'))
  with pytest.raises(ValueError, match=r"does not resize before it crops.*small central "
                     r"crop.*unknown: its training data .* cannot be opened .*gone"):
    model.embed_arrays([np.zeros((2000, 2000), np.uint16)])
  # A pp_eval that resizes first needs nothing of the training data.
  resizing = _with_pp_eval(shared_model(runs['classifier']), CLASSIFIER_PP_EVAL,
                           data_dir=str(tmp_path / 'gone'))
  assert resizing.input_pp == CLASSIFIER_PP_EVAL
  assert inference.resizes_first('decode|resize_small(32)|central_crop(28)')
  assert not inference.resizes_first('decode|window|central_crop(28)|resize(28)')
  assert not inference.resizes_first('decode|value_range(-1, 1)|rgb')
