#!/usr/bin/env bash
# The Llama-3.1-8B shape through the nemo backend on two GPUs (TP=2 for PTQ and training), every stage of the flow,
# then QAT and a BF16 fine-tune (`--algorithm no_quant`, cross-entropy) through the same NeMo path for the step
# ratios. Stage code runs in-process (benchmarks/run_stages_inprocess.py), multi-GPU stages under torchrun.
#   python benchmarks/llama8b_inputs.py inputs INPUTS          # here: tokenizer and long conversations
#   benchmarks/nemo_8b.sh INPUTS WORK RESULTS [qad_steps] [ratio_steps]
# WORK needs ~100 GB of disk: each later run replaces the stages it changes, and training work folders of finished
# runs are removed. NEMO_8B_RUNS picks the runs (default "qad qat bf16"; the QAD run is every stage of the flow). NEMO_8B_SETTINGS adds CLI settings (a CPU rehearsal with a tiny model already in
# WORK/llama31_8b_random: "--nemo-env cpu --set ...").
set -euo pipefail
inputs=$1 work=$2 results=$3 qad_steps=${4:-20} ratio_steps=${5:-10}
runs=" ${NEMO_8B_RUNS:-qad qat bf16} "
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work" "$results"
model=$work/llama31_8b_random
experiment=$work/runs/llama8b
common=(--recipe "$here/recipes/llama31_8b_nemo_2gpu.yaml" --model-name "$model" --data-path "$inputs/chat"
        --log-dir "$work/runs" --experiment llama8b --nemo-env gpu-local ${NEMO_8B_SETTINGS:-})

stamp() { echo "[nemo_8b $(date +%H:%M:%S)] $*"; }
in_process() { python3 "$here/run_stages_inprocess.py" "${common[@]}" "$@"; }
on_two_gpus() { python3 -m torch.distributed.run --nproc-per-node 2 "$here/run_stages_inprocess.py" "${common[@]}" "$@"; }
keep() {  # a finished run's manifests and report, before a later run replaces its stages
    local name=$1
    mkdir -p "$results/$name"
    for stage in "$experiment"/[0-9]*; do
        [ -f "$stage/manifest.json" ] && cp "$stage/manifest.json" "$results/$name/$(basename "$stage").json"
    done
    [ -f "$experiment/09_report/report.md" ] && cp "$experiment/09_report/report.md" "$results/$name/"
    [ -f "$experiment/03_train/train_log.jsonl" ] && cp "$experiment/03_train/train_log.jsonl" "$results/$name/"
    rm -rf "$experiment"/.03_train.work
    df -h "$work" | tail -1
}

if [ ! -f "$experiment/01_import/manifest.json" ] && [ ! -f "$model/config.json" ]; then
    stamp "random-weight model"
    python3 "$here/llama8b_inputs.py" model "$inputs/tokenizer" "$model"
fi
if [[ $runs == *" qad "* ]]; then
    stamp "QAD: 00_data 01_import"
    in_process --stages 00_data 01_import
    stamp "QAD: 02_ptq 03_train on two GPUs"
    on_two_gpus --stages 02_ptq 03_train --set "train.steps=$qad_steps"
    for stage in 04_export 05_verify 06_eval_bf16 07_eval_ptq 08_eval_trained 09_report; do
        stamp "QAD: $stage"
        in_process --stages "$stage" --set "train.steps=$qad_steps" || stamp "QAD: $stage failed"
    done
    keep qad
fi
if [[ $runs == *" qat "* ]]; then
    stamp "QAT: 03_train on two GPUs (the same NVFP4 02_ptq)"
    on_two_gpus --stages 03_train --set train.method=qat --set "train.steps=$ratio_steps"
    keep qat
fi
if [[ $runs == *" bf16 "* ]]; then
    stamp "BF16 fine-tune: 02_ptq (no_quant) 03_train on two GPUs"
    on_two_gpus --stages 02_ptq 03_train --algorithm no_quant --set train.method=qat --set "train.steps=$ratio_steps"
    keep bf16
fi
stamp "done"
