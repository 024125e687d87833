"""A trained run, loaded for inference: its network, weights and evaluation preprocessing.

`load_run(workdir)` reads a checkpoint (`train.checkpointing.read_checkpoint`) and
rebuilds the network from the config saved with it (`train.trainer.build_network`, the
stage's builder in `cxr_jax.models`),
so nothing but the workdir is needed. The returned `Model` preprocesses raw images
with the run's deterministic `config.data.pp_eval` (the NumPy ops of
`data.transforms`, exactly as evaluation sees them) and applies the network in
inference mode under `jax.jit`:

    model = inference.load_run('runs/probe')
    out = model.embed_arrays([image_a, image_b])   # raw uint8/uint16/float images
    out['embedding']   # float32 [2, D]; out['logits'] float32 [2, K] for classifiers

Only linear and MLP heads are classifiers (`has_logits`); the projection head of a
SupCon/SimCLR run is a training device, not an output, so such a run yields
embeddings only.

An image-text run (`config.trainer == 'image_text'`, `has_text`) has two towers that
meet in one joint space. Its images give, besides the backbone's `embedding`, the
L2-normalised projected `image_embedding` the contrastive loss and zero-shot scoring
use; its texts give `text_embedding` in the same space:

    model.embed_texts(['No pleural effusion.'])   # float32 [1, E], unit length
    model.logit_scale                             # the learnt 1 / temperature

Texts are encoded as given (as zero-shot prompts are), with the run's tokenizer file
(`config.text.tokenizer`) and `config.text.max_len`; longer texts are cut, with a
warning. Report sections are not selected: pass the part of a report you mean.

This module never imports TensorFlow: it is the embedding tool's path for training
workdirs, and the reference that SavedModel exports are checked against.
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax.data import pipeline
from cxr_jax.data import transforms
from cxr_jax.models import heads
from cxr_jax.models import image_text as image_text_models
from cxr_jax.text import tokenizer as tokenizer_lib
from cxr_jax.train import checkpointing
from cxr_jax.train import trainer


@dataclasses.dataclass
class Model:
  """A trained network in inference mode, with the run's evaluation preprocessing.

  Attributes:
    config: the run's config, as saved with the checkpoint.
    network: the backbone+head `heads.Network` the run trained.
    variables: {'params': ..., **model_state}, put on the default device once and
      applied with train=False.
    workdir: the run's directory, and `step` the checkpoint's step.
  """
  config: ml_collections.ConfigDict
  network: heads.Network
  variables: Dict[str, Any]
  workdir: str = ''
  step: int = -1

  def __post_init__(self):
    # pp_eval is checked now; what raw inputs go through (`input_pp`) is settled on first
    # use, since it may need the training data's image size.
    self._pp = transforms.Preprocess(self.pp_eval)
    if self._pp.num_views != 1:
      raise ValueError(f'config.data.pp_eval={self.pp_eval!r} makes two views; evaluation '
                       'preprocessing must give one image.')
    if self.has_logits and self.findings and len(self.findings) != self.num_classes:
      raise ValueError(f'Run {self.workdir or "(in memory)"}: config.data.findings has '
                       f'{len(self.findings)} names {list(self.findings)}, but the classifier '
                       f'has head.num_classes={self.num_classes} outputs.')
    self.variables = jax.device_put(self.variables)
    # One compiled function per input shape; variables are an argument, not constants.
    self._forward = jax.jit(functools.partial(forward, self.network, self.has_logits,
                                              joint=self.has_text))
    self._text_forward = jax.jit(functools.partial(text_forward, self.network))

  @property
  def pp_eval(self) -> str:
    return self.config.data.pp_eval

  @functools.cached_property
  def input_pp(self) -> str:
    """The preprocessing raw inputs go through: pp_eval, resized first when it must be.

    A pp_eval that crops (or uses the whole image) before any resize gives the network
    the field of view and resolution it was trained on only for inputs of the training
    images' size: through `central_crop(28)` a 2000 px film would be seen as its tiny
    centre. Such a pp_eval gets `resize((H, W))` to the training images' size after
    `decode` (a no-op for inputs of that size, so evaluation is unchanged). When that
    size cannot be known, embedding refuses with the reason rather than guess.
    """
    if resizes_first(self.pp_eval):
      return self.pp_eval
    size, reason = training_image_size(self.config)
    if size is None:
      raise ValueError(
          f'Run {self.workdir or "(in memory)"}: its pp_eval {self.pp_eval!r} does not resize '
          'before it crops (or uses the whole image), so what the network sees depends on '
          'the size of the input; an input larger than the training images would be seen '
          'through a small central crop. The training images\' size is needed to resize '
          f'inputs to it first, and it is unknown: {reason}. Make the training data '
          'available at config.data.data_dir, or give pp_eval a resize (e.g. '
          "'decode|resize(H)|...') and re-export.")
    ops = [op.strip() for op in self.pp_eval.split('|')]
    at = 1 if ops and ops[0].startswith('decode') else 0
    return '|'.join(ops[:at] + [f'resize(({size[0]}, {size[1]}))'] + ops[at:])

  @functools.cached_property
  def _input_preprocess(self) -> transforms.Preprocess:
    return transforms.Preprocess(self.input_pp)

  @property
  def model_name(self) -> str:
    return self.config.model_name

  @property
  def has_logits(self) -> bool:
    return heads.is_classifier(self.network)

  @property
  def has_text(self) -> bool:
    """Whether the run is image-text: a text tower and a joint image-text space."""
    return isinstance(self.network, image_text_models.ImageTextNetwork)

  @property
  def num_classes(self) -> int:
    return int(self.network.head.num_classes) if self.has_logits else 0

  @property
  def findings(self) -> Tuple[str, ...]:
    """Names of the classifier's outputs (CXR runs), in output order; () when unknown."""
    return tuple(self.config.data.get('findings', ()) or ())

  @functools.cached_property
  def embedding_dim(self) -> int:
    size = self.config.get('init_image_size', 64)
    shapes = jax.eval_shape(
        lambda v, x: forward(self.network, False, v, x), self.variables,
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return int(shapes['embedding'].shape[-1])

  def _require_text(self) -> None:
    if not self.has_text:
      raise ValueError(
          f'Run {self.workdir or "(in memory)"} (trainer {self.config.trainer!r}) is not an '
          'image-text run: it has no text tower, so it cannot embed texts. Text embeddings '
          "come from runs of the 'image_text' trainer.")

  @functools.cached_property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The tokenizer the run was trained with (`config.text.tokenizer`)."""
    self._require_text()
    return tokenizer_lib.load_cached(self.config.text.tokenizer)

  @property
  def text_max_len(self) -> int:
    self._require_text()
    return int(self.config.text.max_len)

  @functools.cached_property
  def joint_embedding_dim(self) -> int:
    """Size E of the joint space of `image_embedding` and `text_embedding`."""
    self._require_text()
    return int(self.network.embed_dim)

  @functools.cached_property
  def logit_scale(self) -> float:
    """s = 1 / temperature, as zero-shot scoring (`eval.zero_shot`) scales cosines."""
    self._require_text()
    return float(jax.jit(lambda v: self.network.apply(v, method='logit_scale'))(
        self.variables))

  def embed_texts(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Texts -> float32 [N, E] L2-normalised text embeddings in the joint space.

    Raises ValueError when the run has no text tower or a text is empty.
    """
    self._require_text()
    tokens = tokenize_texts(self.tokenizer, texts, self.text_max_len)
    return in_padded_batches(
        lambda batch: np.asarray(self._text_forward(self.variables, batch)['text_embedding']),
        tokens, batch_size, self.joint_embedding_dim)

  def preprocess(self, image) -> np.ndarray:
    """One raw image -> the float32 [H, W, C] array the network sees.

    `image`: a 2-D or [H, W, 1] uint8/uint16 array, a float32 array in [0, 1], or
    encoded PNG/JPEG bytes, as the run's `pp_eval` (which starts with `decode`) takes;
    of any size (see `input_pp`).
    The ops are deterministic, so the generator passed to them is never drawn from.
    """
    out = self._input_preprocess({'image': image}, np.random.default_rng(0))['image']
    return np.asarray(out, np.float32)

  def apply(self, images) -> Dict[str, np.ndarray]:
    """Preprocessed images [B, H, W, C] -> {'embedding': [B, D], 'logits': [B, K]?}, float32."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
      raise ValueError(f'Model.apply takes a batch [B, H, W, C] of preprocessed images; got '
                       f'shape {images.shape}. Use embed_arrays for raw images.')
    return {k: np.asarray(v) for k, v in self._forward(self.variables, images).items()}

  def embed_arrays(self, images: Sequence[Any], batch_size: int = 32) -> Dict[str, np.ndarray]:
    """Raw images (see `preprocess`) -> {'embedding': [N, D], 'logits': [N, K]?}.

    Batches are padded to `batch_size` so every batch reuses one compiled function;
    the padding rows are dropped (each image's outputs depend on that image alone).
    """
    if batch_size < 1:
      raise ValueError(f'batch_size must be positive, got {batch_size}')
    outputs = []
    for start in range(0, len(images), batch_size):
      batch = [self.preprocess(image) for image in images[start:start + batch_size]]
      shapes = {b.shape for b in batch}
      if len(shapes) > 1:
        raise ValueError(f'pp_eval={self.pp_eval!r} gives images of different sizes '
                         f'{sorted(shapes)}; end it with a fixed-size op (resize or '
                         'central_crop) to batch them.')
      padded = pad_rows(np.stack(batch), batch_size)
      outputs.append({k: v[:len(batch)] for k, v in self.apply(padded).items()})
    if not outputs:
      empty = {'embedding': np.zeros((0, self.embedding_dim), np.float32)}
      if self.has_logits:
        empty['logits'] = np.zeros((0, self.num_classes), np.float32)
      if self.has_text:
        empty['image_embedding'] = np.zeros((0, self.joint_embedding_dim), np.float32)
      return empty
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


_RESIZES = ('resize', 'resize_small')
# Ops whose output depends on the input's size: before any of these, a resize must come.
_SIZE_DEPENDENT = ('central_crop', 'random_crop', 'inception_crop')


def resizes_first(pp: str) -> bool:
  """Whether `pp` resizes before anything that depends on the input's size."""
  for name, _, _ in (transforms.parse(pp) if pp.strip() else []):
    if name in _RESIZES:
      return True
    if name in _SIZE_DEPENDENT:
      return False
  return False  # No resize at all: the network sees the input at its own size.


_SIZE_SAMPLES = 32


def training_image_size(config) -> Tuple[Optional[Tuple[int, int]], str]:
  """((height, width) of the images the run trained on, '') or (None, why not).

  Read from up to 32 records spread over the training split (config.data.name, split
  and data_dir), as stored; a split whose images differ in size has no single size.
  """
  name, split = config.data.get('name', ''), config.data.get('split', 'train')
  if not name:
    return None, 'the run names no dataset (config.data.name is empty)'
  try:
    source, _ = pipeline.open_source(name, split, config.data.get('data_dir') or None)
  except (OSError, ValueError) as e:
    return None, f'its training data {name}:{split} cannot be opened ({e})'
  count = len(source)
  if not count:
    return None, f'its training data {name}:{split} is empty'
  sizes = {}
  for index in sorted({i * count // _SIZE_SAMPLES for i in range(min(count, _SIZE_SAMPLES))}):
    image = transforms.Preprocess('decode')({'image': source[index]['image']},
                                            np.random.default_rng(0))['image']
    sizes.setdefault(tuple(int(d) for d in image.shape[:2]), index)
  if len(sizes) > 1:
    shown = ', '.join(f'{h}x{w} (record {i})' for (h, w), i in list(sizes.items())[:3])
    return None, f'its training images in {name}:{split} differ in size ({shown})'
  return next(iter(sizes)), ''


def forward(network, has_logits: bool, variables, images, joint: bool = False
            ) -> Dict[str, jax.Array]:
  """{'embedding': [B, D], 'logits': [B, K]?, 'image_embedding': [B, E]?}, float32.

  In inference mode. `has_logits`: the head is a classifier; `joint`: the network is
  image-text and its projected, L2-normalised image embedding is wanted too.
  """
  output, aux = network.apply(variables, images, train=False)
  result = {'embedding': aux['embedding'].astype(jnp.float32)}
  if has_logits:
    result['logits'] = output.astype(jnp.float32)
  if joint:
    result['image_embedding'] = output['image'].astype(jnp.float32)
  return result


def text_forward(network, variables, tokens) -> Dict[str, jax.Array]:
  """{'text_embedding': float32 [B, E]}: an image-text network's projected, L2-normalised
  embedding of token ids int [B, L] (from `tokenize_texts`)."""
  return {'text_embedding': network.apply(variables, tokens, method='encode_text').astype(
      jnp.float32)}


def tokenize_texts(tokenizer: tokenizer_lib.Tokenizer, texts: Sequence[str],
                   max_len: int) -> np.ndarray:
  """int32 [N, max_len] token ids of `texts`, checked: each a non-blank str.

  A text longer than max_len - 2 subwords is cut, as in training; a warning counts
  such texts.
  """
  if isinstance(texts, (str, bytes)):
    raise TypeError('Pass a sequence of texts; wrap a single text in a list.')
  texts = list(texts)
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f'Text {index} is a {type(text).__name__}, not a str: {text!r}.')
    if not text.strip():
      raise ValueError(f'Text {index} is empty; an empty text has no meaningful embedding.')
  cut = sum(len(tokenizer.token_ids(text)) > max_len - 2 for text in texts)
  if cut:
    warnings.warn(f'{cut} of {len(texts)} texts are longer than the {max_len - 2} subwords '
                  f'(max_len={max_len}) the text tower reads; they were cut.')
  return tokenizer.encode(texts, max_len)


def in_padded_batches(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray,
                      batch_size: int, output_dim: int) -> np.ndarray:
  """fn over `inputs` [N, ...] in batches zero-padded to `batch_size` rows -> [N, output_dim].

  One batch shape means one compilation; the padding rows' outputs are dropped (each
  row's output depends on that row alone).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  outputs = [np.zeros((0, output_dim), np.float32)]
  for start in range(0, len(inputs), batch_size):
    batch = inputs[start:start + batch_size]
    outputs.append(np.asarray(fn(pad_rows(batch, batch_size)), np.float32)[:len(batch)])
  return np.concatenate(outputs)


def pad_rows(batch: np.ndarray, size: int) -> np.ndarray:
  """`batch` [n, ...] with zero rows appended up to `size` rows (one compiled shape)."""
  return np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])


def load_run(workdir: str, step: Optional[int] = None, best: bool = False) -> Model:
  """The run in `workdir` at checkpoint `step` (default: the latest; `best`: the best).

  Raises FileNotFoundError naming the workdir when it has no checkpoint, or the
  step and the steps it has when `step` is not among them.
  """
  state, config, step = checkpointing.read_checkpoint(workdir, step=step, best=best)
  network = trainer.build_network(config)
  variables = {'params': state['params'], **state.get('model_state', {})}
  return Model(config=config, network=network, variables=variables, workdir=workdir,
               step=int(step))
