"""The notebooks run top to bottom on the tiny model and draw their figures; git holds them without outputs.

Each notebook runs with nbclient in a fresh kernel, in a temporary working directory. The kernel is this
interpreter (`sys.executable`, via a kernelspec written for the test, not whatever `python` is on PATH)
and imports this checkout (repo root on PYTHONPATH), so the notebooks' install cells are no-ops.
Its environment is the test process's minus `XLA_FLAGS`: conftest's 8 fake CPU devices are for the
sharding tests, a notebook runs like a user's kernel on one device.
"""

import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.user_process import ROOT, user_env

NOTEBOOKS = os.path.join(ROOT, "notebooks")
KERNEL = "dvl-notebook-test"


def _kernel_manager(tmp_path) -> KernelManager:
  spec_dir = tmp_path / "kernels" / KERNEL
  spec_dir.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
  return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _kernel_env(tmp_path) -> dict[str, str]:
  env = user_env()
  env["IPYTHONDIR"] = str(tmp_path / "ipython")  # no user profile or startup files
  env["MPLCONFIGDIR"] = str(tmp_path / "matplotlib")
  return env


def _run(name: str, tmp_path, cell_timeout: int, parameters: str = "") -> nbformat.NotebookNode:
  """Executes the notebook; `parameters` (code) runs right after its `parameters` cell, as papermill does."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  if parameters:
    at = next(i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters))
  workdir = tmp_path / "work"
  workdir.mkdir()
  km = _kernel_manager(tmp_path)
  client = NotebookClient(nb, km=km, timeout=cell_timeout, resources={"metadata": {"path": str(workdir)}})
  try:
    client.execute(env=_kernel_env(tmp_path))  # raises CellExecutionError, naming the cell, if one fails
  finally:  # nbclient leaves a kernel it did not start running (it kept a core busy for the rest of the suite)
    if km.has_kernel:
      km.shutdown_kernel(now=True)
  return nb


def _outputs(nb: nbformat.NotebookNode, cell_id: str) -> list:
  return next(cell for cell in nb.cells if cell.get("id") == cell_id).outputs


def _pngs(outputs: list) -> int:
  return sum("image/png" in o.get("data", {}) for o in outputs)


def _assert_ran_clean(nb: nbformat.NotebookNode) -> None:
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.execution_count for cell in code), "a code cell did not run"
  errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
  assert not errors, errors


@pytest.mark.parametrize("name", ["quickstart.ipynb", "train_tiny.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
  assert any("parameters" in cell.metadata.get("tags", ()) for cell in code)


def test_quickstart_runs_and_plots_the_trajectory_and_the_tau_sweep(tmp_path):
  nb = _run("quickstart.ipynb", tmp_path, cell_timeout=600)
  _assert_ran_clean(nb)
  assert _pngs(_outputs(nb, "image")) == 1
  assert _pngs(_outputs(nb, "trajectory")) == 1
  assert _pngs(_outputs(nb, "sweep")) == 1
  converted = "".join(o.get("text", "") for o in _outputs(nb, "convert"))
  assert "images of 3136 to 3136 pixels" in converted, converted  # the bounds saved with the tiny checkpoint
  sweep = "".join(o.get("text", "") for o in _outputs(nb, "sweep"))
  assert sweep.count("tokens/forward") == 5, sweep  # one line per threshold
  assert os.path.isfile(tmp_path / "work" / "quickstart_run" / "dvl" / "tokenizer.json")


@pytest.mark.slow
def test_train_tiny_runs_both_stages_and_plots_the_loss_curves(tmp_path):
  size = ("dataclasses.replace(dvl.train_demo.QUICK, train_examples=128, eval_examples=32, short_first_steps=10, "
          "ar_steps=10, diffusion_steps=10)")
  nb = _run("train_tiny.ipynb", tmp_path, cell_timeout=900, parameters=f"import dataclasses\nSIZE = {size}")
  _assert_ran_clean(nb)
  assert _pngs(_outputs(nb, "loss")) == 1
  assert _pngs(_outputs(nb, "data")) == 1 and _pngs(_outputs(nb, "answers")) == 1
  table = "".join(o.get("data", {}).get("text/markdown", "") for o in _outputs(nb, "eval"))
  assert sum(line.startswith("| ") for line in table.splitlines()) == 5, table  # header + 4 decoders
  run = tmp_path / "work" / "train_tiny_run"
  for stage in ("ar_short", "ar", "diffusion"):
    with open(run / stage / "metrics.jsonl") as f:
      assert len(f.readlines()) >= 2, stage
