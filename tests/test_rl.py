"""RL (GRPO): advantages and the clipped surrogate against values worked by hand, the loss's
gradient against a float64 policy-gradient computation on a softmax policy, the k3 KL,
masks, rollout log-probabilities against a teacher-forced forward, rewards, the command line,
exact resume and a short run whose reward rises."""

import json
import math

import numpy as np
import pytest

import autograd
from autograd import Tensor, ops
from tinyllm import chat, tasks
from tinyllm.checkpoint import load_checkpoint
from tinyllm.cli import main as cli_main
from tinyllm.generate import load_for_generation, save_for_generation
from tinyllm.model import GPT
from tinyllm.rl import (RewardError, RLConfig, RLRun, Rollouts, checked_rewards,
                        group_advantages, grpo_loss, k3_kl, pass_at_k, read_prompts, rollout,
                        task_reward, token_logps, training_batch)
from tinyllm.tokenizer import Tokenizer

TINY = dict(n_layers=1, d_model=32, n_heads=2, context_length=64)


# ---- advantages --------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = [1, 0, 0, 0, 1, 1, 1, 1, 0, 2, 0, 2]
    # group 0: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    # group 1: all equal -> 0; group 2: mean 1, std sqrt(4 / 3)
    s = math.sqrt(4 / 3)
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0,
                -1 / (s + 1e-4), 1 / (s + 1e-4), -1 / (s + 1e-4), 1 / (s + 1e-4)]
    got = group_advantages(rewards, 4, "group")
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(group_advantages(rewards, 4, "none"),
                               [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, -1, 1, -1, 1])


def test_group_advantages_refuse_rewards_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1, 0, 1], 4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages([1, 0], 1)


# ---- the clipped surrogate ---------------------------------------------------------------------

def one_token_case(ratios, advantages, **kw):
    """Four sequences of one completion token: log pi = log ratio + log pi_old."""
    old = np.log(np.array([[0.2], [0.3], [0.1], [0.25]]))
    logps = Tensor(old + np.log(np.array(ratios)).reshape(-1, 1), requires_grad=True,
                   dtype="float64")
    mask = np.ones((4, 1), bool)
    loss, stats = grpo_loss(logps, old, np.array(advantages, float), mask, **kw)
    loss.backward()
    return loss.item(), logps.grad[:, 0], stats


def test_clipped_surrogate_by_hand():
    # eps 0.2: per token -min(rho A, clip(rho, 0.8, 1.2) A)
    #   rho 1.5, A +1: -min(1.5, 1.2) = -1.2   clipped (high), no gradient
    #   rho 0.5, A +1: -min(0.5, 0.8) = -0.5   d/dlogp = -rho A = -0.5
    #   rho 0.5, A -1: -min(-0.5, -0.8) = 0.8  clipped (low), no gradient
    #   rho 1.5, A -1: -min(-1.5, -1.2) = 1.5  d/dlogp = -rho A = 1.5
    # dapo over 4 tokens: mean
    loss, grad, stats = one_token_case([1.5, 0.5, 0.5, 1.5], [1, 1, -1, -1], epsilon=0.2)
    assert loss == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4, rel=1e-12)
    np.testing.assert_allclose(grad, [0, -0.5 / 4, 0, 1.5 / 4], rtol=1e-12, atol=1e-15)
    assert stats["clip_high"] == 0.25 and stats["clip_low"] == 0.25
    assert stats["clip_fraction"] == 0.5
    assert stats["ratio"] == pytest.approx(1.0)


def test_asymmetric_clip_lets_likely_tokens_rise_further():
    # rho 1.25, A +1: inside [0.8, 1.28] -> -1.25 with gradient; with eps_high = eps it is
    # clipped at 1.2
    loss, grad, stats = one_token_case([1.25, 1, 1, 1], [1, 0, 0, 0], epsilon=0.2,
                                       epsilon_high=0.28)
    assert loss == pytest.approx(-1.25 / 4) and grad[0] == pytest.approx(-1.25 / 4)
    assert stats["clip_fraction"] == 0
    loss, grad, stats = one_token_case([1.25, 1, 1, 1], [1, 0, 0, 0], epsilon=0.2)
    assert loss == pytest.approx(-1.2 / 4) and grad[0] == 0
    assert stats["clip_high"] == 0.25


def test_loss_types_normalize_by_tokens_or_by_sequences():
    # ratio 1 (old = logps), so each token's loss is -A. Sequence 0: A = 1, 1 token;
    # sequence 1: A = -1, 3 tokens (the last column of sequence 0 is padding).
    logps = Tensor(np.log(np.full((2, 3), 0.5)), requires_grad=True, dtype="float64")
    mask = np.array([[True, False, False], [True, True, True]])
    adv = np.array([1.0, -1.0])
    dapo, _ = grpo_loss(logps, logps.data, adv, mask, loss_type="dapo")
    grpo, _ = grpo_loss(logps, logps.data, adv, mask, loss_type="grpo")
    assert dapo.item() == pytest.approx((-1 + 3) / 4)  # over 4 tokens
    assert grpo.item() == pytest.approx((-1 + 1) / 2)  # per sequence, then over 2
    # padding gets no gradient, whatever its log-probability
    dapo.backward()
    assert logps.grad[0, 1] == 0 and logps.grad[0, 2] == 0


def test_with_one_iteration_the_ratio_is_exactly_one():
    rng = np.random.default_rng(0)
    logps = Tensor(np.log(rng.uniform(0.05, 1, (3, 5))), requires_grad=True)
    mask = rng.random((3, 5)) < 0.7
    _, stats = grpo_loss(logps, logps.data, np.array([0.5, -1.0, 2.0]), mask, epsilon=0.01)
    assert stats["ratio"] == 1.0 and stats["clip_fraction"] == 0.0


def test_the_loss_gradient_is_the_policy_gradient_of_a_softmax_policy():
    """A one-layer softmax policy pi(a | s) = softmax(W s)[a] over 5 actions. With ratio 1,
    the dapo loss's gradient is -(1 / N) sum_t A_t grad log pi(a_t | s_t), and
    grad_W log softmax(W s)[a] = (onehot(a) - pi(. | s)) s^T: computed here in float64."""
    rng = np.random.default_rng(1)
    V, D, B, T = 5, 3, 4, 3
    W0 = rng.normal(size=(V, D))
    S = rng.normal(size=(B, T, D))
    actions = rng.integers(V, size=(B, T))
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
    adv = np.array([1.5, -0.5, 0.25, -1.25])
    W = Tensor(W0, requires_grad=True, dtype="float64")
    logits = ops.matmul(Tensor(S), W.T)  # (B, T, V)
    logp_all = ops.log_softmax(logits, axis=-1)
    bi, ti = np.meshgrid(np.arange(B), np.arange(T), indexing="ij")
    logps = logp_all[bi, ti, actions]
    loss, _ = grpo_loss(logps, logps.data, adv, mask, loss_type="dapo")
    loss.backward()
    expected = np.zeros((V, D))
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                z = W0 @ S[b, t]
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                expected -= adv[b] * np.outer(np.eye(V)[actions[b, t]] - p, S[b, t])
    expected /= mask.sum()
    np.testing.assert_allclose(W.grad, expected, rtol=1e-10, atol=1e-12)


def test_k3_kl_is_zero_for_identical_policies_and_positive_otherwise():
    logp = np.log(np.array([[0.2, 0.5, 0.9]]))
    assert np.array_equal(k3_kl(logp, logp), np.zeros((1, 3)))
    ref = np.log(np.array([[0.4, 0.5, 0.3]]))
    kl = k3_kl(logp, ref)
    # r = ref / pi: 2, 1, 1/3 -> r - log r - 1
    np.testing.assert_allclose(kl, [[1 - math.log(2), 0, 1 / 3 + math.log(3) - 1]], rtol=1e-12)
    assert kl[0, 0] > 0 and kl[0, 2] > 0
    t = Tensor(logp, requires_grad=True, dtype="float64")
    np.testing.assert_allclose(k3_kl(t, ref).data, kl, rtol=1e-12)
    # in the loss: beta times its token mean, reported as kl
    loss, stats = grpo_loss(t, logp, np.zeros(1), np.ones((1, 3), bool), ref_logps=ref, beta=0.5)
    assert loss.item() == pytest.approx(0.5 * kl.mean(), rel=1e-12)
    assert stats["kl"] == pytest.approx(kl.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(t, logp, np.zeros(1), np.ones((1, 3), bool), beta=0.5)


# ---- masks ---------------------------------------------------------------------------------------

def test_training_batch_masks_prompt_and_padding_and_handles_truncation():
    END, PAD = 9, 0
    prompts = [[1, 2, 3], [4, 5]]
    ro = Rollouts(prompts, 2, [[6, END], [7, 8, 7], [END], [6, 6, 6]],
                  finished=np.array([True, False, True, False]),
                  ended_turn=np.array([True, False, True, False]),
                  logps=[None] * 4, entropy=0.0, positions=0, seconds=0.0)
    x, y, mask = training_batch(prompts, ro, PAD)
    assert x.tolist() == [[1, 2, 3, 6, PAD], [1, 2, 3, 7, 8], [4, 5, PAD, PAD, PAD],
                          [4, 5, 6, 6, PAD]]
    # targets: the completion (and its stop token) only
    I = -100
    assert y.tolist() == [[I, I, 6, END, I], [I, I, 7, 8, 7], [I, END, I, I, I],
                          [I, 6, 6, 6, I]]
    assert mask.sum(axis=1).tolist() == [2, 3, 1, 3]
    _, y2, mask2 = training_batch(prompts, ro, PAD, mask_truncated=True)
    assert mask2.sum(axis=1).tolist() == [2, 0, 1, 0]  # the cut completions are left out


# ---- a tiny chat model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny chat model (random weights, byte tokenizer with the chat tokens) as a run folder."""
    autograd.manual_seed(0)
    tok = chat.add_chat_tokens(Tokenizer.bytes())
    model = GPT.from_preset("laptop", vocab_size=tok.vocab_size, **TINY)
    path = tmp_path_factory.mktemp("rl") / "start"
    save_for_generation(path, model, tok, {"kind": "sft"})
    return path


def test_rollout_logps_equal_a_teacher_forced_forward_at_the_same_temperature(tiny):
    model, tok = load_for_generation(tiny, dtype="float64")
    from tinyllm.evaluate import prompt_ids
    prompts = prompt_ids(model, tok, ["ab", "cd", "hello"])  # two of one length
    stops = set(tok.special_tokens.values())
    for temperature in (0.7, 1.3):
        ro = rollout(model, prompts, 3, 6, temperature, stops=stops,
                     end_id=chat.end_of_turn(tok), seed=[1, 2], top_k=50)
        assert len(ro.tokens) == 9 and all(1 <= len(t) <= 6 for t in ro.tokens)
        x, y, mask = training_batch(prompts, ro, 0)
        got = token_logps(model, x, y, temperature).data
        for i, lp in enumerate(ro.logps):
            np.testing.assert_allclose(got[i][mask[i]], lp, rtol=1e-9, atol=1e-10)
            assert len(lp) == len(ro.tokens[i])
        # and the same seed samples the same completions
        again = rollout(model, prompts, 3, 6, temperature, stops=stops, seed=[1, 2], top_k=50)
        assert again.tokens == ro.tokens


def test_sampled_logp_and_entropy_equal_the_plain_formulas():
    from tinyllm.rl import _sampled_logp_and_entropy

    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 11)) * 4
    tokens = rng.integers(0, 11, 5)
    for T in (0.5, 1.0, 1.7):
        p = np.exp(z / T) / np.exp(z / T).sum(-1, keepdims=True)
        chosen, entropy = _sampled_logp_and_entropy(z, tokens, T)
        np.testing.assert_allclose(chosen, np.log(p[np.arange(5), tokens]), rtol=1e-12)
        np.testing.assert_allclose(entropy, -(p * np.log(p)).sum(-1), rtol=1e-12)


def test_rewards_of_tasks_and_of_user_functions():
    add = task_reward("add")
    assert add("What is 2 + 3?", " 5 ", answer="5") == 1.0
    assert add("What is 2 + 3?", "6", answer="5") == 0.0

    def bad(prompt, completion, **fields):
        return 1 / 0

    with pytest.raises(RewardError, match=r"bad raised ZeroDivisionError.*'What is 1 \+ 1\?'"):
        checked_rewards(bad, ["What is 1 + 1?"], ["2"], [{}])

    def text(prompt, completion, **fields):
        return "yes"

    with pytest.raises(RewardError, match="text returned 'yes', not a finite number.*'Q'"):
        checked_rewards(text, ["Q"], ["2"], [{}])
    with pytest.raises(RewardError, match="returned nan"):
        checked_rewards(lambda p, c: float("nan"), ["Q"], ["2"], [{}])
    seen = []

    def fields(prompt, completion, target, weight=1):
        seen.append((prompt, completion, target, weight))
        return weight * float(completion == target)

    r = checked_rewards(fields, ["p", "q"], ["x", "y"], [{"target": "x", "weight": 2},
                                                           {"target": "x"}])
    assert r.tolist() == [2.0, 0.0] and seen[1] == ("q", "y", "x", 1)


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 0, 2) == 0 and pass_at_k(4, 3, 2) == 1
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2) / C(4,2)


def test_read_prompts_formats_fields_and_bad_lines(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Say hi", "target": "hi"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "system", "content": "Be terse."},
                                            {"role": "user", "content": "Hi"}]}) + "\n")
    got = read_prompts(f)
    assert got[0] == ("Say hi", {"target": "hi"}) and got[1][0][1]["content"] == "Hi"
    for line, complaint in [('{"prompt": 3}', "must be"), ("[1]", "JSON object"),
                            ('{"prompt": "a", "messages": []}', "exactly one"),
                            ('{"messages": [{"role": "user", "content": "a"}, '
                             '{"role": "assistant", "content": "b"}]}', "last message"),
                            ('{"prompt": "a", "completion": "b"}', "completion"),
                            ("{oops", "invalid JSON")]:
        f.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=f"p.jsonl:2: .*{complaint}"):
            read_prompts(f)


# ---- runs ----------------------------------------------------------------------------------------

REWARDS = '''
def letters(prompt, completion, **fields):
    """The share of a completion's characters that are lowercase letters."""
    return sum(c.islower() for c in completion) / max(len(completion), 1)

def boom(prompt, completion, **fields):
    raise RuntimeError("no score today")

def words(prompt, completion, **fields):
    return "many"
'''


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("user")
    (d / "rewards.py").write_text(REWARDS)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n"
                                             for i, p in enumerate(["ab", "cd", "xy", "pq"])))
    return d


def rl_config(tiny, out, files, **kw):
    settings = dict(base=str(tiny), reward=f"{files / 'rewards.py'}:letters",
                    prompts=str(files / "prompts.jsonl"), group_size=4, prompts_per_step=2,
                    max_new_tokens=4, steps=4, eval_every=4, lr=3e-3, out=str(out), quiet=True,
                    data_threads=1)
    settings.update(kw)
    return RLConfig(**settings).validate()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_short_run_raises_the_reward(tiny, user_files, tmp_path):
    run = RLRun(rl_config(tiny, tmp_path / "run", user_files, steps=16, eval_every=16,
                          prompts_per_step=4, group_size=8, lr=1e-2))
    summary = run.fit()
    assert not summary["diverged"] and summary["step"] == 16
    steps = [r for r in records(tmp_path / "run") if "reward" in r]
    rewards = [r["reward"] for r in steps]
    print("rewards", np.round(rewards, 2))
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.25
    for key in ("reward_std", "zero_std_groups", "completion_len", "entropy", "clip_fraction",
                "rollout_tokens_per_s", "update_tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in steps), key
    model, tok = load_for_generation(tmp_path / "run")  # loads like any run folder
    assert tok.vocab_size == model.config.vocab_size
    assert load_checkpoint(tmp_path / "run" / "best.ckpt")[0]["kind"] == "rl"
    from tinyllm.plot import plot_run

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs matplotlib"):
            plot_run(tmp_path / "run")
        return
    png = plot_run(tmp_path / "run")  # the RL panels: reward, held-out, entropy, length
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_first_update_pass_sees_ratio_one_and_beta_adds_kl(tiny, user_files, tmp_path):
    run = RLRun(rl_config(tiny, tmp_path / "run", user_files, beta=0.1, iterations=2))
    s = run.train_step()
    assert s["kl"] == 0.0  # the first pass: the policy is the reference
    run2 = RLRun(rl_config(tiny, tmp_path / "run2", user_files))
    idx = run2.step_prompts(0)
    ro = rollout(run2.model, [run2.prompt_ids[i] for i in idx], 4, 4, 1.0, stops=run2.stops,
                 seed=[0])
    x, y, mask = training_batch(ro.prompt_ids, ro, run2.pad_id)
    adv = group_advantages(np.arange(8.0), 4)
    stats, _ = run2.update(x, y, mask, adv, None)
    assert stats["ratio"] == 1.0 and stats["clip_fraction"] == 0.0


def test_resume_continues_exactly(tiny, user_files, tmp_path):
    whole = RLRun(rl_config(tiny, tmp_path / "whole", user_files, steps=4, eval_every=2))
    whole.fit()
    half = RLRun(rl_config(tiny, tmp_path / "half", user_files, steps=2, eval_every=2))
    half.fit()
    assert cli_main(["rl", "--resume", str(tmp_path / "half"), "--steps", "4"]) == 0
    a = load_checkpoint(tmp_path / "whole" / "last.ckpt")[1]
    b = load_checkpoint(tmp_path / "half" / "last.ckpt")[1]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra = [r for r in records(tmp_path / "whole") if "reward" in r]
    rb = [r for r in records(tmp_path / "half") if "reward" in r]
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]


def test_lora_run_saves_adapters_and_loads_merged(tiny, user_files, tmp_path):
    code = cli_main(["rl", "--from", str(tiny), "--reward", f"{user_files / 'rewards.py'}:letters",
                     "--prompts", str(user_files / "prompts.jsonl"), "-o", str(tmp_path / "lora"),
                     "--lora-rank", "2", "--steps", "2", "--eval-every", "2", "--group-size", "2",
                     "--prompts-per-step", "2", "--max-new-tokens", "3", "-q"])
    assert code == 0
    meta, arrays = load_checkpoint(tmp_path / "lora" / "best.ckpt")
    assert meta["lora"]["rank"] == 2 and any("lora_B" in k for k in arrays)
    assert (tmp_path / "lora" / "adapter.safetensors").exists()
    model, _ = load_for_generation(tmp_path / "lora")
    assert not any("lora" in k for k in model.state_dict())


def test_a_failing_reward_function_exits_2_naming_it(tiny, user_files, tmp_path, capsys):
    for fn, complaint in (("boom", "boom raised RuntimeError: no score today"),
                          ("words", "words returned 'many', not a finite number")):
        code = cli_main(["rl", "--from", str(tiny), "--reward",
                         f"{user_files / 'rewards.py'}:{fn}", "--prompts",
                         str(user_files / "prompts.jsonl"), "-o", str(tmp_path / fn),
                         "--steps", "1", "--group-size", "2", "--max-new-tokens", "2", "-q"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert complaint in err and "prompt '" in err, err


# ---- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, complaint", [
    ([], "exactly one source of prompts"),
    (["--task", "add", "--prompts", "PROMPTS", "--reward", "REWARDS:letters"], "not both"),
    (["--task", "add", "--reward", "REWARDS:letters", "--reward-model", "."], "at most one"),
    (["--prompts", "PROMPTS"], "needs --reward"),
    (["--task", "qa"], "--task"),
    (["--task", "add,nope"], "--task"),
    (["--task", "add,add"], "named twice"),
    (["--task", "add", "--group-size", "1"], "group_size"),
    (["--task", "add", "--temperature", "0"], "--temperature"),
    (["--task", "add", "--scale-rewards", "batch"], "--scale-rewards"),
    (["--task", "add", "--loss-type", "bnpo"], "--loss-type"),
    (["--task", "add", "--epsilon", "1.5"], "epsilon"),
    (["--task", "add", "--top-p", "0"], "top_p"),
    (["--task", "add", "--beta", "-1"], "--beta"),
    (["--task", "add", "--max-new-tokens", "200"], "context"),
    (["--reward", "nofile.py:f", "--prompts", "PROMPTS"], "nofile.py"),
    (["--reward", "REWARDS:missing", "--prompts", "PROMPTS"], "no function 'missing'"),
    (["--reward", "REWARDS", "--prompts", "PROMPTS"], "FILE.py:FUNCTION"),
    (["--reward", "REWARDS:letters"], "--prompts"),
    (["--reward", "REWARDS:letters", "--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--reward-model", "nowhere", "--prompts", "PROMPTS"], "nowhere"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tiny, user_files, tmp_path, capsys,
                                                          extra, complaint):
    out = tmp_path / "run"
    extra = [a.replace("REWARDS", str(user_files / "rewards.py"))
             .replace("PROMPTS", str(user_files / "prompts.jsonl")) for a in extra]
    assert cli_main(["rl", "--from", str(tiny), "-o", str(out), "--steps", "1", "-q",
                     *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and complaint in err, err
    assert not out.exists()


def test_a_bad_prompt_line_and_a_bad_start_exit_2_before_any_work(tiny, user_files, tmp_path,
                                                                   capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"text": "c"}\n')
    out = tmp_path / "run"
    args = ["rl", "--from", str(tiny), "-o", str(out), "--reward",
            f"{user_files / 'rewards.py'}:letters", "--prompts", str(bad), "-q"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl:3:" in err, err
    assert not out.exists()
    assert cli_main(["rl", "--from", str(tmp_path / "nowhere"), "--task", "add", "-o",
                     str(out)]) == 2
    assert "--from" in capsys.readouterr().err
    assert not out.exists()


def test_task_prompts_mix_tasks_and_evaluate_each_with_any_reward(tiny, user_files, tmp_path):
    # two tasks' prompts, rewarded by a user function: each prompt carries its task and answer,
    # held-out prompts come from the tasks' held-out split, and the evaluation reports pass@1
    # per task beside the mean reward of the greedy answers, which picks best.ckpt
    run = RLRun(rl_config(tiny, tmp_path / "run", user_files, prompts=None, task="add,compare",
                          n_prompts=40, eval_n=10))
    assert {f["task"] for _, f in run.prompts} == {"add", "compare"}
    assert {f["task"] for _, f in run.heldout} == {"add", "compare"} and len(run.heldout) == 10
    assert not {p for p, _ in run.prompts} & {p for p, _ in run.heldout}
    res = run.evaluate()
    assert set(res) >= {"pass@1", "pass@1_add", "pass@1_compare", "heldout_reward"}
    assert run.eval_key == "heldout_reward"
    from tinyllm.evaluate import answer

    replies = answer(run.model, run.tokenizer, [p for p, _ in run.heldout])
    letters = np.mean([sum(c.islower() for c in r) / max(len(r), 1) for r in replies])
    assert res["heldout_reward"] == pytest.approx(letters)
    right = [tasks.get_task(f["task"]).check(r, f["answer"]) for r, (_, f) in
             zip(replies, run.heldout)]
    assert res["pass@1"] == pytest.approx(np.mean(right))
    # with the tasks' own reward, each prompt is checked against its own task
    reward = task_reward(["add", "compare"])
    assert reward("What is 2 + 3?", "5", answer="5", task="add") == 1.0
    assert reward("Which is larger, 3 or 5?", "3", answer="5", task="compare") == 0.0
    with pytest.raises(ValueError, match="no 'task' field"):
        reward("What is 2 + 3?", "5", answer="5")


def test_a_prompts_file_holds_some_out_by_content(tiny, user_files, tmp_path):
    run = RLRun(rl_config(tiny, tmp_path / "run", user_files, heldout_fraction=0.3))
    train, held = [p for p, _ in run.prompts], [p for p, _ in run.heldout]
    assert held and train and sorted(train + held) == ["ab", "cd", "pq", "xy"]
    again = RLRun(rl_config(tiny, tmp_path / "again", user_files, heldout_fraction=0.3))
    assert [p for p, _ in again.heldout] == held


def test_a_reward_model_scores_the_rollouts(tiny, user_files, tmp_path):
    from tinyllm.reward import RewardModel

    backbone, tok = load_for_generation(tiny)
    autograd.manual_seed(3)
    RewardModel(backbone, tok).save(tmp_path / "rm")
    run = RLRun(rl_config(tiny, tmp_path / "run", user_files, reward=None,
                          reward_model=str(tmp_path / "rm"), format_reward=0.5))
    idx = run.step_prompts(0)
    ro = rollout(run.model, [run.prompt_ids[i] for i in idx], 4, 4, 1.0, stops=run.stops,
                 end_id=run.end_id, seed=[0])
    texts = [tok.decode([t for t in toks if t not in run.stops]) for toks in ro.tokens]
    prompts = [run.prompts[idx[i // 4]][0] for i in range(len(texts))]
    expected = np.array(RewardModel.load(tmp_path / "rm").score(prompts, texts))
    np.testing.assert_allclose(run.rewards_of(idx, ro), expected + 0.5 * ro.ended_turn,
                               rtol=1e-6)
    assert run.fit()["step"] == 4
    evals = [r for r in records(tmp_path / "run") if "heldout_reward" in r]
    assert [r["step"] for r in evals] == [0, 4]
