"""Reinforcement learning with verifiable rewards: GRPO (and REINFORCE) on a chat model.

    tinyllm rl --from runs/laptop-sft --task add                 # a built-in task's exact answers
    tinyllm rl --from runs/laptop-sft --task all                 # every verifiable task, mixed
    tinyllm rl --from runs/laptop-sft --reward my.py:score --prompts prompts.jsonl
    tinyllm rl --from runs/laptop-sft --reward-model runs/rm --task all   # RLHF on task prompts
    tinyllm rl --resume runs/laptop-sft-rl                       # continue exactly where it stopped

One step:

    1. rollouts   P prompts, G completions each, sampled with the KV-cache decoder
                  (`generate.decode_steps`) at temperature T (top-k / top-p optional), each
                  stopping at <|im_end|> (or any special token) or after max_new_tokens.
    2. rewards    r_i = reward_fn(prompt, completion, **fields) (+ format_reward when the
                  completion ended with <|im_end|>)
    3. advantages A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (--scale-rewards group)
                  A_i = r_i - mean(r_group)                           (--scale-rewards none)
                  every token of completion i gets A_i
    4. updates    --iterations optimizer steps on the clipped surrogate (DeepSeekMath's GRPO,
                  DAPO's asymmetric clip):
                      rho_t = pi(y_t | ...) / pi_old(y_t | ...)
                      l_t   = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A)
                              + beta k3(pi, ref)_t
                  averaged over the batch's completion tokens (--loss-type dapo) or per
                  sequence, then over sequences (--loss-type grpo).

Which distribution a log-probability refers to: the policy is softmax(logits / T) over the
whole vocabulary, at the rollout temperature T. top-k and top-p only shape which tokens the
sampler draws; they do not enter any log-probability (as in TRL). The rollouts keep
log softmax(z / T)[token] of the very logits the token was drawn from (`Rollouts.logps`), and
training computes log softmax(logits / T) of the same tokens in one teacher-forced forward
(`token_logps`): the two agree to rounding (a test checks it). The "old" policy of the ratio
is the parameters that sampled the batch; its log-probabilities are taken from the first
update pass on the batch (detached), made before any optimizer step on it. So with
--iterations 1 the ratio is exactly 1 and the objective is the policy gradient
(REINFORCE with a group-mean baseline when --scale-rewards none --beta 0).

RL runs without dropout (its rate is set to 0): the rollouts are sampled without it, and an
update that scored them with it would compare two different policies.

Groups whose G rewards are all equal have zero advantage: they teach nothing (and with
beta 0 they skip the update's forward), but their tokens still count in the loss's
normalization, as in TRL. A completion cut at max_new_tokens (no <|im_end|>) is trained on
as sampled, unless --mask-truncated leaves it out (DAPO's overlong filtering).

The step's prompts and every sampling generator are seeded by (seed, step), and the
checkpoint holds weights and optimizer moments, so --resume continues bit for bit. Every
--eval-every steps (and before the first) the model answers the held-out prompts greedily (the
tasks' held-out split, or --heldout-fraction of a --prompts file chosen by content hash, at
most --eval-n): with tasks, their pass@1 (each task's too when there are several; with
--eval-k K, pass@K over K samples each); with a reward function or model, the mean reward of
those answers. best.ckpt holds the best of that figure (pass@1 under the tasks' own reward,
else the mean reward). The run folder loads wherever a run folder loads (generate, chat, eval,
sft, export).

Prompts come from built-in tasks (`--task NAME[,NAME...]` or `all`: their training split, each
prompt with its `answer` and `task`) or a JSON-lines file (`--prompts`). Rewards: the tasks'
exact answers (1 or 0) unless `--reward FILE.py:FUNCTION`, which calls
FUNCTION(prompt, completion, **fields) with the completion's plain text (no template tokens),
the prompt as given (a string, or the list of messages of a conversation line), and the line's
other keys as keyword arguments (TRL's habit), or `--reward-model DIR`, which scores with
`tinyllm.reward.RewardModel` (RLHF). A reward function that raises or returns anything but a
finite number stops the run with one line naming it, the prompt and what it gave.

One log line (and one metrics.jsonl record) per step: mean reward, its std, the share of
groups with zero reward variance ("flat"), mean completion length, entropy of the sampling
distribution, the share of tokens whose ratio was clipped, the KL to the start (beta > 0),
and tokens/s of the rollouts and of the updates.
"""

import dataclasses
import hashlib
import importlib.util
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

import autograd
from autograd import backend, ops
from tinyllm import chat, finetune, tasks
from tinyllm.atomic import atomic_write
from tinyllm.checkpoint import CheckpointError
from tinyllm.finetune import FinetuneConfig, FinetuneRun, split_by_hash
from tinyllm.cli import (UsageError, check_choice, check_float, check_int, nonnegative_float,
                         nonnegative_int, positive_float, positive_int)
from tinyllm.generate import _groups, decode_steps
from tinyllm.train import (IGNORE_INDEX, RUN_FILES, _truncate_metrics, apply_update, fmt_time,
                           log, param_dtype, run_slices, validate_common)

__all__ = ["group_advantages", "k3_kl", "grpo_loss", "token_logps", "Rollouts", "rollout",
           "training_batch", "task_reward", "load_reward_function", "checked_rewards",
           "read_prompts", "RLConfig", "RLRun", "register"]

SCALES = ("group", "none")
LOSS_TYPES = ("dapo", "grpo")
STD_EPS = 1e-4  # TRL's epsilon under the group std


# ---- the objective ---------------------------------------------------------------------------

def group_advantages(rewards, group_size, scale="group", eps=STD_EPS):
    """Each reward minus the mean of its group (rows k*G .. k*G+G-1), divided by the group's
    standard deviation (unbiased, as TRL's) plus `eps` when scale == "group". A group of equal
    rewards gets advantage 0 (never NaN)."""
    r = np.asarray(rewards, np.float64)
    check_choice("scale", scale, SCALES)
    if r.ndim != 1 or group_size < 2 or len(r) % group_size:
        raise ValueError(f"group_advantages: {r.shape} rewards do not split into groups of "
                         f"{group_size} (a group needs at least 2)")
    g = r.reshape(-1, group_size)
    adv = g - g.mean(axis=1, keepdims=True)
    if scale == "group":
        adv = adv / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    return adv.reshape(-1)


def k3_kl(logps, ref_logps):
    """Schulman's k3 estimator of KL(pi || ref) per token, from log-probabilities of tokens
    drawn from pi: exp(ref - logp) - (ref - logp) - 1 (>= 0, zero where they agree).
    `logps` a Tensor (differentiable) or an array; `ref_logps` an array."""
    if isinstance(logps, autograd.Tensor):
        d = -logps + _like(ref_logps, logps)
        return ops.exp(d) - d - 1.0
    d = np.asarray(ref_logps) - np.asarray(logps)
    return np.exp(d) - d - 1.0


def _like(a, t):
    """A constant array (or Tensor's data) as an array of `t`'s dtype and device."""
    a = a.data if isinstance(a, autograd.Tensor) else a
    return backend.to_device(np.asarray(a) if not backend.is_cupy_array(a) else a,
                             t.device).astype(t.dtype, copy=False)


def token_weights(mask, loss_type, total_tokens=None, total_seqs=None):
    """Per-token weights (B, T) that turn a sum over tokens into the loss's average:
    dapo 1 / (completion tokens of the batch); grpo 1 / (len_i * sequences). `total_*`
    override the counts of this slice when a batch is split (the batch's totals)."""
    check_choice("loss_type", loss_type, LOSS_TYPES)
    m = np.asarray(mask, np.float64)
    if loss_type == "dapo":
        n = m.sum() if total_tokens is None else total_tokens
        return m / max(n, 1)
    lengths = np.maximum(m.sum(axis=1, keepdims=True), 1)
    n = len(m) if total_seqs is None else total_seqs
    return m / lengths / max(n, 1)


def grpo_loss(logps, old_logps, advantages, mask, epsilon=0.2, epsilon_high=None,
              loss_type="dapo", ref_logps=None, beta=0.0, total_tokens=None, total_seqs=None):
    """(loss Tensor, stats) of the clipped surrogate (see the module docstring).

    logps: (B, T) Tensor, log pi of each target token (anything at masked positions);
    old_logps: (B, T) array, log pi_old of the same tokens; advantages: (B,);
    mask: (B, T) bool, the completion tokens; ref_logps: (B, T) array for the KL term
    (needed when beta > 0). epsilon_high None: the symmetric clip. stats: means over the
    completion tokens of the ratio, the clipped share (low: rho < 1 - eps with A < 0;
    high: rho > 1 + eps_high with A > 0) and, with a reference, the k3 KL; plus `tokens`."""
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    mask = np.asarray(backend.to_device(mask, "cpu") if backend.is_cupy_array(mask) else mask,
                      bool)
    if logps.shape != mask.shape or np.shape(old_logps) != mask.shape:
        raise ValueError(f"grpo_loss: logps {logps.shape}, old_logps {np.shape(old_logps)} and "
                         f"mask {mask.shape} must be one (batch, time) shape")
    adv = np.asarray(advantages, np.float64).reshape(-1, 1)
    if len(adv) != len(mask):
        raise ValueError(f"grpo_loss: {len(adv)} advantages for {len(mask)} sequences")
    old = _like(old_logps, logps)
    ratio = ops.exp(logps - old)
    A = _like(np.broadcast_to(adv, mask.shape), logps)
    unclipped = ratio * A
    clipped = ops.clip(ratio, 1.0 - epsilon, 1.0 + eps_hi) * A
    # min(a, b) through where: the gradient flows through whichever term is smaller
    per_token = -ops.where(unclipped.data <= clipped.data, unclipped, clipped)
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    w = _like(token_weights(mask, loss_type, total_tokens, total_seqs), logps)
    loss = (per_token * w).sum()
    r = np.asarray(backend.to_device(ratio.data, "cpu"), np.float64)[mask]
    a = np.broadcast_to(adv, mask.shape)[mask]
    low = (r < 1 - epsilon) & (a < 0)
    high = (r > 1 + eps_hi) & (a > 0)
    n = max(int(mask.sum()), 1)
    stats = {"tokens": int(mask.sum()), "ratio": float(r.sum() / n),
             "clip_low": float(low.sum() / n), "clip_high": float(high.sum() / n),
             "clip_fraction": float((low | high).sum() / n)}
    if kl is not None:
        kl_tokens = np.asarray(backend.to_device(kl.data, "cpu"), np.float64)[mask]
        stats["kl"] = float(kl_tokens.sum() / n)
    return loss, stats


def token_logps(model, x, y, temperature=1.0):
    """(B, T) Tensor: log softmax(logits / temperature)[y] at each position of inputs x
    (B, T), 0 where the target is IGNORE_INDEX. One teacher-forced forward; the head's fused
    loss op never holds the (B, T, vocab) log-probabilities."""
    h = model.hidden(x)
    if temperature != 1.0:
        h = h * (1.0 / temperature)  # (h / T) W^T = logits / T
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
    device = model.tok_emb.weight.device
    nll = ops.linear_cross_entropy(h, head, backend.to_device(y, device),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    return -nll


# ---- rollouts ---------------------------------------------------------------------------------

@dataclass
class Rollouts:
    """G completions of each prompt, row g of prompt p at index p * G + g.

    tokens[i]: the sampled ids of completion i, ending with its stop token when it stopped;
    finished[i]: it stopped at a stop token (else it was cut at max_new_tokens);
    ended_turn[i]: that stop token was <|im_end|>; logps[i]: log softmax(z / T) of each of its
    tokens, from the logits z it was drawn from; entropy: the sampling distribution's mean
    entropy over the completion tokens; positions: rows x steps the decoder ran (also rows
    that had stopped and wait for their batch); seconds: wall time."""
    prompt_ids: list
    group_size: int
    tokens: list
    finished: np.ndarray
    ended_turn: np.ndarray
    logps: list
    entropy: float
    positions: int
    seconds: float

    @property
    def n_tokens(self):
        return sum(len(t) for t in self.tokens)


def _sampled_logp_and_entropy(z, tokens, temperature):
    """log softmax(z / T)[token] of each row and the entropy of softmax(z / T), from one
    exponential of the (rows, vocab) logits: with s = z / T - max, p = e^s / Z,
    log p[t] = s[t] - log Z and H = -sum p log p = log Z - sum(e^s s) / Z."""
    s = z / temperature
    s -= s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    Z = e.sum(axis=-1)
    log_Z = np.log(Z)
    chosen = s[np.arange(len(s)), tokens] - log_Z
    return chosen, log_Z - (e * s).sum(axis=-1) / Z


def rollout(model, prompt_ids, group_size, max_new_tokens, temperature=1.0, top_k=None,
            top_p=None, stops=(), end_id=None, seed=0, max_rows=256):
    """Sample `group_size` completions of each prompt (lists of ids): see `Rollouts`.

    Prompts of one length are decoded together (there is no padding mask), at most
    `max_rows` rows (whole groups) per batch; batch k draws from a generator seeded by
    (*seed, k). A prompt plus max_new_tokens must fit the context."""
    if not temperature > 0:
        raise ValueError(f"rollout: temperature must be > 0, got {temperature}")
    seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
    G = group_size
    stops = set(int(s) for s in stops)
    n = len(prompt_ids) * G
    tokens, logps = [None] * n, [None] * n
    finished, ended = np.zeros(n, bool), np.zeros(n, bool)
    ent_sum, ent_n, positions = 0.0, 0, 0
    t0 = time.perf_counter()
    per_batch = max(1, max_rows // G)
    batches = [g[i:i + per_batch] for g in _groups(prompt_ids) for i in range(0, len(g), per_batch)]
    for k, prompts in enumerate(batches):
        rows = [p * G + g for p in prompts for g in range(G)]
        ids = [prompt_ids[p] for p in prompts for _ in range(G)]
        out = [[] for _ in rows]
        lp = [[] for _ in rows]
        done = np.zeros(len(rows), bool)
        steps = decode_steps(model, ids, max_new_tokens, temperature, top_k, top_p,
                             seed=seed + [k], overflow="error")
        for nxt, z in steps:
            positions += len(rows)
            live = np.flatnonzero(~done)
            chosen, ent = _sampled_logp_and_entropy(z[live], nxt[live], temperature)
            ent_sum, ent_n = ent_sum + float(ent.sum()), ent_n + len(live)
            for r, t, logp in zip(live.tolist(), nxt[live].tolist(), chosen.tolist()):
                out[r].append(t)
                lp[r].append(logp)
                if t in stops:
                    done[r] = True
                    finished[rows[r]] = True
                    ended[rows[r]] = t == end_id
            if done.all():
                steps.close()
                break
        for r, i in enumerate(rows):
            tokens[i], logps[i] = out[r], np.array(lp[r], np.float64)
    return Rollouts(list(prompt_ids), G, tokens, finished, ended, logps,
                    ent_sum / max(ent_n, 1), positions, time.perf_counter() - t0)


def training_batch(prompt_ids, rollouts, pad_id, mask_truncated=False):
    """(x, y, mask) for the teacher-forced pass over prompt + completion of every row: inputs
    x (N, L), targets y = the next ids (IGNORE_INDEX outside the completion), mask = the
    completion's targets (its tokens and its stop token; not the prompt, not the padding,
    and with `mask_truncated` not a completion cut at max_new_tokens)."""
    G = rollouts.group_size
    seqs = [list(prompt_ids[i // G]) + list(t) for i, t in enumerate(rollouts.tokens)]
    L = max(len(s) for s in seqs) - 1
    x = np.full((len(seqs), L), pad_id, np.int64)
    y = np.full((len(seqs), L), IGNORE_INDEX, np.int64)
    for i, s in enumerate(seqs):
        n_prompt = len(prompt_ids[i // G])
        x[i, :len(s) - 1] = s[:-1]
        if mask_truncated and not rollouts.finished[i]:
            continue
        y[i, n_prompt - 1:len(s) - 1] = s[n_prompt:]
    return x, y, y != IGNORE_INDEX


# ---- rewards -----------------------------------------------------------------------------------

class RewardError(ValueError):
    """A reward function failed or returned something that is not a number."""


def task_reward(names):
    """reward_fn(prompt, completion, answer, task=None, **_) -> 1.0 when the completion is the
    exact answer (`Task.check`) of the prompt's task (its `task` field, or the only one of
    `names`: a task name or a list of them), else 0.0."""
    names = [names] if isinstance(names, str) else list(names)

    def reward(prompt, completion, answer=None, task=None, **_):
        if answer is None:
            raise ValueError("the prompt has no 'answer' field to check against")
        if task is None and len(names) != 1:
            raise ValueError(f"the prompt has no 'task' field to say which of {names} it is")
        return float(bool(tasks.get_task(task or names[0]).check(completion, answer)))

    reward.__name__ = f"task {','.join(names)}"
    return reward


def load_reward_function(spec):
    """The function of "path/to/file.py:function", loaded from that file (its code runs)."""
    path, sep, name = str(spec).rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"--reward: expected FILE.py:FUNCTION, got {spec!r}")
    if not Path(path).is_file():
        raise UsageError(f"--reward {spec}: no such file {path}")
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()
    module_name = f"tinyllm_reward_{digest[:12]}"
    try:
        mod_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") \
            from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"--reward {spec}: {path} has no function {name!r}")
    fn.__tinyllm_name__ = spec
    return fn


def _short(v, n=80):
    text = repr(v)
    return text if len(text) <= n else text[:n - 3] + "..."


def checked_rewards(fn, prompts, completions, fields):
    """[fn(prompt, completion, **fields)] as float64, each checked: an exception, a
    non-number or a non-finite number raises RewardError naming the function, the prompt
    and what it gave."""
    name = getattr(fn, "__tinyllm_name__", None) or getattr(fn, "__name__", repr(fn))
    out = np.empty(len(prompts), np.float64)
    for i, (p, c, f) in enumerate(zip(prompts, completions, fields)):
        try:
            v = fn(p, c, **f)
        except Exception as e:
            raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} (prompt "
                              f"{_short(p)}, completion {_short(c)})") from None
        if isinstance(v, (np.ndarray,)) and v.shape == ():
            v = v.item()
        if not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise RewardError(f"reward function {name} returned {_short(v)}, not a finite "
                              f"number (prompt {_short(p)}, completion {_short(c)})")
        out[i] = float(v)
    return out


def reward_model_scorer(path, device="cpu"):
    """score(prompts, completions, fields) of a reward model folder (tinyllm reward train)."""
    try:
        from tinyllm.reward import RewardModel
    except ImportError as e:
        raise UsageError(f"--reward-model: needs tinyllm.reward (the reward model module), "
                         f"which is not available: {e}") from None
    model = RewardModel.load(path, device=device)

    def score(prompts, completions, fields):
        values = np.asarray(model.score(prompts, completions), np.float64)
        if not np.isfinite(values).all():
            raise RewardError(f"--reward-model {path}: returned a non-finite reward")
        return values

    return score


# ---- prompts -------------------------------------------------------------------------------------

def read_prompts(path):
    """The prompts of a JSON-lines file: a list of (prompt, fields) where prompt is the
    "prompt" string, or the "prompt"/"messages" list of chat messages (ending with a user
    turn), and fields every other key of the line (passed to a reward function as keyword
    arguments). A bad line raises ValueError with the file and line number."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise FileNotFoundError(f"--prompts {path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"--prompts {path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        keys = [k for k in ("prompt", "messages") if k in obj]
        if len(keys) != 1:
            raise ValueError(f"{where}: needs exactly one of 'prompt' (a string or a list of "
                             f"messages) or 'messages', got keys {sorted(obj)[:8]}")
        prompt = obj[keys[0]]
        if isinstance(prompt, list):
            chat.check_messages(prompt, f"{where}: {keys[0]}")
            if prompt[-1]["role"] != "user":
                raise ValueError(f"{where}: the last message must be the user's (the model "
                                 f"answers it), got {prompt[-1]['role']!r}")
        elif not isinstance(prompt, str) or keys[0] == "messages":
            raise ValueError(f"{where}: {keys[0]!r} must be "
                             f"{'a string or ' if keys[0] == 'prompt' else ''}a list of "
                             f"messages, got {type(prompt).__name__}")
        elif not prompt.strip():
            raise ValueError(f"{where}: the prompt is empty")
        fields = {k: v for k, v in obj.items() if k != keys[0]}
        bad = [k for k in fields if not k.isidentifier() or k == "completion"]
        if bad:
            raise ValueError(f"{where}: field {bad[0]!r} cannot be passed to a reward function "
                             f"as a keyword argument")
        out.append((prompt, fields))
    if not out:
        raise ValueError(f"--prompts {path}: no prompts (the file is empty)")
    return out


# ---- settings ------------------------------------------------------------------------------------

@dataclass
class RLConfig:
    command: ClassVar[str] = "rl"  # the subcommand, and the checkpoint's "kind"
    suffix: ClassVar[str] = "rl"  # default output: the --from folder's name + "-rl"

    base: str | None = None  # the model to start from, usually an SFT run folder (--from)
    tokenizer: str | None = None
    # the prompts: exactly one of task, prompts
    task: str | None = None  # built-in verifiable task(s): "reverse", "add,sort" or "all"
    prompts: str | None = None  # JSON-lines prompts
    n_prompts: int = 5000  # built-in tasks: training prompts to draw from
    heldout_fraction: float = 0.05  # a --prompts file: share held out for evaluation (by hash)
    # the reward: a reward function or a reward model; neither: the tasks' exact answers
    reward: str | None = None  # FILE.py:FUNCTION
    reward_model: str | None = None  # a reward model folder (RLHF)
    format_reward: float = 0.0  # added when a completion ends with <|im_end|>
    # rollouts
    group_size: int = 8
    prompts_per_step: int = 16
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    # the objective
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (DAPO suggests 0.28)
    iterations: int = 1
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    beta: float = 0.0
    mask_truncated: bool = False
    # low-rank adapters: rank 0 trains every weight
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    # optimization. These defaults raise the laptop preset's held-out reverse accuracy after
    # SFT from 0.46 to ~0.6 in 400 steps (5-8 minutes on 2 CPU cores); 2e-4 or 5e-4 with 8
    # prompts a step lowered it.
    steps: int = 400
    lr: float = 2e-4
    min_lr: float = 2e-4
    warmup: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    clip: float = 1.0
    # bookkeeping
    seed: int = 1337
    log_every: int = 1
    eval_every: int = 50
    eval_n: int = 200
    eval_k: int = 0  # > 0: also pass@k over k samples per held-out prompt
    out: str | None = None  # run folder; None: <base>-rl
    device: str = "cpu"
    dtype: str = "float32"
    peak_flops: float | None = None
    threads: int | None = None
    data_threads: int | str = "auto"
    checkpoint_blocks: bool = False
    quiet: bool = False

    # what Run and validate_common read: one optimizer step's sequences, no accumulation
    @property
    def batch_size(self):
        return self.group_size * self.prompts_per_step

    grad_accum = 1
    eval_iters = 1

    def to_dict(self):
        return dataclasses.asdict(self)

    from_dict = classmethod(FinetuneConfig.from_dict.__func__)
    default_out = FinetuneConfig.default_out

    @property
    def task_names(self):
        """The built-in tasks whose prompts train ("all": every verifiable task)."""
        if self.task is None:
            return []
        return tasks.verifiable_tasks() if self.task == "all" else self.task.split(",")

    @property
    def task_reward(self):
        """True when the reward is the tasks' exact answers (no function, no model)."""
        return self.reward is None and self.reward_model is None

    def validate(self):
        validate_common(self)
        if not self.base:
            raise UsageError("--from: give the run folder (usually a fine-tuned chat model) to "
                             "start from")
        if (self.task is None) == (self.prompts is None):
            raise UsageError("give exactly one source of prompts: --task NAME[,NAME...] (a "
                             "built-in task's) or --prompts FILE.jsonl"
                             + (", not both" if self.task is not None else ""))
        if self.reward is not None and self.reward_model is not None:
            raise UsageError("give at most one of --reward FILE.py:FUNCTION and --reward-model "
                             "DIR")
        if self.task_reward and self.task is None:
            raise UsageError("--prompts: needs --reward FILE.py:FUNCTION or --reward-model DIR "
                             "(only built-in tasks have answers to check)")
        if not isinstance(self.task, (str, type(None))) or self.task == "" or any(
                t not in tasks.verifiable_tasks() for t in self.task_names):
            raise UsageError(f"--task: must be 'all' or one or more of "
                             f"{', '.join(tasks.verifiable_tasks())} separated by commas, got "
                             f"{self.task!r}")
        if len(set(self.task_names)) != len(self.task_names):
            raise UsageError(f"--task: a task is named twice in {self.task!r}")
        check_float("heldout_fraction", self.heldout_fraction, low=0, high=1, low_open=True,
                    high_open=True)
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise UsageError(f"--prompts {self.prompts}: no such file")
        if self.reward_model is not None and not Path(self.reward_model).is_dir():
            raise UsageError(f"--reward-model {self.reward_model}: no such folder")
        check_int("n_prompts", self.n_prompts, low=1)
        check_float("format_reward", self.format_reward)
        check_int("group_size", self.group_size, low=2)
        check_int("prompts_per_step", self.prompts_per_step, low=1)
        check_int("max_new_tokens", self.max_new_tokens, low=1)
        check_float("temperature", self.temperature, low=0, low_open=True)
        check_int("top_k", self.top_k, low=0, allow_none=True)
        check_float("top_p", self.top_p, low=0, high=1, low_open=True, allow_none=True)
        check_float("epsilon", self.epsilon, low=0, high=1, low_open=True, high_open=True)
        check_float("epsilon_high", self.epsilon_high, low=0, low_open=True, allow_none=True)
        check_int("iterations", self.iterations, low=1)
        check_choice("scale_rewards", self.scale_rewards, SCALES)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_float("beta", self.beta, low=0)
        check_int("eval_n", self.eval_n, low=1)
        check_int("eval_k", self.eval_k, low=0)
        check_int("lora_rank", self.lora_rank, low=0)
        check_float("lora_alpha", self.lora_alpha, low=0, low_open=True, allow_none=True)
        if not isinstance(self.mask_truncated, bool):
            raise UsageError(f"mask_truncated: must be true or false, got {self.mask_truncated!r}")
        return self

    # settings that may change when resuming (they do not change what a step computes)
    resumable: ClassVar[set] = {"steps", "log_every", "eval_every", "eval_n", "eval_k", "out",
                                "peak_flops", "quiet", "device", "threads", "data_threads",
                                "checkpoint_blocks"}


def without_dropout(model):
    """The model with every dropout rate set to 0 (its config too). Rollouts are sampled
    without dropout, so the update must score them without it: with it, the ratio would
    compare two different policies."""
    model.config.dropout = 0.0
    for m in model.modules():
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0
        if type(m).__name__ == "Dropout":
            m.p = 0.0
    return model


def pass_at_k(n, c, k):
    """The unbiased pass@k of n samples with c correct: 1 - C(n - c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---- the run -------------------------------------------------------------------------------------

class RLRun(FinetuneRun):
    """An RL run: Run's model, optimizer, checkpoints and exact resume (FinetuneRun's start
    from --from, LoRA and adapter files), with rollouts, rewards and the GRPO update as the
    step, and the held-out prompts' greedy answers as the evaluation."""

    verb = "RL from"
    expects_chat_model = True

    def setup(self, resume_from):
        from tinyllm.dpo import model_fingerprint

        cfg = self.cfg
        model, self.tokenizer = self.starting_model(resume_from)
        start = None if resume_from else model_fingerprint(model, cfg.dtype)
        self.model = without_dropout(self.apply_lora(model))
        tok = self.tokenizer
        self.end_id = chat.end_of_turn(tok)
        self.stops = set(tok.special_tokens.values())
        self.pad_id = tok.eot_id if tok.eot_id is not None else 0
        self._prompts()
        self._rewarder()
        self.reference = None
        self.reference_model = start if resume_from is None else \
            resume_from["meta"].get("reference_model")
        if cfg.beta:
            self.reference = self._reference_model(self.reference_model, resume_from is None)
        self.best_eval = -math.inf
        self.data_summary = (f"data: {self.source}, {len(self.prompts):,} prompts "
                             f"({len(self.heldout)} held out); reward: {self.reward_name}")
        self.batch_summary = (f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions "
                              f"(up to {cfg.max_new_tokens} tokens, temperature "
                              f"{cfg.temperature}); {cfg.loss_type} loss, epsilon {cfg.epsilon}"
                              f"{f'/{cfg.epsilon_high}' if cfg.epsilon_high is not None else ''}, "
                              f"{cfg.iterations} iteration(s), beta {cfg.beta}")

    def _reference_model(self, fingerprint, fresh):
        """A frozen copy of the starting model (for the KL term); on resume it is loaded
        again from --from and must still be the same model."""
        from tinyllm.dpo import model_fingerprint
        from tinyllm.generate import load_for_generation

        cfg = self.cfg
        ref, tok = load_for_generation(cfg.base, tokenizer=cfg.tokenizer, device=cfg.device,
                                       dtype=param_dtype(cfg.dtype))
        ref, _ = chat.prepare_for_chat(ref, tok)
        if not fresh and model_fingerprint(ref, cfg.dtype) != fingerprint:
            raise CheckpointError(f"{cfg.base}: the starting model changed since the run began; "
                                  f"the KL term needs that model as its reference")
        for p in ref.parameters():
            p.requires_grad = False
        ref.eval()
        return ref

    def _prompts(self):
        """self.prompts and self.heldout: (prompt, fields) pairs to train on and to evaluate
        on; the training prompts' chat-template ids; data_meta. Built-in tasks give their
        training and held-out splits (fields: answer, task); a file's lines are split by
        content hash."""
        from tinyllm.evaluate import prompt_ids

        cfg = self.cfg
        if cfg.prompts is not None:
            self.prompts, self.heldout = split_by_hash(
                read_prompts(cfg.prompts), cfg.heldout_fraction, what="prompts",
                source=f"--prompts {cfg.prompts}")
            self.heldout = self.heldout[:cfg.eval_n]
            self.source = str(cfg.prompts)
        else:
            mix = {name: 1.0 for name in cfg.task_names}
            self.prompts = [(p, {"answer": a, "task": t}) for t, p, a in
                            tasks.mixed_examples("train", cfg.n_prompts, cfg.seed, mix)]
            self.heldout = [(p, {"answer": a, "task": t}) for t, p, a in
                            tasks.mixed_examples("heldout", cfg.eval_n, mix=mix)]
            self.source = f"task{'s' if len(mix) > 1 else ''} {', '.join(mix)}"
        self.prompt_ids = prompt_ids(self.model, self.tokenizer, [p for p, _ in self.prompts],
                                     "prompt")
        ctx = self.model.config.context_length
        for k, ids in enumerate(self.prompt_ids):
            if len(ids) + cfg.max_new_tokens - 1 > ctx:
                raise UsageError(f"{self.source}: prompt {k + 1} takes {len(ids)} tokens; with "
                                 f"--max-new-tokens {cfg.max_new_tokens} it does not fit the "
                                 f"model's context of {ctx}")
        h = hashlib.sha256(json.dumps([cfg.task, cfg.reward, cfg.reward_model]).encode())
        for ids, (_, fields) in zip(self.prompt_ids, self.prompts):
            h.update(np.asarray(ids, "<i8").tobytes())
            h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        self.data_meta = {"key": h.hexdigest(), "prompts": len(self.prompts)}

    def _rewarder(self):
        """self.score(prompts, completions, fields) -> rewards, and its name."""
        cfg = self.cfg
        if cfg.reward_model is not None:
            self.score = reward_model_scorer(cfg.reward_model, cfg.device)
            self.reward_name = f"reward model {cfg.reward_model}"
        else:
            fn = load_reward_function(cfg.reward) if cfg.reward else task_reward(cfg.task_names)
            self.score = lambda p, c, f: checked_rewards(fn, p, c, f)
            self.reward_name = cfg.reward or "exact answers"
        if cfg.format_reward:
            self.reward_name += f" + {cfg.format_reward} for ending the turn"

    # ---- one step ------------------------------------------------------------------------------
    def step_prompts(self, step):
        """Indices of the prompts of `step`: distinct, drawn by a generator seeded with (seed,
        step), so a resumed run draws the same ones."""
        rng = np.random.default_rng([self.cfg.seed, step, 0])
        n = len(self.prompts)
        return rng.choice(n, size=self.cfg.prompts_per_step, replace=n < self.cfg.prompts_per_step)

    def rewards_of(self, idx, ro):
        """The rewards of the rollouts of prompts `idx`, the format bonus added."""
        G = ro.group_size
        texts = [self.tokenizer.decode([t for t in toks if t not in self.stops])
                 for toks in ro.tokens]
        prompts = [self.prompts[idx[i // G]][0] for i in range(len(texts))]
        fields = [self.prompts[idx[i // G]][1] for i in range(len(texts))]
        r = np.asarray(self.score(prompts, texts, fields), np.float64)
        return r + self.cfg.format_reward * ro.ended_turn

    def _slice(self, x, y, mask, adv, old, totals):
        """Forward and backward of some rows: (stats, gradients, their detached logps)."""
        cfg = self.cfg
        dx, dy = self._dev(x), self._dev(y)
        logps = token_logps(self.model, dx, dy, cfg.temperature)
        ref = None
        if self.reference is not None:
            with autograd.no_grad():
                ref = token_logps(self.reference, dx, dy, cfg.temperature).data
        old = logps.data if old is None else old
        loss, stats = grpo_loss(logps, old, adv, mask, cfg.epsilon, cfg.epsilon_high,
                                cfg.loss_type, ref, cfg.beta, *totals)
        grads = autograd.grad(self.scaler.scale(loss) if self.scaler else loss, self.params,
                              allow_unused=True)
        stats["loss"] = loss.item()
        return stats, grads, logps.data.copy()

    def update(self, x, y, mask, adv, old):
        """Gradients of the loss over the rows added into .grad, the rows split over threads
        on the CPU; returns (summed stats, the rows' log-probabilities)."""
        cfg = self.cfg
        totals = (int(mask.sum()), len(mask))  # the normalizers of the whole batch
        rows = np.arange(len(x))
        if not cfg.beta:  # zero-advantage rows add nothing to the loss or its gradient
            rows = rows[adv != 0]
        if not len(rows):
            return {"tokens": 0, "loss": 0.0}, old
        parts = [r for r in np.array_split(rows, self.shards) if len(r)]
        slices = [(x[r], y[r], mask[r], adv[r], None if old is None else old[r], totals)
                  for r in parts]
        results = run_slices(self._slice, slices) if len(slices) > 1 else [self._slice(*slices[0])]
        for k, p in enumerate(self.params):
            grads = [g[k] for _, g, _ in results if g[k] is not None]
            if grads:
                total = grads[0]
                for g in grads[1:]:
                    total = total + g
                p.grad = total if p.grad is None else p.grad + total
        logps = np.zeros(x.shape, np.float64) if old is None else old.copy()
        for r, (_, _, lp) in zip(parts, results):
            logps[r] = backend.to_device(lp, "cpu")
        stats = {"tokens": sum(s["tokens"] for s, _, _ in results),
                 "loss": sum(s["loss"] for s, _, _ in results)}
        for name in results[0][0]:
            if name not in stats:  # token-weighted means
                weighted = sum(s[name] * s["tokens"] for s, _, _ in results)
                stats[name] = weighted / max(stats["tokens"], 1)
        self.tokens_seen += int(x[rows].size)
        return stats, logps

    def train_step(self):
        """Rollouts, rewards, advantages and `iterations` optimizer steps: a dict of stats."""
        cfg = self.cfg
        lr = self.schedule.apply(self.optimizer, self.step)
        idx = self.step_prompts(self.step)
        ro = rollout(self.model, [self.prompt_ids[i] for i in idx], cfg.group_size,
                     cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, self.stops,
                     self.end_id, seed=[cfg.seed, self.step, 1])
        rewards = self.rewards_of(idx, ro)
        adv = group_advantages(rewards, cfg.group_size, cfg.scale_rewards)
        x, y, mask = training_batch(ro.prompt_ids, ro, self.pad_id, cfg.mask_truncated)
        t0 = time.perf_counter()
        self.tokens_seen = 0
        old, first, norm, clipped = None, None, 0.0, 0.0
        for it in range(cfg.iterations):
            stats, logps = self.update(x, y, mask, adv, old)
            first = first or stats
            clipped += stats.get("clip_fraction", 0.0) / cfg.iterations
            old = logps if old is None else old
            try:
                norm = apply_update(self.params, self.optimizer, cfg.clip, self.scaler)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {self.step + 1}") from None
        t_update = time.perf_counter() - t0
        self.step += 1
        groups = rewards.reshape(-1, cfg.group_size)
        out = {"step": self.step, "reward": float(rewards.mean()),
               "reward_std": float(rewards.std()),
               "zero_std_groups": float((groups.std(axis=1) == 0).mean()),
               "completion_len": ro.n_tokens / len(ro.tokens),
               "finished": float(ro.finished.mean()), "entropy": ro.entropy,
               "loss": first.get("loss", 0.0), "clip_fraction": clipped,
               "lr": lr, "grad_norm": norm,
               "rollout_tokens_per_s": ro.n_tokens / max(ro.seconds, 1e-9),
               "update_tokens_per_s": self.tokens_seen / max(t_update, 1e-9),
               "rollout_s": ro.seconds, "update_s": t_update}
        if cfg.beta:
            out["kl"] = first.get("kl", 0.0)
        return out

    # ---- evaluation -----------------------------------------------------------------------------
    def evaluate(self):
        """Greedy answers to the held-out prompts (up to max_new_tokens, as the rollouts; `tinyllm
        eval` allows 48, which only matters for answers longer than that): with built-in
        tasks their pass@1 (exact answers; per task too when there are several) and, with
        --eval-k K, pass@K over K samples; with a reward function or model the mean reward
        of the answers (without the format bonus)."""
        from tinyllm.evaluate import answer

        cfg = self.cfg
        t0 = time.perf_counter()
        prompts = [p for p, _ in self.heldout]
        fields = [f for _, f in self.heldout]
        replies = answer(self.model, self.tokenizer, prompts, cfg.max_new_tokens)
        out = {"step": self.step, "eval_n": len(replies)}
        if cfg.task is not None:
            right = np.array([tasks.get_task(f["task"]).check(r, f["answer"])
                              for r, f in zip(replies, fields)], np.float64)
            out["pass@1"] = float(right.mean())
            names = [f["task"] for f in fields]
            if len(cfg.task_names) > 1:
                for name in cfg.task_names:
                    out[f"pass@1_{name}"] = float(right[[n == name for n in names]].mean())
        if not cfg.task_reward:
            out["heldout_reward"] = float(np.mean(self.score(prompts, replies, fields)))
        if cfg.eval_k and cfg.task is not None:
            out.update(self._pass_at_k(cfg.eval_k))
        out["eval_s"] = time.perf_counter() - t0
        return out

    @property
    def eval_key(self):
        """The held-out figure that picks best.ckpt: pass@1 when the reward is the tasks'
        answers, else the mean held-out reward."""
        return "pass@1" if self.cfg.task_reward else "heldout_reward"

    def _pass_at_k(self, k):
        """pass@k and the mean sampled accuracy over k samples per held-out prompt."""
        from tinyllm.evaluate import prompt_ids

        cfg = self.cfg
        ids = prompt_ids(self.model, self.tokenizer, [p for p, _ in self.heldout])
        ro = rollout(self.model, ids, max(k, 2), cfg.max_new_tokens, cfg.temperature,
                     cfg.top_k, cfg.top_p, self.stops, self.end_id, seed=[cfg.seed, 2 ** 31])
        texts = [self.tokenizer.decode([t for t in toks if t not in self.stops])
                 for toks in ro.tokens]
        fields = [self.heldout[i // ro.group_size][1] for i in range(len(texts))]
        right = np.array([tasks.get_task(f["task"]).check(t, f["answer"])
                          for t, f in zip(texts, fields)]).reshape(len(self.heldout), -1)[:, :k]
        c = right.sum(axis=1)
        return {f"pass@{k}": float(np.mean([pass_at_k(k, int(ci), k) for ci in c])),
                "sampled_accuracy": float(right.mean())}

    # ---- checkpoints -----------------------------------------------------------------------------
    def extra_meta(self):
        return {**super().extra_meta(), "reference_model": self.reference_model,
                "best_eval": None if math.isinf(self.best_eval) else self.best_eval}

    def _restore(self, ckpt):
        super()._restore(ckpt)
        best = ckpt["meta"].get("best_eval")
        self.best_eval = -math.inf if best is None else best

    # ---- the loop --------------------------------------------------------------------------------
    def _line(self, s):
        cfg = self.cfg
        line = (f"step {s['step']:>4}/{cfg.steps} | reward {s['reward']:.3f} (std "
                f"{s['reward_std']:.3f}, {100 * s['zero_std_groups']:.0f}% flat groups) | len "
                f"{s['completion_len']:.1f} | entropy {s['entropy']:.3f} | clip "
                f"{100 * s['clip_fraction']:.1f}%")
        if "kl" in s:
            line += f" | kl {s['kl']:.4f}"
        return line + (f" | grad norm {s['grad_norm']:.3f} | rollout "
                       f"{s['rollout_tokens_per_s']:,.0f} tok/s, update "
                       f"{s['update_tokens_per_s']:,.0f} tok/s")

    def _evaluate_and_save(self, record, t_start):
        result = self.evaluate()
        result["elapsed_s"] = time.perf_counter() - t_start
        record(result)
        value = result[self.eval_key]
        best = self.step > 0 and value > self.best_eval  # the start is --from's model itself
        if best:
            self.best_eval = value
        names = {"heldout_reward": "mean reward"}
        figures = " | ".join(f"{names.get(k, k.replace('_', ' '))} {v:.3f}" for k, v in
                             result.items() if k.startswith(("pass@", "heldout_", "sampled_")))
        log(self.cfg, f"step {self.step:>4} | held-out ({result['eval_n']} prompts): {figures}"
                      f"{' | best' if best else ''} ({result['eval_s']:.1f}s)")
        if self.step:
            self.save("last.ckpt")
            if best:
                self.save("best.ckpt")

    def fit(self):
        cfg = self.cfg
        metrics_path = self.run_dir / "metrics.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.run_dir.glob(".*.tmp"):
            tmp.unlink()
        if self.overwrite and self.step == 0:
            for name in RUN_FILES:
                if (self.run_dir / name).exists():
                    (self.run_dir / name).unlink()
        _truncate_metrics(metrics_path, self.step)
        if self.step == 0 and metrics_path.exists():
            metrics_path.unlink()  # step-0 records of an earlier attempt
        self.tokenizer.save(self.run_dir / "tokenizer.json")
        with atomic_write(self.run_dir / "config.json", "w", encoding="utf-8") as f:
            f.write(json.dumps({"train": cfg.to_dict(), "model": self.model.config.to_dict()},
                               indent=1))
        log(cfg, f"{self.describe_model()}, {self.model.num_params() / 1e6:.2f}M parameters; "
                 f"{self.data_summary}")
        log(cfg, f"training {cfg.steps} steps of {self.batch_summary} on {cfg.device}"
                 f"{self._threads_note()}; run folder {self.run_dir}"
                 + (f"; resuming at step {self.step}" if self.step else ""))
        stop = {"flag": False}
        diverged = None

        def on_sigint(signum, frame):
            if stop["flag"]:
                raise KeyboardInterrupt
            stop["flag"] = True
            print("\nCtrl-C: finishing this step and saving (press again to quit at once)",
                  file=sys.stderr, flush=True)

        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread
            pass
        t_start = time.perf_counter()
        first_step = self.step
        with open(metrics_path, "a") as metrics:
            def record(obj):
                metrics.write(json.dumps(obj) + "\n")
                metrics.flush()

            try:
                if self.step == 0:
                    self._evaluate_and_save(record, t_start)  # where the run starts from
                while self.step < cfg.steps and not stop["flag"]:
                    s = self.train_step()
                    s["elapsed_s"] = time.perf_counter() - t_start
                    record(s)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        eta = s["elapsed_s"] / (self.step - first_step) * (cfg.steps - self.step)
                        log(cfg, self._line(s) + f" | ETA {fmt_time(eta)}")
                    if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                        self._evaluate_and_save(record, t_start)
            except FloatingPointError as e:
                diverged = str(e)
            finally:
                if old_handler is not None:
                    signal.signal(signal.SIGINT, old_handler)
        elapsed = time.perf_counter() - t_start
        if diverged:
            good = [n for n in ("best.ckpt", "last.ckpt") if (self.run_dir / n).exists()]
            print(f"tinyllm rl: stopped: {diverged}; the last good checkpoint is "
                  f"{self.run_dir / good[-1] if good else 'none'}; try a lower learning rate "
                  f"(--lr)", file=sys.stderr, flush=True)
        elif stop["flag"]:
            path = self.save("last.ckpt")
            log(cfg, f"interrupted at step {self.step}; saved {path}; continue with: "
                     f"tinyllm rl --resume {self.run_dir}")
        else:
            best = "" if math.isinf(self.best_eval) else \
                f"; best held-out {self.eval_key.replace('heldout_', 'mean ')} {self.best_eval:.3f}"
            log(cfg, f"done: {self.step} steps in {fmt_time(elapsed)} ({elapsed:.1f}s){best}; "
                     f"checkpoints in {self.run_dir}")
        return {"step": self.step, "best_eval": self.best_eval, "elapsed_s": elapsed,
                "interrupted": stop["flag"], "diverged": diverged}


# ---- command line --------------------------------------------------------------------------------

def cmd_rl(args):
    cfg = finetune.config_from_args(args, RLConfig)
    if cfg.prompts is not None:
        read_prompts(cfg.prompts)  # every line checked before any work
    if cfg.reward is not None:
        load_reward_function(cfg.reward)
    return finetune.start(args, cfg, RLRun)[1]


def register(subparsers):
    from tinyllm.cli import probability

    d = RLConfig()
    p = subparsers.add_parser(
        "rl", help="reinforcement learning (GRPO) with verifiable rewards or a reward model",
        description="Improve a chat model by reinforcement learning: sample G completions of "
                    "each prompt, reward them, and raise the likelihood of the better ones "
                    "(GRPO's group-normalized advantages and clipped ratio; REINFORCE with "
                    "--scale-rewards none). Prompts come from built-in tasks (--task) or a "
                    "file (--prompts); the reward is the tasks' exact answers, your function "
                    "(--reward) or a reward model (--reward-model: RLHF). Settings: RLConfig "
                    "defaults < --config file < flags.")
    finetune.add_start_arguments(p, d)
    p.add_argument("--task", metavar="NAME[,NAME...]|all",
                   help=f"prompts of built-in tasks ({', '.join(tasks.verifiable_tasks())}), "
                        f"rewarded by their exact answers unless --reward or --reward-model "
                        f"is given")
    p.add_argument("--prompts", metavar="FILE.jsonl",
                   help='JSON lines of {"prompt": TEXT or MESSAGES, ...} or {"messages": '
                        '[...], ...}; the other keys go to --reward\'s function')
    p.add_argument("--reward", metavar="FILE.py:FUNCTION",
                   help="your reward function, called as FUNCTION(prompt, completion, **fields) "
                        "-> number (fields: the prompt line's other keys)")
    p.add_argument("--reward-model", metavar="DIR", help="a reward model folder (tinyllm reward "
                                                         "train): RLHF")
    p.add_argument("--format-reward", type=float,
                   help=f"added to the reward of a completion that ends its turn "
                        f"({d.format_reward})")
    p.add_argument("--n-prompts", type=positive_int,
                   help=f"built-in tasks: training prompts ({d.n_prompts})")
    p.add_argument("--heldout-fraction", type=probability,
                   help=f"share of a --prompts file held out for evaluation ({d.heldout_fraction})")
    p.add_argument("--group-size", type=positive_int,
                   help=f"completions per prompt, >= 2 ({d.group_size})")
    p.add_argument("--prompts-per-step", type=positive_int, help=f"({d.prompts_per_step})")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help=f"longest completion ({d.max_new_tokens})")
    p.add_argument("--temperature", type=positive_float, help=f"sampling temperature, > 0 "
                                                              f"({d.temperature})")
    p.add_argument("--top-k", type=nonnegative_int, help="sample among the k likeliest (off)")
    p.add_argument("--top-p", type=probability, help="nucleus sampling, in (0, 1] (off)")
    p.add_argument("--epsilon", type=positive_float,
                   help=f"clip the ratio to [1 - epsilon, 1 + epsilon_high] ({d.epsilon})")
    p.add_argument("--epsilon-high", type=positive_float,
                   help="upper clip (default: epsilon; DAPO uses 0.28)")
    p.add_argument("--iterations", type=positive_int,
                   help=f"optimizer steps per batch of rollouts ({d.iterations})")
    p.add_argument("--scale-rewards", choices=list(SCALES),
                   help=f"divide advantages by the group's std, or not ({d.scale_rewards})")
    p.add_argument("--loss-type", choices=list(LOSS_TYPES),
                   help=f"dapo: mean over all completion tokens; grpo: per sequence, then over "
                        f"sequences ({d.loss_type})")
    p.add_argument("--beta", type=nonnegative_float,
                   help=f"weight of the k3 KL to the starting model; > 0 keeps a frozen copy "
                        f"({d.beta})")
    p.add_argument("--mask-truncated", action="store_true", default=None,
                   help="leave completions cut at --max-new-tokens out of the loss")
    finetune.add_lora_arguments(p, d)
    finetune.add_loop_arguments(p, d)
    p.add_argument("--eval-n", type=positive_int,
                   help=f"held-out prompts per evaluation ({d.eval_n})")
    p.add_argument("--eval-k", type=nonnegative_int,
                   help="also pass@k over k samples per held-out prompt (0: off)")
    finetune.add_device_arguments(p)
    p.set_defaults(func=cmd_rl)
    return p
