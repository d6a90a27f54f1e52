# Sourced by speedrun.sh and tests/run.sh: a virtual environment in .venv with everything installed.
# Re-installs only when pyproject.toml changed. CUDA machines get pip's default (CUDA) torch; machines
# without an NVIDIA GPU get torch 2.13.0 (a CPU build where the registry serves one).
set -euo pipefail
if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment .venv"
    python3 -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    python -m pip install --quiet --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install --quiet "torch>=2.8"
    else
        python -m pip install --quiet "torch==2.13.0"
    fi
    python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
