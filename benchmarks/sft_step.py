"""The fine-tuning step against the pretraining step on the same model: what masking and
padding cost.

Both steps are the ones the commands run (tinyllm.train.accumulate_grads + apply_update, in
the mode `tinyllm train` picks): pretraining on full windows of random tokens (batch x
context), fine-tuning on batches of the built-in chat conversations exactly as `tinyllm sft`
draws them (one conversation per row from one length bucket, padded to the longest of the
batch, loss on the assistant tokens only). Reported per step kind: the median step time, tokens/s counting every
position the model runs (padding included), tokens/s counting only the real tokens, the
padding share and the trained share (targets the loss counts).

    python benchmarks/sft_step.py                        # laptop preset on the CPU
    python benchmarks/sft_step.py --device cuda --preset llama-shakespeare-char --batch 64
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import autograd
from autograd import backend
from autograd.optim import AdamW
from tinyllm import chat, tasks
from tinyllm.model import GPT
from tinyllm.sft import SFTConfig, SFTRun, encode_examples
from tinyllm.tokenizer import Tokenizer
from tinyllm.train import IGNORE_INDEX, accumulate_grads, apply_update, shard_count


def sync(device):
    if device != "cpu":
        backend.cupy_module().cuda.Device().synchronize()


def time_steps(model, params, opt, batches, device, shards, warmup):
    times = []
    for i, (x, y) in enumerate(batches):
        x, y = backend.to_device(x, device), backend.to_device(y, device)
        sync(device)
        t0 = time.perf_counter()
        accumulate_grads(model, params, [(x, y)], shards)
        apply_update(params, opt, 1.0)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vocab-size", type=int, default=1024, help="BPE merges + 256 to train")
    args = ap.parse_args()

    autograd.manual_seed(0)
    docs = [t for _, t in __import__("tinyllm.data", fromlist=["x"]).builtin_documents()]
    tok = chat.add_chat_tokens(Tokenizer.train(docs, args.vocab_size))
    model = GPT.from_preset(args.preset, vocab_size=tok.vocab_size, dropout=0.0, device=args.device)
    T = model.config.context_length
    params = model.parameters()
    opt = AdamW(params, lr=1e-4)
    shards = shard_count("auto", args.batch, args.device)
    n = args.steps + args.warmup

    rng = np.random.default_rng(0)
    pre = [(x, x.copy()) for x in (rng.integers(0, tok.vocab_size, (args.batch, T)) for _ in range(n))]
    t_pre = time_steps(model, params, opt, pre, args.device, shards, args.warmup)

    run = SFTRun.__new__(SFTRun)  # only its batch drawing, on the built-in data
    run.cfg = SFTConfig(base="-", batch_size=args.batch)
    run.train_examples, _ = encode_examples(tasks.chat_dataset("train", 4000, 0), tok, T)
    run.pad_id, run.padding_seen = tok.eot_id, 0
    run._make_buckets()
    sft, real, trained, total = [], 0, 0, 0
    for k in range(n):
        x, y = run.micro_batch(k)
        rows = [None] * len(x)
        sft.append((x, y))
        if k >= args.warmup:
            real += int((x != tok.eot_id).sum()) + len(rows)  # each row's leading <|endoftext|>
            trained += int((y != IGNORE_INDEX).sum())
            total += x.size
    t_sft = time_steps(model, params, opt, sft, args.device, shards, args.warmup)
    # the same number of positions per step as pretraining: more conversations per batch
    mean_len = total / (args.steps * args.batch)
    big_b = int(round(args.batch * T / mean_len))
    run.cfg = SFTConfig(base="-", batch_size=big_b)
    big = [run.micro_batch(k) for k in range(n)]
    big_total = sum(x.size for x, _ in big[args.warmup:])
    big_real = sum(int((x != tok.eot_id).sum()) + len(x) for x, _ in big[args.warmup:])
    t_big = time_steps(model, params, opt, big, args.device, shards, args.warmup)

    steps = args.steps
    print(f"{args.preset} ({model.num_params() / 1e6:.2f}M parameters), batch {args.batch}, "
          f"device {args.device}, {shards} CPU shard(s), median of {steps} steps")
    print("| step | positions per step | median step | tok/s (all positions) | tok/s (real tokens) "
          "| padding | trained targets |")
    print("|---|---|---|---|---|---|---|")
    print(f"| pretraining | {args.batch} x {T} | {1e3 * t_pre:.1f} ms | {args.batch * T / t_pre:,.0f} "
          f"| {args.batch * T / t_pre:,.0f} | 0% | 100% |")
    per_step = total / steps
    print(f"| fine-tuning | {args.batch} x {per_step / args.batch:.1f} (mean) | {1e3 * t_sft:.1f} ms "
          f"| {per_step / t_sft:,.0f} | {real / steps / t_sft:,.0f} | {100 * (1 - real / total):.0f}% "
          f"| {100 * trained / total:.0f}% |")
    per_step = big_total / steps
    print(f"| fine-tuning, as many positions | {big_b} x {per_step / big_b:.1f} (mean) | "
          f"{1e3 * t_big:.1f} ms | {per_step / t_big:,.0f} | {big_real / steps / t_big:,.0f} | "
          f"{100 * (1 - big_real / big_total):.0f}% | - |")


if __name__ == "__main__":
    main()
