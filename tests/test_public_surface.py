"""The public surface (design §3): every `dvl.*` name resolves, and the README, the package docstring and the
notebooks use nothing else (no `from dvl_jax...` imports), so a reader can rely on `import dvl_jax as dvl`."""

import ast
import json
import os
import re
import subprocess
import sys

import pytest

import dvl_jax as dvl
from tests.user_process import ROOT, user_env

NOTEBOOKS = [os.path.join(ROOT, "notebooks", name) for name in ("quickstart.ipynb", "train_tiny.ipynb")]
README = os.path.join(ROOT, "README.md")
DVL_NAME = re.compile(r"(?<![\w.])dvl\.([A-Za-z_]\w*)")


def _notebook_cells(path: str, kind: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == kind]


def _readme() -> str:
  with open(README, encoding="utf-8") as f:
    return f.read()


def _python_blocks(markdown: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def _library_imports(code: str) -> list[str]:
  """Import statements of this repository's packages in `code` (IPython `%` lines skipped)."""
  tree = ast.parse("\n".join(line for line in code.splitlines() if not line.lstrip().startswith("%")))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [f"import {a.name}" + (f" as {a.asname}" if a.asname else "") for a in node.names
                if a.name.split(".")[0] in ("dvl_jax", "checkpoints_convert")]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("dvl_jax", "checkpoints_convert"):
      found.append(f"from {node.module} import {', '.join(a.name for a in node.names)}")
  return found


def test_every_public_name_resolves():
  assert dvl.__all__ == sorted(set(dvl.__all__)) and dir(dvl) == dvl.__all__
  for name in dvl.__all__:
    assert getattr(dvl, name) is not None, name
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    dvl.nope


@pytest.mark.parametrize("where", ["README.md", "dvl_jax/__init__.py", *map(os.path.basename, NOTEBOOKS)])
def test_documented_dvl_names_are_public(where):
  if where == "README.md":
    text = _readme()
  elif where.endswith(".ipynb"):
    text = "\n".join(_notebook_cells(os.path.join(ROOT, "notebooks", where), "code")
                     + _notebook_cells(os.path.join(ROOT, "notebooks", where), "markdown"))
  else:
    text = dvl.__doc__
  used = set(DVL_NAME.findall(text))
  assert used, f"{where} uses no dvl.* name: the pattern is wrong"
  assert used <= set(dvl.__all__), f"{where} uses names outside dvl.__all__: {sorted(used - set(dvl.__all__))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebooks_import_only_dvl_jax_as_dvl(path):
  imports = [i for code in _notebook_cells(path, "code") for i in _library_imports(code)]
  assert imports == ["import dvl_jax as dvl"], imports


def test_readme_and_docstring_code_import_only_dvl_jax_as_dvl():
  blocks = _python_blocks(_readme())
  assert blocks
  for code in blocks:
    assert set(_library_imports(code)) <= {"import dvl_jax as dvl"}, code
  assert not re.search(r"^\s*(from dvl_jax|import dvl_jax\.)", dvl.__doc__, flags=re.M)


def test_import_is_cheap_and_train_is_the_training_function():
  """`import dvl_jax` loads no framework; `dvl.train` is the training entry point, and importing the training
  subpackage (`dvl_jax.training`, named apart from it) changes nothing."""
  script = ("import sys\n"
            "import dvl_jax as dvl\n"
            "heavy = {m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'torch', 'transformers'}\n"
            "assert not heavy, heavy\n"
            "import dvl_jax.training.loop as loop\n"
            "assert dvl.train is loop.train, dvl.train\n")
  done = subprocess.run([sys.executable, "-c", script], env=user_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
