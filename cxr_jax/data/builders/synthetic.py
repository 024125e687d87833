"""Generated datasets, the embedded default: `synthetic_cxr` and `synthetic_natural`.

Nothing is downloaded: every example is rendered by `cxr_jax.data.synthetic` from
(seed, site, index), in parallel processes, and stored like any other dataset
(ArrayRecord, 16-bit PNG for CXR), so training reads them through the same pipeline
as CheXpert or a hospital's manifest.

  python -m cxr_jax.data.build synthetic_cxr/site_a --data_dir ~/tfds

Other sizes: `make_cxr_config(...)` / `make_natural_config(...)` give a config whose
name spells its parameters; pass it as `config=` to the builder (see `prepare`).
"""

import dataclasses
import functools
import multiprocessing
import os
import sys
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import labels as labels_lib
from cxr_jax.data import synthetic
from cxr_jax.data.builders import base

SPLIT_FRACTIONS = (('train', 0.8), ('validation', 0.1), ('test', 0.1))


def _parallel_map(fn, items: Sequence, processes: Optional[int] = None) -> Iterator:
  """Ordered map over forked worker processes.

  Fork, not spawn: spawn re-imports the caller's main module in every worker, which
  re-runs a script that lacks an `if __name__ == '__main__'` guard. Forking a process
  that runs JAX's threads can deadlock, so where JAX is loaded (a notebook, a test)
  rendering stays in this process; the build CLI never loads JAX.
  """
  processes = processes or os.cpu_count() or 1
  if processes == 1 or len(items) < 64 or 'jax' in sys.modules:
    yield from map(fn, items)
    return
  with multiprocessing.get_context('fork').Pool(processes) as pool:
    yield from pool.imap(fn, items, chunksize=16)


@dataclasses.dataclass
class SyntheticCxrConfig(base.CxrBuilderConfig):
  site: str = 'A'
  image_size: int = 128
  num_examples: int = 5000  # Across all splits; split by patient.
  label_noise: float = 0.1  # Report-mining noise; 0 gives radiologist-grade labels.
  seed: int = 0
  severity_range: Tuple[float, float] = (0.0, 1.0)  # See synthetic.generate_cxr.
  mine_labels: bool = False  # Labels read from the reports by cxr_jax.text.labeler.
  variability: float = 1.0  # Spread of positioning and acquisition; see generate_cxr.
  opacity_texture: float = 0.0  # How mottled airspace opacities are; see generate_cxr.


def make_cxr_config(site: str = 'A', image_size: int = 128, num_examples: int = 5000,
                    label_noise: float = 0.1, seed: int = 0,
                    severity_range: Tuple[float, float] = (0.0, 1.0),
                    mine_labels: bool = False,
                    variability: float = 1.0,
                    opacity_texture: float = 0.0) -> SyntheticCxrConfig:
  """A config whose name spells its parameters.

  mine_labels: store the labels `cxr_jax.text.labeler` reads from each generated report
    instead of the generator's codes (the name gains '_mined'; the dataset's metadata
    says which labeler version mined them).
  variability: spread of positioning and acquisition (synthetic.generate_cxr); other
    than 1 the name gains e.g. '_var2.5'.
  opacity_texture: how mottled airspace opacities are (synthetic.generate_cxr); other
    than 0 the name gains e.g. '_texture1'.
  """
  if site not in synthetic.SITES:
    raise ValueError(f'Unknown synthetic site {site!r}; sites: {sorted(synthetic.SITES)}.')
  low, high = synthetic.check_severity_range(severity_range)
  # The full spectrum keeps the names datasets were built under before the range existed.
  severity = '' if (low, high) == (0.0, 1.0) else f'_severity{round(low * 100)}-{round(high * 100)}'
  mined = '_mined' if mine_labels else ''
  variability = synthetic.check_variability(variability)
  spread = '' if variability == 1.0 else f'_var{variability:g}'
  opacity_texture = synthetic.check_opacity_texture(opacity_texture)
  texture = '' if opacity_texture == 0.0 else f'_texture{opacity_texture:g}'
  name = (f'site_{site.lower()}_{image_size}px_{num_examples}_noise'
          f'{round(label_noise * 100)}{severity}{spread}{texture}{mined}_seed{seed}')
  return SyntheticCxrConfig(name=name, site=site, image_size=image_size,
                            num_examples=num_examples, label_noise=label_noise, seed=seed,
                            severity_range=(low, high), mine_labels=bool(mine_labels),
                            variability=variability, opacity_texture=opacity_texture,
                            max_side=image_size,
                            description=f'Synthetic CXR phantoms of site {site}.')


def _render_cxr(index: int, config: SyntheticCxrConfig) -> base.Record:
  example = synthetic.generate_cxr(index, seed=config.seed, site=config.site,
                                   image_size=config.image_size,
                                   label_noise=config.label_noise,
                                   severity_range=config.severity_range,
                                   mine_labels=config.mine_labels,
                                   variability=config.variability,
                                   opacity_texture=config.opacity_texture)
  return base.Record(
      key=f'{config.site}-{config.seed}-{index:07d}', labels=example['labels'],
      pixels=example['image'], patient_id=example['patient_id'],
      study_id=example['study_id'], sex=example['sex'], age=int(example['age']),
      view=example['view'], site=example['site'], report=example['report'])


class SyntheticCxr(base.CxrBuilder):
  """Procedural chest radiograph phantoms with findings, sites and report-mined labels."""

  VERSION = tfds.core.Version('1.0.0')
  FINDINGS = tuple(synthetic.CXR_FINDINGS)
  IMAGE_DTYPE = np.uint16
  # Site A is the pretraining site, labelled by report mining (noisy); B and C are
  # downstream and external sites whose labels are radiologist-grade.
  BUILDER_CONFIGS = [
      dataclasses.replace(make_cxr_config(site, label_noise=0.1 if site == 'A' else 0.0),
                          name=f'site_{site.lower()}')
      for site in sorted(synthetic.SITES)]

  def _info(self):
    info = super()._info()
    config = self.builder_config
    if config.mine_labels:
      from cxr_jax.text import labeler  # pylint: disable=g-import-not-at-top  spaCy: only here.
      info.metadata['labels'] = {
          'source': 'mined', 'labeler': labeler.LABELER_VERSION,
          'observations': {k: list(v) for k, v in synthetic.MINED_OBSERVATIONS.items()},
          'from': 'the generated reports, written from codes garbled with label_noise'}
    else:
      info.metadata['labels'] = {'source': 'generator', 'label_noise': config.label_noise}
    return info

  def _split_names(self):
    return [name for name, _ in SPLIT_FRACTIONS]

  def _split_generators(self, dl_manager):
    config = self.builder_config
    # Assign by patient without rendering: metadata is cheap to sample.
    by_split = {name: [] for name in self._split_names()}
    for index in range(config.num_examples):
      patient = synthetic.study_metadata(index, seed=config.seed, site=config.site,
                                         label_noise=config.label_noise)['patient_id']
      split = labels_lib.patient_split(patient, dict(SPLIT_FRACTIONS),
                                       salt=f'synthetic-{config.seed}')
      by_split[split].append(index)
    self._indices = by_split
    return {split: self._generate_examples(split, None) for split in by_split}

  def _records(self, split, manual_dir):
    del manual_dir
    render = functools.partial(_render_cxr, config=self.builder_config)
    yield from _parallel_map(render, self._indices[split])


@dataclasses.dataclass
class SyntheticNaturalConfig(tfds.core.BuilderConfig):
  num_classes: int = 100
  image_size: int = 64
  num_train: int = 20000
  num_test: int = 2000
  seed: int = 0


def make_natural_config(num_classes: int = 100, image_size: int = 64, num_train: int = 20000,
                        num_test: int = 2000, seed: int = 0) -> SyntheticNaturalConfig:
  name = f'{num_classes}cls_{image_size}px_{num_train}_{num_test}_seed{seed}'
  return SyntheticNaturalConfig(name=name, num_classes=num_classes, image_size=image_size,
                                num_train=num_train, num_test=num_test, seed=seed,
                                description='Procedural natural-like images.')


def _render_natural(index: int, config: SyntheticNaturalConfig) -> Tuple[str, dict]:
  example = synthetic.generate_natural(index, seed=config.seed, num_classes=config.num_classes,
                                       image_size=config.image_size)
  return f'{config.seed}-{index:07d}', {'image': example['image'], 'label': example['label']}


class SyntheticNatural(tfds.core.GeneratorBasedBuilder):
  """Natural-like RGB images in many classes, for the generic pretraining stage."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [dataclasses.replace(make_natural_config(), name='default')]

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
        }),
        supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    config = self.builder_config
    # Labels cycle through the classes, so both splits are balanced.
    return {'train': self._generate_examples(range(config.num_train)),
            'test': self._generate_examples(
                range(config.num_train, config.num_train + config.num_test))}

  def _generate_examples(self, indices):
    render = functools.partial(_render_natural, config=self.builder_config)
    yield from _parallel_map(render, list(indices))


def prepare(config, data_dir: str):
  """Builds a synthetic dataset for `config` (a Synthetic*Config) unless already there.

  Returns the TFDS name to read it by, e.g. 'synthetic_cxr/site_a_96px_3000_noise10_seed0'.
  """
  cls = SyntheticCxr if isinstance(config, SyntheticCxrConfig) else SyntheticNatural
  builder = cls(config=config, data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return f'{builder.name}/{config.name}'
