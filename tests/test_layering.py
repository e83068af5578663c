"""The architecture's rules (ARCHITECTURE.md), checked on the import graph and the source text.

Module-level imports only: a function-level import is a deliberate late binding (e.g. `ModelConfig.from_hf`
asking the family registry for a reader) and is named in ARCHITECTURE.md.
"""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dvl_jax"


def _modules(folder: str) -> list[pathlib.Path]:
  """The modules of `folder` and its subfolders, but those of a subfolder with a rule of its own in LAYERS."""
  own_rules = [PACKAGE / f for f, _ in LAYERS if f != folder and f.startswith(folder + "/")]
  return sorted(p for p in (PACKAGE / folder).rglob("*.py") if not any(r in p.parents for r in own_rules))


def _top_level_imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
  return {n for n in names if n.startswith("dvl_jax")}


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
  found = {}
  for path in _modules(folder):
    bad = sorted(n for n in _top_level_imports(path) if n.startswith(forbidden))
    if bad:
      found[str(path.relative_to(ROOT))] = bad
  return found


def test_the_package_top_level_holds_folders_only():
  assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]


LAYERS = [
    ("core", ("dvl_jax.attention", "dvl_jax.data", "dvl_jax.models", "dvl_jax.diffusion", "dvl_jax.training",
              "dvl_jax.parallel", "dvl_jax.checkpoints", "dvl_jax.cli", "dvl_jax.demos")),
    ("data", ("dvl_jax.models", "dvl_jax.diffusion", "dvl_jax.training")),
    ("parallel", ("dvl_jax.models", "dvl_jax.diffusion", "dvl_jax.data")),
    ("attention", ("dvl_jax.models", "dvl_jax.diffusion", "dvl_jax.data", "dvl_jax.training")),
    ("diffusion", ("dvl_jax.data", "dvl_jax.training", "dvl_jax.cli", "dvl_jax.models.qwen", "dvl_jax.models.decoder",
                   "dvl_jax.models.rope")),
    ("training", ("dvl_jax.models.qwen", "dvl_jax.cli")),
    ("demos", ("dvl_jax.cli",)),
    ("serving", ("dvl_jax.data", "dvl_jax.training", "dvl_jax.cli", "dvl_jax.models.qwen", "dvl_jax.models.decoder")),
    # The HTTP front end turns chat messages into prompts, so it reads the processor; the engine does not.
    ("serving/http", ("dvl_jax.training", "dvl_jax.cli", "dvl_jax.models.qwen", "dvl_jax.models.decoder")),
    ("evaluation", ("dvl_jax.models", "dvl_jax.training", "dvl_jax.cli", "dvl_jax.parallel", "dvl_jax.attention")),
    ("checkpoints", ("dvl_jax.models.qwen", "dvl_jax.cli")),
]


@pytest.mark.parametrize("folder,forbidden", LAYERS)
def test_layers_import_only_what_is_below_them(folder, forbidden):
  assert _offenders(folder, forbidden) == {}


def test_only_a_family_reaches_into_its_own_modules():
  """Outside `models/<family>/` a model is an `interface.DiffusionLM`: no family module imports, no submodules."""
  families = [p.name for p in (PACKAGE / "models").iterdir() if p.is_dir() and p.name != "__pycache__"]
  reach = re.compile(r"\bmodel\.(visual|text|lm_head|vision_tower|projector)\b")
  for path in PACKAGE.rglob("*.py"):
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] == "models" or rel.parts[0] == "testing" or rel == pathlib.Path("__init__.py"):
      continue
    text = path.read_text()
    assert not reach.search(text), f"{rel} reaches into a model's submodules"
    for family in families:
      assert f"dvl_jax.models.{family}" not in text, f"{rel} names the {family} family's modules"
    assert not re.search(r"isinstance\([^)]*(Qwen|DecoderLM|Qwen2LM)", text), f"{rel} checks a model class"


def test_the_demos_call_the_library_not_the_command_line():
  """`dvl demo` is a command; the demo calling `cli.main` back made an import loop."""
  for path in _modules("demos"):
    assert not re.search(r"dvl_jax\.cli|import cli\b", path.read_text()), path.name
