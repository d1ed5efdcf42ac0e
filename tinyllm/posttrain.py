"""Pieces of preference training: sequence log-probabilities and the DPO loss.

Direct Preference Optimization (Rafailov et al. 2023) trains a policy pi on pairs (prompt x,
chosen reply y_w, rejected reply y_l) against a frozen reference model ref (the starting
model). With log-probabilities summed over each reply's tokens,

    logits = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))

the losses per pair are (TRL's names):

    sigmoid   -(1 - e) log sigmoid(beta logits) - e log sigmoid(-beta logits)
              (e: label smoothing, the share of pairs assumed mislabelled; 0 is plain DPO)
    ipo       (logits - 1 / (2 beta))^2
    hinge     relu(1 - beta logits)

and beta (log pi - log ref) of a reply is its implicit reward, reported per pair: a trained
policy gives chosen replies the higher reward ("reward accuracy").

A pair is scored in the chat template: `render(prompt + reply)`, and the reply's tokens are
the template's trained tokens after the prompt (the assistant's text and its <|im_end|>).
"""

import numpy as np

from autograd import backend, ops
from autograd.ops import log_sigmoid
from autograd.tensor import Tensor
from tinyllm import chat
from tinyllm.data import pad_right

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
IGNORE_INDEX = -100  # a target that counts for nothing (as in GPT.forward)


# ---- the loss --------------------------------------------------------------------------------

def _as_tensor(x, name):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) or backend.is_cupy_array(x):
        return Tensor(x)
    raise TypeError(f"dpo_loss: {name} must be a Tensor or an array, got {type(x).__name__}")


def _as_array_like(x, like, name):
    """A reference input as a plain array of the policy's dtype and device."""
    data = x.data if isinstance(x, Tensor) else x
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        raise TypeError(f"dpo_loss: {name} must be an array or a Tensor, got {type(x).__name__}")
    if data.shape != like.shape:
        raise ValueError(f"dpo_loss: {name} has shape {data.shape}, the policy's log-probabilities "
                         f"{like.shape}")
    return backend.to_device(data, like.device).astype(like.dtype, copy=False)


def check_dpo_settings(beta, loss_type, label_smoothing):
    """ValueError for a loss type, beta or label smoothing DPO does not define."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not np.isfinite(beta) \
            or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing is for the sigmoid loss, not {loss_type!r}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """(losses, chosen_rewards, rejected_rewards), one entry per pair.

    The policy's log-probabilities are Tensors (the loss is differentiable in them); the
    reference's are arrays or Tensors, constants here. The losses are a Tensor; the rewards
    beta (log pi - log ref) are plain arrays, detached from the graph."""
    check_dpo_settings(beta, loss_type, label_smoothing)
    pc = _as_tensor(policy_chosen_logps, "policy_chosen_logps")
    pr = _as_tensor(policy_rejected_logps, "policy_rejected_logps")
    if pc.shape != pr.shape or pc.ndim != 1:
        raise ValueError(f"dpo_loss: policy log-probabilities must be two vectors of one length, "
                         f"got shapes {pc.shape} and {pr.shape}")
    rc = _as_array_like(reference_chosen_logps, pc, "reference_chosen_logps")
    rr = _as_array_like(reference_rejected_logps, pc, "reference_rejected_logps")
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * log_sigmoid(beta * logits)
        if label_smoothing:
            losses = losses - label_smoothing * log_sigmoid(-beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = ops.relu(1 - beta * logits)
    return losses, beta * (pc.data - rc), beta * (pr.data - rr)


def reward_stats(losses, chosen_rewards, rejected_rewards):
    """Sums over the pairs of the loss and of TRL's reward metrics (divide by the count for
    means): rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies."""
    xp = backend.get_array_module(chosen_rewards)
    loss = losses.data if isinstance(losses, Tensor) else losses
    return {"loss": float(loss.astype(xp.float64).sum()),
            "rewards/chosen": float(chosen_rewards.sum()),
            "rewards/rejected": float(rejected_rewards.sum()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).sum()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).sum())}


# ---- log-probabilities of replies --------------------------------------------------------------

def sequence_logprobs(model, ids, completion_mask):
    """(B,) Tensor: for each row of `ids` (B, T), the sum of log p(ids[t] | ids[:t]) over the
    positions t where `completion_mask` (B, T) is true, from one forward of the model.

    The model reads ids[:, :-1] and predicts ids[:, 1:]; positions outside the mask (prompt,
    padding) are ignored targets. The head's loss op gives each target's -log p without
    holding the (B, T, vocab) log-probabilities."""
    ids = np.asarray(ids) if not backend.is_cupy_array(ids) else ids
    mask = np.asarray(completion_mask) if not backend.is_cupy_array(completion_mask) \
        else completion_mask
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"sequence_logprobs: ids {ids.shape} and completion_mask {mask.shape} "
                         f"must be two (batch, time) arrays of one shape")
    if ids.shape[1] < 2 or bool(mask[:, 0].any()):
        raise ValueError("sequence_logprobs: a completion token needs a prefix: the first "
                         "position cannot be in the completion mask")
    xp = backend.get_array_module(ids)
    targets = xp.where(mask[:, 1:].astype(bool), ids[:, 1:], IGNORE_INDEX)
    device = model.tok_emb.weight.device
    h = model.hidden(ids[:, :-1])
    head = model.tok_emb.weight if model.lm_head is None else model.lm_head.weight
    nll = ops.linear_cross_entropy(h, head, backend.to_device(targets, device),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.sum(axis=1)


def encode_reply(prompt_messages, reply_messages, tokenizer):
    """(ids, completion mask) of prompt + reply in the chat template: the mask marks the
    reply's trained tokens (assistant text and <|im_end|>), never the prompt's."""
    n_prompt = len(chat.render(prompt_messages, tokenizer)[0])
    ids, trained = chat.render(prompt_messages + reply_messages, tokenizer)
    mask = np.asarray(trained, bool)
    mask[:n_prompt] = False
    return np.asarray(ids, np.int64), mask


def encode_pair(pair, tokenizer):
    """((chosen ids, mask), (rejected ids, mask)) of a PreferencePair."""
    return (encode_reply(pair.prompt_messages, pair.chosen_messages, tokenizer),
            encode_reply(pair.prompt_messages, pair.rejected_messages, tokenizer))


def pad_rows(rows, pad_id):
    """(ids, mask) arrays (N, T) of (ids, mask) rows padded at their ends to the longest; the
    padding is outside the mask."""
    return (pad_right([x for x, _ in rows], pad_id),
            pad_right([m for _, m in rows], False, bool))


def pair_batch(encoded_pairs, pad_id):
    """One (ids, mask) batch of 2N rows for N encoded pairs: the chosen replies, then the
    rejected ones, so both go through the model in one forward."""
    return pad_rows([c for c, _ in encoded_pairs] + [r for _, r in encoded_pairs], pad_id)


def pair_logprobs(model, encoded_pairs, pad_id):
    """(chosen, rejected) log-probabilities, two (N,) Tensors, from one batched forward."""
    ids, mask = pair_batch(encoded_pairs, pad_id)
    logps = sequence_logprobs(model, ids, mask)
    n = len(encoded_pairs)
    return logps[:n], logps[n:]


def reply_lengths(encoded_pairs):
    """(chosen, rejected) token counts of each pair's replies, two float arrays."""
    return (np.array([m.sum() for (_, m), _ in encoded_pairs], np.float64),
            np.array([m.sum() for _, (_, m) in encoded_pairs], np.float64))
