#!/usr/bin/env bash
# The recipe study of docs/retrieval.md: InfoNCE runs of one pretrained bundle on the demo pairs,
# each scored on the val split (carved from the training pairs; the test split is not looked at).
# Every run: 320 steps = 5 epochs of the 2,053 training pairs at batch 32, val every 64 steps.
# Two runs at a time, one torch thread each. The study as run, on the recipe's bundles and pairs
# (launchers/retrieval_recipe.sh first):
#   R=runs/retrieval-recipe; export BUNDLE=$R/bundles/mixer PAIRS=$R/pairs OUT=runs/retrieval-study
#   bash docs/retrieval/study.sh shipped base lr5e-4 mean second m-asym m-t0.02 m-t0.1 m-lr5e-4 m-hard1 \
#       m-b128 r3-lr1e-3 r3-lr2e-3 r3-tlearn r3-hard1
#   BUNDLE=$R/bundles/transformer bash docs/retrieval/study.sh r3-lr1e-3 m-lr5e-4
#   for kind in ict crop; do   # the corpus stage alone, then the labeled stage from it
#     [ $kind = crop ] && mmtrain prepare-pairs --input demo --from-documents crop --bundle $BUNDLE \
#         --out $R/pairs-crop --exclude-pairs $PAIRS pairs_per_document=4 min_document_tokens=12
#     PAIRS=$R/pairs-$kind NAME=mixer-$kind bash docs/retrieval/study.sh r3-corpus
#     mmtrain export-embedder $OUT/mixer-$kind-r3-corpus --out $OUT/bundles/mixer-$kind
#     BUNDLE=$OUT/bundles/mixer-$kind NAME=mixer-$kind bash docs/retrieval/study.sh r3-lr1e-3
#   done
#   python docs/retrieval/summarize.py $OUT --out docs/retrieval --groups study
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${BUNDLE:?bundle dir} PAIRS=${PAIRS:?pair dir} OUT=${OUT:?output dir} NAME=${NAME:-$(basename "$BUNDLE")}
# Round 1 from `base`, the settings the study started from (last-token pooling, temperature 0.05,
# symmetric loss, lr 2e-4 constant); round 2 (names m-*) from its best change, mean pooling.
BASE="retrieval.pooling=last retrieval.temperature=0.05 retrieval.symmetric=true train.lr=2e-4 train.schedule=constant train.warmup_steps=0 train.weight_decay=0.01 retrieval.hard_negatives=0"
MEAN="$BASE retrieval.pooling=mean"
declare -A RUNS=(
  [shipped]="retrieval.pooling=last retrieval.temperature=0.02 retrieval.symmetric=false train.lr=1e-4 train.schedule=linear train.warmup_steps=30 train.weight_decay=0.0 retrieval.hard_negatives=0"
  [base]="$BASE"
  [lr5e-4]="$BASE train.lr=5e-4"
  [mean]="$MEAN"
  [second]="$BASE retrieval.pooling=second_to_last"
  [m-t0.02]="$MEAN retrieval.temperature=0.02"
  [m-t0.1]="$MEAN retrieval.temperature=0.1"
  [m-lr5e-4]="$MEAN train.lr=5e-4"
  [m-asym]="$MEAN retrieval.symmetric=false"
  [m-hard1]="$MEAN retrieval.hard_negatives=1"
  [m-b128]="$MEAN train.global_batch_size=128 train.micro_batch_size=128 retrieval.grad_cache_chunk=64 train.steps=80 train.eval_every=16"
  # round 3 (names r3-*) from round 2's best, lr 5e-4
  [r3-lr1e-3]="$MEAN train.lr=1e-3"
  [r3-lr2e-3]="$MEAN train.lr=2e-3"
  [r3-tlearn]="$MEAN train.lr=5e-4 retrieval.learn_temperature=true"
  [r3-hard1]="$MEAN train.lr=5e-4 retrieval.hard_negatives=1"
  # the corpus stage: run on corpus pairs (PAIRS=<ict pairs>), then r3-lr1e-3 from its exported embedder (BUNDLE=...)
  [r3-corpus]="$MEAN train.lr=5e-4 train.steps=424 train.eval_every=106"
)
run() {  # run <name>
  local dir="$OUT/$NAME-$1"
  [ -f "$dir/checkpoints/latest" ] && return 0
  OMP_NUM_THREADS=1 python mmtrain/retrieval.py --config configs/retrieval/mixer-demo.yaml retrieval.bundle="$BUNDLE" \
      data.shard_dir="$PAIRS" logging.run_dir="$dir" train.steps=320 train.eval_every=64 checkpoint.every=0 checkpoint.keep_last=1 \
      checkpoint.resume=none logging.progress_bar=false retrieval.eval_n_candidates=[32] ${RUNS[$1]} \
      $EXTRA > "$dir.log" 2>&1 && echo "done $dir" && return 0
  # two runs that open the same shards at the same instant can collide on streaming's shared memory
  if grep -q "FileExistsError" "$dir.log" && [ -z "${RETRIED:-}" ]; then sleep 20; RETRIED=1 run "$1"; return; fi
  echo "FAILED $dir (see $dir.log)"; return 1
}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
export -f run; export OUT NAME BUNDLE PAIRS EXTRA
for r in "$@"; do echo "$r"; done | while read -r r; do
  printf '%s\0' "$r"; done | xargs -0 -P 2 -I{} bash -c "$(declare -p RUNS); run {}"
