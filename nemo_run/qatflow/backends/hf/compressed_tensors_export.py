"""The student as a compressed-tensors NVFP4 checkpoint (`nvfp4-pack-quantized`, what llm-compressor writes and
vLLM's compressed-tensors loader serves), and its reload through transformers + compressed-tensors for 05_verify.

Written from ModelOpt's unified export of the student with the compressed-tensors library itself, as
llm-compressor saves: each quantized Linear gets the library's NVFP4 scheme (`apply_quantization_config`), the
weight ModelOpt's codes stand for, ModelOpt's FP8 block scales and the reciprocals of its global scales, and the
library's NVFP4 compressor packs the FP4 codes (`ModelCompressor.compress_model`). The packed codes and block
scales must come out bit for bit ModelOpt's, or the export fails.

The two formats hold the same numbers in other names and conventions (ModelOpt -> compressed-tensors):
`weight` (uint8) -> `weight_packed`; `weight_scale` (FP8 per 16 inputs) unchanged; `weight_scale_2` ->
`weight_global_scale` = 1 / weight_scale_2; `input_scale` -> `input_global_scale` = 1 / input_scale (shape [1]).
compressed-tensors divides by its global scales where ModelOpt multiplies (`forward_helpers`: scale /
global_scale); the library's own ModelOpt converter (`entrypoints/convert/converters/modelopt_nvfp4.py`) inverts
them the same way, citing vLLM's `compressed_tensors_w4a4_nvfp4` scheme.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qatflow.export_reload import BLOCK_SIZE, FUSED_GROUPS, ExportFormatError, load_state, tensors_named

QUANT_METHOD = "compressed-tensors"
CT_FORMAT = "nvfp4-pack-quantized"
GLOBAL_SCALES = ("weight_global_scale", "input_global_scale")


class CompressedTensorsError(ValueError):
    """The compressed-tensors checkpoint is not the student's NVFP4 model; the message is one line naming the
    tensor or key."""


def _state(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_state(folder)
    except ExportFormatError as error:
        raise CompressedTensorsError(str(error)) from None


def eager():
    """compressed-tensors 0.15 wraps its FP4 rounding in torch.compile; eager computes the same values without
    a C++ toolchain on CPU or ~25 s of compilation per process."""
    return torch.compiler.set_stance("force_eager")


def _nvfp4_scheme():
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4

    return QuantizationScheme(targets=["Linear"], format=CT_FORMAT, **NVFP4)


def write_compressed_tensors(modelopt_dir: Path, target: Path, dtype: torch.dtype, log=print) -> dict:
    """Write the compressed-tensors checkpoint of the NVFP4 model in `modelopt_dir` (ModelOpt's unified export,
    finalized) to `target`, with the compressed-tensors library. Raises CompressedTensorsError if the library's
    codes or block scales are not ModelOpt's."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from modelopt.torch.quantization.qtensor import NVFP4QTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((modelopt_dir / "config.json").read_text())
    state = _state(modelopt_dir)
    quantized = sorted(name[: -len(".weight_scale")] for name in state if name.endswith(".weight_scale"))
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(
        {name: tensor for name, tensor in state.items() if name.rpartition(".")[0] not in quantized}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied - {f"{prefix}.weight" for prefix in quantized} or unexpected:
        raise CompressedTensorsError(f"{modelopt_dir}: tensors do not match the architecture (missing "
                                     f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    linears = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    ignore = [name for name in linears if name not in quantized]  # lm_head and ptq.exclude, by exact name
    scheme_config = QuantizationConfig(config_groups={"group_0": _nvfp4_scheme()}, ignore=ignore, format=CT_FORMAT)
    apply_quantization_config(model, scheme_config)
    with torch.no_grad():
        for prefix in quantized:
            module, packed = model.get_submodule(prefix), state[f"{prefix}.weight"]
            # The weight ModelOpt's codes and scales stand for, in the export dtype: dividing it by the block scale
            # over the global scale lands within 2^-8 of each FP4 value, so the compressor finds the same codes.
            module.weight.data = NVFP4QTensor(torch.Size((packed.shape[0], packed.shape[1] * 2)), torch.float32,
                                              packed).dequantize(
                dtype=torch.float32, scale=state[f"{prefix}.weight_scale"],
                double_scale=state[f"{prefix}.weight_scale_2"].float(), block_sizes={-1: BLOCK_SIZE}).to(dtype)
            module.weight_scale.data = state[f"{prefix}.weight_scale"].to(module.weight_scale.dtype)
            module.weight_global_scale.data = (1 / state[f"{prefix}.weight_scale_2"].float()).reshape(1)
            module.input_global_scale.data = (1 / state[f"{prefix}.input_scale"].float()).reshape(1)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=CT_FORMAT)
    with eager():
        compressor.compress_model(model)
    for prefix in quantized:
        module = model.get_submodule(prefix)
        for mine, theirs in (("weight_packed", "weight"), ("weight_scale", "weight_scale")):
            written, expected = getattr(module, mine), state[f"{prefix}.{theirs}"]
            if written.dtype != expected.dtype or \
                    not torch.equal(written.view(torch.uint8), expected.view(torch.uint8)):
                raise CompressedTensorsError(f"compressed-tensors' NVFP4 compressor wrote {prefix}.{mine} unlike "
                                             f"ModelOpt's {prefix}.{theirs}")
    model.save_pretrained(target)
    compressor.update_config(target)
    config_path = target / "config.json"
    written = json.loads(config_path.read_text())
    written["dtype"] = written["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(written, indent=4) + "\n")
    log(f"compressed-tensors {CT_FORMAT} checkpoint: {len(quantized)} NVFP4 layers with ModelOpt's codes and block "
        f"scales, reciprocal global scales, ignore {ignore}")
    return {"quantized_layers": len(quantized), "ignore": ignore}


def is_compressed_tensors(export_dir: Path) -> bool:
    path = export_dir / "config.json"
    if not path.is_file():
        return False
    inline = json.loads(path.read_text()).get("quantization_config")
    return isinstance(inline, dict) and inline.get("quant_method") == QUANT_METHOD


def check_compressed_tensors(export_dir: Path, served_dtype: torch.dtype) -> dict:
    """config.json's quantization_config and the tensors against what an NVFP4 nvfp4-pack-quantized checkpoint
    holds (vLLM's `CompressedTensorsW4A4Fp4` reads these names and shapes). Raises CompressedTensorsError."""
    raw = json.loads((export_dir / "config.json").read_text())
    served = str(served_dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in raw and raw[key] != served:
            raise CompressedTensorsError(f"config.json: {key} is {raw[key]!r}, the export dtype is {served!r}")
    inline = raw.get("quantization_config") or {}
    if inline.get("quant_method") != QUANT_METHOD or inline.get("format") != CT_FORMAT:
        raise CompressedTensorsError(f"config.json: quantization_config is {inline.get('quant_method')!r} "
                                     f"{inline.get('format')!r}, not {QUANT_METHOD} {CT_FORMAT}")
    if inline.get("quantization_status") != "compressed":
        raise CompressedTensorsError(f"config.json: quantization_status {inline.get('quantization_status')!r}, "
                                     f"not 'compressed'")
    expected = _nvfp4_scheme()
    groups = inline.get("config_groups") or {}
    for group_name, group in groups.items():
        for part in ("weights", "input_activations"):
            want = getattr(expected, part).model_dump(mode="json")
            have = group.get(part) or {}
            differ = [key for key in ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic")
                      if have.get(key) != want[key]]
            if differ:
                raise CompressedTensorsError(f"config.json: config_groups.{group_name}.{part}.{differ[0]} is "
                                             f"{have.get(differ[0])!r}, NVFP4 is {want[differ[0]]!r}")
    if not groups:
        raise CompressedTensorsError("config.json: quantization_config has no config_groups")
    ignore = inline.get("ignore") or []
    state = _state(export_dir)
    quantized = sorted(name[: -len(".weight_packed")] for name in state if name.endswith(".weight_packed"))
    for prefix in quantized:
        packed, scale = state[f"{prefix}.weight_packed"], state.get(f"{prefix}.weight_scale")
        rows, in_features = packed.shape[0], packed.shape[1] * 2
        if packed.dtype != torch.uint8 or in_features % BLOCK_SIZE:
            raise CompressedTensorsError(f"tensor {prefix}.weight_packed: {packed.dtype} {tuple(packed.shape)}, "
                                         f"expected uint8 with 16 | 2 x columns")
        if scale is None or scale.dtype != torch.float8_e4m3fn or tuple(scale.shape) != (rows, in_features // 16):
            raise CompressedTensorsError(f"tensor {prefix}.weight_scale: expected float8_e4m3fn "
                                         f"{(rows, in_features // BLOCK_SIZE)}")
        for name in GLOBAL_SCALES:
            value = state.get(f"{prefix}.{name}")
            if value is None or value.dtype != torch.float32 or value.numel() != 1 \
                    or not bool(torch.isfinite(value).all()) or float(value.reshape(())) <= 0:
                raise CompressedTensorsError(f"tensor {prefix}.{name}: expected one positive finite fp32 scale, "
                                             f"got {None if value is None else value.flatten()[:4].tolist()}")
        if _ignored(prefix, ignore):
            raise CompressedTensorsError(f"ignore {ignore} matches {prefix}, which is quantized")
    for prefix in quantized:  # vLLM serves fused q/k/v and gate/up with one global scale each
        parent, _, leaf = prefix.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), None)
        members = [f"{parent}.{m}" for m in group or () if f"{parent}.{m}" in quantized]
        if not members or members[0] != prefix:
            continue
        for name in GLOBAL_SCALES:
            first = state[f"{prefix}.{name}"]
            for member in members[1:]:
                if not torch.equal(state[f"{member}.{name}"], first):
                    raise CompressedTensorsError(f"tensor {member}.{name} = {float(state[f'{member}.{name}']):.6g} "
                                                 f"differs from {prefix}.{name} = {float(first):.6g}: the engine "
                                                 f"fuses {'/'.join(group)} and serves them with one global scale")
    if "lm_head.weight_packed" in state or not _ignored("lm_head", ignore):
        raise CompressedTensorsError(f"lm_head must ship unquantized and be in ignore {ignore}")
    for name, tensor in state.items():
        if tensor.dtype in (torch.float32, torch.float16, torch.bfloat16) and tensor.dtype != served_dtype \
                and not name.endswith(GLOBAL_SCALES):
            raise CompressedTensorsError(f"tensor {name} is {tensor.dtype}, not the export dtype {served}")
    return {"format": CT_FORMAT, "quantized_layers": quantized, "ignore": ignore,
            "compressed_tensors_version": inline.get("version")}


def _ignored(name: str, ignore: list[str]) -> bool:
    """compressed-tensors' `match_name`: an exact name, or `re:` and a regular expression."""
    import re

    return any(re.match(entry[3:], name) if entry.startswith("re:") else entry == name for entry in ignore)


def student_global_scales(student) -> dict[str, torch.Tensor]:
    """The global scales a compressed-tensors export of the student must hold, by tensor name: the fp32
    reciprocals of those its enabled NVFP4 quantizers compute with (ModelOpt: amax times float32(1/2688)).
    Read before `served_student` switches the weight quantizers off."""
    from qatflow.nvfp4_cpu import kernel_global_scale

    expected: dict[str, torch.Tensor] = {}
    for prefix, module in student.named_modules():
        weight_quantizer = getattr(module, "weight_quantizer", None)
        if weight_quantizer is None or not weight_quantizer.is_enabled:
            continue
        expected[f"{prefix}.weight_global_scale"] = 1 / kernel_global_scale(weight_quantizer.amax)
        input_quantizer = getattr(module, "input_quantizer", None)
        if input_quantizer is not None and input_quantizer.is_enabled:
            expected[f"{prefix}.input_global_scale"] = 1 / kernel_global_scale(input_quantizer.amax)
    return expected


def global_scale_mismatches(export_dir: Path, expected: dict[str, torch.Tensor]) -> list[str]:
    """Exported global scales that are not exactly `expected` (student_global_scales), missing, or extra."""
    exported = tensors_named(export_dir, GLOBAL_SCALES)  # the scales only
    found = []
    for name, value in sorted(expected.items()):
        have = exported.get(name)
        if have is None:
            found.append(f"tensor {name} missing")
        elif not torch.equal(have.float().reshape(()).cpu(), value.float().reshape(())):
            found.append(f"tensor {name} = {float(have):.8g}, the student computes with 1 / {float(1 / value):.8g} "
                         f"= {float(value):.8g}")
    found += [f"tensor {name} has no quantized student layer" for name in sorted(set(exported) - set(expected))]
    return found


def load_compressed_tensors_model(export_dir: Path, device: torch.device, dtype: torch.dtype,
                                  activations: bool = True):
    """The export as transformers + compressed-tensors compute it: NVFP4 weights decompressed by the library
    (to bfloat16, whatever the model dtype), with `activations` each quantized layer's input quantized to NVFP4 by
    its forward (dynamic 16-value blocks, the exported input_global_scale); without, weights only (W4A16).

    Loaded in float32 and cast to `dtype` except the global scales: transformers 4.57 rounds every floating tensor
    of a quantized checkpoint to the dtype it loads in (`_infer_parameter_dtype`), the fp32 global scales too,
    where vLLM keeps them fp32."""
    from transformers import AutoModelForCausalLM

    with eager():  # loading compresses the freshly built model before the checkpoint's tensors replace it
        model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not hasattr(quantizer, "compressor"):
        raise CompressedTensorsError(f"{export_dir}: transformers did not load it through compressed-tensors")
    quantizer.compressor.decompress_model(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dtype in (torch.float32, torch.float16, torch.bfloat16) and not name.endswith(GLOBAL_SCALES):
                parameter.data = parameter.data.to(dtype)
    quantized = [module for module in model.modules() if getattr(module, "quantization_scheme", None) is not None]
    for module in quantized:
        module.quantization_enabled = activations  # off: no QDQ at all (the weights are decompressed already)
    return model.to(device).eval(), {"quantized_layers": len(quantized), "quant_method": QUANT_METHOD}


def weight_mismatches(exported, student) -> tuple[list[str], int, int]:
    """Weights of the reloaded export that are more than one unit in the last place away from the student's
    served weights, by name with how many values; and how many values are one ulp apart, of how many.
    compressed-tensors decompresses code x (block scale / global scale) where ModelOpt computes code x block scale
    x its reciprocal: the two differ by an fp32 ulp at most, which rounding to bfloat16 turns into one ulp in about
    0.1% of the weights."""
    theirs = dict(exported.named_parameters())
    found, one_ulp, total = [], 0, 0
    for name, mine in student.named_parameters():
        other = theirs.get(name)
        if other is None or not name.endswith(".weight"):
            continue
        mine = mine.detach().to(other.device, other.dtype)
        if other.shape != mine.shape:
            found.append(f"{name} has shape {tuple(other.shape)}, the student's {tuple(mine.shape)}")
            continue
        equal = other == mine
        near = equal | (torch.nextafter(mine, other) == other)
        if not bool(near.all()):
            found.append(f"{name} ({int((~near).sum())} of {other.numel()} values)")
        one_ulp += int((near & ~equal).sum())
        total += other.numel()
    return found, one_ulp, total
