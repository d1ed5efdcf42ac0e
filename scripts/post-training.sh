#!/usr/bin/env bash
# The post-training pipeline end to end, timed: base model -> SFT (and LoRA SFT) -> held-out
# accuracy of each on every built-in task. What benchmarks/RESULTS.md's post-training tables
# come from.
#
#   scripts/post-training.sh                 # the laptop preset on the CPU (about 10 minutes)
#   DEVICE=cuda scripts/post-training.sh     # a larger model on the GPU, bfloat16
#
# OUT (default runs/post-training) receives the run folders, each step's log and
# results.jsonl: one JSON line per evaluation ({"model", "task", "n", "accuracy", ...}) and one
# per step with its wall time ({"step", "seconds"}). Runs from the checkout (nothing installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cpu}
OUT=${OUT:-runs/post-training}
N=${N:-200}
mkdir -p "$OUT"
results="$OUT/results.jsonl"
: > "$results"

if [ "$DEVICE" = cpu ]; then
    BASE_ARGS=(--sample-tokens 0)
    SFT_ARGS=()
    LORA_ARGS=(--lora-rank 16 --lr 5e-3)
    DPO_ARGS=()
    REWARD_ARGS=()
    EVAL_ARGS=()
else
    # nanoGPT's shakespeare_char size (6 x 384, context 256, llama flavour) on the built-in
    # corpus with a 2k BPE vocabulary, bfloat16 matrix products
    # (the built-in corpus is 0.5 MB: past ~600 steps the validation loss only rises, and
    # fine-tuning starts from best.ckpt)
    BASE_ARGS=(--preset llama-shakespeare-char --vocab-size 2048 --steps 1000 --batch-size 64
               --lr 1e-3 --min-lr 1e-4 --warmup 50 --eval-every 100 --device "$DEVICE"
               --dtype bfloat16 --sample-tokens 0)
    SFT_ARGS=(--batch-size 64 --steps 1500 --lr 1e-3 --min-lr 1e-4 --eval-every 250
              --device "$DEVICE" --dtype bfloat16)
    LORA_ARGS=(--lora-rank 16 --batch-size 64 --steps 1500 --lr 3e-3 --min-lr 3e-4
               --eval-every 500 --device "$DEVICE" --dtype bfloat16)
    DPO_ARGS=(--device "$DEVICE" --dtype bfloat16)
    REWARD_ARGS=(--device "$DEVICE" --dtype bfloat16)
    EVAL_ARGS=(--device "$DEVICE")
fi

step() {  # step NAME COMMAND...: run, log, record the wall time
    local name=$1; shift
    local t0=$SECONDS
    echo "---- $name: $*"
    "$@" > "$OUT/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$OUT/$name.log"; exit 1; }
    tail -3 "$OUT/$name.log"
    echo "{\"step\": \"$name\", \"device\": \"$DEVICE\", \"seconds\": $((SECONDS - t0))}" >> "$results"
}

evaluate() {  # evaluate LABEL RUN_DIR
    local t0=$SECONDS
    "$PYTHON" -m tinyllm eval "$2" --task all --n "$N" "${EVAL_ARGS[@]}" 2>> "$OUT/eval-$1.log" |
        "$PYTHON" -c "import json, sys
for line in sys.stdin:
    print(json.dumps({'model': '$1', 'device': '$DEVICE', **json.loads(line)}))" | tee -a "$results"
    echo "{\"step\": \"eval-$1\", \"device\": \"$DEVICE\", \"seconds\": $((SECONDS - t0))}" >> "$results"
}

# BASE_EXTRA / SFT_EXTRA: more flags (e.g. "--steps 5" for a smoke run)
step base "$PYTHON" -m tinyllm train --out "$OUT/base" --overwrite "${BASE_ARGS[@]}" ${BASE_EXTRA:-}
step sft "$PYTHON" -m tinyllm sft --from "$OUT/base" --out "$OUT/sft" --overwrite "${SFT_ARGS[@]}" ${SFT_EXTRA:-}
step lora "$PYTHON" -m tinyllm sft --from "$OUT/base" --out "$OUT/lora" --overwrite "${LORA_ARGS[@]}" ${SFT_EXTRA:-}
step merge "$PYTHON" -m tinyllm merge-lora "$OUT/lora" --out "$OUT/lora-merged" --overwrite
step dpo "$PYTHON" -m tinyllm dpo --from "$OUT/sft" --out "$OUT/dpo" --overwrite "${DPO_ARGS[@]}" ${DPO_EXTRA:-}
step reward "$PYTHON" -m tinyllm reward train --from "$OUT/sft" --out "$OUT/reward" --overwrite "${REWARD_ARGS[@]}" ${DPO_EXTRA:-}
evaluate base "$OUT/base"
evaluate sft "$OUT/sft"
evaluate lora "$OUT/lora-merged"
evaluate dpo "$OUT/dpo"
# held-out preference figures: DPO's last evaluation, the reward model's
"$PYTHON" - "$OUT" "$DEVICE" >> "$results" <<'PY'
import json, sys
out, device = sys.argv[1], sys.argv[2]
evals = [json.loads(l) for l in open(f"{out}/dpo/metrics.jsonl") if "val_rewards/accuracies" in l]
first, last = evals[0], evals[-1]
print(json.dumps({"model": "dpo", "device": device, "heldout_first": first, "heldout_last": last}))
print(json.dumps({"model": "reward", "device": device, **json.load(open(f"{out}/reward/reward.json"))}))
PY
tail -2 "$results"
echo "results in $results"
