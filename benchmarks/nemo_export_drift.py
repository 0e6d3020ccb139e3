"""Where the nemo backend's export differs from its student: KL(student || reloaded export) on the held-out split,
with the student restored in its training precision (Megatron's bf16 forward: bf16 parameters, bf16 residual
stream) and with fp32 parameters (runtime.SCORING_PRECISION, what 04_export and 05_verify use), each computed under
the harness's autocast (bf16 on a GPU) and in plain fp32.

Run after a complete nemo-backend experiment, with the same settings:

    python benchmarks/nemo_export_drift.py --recipe benchmarks/recipes/smollm2_nemo_gpu.yaml --log-dir /tmp/out \
        --experiment one_gpu
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nemo_run"))

from qatflow.backends.shared.modeling import compute_dtype, device_of, load_tokenizer  # noqa: E402
from qatflow.backends.nemo import runtime  # noqa: E402
from qatflow.backends.nemo.scoring import HF_SPLITS, ScoredModel  # noqa: E402
from qatflow.cli import load_config  # noqa: E402
from qatflow.evaluation import score  # noqa: E402
from qatflow.export_reload import load_exported_model  # noqa: E402
from qatflow.nvfp4_cpu import kernel_global_scale  # noqa: E402
from qatflow.tokens import read_split, tokenize_split  # noqa: E402


def main(argv: list[str]) -> int:
    config, _ = load_config(argv)
    experiment = config.experiment_dir
    device = device_of(config)
    harness_dtype = compute_dtype(config, device)
    tokenizer = load_tokenizer(runtime.tokenizer_dir(experiment / "03_train"))
    records = read_split(experiment / "00_data", "validation", config.eval.num_samples)
    items = tokenize_split(tokenizer, records, config.eval.seq_len, "validation", log=lambda message: None)
    export_dir = experiment / "04_export" / "checkpoint"
    exported, _ = load_exported_model(export_dir, device)
    students = {}
    for precision in (config.nemo.precision, runtime.SCORING_PRECISION):
        model, _ = runtime.restore(runtime.nemo_checkpoint(experiment / "03_train"), config, "08_eval_trained",
                                   precision=precision)
        students[precision] = ScoredModel(model.eval())
    print(f"\n{'student parameters':<20} {'compute':<22} {'KL asst':>10} {'KL all':>10}")
    for precision, student in students.items():
        for dtype in dict.fromkeys((harness_dtype, torch.float32)):
            compute = "fp32" if dtype == torch.float32 else f"{str(dtype).split('.')[-1]} autocast"
            metrics = score(exported, items, config.eval.batch_size, tokenizer.pad_token_id, device, dtype,
                            reference=student, log=lambda message: None)
            print(f"{precision:<20} {compute:<22} {metrics['kl_assistant']:10.2e} {metrics['kl_all']:10.2e}")
    # Rows compare at 1e-6 of a layer's largest weight: the export dequantized in fp32, not rounded to bf16 as served.
    compare_weights(students[runtime.SCORING_PRECISION], load_exported_model(export_dir, device, torch.float32)[0],
                    export_dir)
    # The floor: the same export computed by two attention implementations of one library, in fp32.
    eager, _ = load_exported_model(export_dir, device)
    eager.set_attn_implementation("eager")
    metrics = score(eager, items, config.eval.batch_size, tokenizer.pad_token_id, device, torch.float32,
                    reference=exported, log=lambda message: None)
    print(f"export, sdpa vs eager attention (fp32): KL asst {metrics['kl_assistant']:.2e} "
          f"all {metrics['kl_all']:.2e}")
    return 0


def key(row: torch.Tensor, unit: torch.Tensor) -> bytes:
    return (row / unit * 1e6).round().to(torch.int64).numpy().tobytes()


@torch.no_grad()
def compare_weights(student, exported, export_dir: Path) -> None:
    """Row by row: is every dequantized export row one of the student's fake-quantized rows (the export reorders
    fused q/k/v and gate/up rows; equal to 1e-6 of the layer's largest weight, as dequantization multiplies the
    scales in another order), and is every input_scale the global scale the student's activation quantizer uses?"""
    from nemo.utils.model_utils import unwrap_model
    from safetensors.torch import load_file

    state = {}
    for path in export_dir.glob("*.safetensors"):
        state.update(load_file(str(path)))
    core = unwrap_model(student.nemo_model.module)
    rows_total = rows_matched = scales_total = scales_matched = 0
    worst = 0.0
    for name, module in core.named_modules():
        suffix = next((s for s in HF_SPLITS if name.endswith(s)), None)
        if suffix is None or not hasattr(module, "weight_quantizer"):
            continue
        layer = name.split(".")[2]
        fake = module.weight_quantizer(module.weight.float()).float().cpu()
        unit = fake.abs().max()
        student_rows = {key(row, unit) for row in fake}
        # The global scale ModelOpt's kernel derives from the student's activation amax.
        student_scale = kernel_global_scale(module.input_quantizer.amax.detach().float().reshape(()).cpu())
        for hf in HF_SPLITS[suffix]:
            prefix = f"model.layers.{layer}.{hf}"
            weight = exported.get_submodule(prefix).weight.float().cpu()
            rows_total += weight.shape[0]
            rows_matched += sum(key(row, unit) in student_rows for row in weight)
            export_scale = state[f"{prefix}.input_scale"].float().reshape(()).cpu()
            scales_total += 1
            scales_matched += bool(torch.equal(export_scale, student_scale))
            worst = max(worst, float((export_scale - student_scale).abs() / student_scale.abs()))
    print(f"weights: {rows_matched}/{rows_total} exported rows equal a row of the student's fake-quantized weight; "
          f"input scales: {scales_matched}/{scales_total} equal the global scale the student's kernel uses "
          f"(worst relative difference {worst:.1e})")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
