#!/usr/bin/env bash
# The retrieval recipe of docs/retrieval.md, end to end on one machine (about 21 minutes on 2 CPU
# cores): raw text -> in-domain pretraining -> corpus pairs -> contrastive training on labeled pairs
# -> exported embedders -> the eval-retrieval table, for the masked mixer and the transformer side
# by side (the two families run at the same time, one torch thread each), with BM25 beside them.
#
#   launchers/retrieval_recipe.sh                      # the demo: stdlib docstrings, demo pairs
#   CORPUS=my_docs.jsonl PAIRS_INPUT=my_pairs.jsonl OUT=runs/mine launchers/retrieval_recipe.sh
#
# Environment: OUT (runs/retrieval-recipe), CORPUS (demo; anything `mmtrain prepare` reads),
# PAIRS_INPUT (demo; JSONL with query / document fields), TOKENIZER (the shipped demo tokenizer),
# FAMILIES ("mixer transformer"), CORPUS_STAGE (1; 0 skips the corpus-pairs stage), ABLATION
# (1: also train on the labeled pairs without the corpus stage, as in the docs' table), THREADS (1 per run).
# Each stage skips work that is already complete, so a rerun after a failure resumes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
OUT=${OUT:-runs/retrieval-recipe}
CORPUS=${CORPUS:-demo}
PAIRS_INPUT=${PAIRS_INPUT:-demo}
TOKENIZER=${TOKENIZER:-tokenizer/demo-bpe-4096.model}
FAMILIES=${FAMILIES:-"mixer transformer"}
CORPUS_STAGE=${CORPUS_STAGE:-1}
ABLATION=${ABLATION:-1}
export OMP_NUM_THREADS=${THREADS:-1}
MMTRAIN=${MMTRAIN:-mmtrain}
POOLING=$(awk '/^  pooling:/{print $2}' configs/retrieval/mixer-demo.yaml)   # the frozen baseline pools like the embedders
PY=${PYTHON:-python}
mkdir -p "$OUT"
log() { echo "[recipe $(date +%H:%M:%S)] $*"; }
done_run() { [ -f "$1/checkpoints/latest" ] && [ "$(cat "$1/checkpoints/latest")" = "$(printf 'step_%08d' "$2")" ]; }

# 1. Labeled pairs first (train / val / test by document), so that their held-out texts can be kept
#    out of everything the models are trained on.
log "pairs: $PAIRS_INPUT"
$MMTRAIN prepare-pairs --input "$PAIRS_INPUT" --out "$OUT/pairs" tokenizer="$TOKENIZER" n_ctx=128

# 2. In-domain pretraining corpus: the documents' own text, without held-out pairs.
log "corpus: $CORPUS"
$MMTRAIN prepare --input "$CORPUS" --out "$OUT/corpus" --n-ctx 128 --tokenizer "$TOKENIZER" \
    exclude_pairs="[$OUT/pairs]"

# 3. Pretraining at equal training FLOPs (configs/pretrain/indomain-*-ctx128.yaml), then export.
pretrain() {
  local f=$1 cfg=configs/pretrain/indomain-$1-ctx128.yaml steps
  steps=$(grep -E '^  steps:' "$cfg" | awk '{print $2}')
  done_run "$OUT/pretrain-$f" "$steps" || $PY mmtrain/pretrain.py --config "$cfg" data.shard_dir="$OUT/corpus" \
      data.auto_prepare=false logging.run_dir="$OUT/pretrain-$f" checkpoint.resume=none > "$OUT/pretrain-$f.log" 2>&1
  [ -f "$OUT/bundles/$f/model.safetensors" ] || $MMTRAIN export "$OUT/pretrain-$f" --out "$OUT/bundles/$f" > /dev/null
}

# 4. Contrastive training: corpus pairs (ICT over the same corpus, held-out pairs excluded), then the
#    labeled pairs starting from that embedder. configs/retrieval/<family>-{corpus,demo}.yaml.
contrast() {  # contrast <family> <config> <start bundle> <pairs> <name>
  local f=$1 cfg=$2 start=$3 pairs=$4 name=$5 steps
  steps=$(grep -E '^  steps:' "$cfg" | awk '{print $2}')
  done_run "$OUT/$name" "$steps" || $PY mmtrain/retrieval.py --config "$cfg" retrieval.bundle="$start" \
      data.shard_dir="$pairs" logging.run_dir="$OUT/$name" checkpoint.resume=none logging.progress_bar=false \
      > "$OUT/$name.log" 2>&1
  [ -f "$OUT/bundles/$name/model.safetensors" ] || \
      $MMTRAIN export-embedder "$OUT/$name" --out "$OUT/bundles/$name" --overwrite > /dev/null
}

family() {
  local f=$1
  pretrain "$f"
  log "$f: pretrained ($(grep -o '"eval_loss_ctx128": [0-9.]*' "$OUT/pretrain-$f/metrics.jsonl" | tail -n 1))"
  if [ "$CORPUS_STAGE" = 1 ]; then
    contrast "$f" "configs/retrieval/$f-corpus.yaml" "$OUT/bundles/$f" "$OUT/pairs-ict" "$f-ict"
    contrast "$f" "configs/retrieval/$f-demo.yaml" "$OUT/bundles/$f-ict" "$OUT/pairs" "$f-ict-labeled"
    log "$f: corpus stage and labeled stage done"
  fi
  if [ "$ABLATION" = 1 ] || [ "$CORPUS_STAGE" != 1 ]; then
    contrast "$f" "configs/retrieval/$f-demo.yaml" "$OUT/bundles/$f" "$OUT/pairs" "$f-labeled"
    log "$f: labeled-only stage done"
  fi
}

if [ "$CORPUS_STAGE" = 1 ]; then
  log "corpus pairs (ict)"
  $MMTRAIN prepare-pairs --input "$CORPUS" --from-documents ict --out "$OUT/pairs-ict" tokenizer="$TOKENIZER" \
      n_ctx=128 pairs_per_document=4 exclude_pairs="[$OUT/pairs]"
fi
pids=()
for f in $FAMILIES; do family "$f" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done

# 5. The table: held-out test split, every stage of every family, BM25 beside them.
bundles=()
for f in $FAMILIES; do
  bundles+=("$OUT/bundles/$f")
  for name in "$f-ict" "$f-labeled" "$f-ict-labeled"; do
    [ -d "$OUT/bundles/$name" ] && bundles+=("$OUT/bundles/$name")
  done
done
log "eval-retrieval (test split)"
$MMTRAIN eval-retrieval "${bundles[@]}" --data "$OUT/pairs" --n-candidates 32 --pooling "$POOLING" --bm25 --json "$OUT/retrieval.json" \
    | tee "$OUT/retrieval.txt"
