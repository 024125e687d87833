"""Image-text pretraining: the loss against NumPy, the network's layout, the data path,
initialisation from earlier runs, the recipes, and the same loss on 1 and 8 devices."""

import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import models
from cxr_jax.data import pipeline
from cxr_jax.data import synthetic
from cxr_jax.data import transforms
from cxr_jax.data.builders import synthetic as synthetic_builders
from cxr_jax.models import heads
from cxr_jax.models import image_text as image_text_models
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train import checkpointing
from cxr_jax.train import config_lib
from cxr_jax.train import image_text
from cxr_jax.train import sharding
from cxr_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def numpy_infonce(images, texts, scale, tokens):
  """Symmetric InfoNCE written out directly; identical token rows are positives."""
  images = images / np.linalg.norm(images, axis=1, keepdims=True)
  texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
  logits = scale * images.astype(np.float64) @ texts.T.astype(np.float64)
  positives = np.array([[np.array_equal(a, b) for b in tokens] for a in tokens], np.float64)
  targets = positives / positives.sum(axis=1, keepdims=True)

  def cross_entropy(rows):
    shifted = rows - rows.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -(targets * log_probs).sum(axis=1).mean()

  accuracy_i2t = np.mean([positives[i, np.argmax(logits[i])] for i in range(len(tokens))])
  accuracy_t2i = np.mean([positives[np.argmax(logits[:, j]), j] for j in range(len(tokens))])
  return (cross_entropy(logits) + cross_entropy(logits.T)) / 2, accuracy_i2t, accuracy_t2i


def test_loss_matches_numpy():
  rng = np.random.default_rng(0)
  images, texts = rng.normal(size=(2, 7, 5)).astype(np.float32) * 3
  tokens = rng.integers(3, 50, size=(7, 6)).astype(np.int32)
  tokens[4], tokens[6] = tokens[1], tokens[1]  # One report shared by three images.
  texts[5] = images[5] * 2  # A pair the model already matches.
  for scale, rows in ((14.3, tokens), (1.0, tokens), (100.0, np.arange(7)[:, None])):
    loss, stats = jax.jit(image_text.image_text_loss)(images, texts, scale, rows)
    expected, i2t, t2i = numpy_infonce(images, texts, scale, rows)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(stats['image_to_text_accuracy'], i2t)
    np.testing.assert_allclose(stats['text_to_image_accuracy'], t2i)
    np.testing.assert_allclose(stats['temperature'], 1 / scale, rtol=1e-6)
  assert float(stats['duplicate_texts']) == 0
  _, stats = image_text.image_text_loss(images, texts, 1.0, tokens)
  np.testing.assert_allclose(stats['duplicate_texts'], 3 / 7)
  # Without tokens only the pair itself is positive: the CLIP loss.
  plain, _ = image_text.image_text_loss(images, texts, 5.0)
  np.testing.assert_allclose(plain, numpy_infonce(images, texts, 5.0, np.arange(7)[:, None])[0],
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r'must both be \[B, E\]'):
    image_text.image_text_loss(images, texts[:3], 1.0)


def test_same_text_is_row_equality():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 4, size=(40, 3)).astype(np.int32)  # Many chance duplicates.
  expected = (tokens[:, None, :] == tokens[None, :, :]).all(-1)
  assert 40 < expected.sum() < 1600
  np.testing.assert_array_equal(image_text.same_text(tokens), expected)


def test_temperature_is_learnt_and_clipped_at_100():
  for temperature, scale, moves in ((0.07, 1 / 0.07, True), (0.001, 100.0, False)):
    head = image_text_models.ImageTextHead(8, init_temperature=temperature)
    variables = head.init(jax.random.PRNGKey(0), method='logit_scale')
    np.testing.assert_allclose(head.apply(variables, method='logit_scale'), scale, rtol=1e-5)
    gradient = jax.grad(lambda v: head.apply(v, method='logit_scale'))(variables)
    assert (float(gradient['params']['log_logit_scale']) != 0) == moves


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('tfds'))
  synthetic_builders.prepare(synthetic_builders.make_cxr_config(
      'A', image_size=32, num_examples=40), directory)
  return directory


DATA = 'synthetic_cxr/site_a_32px_40_noise10_seed0'


@pytest.fixture(scope='module')
def tokenizer_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tokenizer.json')
  reports = [synthetic.study_metadata(i, site='A')['report'] for i in range(100)]
  tokenizer_lib.Tokenizer.train(reports, 400).save(path)
  return path


def tiny_config(tokenizer_path, **loss):
  config = image_text.add_config_fields(config_lib.base_config())
  config.trainer = 'image_text'
  config.text.tokenizer = tokenizer_path
  config.text.max_len = 16
  config.init_image_size = 32
  config.head.embed_dim = 16
  for key, value in loss.items():
    config.loss[key] = value
  return config


class SmallBackbone(nn.Module):
  """A stand-in with the zoo models' interface that compiles in moments (bit-tiny's
  forward and backward take tens of seconds to compile on a small CPU)."""

  @nn.compact
  def __call__(self, images, train=False):
    del train
    features = nn.relu(nn.Conv(8, (3, 3), strides=4, name='conv')(images))
    return None, {'embedding': features.mean(axis=(1, 2))}


def small_network(config):
  """`image_text_models.build_network(config)` with SmallBackbone as the image tower."""
  network = image_text_models.build_network(config)
  return network.clone(backbone=SmallBackbone())


@pytest.fixture(scope='module')
def small(tokenizer_path):
  config = tiny_config(tokenizer_path)
  network = small_network(config)
  return config, network, trainer.initial_variables(network, config, jax.random.PRNGKey(0))


def random_batch(size, views=0, max_len=16, seed=0):
  rng = np.random.default_rng(seed)
  shape = (size, views, 32, 32, 3) if views else (size, 32, 32, 3)
  tokens = np.zeros((size, max_len), np.int32)
  for i in range(size):
    length = rng.integers(3, max_len + 1)
    tokens[i, :length] = [1, *rng.integers(3, 300, length - 2), 2]
  tokens[size - 1] = tokens[0]  # A duplicate report, as normal studies have.
  return {'image': rng.uniform(-1, 1, shape).astype(np.float32), 'text': tokens,
          'abnormal': rng.integers(0, 2, size).astype(np.float32)}


def test_network_layout_keeps_the_backbone_of_other_stages(tokenizer_path):
  config = tiny_config(tokenizer_path)
  network = image_text_models.build_network(config)
  variables = trainer.initial_variables(network, config, jax.random.PRNGKey(0))
  params = variables['params']
  assert set(params) == {'backbone', 'text', 'head'}
  assert set(params['head']) == {'image_projection', 'text_projection', 'log_logit_scale'}
  plain = heads.Network(models.build_model(config, num_classes=None))
  plain_params = jax.eval_shape(plain.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 32, 32, 3)))['params']['backbone']
  assert jax.tree.map(jnp.shape, plain_params) == jax.tree.map(jnp.shape, params['backbone'])

  batch = random_batch(4)

  @jax.jit
  def forward(variables, images, tokens):
    # Both sides, and each side alone: embed/export call with images only, zero-shot
    # encodes prompts.
    return (network.apply(variables, images, tokens), network.apply(variables, images),
            network.apply(variables, tokens, method=image_text_models.ImageTextNetwork.encode_text))

  (outputs, aux), (image_side, image_aux), text_side = forward(
      variables, batch['image'], batch['text'])
  assert outputs['image'].shape == outputs['text'].shape == (4, 16)
  np.testing.assert_allclose(np.linalg.norm(outputs['text'], axis=1), 1, rtol=1e-5)
  np.testing.assert_allclose(outputs['logit_scale'], 1 / 0.07, rtol=1e-5)
  assert aux['embedding'].shape == (4, 1024) and aux['text_embedding'].shape == (4, 32)
  assert set(image_side) == {'image', 'logit_scale'}
  np.testing.assert_allclose(image_side['image'], outputs['image'], atol=1e-5)
  np.testing.assert_allclose(image_aux['embedding'], aux['embedding'], atol=1e-5)
  np.testing.assert_allclose(text_side, outputs['text'], atol=1e-5)
  with pytest.raises(ValueError, match='4 images but 3 reports'):
    network.apply(variables, batch['image'], batch['text'][:3])


def test_loss_fn_on_a_mesh_and_its_errors(small):
  config, network, variables = small
  variables = dict(variables)
  params = variables.pop('params')
  mesh = sharding.make_mesh()
  batch = pipeline.to_global(random_batch(4), sharding.batch_sharding(mesh))
  step = jax.jit(jax.value_and_grad(
      lambda p, b: image_text.loss_fn(network, config, p, variables, b, jax.random.PRNGKey(0)),
      has_aux=True))
  (loss, (state, metrics)), grads = step(params, batch)
  assert state == variables
  assert set(metrics) == {'image_text_loss', 'temperature', 'image_to_text_accuracy',
                          'text_to_image_accuracy', 'duplicate_texts'}
  np.testing.assert_allclose(loss, metrics['image_text_loss'])
  np.testing.assert_allclose(metrics['duplicate_texts'], 0.5)
  assert 0 < float(loss) < 10
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads['head']))
  assert np.any(np.asarray(grads['text']['token_embedding']['embedding']) != 0)

  no_text = {k: v for k, v in random_batch(4).items() if k != 'text'}
  with pytest.raises(ValueError, match=r'put tokenize\(...\) in config.data.pp'):
    image_text.loss_fn(network, config, params, variables, no_text, jax.random.PRNGKey(0))
  for key, value, message in (('image_only', 'simclr', 'needs two views per image'),
                              ('image_only', 'byol', "image_only='byol'")):
    bad = tiny_config(config.text.tokenizer, **{key: value})
    with pytest.raises(ValueError, match=message):
      image_text.loss_fn(network, bad, params, variables, random_batch(4),
                         jax.random.PRNGKey(0))


def test_tokenize_op_feeds_the_batch(data_dir, tokenizer_path):
  source, info = pipeline.open_source(DATA, 'train', data_dir)
  loader = pipeline.make_pipeline(
      source, pp=f"tokenize('{tokenizer_path}', 16)|decode|value_range(-1, 1)|rgb",
      batch_size=4, seed=0, shuffle=False, num_epochs=1, findings_all=pipeline.findings_of(info))
  batch = next(iter(loader))
  assert batch['text'].dtype == np.int32 and batch['text'].shape == (4, 16)
  assert 'report' not in batch  # Strings are dropped; the tokens stay.
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  for row, index in zip(batch['text'], range(4)):
    report = source[index]['report'].decode()
    np.testing.assert_array_equal(row, tokenizer.encode(
        [tokenizer_lib.select_sections(report, 'both')[0]], 16)[0])


def save_run(workdir, params, config, data_dir):
  """A finished run laid out as the training loop writes it (state, data position, config,
  and the record that it completed)."""
  source, _ = pipeline.open_source(DATA, 'train', data_dir)
  iterator = iter(pipeline.make_pipeline(source, pp='decode', batch_size=4, seed=0))
  state = {'step': np.int32(1), 'params': params, 'opt_state': {}, 'model_state': {},
           'rng': np.zeros(2, np.uint32)}
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), asynchronous=False)
  ckpt.save(1, state, iterator, config=config, force=True)
  ckpt.close()
  checkpointing.mark_complete(workdir, 1)


def flat(tree):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree, sep='/').items()}


def test_initialisation_from_earlier_runs(small, tmp_path, data_dir):
  config, network, variables = small
  trained = jax.tree.map(lambda x: np.asarray(x) + 0.5, variables['params'])
  save_run(str(tmp_path / 'image_text'), trained, config, data_dir)

  # Multimodal DAPT: everything continues; a newly added image-only head starts fresh.
  dapt = tiny_config(config.text.tokenizer, image_only='simclr')
  dapt.init.workdir = str(tmp_path / 'image_text')
  dapt_network = small_network(dapt)
  fresh = trainer.initial_variables(dapt_network, dapt, jax.random.PRNGKey(1))
  loaded = flat(fresh['params'])
  for path, value in flat(trained).items():
    np.testing.assert_array_equal(loaded[path], value, err_msg=path)
  assert any(path.startswith('head/image_only/') for path in loaded)

  # From an image-only stage only the backbone is taken.
  supcon = {'backbone': trained['backbone'],
            'head': {'hidden': {'kernel': np.ones((8, 4), np.float32)}}}
  save_run(str(tmp_path / 'supcon'), supcon, config, data_dir)
  config_b = tiny_config(config.text.tokenizer)
  config_b.init.workdir = str(tmp_path / 'supcon')
  from_supcon = flat(trainer.initial_variables(network, config_b, jax.random.PRNGKey(0))[
      'params'])
  original = flat(variables['params'])
  for path, value in from_supcon.items():
    expected = flat(trained)[path] if path.startswith('backbone/') else original[path]
    np.testing.assert_array_equal(value, expected, err_msg=path)

  # A different model is refused, naming the parameter.
  wider = tiny_config(config.text.tokenizer)
  wider.head.embed_dim = 24
  wider.init.workdir = str(tmp_path / 'image_text')
  with pytest.raises(ValueError, match=r'params/head/image_projection/kernel has shape '
                                       r'\(8, 16\), the model expects \(8, 24\)'):
    trainer.initial_variables(small_network(wider), wider, jax.random.PRNGKey(0))


def load_recipe(name, *args):
  return config_lib.load(':'.join((os.path.join(REPO, 'configs', name), *args)))


def test_recipes_tie_the_tokenizer_into_the_data_pipeline(tokenizer_path):
  for name, args in (('image_text_cxr.py', ()), ('image_text_cxr.py', ('simclr',)),
                     ('image_text_dapt.py', ())):
    config = load_recipe(name, *args)
    assert config.trainer == 'image_text'
    config.text.tokenizer = tokenizer_path
    assert f"tokenize('{tokenizer_path}', 96, '')" in config.data.pp
    assert ('two_views' in config.data.pp) == bool(config.loss.image_only)
    assert 'tokenize' not in config.data.pp_eval
  assert load_recipe('image_text_dapt.py').init.workdir
  # The recipe's preprocessing gives what the loss needs.
  config = load_recipe('image_text_cxr.py', 'supcon')
  config.text.tokenizer = tokenizer_path
  example = {'image': np.full((70, 70, 1), 30000, np.uint16), 'report': 'FINDINGS: x.'}
  out = transforms.Preprocess(config.data.pp)(example, np.random.default_rng(0))
  assert out['image'].shape == (2, 56, 56, 3) and out['text'].shape == (96,)


EQUIVALENCE_SCRIPT = '''
import json, sys
import flax, jax, numpy as np
sys.path.insert(0, {tests_dir!r})
from test_image_text import random_batch, tiny_config
from cxr_jax.models import image_text as image_text_models
from cxr_jax.train import image_text, sharding, trainer
assert jax.device_count() == 8
out = {{}}
for image_only in ('', 'simclr'):
  config = tiny_config({tokenizer!r}, image_only=image_only)
  # Why this size: half of bit-tiny's stages compile in half the time; the image tower
  # is per example, the devices meet in the loss over the global batch.
  config.model.truncate = 2
  network = image_text_models.build_network(config)
  variables = trainer.initial_variables(network, config, jax.random.PRNGKey(0))
  params = variables.pop('params')
  batch = random_batch(16, views=2 if image_only else 0)
  results = []
  for devices in (1, 8):
    mesh = sharding.make_mesh(num_devices=devices)
    sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    assert len(sharded['text'].sharding.device_set) == devices
    step = jax.jit(jax.value_and_grad(lambda p, b: image_text.loss_fn(
        network, config, p, variables, b, jax.random.PRNGKey(0)), has_aux=True))
    (loss, (_, metrics)), grads = step(jax.device_put(params, sharding.replicated(mesh)), sharded)
    results.append((float(loss), jax.device_get(metrics),
                    flax.traverse_util.flatten_dict(jax.device_get(grads))))
  (l1, m1, g1), (l8, m8, g8) = results
  out[image_only or 'image_text'] = {{
      'loss': abs(l1 - l8), 'loss_value': l1,
      'metrics': max(abs(float(m1[k]) - float(m8[k])) for k in m1),
      # Per parameter, relative to the largest gradient of that parameter when above 1:
      # float32 sums in another order differ by ~1e-7 of the values summed.
      'grads': max(float(np.max(np.abs(g1[k] - g8[k]) / max(1.0, np.max(np.abs(g1[k])))))
                   for k in g1),
      'grad_scale': max(float(np.max(np.abs(g1[k]))) for k in g1)}}
print(json.dumps(out))
'''


@pytest.mark.slow
def test_eight_devices_match_one(tokenizer_path):
  script = EQUIVALENCE_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)),
                                     tokenizer=tokenizer_path)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                          text=True, timeout=900, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  differences = json.loads(result.stdout.strip().splitlines()[-1])
  print(differences)
  assert set(differences) == {'image_text', 'simclr'}
  for loss, diff in differences.items():
    assert diff['loss'] <= 1e-5 and diff['metrics'] <= 1e-5, (loss, diff)
    assert diff['grads'] <= 1e-5 and diff['grad_scale'] > 1e-4, (loss, diff)
