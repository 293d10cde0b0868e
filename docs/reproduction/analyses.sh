#!/usr/bin/env bash
# The analyses of docs/reproduction.md on the seed-0 runs at each family's best LR (after sweep.sh):
# export, `mmtrain report`, input representation, frozen-embedding retrieval and a short InfoNCE
# fine-tuning. BEST names the run of each family and n_ctx, e.g.
#   BEST="mixer-ctx128=4e-3 transformer-ctx128=4e-3 mixer-ctx512=4e-3 transformer-ctx512=2e-3" \
#       bash docs/reproduction/analyses.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/repro}
DOC=docs/reproduction
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
runs=()
for pair in $BEST; do
  name=${pair%=*}; run="$OUT/$name-lr${pair#*=}-s0"; runs+=("$run")
  [ -f "$OUT/bundles/$name/model.safetensors" ] || mmtrain export "$run" --out "$OUT/bundles/$name"
done
# language modelling: curves and table of the best runs
mmtrain report "${runs[@]}" --out "$DOC" --title "Masked mixer vs transformer at equal training FLOPs, best LR per family (seed 0)"
# input representation: untrained models of the configs (today's init and the previous one), trained bundles
rep() { mmtrain analyze-representation "$@" --data $DOC/inputs.txt --samples 2 --layers 1 4; }
rep --config configs/pretrain/repro-mixer-ctx128.yaml --json $OUT/rep-untrained-mixer.json
rep --config configs/pretrain/repro-mixer-ctx128.yaml model.init=gpt model.final_norm=true --json $OUT/rep-untrained-mixer-gpt.json
rep --config configs/pretrain/repro-transformer-ctx128.yaml --json $OUT/rep-untrained-transformer.json
for name in mixer-ctx128 transformer-ctx128 mixer-ctx512 transformer-ctx512; do
  rep "$OUT/bundles/$name" --json "$OUT/rep-$name.json"
done
# retrieval: demo pairs, frozen embeddings (+ BM25), then 60 InfoNCE steps of the n_ctx 128 bundles
# (the settings of the time: no val split, last-token pooling, t 0.02; docs/retrieval.md has today's recipe)
[ -f "$OUT/pairs/meta.json" ] || mmtrain prepare-pairs --config configs/pairs/demo.yaml bundle=$OUT/bundles/mixer-ctx128 out=$OUT/pairs val_fraction=0
mmtrain eval-retrieval $OUT/bundles/{mixer,transformer}-ctx{128,512} --data $OUT/pairs --n-candidates 32 64 128 --bm25 \
    --json $OUT/retrieval-frozen.json
for family in mixer transformer; do
  python mmtrain/retrieval.py --config configs/retrieval/$family-demo.yaml retrieval.bundle=$OUT/bundles/$family-ctx128 \
      data.shard_dir=$OUT/pairs logging.run_dir=$OUT/infonce-$family-ctx128 train.steps=60 train.warmup_steps=6 \
      retrieval.pooling=last retrieval.temperature=0.02 retrieval.symmetric=false retrieval.eval_split=test \
      train.lr=1e-4 train.schedule=linear train.weight_decay=0.0 \
      train.eval_every=0 checkpoint.every=0 checkpoint.resume=none
  mmtrain export-embedder $OUT/infonce-$family-ctx128 --out $OUT/bundles/infonce-$family-ctx128
done
mmtrain eval-retrieval $OUT/bundles/infonce-{mixer,transformer}-ctx128 --data $OUT/pairs --n-candidates 32 64 128 \
    --json $OUT/retrieval-infonce.json
