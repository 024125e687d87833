"""Zero-shot classification of findings from text prompts, with an image-text network.

For each finding a positive prompt ("There is a pleural effusion.") and a negative one
("No pleural effusion.") are encoded by the text tower; an image's score is the softmax
over its two similarities, scaled by the network's learnt logit scale s:

  score = exp(s cos(image, positive)) / (exp(s cos(image, positive)) + exp(s cos(image, negative)))

i.e. a probability in (0, 1) that the evaluation suite's AUROC, calibration and
subgroup tables take as they are. A prompt may be several phrasings: their normalised
embeddings are averaged and renormalised (CLIP's prompt ensembling). The defaults
speak the language of the synthetic reports; other datasets pass their own prompts
(a dict, or a JSON file `{"finding": {"positive": [...], "negative": [...]}}`).

Scoring a trained run's checkpoint on a dataset, and the command line, are the tool
`cxr_jax/zero_shot.py` (it loads runs, a layer above this package):

  python -m cxr_jax.zero_shot --workdir runs/image_text \\
      --data synthetic_cxr/site_b:test --data_dir ~/tensorflow_datasets --output_dir runs/zs

(`python -m cxr_jax.eval.zero_shot ...`, the command's earlier name, runs the same.)
"""

import json
import runpy
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Phrases = Union[str, Sequence[str]]
Prompts = Mapping[str, Tuple[Phrases, Phrases]]

# (positive, negative) phrasings per synthetic_cxr finding, in its reports' words.
DEFAULT_PROMPTS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    'airspace_opacity': (('Patchy airspace opacity.', 'Airspace opacity in the lung.'),
                         ('No focal airspace opacity.', 'Lungs are clear.')),
    'atelectasis': (('Linear atelectasis at the base.', 'Plate-like atelectasis.'),
                    ('No atelectasis.',)),
    'cardiomegaly': (('The heart is enlarged, in keeping with cardiomegaly.', 'Cardiomegaly.'),
                     ('No cardiomegaly.', 'Heart size is normal.')),
    'nodule': (('A nodule in the lung.', 'Rounded pulmonary nodule.'),
               ('No pulmonary nodule.', 'No suspicious nodule is seen.')),
    'pleural_effusion': (('Small left pleural effusion.', 'Moderate right pleural effusion.',
                          'Pleural effusion.'),
                         ('No pleural effusion.', 'No effusion.')),
    'pneumothorax': (('Small right apical pneumothorax.', 'Large left pneumothorax.',
                      'Pneumothorax.'),
                     ('No pneumothorax.',)),
    'tuberculosis': (('Upper lobe opacities consistent with tuberculosis.',
                      'Fibronodular change typical of tuberculosis.'),
                     ('No radiographic evidence of tuberculosis.',)),
}


def _phrases(value: Phrases, finding: str, side: str) -> Tuple[str, ...]:
  phrases = (value,) if isinstance(value, str) else tuple(value)
  if not phrases or not all(isinstance(p, str) and p.strip() for p in phrases):
    raise ValueError(f'Zero-shot prompt for {finding!r}: the {side} prompt must be a '
                     f'non-empty text or list of texts, got {value!r}.')
  return phrases


def prompt_embeddings(model, findings: Sequence[str], prompts: Optional[Prompts] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """(positive, negative) float32 [K, E]: each finding's prompts in the joint space.

  `model`: an image-text `inference.Model`, or anything else whose `embed_texts(texts)`
  gives unit-length [N, E] rows (`embed.SavedModelEmbedder` of an exported run).
  """
  prompts = DEFAULT_PROMPTS if prompts is None else prompts
  missing = [f for f in findings if f not in prompts]
  if missing:
    raise ValueError(f'No zero-shot prompts for {missing}; prompts exist for '
                     f'{sorted(prompts)}. Pass prompts for them (or choose findings).')
  groups = [_phrases(prompts[f][index], f, side) for index, side in
            enumerate(('positive', 'negative')) for f in findings]
  encoded = model.embed_texts([p for group in groups for p in group])
  bounds = np.cumsum([0] + [len(group) for group in groups])
  mean = np.stack([encoded[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
  mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
  return mean[:len(findings)], mean[len(findings):]


def zero_shot_scores(image_embeddings, positive, negative, logit_scale) -> np.ndarray:
  """float32 [N, K]: softmax over (positive, negative) of s * cosine, per finding.

  Args:
    image_embeddings: [N, E] (normalised here).
    positive, negative: [K, E] prompt embeddings (normalised here).
    logit_scale: s, the network's learnt 1 / temperature.
  """
  image = np.asarray(image_embeddings, np.float64)
  positive, negative = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
  if (image.ndim != 2 or positive.ndim != 2 or positive.shape != negative.shape
      or positive.shape[1] != image.shape[1]):
    raise ValueError(f'zero_shot_scores: images [N, E] and prompts [K, E] of one E expected; '
                     f'got {image.shape}, {positive.shape}, {negative.shape}.')
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  image, positive, negative = unit(image), unit(positive), unit(negative)
  margin = float(logit_scale) * (image @ positive.T - image @ negative.T)
  # The two-way softmax is the logistic function of the difference of its logits.
  return (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)


def load_prompts(path: str) -> Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]]:
  """A prompts JSON file: {"finding": {"positive": [...], "negative": [...]}}."""
  with open(path) as f:
    content = json.load(f)
  prompts = {}
  for finding, entry in (content.items() if isinstance(content, dict) else ()):
    if not isinstance(entry, dict) or set(entry) != {'positive', 'negative'}:
      raise ValueError(f'{path}: the entry for {finding!r} must be {{"positive": ..., '
                       f'"negative": ...}}, got {entry!r}.')
    prompts[finding] = (_phrases(entry['positive'], finding, 'positive'),
                        _phrases(entry['negative'], finding, 'negative'))
  if not prompts:
    raise ValueError(f'{path}: expected {{"finding": {{"positive": [...], "negative": '
                     '[...]}}, ...}.')
  return prompts


if __name__ == '__main__':
  # The command's earlier name: run the tool, which lives above eval (it loads runs).
  runpy.run_module('cxr_jax.zero_shot', run_name='__main__', alter_sys=True)
