"""Zero-shot scores of an image-text run on a labelled dataset, and their evaluation.

  python -m cxr_jax.zero_shot --workdir runs/image_text \\
      --data synthetic_cxr/site_b:test --data_dir ~/tensorflow_datasets --output_dir runs/zs

writes OUTPUT_DIR/zero_shot_scores.npz ('scores' float32 [N, K], 'labels' int8 label
codes [N, K], 'findings', 'id' and the metadata arrays) and the evaluation files of
`cxr_jax.eval.evaluate.evaluate_predictions` (name 'zero_shot'). Prompts and scoring
are `cxr_jax.eval.zero_shot`'s.

The run is loaded with `inference.load_run`, so prompts and images are encoded as the
embedding tool and SavedModel exports encode them: texts by `Model.embed_texts`,
images (preprocessed with the run's `pp_eval`) by the Model's forward pass.
"""

import json
import os
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from cxr_jax import cli
from cxr_jax import inference
from cxr_jax.data import labels as labels_lib
from cxr_jax.data import pipeline
from cxr_jax.eval import zero_shot as zero_shot_lib

FLAGS = flags.FlagValues()
flags.DEFINE_string('workdir', None, 'An image-text run.', flag_values=FLAGS)
flags.DEFINE_string('data', '', 'NAME:SPLIT to score; "" = the run\'s dataset, test split.',
                    flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: the run\'s).',
                    flag_values=FLAGS)
flags.DEFINE_list('findings', [], 'Findings to score (default: all of the dataset\'s).',
                  flag_values=FLAGS)
flags.DEFINE_string('prompts', '', 'Prompts JSON (default: the synthetic_cxr prompts).',
                    flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 64, 'Images per forward pass.', flag_values=FLAGS)
flags.DEFINE_string('output_dir', None, 'Where scores and evaluation files go.',
                    flag_values=FLAGS)


def zero_shot_from_workdir(workdir: str, *, data: str = '', split: str = 'test',
                           data_dir: Optional[str] = None, findings: Sequence[str] = (),
                           prompts: Optional[zero_shot_lib.Prompts] = None, batch_size: int = 64,
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
  positive, negative = zero_shot_lib.prompt_embeddings(model, findings, prompts)

  # Raw label codes (no label policy) and the string features, in stored order. The
  # loader preprocesses with the run's pp_eval, as `Model.preprocess` does; the images
  # then go through the Model's forward pass, the one embedding and export use.
  loader = pipeline.make_pipeline(source, pp=model.pp_eval, batch_size=batch_size,
                                  seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                                  process_index=0, process_count=1, keep_text=True)
  columns = [all_findings.index(f) for f in findings]
  parts = {'embedding': [], 'labels': [], 'id': []}
  parts.update({key: [] for key in labels_lib.METADATA_KEYS})
  for batch in loader:
    # Padded to batch_size, so that the last, partial batch reuses the compiled function.
    parts['embedding'].append(inference.in_padded_batches(
        lambda images: model.apply(images)['image_embedding'], batch['image'], batch_size,
        model.joint_embedding_dim))
    parts['labels'].append(np.asarray(batch['labels'], np.int8)[:, columns])
    parts['id'].append(batch['image_id'])
    for key in labels_lib.METADATA_KEYS:
      parts[key].append(batch[key])
  if not parts['embedding']:
    raise ValueError(f'{data or config.data.name}:{split} has no images.')
  out = {k: np.concatenate(v) for k, v in parts.items()}
  embedding = out.pop('embedding')
  for key in ('id', *labels_lib.METADATA_KEYS):
    if out[key].dtype.kind in 'SO':
      out[key] = np.array([v.decode('utf-8') if isinstance(v, bytes) else str(v)
                           for v in out[key]])
  out['scores'] = zero_shot_lib.zero_shot_scores(embedding, positive, negative, model.logit_scale)
  out['findings'] = np.array(findings)
  return out


def main(argv: Sequence[str]) -> dict:
  cli.parse(FLAGS, argv)
  missing = [f'--{n}' for n in ('workdir', 'output_dir') if not FLAGS[n].value]
  if missing:
    raise app.UsageError(f'{" and ".join(missing)} required.')
  data, split = '', 'test'
  if FLAGS.data:
    data, _, split = FLAGS.data.rpartition(':')
    if not data or not split:
      raise app.UsageError(f'--data {FLAGS.data!r}: expected NAME:SPLIT.')
  result = zero_shot_from_workdir(
      FLAGS.workdir, data=data, split=split, data_dir=FLAGS.data_dir, findings=FLAGS.findings,
      prompts=zero_shot_lib.load_prompts(FLAGS.prompts) if FLAGS.prompts else None,
      batch_size=FLAGS.batch_size)
  from cxr_jax.eval import evaluate  # pylint: disable=g-import-not-at-top  matplotlib: only here.
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  np.savez(os.path.join(FLAGS.output_dir, 'zero_shot_scores.npz'), **result)
  summary = evaluate.evaluate_predictions(
      result['labels'], None, result['scores'], list(result['findings']),
      output_dir=FLAGS.output_dir, patient_ids=result['patient_id'],
      metadata={k: result[k] for k in ('sex', 'age', 'view', 'site')}, name='zero_shot')
  print(json.dumps({'mean_auroc': summary['mean_auroc'], 'num_cases': summary['num_cases'],
                    'output_dir': FLAGS.output_dir}))
  return summary


if __name__ == '__main__':
  cli.run(main, FLAGS, __doc__)
