"""Shared fixtures: a tiny real Llama with a locally built tokenizer, and a recipe that runs it in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "nemo_run" / "nemo_qat_flow.py"
sys.path.insert(0, str(REPO / "nemo_run"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY_RECIPE = """\
inherit: smollm2_135m_qad
model: {{name: {model}, dtype: float32}}
data: {{num_train: 64, num_validation: 16}}
ptq: {{calib_samples: 8, calib_seq_len: 128, calib_batch_size: 4}}
train: {{steps: 6, global_batch_size: 4, micro_batch_size: 2, seq_len: 128, checkpoint_every: 2, lr: 1.0e-4}}
eval: {{num_samples: 16, seq_len: 128, batch_size: 8, text_max_tokens: 512, generation_prompts: 2, max_new_tokens: 16, tasks: []}}
verify: {{w4a16: true}}
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random Llama with Llama 3.1's rope (theta, llama3 scaling) and a ChatML tokenizer."""
    from tiny_assets import LLAMA31_ROPE, build_tiny_llama, build_tiny_tokenizer

    target = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(target, build_tiny_tokenizer(), **LLAMA31_ROPE)
    return target


@pytest.fixture(scope="session")
def tiny_llama31(tmp_path_factory) -> Path:
    """The Llama 3.1 architecture of recipes/llama31_8b_*: llama3 rope scaling, untied embeddings, Llama 3 tokens."""
    from tiny_assets import build_tiny_llama31

    return build_tiny_llama31(tmp_path_factory.mktemp("tiny_llama31"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """The Qwen3 architecture of recipes/qwen3_8b_*: q/k norms, head_dim apart from hidden/heads, Qwen3 tokens."""
    from tiny_assets import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"))


@pytest.fixture(scope="session")
def tiny_recipe(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny_qad.yaml"
    path.write_text(TINY_RECIPE.format(model=tiny_model))
    return path


def run_flow(*args: str, cwd: Path = REPO, timeout: int = 900, entry: Path = ENTRY) -> subprocess.CompletedProcess:
    """The entry script as a user runs it, in a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(entry), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def mark_stages_done(args: list[str], experiment: Path, stages: tuple[str, ...] | None = None) -> dict[str, str]:
    """Marks `stages` (by default 05_verify and every stage after it) complete in `experiment`, with the
    fingerprints a run of `args` gives them, so that the run skips them and spends its time on the stages a test is
    about (their own tests run the rest); returns every stage's fingerprint."""
    from qatflow import cli
    from qatflow.manifest import MANIFEST
    from qatflow.stages import SCORING_STAGES, fingerprints

    stages = (*SCORING_STAGES, "09_report") if stages is None else stages

    config, _ = cli.load_config(args)
    prints = fingerprints(config)
    for stage in stages:
        (experiment / stage).mkdir(parents=True)
        (experiment / stage / MANIFEST).write_text(json.dumps({"fingerprint": prints[stage], "outputs": {}}))
    return prints


NEMO_CPU_SHIMS = REPO / "tests" / "nemo_cpu"  # stand-ins for NeMo's CUDA-only calls, loaded through PYTHONPATH


def run_nemo_cpu(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """The entry script on the nemo backend on CPU, with the CUDA stand-ins of tests/nemo_cpu in every process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QATFLOW_NEMO_CPU_SHIMS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(NEMO_CPU_SHIMS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ENTRY), "--backend", "nemo", "--nemo-env", "cpu", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Running processes (other than this one) whose command line contains `text`: what a test left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


# Test files by their time on 2 CPU cores, longest first (measured with --durations): with -n 2 each process takes
# the next file when it is free, so the long ones start early instead of running alone at the end.
LONGEST_FIRST = ("test_slurm.py", "test_nemo_backend_cpu.py", "test_architectures.py", "test_stage_lifecycle.py",
                 "test_docker_executor.py", "test_flow_embedded.py", "test_hf_fsdp.py", "test_flow_tiny.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
