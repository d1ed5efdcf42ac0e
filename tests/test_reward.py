"""The reward model: the Bradley-Terry loss and its gradient, the head read at each row's last
token, the saved folder, the command line's refusals, and training on preference pairs, all
on tiny models built here."""

import json
import math
import os
import signal

import numpy as np
import pytest

import autograd
from autograd.gradcheck import gradcheck
from autograd.tensor import Tensor
from tinyllm import chat
from tinyllm.checkpoint import CheckpointError, load_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.generate import load_for_generation, save_for_generation
from tinyllm.model import GPT
from tinyllm.reward import (HEAD_FILE, RewardConfig, RewardModel, RewardRun, bradley_terry_loss,
                            encode, pad_rows, read_head, write_head)
from tinyllm.tokenizer import Tokenizer

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=96)
GOOD = ["yes", "sure", "right", "fine", "good", "true", "okay", "great"]
BAD = ["no", "never", "wrong", "bad", "false", "nope", "awful", "poor"]


def tiny_gpt(tok, dtype="float32", seed=0):
    autograd.manual_seed(seed)
    return GPT.from_preset("laptop", vocab_size=tok.vocab_size, dtype=dtype, **TINY)


@pytest.fixture(scope="module")
def tok():
    return chat.add_chat_tokens(Tokenizer.bytes())


@pytest.fixture(scope="module")
def rm(tok):
    autograd.manual_seed(1)
    return RewardModel(tiny_gpt(tok), tok)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny chat model's run folder (untrained: the reward run has to learn everything)."""
    path = tmp_path_factory.mktemp("rm-base") / "base"
    save_for_generation(path, tiny_gpt(tok), tok)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Pairs whose chosen reply is a word of GOOD and rejected reply a word of BAD."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(48):
        lines.append(json.dumps({"prompt": f"Is {i} ok?", "chosen": str(rng.choice(GOOD)),
                                 "rejected": str(rng.choice(BAD))}))
    path = tmp_path_factory.mktemp("rm-data") / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_args(base, out, data, *extra):
    return ["reward", "train", "--from", str(base), "--data", str(data), "-o", str(out),
            "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-iters", "2",
            "--log-every", "3", "--warmup", "2", "--val-fraction", "0.2", "-q", *extra]


# ---- the loss ------------------------------------------------------------------------------------

def softplus_by_hand(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_loss_at_hand_worked_values():
    loss, acc = bradley_terry_loss(np.array([0.0]), np.array([0.0]))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)  # sigmoid(0) = 1/2
    assert acc == 0.0  # a tie is not ranked right

    # margins 1 and -3: log(1 + e^-1) = 0.3132616875, log(1 + e^3) = 3.0485873516
    loss, acc = bradley_terry_loss(np.array([2.0, 0.0]), np.array([1.0, 3.0]))
    assert loss.item() == pytest.approx((0.31326168751822286 + 3.048587351573742) / 2, rel=1e-12)
    assert acc == 0.5


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_loss_of_large_margins_does_not_overflow(dtype):
    r_c = Tensor(np.array([1000.0, -1000.0, 50.0, 0.5], dtype), requires_grad=True)
    r_r = Tensor(np.array([-1000.0, 1000.0, -50.0, 0.0], dtype), requires_grad=True)
    loss, acc = bradley_terry_loss(r_c, r_r)
    loss.backward()
    # softplus(-2000) ~ 0, softplus(2000) = 2000, softplus(-100) ~ 0, softplus(-0.5)
    expected = (0.0 + 2000.0 + 0.0 + softplus_by_hand(-0.5)) / 4
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc == 0.75
    # dL/dr_c = -sigmoid(-m) / B: 0, -1/4, 0, -sigmoid(-0.5)/4; dL/dr_r is its negative
    sig = 1 / (1 + math.exp(0.5))
    np.testing.assert_allclose(r_c.grad, [0, -0.25, 0, -sig / 4], atol=1e-7)
    np.testing.assert_allclose(r_r.grad, -r_c.grad, atol=0)


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(np.zeros(3), np.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(np.zeros((2, 1)), np.zeros((2, 1)))


def test_loss_gradcheck_including_ties():
    rng = np.random.default_rng(0)
    r_c = Tensor(np.r_[rng.standard_normal(5) * 3, 0.25], requires_grad=True)
    r_r = Tensor(np.r_[rng.standard_normal(5) * 3, 0.25], requires_grad=True)  # last: a tie
    assert gradcheck(lambda a, b: bradley_terry_loss(a, b)[0], [r_c, r_r], mode="full")


def test_loss_gradcheck_through_the_head(tok):
    """The head's weight and bias gradients, float64, through the backbone and the gathering."""
    autograd.manual_seed(3)
    model = RewardModel(tiny_gpt(tok, dtype="float64", seed=3), tok)
    seqs = [encode("What is 2 + 3?", "5", tok), encode("What is 2 + 3?", "6", tok),
            encode("hi", "hello there", tok), encode("hi", "no", tok)]
    ids, lengths = pad_rows([seqs[0], seqs[2], seqs[1], seqs[3]], 0)  # chosen rows, rejected
    head = model.score_head

    def loss(w, b):
        assert w is head.weight and b is head.bias  # the model reads these very tensors
        r = model(ids, lengths)
        return bradley_terry_loss(r[:2], r[2:])[0]

    assert gradcheck(loss, [head.weight, head.bias], mode="full")


# ---- the head reads each row's last token ----------------------------------------------------

def test_padded_rows_score_as_each_sequence_alone(rm, tok):
    seqs = [encode("What is 12 + 30?", "42", tok), encode("hi", "a much longer reply here", tok),
            encode([{"role": "system", "content": "Be terse."},
                    {"role": "user", "content": "Sort: b a"}], "a b", tok)]
    assert len({len(s) for s in seqs}) == 3
    batched = rm(*pad_rows(seqs, tok.eot_id)).data
    w, b = rm.score_head.weight.data[0], rm.score_head.bias.data[0]
    for i, s in enumerate(seqs):
        alone = rm(np.array([s]), np.array([len(s)])).data[0]
        h = rm.backbone.hidden(np.array([s])).data[0, -1]  # the last position, read directly
        assert batched[i] == pytest.approx(alone, abs=1e-5)
        assert alone == pytest.approx(float(h @ w + b), abs=1e-5)
    other_pad = rm(*pad_rows(seqs, 65)).data  # the padding's ids change nothing
    np.testing.assert_allclose(other_pad, batched, atol=1e-6)


def test_sequence_ends_at_the_end_of_the_reply(tok):
    ids = encode("hi", "yo", tok)
    assert ids[-1] == chat.end_of_turn(tok)
    assert tok.decode(ids).endswith("<|im_start|>assistant\nyo<|im_end|>")


def test_score_batches_in_any_order(rm):
    prompts = ["What is 1 + 1?", "hi", [{"role": "user", "content": "Reverse: a b"}], "x"]
    responses = ["2", "hello, how are you today?", "b a", "y"]
    together = rm.score(prompts, responses, batch_size=3)
    alone = [rm.score([p], [r])[0] for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert all(isinstance(x, float) for x in together)


def test_forward_and_score_refuse_bad_input(rm):
    with pytest.raises(ValueError, match="lengths"):
        rm(np.zeros((2, 5), np.int64), np.array([5, 6]))
    with pytest.raises(ValueError, match="lengths"):
        rm(np.zeros((2, 5), np.int64), np.array([5]))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="longer than the model's context"):
        rm.score(["a"], ["b" * 200])


# ---- the folder ------------------------------------------------------------------------------

def test_save_and_load_give_identical_scores(rm, tmp_path):
    prompts, responses = ["What is 2 + 2?", "hi"], ["4", "hello"]
    before = rm.score(prompts, responses)
    path = rm.save(tmp_path / "rm", info={"note": "test"})
    loaded = RewardModel.load(path)
    assert loaded.score(prompts, responses) == before
    info = json.loads((path / "reward.json").read_text())
    assert info["note"] == "test" and info["d_model"] == TINY["d_model"]
    backbone, tok = load_for_generation(path)  # the backbone is a plain run folder
    ids = np.array([encode("hi", "hello", tok)])
    np.testing.assert_array_equal(backbone(ids)[0].data, rm.backbone(ids)[0].data)


def test_load_refuses_a_head_of_another_model(rm, tmp_path):
    path = rm.save(tmp_path / "rm")
    head = read_head(path / HEAD_FILE)
    head["bias"] = head["bias"] + 1
    write_head(path / HEAD_FILE, head)
    with pytest.raises(CheckpointError, match="does not belong"):
        RewardModel.load(path)
    with pytest.raises(FileNotFoundError, match="not a reward model folder"):
        RewardModel.load(tmp_path)


# ---- the command line ------------------------------------------------------------------------

def one_error_line(capsys):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.out + captured.err, captured.err
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--batch-size", "x"], "--batch-size"),
    (["--val-fraction", "2"], "--val-fraction"),
    (["--dtype", "int8"], "dtype"),
    (["--device", "tpu"], "device"),
    (["--schedule", "cubic"], "--schedule"),
    (["--lora-rank", "2", "--lora-targets", "wq,wz"], "wz"),
])
def test_reward_train_refuses_bad_settings(base, pairs_file, tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert cli_main(run_args(base, out, pairs_file, *extra)) == 2
    assert words in one_error_line(capsys)
    assert not out.exists()


def test_reward_train_refuses_bad_paths_and_data(base, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(run_args(tmp_path / "nothing", out, pairs_file)) == 2
    assert "--from" in one_error_line(capsys)
    assert cli_main(run_args(base, out, tmp_path / "missing.jsonl")) == 2
    assert "missing.jsonl" in one_error_line(capsys)
    bad = tmp_path / "bad.jsonl"
    lines = pairs_file.read_text().splitlines()
    lines.insert(4, json.dumps({"prompt": "hi", "chosen": "a"}))  # line 5: no rejected
    bad.write_text("\n".join(lines) + "\n")
    assert cli_main(run_args(base, out, bad)) == 2
    line = one_error_line(capsys)
    assert "bad.jsonl:5" in line and "rejected" in line
    assert cli_main(["reward", "train", "--data", str(pairs_file), "-o", str(out)]) == 2
    assert "--from" in one_error_line(capsys)
    assert not out.exists()


def test_reward_score_refuses_bad_input(base, rm, tmp_path, capsys):
    folder = rm.save(tmp_path / "rm")
    cases = [
        (["reward", "score", str(tmp_path / "none"), "--prompt", "a", "--response", "b"], "none"),
        (["reward", "score", str(base), "--prompt", "a", "--response", "b"], HEAD_FILE),
        (["reward", "score", str(folder), "--prompt", "a"], "--response"),
        (["reward", "score", str(folder), "--prompt", "a", "--response", "b", "--device", "gpu"],
         "--device"),
        (["reward", "score", str(folder), "--prompt", "a", "--response", "b", "--dtype", "int8"],
         "--dtype"),
        (["reward"], "train or score"),
    ]
    for argv, words in cases:
        assert cli_main(argv) == 2, argv
        assert words in one_error_line(capsys)


def test_reward_score_prints_the_score(rm, tmp_path, capsys):
    folder = rm.save(tmp_path / "rm")
    capsys.readouterr()
    assert cli_main(["reward", "score", str(folder), "--prompt", "What is 2 + 2?",
                     "--response", "4"]) == 0
    out = capsys.readouterr().out.strip()
    assert float(out) == pytest.approx(rm.score(["What is 2 + 2?"], ["4"])[0], abs=1e-6)


# ---- training ----------------------------------------------------------------------------------

def train_accuracy(model, pairs):
    r_c = model.score([p.prompt_messages for p in pairs], [p.chosen_messages for p in pairs])
    r_r = model.score([p.prompt_messages for p in pairs], [p.rejected_messages for p in pairs])
    return float(np.mean(np.array(r_c) > np.array(r_r)))


def test_short_training_raises_the_pairwise_accuracy(base, pairs_file, tmp_path):
    from tinyllm.preference import read_pairs

    cfg = RewardConfig(base=str(base), data=str(pairs_file), val_fraction=0.2, steps=40,
                       batch_size=8, lr=3e-3, warmup=2, eval_every=20, eval_iters=2,
                       log_every=10, out=str(tmp_path / "run"), quiet=True).validate()
    run = RewardRun(cfg)
    pairs = read_pairs(pairs_file)
    before = train_accuracy(run.model, pairs)
    run.evaluate()  # before fit: measures, writes nothing
    assert run.heldout["step"] == 0 and not (tmp_path / "run").exists()
    run.fit()
    after = train_accuracy(run.model, pairs)
    assert before < 0.8 and after >= 0.95, (before, after)

    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_accuracy" in r] == [20, 40]
    assert [r["step"] for r in records if "train_accuracy" in r] == [10, 20, 30, 40]
    info = json.loads((tmp_path / "run" / "reward.json").read_text())
    assert info["heldout"]["accuracy"] == run.best_heldout["accuracy"]
    # the run folder is a reward model folder holding the best checkpoint
    loaded = RewardModel.load(tmp_path / "run")
    meta, _ = load_checkpoint(tmp_path / "run" / "best.ckpt")
    assert meta["kind"] == "reward" and meta["heldout"]["step"] == info["heldout"]["step"]
    if info["heldout"]["step"] == 40:
        assert loaded.score(["Is 3 ok?"], ["yes"]) == pytest.approx(
            run.model.score(["Is 3 ok?"], ["yes"]), abs=1e-6)


def test_interrupted_training_resumes_bit_identical(base, pairs_file, tmp_path, monkeypatch):
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli_main(run_args(base, full, pairs_file)) == 0
    real_step = RewardRun.train_step

    def interrupt_at_4(self):  # Ctrl-C during step 4: that step finishes, then the run saves
        out = real_step(self)
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(RewardRun, "train_step", interrupt_at_4)
    assert cli_main(run_args(base, part, pairs_file)) == 130
    monkeypatch.setattr(RewardRun, "train_step", real_step)
    assert load_checkpoint(part / "last.ckpt")[0]["step"] == 4
    assert cli_main(["reward", "train", "--resume", str(part), "--eval-iters", "1", "-q"]) == 0
    _, a = load_checkpoint(full / "last.ckpt")
    _, b = load_checkpoint(part / "last.ckpt")
    assert a.keys() == b.keys() and {"score_head/weight", "optim/0/exp_avg"} <= a.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []


def test_lora_trains_adapters_and_head_only(base, pairs_file, tmp_path):
    out = tmp_path / "run"
    assert cli_main(run_args(base, out, pairs_file, "--lora-rank", "2")) == 0
    meta, arrays = load_checkpoint(out / "last.ckpt")
    assert meta["lora"]["rank"] == 2
    _, start = load_checkpoint(base / "best.ckpt")
    frozen = [k for k in start if k.startswith("model/")]
    assert frozen and all(np.array_equal(arrays[k], start[k]) for k in frozen)
    lora_b = [k for k in arrays if k.endswith(".lora_B")]
    assert lora_b and all(np.abs(arrays[k]).max() > 0 for k in lora_b)  # B starts at zero
    model = RewardModel.load(out)  # the adapters are folded into the backbone on load
    assert np.isfinite(model.score(["hi"], ["yes"])[0])


def test_flops_per_token_leaves_out_the_lm_head(rm):
    cfg = rm.config
    blocks = sum(p.size for name, p in rm.backbone.named_parameters()
                 if name.startswith(("blocks.", "norm_f.")))
    expected = 6 * blocks + 12 * cfg.n_layers * 64 * cfg.d_model  # what the forward multiplies
    assert rm.flops_per_token(64) == expected
