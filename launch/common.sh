# shellcheck shell=bash
# shellcheck disable=SC2034  # sets variables for the scripts that source it
# Sourced by every launch script: options with --help, the one `run` that every command goes
# through (--dry-run prints it instead), the mesh rule and the `dvl train` command line.
# Needs bash >= 4.4 (namerefs, empty arrays under `set -u`).

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "${0##*/}: error: needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$(cd "$(dirname "$0")" && pwd)/${0##*/}"
DRY_RUN=0
ARGS=()        # the command line without --dry-run (slurm_train.sh submits itself with it)
EXTRA_ARGS=()  # after `--`: --config.KEY=VALUE overrides for dvl train
_SPECS=()      # "kind|name|VAR|help" per declared option

die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# --- options: declare with opt/need/flag/multi, then parse_opts "$@" -------------------------------
# A value option's default is its variable's value when declared, so --help always prints the truth.
opt() { _SPECS+=("value|$1|$2|$3"); }
need() { _SPECS+=("need|$1|$2|$3"); }   # a value option that must be given
flag() { _SPECS+=("flag|$1|$2|$3"); }   # --NAME sets VAR=1
multi() { _SPECS+=("multi|$1|$2|$3"); } # repeatable, appended to the array VAR

usage() {
  local spec kind name var help
  printf '%s\n\noptions:\n' "$USAGE"
  for spec in "${_SPECS[@]}"; do
    IFS='|' read -r kind name var help <<<"$spec"
    case $kind in
      value) printf '  --%-24s %s (default: %s)\n' "$name VALUE" "$help" "${!var:-none}" ;;
      need) printf '  --%-24s %s (required)\n' "$name VALUE" "$help" ;;
      multi) printf '  --%-24s %s (repeatable)\n' "$name VALUE" "$help" ;;
      flag) printf '  --%-24s %s\n' "$name" "$help" ;;
    esac
  done
  printf '  --%-24s %s\n  -h, --%-20s %s\n' dry-run "print the commands instead of running them" help "this help"
}

_append() {
  local -n _array=$1
  _array+=("$2")
}

parse_opts() {
  local arg name value spec kind oname var found
  while (($#)); do
    arg=$1
    shift
    case $arg in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --) EXTRA_ARGS=("$@"); ARGS+=(-- "$@"); break ;;
      --*) name=${arg%%=*} ;;
      *) die "unexpected argument '$arg' (dvl train overrides go after --)" ;;
    esac
    found=
    for spec in "${_SPECS[@]}"; do
      IFS='|' read -r kind oname var _ <<<"$spec"
      if [[ $oname == "${name#--}" ]]; then found=1; break; fi
    done
    [[ -n $found ]] || die "unknown option $name (see --help)"
    if [[ $kind == flag ]]; then
      [[ $arg == "$name" ]] || die "$name takes no value"
      printf -v "$var" 1
      ARGS+=("$arg")
      continue
    fi
    if [[ $arg == *=* ]]; then
      value=${arg#*=}
    else
      (($#)) || die "$name needs a value"
      value=$1
      shift
    fi
    if [[ $kind == multi ]]; then _append "$var" "$value"; else printf -v "$var" '%s' "$value"; fi
    ARGS+=("$name=$value")
  done
  for spec in "${_SPECS[@]}"; do
    IFS='|' read -r kind name var _ <<<"$spec"
    [[ $kind != need || -n ${!var} ]] || die "--$name is required (see --help)"
  done
}

# --- running -----------------------------------------------------------------------------------------
# Prints words as one line that a POSIX shell splits back into exactly these words.
shell_join() {
  local word sep=
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      printf '%s%s' "$sep" "$word"
    elif [[ $word != *\'* ]]; then
      printf "%s'%s'" "$sep" "$word"
    elif [[ $word != *[\"\$\`\\!]* ]]; then
      printf '%s"%s"' "$sep" "$word" # a remote command line quoted once reads better than with '\''
    else
      printf "%s'%s'" "$sep" "${word//\'/\'\\\'\'}"
    fi
    sep=' '
  done
}

run() {
  if ((DRY_RUN)); then
    shell_join "$@"
    echo
  else
    "$@"
  fi
}

# A line for the reader: a `#` comment among the dry-run commands, stderr otherwise.
note() {
  if ((DRY_RUN)); then echo "# $*"; else echo "${0##*/}: $*" >&2; fi
}

# spawn runs a command in the background (dry-run: prints it); wait_all waits for every spawned
# command and, at the first failure, stops the others.
PIDS=()
spawn() {
  if ((DRY_RUN)); then
    run "$@"
  else
    run "$@" &
    PIDS+=($!)
  fi
}
wait_all() {
  local _pid
  trap 'kill "${PIDS[@]}" 2>/dev/null; exit 130' INT TERM
  for _pid in "${PIDS[@]}"; do
    wait -n || {
      kill "${PIDS[@]}" 2>/dev/null || true
      die "a process exited with an error; stopped the others"
    }
  done
}

# --- the training command ----------------------------------------------------------------------------
positive_int() {
  [[ $1 =~ ^[1-9][0-9]*$ ]] || die "$2 must be a positive integer, got '$1'"
}

# Sets MESH="data,fsdp,tensor" for $1 devices: fsdp takes every device that --data and --tensor leave.
mesh_for() {
  positive_int "$DATA_AXIS" --data
  positive_int "$TENSOR_AXIS" --tensor
  (($1 % (DATA_AXIS * TENSOR_AXIS) == 0)) ||
    die "--data $DATA_AXIS x --tensor $TENSOR_AXIS does not divide the $1 devices"
  MESH="$DATA_AXIS,$(($1 / (DATA_AXIS * TENSOR_AXIS))),$TENSOR_AXIS"
}

train_opts() {
  CONFIG=configs/stage2.py
  WORKDIR=
  INIT_CHECKPOINT=
  DATA_JSON=
  IMAGE_FOLDER=
  DATA_AXIS=1
  TENSOR_AXIS=1
  RESUME=0
  ENVS=()
  opt config CONFIG "experiment config in the repo: configs/stage1.py (connector alignment) or configs/stage2.py (BD3-LM finetuning)"
  need workdir WORKDIR "checkpoints and logs: a gs:// URL or a directory every process sees"
  opt init-checkpoint INIT_CHECKPOINT "dvl checkpoint to start from (--config.init_checkpoint); none keeps the config's"
  opt data-json DATA_JSON "LLaVA-format training JSON (--config.data.json); none keeps the config's"
  opt image-folder IMAGE_FOLDER "folder the JSON's image paths are relative to (--config.data.image_folder); none keeps the config's"
  opt data DATA_AXIS "mesh data axis size"
  opt tensor TENSOR_AXIS "mesh tensor axis size (at most the KV heads: 4 for 7B, 2 for 3B)"
  flag resume RESUME "continue from the latest checkpoint in --workdir"
  multi env ENVS "KEY=VALUE set for every training process; replaces a default of the same KEY"
}

# Sets TRAIN to the `dvl train` argv (relative to the repo) for $1 devices.
train_command() {
  local arg
  mesh_for "$1"
  [[ $CONFIG == *.py ]] || die "--config must be a configs/*.py file, got '$CONFIG'"
  TRAIN=(.venv/bin/dvl train --config "$CONFIG" --workdir "$WORKDIR" "--config.mesh=$MESH")
  if [[ -n $INIT_CHECKPOINT ]]; then TRAIN+=("--config.init_checkpoint=$INIT_CHECKPOINT"); fi
  if [[ -n $DATA_JSON ]]; then TRAIN+=("--config.data.json=$DATA_JSON"); fi
  if [[ -n $IMAGE_FOLDER ]]; then TRAIN+=("--config.data.image_folder=$IMAGE_FOLDER"); fi
  if ((RESUME)); then TRAIN+=(--resume); fi
  for arg in "${EXTRA_ARGS[@]}"; do
    [[ $arg =~ ^--config\.[A-Za-z0-9_.]+= ]] || die "after -- only --config.KEY=VALUE overrides go, got '$arg'"
    [[ $arg != --config.mesh=* ]] || die "set the mesh with --data and --tensor (fsdp takes the rest), not --config.mesh"
    TRAIN+=("$arg")
  done
}

# Sets ENV=(env KEY=VALUE ...): the defaults given as arguments, each replaced by an --env of the same KEY.
env_command() {
  local kv
  local -A given=()
  for kv in "${ENVS[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$kv'"
    given[${kv%%=*}]=1
  done
  ENV=(env)
  for kv in "$@"; do
    [[ -n ${given[${kv%%=*}]:-} ]] || ENV+=("$kv")
  done
  ENV+=("${ENVS[@]}")
}
