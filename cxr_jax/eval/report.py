"""Report files a person or a program can read: Markdown, JSON and CSV.

Evaluation output is plain files in the workdir: `write_json` for summaries
(NaN becomes null, NumPy values become Python ones), `write_csv` for tables (one
dict per row), and `Report` for a `report.md` that strings sections, paragraphs,
tables and figures together. Figures are linked by paths relative to the report,
so the output directory can be moved or zipped as a whole.
"""

import csv
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from cxr_jax import files

Columns = Optional[Union[Sequence[str], Mapping[str, str]]]


def to_builtin(value: Any) -> Any:
  """NumPy values and containers -> JSON-ready Python values; non-finite floats -> None."""
  if isinstance(value, Mapping):
    return {str(key): to_builtin(item) for key, item in value.items()}
  if isinstance(value, np.ndarray):
    return to_builtin(value.tolist())
  if isinstance(value, (list, tuple)):
    return [to_builtin(item) for item in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f'Cannot write a {type(value).__name__} ({value!r}) as JSON.')


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON; NaN/inf become null (JSON has no NaN)."""
  with files.write_atomically(path) as f:
    json.dump(to_builtin(obj), f, indent=2, allow_nan=False)
    f.write('\n')


def _column_names(rows: Sequence[Mapping], columns: Columns) -> Mapping[str, str]:
  """{key: header}; without `columns`, every key in the order it first appears."""
  if isinstance(columns, Mapping):
    return dict(columns)
  if columns is not None:
    return {key: key for key in columns}
  names = {}
  for row in rows:
    for key in row:
      names.setdefault(key, key)
  return names


def _csv_cell(value: Any) -> str:
  value = value.item() if isinstance(value, np.generic) else value
  if value is None:
    return ''
  if isinstance(value, float):
    return repr(value)  # Shortest text that reads back to the same float; 'nan' for NaN.
  if isinstance(value, (list, tuple, dict, np.ndarray)):
    return json.dumps(to_builtin(value))
  return str(value)


def write_csv(path: str, rows: Sequence[Mapping], columns: Columns = None) -> None:
  """Writes one dict per row; the header is `columns` or the union of the rows' keys.

  Floats are written at full precision and NaN as `nan`; a key missing from a row
  is an empty cell.
  """
  names = _column_names(rows, columns)
  with files.write_atomically(path, newline='') as f:
    writer = csv.writer(f)
    writer.writerow(list(names.values()))
    for row in rows:
      writer.writerow([_csv_cell(row.get(key)) for key in names])


def _markdown_cell(value: Any, float_format: str) -> str:
  value = value.item() if isinstance(value, np.generic) else value
  if value is None:
    return ''
  if isinstance(value, float):
    text = 'n/a' if math.isnan(value) else format(value, float_format)
  else:
    text = str(value)
  return text.replace('|', '\\|').replace('\n', ' ')


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class Report:
  """A Markdown document built in order: sections, paragraphs, tables, images.

  report = Report('Probe evaluation')
  report.section('Per finding')
  report.table(rows, columns={'finding': 'Finding', 'auroc': 'AUROC'})
  report.image('reliability.png', 'Reliability diagram')
  report.write(os.path.join(workdir, 'report.md'))
  """

  def __init__(self, title: str):
    self._blocks = [f'# {title}']

  def section(self, title: str, level: int = 2) -> 'Report':
    if not 2 <= level <= 6:
      raise ValueError(f'Section level must be 2..6 (1 is the title), got {level}.')
    self._blocks.append(f'{"#" * level} {title}')
    return self

  def paragraph(self, text: str) -> 'Report':
    self._blocks.append(text.strip())
    return self

  def table(self, rows: Sequence[Mapping], columns: Columns = None,
            float_format: str = '.3f') -> 'Report':
    """A table of dict rows; `columns` as keys or {key: header}; numbers right-aligned."""
    names = _column_names(rows, columns)
    if not names:
      raise ValueError('A table needs at least one column.')
    numeric = {key: all(_is_number(row.get(key)) for row in rows if row.get(key) is not None)
               for key in names}
    lines = ['| ' + ' | '.join(_markdown_cell(h, float_format) for h in names.values()) + ' |',
             '|' + '|'.join('---:' if numeric[key] and rows else '---' for key in names) + '|']
    for row in rows:
      lines.append('| ' + ' | '.join(_markdown_cell(row.get(key), float_format)
                                     for key in names) + ' |')
    self._blocks.append('\n'.join(lines))
    return self

  def image(self, path_relative: str, caption: str = '') -> 'Report':
    """Embeds an image by a path relative to the report file."""
    if os.path.isabs(path_relative):
      raise ValueError(f'Image path {path_relative!r} is absolute; give it relative to the '
                       'report so the output directory stays movable.')
    self._blocks.append(f'![{caption}]({path_relative})')
    if caption:
      self._blocks.append(f'*{caption}*')
    return self

  def markdown(self) -> str:
    return '\n\n'.join(self._blocks) + '\n'

  def write(self, path: str) -> None:
    with files.write_atomically(path) as f:
      f.write(self.markdown())
