"""The command line: `lora train`, `lora merge`, and `generate --adapter` giving what the merged checkpoint gives."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from seekstack.cli import app
from seekstack.train.runs import list_checkpoints
from tests.adapters.support import write_base, write_random_adapter

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout  # stderr carries notes (the dtype chosen)


def test_lora_train_help_names_every_chat_form_it_reads():
    """DATA's help named .jsonl of messages and of prompt-completion alone, not the from/value conversations (read
    since ee0539c) nor a compressed file, nor that conversations are held out as text is."""
    said = " ".join(invoke("lora", "train", "--help").split())
    assert 'TRL\'s from/value {"conversations"}; or .json of JSON Lines' in said
    assert ".gz, .bz2, .xz or .zst of either too" in said
    assert "5% of them held out for val_loss while eval_every > 0" in said
    assert 'or TRL\'s {"prompt", "completion"} of text, read alike with no chat template, the loss on the' in said


def test_lora_train_help_gives_the_training_defaults_a_lora_run_sets_apart_from_trains():
    """OVERRIDES' help sent a user to `seekstack train --help` for the training keys, whose defaults (betas
    [0.9, 0.95], lr, warmup_steps, ...) a LoRA run does not train with (LORA_DEFAULTS), and said none of its own."""
    from seekstack.adapters.config import LORA_DEFAULTS

    said = " ".join(invoke("lora", "train", "--help").split())
    assert "Training keys a LoRA run sets apart from `seekstack train`'s defaults: " + " ".join(LORA_DEFAULTS) in said
    assert "betas=[0.5,0.95]" in said


def test_train_merge_and_generate_with_the_adapter(tmp_path):
    base = write_base(tmp_path / "base", with_tokenizer=True)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, count in (("train", 40), ("val", 2)):
        lines = (json.dumps({"text": f"def f{number}(x):\n    return x + {number}\n" * 4}) for number in range(count))
        (corpus / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    invoke("data", "tokenize", "--corpus", str(corpus), "--tokenizer", str(base), "--out", str(tmp_path / "data"))
    adapter = tmp_path / "adapter"
    run = ["seq_len=32", "batch_size=2", "max_steps=2", "eval_every=0", "lr=5e-2", "lora.rank=2", "lora.alpha=8"]
    invoke("lora", "train", str(base), str(tmp_path / "data"), *run, "--out", str(adapter))
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 2
    assert [path.name for path in list_checkpoints(adapter)] == ["step_2"]
    invoke("lora", "merge", str(base), str(adapter), "--out", str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    def greedy(*model: str) -> list[int]:
        output = invoke("generate", *model, "def f(", "--temperature", "0", "--max-new-tokens", "6", "--json")
        return json.loads(output)["token_ids"]

    assert greedy("--model", str(base), "--adapter", str(adapter)) == greedy("--model", str(tmp_path / "merged"))


def test_merge_interrupted_before_the_tokenizer_is_copied_leaves_no_folder_and_says_so(base, tmp_path, monkeypatch):
    """Ctrl-C after the merged weights were saved and before the tokenizer was copied in left a folder that loads as
    a model with no tokenizer, and `lora merge` ended with exit 130 and no word."""
    adapter = write_random_adapter(base, tmp_path / "adapter", seed=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("seekstack.train.state.copy_model_folder_file", interrupted)
    result = runner.invoke(app, ["lora", "merge", str(base), str(adapter), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 130
    assert result.stderr == f"error: interrupted (Ctrl-C): nothing was written to {tmp_path / 'merged'}\n"
    assert not (tmp_path / "merged").exists()


def test_a_malformed_adapter_option_is_explained(tmp_path):
    result = runner.invoke(app, ["serve", "--model", str(tmp_path), "--adapter", "legal"])
    assert result.exit_code == 1 and "expected NAME=DIR" in result.output


def test_generate_tells_an_adapter_that_cannot_load_before_reading_the_bases_weights(base, tmp_path):
    """A mistyped --adapter folder, a file, or another base's adapter is told at once, not after minutes of reading a
    large base's weights: here the weights cannot be read at all, and the adapter is what the error names."""
    wider = tmp_path / "wider"  # what the adapter does not fit: a base of another width, its weights damaged
    shutil.copytree(base, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "hidden_size": 2 * config["hidden_size"]}))
    (wider / "model.safetensors").write_bytes(b"not weights")
    adapter = write_random_adapter(base, tmp_path / "adapter", seed=1)
    (tmp_path / "notes.txt").write_text("a file")
    for folder, told in (
        (tmp_path / "mistyped", f"{tmp_path / 'mistyped'} does not exist; give an adapter folder"),
        (tmp_path / "notes.txt", f"{tmp_path / 'notes.txt'} is a file, not an adapter folder"),
        (adapter, "the adapter was trained on another base"),
    ):
        result = runner.invoke(app, ["generate", "--model", str(wider), "--adapter", str(folder), "hi"])
        assert result.exit_code == 1 and told in " ".join(result.output.split()), result.output


def test_lora_train_resumes_from_a_step_or_its_folder_as_the_other_stages_do(tmp_path):
    """`lora train` had --resume alone (No such option: --resume-from), where train, sft, rl and distill take a step
    or a checkpoint folder; a folder of another run is refused, its adapter settings being in that run's folder."""
    from tests.train.test_trainer import write_split

    base, data, out = write_base(tmp_path / "base"), tmp_path / "shards", tmp_path / "adapter"
    write_split(data, "train", 8_000, seed=1)
    write_split(data, "val", 1_000, seed=2)
    run = ["seq_len=32", "batch_size=4", "max_steps=6", "save_every=3", "eval_every=0", "lora.rank=2"]
    invoke("lora", "train", str(base), str(data), *run, "--out", str(out))
    whole = (out / "metrics.jsonl").read_text().splitlines()
    for given in ("3", "step_3", str(out / "checkpoints" / "step_3")):
        result = runner.invoke(app, ["lora", "train", "--out", str(out), "--resume-from", given])
        assert result.exit_code == 0, result.output
        assert f"resumed from step 3 ({out / 'checkpoints' / 'step_3'})" in result.output
        assert "trained to step 6" in result.stdout
        resumed = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["loss"] for line in resumed] == [json.loads(line)["loss"] for line in whole]
    other = tmp_path / "other"
    shutil.copytree(out, other)
    result = runner.invoke(
        app, ["lora", "train", "--out", str(out), "--resume-from", str(other / "checkpoints" / "step_3")]
    )
    assert result.exit_code == 1, result.output
    assert f"{out} holds another run (its train_config.json): going on from it there would trim" in " ".join(
        result.output.split()
    )  # as `seekstack train` refuses it (was "--out ... holds a run, which `lora train` continues ...", its own copy)
    both = runner.invoke(app, ["lora", "train", "--out", str(out), "--resume", "--resume-from", "3"])
    assert both.exit_code == 2 and "--resume and --resume-from 3 both given" in " ".join(both.output.split())


def test_lora_train_refuses_a_resume_with_no_checkpoint_to_go_on_from_before_its_warnings(tmp_path):
    """'warning: resuming with max_steps=8 (the run last ran with 6)' was told before the refusal of that resume
    ('step_9: no such folder'), as `seekstack train` told it."""
    from tests.train.test_trainer import write_split

    base, data, out = write_base(tmp_path / "base"), tmp_path / "shards", tmp_path / "adapter"
    write_split(data, "train", 8_000, seed=1)
    write_split(data, "val", 1_000, seed=2)
    run = ["seq_len=32", "batch_size=4", "max_steps=6", "save_every=3", "eval_every=0", "lora.rank=2"]
    invoke("lora", "train", str(base), str(data), *run, "--out", str(out))
    refused = runner.invoke(app, ["lora", "train", "--out", str(out), "max_steps=8", "--resume-from", "9"])
    assert refused.exit_code == 1
    assert refused.output.startswith(f"error: {out / 'checkpoints' / 'step_9'}: no such folder; the run {out} holds")
    assert "warning" not in refused.output, refused.output
    resumed = runner.invoke(app, ["lora", "train", "--out", str(out), "max_steps=8", "--resume-from", "6"])
    assert resumed.exit_code == 0, resumed.output  # a resume that goes ahead is told its warnings
    assert resumed.output.startswith("warning: resuming with max_steps=8 (the run last ran with 6)\n")


def test_lora_train_continues_another_runs_checkpoint_into_a_new_out_as_train_does(tmp_path):
    """`lora train --resume-from OTHER/checkpoints/step_3 --out NEW` was refused ("continues the run in --out NEW from
    one of its own checkpoints"), where `seekstack train` and HF's resume_from_checkpoint continue another run's
    checkpoint into a new output folder: the new run takes that run's adapter and training settings."""
    from tests.train.test_trainer import write_split

    base, data, out, new = write_base(tmp_path / "base"), tmp_path / "shards", tmp_path / "adapter", tmp_path / "new"
    write_split(data, "train", 8_000, seed=1)
    write_split(data, "val", 1_000, seed=2)
    run = ["seq_len=32", "batch_size=4", "max_steps=6", "save_every=3", "eval_every=0", "lora.rank=2"]
    invoke("lora", "train", str(base), str(data), *run, "--out", str(out))
    result = runner.invoke(
        app, ["lora", "train", "--out", str(new), "--resume-from", str(out / "checkpoints" / "step_3")]
    )
    assert result.exit_code == 0, result.output
    assert f"resumed from step 3 ({out / 'checkpoints' / 'step_3'})" in result.output
    assert "trained to step 6" in result.stdout
    whole = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    continued = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in continued] == [(m["step"], m["loss"]) for m in whole if m["step"] > 3]
    assert json.loads((new / "lora_config.json").read_text()) == json.loads((out / "lora_config.json").read_text())
    assert (new / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    again = runner.invoke(app, ["lora", "train", "--out", str(new), "--resume", "max_steps=7"])  # a run of its own
    assert again.exit_code == 0 and "trained to step 7" in again.stdout, again.output
    model = runner.invoke(app, ["lora", "train", "--out", str(tmp_path / "none"), "--resume-from", str(base)])
    assert model.exit_code == 1 and f"--resume-from {base}: no checkpoint of a `lora train` run" in " ".join(
        model.output.split()
    )
    assert not (tmp_path / "none").exists()
    said = " ".join(invoke("lora", "train", "--help").split())
    assert "or this checkpoint folder (another run's: continued in an --out holding no run yet)" in said


def test_lora_train_tells_overrides_from_paths_as_train_does(tmp_path, monkeypatch):
    """A misspelt key (max-steps=3) was taken for a path ('neither BASE nor DATA'), an existing path holding '=' in
    the working directory for an override; `seekstack train`'s rule (is_override) tells them apart."""
    from seekstack.cli.adapters import _paths_and_overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards=v2").mkdir()
    assert _paths_and_overrides(["base", "shards=v2", "max-steps=3"]) == (("base", "shards=v2"), ["max-steps=3"])
    assert _paths_and_overrides(["base", "runs/lr=1e-3/data", "lora.rank=4"]) == (
        ("base", "runs/lr=1e-3/data"),
        ["lora.rank=4"],
    )
    base = write_base(tmp_path / "base")
    result = runner.invoke(app, ["lora", "train", str(base), "shards=v2", "max-steps=3", "--out", "run"])
    assert result.exit_code != 0 and "max_steps" in result.output and "neither BASE nor DATA" not in result.output
    assert not (tmp_path / "run").exists()
