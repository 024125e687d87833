"""A subword tokenizer for radiology reports, trained locally on the report corpus.

Training one on datasets' reports is `cxr_jax/train/tokenizer.py` (the `tokenizer`
trainer and the command line `python -m cxr_jax.train.tokenizer`); this library reads
no datasets, so the data pipeline's `tokenize` op builds on it.

Design:
  * Byte-level BPE from the `tokenizers` library, trained on the reports of one or more
    dataset splits (the `report` feature every CXR builder stores). Byte-level means any
    text encodes, with no unknown token, so a new hospital's reports never fail.
  * Text is normalised before splitting: Unicode NFKC, lower case, runs of whitespace
    (line breaks included) collapsed to one space. Case and layout carry little in a
    report and would double the vocabulary. `decode(encode(t))` gives back exactly the
    normalised text.
  * Ids: 0 is padding, 1 begins and 2 ends every sequence. `encode(texts, max_len)`
    returns int32 [B, max_len] rows `<bos> tokens <eos> 0 ...`; a longer text is cut to
    its first max_len - 2 tokens and still ends with `<eos>`, so "non-zero" is exactly
    "part of the text" for the encoder's padding mask. Encoding is a pure function of
    the file and the text.
  * Sections: a report's FINDINGS and IMPRESSION (headers matched case-insensitively)
    are parsed by `select_sections`; which of them the model reads ('findings',
    'impression', 'both' or 'all' of the text) is chosen when training the tokenizer
    and stored in its file, and the `tokenize` preprocessing op uses the same unless told
    otherwise. A report without the asked-for section falls back to what it has (the
    other section, else the whole text); training counts those reports and stores the
    counts in the file.
  * One JSON file: {'format', 'sections', 'corpus' (what it was trained on, the
    vocabulary size asked for, min_frequency and the counts), 'tokenizer' (the
    `tokenizers` serialisation)}.
"""

import collections
import json
import os
import re
import runpy
import threading
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

FORMAT = 'cxr_jax.text.tokenizer/1'
PAD, BOS, EOS = '<pad>', '<bos>', '<eos>'
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = (PAD, BOS, EOS)  # Trained first, so they get ids 0, 1, 2.
_BYTE_ALPHABET = 256
SECTIONS = ('findings', 'impression', 'both', 'all')

# A FINDINGS: or IMPRESSION: header, in any case, anywhere (one-line reports run
# "Findings: ... Impression: ..." together).
_SECTION_HEADER = re.compile(r'\b(findings|impression)[ \t]*:', re.IGNORECASE)
# Any other header ends a section: capitals at the start of a line, then a colon
# ('COMPARISON:', 'RECOMMENDATION(S):'), as in MIMIC-CXR's free-text reports.
_OTHER_HEADER = re.compile(r'^[ \t]*[A-Z][A-Z /&()\-]*[A-Z)][ \t]*:', re.MULTILINE)


def report_sections(report: str) -> Dict[str, str]:
  """{'findings': ..., 'impression': ...} for the sections the report has (bodies, no header).

  A section runs from its header to the next header of any kind. When a header repeats,
  the first non-empty body is kept.
  """
  starts = sorted({m.start() for m in _SECTION_HEADER.finditer(report)} |
                  {m.start() for m in _OTHER_HEADER.finditer(report)} | {len(report)})
  sections = {}
  for match in _SECTION_HEADER.finditer(report):
    end = next(s for s in starts if s > match.start())
    body = ' '.join(report[match.end():end].split())
    name = match.group(1).lower()
    if body and name not in sections:
      sections[name] = body
  return sections


def select_sections(report: str, sections: str) -> Tuple[str, bool]:
  """(the text the model reads, whether the report had every section asked for).

  sections: 'findings', 'impression', 'both' (findings then impression) or 'all' (the
  whole report, headers included). A missing section falls back to the other one, and
  with neither to the whole report; the flag is then False so callers can count it.
  An empty report gives ('', False).
  """
  if sections not in SECTIONS:
    raise ValueError(f'Unknown report sections {sections!r}; expected one of {SECTIONS}.')
  whole = ' '.join(report.split())
  if sections == 'all':
    return whole, bool(whole)
  found = report_sections(report)
  wanted = ('findings', 'impression') if sections == 'both' else (sections,)
  if all(name in found for name in wanted):
    return ' '.join(found[name] for name in wanted), True
  present = [found[name] for name in ('findings', 'impression') if name in found]
  return (' '.join(present) if present else whole), False


# Reports that `report_text` read in this process without a wanted section ('findings',
# 'impression' or 'both': what was asked for) or with no text at all ('empty').
SECTION_FALLBACKS: collections.Counter = collections.Counter()
_FALLBACKS_LOCK = threading.Lock()


def report_text(report, sections: str) -> str:
  """`select_sections` of a stored report (str or UTF-8 bytes), counting fallbacks.

  The first fallback of each kind in a process is logged; all are counted in
  `SECTION_FALLBACKS`.
  """
  text, complete = select_sections(as_text(report), sections)
  if not complete:
    kind = sections if text else 'empty'
    with _FALLBACKS_LOCK:
      SECTION_FALLBACKS[kind] += 1
      first = SECTION_FALLBACKS[kind] == 1
    if first:
      logging.warning('A report %s; it is read as %r. Further such reports are only '
                      'counted (cxr_jax.text.tokenizer.SECTION_FALLBACKS).',
                      'is empty' if not text else f'lacks the {sections} section(s)',
                      text[:80])
  return text


def as_text(report) -> str:
  """A report as str (datasets store UTF-8 bytes)."""
  if isinstance(report, (bytes, np.bytes_)):
    return bytes(report).decode('utf-8')
  if isinstance(report, (str, np.str_)):
    return str(report)
  raise TypeError(f'A report must be str or UTF-8 bytes, got {type(report).__name__}.')


class Tokenizer:
  """A trained report tokenizer; `Tokenizer.load(path)`, then `encode(texts, max_len)`."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, sections: str,
               corpus: Optional[dict] = None, path: str = ''):
    if sections not in SECTIONS:
      raise ValueError(f'Unknown report sections {sections!r}; expected one of {SECTIONS}.')
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID)):
      if tokenizer.token_to_id(token) != expected:
        raise ValueError(f'Tokenizer {path or "(in memory)"}: {token} has id '
                         f'{tokenizer.token_to_id(token)}, expected {expected}.')
    self._tokenizer = tokenizer
    self.sections = sections
    self.corpus = dict(corpus or {})
    self.path = path

  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  @classmethod
  def train(cls, reports: Iterable, vocab_size: int, *, sections: str = 'both',
            min_frequency: int = 2, source: str = '') -> 'Tokenizer':
    """Trains byte-level BPE on the chosen sections of `reports` (str or UTF-8 bytes).

    `source` is recorded in the file (e.g. 'synthetic_cxr/site_a:train'). Reports that
    lack a section (see `select_sections`) or are empty are counted in `corpus`.
    """
    minimum = len(SPECIAL_TOKENS) + _BYTE_ALPHABET + 1
    if vocab_size < minimum:
      raise ValueError(f'vocab_size={vocab_size} is too small: byte-level BPE needs at least '
                       f'{minimum} (3 special tokens, 256 bytes, one merge).')
    if sections not in SECTIONS:
      raise ValueError(f'Unknown report sections {sections!r}; expected one of {SECTIONS}.')
    counts = {'reports': 0, 'section_fallbacks': 0, 'empty': 0}

    def texts() -> Iterator[str]:
      for report in reports:
        text, complete = select_sections(as_text(report), sections)
        counts['reports'] += 1
        counts['section_fallbacks'] += int(not complete and bool(text))
        counts['empty'] += int(not text)
        if text:
          yield text

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(tokenizers.Regex(r'\s+'), ' '), normalizers.Strip()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts(), trainer)
    if counts['reports'] == counts['empty']:
      raise ValueError(f'No report text to train on in {source or "the reports given"} '
                       f'({counts["reports"]} reports, all empty).')
    corpus = {'source': source, 'max_vocab_size': vocab_size, 'min_frequency': min_frequency,
              **counts}
    return cls(tokenizer, sections, corpus)

  def save(self, path: str) -> None:
    content = {'format': FORMAT, 'sections': self.sections, 'corpus': self.corpus,
               'tokenizer': json.loads(self._tokenizer.to_str())}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'w') as f:
      json.dump(content, f)
    os.replace(temporary, path)  # A reader never sees a half-written file.
    self.path = path

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    path = os.path.expanduser(path)
    if not path:
      raise ValueError('No tokenizer file given. Train one with `python -m '
                       'cxr_jax.text.tokenizer --data NAME:SPLIT --output tok.json`.')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Tokenizer file {path} does not exist. Train one with '
                              '`python -m cxr_jax.text.tokenizer --data NAME:SPLIT '
                              f'--output {path}`.')
    try:
      with open(path) as f:
        content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'Tokenizer file {path} is not JSON: {e}') from None
    if not isinstance(content, dict) or content.get('format') != FORMAT:
      found = content.get('format') if isinstance(content, dict) else type(content).__name__
      raise ValueError(f'{path} is not a cxr_jax tokenizer file: expected format {FORMAT!r}, '
                       f'found {found!r}.')
    missing = [k for k in ('sections', 'tokenizer') if k not in content]
    if missing:
      raise ValueError(f'Tokenizer file {path} lacks {missing}.')
    try:
      tokenizer = tokenizers.Tokenizer.from_str(json.dumps(content['tokenizer']))
    except Exception as e:  # The Rust library raises a plain Exception.
      raise ValueError(f'Tokenizer file {path}: cannot read its tokenizer: {e}') from None
    return cls(tokenizer, content['sections'], content.get('corpus'), path=path)

  def token_ids(self, text: str) -> List[int]:
    """The subword ids of one text, without <bos>, <eos> or padding."""
    # One text at a time: `encode_batch` would start Rust threads, which do not survive
    # the fork of data-loading worker processes.
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len]: `<bos> tokens <eos>` then padding (0); see the module doc."""
    if isinstance(texts, (str, bytes)):
      raise TypeError('encode takes a sequence of texts; wrap a single text in a list.')
    if max_len < 2:
      raise ValueError(f'max_len={max_len}: needs room for <bos> and <eos> (at least 2).')
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      ids = self.token_ids(as_text(text))[:max_len - 2]
      out[row, :len(ids) + 2] = [BOS_ID, *ids, EOS_ID]
    return out

  def decode(self, ids) -> str:
    """The normalised text of one row of ids (specials and padding dropped)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._tokenizer.decode(ids).strip()


_CACHE: Dict[str, Tuple[float, Tokenizer]] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(path: str) -> Tokenizer:
  """`Tokenizer.load`, once per process and file version (data-loading threads share it)."""
  key = os.path.abspath(os.path.expanduser(path)) if path else path
  with _CACHE_LOCK:
    mtime = os.path.getmtime(key) if key and os.path.isfile(key) else -1.0
    cached = _CACHE.get(key)
    if cached is None or cached[0] != mtime:
      cached = (mtime, Tokenizer.load(key))
      _CACHE[key] = cached
    return cached[1]


if __name__ == '__main__':
  # The command's earlier name: training on datasets reads them (cxr_jax/train/tokenizer.py),
  # a layer above this library.
  runpy.run_module('cxr_jax.train.tokenizer', run_name='__main__', alter_sys=True)
