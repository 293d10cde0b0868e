#!/usr/bin/env bash
# Language-model part of docs/reproduction.md: an LR sweep per family and context length (seed 0),
# then seeds 1 and 2 at each family's best LR. Equal training FLOPs inside each n_ctx pair (the
# steps in configs/pretrain/repro-*.yaml). Two runs at a time, one torch thread each.
#   bash docs/reproduction/sweep.sh lr            # 12 runs: lr in LRS x {mixer, transformer} x {128, 512}
#   LRS=1e-3 MODELS="transformer-ctx128 transformer-ctx512" bash docs/reproduction/sweep.sh lr   # extend it
#   BEST="mixer-ctx128=2e-3 ..." bash docs/reproduction/sweep.sh seeds   # 3 seeds at the chosen LRs
set -euo pipefail
cd "$(dirname "$0")/../.."
LRS=${LRS:-"2e-3 4e-3 8e-3"}
MODELS=${MODELS:-"mixer-ctx128 transformer-ctx128 mixer-ctx512 transformer-ctx512"}
OUT=${OUT:-runs/repro}
run() {  # run <family-ctxN> <lr> <seed>
  local dir="$OUT/$1-lr$2-s$3"
  [ -f "$dir/metrics.jsonl" ] && grep -q eval_loss "$dir/metrics.jsonl" && [ -n "$(ls "$dir"/checkpoints 2>/dev/null)" ] && return 0
  OMP_NUM_THREADS=1 python mmtrain/pretrain.py --config "configs/pretrain/repro-$1.yaml" \
      train.lr="$2" train.seed="$3" logging.run_dir="$dir" checkpoint.resume=none > "$dir.log" 2>&1 \
      && echo "done $dir" || { echo "FAILED $dir (see $dir.log)"; return 1; }
}
export -f run; export OUT
mkdir -p "$OUT"
case "${1:-lr}" in
  lr) for lr in $LRS; do for m in $MODELS; do
        echo "$m $lr 0"; done; done ;;
  seeds) for pair in $BEST; do for s in 1 2; do echo "${pair%=*} ${pair#*=} $s"; done; done ;;
esac | xargs -P 2 -L 1 bash -c 'run "$@"' _
