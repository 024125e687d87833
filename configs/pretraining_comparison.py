"""Four ways to pretrain a CXR network, compared on the same downstream task, in-site and
at an external site: a chain (cxr_jax/studies/chain.py) like configs/quickstart.py.

  configs/pretraining_comparison.py:synthetic   generated data, CPU-sized (the default)
  configs/pretraining_comparison.py:real        MIMIC-CXR pretraining, NIH downstream,
                                                CheXpert external (you bring the data)

What it shows: from ONE generic network, four CXR networks are pretrained on the same
images with the same number of steps and images per step:

  supervised  multi-label classification of the mined findings (the finetune recipe,
              configs/finetune_cxr.py, in mode full);
  supcon      supervised contrastive learning on those labels (configs/supcon_cxr.py;
              positives share a finding, with the real data the abnormal label);
  simclr      self-supervised contrastive learning, no labels (the other view of the
              same image is the only positive);
  image_text  contrastive image-report learning (configs/image_text_cxr.py).

All four see the same information about the findings: the reports, or the labels mined
from them, the task finding included (image-text cannot be kept from a finding its
reports mention, so none is; configs/quickstart.py gives SupCon only the reports'
normal/abnormal call). The last stage (`study`, configs/transfer_study.py) puts them and the
generic network side by side: linear and MLP probes for one finding, trained at label
budgets (3 draws each) on a downstream site, scored on that site's test split
(in-site) and on an external site's (`stages.study.external`) that no stage trained
on. STUDY/report.md has the AUROC table, both test sets side by side with the change
between them, data-efficiency plots per test set and t-SNE maps of every network;
STUDY/summary.csv one row per method, network, budget and test set. Probes only by
default; `--config.stages.study.finetune.networks='("supcon",)'` adds full fine-tuning
and LP-FT of a network. `cxr_network` (supcon) is the network the published claims in
the report are about. Re-running resumes every stage; `--config.stages.NAME.FIELD=...`
overrides any stage.

Synthetic (the default): generic = bit-tiny supervised on `synthetic_natural` (10
classes, 400 steps); pretraining on synthetic site A (4000 images, report-mined labels
with 10% noise, templated reports); downstream airspace_opacity on site B (another
scanner, radiologist-grade labels) at 10, 45, 100 and 500 labels; external: site C's
test split (a third scanner). Site B rather than A is the downstream site so that
in-site already means "a new hospital with its own labels", as in the published work;
site C then measures what is lost when the trained probe itself moves. Images are 32 px
(28 px crops), each pretraining 300 steps of 64 images. One command runs it all: the
first stage (`tokenizer`, cxr_jax/train/tokenizer.py) trains the report tokenizer that
the image-text stage reads (WORKDIR/tokenizer/tokenizer.json, at most 1000 tokens) on
site A's training reports:

  python -m cxr_jax.main --config configs/pretraining_comparison.py --workdir runs/comparison

Time, measured on a 2-core x86-64 CPU shared with other jobs (load average 6 to 9):
18.4 minutes in all: datasets 1.4, generic 2.5, image-text 2.4, supervised 2.2, SupCon
3.5, SimCLR 3.5, study 3.1 (embeddings, 240 probe fits, plots); the tokenizer stage,
added since, takes seconds (its BPE training on 3200 reports, 0.4 s). At this size
every network is near chance on the task (in-site AUROC 0.45 to 0.60): the run shows
the machinery and the table, not yet the claims. (The quickstart gets its signal from
findings of severity 0.8 to 1 and 1000 SupCon steps; this comparison keeps the full
severity range.)

Real (`:real`; not run here, sizes from the full-scale recipes): the builders register
`mimic_cxr/chexpert` (MIMIC-CXR-JPG, CheXpert-labeler labels and, from
mimic-cxr-reports.zip, the reports: the only one of the three with reports, so the
pretraining set of all four), `nih_cxr14` (train/validation/test; findings spelt as in
`Finding Labels`, e.g. 'Effusion') and `cxr_chexpert/full` (train/validation; 'Pleural
Effusion'). Generic = the published BiT-M-R50x1 (its NIH linear probe,
configs/probe_nih.py:linear, is the stage: a frozen backbone, so the study gets the
published weights unchanged); supervised = configs/bit_hyperrule_finetune.py on MIMIC;
SupCon and SimCLR = configs/supcon_chexpert.py:mimic; image-text = the SupCon
recipe's tower, views and schedule with text-base and ConVIRT's rate. Downstream:
Effusion on NIH at 10, 100, 1000 and 10000 labels, external: CheXpert's validation
split (radiologist labels, 'Pleural Effusion'). Each pretraining stage costs about
what configs/supcon_chexpert.py estimates (about an hour at a sustained 0.5 PFLOP/s).

  python -m cxr_jax.data.build mimic_cxr/chexpert --data_dir ~/tensorflow_datasets \\
      --manual_dir ~/data/mimic-cxr-jpg   # and nih_cxr14, cxr_chexpert/full
  python -m cxr_jax.main --config configs/pretraining_comparison.py:real \\
      --workdir runs/comparison_real

(the tokenizer stage trains on MIMIC's training reports, 8000 tokens at most; every
network stage starts from weights/BiT-M-R50x1.npz, from
https://github.com/google-research/big_transfer; `--config.stages.NAME.init.weights`).
"""

import os

import ml_collections

from cxr_jax.train import config_lib
from cxr_jax.train import image_text
from cxr_jax.train import tokenizer as tokenizer_trainer

FINDING = 'airspace_opacity'  # The downstream task.
IMAGE_SIZE = 32  # Generated image side; networks see central/random 28 px crops.
CROP = 28
PRETRAINING_STEPS = 300  # Each of the four CXR pretrainings, at batch PRETRAINING_BATCH.
PRETRAINING_BATCH = 64
PP_EVAL = f'decode|window|central_crop({CROP})|value_range(-1, 1, 0, 1)|rgb'
NETWORKS = ('generic', 'supervised', 'supcon', 'simclr', 'image_text')
# The tokenizer first: it takes seconds, and image_text reads what it writes.
ORDER = ('tokenizer', 'generic', 'image_text', 'supervised', 'supcon', 'simclr', 'study')
TOKENIZER = '@tokenizer/' + tokenizer_trainer.OUTPUT  # The file the tokenizer stage writes.
REAL_PRETRAINING = 'mimic_cxr/chexpert'  # The real dataset with reports.
MIMIC_IMAGES = 377_110  # MIMIC-CXR-JPG (Johnson et al. 2019); picks BiT-HyperRule's tier.
REAL_WEIGHTS = 'weights/BiT-M-R50x1.npz'
# Augmentation shared by the four pretrainings (after decode|window, per view).
AUGMENT = (f'inception_crop({CROP}, area_min=50)|affine|contrast|flip_lr'
           '|value_range(-1, 1, 0, 1)|rgb')


def _path(name: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _recipe(name: str, *args) -> ml_collections.ConfigDict:
  return config_lib.load(':'.join((_path(name), *args)))


def _pretraining(stage: ml_collections.ConfigDict, pp: str) -> ml_collections.ConfigDict:
  """The settings every synthetic CXR pretraining shares: data, start, steps, optimiser."""
  stage.model_name = 'bit-tiny'
  stage.init.workdir = '@generic'
  stage.data.name, stage.data.data_dir = '@site_a', '@data_dir'
  stage.data.pp, stage.data.pp_eval = pp, PP_EVAL
  stage.init_image_size = CROP
  stage.total_steps, stage.batch_size = PRETRAINING_STEPS, PRETRAINING_BATCH
  # AdamW for all four: LARS collapsed SupCon at this batch and model (configs/quickstart.py).
  stage.optimizer.name = 'adamw'
  stage.optimizer.learning_rate = 1e-3
  stage.optimizer.lr_reference_batch = 0
  stage.optimizer.schedule.name = 'cosine'
  stage.optimizer.schedule.warmup_steps = PRETRAINING_STEPS // 10
  stage.checkpoint.every = PRETRAINING_STEPS // 3
  stage.log_every = 20
  return stage


def _tokenizer(name: str, vocab_size: int) -> ml_collections.ConfigDict:
  """The stage that trains the report tokenizer on dataset `name`'s training reports."""
  stage = tokenizer_trainer.default_config()
  stage.data.name, stage.data.split, stage.data.data_dir = name, 'train', '@data_dir'
  stage.vocab_size = vocab_size
  return stage


def _synthetic() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'chain'
  c.data_dir = ''  # '' = WORKDIR/tensorflow_datasets.
  c.synthetic = ml_collections.ConfigDict({
      'natural': {'kind': 'natural', 'args': {
          'num_classes': 10, 'image_size': IMAGE_SIZE, 'num_train': 6000, 'num_test': 500}},
      'site_a': {'kind': 'cxr', 'args': {  # Pretraining: mined labels, with reports.
          'site': 'A', 'image_size': IMAGE_SIZE, 'num_examples': 4000, 'label_noise': 0.1}},
      'site_b': {'kind': 'cxr', 'args': {  # Downstream: task labels and in-site test.
          'site': 'B', 'image_size': IMAGE_SIZE, 'num_examples': 4000, 'label_noise': 0.0}},
      'site_c': {'kind': 'cxr', 'args': {  # External test site.
          'site': 'C', 'image_size': IMAGE_SIZE, 'num_examples': 4000, 'label_noise': 0.0}},
  })
  c.order = ORDER

  generic = _recipe('supervised_natural.py')
  generic.head.num_classes = 10
  generic.total_steps = 400
  generic.data.name, generic.data.data_dir = '@natural', '@data_dir'
  generic.data.pp = f'decode|random_crop({CROP})|flip_lr|value_range(-1, 1)'
  generic.data.pp_eval = f'decode|central_crop({CROP})|value_range(-1, 1)'
  generic.init_image_size = CROP
  generic.optimizer.learning_rate = 0.1
  generic.optimizer.lr_reference_batch = 0
  generic.optimizer.schedule.warmup_steps = 40
  generic.eval.every, generic.eval.split = 400, 'test'
  generic.log_every = 20

  supervised = _pretraining(_recipe('finetune_cxr.py'), f'decode|window|{AUGMENT}')
  supervised.finetune.mode = 'full'
  supervised.head.num_classes = 7  # Every finding of synthetic_cxr, mined from reports.
  supervised.data.label_policy.uncertain = 'ignore'
  supervised.eval.every, supervised.eval.split = PRETRAINING_STEPS, 'validation'

  supcon = _pretraining(_recipe('supcon_cxr.py'), f'decode|window|two_views|{AUGMENT}')
  supcon.loss.positives = 'any_shared'
  supcon.eval.every, supcon.eval.split = PRETRAINING_STEPS, 'validation'

  simclr = _pretraining(_recipe('supcon_cxr.py'), f'decode|window|two_views|{AUGMENT}')
  simclr.trainer = 'simclr'
  simclr.eval.every, simclr.eval.split = PRETRAINING_STEPS, 'validation'

  text = _recipe('image_text_cxr.py')
  text.text.tokenizer = TOKENIZER  # The tokenize op in data.pp follows it.
  # Tokenize first: the report is read once per example (configs/image_text_cxr.py).
  text = _pretraining(text, image_text.tokenize_op(text) + f'|decode|window|{AUGMENT}')

  study = _study('@site_b', FINDING)
  study.external = ml_collections.ConfigDict(
      {'site_c': {'name': '@site_c', 'split': 'test', 'finding': ''}})
  study.pp_eval = PP_EVAL

  c.stages = ml_collections.ConfigDict({
      'tokenizer': _tokenizer('@site_a', 1000), 'generic': generic, 'image_text': text,
      'supervised': supervised, 'supcon': supcon, 'simclr': simclr, 'study': study})
  return c


def _study(name: str, finding: str) -> ml_collections.ConfigDict:
  """The transfer study over the five networks: probes, in-site and external."""
  study = _recipe('transfer_study.py')
  study.networks = ml_collections.ConfigDict({n: f'@{n}' for n in NETWORKS})
  study.cxr_network = 'supcon'  # The CXR-network recipe the published claims are about.
  study.data.name, study.data.data_dir = name, '@data_dir'
  study.data.finding = finding
  study.finetune.networks = ()
  study.tsne = NETWORKS
  study.export.network = ''
  return study


def _real() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.trainer = 'chain'
  c.data_dir = '~/tensorflow_datasets'
  c.synthetic = ml_collections.ConfigDict()  # Nothing to generate.
  c.order = ORDER

  # The generic network is the published BiT-M-R50x1; its NIH linear probe (frozen
  # backbone) is a run in its own right and gives the study that backbone unchanged.
  generic = _recipe('probe_nih.py', 'linear')
  generic.init.workdir, generic.init.weights = '', REAL_WEIGHTS

  supervised = _recipe('bit_hyperrule_finetune.py', f'{REAL_PRETRAINING}:{MIMIC_IMAGES}')
  supcon = _recipe('supcon_chexpert.py', 'mimic')
  simclr = _recipe('supcon_chexpert.py', 'mimic')
  simclr.trainer = 'simclr'
  text = _recipe('image_text_cxr.py')
  # The image tower, views and schedule of the SupCon recipe; CLIP's text tower shape.
  text.model_name, text.model.dtype = supcon.model_name, supcon.model.dtype
  text.init.weights = REAL_WEIGHTS
  text.optimizer.accumulate_steps = supcon.optimizer.accumulate_steps
  text.batch_size, text.total_steps = supcon.batch_size, supcon.total_steps
  text.log_every, text.checkpoint.every = supcon.log_every, supcon.checkpoint.every
  text.data.workers = supcon.data.workers
  text.text.encoder = 'text-base'
  text.text.tokenizer = TOKENIZER
  text.text.max_len = 128
  text.data.pp = (image_text.tokenize_op(text) + '|decode|resize(512)|window|'
                  + config_lib.load_module(_path('supcon_chexpert.py')).AUGMENT)
  text.data.pp_eval = supcon.data.pp_eval
  text.optimizer.learning_rate = 1e-4  # ConVIRT's rate for both towers.
  text.optimizer.schedule.warmup_steps = supcon.optimizer.schedule.warmup_steps
  for stage in (generic, supervised, supcon, simclr, text):
    stage.data.data_dir = '@data_dir'
  for stage in (supervised, supcon, simclr, text):
    stage.data.name = REAL_PRETRAINING

  study = _study('nih_cxr14', 'Effusion')
  study.external = ml_collections.ConfigDict({'chexpert': {
      'name': 'cxr_chexpert/full', 'split': 'validation', 'finding': 'Pleural Effusion'}})
  study.budgets = (10, 100, 1000, 10000)
  study.pp_eval = generic.data.pp_eval  # NIH's whole film at 448 px (configs/probe_nih.py).
  study.embed_batch_size = 128
  study.finetune.pp = ('decode|resize(512)|window|random_crop(448)|flip_lr'
                       '|value_range(-1, 1, 0, 1)|rgb')
  study.finetune.batch_size = 128
  study.finetune.steps, study.finetune.lp_steps = 2000, 500
  study.finetune.learning_rate = 1e-4

  c.stages = ml_collections.ConfigDict({
      'tokenizer': _tokenizer(REAL_PRETRAINING, 8000), 'generic': generic, 'image_text': text,
      'supervised': supervised, 'supcon': supcon, 'simclr': simclr, 'study': study})
  return c


def get_config(data: str = 'synthetic'):
  data = data or 'synthetic'
  if data not in ('synthetic', 'real'):
    raise ValueError(f'configs/pretraining_comparison.py:{data}: the argument picks the data, '
                     "'synthetic' (generated, CPU-sized) or 'real' (MIMIC-CXR, NIH, CheXpert).")
  return _synthetic() if data == 'synthetic' else _real()
