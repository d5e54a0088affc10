#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one go, for a machine with a CUDA GPU and adkit installed.
#
#     bash benchmarks/gpu_suite.sh OUTDIR [ANOMALIB_ENV]
#
# Each benchmark runs under its own time limit, so one failure does not lose the others. OUTDIR/results.jsonl gets
# one JSON line per benchmark (the last line each script printed, tagged with "bench"); OUTDIR/log.txt everything
# printed. ANOMALIB_ENV (default: compare_anomalib.py's) is a folder whose bin/python imports anomalib; without it
# the anomalib comparisons are skipped. PYTHON picks the interpreter (default python3).
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [ANOMALIB_ENV]}
env_dir=${2:-$HOME/.cache/adkit/anomalib-env}
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
env_dir=$(cd "$env_dir" 2>/dev/null && pwd || echo "$env_dir")
cd "$(dirname "$0")/.."  # the benchmarks are called by their paths from the repository's root
log="$out/log.txt"
results="$out/results.jsonl"
export PYTHONUNBUFFERED=1

bench() {  # bench NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    if timeout "$limit" "$@" > "$out/.last" 2>&1; then
        tail -n 1 "$out/.last" | "$py" -c 'import json, sys; print(json.dumps({**json.load(sys.stdin), "bench": sys.argv[1]}))' \
            "$name" >> "$results" 2>> "$log" \
            || echo "{\"bench\": \"$name\", \"error\": \"no JSON line\"}" >> "$results"
    else
        echo "{\"bench\": \"$name\", \"error\": \"exit $?\"}" >> "$results"
    fi
    cat "$out/.last" >> "$log"
    echo "=== $name: $((SECONDS - start)) s" | tee -a "$log"
    tail -n 3 "$out/.last"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee -a "$log"
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$log"

have_anomalib() { [ -x "$env_dir/bin/python" ]; }
# most wanted first: a run cut short by a time limit keeps what it finished
bench draem-bf16 120 "$py" benchmarks/speed.py --size 256 --batch 8 --json
have_anomalib && bench anomalib-draem-default 150 "$py" benchmarks/compare_anomalib.py --size 256 --batch 8 \
    --device cuda --env "$env_dir" --json
bench draem-fp32 120 "$py" benchmarks/speed.py --size 256 --batch 8 --precision fp32 --json
have_anomalib && bench anomalib-draem-bf16 150 "$py" benchmarks/compare_anomalib.py --size 256 --batch 8 \
    --device cuda --anomalib-precision bf16 --env "$env_dir" --json
bench patchcore-10 150 "$py" benchmarks/speed.py --detector patchcore --size 256 --batch 8 --json
have_anomalib && bench anomalib-patchcore 150 "$py" benchmarks/compare_anomalib.py --detector patchcore \
    --size 256 --batch 8 --device cuda --env "$env_dir" --json
bench padim 150 "$py" benchmarks/speed.py --detector padim --size 256 --batch 8 --json
bench draem-bf16-compile 240 "$py" benchmarks/speed.py --size 256 --batch 8 --compile --json
# issue #39's GPU checks (PatchCore's first call after a fit: "first_call_s" of patchcore-10 above)
bench draem-bf16-cudagraphs 300 "$py" benchmarks/speed.py --size 256 --batch 8 --compile-mode reduce-overhead --json
bench padim-export 300 "$py" benchmarks/speed.py --export --detector padim --size 256 --batch 8 --json
bench patchcore-export 300 "$py" benchmarks/speed.py --export --detector patchcore --size 256 --batch 8 --json

# adkit serve under load: PaDiM fitted on the synthetic carpet, exported to ONNX, the server on cores 0-1 and the
# client on the others (a machine with at least 4 cores)
serve_under_load() {
    local run="$out/serve-run" models="$out/serve-models"
    rm -rf "$run" "$models"
    mkdir -p "$models"
    ADKIT_CACHE="$out/serve-cache" "$py" -m adkit run --detector padim --data synthetic --category carpet \
        --out "$run" > "$out/serve-fit.txt" 2>&1 || { echo "serve: the fit failed ($out/serve-fit.txt)"; return 1; }
    "$py" -m adkit export --checkpoint "$run/carpet/checkpoint.pt" --format onnx --out "$models/padim-onnx" \
        >> "$out/serve-fit.txt" 2>&1 || { echo "serve: the export failed ($out/serve-fit.txt)"; return 1; }
    local images
    images=$(find "$out/serve-cache/synthetic" -type d -path "*/carpet/test" | head -n 1)
    "$py" benchmarks/serve_load.py "$models" padim-onnx "$images" --requests 300 --concurrency 1,8,32 \
        --server-cores 0,1 --client-cores "2-$(($(nproc) - 1))"
}
if [ "$(nproc)" -ge 4 ]; then
    export -f serve_under_load
    export out py
    bench serve-padim-onnx 600 bash -c serve_under_load
fi
rm -f "$out/.last"
