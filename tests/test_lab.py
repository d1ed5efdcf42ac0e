"""tinyllm lab: every experiment runs in its smoke configuration and writes a page whose table
holds its measured figures, and a PNG; the helpers the experiments stand on."""

import re
import shlex

import numpy as np
import pytest

from autograd.testing import device_params
from tinyllm import lab
from tinyllm.cli import build_parser
from tinyllm.cli import main as cli_main
from tinyllm.lab import common
from tinyllm.train import IGNORE_INDEX

EXPERIMENTS = list(lab.available())


def smoke_args(name, *argv):
    """The parsed options of `tinyllm lab NAME --smoke ARGV`, the smoke values applied."""
    args = build_parser().parse_args(["lab", name, "--smoke", *argv])
    for key, value in lab.available()[name].SMOKE.items():
        setattr(args, key, value)
    return args


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Token and tokenizer caches of these runs in a folder of their own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """{name: (exit code, page text, png path)}: each experiment run once in its smoke
    configuration through the command line."""
    pytest.importorskip("matplotlib", reason="tinyllm lab draws with matplotlib (test extra)")
    out = tmp_path_factory.mktemp("lab")
    results = {}
    for name in EXPERIMENTS:
        rc = cli_main(["lab", name, "--smoke", "--out", str(out)])
        page = out / f"{name}.md"
        results[name] = (rc, page.read_text() if page.exists() else "", out / f"{name}.png")
    return results


def table(text):
    """The page's first markdown table: (headers, rows of cells)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(lines[1].replace("|", "")) == {"-"}, "second line is the header rule"
    return cells[0], cells[2:]


def column(headers, rows, name):
    return [row[headers.index(name)] for row in rows]


def test_list_names_all_seven_in_the_learners_order(capsys):
    assert cli_main(["lab", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["norm", "positions", "init", "precision",
                                                   "schedule", "packing", "tokenizer"]
    assert [line.split(".")[0] for line in lines] == [str(i) for i in range(1, 8)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_run_writes_page_and_png(pages, name):
    rc, text, png = pages[name]
    assert rc == 0
    module = lab.available()[name]
    assert text.startswith("# Lab ")
    assert lab.question(module) in text
    assert f"![{name}]({name}.png)" in text
    assert f"- command: `tinyllm lab {name} " in text and "--smoke" in text
    for field in ("- machine: ", "- date: ", "- wall time: ", "## What it shows"):
        assert field in text, field
    shows = text.split("## What it shows")[1].split("##")[0].strip()
    assert re.search(r"\d", shows), "the findings quote measured numbers"
    headers, rows = table(text)
    assert rows and all(len(r) == len(headers) for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_schedule_page_holds_the_grid(pages):
    if "schedule" not in pages:
        pytest.skip("no schedule experiment")
    _, text, _ = pages["schedule"]
    headers, rows = table(text)
    smoke = lab.available()["schedule"].SMOKE
    grid = {(int(r[0]), float(r[1])) for r in rows}
    assert grid == {(w, lr) for w in smoke["warmups"] for lr in smoke["lrs"]}
    for loss, status in zip(column(headers, rows, "final val loss"),
                            column(headers, rows, "status")):
        assert status.split()[0] in ("ok", "failed", "diverged")
        assert (loss == "diverged") == status.startswith("diverged")
        if status == "ok":
            assert 0 < float(loss) < np.log(1025)  # better than uniform over the vocabulary
    rises = [float(v) for v in column(headers, rows, "largest train-loss rise")]
    assert all(r >= 0 for r in rises)


def test_schedule_measures():
    from types import SimpleNamespace

    from tinyllm.lab.schedule import largest_rise

    assert largest_rise([5.0, 4.0, 4.5, 3.0, 3.8]) == pytest.approx(0.8)
    assert largest_rise([3.0, 2.0, 1.0]) == 0

    # train: token 0 three times, 1 once; the validation targets: one of each
    run = SimpleNamespace(dataset=SimpleNamespace(train=np.array([0, 0, 0, 1])),
                          tokenizer=SimpleNamespace(vocab_size=3),
                          val_batches=lambda: iter([(None, np.array([[0, 1]]))]))
    # add-one smoothing over a vocabulary of 3: p = (4, 2, 1) / 7
    expected = -(np.log(4 / 7) + np.log(2 / 7)) / 2
    assert common.unigram_loss(run) == pytest.approx(expected)


def test_packing_page_counts_padding(pages):
    if "packing" not in pages:
        pytest.skip("no packing experiment")
    _, text, _ = pages["packing"]
    headers, rows = table(text)
    by = {r[0]: dict(zip(headers, r)) for r in rows}
    assert by["packed"]["of which padding"] == "0.0%"
    processed = {k: int(v["tokens processed"]) for k, v in by.items()}
    trained = {k: int(v["tokens trained on"]) for k, v in by.items()}
    waste = float(by["padded"]["of which padding"].rstrip("%")) / 100
    assert trained["packed"] == processed["packed"]
    assert trained["padded"] < processed["padded"]
    assert waste == pytest.approx(1 - trained["padded"] / processed["padded"], abs=1e-3)
    # the padded run gets the packed run's compute: at most one batch more
    smoke = lab.available()["packing"].SMOKE
    assert 0 <= processed["padded"] - processed["packed"] < smoke["batch_size"] * smoke["context"]


def test_tokenizer_page_measures_compression(pages):
    if "tokenizer" not in pages:
        pytest.skip("no tokenizer experiment")
    _, text, _ = pages["tokenizer"]
    headers, rows = table(text)
    by = {int(r[0]): dict(zip(headers, r)) for r in rows}
    assert float(by[256]["bytes per token (val)"]) == pytest.approx(1.0, abs=0.01)
    assert float(by[300]["bytes per token (val)"]) > 1.1
    for row in by.values():  # bits per byte = nats/token / bytes per token / ln 2
        bpb = float(row["val loss (nats/token)"]) / float(row["bytes per token (val)"]) / np.log(2)
        assert float(row["bits per byte (val)"]) == pytest.approx(bpb, rel=0.01)


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("device", [p for p in device_params() if p.id == "cuda"])
def test_experiment_measures_on_the_gpu(name, device):
    """Each experiment's measurements on a GPU (the drawing is matplotlib's, on the CPU)."""
    result = lab.available()[name].run(smoke_args(name, "--device", device))
    assert result.rows and re.search(r"\d", result.shows)
    numbers = [v for row in result.rows for v in row if isinstance(v, float)]
    assert numbers and any(np.isfinite(numbers))


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["lab", "schedule", "--lrs", "fast"], "--lrs"),
    (["lab", "schedule", "--lrs", "-1"], "--lrs"),
    (["lab", "schedule", "--steps", "10", "--warmups", "0,20"], "--warmups"),
    (["lab", "tokenizer", "--vocab-sizes", "100"], "--vocab-sizes"),
    (["lab", "packing", "--device", "tpu"], "--device"),
    (["lab", "nosuch"], "nosuch"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, words):
    pytest.importorskip("matplotlib", reason="a missing matplotlib is said first")
    if argv[1] not in EXPERIMENTS and argv[1] != "nosuch":
        pytest.skip(f"no {argv[1]} experiment")
    assert cli_main(argv + ["--out", str(tmp_path)] if argv[1] != "nosuch" else argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not list(tmp_path.iterdir())


# ---- the helpers -------------------------------------------------------------------------------

def test_command_line_repeats_the_run():
    parser = build_parser()
    argv = ["lab", "schedule", "--lrs", "0.001,0.03", "--warmups", "0,5", "--steps", "50",
            "--out", "somewhere"]
    args = parser.parse_args(argv)
    command = lab.command_line("schedule", args.lab_parser, args)
    assert command.startswith("tinyllm lab schedule ")
    again = parser.parse_args(shlex.split(command)[1:])
    assert vars(again) == vars(args)


def test_pieces_cut_documents_at_eot_and_length():
    from tinyllm.lab.packing import padded_batch, pieces

    eot = 9
    tokens = np.array([1, 2, 3, eot, 4, eot, eot, 5, 6, 7, 8, 1, 2, eot])
    got = [p.tolist() for p in pieces(tokens, eot, 4)]
    # documents [1 2 3 E] [4 E] [E] [5 6 7 8 1 2 E]; the lone EOT has nothing to predict
    assert got == [[1, 2, 3, eot], [4, eot], [5, 6, 7, 8], [1, 2, eot]]
    x, y = padded_batch([np.array(p) for p in got[:2]], eot)
    assert x.tolist() == [[1, 2, 3], [4, eot, eot]]
    assert y.tolist() == [[2, 3, eot], [eot, IGNORE_INDEX, IGNORE_INDEX]]


def test_markdown_table_marks_diverged_runs():
    text = common.markdown_table(["a", "b"], [[1, 0.123456], ["x", float("nan")]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x | diverged |"]


def test_loss_per_position_averages_to_the_models_loss():
    import autograd
    from tinyllm import data as data_mod
    from tinyllm.lab.positions import bands_of, loss_per_position, moving_average

    c = common.train("tiny", 2, model=dict(n_layers=1, d_model=16, n_heads=2, context_length=32),
                     block_size=8, batch_size=4, eval_iters=1)
    per_pos = loss_per_position(c.run, 32, 6)
    assert per_pos.shape == (32,)
    starts = data_mod.eval_windows(c.run.dataset.val, 32, 6)
    x, y = data_mod.windows_at(c.run.dataset.val, starts, 32)
    with autograd.no_grad():
        _, loss = c.run.model(x, y, return_logits=False)
    assert per_pos.mean() == pytest.approx(loss.item(), rel=1e-5)
    assert bands_of(8, 32) == [(0, 8), (8, 16), (16, 32)]
    assert bands_of(8, 24) == [(0, 8), (8, 16), (16, 24)]
    assert moving_average(np.arange(1.0, 6.0), 3).tolist() == [1.5, 2, 3, 4, 4.5]


# ---- norm position, initialization, precision ----------------------------------------------------

def test_norm_page_holds_every_depth_norm_and_warmup(pages):
    if "norm" not in pages:
        pytest.skip("no norm experiment")
    _, text, _ = pages["norm"]
    headers, rows = table(text)
    smoke = lab.available()["norm"].SMOKE
    assert {(int(r[0]), r[1], int(r[2])) for r in rows} == {
        (d, n, w) for d in smoke["depths"] for n in ("pre", "post") for w in (0, smoke["warmup"])}
    for row in rows:
        r = dict(zip(headers, row))
        assert (r["status"] == "ok") == (r["final val loss"] != "diverged")
        first, last = float(r["grad norm, first block (step 1)"]), float(
            r["grad norm, last block (step 1)"])
        assert first > 0 and last > 0
        assert float(r["last / first"]) == pytest.approx(last / first, rel=1e-3)
    # runs that differ only in warmup start from the same weights: the same step-1 gradients
    by = {(r[0], r[1], r[2]): r for r in rows}
    col = headers.index("grad norm, first block (step 1)")
    for d in smoke["depths"]:
        for n in ("pre", "post"):
            assert by[str(d), n, "0"][col] == by[str(d), n, str(smoke["warmup"])][col]


def test_init_page_shows_each_schemes_scale_at_step_0(pages):
    if "init" not in pages:
        pytest.skip("no init experiment")
    _, text, _ = pages["init"]
    headers, rows = table(text)
    by = {r[0]: dict(zip(headers, r)) for r in rows}
    assert set(by) == {"gpt2", "normal", "fan_in"}
    rms0 = {k: float(v["stream RMS after block 0"]) for k, v in by.items()}
    # embeddings drawn at std 0.02 (gpt2, normal) or 1 (fan_in: PyTorch's nn.Embedding)
    assert rms0["gpt2"] < 0.1 and rms0["normal"] < 0.1 and 0.5 < rms0["fan_in"] < 2
    # a tied head over std-1 embeddings starts far above uniform guessing (ln 256 = 5.55)
    assert float(by["fan_in"]["loss at step 1"]) > float(by["gpt2"]["loss at step 1"]) + 1


def test_precision_page_counts_casts_per_mode(pages):
    if "precision" not in pages:
        pytest.skip("no precision experiment")
    _, text, _ = pages["precision"]
    headers, rows = table(text)
    by = {r[0]: dict(zip(headers, r)) for r in rows}
    assert list(by) == ["float32", "bfloat16", "float16, loss scaling",
                        "float16, no loss scaling"]
    f32 = by["float32"]
    assert (f32["overflows"], f32["underflows"], f32["underflowed share of cast values"]) == \
        ("0", "0", "-")
    under = {k: int(v["underflows"].replace(",", "")) for k, v in by.items()}
    # the loss scale (2^16 at the start) lifts small gradients out of float16's underflow range
    assert under["float16, no loss scaling"] > 10 * under["float16, loss scaling"]
    assert by["float16, loss scaling"]["final loss scale"] != "-"
    assert by["float16, no loss scaling"]["final loss scale"] == "-"
    for v in by.values():
        assert float(v["tokens/s"].replace(",", "")) > 0
        assert float(v["peak memory of a step (MiB)"]) > 0


@pytest.mark.parametrize("argv, words", [
    (["lab", "norm", "--d-model", "30"], "--d-model"),
    (["lab", "norm", "--steps", "10", "--warmup", "10"], "--warmup"),
    (["lab", "init", "--lr", "0"], "--lr"),
    (["lab", "precision", "--layers", "0"], "--layers"),
])
def test_model_experiments_refuse_bad_input_in_one_line(tmp_path, capsys, argv, words):
    pytest.importorskip("matplotlib", reason="a missing matplotlib is said first")
    assert cli_main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
    assert not list(tmp_path.iterdir())
