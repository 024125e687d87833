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

  python -m cxr_jax.eval.zero_shot --workdir runs/image_text \\
      --data synthetic_cxr/site_b:test --data_dir ~/tensorflow_datasets --output_dir runs/zs

writes OUTPUT_DIR/zero_shot_scores.npz ('scores' float32 [N, K], 'labels' int8 label
codes [N, K], 'findings', 'id' and the metadata arrays) and the evaluation files of
`cxr_jax.eval.evaluate.evaluate_predictions` (name 'zero_shot').

The run is loaded with `inference.load_run`, so prompts and images are encoded as the
embedding tool and SavedModel exports encode them: texts by `Model.embed_texts`,
images (preprocessed with the run's `pp_eval`) by the Model's forward pass.
"""

import json
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from absl import app
from absl import flags
import numpy as np

from cxr_jax import inference
from cxr_jax.data import pipeline

FLAGS = flags.FLAGS

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
METADATA_KEYS = ('patient_id', 'study_id', 'sex', 'age', 'view', 'site')


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


def zero_shot_from_workdir(workdir: str, *, data: str = '', split: str = 'test',
                           data_dir: Optional[str] = None, findings: Sequence[str] = (),
                           prompts: Optional[Prompts] = None, batch_size: int = 64,
                           step: Optional[int] = None) -> dict:
  """Zero-shot scores of an image-text run's checkpoint on a labelled dataset split.

  Images go through the run's deterministic `config.data.pp_eval`. `data` '' means the
  run's own dataset; findings () all of the dataset's findings.

  Returns:
    {'scores' float32 [N, K], 'labels' int8 codes [N, K], 'findings' [K], 'id' [N],
     and the metadata arrays (patient_id, study_id, sex, age, view, site)}.
  """
  model = inference.load_run(workdir, step=step)
  if not model.has_text:
    raise ValueError(f'{workdir} (trainer {model.config.trainer!r}) is not an image-text '
                     'run; zero-shot scoring needs its text tower.')
  config = model.config
  if data_dir is None:
    data_dir = config.data.get('data_dir')
  source, info = pipeline.open_source(data or config.data.name, split, data_dir)
  all_findings = list(pipeline.findings_of(info))
  findings = list(findings) or all_findings
  unknown = [f for f in findings if f not in all_findings]
  if unknown:
    raise ValueError(f'Findings {unknown} are not in {data or config.data.name}; it has '
                     f'{all_findings}.')
  positive, negative = prompt_embeddings(model, findings, prompts)

  # Raw label codes (no label policy) and the string features, in stored order. The
  # loader preprocesses with the run's pp_eval, as `Model.preprocess` does; the images
  # then go through the Model's forward pass, the one embedding and export use.
  loader = pipeline.make_pipeline(source, pp=model.pp_eval, batch_size=batch_size,
                                  seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                                  process_index=0, process_count=1, keep_text=True)
  columns = [all_findings.index(f) for f in findings]
  parts = {'embedding': [], 'labels': [], 'id': []}
  parts.update({key: [] for key in METADATA_KEYS})
  for batch in loader:
    # Padded to batch_size, so that the last, partial batch reuses the compiled function.
    parts['embedding'].append(inference.in_padded_batches(
        lambda images: model.apply(images)['image_embedding'], batch['image'], batch_size,
        model.joint_embedding_dim))
    parts['labels'].append(np.asarray(batch['labels'], np.int8)[:, columns])
    parts['id'].append(batch['image_id'])
    for key in METADATA_KEYS:
      parts[key].append(batch[key])
  if not parts['embedding']:
    raise ValueError(f'{data or config.data.name}:{split} has no images.')
  out = {k: np.concatenate(v) for k, v in parts.items()}
  embedding = out.pop('embedding')
  for key in ('id', *METADATA_KEYS):
    if out[key].dtype.kind in 'SO':
      out[key] = np.array([v.decode('utf-8') if isinstance(v, bytes) else str(v)
                           for v in out[key]])
  out['scores'] = zero_shot_scores(embedding, positive, negative, model.logit_scale)
  out['findings'] = np.array(findings)
  return out


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  from cxr_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
  data, split = '', 'test'
  if FLAGS.data:
    data, _, split = FLAGS.data.rpartition(':')
    if not data or not split:
      raise app.UsageError(f'--data {FLAGS.data!r}: expected NAME:SPLIT.')
  result = zero_shot_from_workdir(
      FLAGS.workdir, data=data, split=split, data_dir=FLAGS.data_dir, findings=FLAGS.findings,
      prompts=load_prompts(FLAGS.prompts) if FLAGS.prompts else None,
      batch_size=FLAGS.batch_size)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  np.savez(os.path.join(FLAGS.output_dir, 'zero_shot_scores.npz'), **result)
  summary = evaluate.evaluate_predictions(
      result['labels'], None, result['scores'], list(result['findings']),
      output_dir=FLAGS.output_dir, patient_ids=result['patient_id'],
      metadata={k: result[k] for k in ('sex', 'age', 'view', 'site')}, name='zero_shot')
  print(json.dumps({'mean_auroc': summary['mean_auroc'], 'num_cases': summary['num_cases'],
                    'output_dir': FLAGS.output_dir}))


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'An image-text run.', required=True)
  flags.DEFINE_string('data', '', 'NAME:SPLIT to score; "" = the run\'s dataset, test split.')
  flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: the run\'s).')
  flags.DEFINE_list('findings', [], 'Findings to score (default: all of the dataset\'s).')
  flags.DEFINE_string('prompts', '', 'Prompts JSON (default: the synthetic_cxr prompts).')
  flags.DEFINE_integer('batch_size', 64, 'Images per forward pass.')
  flags.DEFINE_string('output_dir', None, 'Where scores and evaluation files go.',
                      required=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
