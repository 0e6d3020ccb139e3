#!/usr/bin/env bash
# The hf backend's 03_train on 1, 2, ... GPUs of one node (FSDP2): the same random-weight model, data, PTQ result and
# steps in each run, then 04_export and 05_verify of the last run; prints step time, tokens/s, peak memory per GPU
# against the memory plan, and the largest loss difference to the first run of the same method.
#   python benchmarks/llama8b_inputs.py inputs INPUTS                 # tokenizer and ~2000-token conversations
#   benchmarks/hf_fsdp.sh INPUTS WORK SHAPE "RUNS" [steps] [topk]
#   benchmarks/hf_fsdp.sh INPUTS /tmp/fsdp 1b "1 2 2+once" 12 64      # ~1.5B shape, cached teacher
#   benchmarks/hf_fsdp.sh INPUTS /tmp/fsdp 8b "2 2+bf16" 8 0          # 8B shape on 2 GPUs, live teacher, BF16
# SHAPE: 1b or 8b (benchmarks/llama8b_inputs.py); topk 0 runs the live teacher. A run is a GPU count, plus
# "+once" (train.fsdp_gather_once_per_step) and/or "+bf16" (a BF16 fine-tune: --algorithm no_quant, cross-entropy,
# from its own 02_ptq). Stage code runs in-process (benchmarks/run_stages_inprocess.py), 03_train under torchrun.
# HF_FSDP_SETTINGS adds CLI settings (a CPU rehearsal: SHAPE tiny, "--device cpu"); HF_FSDP_VERIFY=0 skips
# 04_export/05_verify; HF_FSDP_KEEP=0 deletes each run's trained weights once the next run starts (the 8B ones are
# 32 GB).
set -euo pipefail
inputs=$1 work=$2 shape=$3 runs=$4 steps=${5:-12} topk=${6:-64}
here=$(cd "$(dirname "$0")" && pwd)
model=$work/llama_${shape}_random
mkdir -p "$work"
stamp() { echo "[hf_fsdp $(date +%H:%M:%S)] $*"; }
settings=(--recipe "$here/recipes/hf_fsdp.yaml" --model-name "$model" --data-path "$inputs/chat" --log-dir "$work/runs"
          --set "train.steps=$steps" ${HF_FSDP_SETTINGS:-})
if [ "$topk" != 0 ]; then settings+=(--set "train.teacher_cache_topk=$topk"); fi
bf16=(--algorithm no_quant --set train.method=qat)

if [ ! -f "$model/config.json" ]; then
    stamp "random-weight model ($shape)"
    if [ "$shape" = tiny ]; then
        python3 "$here/llama8b_inputs.py" model "$inputs/tokenizer" "$model" --tiny
    else
        python3 "$here/llama8b_inputs.py" model "$inputs/tokenizer" "$model" --shape "$shape"
    fi
fi
stamp "00_data 01_import 02_ptq (one GPU)"
# Planned for the most GPUs of the runs (an 8B QAD fits no single GPU; the GPU count is no input of these stages).
most=$(for run in $runs; do echo "${run%%+*}"; done | sort -n | tail -1)
python3 "$here/run_stages_inprocess.py" "${settings[@]}" --train-gpus "$most" --experiment prepared \
    --stages 00_data 01_import 02_ptq
last=""
for run in $runs; do
    gpus=${run%%+*} name=gpus_${run//+/_} extra=() prepared=prepared
    case $run in *+once*) extra+=(--set train.fsdp_gather_once_per_step=true) ;;
                 *) extra+=(--set train.fsdp_gather_once_per_step=false) ;; esac
    case $run in *+bf16*) extra+=("${bf16[@]}") prepared=prepared_bf16 ;; esac
    if [ "$prepared" = prepared_bf16 ] && [ ! -d "$work/runs/prepared_bf16/02_ptq" ]; then
        stamp "02_ptq without quantization (BF16 fine-tune)"
        mkdir -p "$work/runs/prepared_bf16"
        cp -al "$work/runs/prepared"/0[01]_* "$work/runs/prepared_bf16/"
        python3 "$here/run_stages_inprocess.py" "${settings[@]}" "${bf16[@]}" --train-gpus "$most" \
            --experiment prepared_bf16 --stages 02_ptq
    fi
    rm -rf "$work/runs/$name"
    mkdir -p "$work/runs/$name"
    # Hard links: the 8B inputs are ~50 GB, and no stage writes into the folders it reads.
    cp -al "$work/runs/$prepared"/0[012]_* "$work/runs/$name/" 2>/dev/null || \
        cp -r "$work/runs/$prepared"/0[012]_* "$work/runs/$name/"
    stamp "03_train $run"
    python3 - "${settings[@]}" "${extra[@]}" --experiment "$name" --train-gpus "$gpus" <<PY
import sys
sys.path.insert(0, "$here/../nemo_run")
from qatflow.cli import load_config
from qatflow.memory_plan import plan_for
config, _ = load_config(sys.argv[1:])
print(plan_for(config).describe(config.run.gpu_memory_gb))
PY
    python3 -m torch.distributed.run --nproc-per-node "$gpus" "$here/run_stages_inprocess.py" "${settings[@]}" \
        "${extra[@]}" --experiment "$name" --train-gpus "$gpus" --stages 03_train
    # The previous run's weights are no longer needed (the last run's are, by 04_export).
    if [ "${HF_FSDP_KEEP:-1}" = 0 ] && [ -n "$last" ]; then rm -rf "$work/runs/$last/03_train/model"; fi
    last=$name last_extra=("${extra[@]}")
done
if [ "${HF_FSDP_VERIFY:-1}" != 0 ]; then
    stamp "04_export 05_verify of $last (one GPU)"
    python3 "$here/run_stages_inprocess.py" "${settings[@]}" "${last_extra[@]}" --train-gpus "$most" --experiment "$last" \
        --stages 04_export 05_verify || stamp "05_verify failed"
fi
python3 - "$work/runs" $runs <<'PY'
import json, sys
from pathlib import Path
runs, names = Path(sys.argv[1]), sys.argv[2:]
def read(name, stage):
    path = runs / name / stage / "manifest.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}
def losses(name):
    path = runs / name / "03_train" / "train_log.jsonl"
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()] if path.is_file() else []
first = {}  # the first run of each method: the others' losses are compared with it
base = {}  # median step of each GPU count's first quantized run, for the step / BF16 step column
print(f"\n{'run':>8} {'median step s':>13} {'tokens/s/GPU':>12} {'peak GiB/GPU':>12} {'final loss':>11} "
      f"{'max |loss diff|':>15} {'step / BF16':>11}")
rows = []
for run in names:
    name = "gpus_" + run.replace("+", "_")
    m = read(name, "03_train")
    gpus = int(run.split("+")[0])
    method = "bf16" if "bf16" in run else "nvfp4"
    first.setdefault(method, name)
    diff = max((abs(a - b) for a, b in zip(losses(name), losses(first[method]))), default=float("nan"))
    per_gpu = round(m["tokens_per_second"] / gpus) if m.get("tokens_per_second") else None
    rows.append((run, gpus, method, m, per_gpu, diff))
bf16_step = {gpus: m.get("median_step_seconds") for run, gpus, method, m, *_ in rows if method == "bf16"}
for run, gpus, method, m, per_gpu, diff in rows:
    step, ref = m.get("median_step_seconds"), bf16_step.get(gpus)
    ratio = f"{step / ref:.2f}x" if step and ref else "-"
    print(f"{run:>8} {step!s:>13} {per_gpu!s:>12} {m.get('peak_memory_gib')!s:>12} {m.get('final_loss')!s:>11} "
          f"{diff:>15.3g} {ratio:>11}")
verify = read("gpus_" + names[-1].replace("+", "_"), "05_verify")
if verify:
    print(f"\n05_verify of {names[-1]}: verified {verify.get('verified')}, KL(student || export) all tokens "
          f"{verify.get('kl_all')}")
PY
