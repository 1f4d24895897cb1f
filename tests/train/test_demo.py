"""The `make demo` path at a tiny budget, through the CLI: tokenize with buckets, train a curriculum, sample, plot.

And what it leaves behind: a checkpoint directory that loads as a model with its tokenizer, and a PNG.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from seekstack.checkpoint import load_pretrained
from seekstack.cli import app
from seekstack.eval.samples import demo_samples
from seekstack.tokenizer import Tokenizer
from seekstack.train.plot import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MICRO = (
    "model.hidden_size=64 model.intermediate_size=96 model.moe_intermediate_size=32 model.num_hidden_layers=2 "
    "model.num_attention_heads=2 model.q_lora_rank=32 model.kv_lora_rank=16 model.qk_nope_head_dim=16 "
    "model.qk_rope_head_dim=8 model.v_head_dim=16 model.n_routed_experts=4 model.vocab_size=400"
).split()


def run(*args: str):
    result = CliRunner().invoke(app, [str(arg) for arg in args], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """Corpus -> tokenizer -> shards with buckets -> 4 curriculum steps of a micro model."""
    root = tmp_path_factory.mktemp("demo")
    corpus = root / "corpus"
    corpus.mkdir()
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    texts = [path.read_text(encoding="utf-8", errors="replace")[:3000] for path in paths]
    for split, documents in (("train", texts[:34]), ("val", texts[34:])):
        lines = "".join(json.dumps({"text": text}) + "\n" for text in documents)
        (corpus / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    run("tokenizer", "train", "--corpus", corpus, "--vocab-size", 400, "--out", root / "tokenizer")
    tokens = run(
        "data", "tokenize", "--corpus", corpus, "--tokenizer", root / "tokenizer", "--out", root / "tokens", "--buckets"
    )
    assert "train_easy: " in tokens.output and "train_hard: " in tokens.output
    mixture = "mixture={train_easy: [0.7, 0.2, 0.1], train_medium: [0.2, 0.5, 0.3], train_hard: [0.1, 0.3, 0.6]}"
    settings = f"data_dir={root / 'tokens'} out_dir={root / 'run'} max_steps=4 batch_size=4 seq_len=64 warmup_steps=1"
    run("train", *settings.split(), "eval_every=4", "eval_batches=2", *MICRO, mixture)
    return root


def test_demo_checkpoint_loads_as_a_model_with_its_tokenizer(demo_run):
    checkpoint = demo_run / "run" / "checkpoints" / "step_4"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        path.name for path in checkpoint.iterdir()
    }
    tokenizer = Tokenizer.from_file(checkpoint)
    assert tokenizer.fingerprint == Tokenizer.from_file(demo_run / "tokenizer").fingerprint
    model = load_pretrained(checkpoint).eval()
    prompt_ids = tokenizer.encode("def f(x):\n")
    with torch.inference_mode():
        expected = model(torch.tensor([prompt_ids])).logits[0, -1].argmax().item()
    [(_, greedy, _)] = demo_samples(checkpoint, ("def f(x):\n",), max_new_tokens=1)
    # Compared as text: a greedy token that is part of a character (a byte token) re-encodes to other ids.
    assert greedy == ("" if expected == tokenizer.eos_id else tokenizer.decode([expected]))


def test_demo_run_logs_the_curriculum_mix_and_a_validation_bpb(demo_run):
    records = read_metrics(demo_run / "run")
    assert [r["mix"]["train_easy"] for r in records if "loss" in r] == pytest.approx([0.7, 0.7, 0.2, 0.1])
    (evaluation,) = [r for r in records if "val_bpb" in r]
    assert 0 < evaluation["val_bpb"] < 10


def test_sample_prints_greedy_and_sampled_continuations_of_each_prompt(demo_run):
    result = run("sample", demo_run / "run", "--prompt", "import os\n", "--prompt", "class A:\n", "--max-new-tokens", 5)
    assert result.output.count("[greedy]") == 2 and result.output.count("[sampled, T=0.8, top-k 50]") == 2
    assert "----- prompt 'import os\\n'" in result.output


def test_plot_writes_a_png_of_the_run(demo_run, tmp_path):
    result = run("plot", demo_run / "run", "--out", tmp_path / "curves.png")
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert str(tmp_path / "curves.png") in result.output


def test_plot_draws_a_run_whose_step_had_no_mtp_loss(demo_run, tmp_path):
    """A step whose micro-batches were all too short for MTP (or a model without it) logs no mtp_loss."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = (demo_run / "run" / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(records + '{"step": 999, "loss": 3, "lr": 0.001}\n')
    result = CliRunner().invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert (run_dir / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_draws_every_split_of_a_mixture_a_resume_added_to(demo_run, tmp_path, monkeypatch):
    """A run resumed with a mixture of more splits (a last phase on other data) logs them from its resume on."""
    import seekstack.train.plot as plot

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = (demo_run / "run" / "metrics.jsonl").read_text()
    added = '{"step": 5, "loss": 3, "lr": 0.001, "mix": {"train_easy": 0.5, "train_extra": 0.5}}\n'
    (run_dir / "metrics.jsonl").write_text(records + added)
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(run_dir)
    mixture_panel = drawn[0].axes[4]
    assert mixture_panel.get_title() == "mixture weight"
    labels = [line.get_label() for line in mixture_panel.get_lines()]
    assert labels == ["train_easy", "train_medium", "train_hard", "train_extra"]
    assert list(mixture_panel.get_lines()[3].get_ydata()) == [0.0] * 4 + [0.5]


def test_plot_draws_a_run_of_one_step_as_points_that_show_whole(tmp_path, monkeypatch):
    """A line through one point draws nothing: a run stopped after its first step had empty panels."""
    import seekstack.train.plot as plot

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.2, "lm_loss": 3.0, "lr": 0.001}\n')
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(tmp_path)
    loss_panel, _, lr_panel, _ = drawn[0].axes
    curves = loss_panel.get_lines() + lr_panel.get_lines()
    assert len(curves) == 3 and all(curve.get_marker() == "o" for curve in curves)
    assert loss_panel.get_xlim()[1] > 1  # the point is not cut in half by the panel's edge


def test_plot_draws_a_distillations_divergence_and_feature_distance_in_the_loss_panel(tmp_path, monkeypatch):
    """`seekstack distill` logs each step's divergence (T^2 JSD_beta) and feature_distance beside lm_loss, which the
    loss adds up, but the loss panel drew the total and the next-token loss alone."""
    import seekstack.train.plot as plot

    lines = [
        {
            "step": s,
            "loss": 3.0 / s,
            "lm_loss": 2.0 / s,
            "divergence": 1.5 / s,
            "feature_distance": 0.25 / s,
            "lr": 1e-3,
        }
        for s in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(tmp_path)
    curves = {line.get_label(): list(line.get_ydata()) for line in drawn[0].axes[0].get_lines()}
    assert curves["divergence"] == [1.5, 0.75, 0.5] and curves["feature distance"] == [0.25, 0.125, 0.25 / 3]


def test_plot_of_several_runs_overlays_them_one_colour_each(demo_run, tmp_path, monkeypatch):
    """As wandb compares runs: `plot RUN RUN` drew nothing but a usage error ('Got unexpected extra argument')."""
    import seekstack.train.plot as plot

    longer = tmp_path / "longer"
    longer.mkdir()
    records = (demo_run / "run" / "metrics.jsonl").read_text()
    (longer / "metrics.jsonl").write_text(records + '{"step": 6, "loss": 3.5, "lm_loss": 3.0, "lr": 0.001}\n')
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    result = run("plot", demo_run / "run", longer, "--out", tmp_path / "both.png")
    assert str(tmp_path / "both.png") in result.output
    assert (tmp_path / "both.png").read_bytes().startswith(PNG_SIGNATURE)
    loss, bpb, lr, maxvio = drawn[0].axes
    assert [line.get_label() for line in loss.get_lines()] == [
        "run",
        "run (validation)",
        "longer",
        "longer (validation)",
    ]
    assert [line.get_label() for line in bpb.get_lines()] == ["run", "longer"]
    assert list(lr.get_lines()[1].get_xdata()) == [1, 2, 3, 4, 6]
    assert [line.get_color() for line in maxvio.get_lines()] == ["C0", "C1"]
    assert loss.get_lines()[0].get_color() == loss.get_lines()[1].get_color() == "C0"
    refused = CliRunner().invoke(app, ["plot", str(longer), str(tmp_path / ".." / tmp_path.name / "longer")])
    assert refused.exit_code == 1 and "is given twice" in refused.output


def test_runs_given_as_dot_from_inside_one_are_named_by_their_folders(tmp_path, monkeypatch):
    """`seekstack plot . ../b` from inside run a named it by Path('.').name, '': its curves had no legend entry and
    the figure's title read ', b'. The root, which has no folder name, is named by its anchor, as read_text_folder
    names a corpus source."""
    import seekstack.train.plot as plot

    records = [{"step": 1, "loss": 3.2, "lm_loss": 3.0, "lr": 0.001}]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_runs([Path("."), Path("../b")], tmp_path / "both.png", [records, records])
    assert plot.run_names([Path("."), Path("../b"), Path("..")]) == ["a", "b", tmp_path.name]
    assert plot.run_names([Path("/"), Path("../b")]) == ["/", "b"]
    assert [line.get_label() for line in drawn[0].axes[2].get_lines()] == ["a", "b"]
    assert drawn[0].get_suptitle() == "a, b"


def test_plot_refuses_to_overlay_an_rl_run_with_others(demo_run, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.0, "reward": 0.5, "lr": 0.001}\n')
    result = CliRunner().invoke(app, ["plot", str(demo_run / "run"), str(tmp_path)])
    assert result.exit_code == 1 and f"{tmp_path} is a `seekstack rl` run" in " ".join(result.output.split())


def test_plot_refuses_the_tokens_axis_for_an_rl_run_which_it_draws_by_step(tmp_path):
    """rl runs are drawn as rl-plot draws them, by step: --x-axis tokens was left unheeded, the figure written."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.0, "reward": 0.5, "lr": 0.001}\n')
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--x-axis", "tokens"])
    assert result.exit_code == 1
    assert " ".join(result.output.split()) == (
        f"error: --x-axis tokens: {tmp_path} is a `seekstack rl` run, whose curves are drawn by step (as rl-plot "
        "draws them); plot it without --x-axis"
    )
    assert not (tmp_path / "rl_curves.png").exists()


def test_plot_smooth_averages_the_training_curves_over_windows_of_steps(tmp_path, monkeypatch):
    """As TensorBoard smooths and rl-plot's --smooth: a long run's per-step loss is too noisy to read a trend off."""
    import seekstack.train.plot as plot

    lines = [
        {"step": s, "loss": loss, "lm_loss": loss - 0.5, "lr": 1e-3, "maxvio_per_layer": {"1": s / 10}}
        for s, loss in zip((1, 2, 3, 4), (4.0, 3.0, 2.0, 1.0), strict=True)
    ] + [{"step": 4, "val_loss": 1.2, "val_bpb": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    run("plot", tmp_path, "--smooth", 2)
    loss_panel, _, lr_panel, maxvio_panel = drawn[0].axes
    total, next_token, validation = loss_panel.get_lines()
    assert list(total.get_xdata()) == [2, 4] and list(total.get_ydata()) == [3.5, 1.5]
    assert list(next_token.get_ydata()) == [3.0, 1.0] and list(validation.get_ydata()) == [1.2]  # evaluations as logged
    assert list(maxvio_panel.get_lines()[0].get_ydata()) == pytest.approx([0.15, 0.35])
    assert len(lr_panel.get_lines()[0].get_xdata()) == 4  # the learning rate as logged
    assert loss_panel.get_title() == "loss (nats per token), means of 2 steps"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_bytes((tmp_path / "metrics.jsonl").read_bytes())
    run("plot", tmp_path, tmp_path / "other", "--smooth", 2, "--out", tmp_path / "both.png")
    assert [list(line.get_ydata()) for line in drawn[1].axes[0].get_lines()] == [[3.0, 1.0], [1.2]] * 2


def test_plot_x_axis_tokens_draws_runs_of_other_batch_sizes_by_the_tokens_they_trained(tmp_path, monkeypatch):
    """On the step axis a run of twice the batch looks as if it learned twice as fast per token; wandb compares them
    by tokens."""
    import seekstack.train.plot as plot

    for name, tokens in (("small", 100), ("large", 200)):
        lines = [{"step": s, "loss": 3.0, "lm_loss": 2.0, "lr": 1e-3, "tokens_per_s": tokens / 0.5, "step_s": 0.5}
                 for s in (1, 2, 3)] + [{"step": 2, "val_loss": 2.5, "val_bpb": 1.0}]  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    run("plot", tmp_path / "small", tmp_path / "large", "--x-axis", "tokens", "--out", tmp_path / "both.png")
    small, small_val, large, large_val = drawn[0].axes[0].get_lines()
    assert list(small.get_xdata()) == [100, 200, 300] and list(large.get_xdata()) == [200, 400, 600]
    assert list(small_val.get_xdata()) == [200] and list(large_val.get_xdata()) == [400]
    assert drawn[0].axes[0].get_xlabel() == "tokens trained"
    (tmp_path / "large" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "lr": 0.001}\n')
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "large"), "--x-axis", "tokens"])
    assert result.exit_code == 1 and "step 1 has no number 'tokens_per_s'" in result.output


def test_plot_x_axis_tokens_refuses_a_log_missing_steps_whose_tokens_it_would_leave_out(tmp_path):
    """A run resumed from another run's checkpoint into a new out_dir logs only its own steps (3-4 here): its tokens
    axis started from 0 at step 3, each point drawn short of the tokens trained by steps 1-2, beside a run that logged
    them all."""
    lines = [{"step": s, "loss": 3.0, "lr": 1e-3, "tokens_per_s": 200.0, "step_s": 0.5} for s in (3, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--x-axis", "tokens"])
    assert result.exit_code == 1 and result.output == (
        f"error: {tmp_path / 'metrics.jsonl'}: --x-axis tokens counts the tokens trained from step 1, and it holds no "
        "record of steps 1-2, 5 (a run resumed from another run's checkpoint logs only its own steps); plot it by "
        "step\n"
    )
    assert not (tmp_path / "curves.png").exists()
    run("plot", tmp_path)  # by step, as asked
    assert (tmp_path / "curves.png").is_file()


@pytest.mark.parametrize(
    ("saved", "said"),
    [
        ('{"model": "tiny",', "not valid JSON (Expecting property name enclosed in double quotes: line 2 column 1 "
         "(char 18)); the file is truncated or damaged:"),
        ('["x"]', 'holds ["x"], not a JSON object;'),
        ('{"model": "huge"}', "field 'model' is \"huge\", no preset of this seekstack (deepseek-v2-lite, deepseek-v3, "
         "small, tiny);"),
        ('{"model": ["tiny"]}', "field 'model' is [\"tiny\"], no preset of this seekstack (deepseek-v2-lite, "
         "deepseek-v3, small, tiny);"),
        ('{"model": "tiny", "model_overrides": [1]}', "field 'model_overrides' is [1], not an object;"),
        ('{"model": "tiny", "model_overrides": {"hidden_size": "x"}}', "field 'model_overrides': preset 'tiny': field "
         "'hidden_size' has value 'x': input should be a valid integer;"),
    ],
)  # fmt: skip
def test_plot_of_a_run_whose_train_config_is_damaged_names_the_file(tmp_path, saved, said):
    """`seekstack plot RUN` said "error: Expecting property name enclosed in double quotes: line 2 column 1 (char
    18)", naming no file, of a train_config.json cut short, and ended in an AttributeError traceback of one holding
    a list, where report names the file and what to do. Of one naming a preset this seekstack has not, it said
    "error: unknown preset 'huge'; choose one of [...]" naming neither the file nor the field (a list: a TypeError
    traceback; model_overrides that are no object too)."""
    line = {"step": 1, "loss": 3.0, "lr": 1e-3}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    (tmp_path / "train_config.json").write_text(saved + "\n")
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and result.output == (
        f"error: {tmp_path / 'train_config.json'}: {said} restore it, or delete it to plot without the run's settings\n"
    )
    assert not (tmp_path / "curves.png").exists()


def test_plot_labels_the_mtp_block_of_a_run_started_from_a_checkpoint_by_that_models_layers(
    demo_run, tmp_path, monkeypatch
):
    """An sft run from the demo's 2-layer model, whose config keeps the default preset (tiny: 4 layers), labelled its
    MTP block, layer 2, as a main-model layer."""
    import seekstack.train.plot as plot

    start = demo_run / "run" / "checkpoints" / "step_4"
    (tmp_path / "train_config.json").write_text(json.dumps({"model": "tiny", "init_from": str(start)}))
    line = {"step": 1, "loss": 3.0, "lr": 1e-3, "maxvio_per_layer": {"1": 0.5, "2": 0.25}}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(tmp_path)
    assert [curve.get_label() for curve in drawn[0].axes[3].get_lines()] == ["layer 1", "layer 2 (MTP)"]


def test_plot_names_the_run_without_metrics(tmp_path):
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and f"no metrics.jsonl in {tmp_path}" in result.output


@pytest.mark.parametrize("command", ["plot", "report"])
def test_plot_and_report_of_a_run_that_has_logged_no_step_yet_say_so(demo_run, tmp_path, command):
    """They asked whether the run's folder was the out_dir of a `seekstack train` run, which it is."""
    (tmp_path / "train_config.json").write_bytes((demo_run / "run" / "train_config.json").read_bytes())
    result = CliRunner().invoke(app, [command, str(tmp_path)])
    assert result.exit_code == 1 and "the run has logged no step yet" in result.output
    assert "is it the out_dir" not in result.output


def test_plot_refuses_an_output_that_is_not_a_png_and_leaves_it_alone(demo_run):
    metrics = (demo_run / "run" / "metrics.jsonl").read_bytes()
    result = CliRunner().invoke(app, ["plot", str(demo_run / "run"), "--out", str(demo_run / "run" / "metrics.jsonl")])
    assert result.exit_code == 1 and "a plot is written as a .png, .svg or .pdf file" in result.output
    assert (demo_run / "run" / "metrics.jsonl").read_bytes() == metrics
    folder = CliRunner().invoke(app, ["plot", str(demo_run / "run"), "--out", str(demo_run)])  # it said 'e.g. DIR.png'
    assert folder.exit_code == 1 and f"(e.g. {demo_run / 'curves.png'})" in " ".join(folder.output.split())


@pytest.mark.parametrize(("suffix", "signature"), [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".PNG", PNG_SIGNATURE)])
def test_plot_writes_the_format_its_out_names_as_matplotlib_does(tmp_path, suffix, signature):
    """`--out curves.svg` (a vector figure for a paper) was refused: 'a plot is written as a .png file'."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.2, "lm_loss": 3.0, "lr": 0.001}\n')
    out = tmp_path / f"curves{suffix}"
    result = CliRunner().invoke(app, ["plot", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(signature)


def test_plot_reads_a_run_stopped_while_writing_its_last_metrics_line(demo_run, tmp_path, capsys):
    torn = tmp_path / "run"
    torn.mkdir()
    records = (demo_run / "run" / "metrics.jsonl").read_bytes()
    (torn / "metrics.jsonl").write_bytes(records[:-20])
    assert len(read_metrics(torn)) == records.count(b"\n") - 1
    assert re.search(r"^warning: .*metrics\.jsonl:\d+: dropped the last line, cut short", capsys.readouterr().err)
    (torn / "metrics.jsonl").write_bytes(b'{"step": 1, "lo\n' + records)  # a damaged line before others: an error
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not valid JSON"):
        read_metrics(torn)


@pytest.mark.parametrize(
    ("line", "fault"),
    [('{"loss": 3}', "not a metrics record"), ("[1, 2]", "not a metrics record"),
     ('{"step": "7", "loss": 1}', "not a metrics record"),
     ('{"step": 999, "loss": 3, "mtp_loss": null}', "step 999 has no number 'mtp_loss'"),
     ('{"step": 999, "val_loss": "x", "val_bpb": 1}', "step 999 has no number 'val_loss'")],
)  # fmt: skip
def test_plot_names_a_metrics_line_that_is_json_but_no_record(demo_run, tmp_path, line, fault):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = (demo_run / "run" / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(records + line + "\n")
    result = CliRunner().invoke(app, ["plot", str(run_dir)])
    assert result.exit_code == 1 and "metrics.jsonl" in result.output and fault in result.output
    if "not a metrics record" in fault:
        assert f"metrics.jsonl:{records.count(chr(10)) + 1}:" in result.output


def test_a_step_logged_twice_is_drawn_and_read_once_from_its_last_record(tmp_path, monkeypatch):
    """A metrics.jsonl whose steps 3-4 were logged again (a resume by a seekstack that kept the steps logged past its
    checkpoint, or logs joined by hand) drew them twice, the curve going back from step 4 to 3, and the report
    counted them and listed step 4's evaluation twice: each step's last record, and its evaluation's, is the one."""
    import seekstack.train.plot as plot

    first = [{"step": step, "loss": 4.0 - step / 10, "lm_loss": 4.0 - step / 10, "lr": 1e-3} for step in (1, 2, 3, 4)]
    again = [{"step": step, "loss": 3.0 - step / 10, "lm_loss": 3.0 - step / 10, "lr": 1e-3} for step in (3, 4)]
    evals = [{"step": 4, "val_loss": 3.5, "val_bpb": 1.5}, {"step": 4, "val_loss": 2.5, "val_bpb": 1.1}]
    records = [*first, evals[0], *again, evals[1]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert plot.read_metrics(tmp_path) == [first[0], first[1], *again, evals[1]]
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(tmp_path)
    loss, validation = drawn[0].axes[0].get_lines()[0], drawn[0].axes[0].get_lines()[2]
    assert list(loss.get_xdata()) == [1, 2, 3, 4] and list(loss.get_ydata()) == pytest.approx([3.9, 3.8, 2.7, 2.6])
    assert list(validation.get_xdata()) == [4] and list(validation.get_ydata()) == [2.5]


def test_a_log_resumed_from_an_earlier_step_drops_the_steps_logged_past_it_as_resume_does(tmp_path, monkeypatch):
    """Steps 1-5 logged, then 3-4 again (a resume from step 2's checkpoint by a seekstack that kept the lines past
    it): keeping each step's last record left the old step 5 before the new 3, the curve running back from 5 to 3;
    the log is replayed as `--resume` keeps it, so the new step 3 drops the old 3-5 and their evaluation."""
    import seekstack.train.plot as plot

    first = [{"step": step, "loss": 4.0 - step / 10, "lm_loss": 4.0 - step / 10, "lr": 1e-3} for step in range(1, 6)]
    again = [{"step": step, "loss": 3.0 - step / 10, "lm_loss": 3.0 - step / 10, "lr": 1e-3} for step in (3, 4)]
    evaluation = {"step": 4, "val_loss": 3.5, "val_bpb": 1.5}
    records = [*first[:4], evaluation, first[4], *again]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert plot.read_metrics(tmp_path) == [first[0], first[1], *again]
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)
    plot.plot_run(tmp_path)
    loss = drawn[0].axes[0].get_lines()[0]
    assert list(loss.get_xdata()) == [1, 2, 3, 4] and list(loss.get_ydata()) == pytest.approx([3.9, 3.8, 2.7, 2.6])
