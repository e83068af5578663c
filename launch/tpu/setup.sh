#!/usr/bin/env bash
# Installs dvl_jax on every worker of a slice: a checkout at --ref, a Python 3.11 venv with the locked
# dependencies, libtpu (jax[tpu]) and gcsfs (Orbax's gs:// directory operations go through it).
set -euo pipefail
# shellcheck source=SCRIPTDIR/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu.sh"

USAGE="usage: setup.sh [options]
Clone dvl_jax and install it into a venv on every worker (gcloud compute tpus tpu-vm ssh --worker=all).
Safe to run again: it moves the checkout to --ref and reinstalls."
tpu_opts
REPO_URL=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)
REF=main
REPO_DIR=dvl_jax
PYTHON=python3.11
PIP="jax[tpu]==0.10.2 gcsfs==2026.10.1"
opt repo-url REPO_URL "git URL the workers clone; none = this checkout's origin (there is none here: pass it)"
opt ref REF "branch, tag or commit to check out"
opt repo-dir REPO_DIR "checkout directory on each worker, relative to the home directory"
opt python PYTHON "interpreter for the venv (installed with apt when missing)"
opt pip PIP "packages installed on top of requirements.lock, space-separated"
parse_opts "$@"

[[ -n $REPO_URL ]] || die "--repo-url is required (this checkout has no origin remote)"
read -ra pip_packages <<<"$PIP"
steps=(
  "set -e"
  # JAX warns that TPU runtime start-up and shutdown are much slower on v5e and newer without these.
  "sudo sh -c 'echo always > /sys/kernel/mm/transparent_hugepage/enabled'"
  "command -v $(shell_join "$PYTHON") >/dev/null || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(shell_join "$PYTHON" "$PYTHON-venv"); }"
  "[ -d $(shell_join "$REPO_DIR/.git") ] || git clone -q $(shell_join "$REPO_URL" "$REPO_DIR")"
  "cd $(shell_join "$REPO_DIR")"
  "git fetch -q origin $(shell_join "$REF")"
  "git checkout -q --detach FETCH_HEAD"
  "$(shell_join "$PYTHON") -m venv .venv"
  ".venv/bin/pip install -q -r requirements.lock"
  ".venv/bin/pip install -q $(shell_join "${pip_packages[@]}")"
  ".venv/bin/pip install -q --no-deps -e '.[tpu]'"
  # Smoke test: every worker lists its TPU devices.
  ".venv/bin/python -c 'import jax; print(jax.local_devices())'"
)
remote=$(printf '%s; ' "${steps[@]}")
on_all_workers "${remote%; }"
