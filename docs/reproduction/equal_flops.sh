#!/usr/bin/env bash
# Claims 4 and 9 of docs/reproduction.md: the mixer, the transformer and the hybrid at equal training
# FLOPs (7.8e12, n_ctx 128, d 192 x 4, 1,024 tokens per step, the repro-*.yaml recipe), with
# benchmarks/learning.py --flops: each family's steps come from its own flops_per_token().
# Part 1, each family's default init: the mixer and transformer at the study's best LRs (seed 0, a
# check that learning.py reproduces sweep.sh), the hybrid's LR sweep, then its seeds 1 and 2.
# Part 2, the paper's init (model.init=paper) for the transformer and the hybrid: LR sweep, then
# seeds 1 and 2 at the best LR. Two runs at a time, one torch thread each (about 7 min per pair on
# 2 shared cores). Tables: $OUT/learning-<label>.{md,csv}; copies in docs/reproduction/equal-flops/.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/claim9}
C="--d-model 192 --layers 4 --n-ctx 128 --tokens-per-step 1024 --flops 7.8e12 --threads 1 --parallel 2 --out-dir $OUT"
R="train.warmup_steps=30 train.eval_batches=8"
L="python benchmarks/learning.py $C"
# 1. default inits (mixer: paper, transformer and hybrid: Hugging Face Llama's N(0, 0.02^2))
$L --set $R --models mixer transformer hybrid --lr mixer=4e-3 transformer=1e-3 hybrid=2e-3 --label eqflops-s0
$L --set $R --models hybrid --lr hybrid=1e-3 --label hybrid-lr1e-3
$L --set $R --models hybrid --lr hybrid=4e-3 --label hybrid-lr4e-3
$L --set $R --models hybrid --lr hybrid=2e-3 --seed 1 --label hybrid-lr2e-3-s1
$L --set $R --models hybrid --lr hybrid=2e-3 --seed 2 --label hybrid-lr2e-3-s2
$L --set $R model.hybrid_mode=parallel --models hybrid --lr hybrid=2e-3 --label hybrid-parallel-lr2e-3
# 2. the paper's init for the transformer and the hybrid
P="$R model.init=paper"
$L --set $P --models hybrid --lr hybrid=2e-3 --label hybrid-paperinit-lr2e-3
$L --set $P --models hybrid transformer --lr hybrid=4e-3 transformer=1e-3 --label paperinit-r1
$L --set $P --models hybrid transformer --lr hybrid=1e-3 transformer=2e-3 --label paperinit-r2
$L --set $P --models transformer --lr transformer=4e-3 --label paperinit-r3
$L --set $P --models hybrid transformer --lr hybrid=8e-3 transformer=8e-3 --label paperinit-r4
$L --set $P --models hybrid transformer --lr hybrid=4e-3 transformer=4e-3 --seed 1 --label paperinit-s1
$L --set $P --models hybrid transformer --lr hybrid=4e-3 transformer=4e-3 --seed 2 --label paperinit-s2
