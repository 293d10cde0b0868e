#!/usr/bin/env bash
# benchmarks/device_check.sh — the checks and measurements to run whenever a CUDA device is at hand.
#
#   bash benchmarks/device_check.sh             # everything below, under 8 minutes on one GPU
#   bash benchmarks/device_check.sh --dry-run   # print every command (with its time limit); run nothing
#
# Steps, each under `timeout` (a failing or timed-out step is recorded and the script goes on):
#   1. the device: nvidia-smi -L, torch / CUDA / cuDNN / DeepSpeed versions, the GPU's name
#   2. the `gpu`-marked tests (python -m pytest -m gpu -q; tests/test_gpu.py)
#   3. bf16 throughput / memory / MFU sweep: benchmarks/throughput.py (mixer packed and dense layouts,
#      paper Conv1d mixer, transformer, HF Llama; n_ctx 512 ... 8192; d 512 and 1024; the d 1024 run
#      adds the engine-overhead rows: plain loop vs ZeRO 1, 2, 3 on the GPU)
#   4. token-mixing micro-benchmark: benchmarks/mixing.py at the same lengths and widths, and the
#      Toeplitz op (bf16, FFT through cuFFT in fp32) against the packed dense op: benchmarks/toeplitz.py
#   5. ZeRO 1/2/3 memory and step time at world size 1: benchmarks/zero_memory.py
#   6. demo shards for n_ctx 512 (mmtrain prepare), then 200 bf16 steps of
#      configs/pretrain/mixer-d512-ctx512.yaml and its MFU (median over the logged steps)
# Everything goes to benchmarks/results/gpu-<device>.md (<device>: the slugified CUDA device name),
# with a summary table of every step's status and time first. Nothing is installed.
#
# Options:
#   --dry-run            print the commands, run nothing, write nothing
#   --budget SECONDS     wall-clock budget of the whole script (default 470): every step's time limit
#                        is cut to what is left, and a step with too little left is skipped (recorded)
#   --out FILE           results file (default benchmarks/results/gpu-<device>.md)
#   --device-name NAME   the device name to slugify for the results path (default: torch's name)
# Environment: PYTHON (default python) — an interpreter with CUDA torch and this project's
# dependencies (pip install -e '.[test]').

set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2

# ==== Benchmark flags: adjust here when the benchmark scripts' options change ===================
# throughput.py: --models / --n-ctx / --d-model / --layers / --batch / --dtype / --device exist today.
# "mixer" is our mixer with the default (packed) mixing layout; "mixer-dense-param" the dense layout.
THROUGHPUT_MODELS="mixer mixer-dense-param paper-mixer transformer hf-llama toeplitz"
THROUGHPUT_FLAGS="--device cuda --dtype bf16 --layers 4 --batch 4 --warmup 2 --repeats 5"
THROUGHPUT_OVERHEAD_FLAGS="--overhead-n-ctx 2048"       # the engine-overhead rows (ZeRO 1/2/3) of the last width
# mixing.py: --device / --dtype / --n-ctx / --d-model / --batch / --warmup / --repeats / --step-*.
MIXING_DEVICE_FLAGS="--device cuda --dtype bf16"
MIXING_FLAGS="--batch 4 --warmup 2 --repeats 5 --step-n-ctx 4096 --step-layers 4 --step-batch 2 --step-repeats 3"
# zero_memory.py: --world-sizes / --stages exist. It measures in CPU processes (gloo, peak RSS); set a
# device flag here if it gains one (e.g. "--device cuda"). The GPU ZeRO 1/2/3 rows come from step 3.
ZERO_FLAGS="--world-sizes 1 --stages 1 2 3"
ZERO_DEVICE_FLAGS=""
SWEEP_N_CTX="512 1024 2048 4096 8192"
SWEEP_D_MODELS="512 1024"
PRETRAIN_CONFIG="configs/pretrain/mixer-d512-ctx512.yaml"
PRETRAIN_STEPS=200
PRETRAIN_OVERRIDES="engine.precision=bf16 train.steps=${PRETRAIN_STEPS} logging.log_every=20 logging.progress_bar=false train.eval_every=0 train.eval_batches=4 checkpoint.every=0"
TOKENIZER="tokenizer/demo-bpe-4096.model"
# Per-step time limits (seconds): 450 in all. The whole script also keeps to --budget (470 s), so
# with the kill grace below it ends inside 8 minutes.
LIMIT_INFO=20; LIMIT_GPU_TESTS=70; LIMIT_THROUGHPUT_512=70; LIMIT_THROUGHPUT_1024=75
LIMIT_MIXING=20; LIMIT_TOEPLITZ=35; LIMIT_ZERO=30; LIMIT_PREPARE=30; LIMIT_PRETRAIN=70; LIMIT_SUMMARY=10
KILL_AFTER_S=5      # SIGKILL this long after the SIGTERM of a step past its limit
# ================================================================================================

PYTHON="${PYTHON:-python}"
DRY_RUN=0
BUDGET_S=470
OUT=""
DEVICE_NAME=""
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --budget) BUDGET_S="${2:?--budget needs seconds}"; shift ;;
        --out) OUT="${2:?--out needs a file}"; shift ;;
        --device-name) DEVICE_NAME="${2:?--device-name needs a name}"; shift ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

slugify() {
    printf '%s' "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//'
}

show() {  # a command line as one shell-quoted string
    local out="" arg
    for arg in "$@"; do
        if [[ "$arg" == *$'\n'* ]]; then
            out+="'<inline script, $(wc -l <<<"$arg") lines: see benchmarks/device_check.sh>' "
        elif [[ "$arg" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
            out+="$arg "
        elif [[ "$arg" != *"'"* ]]; then
            out+="'$arg' "
        else
            out+="$(printf '%q' "$arg") "
        fi
    done
    printf '%s' "${out% }"
}

START_S=$(date +%s)
DEADLINE_S=$((START_S + BUDGET_S))
RESERVE_S=$((KILL_AFTER_S + 5))   # kept back for the kill grace and writing the results
STEP_N=0
SUMMARY_ROWS=()
FAILED=0

if ((DRY_RUN)); then
    WORK="${TMPDIR:-/tmp}/mmtrain-device-check.XXXXXX"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/mmtrain-device-check.XXXXXX")" || exit 2
    mkdir -p "$WORK/logs"
    BODY="$WORK/body.md"
    : >"$BODY"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# run_step KEY "title" LIMIT_S command... : run it under timeout, record status, time and output.
run_step() {
    local key="$1" title="$2" limit="$3"
    shift 3
    STEP_N=$((STEP_N + 1))
    local shown
    shown="$(show "$@")"
    if ((DRY_RUN)); then
        printf '[%d] %s (limit %ss)\n    timeout -k %s %s %s\n' "$STEP_N" "$title" "$limit" "$KILL_AFTER_S" "$limit" "$shown"
        return 0
    fi
    local left=$((DEADLINE_S - $(date +%s) - RESERVE_S))
    if ((left < 5)); then
        SUMMARY_ROWS+=("| $STEP_N | $title | skipped (time budget spent) | 0 |")
        printf '## %d. %s\n\n`%s`\n\n**skipped**: the %ss budget of the script was spent.\n\n' \
            "$STEP_N" "$title" "$shown" "$BUDGET_S" >>"$BODY"
        echo "== [$STEP_N] $title: skipped (time budget spent)" >&2
        FAILED=1
        return 1
    fi
    ((limit > left)) && limit=$left
    local log="$WORK/logs/$(printf '%02d' "$STEP_N")-$key"
    echo "== [$STEP_N] $title (limit ${limit}s): $shown" >&2
    local t0 rc status
    t0=$(date +%s)
    timeout -k "$KILL_AFTER_S" "$limit" "$@" 2>"$log.err" | tee "$log.out"
    rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - t0))
    if ((rc == 0)); then
        status="ok"
    elif ((rc == 124 || rc == 137)); then
        status="TIMED OUT after ${limit}s"
        FAILED=1
    else
        status="FAILED (exit $rc)"
        FAILED=1
    fi
    echo "== [$STEP_N] $title: $status in ${took}s" >&2
    SUMMARY_ROWS+=("| $STEP_N | $title | $status | $took |")
    {
        printf '## %d. %s\n\n`%s`\n\nstatus: **%s** in %ss (limit %ss)\n\n' "$STEP_N" "$title" "$shown" "$status" "$took" "$limit"
        if [[ -s "$log.out" ]]; then
            printf 'stdout (last 300 lines):\n\n```\n'
            tail -n 300 "$log.out"
            printf '```\n\n'
        fi
        if [[ -s "$log.err" ]]; then
            printf 'stderr (last 40 lines):\n\n```\n'
            tail -n 40 "$log.err"
            printf '```\n\n'
        fi
    } >>"$BODY"
    return "$rc"
}

write_results() {
    ((DRY_RUN)) && return 0
    mkdir -p "$(dirname "$OUT")"
    local commit="unknown"
    if command -v git >/dev/null 2>&1 && git rev-parse --git-dir >/dev/null 2>&1; then
        commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        [[ -n "$(git status --porcelain 2>/dev/null)" ]] && commit+=" (with uncommitted changes)"
    fi
    {
        printf '# Device check: %s\n\n' "$DEVICE_NAME"
        printf 'Written by `bash benchmarks/device_check.sh` on %s (host %s, commit %s), %ss of a %ss budget.\n' \
            "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(hostname)" "$commit" "$(($(date +%s) - START_S))" "$BUDGET_S"
        printf 'Logs of every step: `%s/logs`.\n\n' "$WORK"
        printf '| # | step | status | seconds |\n|---|---|---|---|\n'
        printf '%s\n' "${SUMMARY_ROWS[@]}"
        printf '\n'
        cat "$BODY"
    } >"$OUT"
    echo "wrote $OUT" >&2
}

interrupted() {
    SUMMARY_ROWS+=("| - | interrupted | the script was stopped | - |")
    write_results
    exit 130
}

# ---- the device -----------------------------------------------------------------------------
if [[ -z "$DEVICE_NAME" ]]; then
    if ((DRY_RUN)); then
        DEVICE_NAME="<device>"
    else
        DEVICE_NAME="$(timeout 30 "$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null | tail -n 1)"
        if [[ -z "$DEVICE_NAME" ]]; then
            echo "device_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is false); nothing to check" >&2
            exit 1
        fi
    fi
fi
if [[ "$DEVICE_NAME" == "<device>" ]]; then
    SLUG="<device>"
else
    SLUG="$(slugify "$DEVICE_NAME")"
fi
OUT="${OUT:-benchmarks/results/gpu-${SLUG}.md}"
if ((DRY_RUN)); then
    echo "device_check.sh --dry-run: nothing runs; results would go to $OUT (work dir $WORK, budget ${BUDGET_S}s)"
else
    trap interrupted INT TERM
fi

DEVICE_INFO="$(cat <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}", torch.cuda.get_device_name(i), f"| capability {p.major}.{p.minor}",
          f"| {p.total_memory / 2**30:.1f} GiB | {p.multi_processor_count} SMs")
try:
    import deepspeed
    print("deepspeed", deepspeed.__version__)
except Exception as exc:
    print("deepspeed: not importable:", exc)
from mmtrain.train.engine import peak_flops
for precision in ("bf16", "fp32"):
    print("MFU peak", precision, peak_flops(torch.device("cuda", 0), precision).describe())
EOF
)"
run_step device "device: nvidia-smi and torch" "$LIMIT_INFO" \
    bash -c 'command -v nvidia-smi >/dev/null && nvidia-smi -L && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv; "$0" -c "$1"' \
    "$PYTHON" "$DEVICE_INFO"

# ---- tests that need CUDA -------------------------------------------------------------------
run_step gpu-tests "gpu-marked tests" "$LIMIT_GPU_TESTS" "$PYTHON" -m pytest -m gpu -q

# ---- bf16 throughput / memory / MFU sweep ---------------------------------------------------
last_d="${SWEEP_D_MODELS##* }"
for d in $SWEEP_D_MODELS; do
    limit_var="LIMIT_THROUGHPUT_$d"
    limit="${!limit_var:-$LIMIT_THROUGHPUT_1024}"
    if [[ "$d" == "$last_d" ]]; then overhead=$THROUGHPUT_OVERHEAD_FLAGS; else overhead="--no-overhead"; fi
    # shellcheck disable=SC2086  # the flag variables are lists of words
    run_step "throughput-d$d" "throughput.py bf16, d $d" "$limit" \
        "$PYTHON" benchmarks/throughput.py $THROUGHPUT_FLAGS --models $THROUGHPUT_MODELS --n-ctx $SWEEP_N_CTX \
        --d-model "$d" $overhead --out-dir "$WORK/throughput-d$d"
done

# ---- token mixing micro-benchmark -----------------------------------------------------------
for d in $SWEEP_D_MODELS; do
    # shellcheck disable=SC2086
    run_step "mixing-d$d" "mixing.py bf16, d $d" "$LIMIT_MIXING" \
        "$PYTHON" benchmarks/mixing.py $MIXING_DEVICE_FLAGS --n-ctx $SWEEP_N_CTX --d-model "$d" $MIXING_FLAGS
done

# shellcheck disable=SC2086
run_step toeplitz "toeplitz.py bf16: Toeplitz (auto path) vs the packed dense op, d 512" "$LIMIT_TOEPLITZ" \
    "$PYTHON" benchmarks/toeplitz.py $MIXING_DEVICE_FLAGS --n-ctx 1024 2048 4096 8192 16384 32768 --d-model 512 \
    --repeats 5 --out-dir "$WORK/toeplitz"

# ---- ZeRO 1/2/3 on one device ---------------------------------------------------------------
# shellcheck disable=SC2086
run_step zero "zero_memory.py ZeRO 1/2/3, world size 1" "$LIMIT_ZERO" \
    "$PYTHON" benchmarks/zero_memory.py $ZERO_FLAGS $ZERO_DEVICE_FLAGS --out-dir "$WORK/zero"

# ---- 200 bf16 pretraining steps and their MFU -----------------------------------------------
SHARDS="$WORK/shards"
RUN_DIR="$WORK/pretrain-mixer-d512-ctx512"
run_step prepare "demo shards for n_ctx 512 (mmtrain prepare)" "$LIMIT_PREPARE" \
    "$PYTHON" -m mmtrain.cli prepare --input demo --out "$SHARDS" --n-ctx 512 --tokenizer "$TOKENIZER"
# shellcheck disable=SC2086
run_step pretrain "pretrain $PRETRAIN_CONFIG, $PRETRAIN_STEPS bf16 steps" "$LIMIT_PRETRAIN" \
    "$PYTHON" -m mmtrain.pretrain --config "$PRETRAIN_CONFIG" $PRETRAIN_OVERRIDES \
    "data.shard_dir=$SHARDS" "logging.run_dir=$RUN_DIR"

MFU_SUMMARY="$(cat <<'EOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl") if line.strip()]
steps = [r for r in rows if "mfu" in r]
timed = [r for r in steps if r["step"] > 10] or steps   # the first steps include warm-up
print(f"pretraining: {len(steps)} steps logged; medians over steps {timed[0]['step']}..{timed[-1]['step']}:")
print(f"  MFU {100 * statistics.median(r['mfu'] for r in timed):.1f}%  |  "
      f"{statistics.median(r['tokens_per_s'] for r in timed):,.0f} tokens/s  |  "
      f"{statistics.median(r['step_time_s'] for r in timed) * 1e3:.1f} ms/step  |  final loss {steps[-1]['loss']:.4f}")
EOF
)"
run_step pretrain-mfu "pretraining MFU (median of the logged steps)" "$LIMIT_SUMMARY" \
    bash -c 'grep -h -m1 "MFU peak" "$2"/logs/*-pretrain.out || echo "(no banner line found)"; "$0" -c "$1" "$3"' \
    "$PYTHON" "$MFU_SUMMARY" "$WORK" "$RUN_DIR"

if ((DRY_RUN)); then
    echo "results: $OUT"
    exit 0
fi
rm -rf "$RUN_DIR/checkpoints"   # hundreds of MB of optimizer state nobody reads
write_results
exit "$FAILED"
