#!/usr/bin/env bash
# The hf backend's 03_train on 1, 2, ... GPUs of one node (FSDP2): the same random-weight model, data, PTQ result and
# steps on each GPU count, then 04_export and 05_verify of the run on the most GPUs; prints step time, tokens/s,
# peak memory per GPU against the memory plan, and the largest loss difference to the run on the fewest GPUs.
#   python benchmarks/llama8b_inputs.py inputs INPUTS                 # tokenizer and ~2000-token conversations
#   benchmarks/hf_fsdp.sh INPUTS WORK SHAPE "GPU COUNTS" [steps] [topk]
#   benchmarks/hf_fsdp.sh INPUTS /tmp/fsdp 1b "1 2" 12 64             # ~1.5B shape, 1 then 2 GPUs, cached teacher
#   benchmarks/hf_fsdp.sh INPUTS /tmp/fsdp 8b "2" 8 0                  # 8B shape on 2 GPUs, live teacher
# SHAPE: 1b or 8b (benchmarks/llama8b_inputs.py); topk 0 runs the live teacher. Stage code runs in-process
# (benchmarks/run_stages_inprocess.py), 03_train under torchrun. HF_FSDP_SETTINGS adds CLI settings (a CPU
# rehearsal: SHAPE tiny, "--device cpu").
set -euo pipefail
inputs=$1 work=$2 shape=$3 counts=$4 steps=${5:-12} topk=${6:-64}
here=$(cd "$(dirname "$0")" && pwd)
model=$work/llama_${shape}_random
mkdir -p "$work"
stamp() { echo "[hf_fsdp $(date +%H:%M:%S)] $*"; }
settings=(--recipe "$here/recipes/hf_fsdp.yaml" --model-name "$model" --data-path "$inputs/chat" --log-dir "$work/runs"
          --set "train.steps=$steps" ${HF_FSDP_SETTINGS:-})
if [ "$topk" != 0 ]; then settings+=(--set "train.teacher_cache_topk=$topk"); fi

if [ ! -f "$model/config.json" ]; then
    stamp "random-weight model ($shape)"
    if [ "$shape" = tiny ]; then
        python3 "$here/llama8b_inputs.py" model "$inputs/tokenizer" "$model" --tiny
    else
        python3 "$here/llama8b_inputs.py" model "$inputs/tokenizer" "$model" --shape "$shape"
    fi
fi
stamp "00_data 01_import 02_ptq (one GPU)"
python3 "$here/run_stages_inprocess.py" "${settings[@]}" --experiment prepared --stages 00_data 01_import 02_ptq
last=""
for gpus in $counts; do
    name=gpus_$gpus
    rm -rf "$work/runs/$name"
    mkdir -p "$work/runs/$name"
    # Hard links: the 8B inputs are ~50 GB, and no stage writes into the folders it reads.
    cp -al "$work/runs/prepared"/0[012]_* "$work/runs/$name/" 2>/dev/null || \
        cp -r "$work/runs/prepared"/0[012]_* "$work/runs/$name/"
    stamp "03_train on $gpus GPU(s)"
    python3 - "${settings[@]}" --experiment "$name" --train-gpus "$gpus" <<PY
import sys
sys.path.insert(0, "$here/../nemo_run")
from qatflow.cli import load_config
from qatflow.memory_plan import plan_for
config, _ = load_config(sys.argv[1:])
print(plan_for(config).describe(config.run.gpu_memory_gb))
PY
    python3 -m torch.distributed.run --nproc-per-node "$gpus" "$here/run_stages_inprocess.py" "${settings[@]}" \
        --experiment "$name" --train-gpus "$gpus" --stages 03_train
    last=$name
done
stamp "04_export 05_verify of $last (one GPU)"
python3 "$here/run_stages_inprocess.py" "${settings[@]}" --experiment "$last" --stages 04_export 05_verify || \
    stamp "05_verify failed"
python3 - "$work/runs" $counts <<'PY'
import json, sys
from pathlib import Path
runs, counts = Path(sys.argv[1]), sys.argv[2:]
def read(name, stage):
    path = runs / name / stage / "manifest.json"
    return json.loads(path.read_text())["metrics"] if path.is_file() else {}
losses = {}
print(f"\n{'GPUs':>4} {'median step s':>13} {'tokens/s':>9} {'peak GiB/GPU':>12} {'final loss':>11} {'max |loss diff|':>15}")
for gpus in counts:
    m = read(f"gpus_{gpus}", "03_train")
    history = [json.loads(l) for l in (runs / f"gpus_{gpus}" / "03_train" / "train_log.jsonl").read_text().split("\n") if l]
    losses[gpus] = [r["loss"] for r in history]
    diff = max(abs(a - b) for a, b in zip(losses[gpus], losses[counts[0]]))
    print(f"{gpus:>4} {m.get('median_step_seconds')!s:>13} {m.get('tokens_per_second')!s:>9} "
          f"{m.get('peak_memory_gib')!s:>12} {m.get('final_loss')!s:>11} {diff:>15.3g}")
verify = read(f"gpus_{counts[-1]}", "05_verify")
if verify:
    print(f"\n05_verify of gpus_{counts[-1]}: verified {verify.get('verified')}, KL(student || export) all tokens "
          f"{verify.get('kl_all')}")
PY
