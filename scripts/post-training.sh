#!/usr/bin/env bash
# The post-training pipeline end to end, timed: base model -> SFT (and LoRA SFT) -> DPO, a
# reward model, RL on the built-in tasks' exact answers, and RLHF against that reward model ->
# held-out accuracy of each on every built-in task. What benchmarks/RESULTS.md's post-training
# tables come from.
#
#   scripts/post-training.sh                 # the laptop preset on the CPU (about 20 minutes)
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
SKIP=${SKIP:-}  # steps whose run folders are kept from an earlier call, e.g. "base sft lora merge"
mkdir -p "$OUT"
results="$OUT/results.jsonl"
[ -n "$SKIP" ] || : > "$results"

if [ "$DEVICE" = cpu ]; then
    BASE_ARGS=(--sample-tokens 0)
    SFT_ARGS=()
    LORA_ARGS=(--lora-rank 16 --lr 5e-3)
    DPO_ARGS=()
    REWARD_ARGS=()
    RL_ARGS=()
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
    RL_ARGS=(--steps 200 --lr 5e-5 --min-lr 5e-5 --device "$DEVICE" --dtype bfloat16)
    EVAL_ARGS=(--device "$DEVICE")
fi

step() {  # step NAME COMMAND...: run, log, record the wall time
    local name=$1; shift
    case " $SKIP " in *" $name "*) echo "---- $name: kept from before"; return;; esac
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
# RL on every task's prompts: GRPO on exact answers; RLHF: the reward model's score, with a KL
# penalty (beta 0.5) to the SFT model
step rl "$PYTHON" -m tinyllm rl --from "$OUT/sft" --task all --out "$OUT/rl" --overwrite "${RL_ARGS[@]}" ${RL_EXTRA:-}
step rlhf "$PYTHON" -m tinyllm rl --from "$OUT/sft" --task all --reward-model "$OUT/reward" --beta 0.5 --out "$OUT/rlhf" --overwrite "${RL_ARGS[@]}" ${RL_EXTRA:-}
evaluate base "$OUT/base"
evaluate sft "$OUT/sft"
evaluate lora "$OUT/lora-merged"
evaluate dpo "$OUT/dpo"
evaluate rl "$OUT/rl"
evaluate rlhf "$OUT/rlhf"
# held-out preference figures: DPO's last evaluation, the reward model's
"$PYTHON" - "$OUT" "$DEVICE" >> "$results" <<'PY'
import json, sys
out, device = sys.argv[1], sys.argv[2]
evals = [json.loads(l) for l in open(f"{out}/dpo/metrics.jsonl") if "val_rewards/accuracies" in l]
first, last = evals[0], evals[-1]
print(json.dumps({"model": "dpo", "device": device, "heldout_first": first, "heldout_last": last}))
print(json.dumps({"model": "reward", "device": device, **json.load(open(f"{out}/reward/reward.json"))}))
# RL runs: held-out figures at the start and at the end, training reward and KL
for name in ("rl", "rlhf"):
    recs = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    evals = [r for r in recs if "eval_n" in r]
    steps = [r for r in recs if "reward" in r]
    tail = steps[-max(1, len(steps) // 10):]
    summary = {"model": name, "device": device, "heldout_first": evals[0], "heldout_last": evals[-1],
               "reward_first_10pct": sum(r["reward"] for r in steps[:len(tail)]) / len(tail),
               "reward_last_10pct": sum(r["reward"] for r in tail) / len(tail),
               "rollout_s": sum(r["rollout_s"] for r in steps), "update_s": sum(r["update_s"] for r in steps)}
    if "kl" in steps[0]:
        summary.update(kl_max=max(r["kl"] for r in steps), kl_last_10pct=sum(r["kl"] for r in tail) / len(tail))
    print(json.dumps(summary))
PY
for name in rl rlhf; do "$PYTHON" -m tinyllm plot "$OUT/$name" || true; done
tail -2 "$results"
echo "results in $results"
