#!/usr/bin/env bash
# First contact with a GPU host, from a checkout: no install into site-packages needed.
#
#   bash bench/first_contact.sh [OUT_DIR] [WHEEL_DIR]
#
# OUT_DIR (default first-contact/) receives every stage's log and JSON as it is written, so a stage killed by its
# time limit, or a machine taken away, leaves what was measured. WHEEL_DIR, if given, holds wheels of the packages
# the host lacks (diffusers, optimum-quanto, bitsandbytes, peft, ...); they are installed into FC_SITE (default
# $TMPDIR/edittuner-first-contact/site), never into the interpreter's site-packages. The stages, each under its own limit (seconds, overridable):
#
#   quanto_ext  (background, FC_QUANTO_S=420) how long quanto's CUDA extension takes to build here; information
#               only: EditTuner keeps quanto on its pure-torch kernels (shared.model.quantize.pure_torch_quanto)
#   env         (FC_ENV_S=60)      nvidia-smi, the interpreter, package versions, compilers
#   doctor      (FC_DOCTOR_S=240)  edittuner doctor: host rows, one real-width block per precision against bf16
#                                  with a LoRA backward, a tiny end-to-end run on the device and its resume, the
#                                  LoRA loaded by diffusers
#   full        (FC_FULL_S=300)    edittuner doctor --full: one real-size step per precision (FC_FULL, default
#                                  bf16,int8-quanto,nf4-bnb; edit-v2, 1024, three references, checkpointing)
#                                  beside the planner's prediction
#   gpu_step    (FC_STEP_S=240)    bench/gpu_step.py: the cases FC_STEP_CASES (default nf4-bnb and fp8-quanto at
#                                  that size), each again under a 24 GiB cap (what a 24 GB card holds)
#   frozen_linear (FC_FROZEN_S=150, CUDA only) bench/frozen_linear.py at the real width (24 heads of 128, 2 blocks,
#                                  4096 image tokens): GGUF Q8_0/Q4_0 and fp8_scaled steps against the stock
#                                  GGUFLinear's, peak memory and time (needs the gguf package, e.g. in WHEEL_DIR)
#
# About five minutes on one H200 with the defaults (from its stages' times there: doctor 54 s, a real-size step
# of the 20B model 4-5 s, building it 3-47 s a precision). PYTHON picks the interpreter (default python3). On a
# host without CUDA the same stages run what a CPU can (the doctor's GPU rows say they need one; gpu_step on the
# small model): the test suite runs it that way.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-first-contact}
WHEELS=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
WORK=${TMPDIR:-/tmp}/edittuner-first-contact
SITE=${FC_SITE:-$WORK/site}
mkdir -p "$WORK"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >"$OUT/install.log" 2>&1 || { note "install of $WHEELS failed: see install.log"; exit 2; }
    export PYTHONPATH="$SITE:$PYTHONPATH"  # quanto builds its extension next to its sources: here, writable
fi

stage() {  # stage NAME LIMIT_S COMMAND... : output to OUT/NAME.log, a line in the summary
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    note "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local why=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && why=" (time limit)"
    note "== $name: exit $rc$why after $((SECONDS - start)) s"
    tail -n 60 "$OUT/$name.log"
}

T0=$SECONDS
timeout -k 5 "${FC_QUANTO_S:-420}" "$PY" -c '
import time, torch
from optimum.quanto.library.extensions import get_extension
t0 = time.perf_counter()
try:
    get_extension("quanto_cuda").lib
    print(f"quanto_cuda built and loaded in {time.perf_counter() - t0:.1f} s")
except Exception as e:
    print(f"quanto_cuda did not build after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {str(e)[-1500:]}")
' >"$OUT/quanto_ext.log" 2>&1 &
QUANTO_PID=$!

stage env "${FC_ENV_S:-60}" bash -c "
nvidia-smi || echo 'nvidia-smi: not found'
echo; uname -a; \"$PY\" -VV
for tool in nvcc gcc cc ninja; do printf '%s: ' \$tool; (command -v \$tool && \$tool --version 2>&1 | head -n 1) || echo missing; done
\"$PY\" - <<'EOF'
import importlib.metadata as md, torch
for p in ('torch', 'diffusers', 'transformers', 'peft', 'optimum-quanto', 'bitsandbytes', 'accelerate', 'safetensors',
          'torchvision', 'triton', 'numpy', 'grpcio', 'protobuf'):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, 'not installed')
print('cuda', torch.version.cuda, 'available', torch.cuda.is_available(), 'bf16',
      torch.cuda.is_available() and torch.cuda.is_bf16_supported())
EOF
"
stage doctor "${FC_DOCTOR_S:-240}" "$PY" -m shared.cli.main doctor --json "$OUT/doctor.json" --work-dir "$WORK/tiny"
stage full "${FC_FULL_S:-300}" "$PY" -m shared.cli.main doctor --full --skip host,block,tiny --json "$OUT/full.json" \
    --full-precisions "${FC_FULL:-bf16,int8-quanto,nf4-bnb}"
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    stage gpu_step "${FC_STEP_S:-240}" "$PY" bench/gpu_step.py --steps 2 --cap-gib 24 --json "$OUT/gpu_step.json" \
        --cases "${FC_STEP_CASES:-nf4-bnb:edit-v2:1024:on,fp8-quanto:edit-v2:1024:on}"
    stage frozen_linear "${FC_FROZEN_S:-150}" "$PY" bench/frozen_linear.py --device cuda --heads 24 --blocks 2 \
        --joint-dim 3584 --image-tokens 4096 --text-tokens 256 --steps 3
else  # a CPU host: the same code on the small model
    stage gpu_step "${FC_STEP_S:-240}" "$PY" bench/gpu_step.py --small --device cpu --steps 1 \
        --json "$OUT/gpu_step.json" --cases nf4-bnb:edit-v2:64:on,fp8-quanto:edit-v2:64:on,int4-quanto:edit-v2:64:on
fi
wait "$QUANTO_PID" 2>/dev/null
note "== quanto_ext: $(tail -n 1 "$OUT/quanto_ext.log")"
rm -rf "$WORK/tiny"
note "== first contact done in $((SECONDS - T0)) s; files in $OUT"
