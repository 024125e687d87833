"""Image-text contrastive pretraining on `synthetic_cxr/site_a`: radiographs and their reports.

Symmetric InfoNCE between each image and its report (CLIP / ConVIRT) with a learnt
temperature, over the global batch; the image tower (bit-tiny) is then used like any
CXR network (probes, fine-tuning, embed, export) and the pair gives zero-shot scores
(`python -m cxr_jax.eval.zero_shot`). The synthetic reports name the findings the
images show, with report-mining noise, so the text supervises the image tower.

`configs/image_text_cxr.py:simclr` (or `:supcon`) adds that image-only contrastive loss
on two augmented views, weighted by `config.loss.image_text_weight`.

Data, tokenizer, run (the tokenizer path is `config.text.tokenizer`; its default is the
one below; `--config.text.tokenizer=...` also updates the tokenize op in data.pp):

  python -m cxr_jax.data.build synthetic_cxr/site_a --data_dir ~/tensorflow_datasets
  python -m cxr_jax.train.tokenizer --data synthetic_cxr/site_a:train \\
      --data_dir ~/tensorflow_datasets --vocab_size 1000 --output runs/tokenizer.json
  python -m cxr_jax.main --config configs/image_text_cxr.py --workdir runs/image_text

Sized for a CPU: bit-tiny at 56 px and text-tiny, batch 64, 2000 steps. Measured on a
2-core x86-64 CPU shared with other jobs: 1.9 s per step plus 0.2 s of data loading
(data.workers=0) at a load of about 9 on its 2 cores: about 70 minutes in all.
With the tokenizer above (about 600 tokens: the templated reports run out of BPE merges
before 1000), the 'both' sections of site A's reports are 37 to 92 tokens long (median
47), so max_len 96 cuts none.
"""

from cxr_jax.train import config_lib
from cxr_jax.train import image_text

AUGMENT = 'inception_crop(56, area_min=50)|affine|contrast|value_range(-1, 1, 0, 1)|rgb'


def get_config(image_only: str = ''):
  c = image_text.add_config_fields(config_lib.base_config())
  c.trainer = 'image_text'
  c.model_name = 'bit-tiny'
  c.text.encoder = 'text-tiny'
  c.text.tokenizer = 'runs/tokenizer.json'
  c.text.max_len = 96
  c.total_steps = 2000
  c.batch_size = 64
  c.data.name = 'synthetic_cxr/site_a'
  views = '|two_views|' if image_only else '|'
  # Tokenize first: ops before two_views run once per example, so both views share it.
  c.data.pp = image_text.tokenize_op(c) + '|decode|resize(64)|window' + views + AUGMENT
  c.data.pp_eval = 'decode|resize(64)|window|central_crop(56)|value_range(-1, 1, 0, 1)|rgb'
  c.head.embed_dim = 128
  c.loss.image_text_temperature = 0.07
  c.loss.image_only = image_only
  c.loss.image_text_weight = 0.5
  c.loss.positives = 'abnormal'  # With :supcon.
  c.optimizer.name = 'adamw'  # CLIP's optimiser, with its b2 for stability at large batch.
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b2 = 0.98
  c.optimizer.weight_decay = 0.1
  c.optimizer.weight_decay_exclude = image_text.WEIGHT_DECAY_EXCLUDE
  c.optimizer.schedule.name = 'cosine'
  c.optimizer.schedule.warmup_steps = 100
  return c
