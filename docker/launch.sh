#!/usr/bin/env bash
# Opens an interactive shell in the qatflow image with this checkout, a data folder and the HF cache mounted and
# every GPU visible. Anything after `--` runs instead of the shell.
#   docker/launch.sh                                  shell in qatflow:latest
#   docker/launch.sh --data ~/chats -- python nemo_run/nemo_qat_flow.py --distill --data-path /data/chats.jsonl
#   docker/launch.sh --dry-run                        print the docker command, run nothing
# Settings (flag, else environment variable, else default):
#   --image     QATFLOW_IMAGE     qatflow:latest
#   --repo      QATFLOW_REPO      this checkout             -> /workspace/qatflow (logs/ lands here)
#   --data      QATFLOW_DATA      ~/qatflow-data            -> /data
#   --hf-cache  QATFLOW_HF_CACHE  $HF_HOME or ~/.cache/huggingface -> /hf_cache
#   --gpus      QATFLOW_GPUS      all                       (docker --gpus value, e.g. '"device=0,1"')
set -euo pipefail

repo_default=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${QATFLOW_IMAGE:-qatflow:latest}
repo=${QATFLOW_REPO:-$repo_default}
data=${QATFLOW_DATA:-$HOME/qatflow-data}
hf_cache=${QATFLOW_HF_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}}
gpus=${QATFLOW_GPUS:-all}
dry_run=0

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) image=${2:?launch.sh: --image needs a value}; shift 2 ;;
    --repo) repo=${2:?launch.sh: --repo needs a value}; shift 2 ;;
    --data) data=${2:?launch.sh: --data needs a value}; shift 2 ;;
    --hf-cache) hf_cache=${2:?launch.sh: --hf-cache needs a value}; shift 2 ;;
    --gpus) gpus=${2:?launch.sh: --gpus needs a value}; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

# A TTY only when there is one, so the same command works from scripts.
tty_flags=(-i)
if [[ -t 0 && -t 1 ]]; then tty_flags=(-it); fi

cmd=(docker run --rm "${tty_flags[@]}"
  --gpus "$gpus"
  # NCCL and PyTorch dataloaders share memory through /dev/shm; the default 64 MB is far too small.
  --ipc=host
  # NCCL pins host memory and megatron-core threads need deep stacks.
  --ulimit memlock=-1 --ulimit stack=67108864
  -v "$repo:/workspace/qatflow"
  -v "$data:/data"
  -v "$hf_cache:/hf_cache"
  -e HF_HOME=/hf_cache
  # By name only: docker copies the value from this environment, so it never shows in the command line.
  -e HF_TOKEN
  -w /workspace/qatflow
  "$image")
if [[ $# -gt 0 ]]; then cmd+=("$@"); else cmd+=(bash); fi

if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
mkdir -p "$data" "$hf_cache"
exec "${cmd[@]}"
