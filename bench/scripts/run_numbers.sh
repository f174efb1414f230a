#!/usr/bin/env bash
# The numbers of bench/results/eval_2026-11-22.json, one job at a time on a CPU:
#   SmolLM2-135M (base, fresh thought parameters) vs a short Quiet-STaR run of it.
#   bash bench/scripts/run_numbers.sh RUN_DIR OUT_DIR
# RUN_DIR: a train.py output dir, e.g. from
#   python train.py model=smollm2_135m data=jsonl data.path=../shared/data/math_web/train.jsonl \
#     data.max_docs=1000 data.seq_len=128 data.batch_size=1 train.max_steps=20 logger=none hydra.run.dir=RUN_DIR
# Then: python bench/scripts/collect_numbers.py OUT_DIR RUN_DIR bench/results/eval_2026-11-22.json
set -euo pipefail
RUN=${1:?train.py run dir}
OUT=${2:?output dir}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
E="python -m quietstar.eval"
C="threads=1 seed=0"
for who in base trained; do
  ck=""; [ "$who" = trained ] && ck="ckpt=$RUN"
  $E gsm8k $ck $C limit=200 out="$OUT/${who}_gsm8k_soft.json" 2> "$OUT/${who}_gsm8k_soft.log"
  $E csqa  $ck $C limit=200 out="$OUT/${who}_csqa_soft.json"  2> "$OUT/${who}_csqa_soft.log"
  $E gsm8k $ck $C limit=50 metric=em k=1 max_cot_tokens=64 batch_size=50 out="$OUT/${who}_gsm8k_em.json" \
    2> "$OUT/${who}_gsm8k_em.log"
  $E nll   $ck $C data.start=-${NLL_RECORDS:-30} seq_len=128 out="$OUT/${who}_nll.json" \
    report="$OUT/${who}_report.html" 2> "$OUT/${who}_nll.log"
done
