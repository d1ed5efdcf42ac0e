"""DPO: the loss against values worked by hand and its gradient, log-probabilities of replies
against an independent NumPy computation, the cached reference, the command line, and a
short run that learns to prefer the chosen replies."""

import json
import math

import numpy as np
import pytest

import autograd
from autograd import Tensor
from tinyllm import chat
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.dpo import REFERENCE_FILE, DPOConfig, DPORun, reference_logprobs
from tinyllm.generate import load_for_generation, save_for_generation
from tinyllm.model import GPT
from tinyllm.posttrain import (dpo_loss, encode_pair, encode_reply, log_sigmoid, pair_logprobs,
                               sequence_logprobs)
from tinyllm.preference import builtin_pairs, write_pairs
from tinyllm.tokenizer import Tokenizer

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=128)


def log_sig(x):
    return -math.log1p(math.exp(-x))


# ---- the loss ----------------------------------------------------------------------------------

# Two pairs. Policy chosen/rejected and reference chosen/rejected log-probabilities:
#   pair 0: logits = (-1 + 1.2) - (-1.5 + 1.2) = 0.2 + 0.3 = 0.5
#   pair 1: logits = (-2 + 2.0) - (-1.0 + 1.3) = 0 - 0.3 = -0.3
PC, PR = [-1.0, -2.0], [-1.5, -1.0]
RC, RR = [-1.2, -2.0], [-1.2, -1.3]
LOGITS = [0.5, -0.3]


def policy():
    return (Tensor(np.array(PC), requires_grad=True, dtype="float64"),
            Tensor(np.array(PR), requires_grad=True, dtype="float64"))


@pytest.mark.parametrize("loss_type, beta, smoothing, expected", [
    # -log sigmoid(beta * logits)
    ("sigmoid", 0.5, 0.0, [-log_sig(0.25), -log_sig(-0.15)]),
    # -(1 - e) log sigmoid(b z) - e log sigmoid(-b z), e = 0.1
    ("sigmoid", 0.5, 0.1, [-0.9 * log_sig(0.25) - 0.1 * log_sig(-0.25),
                           -0.9 * log_sig(-0.15) - 0.1 * log_sig(0.15)]),
    # (z - 1 / (2 beta))^2 = (z - 1)^2
    ("ipo", 0.5, 0.0, [0.25, 1.69]),
    # relu(1 - beta z)
    ("hinge", 0.5, 0.0, [0.75, 1.15]),
    ("hinge", 4.0, 0.0, [0.0, 2.2]),
])
def test_dpo_loss_matches_values_worked_by_hand(loss_type, beta, smoothing, expected):
    pc, pr = policy()
    losses, chosen, rejected = dpo_loss(pc, pr, np.array(RC), np.array(RR), beta=beta,
                                        loss_type=loss_type, label_smoothing=smoothing)
    np.testing.assert_allclose(losses.data, expected, rtol=1e-12)
    # implicit rewards beta (log pi - log ref): pair 0 chosen 0.5 * 0.2, rejected 0.5 * -0.3
    np.testing.assert_allclose(chosen, [beta * 0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(rejected, [beta * -0.3, beta * 0.3], atol=1e-12)


def test_rewards_are_detached_from_the_graph():
    pc, pr = policy()
    losses, chosen, rejected = dpo_loss(pc, pr, np.array(RC), np.array(RR))
    for r in (chosen, rejected):
        assert not (isinstance(r, Tensor) and r.requires_grad)
    assert losses.requires_grad
    # the reference may come as Tensors too; they get no gradient
    rc = Tensor(np.array(RC), requires_grad=True, dtype="float64")
    losses, _, _ = dpo_loss(pc, pr, rc, np.array(RR))
    losses.sum().backward()
    assert rc.grad is None and pc.grad is not None


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2),
                                                  ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_gradient_matches_central_differences(loss_type, smoothing):
    rng = np.random.default_rng(0)
    pc = Tensor(rng.normal(-20, 3, 6), requires_grad=True, dtype="float64")
    pr = Tensor(rng.normal(-20, 3, 6), requires_grad=True, dtype="float64")
    rc, rr = rng.normal(-20, 3, 6), rng.normal(-20, 3, 6)
    autograd.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta=0.3, loss_type=loss_type,
                                             label_smoothing=smoothing)[0], [pc, pr])


def test_the_first_step_has_a_gradient():
    """Policy = reference: every logit is exactly 0, and d loss / d logits is -beta / 2."""
    pc = Tensor(np.array([-3.0]), requires_grad=True, dtype="float64")
    pr = Tensor(np.array([-4.0]), requires_grad=True, dtype="float64")
    losses, _, _ = dpo_loss(pc, pr, np.array([-3.0]), np.array([-4.0]), beta=0.1)
    losses.sum().backward()
    assert losses.data[0] == pytest.approx(math.log(2))
    assert pc.grad[0] == pytest.approx(-0.05) and pr.grad[0] == pytest.approx(0.05)


def test_log_sigmoid_never_overflows():
    x = Tensor(np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]), requires_grad=True, dtype="float64")
    y = log_sigmoid(x)
    y.sum().backward()
    np.testing.assert_allclose(y.data, [-1000.0, -30.0 - math.log1p(math.exp(-30)),
                                        -math.log(2), -math.exp(-30), 0.0], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(x.grad, [1.0, 1 / (1 + math.exp(-30)), 0.5, math.exp(-30), 0.0],
                               rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("kw, complaint", [
    (dict(loss_type="kto"), "loss_type"), (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"),
    (dict(beta=float("nan")), "beta"), (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
])
def test_dpo_loss_refuses_settings_it_does_not_define(kw, complaint):
    pc, pr = policy()
    with pytest.raises(ValueError, match=complaint):
        dpo_loss(pc, pr, np.array(RC), np.array(RR), **kw)


# ---- log-probabilities of replies --------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model():
    tok = chat.add_chat_tokens(Tokenizer.bytes())
    model = GPT.from_preset("laptop", vocab_size=tok.vocab_size, dtype="float64", **TINY)
    return model, tok


def numpy_logprob(model, ids, mask):
    """Sum of log softmax(logits)[next token] over the masked positions, in NumPy from the
    full logits of a plain forward."""
    logits, _ = model(np.asarray(ids)[None, :-1])
    z = logits.data[0].astype(np.float64)
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    picked = logp[np.arange(len(ids) - 1), np.asarray(ids)[1:]]
    return picked[np.asarray(mask)[1:]].sum()


def test_the_completion_mask_marks_the_reply_and_its_end_only(chat_model):
    _, tok = chat_model
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "earlier"},
              {"role": "user", "content": "Sort: b a"}]
    ids, mask = encode_reply(prompt, [{"role": "assistant", "content": "a b"}], tok)
    assert ids.tolist() == chat.render(prompt + [{"role": "assistant", "content": "a b"}], tok)[0]
    assert tok.decode(ids[mask].tolist()) == "a b" + chat.IM_END  # not "earlier"


def test_sequence_logprobs_equal_a_numpy_sum_of_token_log_softmax(chat_model):
    model, tok = chat_model
    pairs = builtin_pairs("train", 4, seed=0)
    rows = [r for p in pairs for r in encode_pair(p, tok)]
    T = max(len(ids) for ids, _ in rows)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), bool)
    for i, (x, m) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(m)] = x, m
    got = sequence_logprobs(model, ids, mask)
    assert got.shape == (len(rows),)
    expected = [numpy_logprob(model, x, m) for x, m in rows]
    np.testing.assert_allclose(got.data, expected, rtol=1e-10)


def test_chosen_and_rejected_in_one_batch_equal_separate_forwards(chat_model):
    model, tok = chat_model
    encoded = [encode_pair(p, tok) for p in builtin_pairs("train", 6, seed=1)]
    chosen, rejected = pair_logprobs(model, encoded, pad_id=0)
    for k, (c, r) in enumerate(encoded):
        for value, (ids, mask) in ((chosen.data[k], c), (rejected.data[k], r)):
            alone = sequence_logprobs(model, ids[None], mask[None]).data[0]
            assert value == pytest.approx(alone, rel=1e-10)


def test_sequence_logprobs_refuse_mismatched_shapes_and_a_masked_first_token(chat_model):
    model, _ = chat_model
    with pytest.raises(ValueError, match="one shape"):
        sequence_logprobs(model, np.zeros((2, 5), np.int64), np.zeros((2, 4), bool))
    mask = np.zeros((1, 5), bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="prefix"):
        sequence_logprobs(model, np.zeros((1, 5), np.int64), mask)


# ---- runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny chat model (random weights, byte tokenizer with the chat tokens) as a run folder."""
    autograd.manual_seed(0)
    tok = chat.add_chat_tokens(Tokenizer.bytes())
    model = GPT.from_preset("laptop", vocab_size=tok.vocab_size, **TINY)
    path = tmp_path_factory.mktemp("dpo") / "start"
    save_for_generation(path, model, tok, {"kind": "sft"})
    return path


def dpo_config(start, out, **kw):
    settings = dict(base=str(start), n_train=64, n_val=16, steps=6, batch_size=8, eval_every=3,
                    eval_iters=2, log_every=3, warmup=0, lr=1e-3, out=str(out), quiet=True)
    settings.update(kw)
    return DPOConfig(**settings).validate()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_learns_to_prefer_the_chosen_replies(start, tmp_path):
    cfg = dpo_config(start, tmp_path / "run", steps=30, log_every=10, eval_every=30, lr=3e-3,
                     n_train=32, rpo_alpha=0.0)
    run = DPORun(cfg)
    before = run.evaluate_pairs()
    assert before["rewards/margins"] == pytest.approx(0, abs=1e-6)  # policy = reference
    assert before["loss"] / before["pairs"] == pytest.approx(math.log(2), abs=1e-6)
    summary = run.fit()
    assert not summary["diverged"] and summary["step"] == 30
    train = [r for r in records(tmp_path / "run") if "rewards/margins" in r]
    assert [r["step"] for r in train] == [10, 20, 30]
    print("train margins", [r["rewards/margins"] for r in train],
          "accuracies", [r["rewards/accuracies"] for r in train])
    assert train[-1]["rewards/margins"] > max(0.4, 2 * train[0]["rewards/margins"])
    assert train[-1]["rewards/accuracies"] >= 0.9
    losses = [r["loss"] for r in records(tmp_path / "run") if "loss" in r]
    print("train losses", losses)
    assert losses[-1] < 0.85 * math.log(2) and losses[-1] < losses[0]
    held = [r for r in records(tmp_path / "run") if "val_rewards/accuracies" in r]
    assert [r["step"] for r in held] == [30]
    # the run folder loads as a model like any other, and it is not the starting model
    model, tok = load_for_generation(tmp_path / "run")
    assert tok.vocab_size == model.config.vocab_size
    meta, _ = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert meta["kind"] == "dpo" and meta["best_val"] < math.log(2)


def test_rpo_adds_the_chosen_replies_per_token_nll(start, tmp_path):
    run = DPORun(dpo_config(start, tmp_path / "run", rpo_alpha=0.5))
    encoded, ref, lengths = run.train_pairs[:3], run.ref_train[:3], run.train_len[:3]
    with_nll = run.pair_losses(encoded, ref, lengths)[0].data
    run.cfg.rpo_alpha = 0.0
    plain = run.pair_losses(encoded, ref, lengths)[0].data
    nll = [-numpy_logprob(run.model, ids, mask) / mask.sum() for (ids, mask), _ in encoded]
    np.testing.assert_allclose(with_nll - plain, 0.5 * np.array(nll), rtol=1e-4)


def test_the_reference_is_cached_reused_and_recomputed_for_other_data(start, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run = DPORun(dpo_config(start, out))
    path = out / REFERENCE_FILE
    assert path.exists()
    model, tok = load_for_generation(start)
    fresh = reference_logprobs(model, run.train_pairs, 5, run.pad_id)  # other batch size
    np.testing.assert_allclose(run.ref_train, fresh, rtol=1e-5)
    assert np.all(run.ref_train < 0)
    # a second run on the same data and model reuses the file and never runs the reference
    import tinyllm.dpo as dpo_mod

    def refuse(*a, **k):
        raise AssertionError("the reference was computed again")

    with monkeypatch.context() as m:
        m.setattr(dpo_mod, "reference_logprobs", refuse)
        again = DPORun(dpo_config(start, out))
    np.testing.assert_array_equal(again.ref_train, run.ref_train)
    np.testing.assert_array_equal(again.ref_val, run.ref_val)
    # other data (another seed draws other pairs): the stale file is recomputed
    other = DPORun(dpo_config(start, out, seed=7))
    np.testing.assert_allclose(other.ref_train,
                               reference_logprobs(model, other.train_pairs, 8, other.pad_id),
                               rtol=1e-5)
    assert not np.array_equal(other.ref_train, run.ref_train[:len(other.ref_train)])


def test_resume_continues_exactly_and_reuses_the_reference(start, tmp_path, monkeypatch):
    # a constant learning rate: the schedule of a 3-step run is that of a 6-step one
    whole = DPORun(dpo_config(start, tmp_path / "whole", schedule="constant"))
    whole.fit()
    half = DPORun(dpo_config(start, tmp_path / "half", steps=3, schedule="constant"))
    half.fit()
    code = cli_main(["dpo", "--resume", str(tmp_path / "half"), "--steps", "6", "-q"])
    assert code == 0
    a = load_checkpoint(tmp_path / "whole" / "last.ckpt")[1]
    b = load_checkpoint(tmp_path / "half" / "last.ckpt")[1]
    for k in a:
        if k.startswith("model/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # without its reference file a resumed run loads the starting model again to remake it
    (tmp_path / "half" / REFERENCE_FILE).unlink()
    assert cli_main(["dpo", "--resume", str(tmp_path / "half"), "--steps", "7", "-q"]) == 0
    assert (tmp_path / "half" / REFERENCE_FILE).exists()


def test_user_pairs_and_lora(start, tmp_path):
    pairs = builtin_pairs("train", 40, seed=2)
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    code = cli_main(["dpo", "--from", str(start), "--data", str(tmp_path / "pairs.jsonl"),
                     "-o", str(tmp_path / "lora"), "--lora-rank", "2", "--steps", "3",
                     "--batch-size", "4", "--eval-every", "3", "--log-every", "3", "-q"])
    assert code == 0
    meta, arrays = load_checkpoint(tmp_path / "lora" / "best.ckpt")
    assert meta["lora"]["rank"] == 2 and any("lora_B" in k for k in arrays)
    assert (tmp_path / "lora" / "adapter.safetensors").exists()
    model, _ = load_for_generation(tmp_path / "lora")  # adapters folded in
    assert not any("lora" in k for k in model.state_dict())


def test_resume_refuses_changed_data_before_any_work(start, tmp_path, capsys):
    write_pairs(tmp_path / "pairs.jsonl", builtin_pairs("train", 30, seed=2))
    args = ["dpo", "--from", str(start), "--data", str(tmp_path / "pairs.jsonl"), "-o",
            str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--eval-every", "2", "-q"]
    assert cli_main(args) == 0
    reference = (tmp_path / "run" / REFERENCE_FILE).read_bytes()
    write_pairs(tmp_path / "pairs.jsonl", builtin_pairs("train", 30, seed=3))
    assert cli_main(["dpo", "--resume", str(tmp_path / "run"), "--steps", "4", "-q"]) == 2
    assert "dataset does not match" in capsys.readouterr().err
    assert (tmp_path / "run" / REFERENCE_FILE).read_bytes() == reference


# ---- the command line ----------------------------------------------------------------------------

def dpo_args(start, out, *extra):
    return ["dpo", "--from", str(start), "-o", str(out), "--n-train", "16", "--n-val", "4",
            "--steps", "2", "--batch-size", "4", "-q", *extra]


@pytest.mark.parametrize("extra, complaint", [
    (["--beta", "0"], "--beta"),
    (["--beta", "-0.5"], "--beta"),
    (["--loss", "kto"], "--loss"),
    (["--label-smoothing", "0.5"], "label_smoothing"),
    (["--label-smoothing", "0.1", "--loss", "hinge"], "label_smoothing"),
    (["--steps", "0"], "--steps"),
    (["--lr", "nan"], "--lr"),
    (["--lora-rank", "-1"], "--lora-rank"),
    (["--dtype", "int8"], "dtype"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(start, tmp_path, capsys, extra,
                                                          complaint):
    out = tmp_path / "run"
    assert cli_main(dpo_args(start, out, *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and complaint in err, err
    assert not out.exists()


def test_a_bad_data_line_and_a_bad_start_exit_2_before_any_work(start, tmp_path, capsys):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    (tmp_path / "bad.jsonl").write_text(good + "\n" + good + "\n" + '{"prompt": "p"}\n')
    out = tmp_path / "run"
    assert cli_main(dpo_args(start, out, "--data", str(tmp_path / "bad.jsonl"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:3:" in err, err
    assert not out.exists()
    assert cli_main(dpo_args(tmp_path / "nowhere", out)) == 2
    assert "--from" in capsys.readouterr().err
    assert cli_main(["dpo", "-o", str(out), "-q"]) == 2
    assert "--from" in capsys.readouterr().err
    assert not out.exists()
    # a folder that is not a DPO run cannot be resumed as one
    assert cli_main(["dpo", "--resume", str(start / "best.ckpt")]) == 2
    assert "not a dpo run" in capsys.readouterr().err
