"""A trained run, loaded for inference: its network, weights and evaluation preprocessing.

`load_run(workdir)` reads a checkpoint (`train.checkpointing.read_checkpoint`) and
rebuilds the network from the config saved with it (`train.trainer.build_network`),
so nothing but the workdir is needed. The returned `Model` preprocesses raw images
with the run's deterministic `config.data.pp_eval` (the NumPy ops of
`data.transforms`, exactly as evaluation sees them) and applies the network in
inference mode under `jax.jit`:

    model = inference.load_run('runs/probe')
    out = model.embed_arrays([image_a, image_b])   # raw uint8/uint16/float images
    out['embedding']   # float32 [2, D]; out['logits'] float32 [2, K] for classifiers

Only linear and MLP heads are classifiers (`has_logits`); the projection head of a
SupCon/SimCLR run is a training device, not an output, so such a run yields
embeddings only. This module never imports TensorFlow: it is the embedding tool's
path for training workdirs, and the reference that SavedModel exports are checked
against.
"""

import dataclasses
import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax.data import transforms
from cxr_jax.models import heads


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
    self._forward = jax.jit(functools.partial(forward, self.network, self.has_logits))

  @property
  def pp_eval(self) -> str:
    return self.config.data.pp_eval

  @property
  def model_name(self) -> str:
    return self.config.model_name

  @property
  def has_logits(self) -> bool:
    return isinstance(self.network.head, (heads.LinearHead, heads.MLPHead))

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

  def preprocess(self, image) -> np.ndarray:
    """One raw image -> the float32 [H, W, C] array the network sees.

    `image`: a 2-D or [H, W, 1] uint8/uint16 array, a float32 array in [0, 1], or
    encoded PNG/JPEG bytes, as the run's `pp_eval` (which starts with `decode`) takes.
    The ops are deterministic, so the generator passed to them is never drawn from.
    """
    out = self._pp({'image': image}, np.random.default_rng(0))['image']
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
      stacked = np.stack(batch)
      padded = np.concatenate([stacked, np.zeros(
          (batch_size - len(batch),) + stacked.shape[1:], np.float32)])
      outputs.append({k: v[:len(batch)] for k, v in self.apply(padded).items()})
    if not outputs:
      empty = {'embedding': np.zeros((0, self.embedding_dim), np.float32)}
      if self.has_logits:
        empty['logits'] = np.zeros((0, self.num_classes), np.float32)
      return empty
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def forward(network, has_logits: bool, variables, images) -> Dict[str, jax.Array]:
  """{'embedding': [B, D], 'logits': [B, K] when `has_logits`}, float32, in inference mode."""
  output, aux = network.apply(variables, images, train=False)
  result = {'embedding': aux['embedding'].astype(jnp.float32)}
  if has_logits:
    result['logits'] = output.astype(jnp.float32)
  return result


def load_run(workdir: str, step: Optional[int] = None, best: bool = False) -> Model:
  """The run in `workdir` at checkpoint `step` (default: the latest; `best`: the best).

  Raises FileNotFoundError naming the workdir when it has no checkpoint, or the
  step and the steps it has when `step` is not among them.
  """
  # Imported here: the cxr_jax.train package imports trainers that build on this module.
  from cxr_jax.train import checkpointing  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  state, config, step = checkpointing.read_checkpoint(workdir, step=step, best=best)
  network = trainer.build_network(config)
  variables = {'params': state['params'], **state.get('model_state', {})}
  return Model(config=config, network=network, variables=variables, workdir=workdir,
               step=int(step))
