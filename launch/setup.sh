#!/usr/bin/env bash
# Create .venv (once) and install gan_dist into it, editable, with its test extra.
#   bash launch/setup.sh [--deepspeed]
# Re-running is cheap: it reinstalls only when pyproject.toml or the extras changed.
# torch is installed first, from TORCH_PACKAGES (default: the versions these machines
# carry on local disk); set it to the build that suits your machine, e.g. a CUDA index.
set -euo pipefail
cd "$(dirname "$0")/.."

# Extras stick: once installed with --deepspeed, a plain re-run (launch/test.sh) keeps them.
stamp=.venv/.gan_dist-installed
extras=test
if [ -f "$stamp" ] && grep -q "deepspeed" "$stamp"; then extras=test,deepspeed; fi
for arg in "$@"; do
  case "$arg" in
    --deepspeed) extras=test,deepspeed ;;
    *) echo "setup.sh: unknown option '$arg' (known: --deepspeed)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing torch (${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}); this takes a few minutes"
  # shellcheck disable=SC2086
  pip install -q ${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}
fi
echo "setup: installing gan_dist[$extras] into .venv"
pip install -q -e ".[$extras]"
echo "$want" > "$stamp"
if [[ $extras == *deepspeed* ]] && ! command -v g++ >/dev/null; then
  echo "setup: DeepSpeed compiles a small op at its first start and needs a C++ compiler: install g++" \
       "(Debian/Ubuntu: apt-get install g++)" >&2
fi
