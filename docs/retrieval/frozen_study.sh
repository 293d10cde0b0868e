#!/usr/bin/env bash
# The frozen-embedding scorer study of docs/retrieval.md section 3: `mmtrain frozen-retrieval` runs
# over one pretrained-only bundle's mean-pooled embeddings, scored on the val split of the demo
# pairs (SPLIT=test only for the final table). Every run is BASE (2 blocks, N 32, batch 128, lr 1e-3,
# 60 warmup steps, linear decay, 300 steps = 19 epochs of the 2,053 training queries, val every 50
# steps, seed 0) plus the scorer's inputs (PAPER: model.input_scale=none model.interaction=none, the
# paper's scorer; SCALE: sqrt_d / none; PROD: none / product; FIX: sqrt_d / product, the default)
# plus its own overrides. One torch thread per run; STREAM=0/1 lets two runs go side by side, each
# with its own copy of the embeddings (a run locks its embeddings directory). A run whose JSON
# exists is skipped. The study and the test table as run:
#   R=runs/retrieval-recipe; OUT=$R bash docs/retrieval/frozen_bundles.sh
#   export PAIRS=$R/pairs BUNDLE=$R/bundles/mixer
#   OUT=runs/frozen-study bash docs/retrieval/frozen_study.sh paper paper-lr1e-4 paper-lr3e-3 paper-long \
#       paper-n8 scale scale-lr3e-3 scale-long scale-long-s1 scale-long-s2 product fix fix-s1 fix-lr1e-4 \
#       fix-lr3e-3 fix-s150 fix-wd fix-l1 fix-ffn1 fix-n8
#   python docs/retrieval/frozen_summary.py runs/frozen-study/mixer-*.json --out docs/retrieval/frozen_study.json
#   for b in mixer transformer; do
#     BUNDLE=$R/bundles/$b OUT=runs/frozen-test SPLIT=test bash docs/retrieval/frozen_study.sh paper fix \
#         scale-long paper-n128 fix-n128
#   done
#   python docs/retrieval/frozen_summary.py runs/frozen-test/*.json --out docs/retrieval/frozen_test.json
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${BUNDLE:?bundle dir} PAIRS=${PAIRS:?pair dir} OUT=${OUT:?output dir} NAME=${NAME:-$(basename "$BUNDLE")}
SPLIT=${SPLIT:-val}   # test only for the final table
STREAM=${STREAM:-0}
export OMP_NUM_THREADS=1
BASE="model.n_layers=2 model.n_candidates=32 train.batch_size=128 train.lr=1e-3 train.warmup_steps=60 train.steps=300 train.eval_every=50 train.log_every=10"
PAPER="$BASE model.input_scale=none model.interaction=none"
SCALE="$BASE model.input_scale=sqrt_d model.interaction=none"
PROD="$BASE model.input_scale=none model.interaction=product"
FIX="$BASE model.input_scale=sqrt_d model.interaction=product"
declare -A RUNS=(
  # the paper's scorer: optimiser, length, N
  [paper]="$PAPER"
  [paper-lr1e-4]="$PAPER train.lr=1e-4"
  [paper-lr3e-3]="$PAPER train.lr=3e-3"
  [paper-long]="$PAPER train.steps=600 train.eval_every=100"
  [paper-n8]="$PAPER model.n_candidates=8"
  [paper-n128]="$PAPER model.n_candidates=128 train.batch_size=32"
  # one change at a time
  [scale]="$SCALE"
  [scale-lr3e-3]="$SCALE train.lr=3e-3"
  [scale-long]="$SCALE train.steps=600 train.eval_every=100"
  [scale-long-s1]="$SCALE train.steps=600 train.eval_every=100 train.seed=1"
  [scale-long-s2]="$SCALE train.steps=600 train.eval_every=100 train.seed=2"
  [product]="$PROD"
  # both (the shipped default), then its optimiser, length, shape, N
  [fix]="$FIX"
  [fix-s1]="$FIX train.seed=1"
  [fix-lr1e-4]="$FIX train.lr=1e-4"
  [fix-lr3e-3]="$FIX train.lr=3e-3"
  [fix-s150]="$FIX train.steps=150 train.warmup_steps=30 train.eval_every=25"
  [fix-wd]="$FIX train.weight_decay=0.1"
  [fix-l1]="$FIX model.n_layers=1"
  [fix-ffn1]="$FIX model.ffn_mult=1"
  [fix-n8]="$FIX model.n_candidates=8"
  [fix-n128]="$FIX model.n_candidates=128 train.batch_size=32"
)
EMB=$OUT/embeddings-$NAME-$STREAM
mkdir -p "$OUT"
for run in "$@"; do
  [ -n "${RUNS[$run]+x}" ] || { echo "unknown run $run (known: ${!RUNS[*]})" >&2; exit 2; }
  [ -f "$OUT/$NAME-$run.json" ] && continue
  # shellcheck disable=SC2086
  mmtrain frozen-retrieval --config configs/frozen_retrieval/demo.yaml embeddings.bundle="$BUNDLE" \
      embeddings.pairs="$PAIRS" embeddings.pooling=mean embeddings.dir="$EMB" embeddings.eval_split="$SPLIT" \
      out_dir="$OUT/$NAME-$run" device=cpu ${RUNS[$run]} --json "$OUT/$NAME-$run.json" --quiet \
      > "$OUT/$NAME-$run.log" 2>&1
  python - "$OUT/$NAME-$run.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["eval_split"]
print(f"{sys.argv[1]}: {s} {100 * r['accuracy']:.1f}% (cosine {100 * r['cosine_accuracy']:.1f}%, chance "
      f"{100 * r['chance']:.1f}%) | {s} loss {r['eval_loss']:.3f} | train acc {100 * r['train_accuracy']:.1f}%")
EOF
done
