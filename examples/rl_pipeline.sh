#!/usr/bin/env bash
# From nothing to a model improved by reinforcement learning, on the CPU:
#
#   base model (tinyllm train) -> chat model (tinyllm sft) -> RL on a built-in task (tinyllm rl)
#
# with the held-out accuracy of the chat model before and after RL. The reward is verifiable:
# 1 when the answer is exactly right, else 0. RL needs groups whose completions differ in
# reward, so pick a task whose accuracy after SFT is neither 0 nor 1.
#
#   examples/rl_pipeline.sh                  # TASK=reverse, runs/ (about 10-15 minutes)
#   TASK=count OUT=/tmp/rl examples/rl_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
TASK=${TASK:-reverse}
OUT=${OUT:-runs}
tinyllm() { "$PYTHON" -m tinyllm "$@"; }

[ -e "$OUT/laptop/best.ckpt" ] || tinyllm train --out "$OUT/laptop" --sample-tokens 0
[ -e "$OUT/laptop-sft/best.ckpt" ] || tinyllm sft --from "$OUT/laptop" --out "$OUT/laptop-sft" -q
echo "--- held-out accuracy after SFT"
tinyllm eval "$OUT/laptop-sft" --task "$TASK"

# 400 steps of 16 prompts x 8 completions; the log shows the reward, the share of groups that
# teach nothing (all completions equally right), and held-out pass@1 every 50 steps
tinyllm rl --from "$OUT/laptop-sft" --task "$TASK" --out "$OUT/laptop-sft-rl" --overwrite

echo "--- held-out accuracy after RL"
tinyllm eval "$OUT/laptop-sft-rl" --task "$TASK"
