#!/usr/bin/env bash
# GPU smoke run: one command, about 8 minutes on one H100, from the repository root of a bare
# GPU machine. Writes ONE JSON (default benchmarks/results/gpu_smoke.json, or $1).
#
#   bash benchmarks/gpu_smoke.sh [OUT.json]
#
# Steps (benchmarks/gpu_smoke.py runs them, each with its own timeout, all inside
# GPU_SMOKE_BUDGET_S, default 470 s from the start of this script):
#   install           missing knowpress dependencies; onnxruntime -> onnxruntime-gpu
#   teacher/*         compress world build --preset bios-dense-tiny / bios-moe-tiny --device cuda
#                     (KNOWPRESS_CACHE=.gpu-cache: built on cuda, or loaded when cached)
#   install/tensorrt  the tensorrt wheel (tensorrt-cu<torch's CUDA major>)
#   scale/llama-1b    python benchmarks/scale.py --sizes llama-1b --device cuda --json ...
#   apply/*           compress apply --device cuda of recipes/quickstart, distill-int4, edge,
#                     moe and a SnapKV recipe
#   export/float32    compress export of the dense teacher, weights float32
#   onnxruntime       CUDAExecutionProvider vs CPUExecutionProvider on the same feeds
#   tensorrt          an engine from the float32 graph, logits vs onnxruntime's
#
# Python: .venv (or .gpu-venv) when its torch sees the GPU; else a .gpu-venv made here over
# python3's packages (the machine's CUDA torch). pip takes wheels from .whl/ first (offline;
# GPU_SMOKE_WHEELS names another folder), then the package index where one is reachable.
# Exit: 0 every step ok, 1 a step did not pass (the JSON says which and why), 2 no GPU here.

set -u
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_JSON="${1:-$ROOT/benchmarks/results/gpu_smoke.json}"
case "$OUT_JSON" in /*) ;; *) OUT_JSON="$PWD/$OUT_JSON" ;; esac
cd "$ROOT" || exit 2
BUDGET="${GPU_SMOKE_BUDGET_S:-470}"
SMI="${GPU_SMOKE_NVIDIA_SMI:-nvidia-smi}"

# 1. a GPU, or one line and exit 2
gpus="$("$SMI" -L 2>/dev/null)"
if [ $? -ne 0 ] || ! grep -q '^GPU ' <<<"$gpus"; then
    echo "gpu_smoke: no CUDA GPU here ($SMI lists none); nothing was run" >&2
    exit 2
fi

# 2. a Python whose torch sees it
has_cuda() {
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}
PY=""
SETUP=""
for cand in "$ROOT/.venv/bin/python" "$ROOT/.gpu-venv/bin/python"; do
    if [ -x "$cand" ] && has_cuda "$cand"; then
        PY="$cand"
        SETUP="existing ${cand#"$ROOT"/}"
        break
    fi
    [ -x "$cand" ] && SETUP="$SETUP${SETUP:+; }${cand#"$ROOT"/}: torch sees no GPU"
done
if [ -z "$PY" ]; then
    BASE="${GPU_SMOKE_PYTHON:-python3}"
    if ! has_cuda "$BASE"; then
        echo "gpu_smoke: $(head -n1 <<<"$gpus") is listed but no Python here has a torch that sees it (tried .venv, .gpu-venv, $BASE); nothing was run" >&2
        exit 2
    fi
    # a venv of our own over BASE's packages (a .pth, so BASE's own venv counts too); without
    # ensurepip (a distribution's python3) pip comes from BASE's packages through the .pth
    rm -rf "$ROOT/.gpu-venv"
    if "$BASE" -m venv "$ROOT/.gpu-venv" >/dev/null 2>&1 ||
        { rm -rf "$ROOT/.gpu-venv" && "$BASE" -m venv --without-pip "$ROOT/.gpu-venv" >/dev/null 2>&1; }; then
        SITE="$("$ROOT/.gpu-venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        "$BASE" -c 'import site, sys; print("\n".join([*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]))' \
            >"$SITE/_gpu_smoke_base.pth"
        if has_cuda "$ROOT/.gpu-venv/bin/python"; then
            PY="$ROOT/.gpu-venv/bin/python"
            SETUP="$SETUP${SETUP:+; }created .gpu-venv over $("$BASE" -c 'import sys; print(sys.executable)')"
        fi
    fi
    if [ -z "$PY" ]; then
        PY="$BASE"
        SETUP="$SETUP${SETUP:+; }no venv could be made over $BASE: using it as is"
    fi
fi
echo "gpu_smoke: $(head -n1 <<<"$gpus"); python $PY ($SETUP); budget ${BUDGET} s" >&2

# 3. the steps and the JSON
export GPU_SMOKE_SETUP="$SETUP"
export KNOWPRESS_CACHE="${KNOWPRESS_CACHE:-$ROOT/.gpu-cache}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/benchmarks/gpu_smoke.py" run --out "$OUT_JSON" \
    --started "$START" --deadline "$((START + BUDGET))" \
    --wheels "${GPU_SMOKE_WHEELS:-$ROOT/.whl}" --work "$ROOT/.gpu-smoke" ${GPU_SMOKE_ONLY:+--only "$GPU_SMOKE_ONLY"}
