#!/usr/bin/env bash
# One lent-GPU session's checks, as one command (see ../shared/GPU.md and benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_session.sh [DEADLINE_S]
#
# Installs the wheels carried in .whl/ (flash-attn-4 and its small runtime wheels, datasets for the
# recipe) into /tmp/site beside an FA4 runtime library unpacked there by an earlier call, says what
# it found, then runs benchmarks/gpu_check.py (steps begun before DEADLINE_S seconds) and the
# gpu-marked tests.  Everything goes to $OUT (log, CSV, PNG) so it comes back even if the call is
# cut off at its limit.
set -o pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
DEADLINE=${1:-420}
{
  echo "# benchmarks/gpu_session.sh on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null), $(date -u +%FT%TZ)"
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "wheel install failed"
  fi
  [ -d /tmp/site/nvidia_cutlass_dsl ] || echo "no FA4 runtime library in /tmp/site (fresh machine?): FA4 rows will be missing"
  # nvidia-cutlass-dsl puts its `cutlass` package on sys.path through a .pth file, which a
  # --target folder on PYTHONPATH does not run: name that folder too.
  export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import flash_attn.cute; print('flash_attn.cute imports')" 2>&1 | tail -2
  python3 benchmarks/gpu_check.py --out "$OUT" --deadline "$DEADLINE" --stack-every 120 --steps flash_kernels attention time_model \
    time_attention time_decode time_train fsdp model lengths backward time_dilation
  echo "== pytest -m gpu"
  timeout 120 python3 -m pytest -q -m gpu tests/test_backends.py -p no:cacheprovider 2>&1 | tail -25
} 2>&1 | tee "$OUT/gpu_session.log"
