#!/usr/bin/env bash
# The whole test suite on a fresh machine: sets up .venv, installs Debian's chromium for the browser test
# (as root, like CI), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "the browser test needs Debian's chromium: sudo apt-get install -y chromium" >&2
    fi
fi
export OMP_NUM_THREADS=1
python -m pytest -q "$@"
