"""The training step with each micro-batch split over threads (tinyllm.train.accumulate_grads,
data_threads): the same gradients and loss as the unsplit step, the same bits run to run,
exact resume, validation on split batches, and the rule that picks the thread count."""

import numpy as np
import pytest

import autograd
from autograd.amp import GradScaler
from tinyllm.model import GPT, ModelConfig
from tinyllm.train import TrainConfig, accumulate_grads, shard_count, train


def tiny_model():
    autograd.manual_seed(0)
    return GPT(ModelConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
                           context_length=16))


def batch(seed, B=5, T=16):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, (B, T)), rng.integers(0, 40, (B, T))


def grads_and_loss(model, micro, shards, scaler=None):
    params = model.parameters()
    for p in params:
        p.grad = None
    loss = accumulate_grads(model, params, micro, shards, scaler)
    return [p.grad.copy() for p in params], loss


@pytest.mark.parametrize("shards", [2, 3])
def test_split_batch_gives_the_unsplit_gradients(shards):
    model = tiny_model()
    x, y = batch(0)
    y[1, :9] = -100  # ignored targets: the slices hold unequal numbers of counted tokens
    micro = [(x, y), batch(1)]  # two micro-batches, each split (5 rows: uneven slices)
    want, want_loss = grads_and_loss(model, micro, 1)
    got, loss = grads_and_loss(model, micro, shards)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
    again, loss2 = grads_and_loss(model, micro, shards)  # bit for bit from run to run
    assert loss2 == loss
    for g, a in zip(got, again):
        np.testing.assert_array_equal(g, a)


def test_split_batch_with_a_loss_scaler():
    model = tiny_model()
    micro = [batch(2)]
    want, want_loss = grads_and_loss(model, micro, 1)
    got, loss = grads_and_loss(model, micro, 2, GradScaler(init_scale=1024.0))
    assert loss == pytest.approx(want_loss, rel=1e-5)  # the loss reported unscaled
    for g, w in zip(got, want):
        np.testing.assert_allclose(g / 1024.0, w, rtol=1e-4, atol=1e-6)


def test_shard_count_rule():
    assert shard_count("auto", 16, threads=2) == 2
    assert shard_count("auto", 16, threads=1) == 1  # one BLAS thread asked: no split either
    assert shard_count("auto", 16, threads=64) == 4  # at most 4
    assert shard_count("auto", 3, threads=8) == 3  # never more slices than rows
    assert shard_count("auto", 16, device="cuda", threads=8) == 1
    assert shard_count("auto", 16, dropout=0.1, threads=8) == 1
    assert shard_count(3, 16) == 3 and shard_count(1, 16) == 1
    with pytest.raises(ValueError, match="needs dropout 0"):
        shard_count(2, 16, dropout=0.2)
    with pytest.raises(ValueError, match="for the CPU"):
        shard_count(2, 16, device="cuda")
    for bad in (0, -1, "two", 1.5, True):
        with pytest.raises(ValueError, match="positive integer or 'auto'"):
            shard_count(bad, 16)


def test_resume_with_split_batches_is_bit_identical(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_text(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"], 2000)))

    def cfg(folder, steps):
        return TrainConfig(data=str(corpus), char=True, steps=steps, batch_size=4, block_size=16,
                           data_threads=2, warmup=1, eval_every=2, eval_iters=1, log_every=2,
                           sample_tokens=0, quiet=True, out=str(tmp_path / folder),
                           cache_dir=str(tmp_path / "cache"),
                           model=dict(n_layers=1, d_model=32, n_heads=2, context_length=16))

    full, _ = train(cfg("a", 4))
    assert full.shards == 2
    train(cfg("b", 2))
    resumed, summary = train(cfg("b", 4), resume=tmp_path / "b")
    assert summary["step"] == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # validation on split batches: the loss of the unsplit batches
    split = full.evaluate()
    full.shards = 1
    assert split == pytest.approx(full.evaluate(), rel=1e-5)
