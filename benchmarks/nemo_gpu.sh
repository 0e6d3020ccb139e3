#!/usr/bin/env bash
# The nemo backend on the embedded model: one GPU, then tensor parallelism 2 on two GPUs (when there are two),
# stage code run in-process (benchmarks/run_stages_inprocess.py), multi-GPU stages under torchrun; after each
# run, benchmarks/nemo_export_drift.py compares the student with its export.
#   benchmarks/nemo_gpu.sh <model: GGUF file or HF folder> <chat data folder> <output folder> [steps] [runs: one_gpu tp2]
#                          [more flow arguments, e.g. --set eval.task_limit=null]
set -euo pipefail
model=$1 data=$2 out=$3 steps=${4:-190} runs=${5:-"one_gpu tp2"}
here=$(cd "$(dirname "$0")" && pwd)
common=(--recipe "$here/recipes/smollm2_nemo_gpu.yaml" --model-name "$model" --data-path "$data" --log-dir "$out"
        --set "train.steps=$steps" "${@:6}")
if [[ " $runs " == *" one_gpu "* ]]; then
    python3 "$here/run_stages_inprocess.py" "${common[@]}" --experiment one_gpu
    python3 "$here/nemo_export_drift.py" "${common[@]}" --experiment one_gpu
fi
if [[ " $runs " == *" tp2 "* ]] && [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    tp2=("${common[@]}" --experiment tp2 --ptq-gpus 2 --train-gpus 2 --tensor-parallelism 2)
    python3 "$here/run_stages_inprocess.py" "${tp2[@]}" --stages 00_data 01_import
    torchrun --nproc-per-node 2 "$here/run_stages_inprocess.py" "${tp2[@]}" --stages 02_ptq 03_train
    python3 "$here/run_stages_inprocess.py" "${tp2[@]}"
    python3 "$here/nemo_export_drift.py" "${tp2[@]}"
fi
