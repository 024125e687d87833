"""The package's imports point down its layers (docs/ARCHITECTURE.md), functions' included.

Every module is imported, and every `import` in its source (module level or inside a
function) is checked against LAYERS: a module may import its own layer and those below,
never one above. A new module must be placed in the table.
"""

import ast
import importlib
import os
import pkgutil

import pytest

import cxr_jax

# Module prefix -> layer; the longest matching prefix decides.
LAYERS = {
    # Plumbing every layer may use.
    'cxr_jax': 0, 'cxr_jax.registry': 0, 'cxr_jax.npz_files': 0, 'cxr_jax.cli': 0,
    'cxr_jax.tf_process': 0, 'cxr_jax.files': 0,
    'cxr_jax.embeddings_file': 0,  # The embeddings file format (numpy only).
    'cxr_jax.text': 1,  # Report tokenizer and labeler: plain libraries.
    'cxr_jax.data': 2,  # Datasets, preprocessing ops (tokenize reads text/), pipelines.
    'cxr_jax.models': 2,  # Every network (the report encoder's ids come from text/).
    'cxr_jax.train': 3,  # The loop, its stages and trainers.
    'cxr_jax.eval': 3,  # Metrics, reports, zero-shot scoring.
    'cxr_jax.inference': 4,  # A trained run, loaded.
    # Tools on trained runs.
    'cxr_jax.export': 5, 'cxr_jax.embed': 5, 'cxr_jax.probe': 5, 'cxr_jax.zero_shot': 5,
    'cxr_jax.label_reports': 5,
    'cxr_jax.studies': 6,  # Experiments that train, embed, probe and report.
    'cxr_jax.main': 7,  # The command line that runs any trainer.
}

PACKAGE_DIR = os.path.dirname(cxr_jax.__file__)
MODULES = sorted(m.name for m in pkgutil.walk_packages(cxr_jax.__path__, 'cxr_jax.'))


def layer(module: str) -> int:
  prefixes = [p for p in LAYERS if module == p or module.startswith(p + '.')]
  return LAYERS[max(prefixes, key=len)]


def source_path(module: str) -> str:
  relative = os.path.join(*module.split('.')[1:])
  package = os.path.join(PACKAGE_DIR, relative, '__init__.py')
  return package if os.path.exists(package) else os.path.join(PACKAGE_DIR, relative + '.py')


def is_module(name: str) -> bool:
  return name == 'cxr_jax' or os.path.exists(source_path(name))


def imported_modules(module: str):
  """(line, cxr_jax module) of every import statement in `module`'s source."""
  with open(source_path(module)) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from a.b import c` imports module a.b.c when c is one, else names of a.b.
      names = [f'{node.module}.{alias.name}' if is_module(f'{node.module}.{alias.name}')
               else node.module for alias in node.names]
    else:
      continue
    for name in names:
      if name == 'cxr_jax' or name.startswith('cxr_jax.'):
        yield node.lineno, name


def test_every_module_has_a_layer_and_imports():
  assert 'cxr_jax.train.trainer' in MODULES and 'cxr_jax.models.image_text' in MODULES
  for module in MODULES:
    # Only the package itself sits at layer 0 by the bare 'cxr_jax' prefix.
    assert any(module == p or module.startswith(p + '.') for p in LAYERS if p != 'cxr_jax'), (
        f'{module} has no entry in LAYERS.')
    importlib.import_module(module)


@pytest.mark.parametrize('module', MODULES)
def test_imports_point_down(module):
  upward = [f'line {line}: {name} (layer {layer(name)})'
            for line, name in imported_modules(module) if layer(name) > layer(module)]
  assert not upward, f'{module} (layer {layer(module)}) imports upward: {upward}'


# cxr_jax.data.synthetic's modules, each importing only those listed before it.
SYNTHETIC_ORDER = ('streams', 'sites', 'sampling', 'reports', 'drawing', 'anatomy', 'findings',
                   'render', 'natural')


def test_synthetic_modules_import_one_way():
  package = 'cxr_jax.data.synthetic'
  assert sorted(m for m in MODULES if m.startswith(package + '.')) == sorted(
      f'{package}.{name}' for name in SYNTHETIC_ORDER)
  for k, name in enumerate(SYNTHETIC_ORDER):
    allowed = {f'{package}.{earlier}' for earlier in SYNTHETIC_ORDER[:k]}
    inside = {imported for _, imported in imported_modules(f'{package}.{name}')
              if imported == package or imported.startswith(package + '.')}
    assert inside <= allowed, f'{package}.{name} imports {sorted(inside - allowed)}'
