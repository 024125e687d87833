"""Runs several recipes in order, each in its own sub-directory, each feeding the next.

A chain config has
  synthetic  datasets to generate first: name -> ConfigDict(kind='cxr'|'natural',
             args=ConfigDict of `make_cxr_config` / `make_natural_config` arguments);
  data_dir   where they are written (TFDS data directory);
  order      the stage names, in order;
  stages     name -> a complete recipe config (any trainer, `chain` excepted).

In a stage's config, a string '@NAME' stands for what NAME refers to: a synthetic
dataset's TFDS name (in `data.name`, say) or an earlier stage's workdir (in
`init.workdir`, say), and '@data_dir' for `data_dir`; '@NAME/PATH' is a file or folder in
an earlier stage's workdir (or in data_dir), e.g. '@tokenizer/tokenizer.json' for what a
`tokenizer` stage wrote. References are replaced before the config's FieldReferences are
resolved, so a field computed from a referenced one (image-text's tokenize op in data.pp
follows text.tokenizer) gets the path too. Every stage's trainer, references and config
check (train.CONFIG_CHECKS) are checked before anything runs. Each stage runs in WORKDIR/NAME with the same trainer it
would run with on its own, so re-running the chain resumes every stage where it stopped
and skips those that are done. Compiled programs are cached in WORKDIR/jax_cache unless
JAX_COMPILATION_CACHE_DIR names another place.

The `tokenizer` trainer (cxr_jax/train/tokenizer.py) trains the report tokenizer an
image-text stage reads. A stage may be any trainer in `train.TRAINERS`, studies
included (importing `cxr_jax.studies` registers them all).

Datasets are generated in a subprocess: building imports TensorFlow, which must not
share a process with training.
"""

import copy
import json
import os
import sys
from typing import Collection, Dict

from absl import logging
import jax
import ml_collections

from cxr_jax import tf_process
from cxr_jax.train.registry import CONFIG_CHECKS
from cxr_jax.train.registry import TRAINERS

_BUILD_SCRIPT = '''
import json, sys
from cxr_jax.data.builders import synthetic
specs = json.loads(sys.argv[1])
names = {}
for name, spec in specs.items():
  make = synthetic.make_cxr_config if spec['kind'] == 'cxr' else synthetic.make_natural_config
  names[name] = synthetic.prepare(make(**spec['args']), sys.argv[2])
print(json.dumps(names))
'''


def build_synthetic(specs: Dict[str, dict], data_dir: str) -> Dict[str, str]:
  """Generates the datasets `specs` describes (unless present); returns their TFDS names."""
  for name, spec in specs.items():
    if spec.get('kind') not in ('cxr', 'natural'):
      raise ValueError(f"synthetic.{name}.kind must be 'cxr' or 'natural', got "
                       f"{spec.get('kind')!r}.")
  os.makedirs(data_dir, exist_ok=True)
  stdout = tf_process.run_python(['-c', _BUILD_SCRIPT, json.dumps(specs), data_dir],
                                 os.path.join(data_dir, 'build.log'),
                                 'Generating the synthetic datasets')
  return json.loads(stdout.strip().splitlines()[-1])


def resolve(config: ml_collections.ConfigDict, references: Dict[str, str],
            directories: Collection[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `config`, FieldReferences resolved, with '@' strings replaced.

  '@NAME' becomes references[NAME]; '@NAME/PATH' becomes os.path.join(references[NAME],
  PATH) for NAME in `directories` (workdirs, data_dir). The strings are replaced before
  the FieldReferences are resolved, so fields computed from them follow. `config` itself
  is left as it was.
  """
  replaced = copy.deepcopy(config)  # Keeps the FieldReferences, and which fields share one.

  def target(value: str, where: str) -> str:
    if value[1:] in references:
      return references[value[1:]]
    name, _, path = value[1:].partition('/')
    if name not in references:
      raise ValueError(f'{where}={value!r} refers to nothing; known: '
                       f'{sorted("@" + r for r in references)} (a stage can refer to the '
                       'stages before it in config.order).')
    if name not in directories:
      raise ValueError(f'{where}={value!r}: @{name} is not a directory, so it takes no '
                       f'/PATH; directories: {sorted("@" + d for d in directories)}.')
    if not path or os.path.isabs(path):
      raise ValueError(f'{where}={value!r}: expected @{name}/PATH with PATH relative to '
                       f'{references[name]}.')
    return os.path.join(references[name], path)

  def visit(node, path):
    for key in list(node.keys()):
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        visit(value, f'{path}.{key}')
      elif isinstance(value, str) and value.startswith('@'):
        # On a FieldReference field this sets the reference, which the fields computed
        # from it read.
        node[key] = target(value, f'{path}.{key}')

  with replaced.unlocked():
    visit(replaced, 'config')
  return replaced.copy_and_resolve_references()


def check_stages(config) -> None:
  """Raises ValueError naming a stage whose trainer cannot run in a chain, that refers
  to something no earlier stage, dataset or data_dir is, or whose trainer's config check
  (train.CONFIG_CHECKS) fails, before anything runs."""
  unknown = [n for n in config.order if n not in config.stages]
  if unknown:
    raise ValueError(f'config.order names stages {unknown} that config.stages lacks; it has '
                     f'{sorted(config.stages)}.')
  directories = ['data_dir']
  names = ['data_dir', *(config.synthetic.keys() if config.synthetic else ())]
  for name in config.order:
    stage = config.stages[name]
    if stage.get('trainer') == 'chain' or stage.get('trainer') not in TRAINERS:
      raise ValueError(f'Stage {name!r} has trainer {stage.get("trainer")!r}; expected one of '
                       f'{[t for t in TRAINERS.names() if t != "chain"]}.')
    try:
      resolved = resolve(stage, {n: f'<{n}>' for n in names}, directories)
      if stage.trainer in CONFIG_CHECKS:
        CONFIG_CHECKS.get(stage.trainer)(resolved)
    except ValueError as e:
      raise ValueError(f'Stage {name!r}: {e}') from None
    names.append(name)
    directories.append(name)


def run_chain(config, workdir: str):
  check_stages(config)
  data_dir = os.path.abspath(os.path.expanduser(config.data_dir or
                                                os.path.join(workdir, 'tensorflow_datasets')))
  references = {'data_dir': data_dir}
  directories = ['data_dir']
  if not jax.config.jax_compilation_cache_dir:
    # Re-runs, and a study's many fine-tuning runs of one shape, compile the same
    # programs again; the persistent cache makes those compiles reads.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  if config.synthetic:
    logging.info('Preparing synthetic datasets in %s', data_dir)
    references.update(build_synthetic(config.synthetic.to_dict(), data_dir))
  results = {}
  for name in config.order:
    stage = resolve(config.stages[name], references, directories)
    stage_dir = os.path.join(workdir, name)
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, 'config.json'), 'w') as f:
      f.write(stage.to_json_best_effort(indent=2, sort_keys=True))
    print(f'=== stage {name} ({stage.trainer}) in {stage_dir}', file=sys.stderr, flush=True)
    results[name] = TRAINERS.get(stage.trainer)(stage, stage_dir)
    references[name] = stage_dir
    directories.append(name)
  return results


TRAINERS.add('chain', run_chain)
