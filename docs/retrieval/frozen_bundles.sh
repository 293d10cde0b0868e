#!/usr/bin/env bash
# The pretraining part of launchers/retrieval_recipe.sh only (labeled pairs, the in-domain corpus
# without the held-out pairs, equal-FLOPs pretraining of the mixer and the transformer, export):
# the pretrained-only bundles that docs/retrieval.md section 3 embeds with frozen weights.
#   OUT=runs/retrieval-recipe bash docs/retrieval/frozen_bundles.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/retrieval-recipe}
TOKENIZER=${TOKENIZER:-tokenizer/demo-bpe-4096.model}
export OMP_NUM_THREADS=${THREADS:-1}
mkdir -p "$OUT"
mmtrain prepare-pairs --input demo --out "$OUT/pairs" tokenizer="$TOKENIZER" n_ctx=128
mmtrain prepare --input demo --out "$OUT/corpus" --n-ctx 128 --tokenizer "$TOKENIZER" exclude_pairs="[$OUT/pairs]"
pretrain() {
  local f=$1 cfg=configs/pretrain/indomain-$1-ctx128.yaml
  [ -f "$OUT/bundles/$f/model.safetensors" ] && return 0
  python mmtrain/pretrain.py --config "$cfg" data.shard_dir="$OUT/corpus" data.auto_prepare=false \
      logging.run_dir="$OUT/pretrain-$f" checkpoint.resume=none > "$OUT/pretrain-$f.log" 2>&1
  mmtrain export "$OUT/pretrain-$f" --out "$OUT/bundles/$f" > /dev/null
}
pretrain mixer & m=$!
pretrain transformer & t=$!
wait $m; wait $t
grep -ho '"eval_loss_ctx128": [0-9.]*' "$OUT"/pretrain-{mixer,transformer}/metrics.jsonl | tail -n 2
