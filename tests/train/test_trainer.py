"""Specifications of the training stage: configuration, schedule, the loop, checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from seekstack.checkpoint import CheckpointError
from seekstack.infer.threads import IdleCores
from seekstack.schema import ConfigError
from seekstack.tokenizer import Tokenizer, train_tokenizer
from seekstack.tokens.shards import TokenWindows, load_index, tokenize_corpus
from seekstack.train.config import TrainConfig, load_train_config
from seekstack.train.mfu import Peak
from seekstack.train.runs import RunInProgress, list_checkpoints
from seekstack.train.schedule import (
    ProgressAnchor,
    learning_rate,
    mtp_weight_at,
    resumed_lr_anchor,
    resumed_progress_anchor,
    training_progress,
)
from seekstack.train.state import read_train_state
from seekstack.train.trainer import TrainingDiverged, build_model, build_optimizer, eta_text, step_dtype, train

VOCAB = 96
MICRO_MODEL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
)  # fmt: skip


TOKENIZER = {"vocab_size": VOCAB, "sha256": "synthetic", "bos_id": 0, "eos_id": 1}  # a shard index's tokenizer


def write_split(data_dir: Path, split: str, tokens: int, seed: int, tokenizer: dict = TOKENIZER) -> None:
    """A synthetic token shard in the `tokenize_corpus` format: a noisy repeating pattern a model can learn, encoded
    (its index says) by `tokenizer`."""
    rng = np.random.default_rng(seed)
    ids = (np.arange(tokens) * 7 % VOCAB + rng.integers(0, 3, tokens)) % VOCAB
    data_dir.mkdir(parents=True, exist_ok=True)
    ids.astype("<u2").tofile(data_dir / f"{split}_00000.bin")
    index = {
        "version": 1, "split": split, "source": "synthetic", "dtype": "uint16",
        "shards": [{"file": f"{split}_00000.bin", "tokens": tokens}], "documents": 1, "total_tokens": tokens,
        "text_bytes": tokens * 4, "bos": False, "tokenizer": tokenizer,
    }  # fmt: skip
    (data_dir / f"{split}_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("shards")
    write_split(path, "train", 20_000, seed=1)
    write_split(path, "val", 2_000, seed=2)
    return path


def run_config(data_dir: Path, out_dir: Path, **changes) -> TrainConfig:
    base = dict(
        model="tiny", model_overrides=MICRO_MODEL, data_dir=str(data_dir), out_dir=str(out_dir), seq_len=32,
        batch_size=4, grad_accum_steps=2, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=3,
        eval_batches=2, save_every=3, keep_checkpoints=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes}).validate()


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------- configuration
def test_config_reads_yaml_and_toml_and_types_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.001\nmax_steps: 50\nmodel_overrides:\n  hidden_size: 64\n")
    (tmp_path / "run.toml").write_text('lr = 0.001\nmax_steps = 50\nschedule = "wsd"\n')
    from_yaml = load_train_config(tmp_path / "run.yaml", ["batch_size=8", "betas=0.8,0.9", "model.num_hidden_layers=2"])
    assert (from_yaml.lr, from_yaml.max_steps, from_yaml.batch_size) == (0.001, 50, 8)
    assert from_yaml.betas == (0.8, 0.9)
    assert from_yaml.model_overrides == {"hidden_size": 64, "num_hidden_layers": 2}
    from_toml = load_train_config(tmp_path / "run.toml", ["dtype=bfloat16", "warmup_steps=1e1"])
    assert (from_toml.schedule, from_toml.dtype, from_toml.warmup_steps) == ("wsd", "bfloat16", 10)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'learning_rate'"):
        load_train_config(None, ["learning_rate=1"])
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown field 'batchsize'"):
        load_train_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="field 'max_steps' has value 'many': input should be a valid integer"):
        load_train_config(None, ["max_steps=many"])
    with pytest.raises(ConfigError, match="field 'schedule' has value 'linear': input should be 'cosine' or 'wsd'"):
        load_train_config(None, ["schedule=linear"])
    with pytest.raises(ConfigError, match="field 'model' must be a preset, one of tiny, .*, not 'tiniy'$"):
        load_train_config(None, ["model=tiniy"])
    with pytest.raises(ConfigError, match="field 'min_lr' must be at most lr=0.003, not 0.01$"):
        load_train_config(None, ["min_lr=0.01"])
    with pytest.raises(ConfigError, match="field 'out_dir' must be a folder, not '' \\(which would be the working"):
        load_train_config(None, ["out_dir="])  # out_dir=$OUT with OUT unset: the run went into the working folder
    with pytest.raises(ConfigError, match="field 'data_dir' must be a folder of token shards, not '' \\(which would"):
        load_train_config(None, ["data_dir="])  # it said 'no shard index at train_index.json', naming no key


# ---------------------------------------------------------------------------------- schedule
def test_cosine_schedule_warms_up_then_decays_to_min_lr_at_the_last_step():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=105)
    assert [learning_rate(s, config) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert learning_rate(54, config) == pytest.approx(0.55)  # half way: min + (max - min) / 2
    assert learning_rate(104, config) == pytest.approx(0.1)  # the last step trains at min_lr
    rates = [learning_rate(s, config) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))
    short = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=6)  # ended at 6.95e-4
    assert learning_rate(5, short) == pytest.approx(3e-4)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_a_one_or_two_step_run_trains_its_first_step_at_lr_and_a_second_at_min_lr(schedule, warmup_steps):
    """nanoGPT's get_lr gives lr at step 0: a 1-step cosine run without warmup trained its only step at min_lr, and a
    wsd run decaying over all its steps (wsd_decay_fraction=1) did so too and began a 2-step run at 0.55, not lr."""
    for max_steps, expected in ((1, [1.0]), (2, [1.0, 0.1])):
        config = TrainConfig(
            lr=1.0,
            min_lr=0.1,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            schedule=schedule,
            wsd_decay_fraction=1.0,
        )
        assert [learning_rate(step, config) for step in range(max_steps)] == pytest.approx(expected)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_run_resumed_with_more_steps_decays_on_from_its_rate_to_min_lr_at_the_new_last_step(schedule):
    """Stopped at step 5 of 10 and given 20: the decay goes on from step 5's rate and ends at min_lr on step 19 (it
    ended at 9.75e-4, short of min_lr); a finished run, whose last step trained at min_lr, stays there."""
    old = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1, max_steps=10, schedule=schedule, wsd_decay_fraction=0.8)
    longer = dataclasses.replace(old, max_steps=20)
    anchor = resumed_lr_anchor({"step": 5, "config": dataclasses.asdict(old)}, longer)
    rates = [learning_rate(step, longer, anchor) for step in range(5, 20)]
    assert rates[0] == pytest.approx(learning_rate(5, old)) and rates[0] > 2 * old.min_lr
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == pytest.approx(old.min_lr)
    assert learning_rate(9, old) == pytest.approx(old.min_lr)
    finished = resumed_lr_anchor({"step": 10, "config": dataclasses.asdict(old)}, longer)
    assert [learning_rate(step, longer, finished) for step in (10, 19)] == pytest.approx([old.min_lr] * 2)


def test_a_run_resumed_with_more_steps_and_another_lr_decays_from_the_rate_that_lr_gives_its_step():
    """Stopped at step 5 of 10 (lr 1.0) and given 20 steps and lr 5.0: the decay starts at 3.1, step 5's rate under
    lr 5.0 (it went on from 0.65, the old lr's, as if lr had not been given), as a later resume with lr 2.0 keeps
    its place between min_lr and lr; a wsd run on its plateau holds the new lr (it decayed from 1.0 at once)."""
    old = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10)
    longer = dataclasses.replace(old, max_steps=20, lr=5.0)
    anchor = resumed_lr_anchor({"step": 5, "config": dataclasses.asdict(old)}, longer)
    assert learning_rate(5, longer, anchor) == pytest.approx(learning_rate(5, dataclasses.replace(old, lr=5.0)))
    assert learning_rate(19, longer, anchor) == pytest.approx(0.1)
    saved = {"step": 8, "config": dataclasses.asdict(longer), "lr_anchor": dataclasses.asdict(anchor)}
    lower = dataclasses.replace(longer, lr=2.0)
    share = (learning_rate(8, longer, anchor) - 0.1) / (5.0 - 0.1)
    assert learning_rate(8, lower, resumed_lr_anchor(saved, lower)) == pytest.approx(0.1 + share * (2.0 - 0.1))
    wsd = dataclasses.replace(old, schedule="wsd")
    wsd_longer = dataclasses.replace(wsd, max_steps=20, lr=5.0)
    plateau = resumed_lr_anchor({"step": 5, "config": dataclasses.asdict(wsd)}, wsd_longer)
    assert [learning_rate(step, wsd_longer, plateau) for step in (5, 15)] == [5.0, 5.0]


def test_a_finished_run_still_warming_up_goes_on_from_its_last_steps_rate_when_given_more_steps():
    """Warmup 12 of 10 steps ended at 10/12 of lr (step 9); resumed with 20 steps and warmup 4, step 10 decays from
    there, not from the 11/12 its schedule would give a step it never had."""
    old = TrainConfig(lr=1.2, min_lr=0.1, warmup_steps=12, max_steps=10)
    longer = dataclasses.replace(old, warmup_steps=4, max_steps=20)
    anchor = resumed_lr_anchor({"step": 10, "config": dataclasses.asdict(old)}, longer)
    assert learning_rate(10, longer, anchor) == pytest.approx(1.0)


def test_a_warmup_as_long_as_the_run_is_told_it_never_reaches_the_peak(data_dir, tmp_path, capsys):
    train(run_config(data_dir, tmp_path, max_steps=2, warmup_steps=10, eval_every=0, save_every=0))
    said = capsys.readouterr().err
    assert "warning: warmup_steps=10 is not below max_steps=2: the learning rate rises for the whole run" in said
    assert "ends at 0.0006, short of lr=0.003" in said
    train(run_config(data_dir, tmp_path / "fits", max_steps=2, warmup_steps=1, eval_every=0, save_every=0))
    assert "warmup_steps" not in capsys.readouterr().err


def test_a_warmup_exactly_as_long_as_the_run_is_told_it_reaches_the_peak_but_never_decays(data_dir, tmp_path, capsys):
    train(run_config(data_dir, tmp_path, max_steps=2, warmup_steps=2, eval_every=0, save_every=0))
    said = capsys.readouterr().err
    assert "reaches lr=0.003 at the last step, never decaying to min_lr=0.0003; lower warmup_steps to decay it" in said
    assert "short of" not in said  # was: "ends at 0.003, short of lr=0.003"


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    config = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=2, max_steps=100, schedule="wsd", wsd_decay_fraction=0.1)
    assert learning_rate(1, config) == 1.0 and learning_rate(89, config) == 1.0
    assert learning_rate(90, config) == pytest.approx(0.9)
    assert learning_rate(99, config) == pytest.approx(0.0)


def test_a_wsd_decay_fraction_of_0_holds_the_peak_to_the_end_and_a_longer_run_decays_from_it():
    """It decayed one step all the same, the last: a run ended at min_lr, and resumed with more steps held min_lr."""
    stable = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=10, schedule="wsd", wsd_decay_fraction=0.0)
    assert [learning_rate(step, stable) for step in range(1, 10)] == [1.0] * 9
    longer = dataclasses.replace(stable, max_steps=20, wsd_decay_fraction=0.5)  # a decay phase after it
    anchor = resumed_lr_anchor({"step": 10, "config": dataclasses.asdict(stable)}, longer)
    assert [learning_rate(step, longer, anchor) for step in (10, 19)] == pytest.approx([0.91, 0.1])


def test_a_wsd_decay_longer_than_the_steps_after_warmup_starts_at_the_peak_when_warmup_ends():
    """Warmup 5 of 10 steps and a decay fraction of 0.8: the decay takes the 5 steps after warmup (the rate went from
    1.0 at step 4 to 0.5 at step 5, its first 3 steps spent inside the warmup)."""
    config = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=5, max_steps=10, schedule="wsd", wsd_decay_fraction=0.8)
    rates = [learning_rate(step, config) for step in range(10)]
    assert rates == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0])


# ---------------------------------------------------------------------------------- the loop
def test_optimizer_decays_matrices_but_not_norms_or_biases(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path, weight_decay=0.05, betas=(0.8, 0.9))  # not the defaults: taken from it
    model = build_model(config, TOKENIZER)
    decay, no_decay = build_optimizer(model, config, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0 and decay["betas"] == (0.8, 0.9)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    norm_weight = model.norm.weight
    assert any(p is norm_weight for p in no_decay["params"])


def test_optimizer_updates_with_the_fused_kernel_on_a_cpu(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path)
    optimizer = build_optimizer(build_model(config, TOKENIZER), config, torch.device("cpu"))
    assert all(group["fused"] and not group["foreach"] for group in optimizer.param_groups)


def test_training_lowers_the_loss_and_logs_every_step(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path, max_steps=12, lr=1e-2, eval_every=5, save_every=0)
    result = train(config)
    assert result.step == 12 and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0] - 0.5
    metrics = read_metrics(tmp_path)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    first = steps[0]
    assert first["loss"] == pytest.approx(first["lm_loss"] + 0.3 * first["mtp_loss"], abs=1e-3)  # + balance loss
    assert first["lr"] == pytest.approx(5e-3) and first["tokens_per_s"] > 0 and first["grad_norm"] > 0
    assert set(first["maxvio_per_layer"]) == {"1", "2"}  # MoE layer 1 and the MTP block
    assert first["maxvio"] == pytest.approx(np.mean(list(first["maxvio_per_layer"].values())))
    evaluations = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evaluations] == [5, 10, 12]  # every eval_every steps and at the last, as nanochat's
    evaluation = evaluations[-1]
    assert evaluation["val_bpb"] == pytest.approx(evaluation["val_loss"] / (4 * math.log(2)))  # 4 bytes per token
    assert set(evaluation["val_maxvio_per_layer"]) == {"1", "2"}  # over all validation tokens, per MoE layer
    assert evaluation["val_maxvio"] == pytest.approx(np.mean(list(evaluation["val_maxvio_per_layer"].values())))
    assert all(0 <= v <= 4 - 1 for v in evaluation["val_maxvio_per_layer"].values())  # at most E/mean - 1 = E - 1
    saved = json.loads((tmp_path / "train_config.json").read_text())
    assert saved["max_steps"] == 12 and saved["model_overrides"]["hidden_size"] == 64
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_12"]  # the last step is always saved


def test_validation_scores_the_same_windows_however_a_steps_batch_is_split(data_dir, tmp_path):
    """eval_batches counts global batches: 8 x 1, 4 x 2 and 2 x 4 score the same 2 x 8 windows (the val_loss at
    step 6 was 7.9180 / 7.8638 / 7.9019: eval_batches micro-batches)."""
    evaluations = []
    for batch_size, grad_accum_steps in ((8, 1), (4, 2), (2, 4)):
        out_dir = tmp_path / f"{batch_size}x{grad_accum_steps}"
        train(run_config(data_dir, out_dir, batch_size=batch_size, grad_accum_steps=grad_accum_steps, max_steps=1,
                         eval_every=1, save_every=0))  # fmt: skip
        (evaluation,) = [m for m in read_metrics(out_dir) if "val_loss" in m]
        evaluations.append(evaluation)
    for name in ("val_loss", "val_bpb", "val_maxvio"):
        assert [e[name] for e in evaluations] == pytest.approx([evaluations[0][name]] * 3, rel=1e-5)


def tokenized_splits(root: Path, val: list[str] | None = None) -> Path:
    """Train and val shards of a byte-level BPE, the val text (`val`'s documents, by default one) ASCII first and then
    three-byte CJK: its first windows spell far fewer bytes per token than the split's mean."""
    texts = {
        "train": ["the cat sat on the mat. 猫坐在垫子上。" * 40],
        "val": val or ["a cat on a mat. " * 30 + "猫坐在垫子上。" * 60],
    }
    tokenizer = train_tokenizer(texts["train"], vocab_size=300, out_path=root / "tokenizer")
    for split, documents in texts.items():
        corpus = root / f"{split}.jsonl"
        corpus.write_text("".join(json.dumps({"id": str(n), "text": t}) + "\n" for n, t in enumerate(documents)))
        tokenize_corpus(corpus, tokenizer, root / "tokens", split)
    return root / "tokens"


def test_val_bpb_counts_the_bytes_the_scored_tokens_spell_or_says_it_estimates(tmp_path, capsys):
    """Exact bytes from the tokenizer the shards record (was: the val split's mean bytes per token, here ~1.9x the
    ASCII windows' bytes); a tokenizer no longer where it was recorded falls back to that estimate, with a note."""
    tokens = tokenized_splits(tmp_path)
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer")
    model = MICRO_MODEL | {"vocab_size": tokenizer.vocab_size}
    settings = dict(model_overrides=model, batch_size=2, grad_accum_steps=1, max_steps=1, eval_every=1, save_every=0)
    train(run_config(tokens, tmp_path / "exact", **settings))
    (evaluation,) = [m for m in read_metrics(tmp_path / "exact") if "val_loss" in m]
    windows = torch.cat(list(itertools.islice(TokenWindows(tokens, "val", 32).sequential(2), 2)))  # eval_batches=2
    nats = evaluation["val_loss"] * windows[:, 1:].numel()
    spelled = sum(len(tokenizer.decode(row[1:]).encode()) for row in windows.tolist())  # ASCII: no cut characters
    assert evaluation["val_bpb"] == pytest.approx(nats / (math.log(2) * spelled), rel=1e-6)
    index = load_index(tokens, "val")
    estimate = windows[:, 1:].numel() * index["text_bytes"] / index["total_tokens"]
    assert estimate > 1.5 * spelled
    assert "scored token the split's mean" not in capsys.readouterr().err

    (tmp_path / "tokenizer").rename(tmp_path / "moved")
    train(run_config(tokens, tmp_path / "estimated", **settings))
    mean = index["text_bytes"] / index["total_tokens"]
    assert capsys.readouterr().err.count(f"bits per byte count each scored token the split's mean {mean:.3f}") == 1
    (evaluation,) = [m for m in read_metrics(tmp_path / "estimated") if "val_loss" in m]
    nats = evaluation["val_loss"] * windows[:, 1:].numel()
    assert evaluation["val_bpb"] == pytest.approx(nats / (math.log(2) * estimate), rel=1e-6)


def test_val_loss_and_bpb_leave_out_the_eos_ending_each_document_as_nanochats_evaluate_bpb(tmp_path):
    """An EOS spells no bytes: its loss was summed into val_bpb, charged to the text's bytes (nanochat's evaluate_bpb
    leaves out the targets of 0 bytes)."""
    from seekstack.checkpoint import load_pretrained

    tokens = tokenized_splits(tmp_path, val=["a cat on a mat. " * 2] * 20)  # an EOS every ~10 tokens
    tokenizer = Tokenizer.from_file(tmp_path / "tokenizer")
    model = MICRO_MODEL | {"vocab_size": tokenizer.vocab_size}
    train(run_config(tokens, tmp_path / "run", model_overrides=model, batch_size=2, grad_accum_steps=1, max_steps=1,
                     eval_every=1, save_every=0, dtype="float32"))  # fmt: skip
    (evaluation,) = [m for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    windows = torch.cat(list(itertools.islice(TokenWindows(tokens, "val", 32).sequential(2), 2)))  # eval_batches=2
    targets = windows[:, 1:]
    text = targets != tokenizer.eos_id
    assert (~text).sum() >= 4
    with torch.no_grad():
        logits = load_pretrained(tmp_path / "run" / "checkpoints" / "step_1")(windows).logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    spelled = len(tokenizer.decode(targets[text].tolist()).encode())  # ASCII: no cut characters
    assert evaluation["val_loss"] == pytest.approx(losses[text].mean().item(), rel=1e-5)
    assert evaluation["val_bpb"] == pytest.approx(losses[text].sum().item() / (math.log(2) * spelled), rel=1e-5)


@pytest.mark.parametrize("tail", [13, 0])
def test_val_loss_and_bpb_score_the_tokens_after_the_last_whole_window(tmp_path, tail):
    """The 13 targets after the last whole window of 33 tokens went unscored (a val split of 5 windows + 13 tokens
    had 160 of its 173 targets scored); they are one shorter window now. A split of whole windows scores as before."""
    from seekstack.checkpoint import load_pretrained

    write_split(tmp_path / "tokens", "train", 2_000, seed=1)
    write_split(tmp_path / "tokens", "val", 5 * 32 + 1 + tail, seed=2)
    train(run_config(tmp_path / "tokens", tmp_path / "run", batch_size=2, grad_accum_steps=1, max_steps=1,
                     eval_every=1, eval_batches=10, save_every=0, dtype="float32"))  # fmt: skip
    (evaluation,) = [m for m in read_metrics(tmp_path / "run") if "val_loss" in m]
    stream = torch.from_numpy(np.fromfile(tmp_path / "tokens" / "val_00000.bin", dtype="<u2").astype(np.int64))
    model = load_pretrained(tmp_path / "run" / "checkpoints" / "step_1")
    windows = [stream[start : start + 33] for start in range(0, len(stream) - 1, 32)]  # the last: 1 + tail tokens
    with torch.no_grad():
        nats = [
            torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1].float(), w[1:], reduction="sum").item()
            for w in windows
        ]
    assert sum(len(w) - 1 for w in windows) == len(stream) - 1  # each target once
    assert evaluation["val_loss"] == pytest.approx(sum(nats) / (len(stream) - 1), rel=1e-5)
    assert evaluation["val_bpb"] == pytest.approx(sum(nats) / (math.log(2) * (len(stream) - 1) * 4), rel=1e-5)


def test_a_val_split_shorter_than_eval_batches_asks_is_said_once_naming_the_numbers(tmp_path, capsys):
    write_split(tmp_path / "tokens", "train", 2_000, seed=1)
    write_split(tmp_path / "tokens", "val", 5 * 32 + 1, seed=2)
    train(run_config(tmp_path / "tokens", tmp_path / "run", batch_size=2, grad_accum_steps=1, max_steps=2,
                     eval_every=1, eval_batches=10, save_every=0))  # fmt: skip
    assert len([m for m in read_metrics(tmp_path / "run") if "val_loss" in m]) == 2
    notes = [line for line in capsys.readouterr().err.splitlines() if "eval_batches" in line]
    assert notes == [
        "note: eval_batches=10 asks 20 validation windows of 32 tokens per evaluation (10 x batch_size 2 x "
        f"grad_accum_steps 1); the val split of {tmp_path / 'tokens'} holds 5: each evaluation scores those and the "
        "tokens after them"
    ]


def test_a_resume_on_shards_of_another_tokenizer_is_refused_naming_both(tmp_path):
    """The checkpoint's model reads ids of its tokenizer: on another's it would train on other text, and its next
    checkpoints would carry that tokenizer as theirs."""
    tokens = tokenized_splits(tmp_path / "a")
    vocab = Tokenizer.from_file(tmp_path / "a" / "tokenizer").vocab_size
    other = train_tokenizer(["a mat sat on the cat. 垫子上的猫。" * 40], vocab_size=vocab, out_path=tmp_path / "b")
    for split in ("train", "val"):
        tokenize_corpus(tmp_path / "a" / f"{split}.jsonl", other, tmp_path / "b" / "tokens", split)
    settings = dict(model_overrides=MICRO_MODEL | {"vocab_size": vocab}, batch_size=2, grad_accum_steps=1,
                    eval_every=0, save_every=1)  # fmt: skip
    train(run_config(tokens, tmp_path / "run", max_steps=1, **settings))
    newest = tmp_path / "run" / "checkpoints" / "step_1"
    with pytest.raises(ValueError, match=f"tokens was tokenized with .*, not with {newest}/tokenizer.json, the "):
        train(run_config(tmp_path / "b" / "tokens", tmp_path / "run", max_steps=2, **settings), resume=True)


def test_a_model_without_mtp_modules_logs_no_mtp_loss(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path, model_overrides=MICRO_MODEL | {"num_nextn_predict_layers": 0}, max_steps=2)
    train(dataclasses.replace(config, eval_every=0, save_every=0))
    steps = read_metrics(tmp_path)
    assert [m["step"] for m in steps] == [1, 2] and not any("mtp_loss" in m for m in steps)  # not a made-up 0.0


def test_a_run_from_a_checkpoint_trains_in_train_mode_with_its_balance_loss(data_dir, tmp_path):
    """load_pretrained gives a model in eval mode (as transformers' from_pretrained), whose MoE adds no balance loss:
    a run from a checkpoint (init_from) puts it in train mode, so its loss holds the balance loss as a fresh run's."""
    no_mtp = MICRO_MODEL | {"num_nextn_predict_layers": 0}
    train(run_config(data_dir, tmp_path / "base", model_overrides=no_mtp, max_steps=1, eval_every=0, save_every=1))
    base = tmp_path / "base" / "checkpoints" / "step_1"
    config = run_config(data_dir, tmp_path / "run", model_overrides={}, max_steps=1, eval_every=0, save_every=0)
    train(dataclasses.replace(config, model="tiny", init_from=str(base), aux_loss_alpha=0.5))
    [step] = read_metrics(tmp_path / "run")
    assert step["loss"] - step["lm_loss"] > 0.1  # the balance loss, at alpha 0.5 about 0.5 x MoE layers


def test_a_run_resumes_once_its_init_from_is_gone_and_keeps_its_sampling_in_every_checkpoint(data_dir, tmp_path):
    """A run from a checkpoint (init_from) deleted since was refused on resume ("field 'init_from' must be an existing
    checkpoint folder"), though pretraining reads nothing of it then; the generation_config.json its authors ship,
    copied into each checkpoint, goes on from the run's own copy: the model loaded from the checkpoint resumed keeps
    it (load_pretrained) and each save writes it, though older checkpoints are pruned."""
    train(run_config(data_dir, tmp_path / "base", max_steps=1, eval_every=0, save_every=1))
    base = tmp_path / "init"
    shutil.move(tmp_path / "base" / "checkpoints" / "step_1", base)
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    config = run_config(
        data_dir, tmp_path / "run", init_from=str(base), model_overrides={}, eval_every=0, save_every=1,
        keep_checkpoints=1,
    )  # fmt: skip
    train(dataclasses.replace(config, max_steps=1))
    shutil.rmtree(base)
    train(dataclasses.replace(config, max_steps=3), resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]
    [step_3] = list_checkpoints(tmp_path / "run")
    assert step_3.name == "step_3"
    assert json.loads((step_3 / "generation_config.json").read_text()) == {"temperature": 0.6, "top_p": 0.95}


def test_a_resumed_run_copies_its_init_froms_sampling_into_checkpoints_though_the_one_resumed_lacks_it(
    data_dir, tmp_path
):
    """a6bd654 copied generation_config.json from the checkpoint resumed instead of init_from, so a run resumed from a
    checkpoint saved without the file (before 5 December 2026) wrote the ids-only one transformers writes for a model
    without settings, and init_from's sampling (temperature 0.6, top_p 0.95) was lost though init_from still held it."""
    train(run_config(data_dir, tmp_path / "base", max_steps=1, eval_every=0, save_every=1))
    base = tmp_path / "base" / "checkpoints" / "step_1"
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    config = run_config(data_dir, tmp_path / "run", init_from=str(base), model_overrides={}, eval_every=0, save_every=1)
    train(dataclasses.replace(config, max_steps=1))
    (tmp_path / "run" / "checkpoints" / "step_1" / "generation_config.json").unlink()
    train(dataclasses.replace(config, max_steps=2), resume=True)
    step_2 = tmp_path / "run" / "checkpoints" / "step_2"
    assert json.loads((step_2 / "generation_config.json").read_text()) == {"temperature": 0.6, "top_p": 0.95}


def test_a_fresh_model_saves_the_bos_and_eos_ids_of_the_tokenizer_its_data_was_encoded_with(tmp_path):
    """A preset's config said BOS 0 and EOS 1 whatever the tokenizer (DeepSeek-V2's puts them at 100000 and 100001):
    transformers' generate, which stops at config.json's eos_token_id, never stopped where seekstack stops."""
    tokenizer = TOKENIZER | {"bos_id": VOCAB - 2, "eos_id": VOCAB - 1}
    write_split(tmp_path / "shards", "train", 2_000, seed=1, tokenizer=tokenizer)
    train(run_config(tmp_path / "shards", tmp_path / "run", max_steps=1, eval_every=0, save_every=1))
    from transformers import AutoConfig

    saved = AutoConfig.from_pretrained(tmp_path / "run" / "checkpoints" / "step_1")
    assert (saved.bos_token_id, saved.eos_token_id) == (VOCAB - 2, VOCAB - 1)


def test_a_run_resumed_with_another_balance_loss_weight_trains_and_saves_with_it(data_dir, tmp_path):
    """--resume aux_loss_alpha=0.5 was warned of ('resuming with aux_loss_alpha=0.5') and then ignored: the
    checkpoint's model kept its 1e-4, in the loss and in the config.json the next checkpoint saved."""
    no_mtp = MICRO_MODEL | {"num_nextn_predict_layers": 0}
    train(run_config(data_dir, tmp_path, model_overrides=no_mtp, max_steps=1, eval_every=0, save_every=1))
    config = run_config(data_dir, tmp_path, model_overrides=no_mtp, max_steps=2, eval_every=0, save_every=0)
    train(dataclasses.replace(config, aux_loss_alpha=0.5), resume=True)
    first, resumed = read_metrics(tmp_path)
    assert first["loss"] - first["lm_loss"] < 0.01 and resumed["loss"] - resumed["lm_loss"] > 0.1
    saved = json.loads((tmp_path / "checkpoints" / "step_2" / "config.json").read_text())
    assert saved["aux_loss_alpha"] == 0.5


def test_a_run_resumed_with_another_weight_decay_and_betas_steps_with_them(data_dir, tmp_path):
    """--resume weight_decay=0.5 betas=0.8,0.9 was warned of and then ignored: loading the saved optimizer put back
    the groups' saved weight_decay 0.1 and betas (0.9, 0.95)."""
    train(run_config(data_dir, tmp_path, max_steps=1, eval_every=0, save_every=1))
    config = run_config(data_dir, tmp_path, max_steps=2, eval_every=0, save_every=0)
    train(dataclasses.replace(config, weight_decay=0.5, betas=(0.8, 0.9)), resume=True)
    state = torch.load(tmp_path / "checkpoints" / "step_2" / "train_state.pt", weights_only=False)
    settings = [(group["weight_decay"], tuple(group["betas"])) for group in state["optimizer"]["param_groups"]]
    assert settings == [(0.5, (0.8, 0.9)), (0.0, (0.8, 0.9))]


def test_bias_update_moves_routing_biases_only_when_enabled(data_dir, tmp_path):
    def router_bias(out_dir: Path) -> torch.Tensor:
        from seekstack.checkpoint import load_pretrained

        return load_pretrained(out_dir / "checkpoints" / "step_1").block(1).mlp.gate.e_score_correction_bias

    train(run_config(data_dir, tmp_path / "on", max_steps=1, eval_every=0, save_every=0))
    train(run_config(data_dir, tmp_path / "off", max_steps=1, eval_every=0, save_every=0, bias_update_rate=0.0))
    moved = router_bias(tmp_path / "on")  # one step of b_i += 0.001 * sign(mean load - load_i), summed over 2 micro
    assert torch.equal(moved.abs(), torch.full((4,), 0.001)) and moved.sum().abs() < 1e-9
    assert torch.equal(router_bias(tmp_path / "off"), torch.zeros(4))


def test_the_bias_update_counts_the_expert_load_of_every_micro_batch_of_the_step(data_dir, tmp_path, monkeypatch):
    """2 micro-batches of 4 windows of seq_len + 1 = 33 tokens, K = 2: MoE layer 1 routes all 264 tokens, the MTP
    block the 256 positions with a token after them (32 a window), each to 2 experts, in one update."""
    from seekstack.train import trainer

    loads, original = [], trainer.update_expert_bias

    def recorded_bias_update(model, expert_load, rate):
        loads.append(expert_load.clone())
        original(model, expert_load, rate)

    monkeypatch.setattr(trainer, "update_expert_bias", recorded_bias_update)
    train(run_config(data_dir, tmp_path, max_steps=1, eval_every=0, save_every=0))
    assert len(loads) == 1 and loads[0].sum(dim=1).tolist() == [2 * 4 * 33 * 2, 2 * 4 * 32 * 2]


# ---------------------------------------------------------------------------------- checkpoints
def test_resume_continues_exactly(data_dir, tmp_path):
    config = run_config(data_dir, tmp_path / "whole", max_steps=6, save_every=3)
    whole = train(config)
    assert [p.name for p in list_checkpoints(tmp_path / "whole")] == ["step_3", "step_6"]
    resumed_config = run_config(data_dir, tmp_path / "resumed", max_steps=6, save_every=3)
    resumed = train(resumed_config, resume=tmp_path / "whole" / "checkpoints" / "step_3")
    assert resumed.losses == whole.losses[3:]  # bit-for-bit
    assert len(resumed.losses) == 3


def test_a_resume_from_an_earlier_checkpoint_names_the_later_ones_its_first_save_deletes(data_dir, tmp_path, capsys):
    train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, eval_every=0, keep_checkpoints=3))
    back = run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0, keep_checkpoints=1)
    resumed = train(back, resume=tmp_path / "checkpoints" / "step_2")
    assert (
        "its first save deletes the run's later checkpoints step_4, step_6, of the history it leaves"
        in capsys.readouterr().err
    )
    assert list_checkpoints(tmp_path) == [resumed.checkpoint] == [tmp_path / "checkpoints" / "step_4"]


def test_a_resumed_runs_first_save_after_the_later_checkpoints_still_deletes_them(data_dir, tmp_path, capsys):
    """Resumed from step_2 of a run holding step_4 and step_6, and told its first save deletes them, a run whose first
    save came at step 8 kept them (they are below it) as the newest but one of its history, which they are not: a
    --resume-from 6 then went on from the history the run had left."""
    train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, eval_every=0, keep_checkpoints=3))
    back = run_config(data_dir, tmp_path, max_steps=8, save_every=0, eval_every=0, keep_checkpoints=3)
    train(back, resume=tmp_path / "checkpoints" / "step_2")
    assert "its first save deletes the run's later checkpoints step_4, step_6" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_8"]


def test_ctrl_c_in_a_runs_start_up_says_that_nothing_was_saved(data_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the run starts (the model built or loaded, the data checked, the peak probed) says so, where the
    command's exit 130 says nothing."""
    from seekstack.train import trainer

    def interrupted_probe(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "probed_in_turns", interrupted_probe)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path, max_steps=2, eval_every=0))
    assert capsys.readouterr().err.endswith("\ninterrupted before its first step: nothing saved\n")
    assert not (tmp_path / "checkpoints").exists()


def test_ctrl_c_before_a_resumed_runs_first_step_saves_nothing_and_keeps_the_later_checkpoints(
    data_dir, tmp_path, monkeypatch, capsys
):
    """Told that its first save deletes the later checkpoints, the user presses Ctrl-C to move them out: the interrupt
    saved step_2 again, as it was, and deleted step_4 and step_6 on the spot."""
    from seekstack.train import trainer

    train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, eval_every=0, keep_checkpoints=3))
    saved = list_checkpoints(tmp_path)
    written = [(p / "train_state.pt").stat().st_mtime_ns for p in saved]

    def interrupted_step(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Run, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, eval_every=0), resume=saved[0])
    assert list_checkpoints(tmp_path) == saved == [tmp_path / "checkpoints" / f"step_{n}" for n in (2, 4, 6)]
    assert [(p / "train_state.pt").stat().st_mtime_ns for p in saved] == written  # none written again
    assert f"interrupted before its first step: nothing saved ({saved[0]} is as it was)" in capsys.readouterr().err


def test_resume_true_picks_the_latest_checkpoint_and_trims_metrics(data_dir, tmp_path):
    train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, keep_checkpoints=1))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4"]
    metrics_before = read_metrics(tmp_path)
    again = train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, keep_checkpoints=1), resume=True)
    assert len(again.losses) == 2
    steps = [m["step"] for m in read_metrics(tmp_path) if "loss" in m]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert read_metrics(tmp_path)[: len(metrics_before)] == metrics_before


def test_resume_drops_a_last_metrics_line_cut_short_with_a_warning_and_names_a_damaged_earlier_one(
    data_dir, tmp_path, capsys
):
    train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-20])  # killed while writing step 4's line
    train(run_config(data_dir, tmp_path, max_steps=6, save_every=2, eval_every=0), resume=True)
    assert f"warning: {metrics}:4: dropped the last line, cut short" in capsys.readouterr().err
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 5, 6]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:-20], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not valid JSON .*; mend or delete that line"):
        train(run_config(data_dir, tmp_path, max_steps=8, save_every=2, eval_every=0), resume=True)
    metrics.write_text("\n".join([lines[0], "[1, 2]", *lines[2:]]) + "\n")  # JSON, but no record
    with pytest.raises(ValueError, match=f"{metrics}:2: not a metrics record"):
        train(run_config(data_dir, tmp_path, max_steps=8, save_every=2, eval_every=0), resume=True)


def test_a_resume_refused_over_a_damaged_metrics_line_leaves_the_runs_config_as_it_was(data_dir, tmp_path):
    """The refusal came after train_config.json was written, so the refused run's max_steps=8 stood there as the run's
    own: the next plain --resume went on to step 8 with no "resuming with max_steps=" warning."""
    train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0))
    saved = (tmp_path / "train_config.json").read_bytes()
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:-20], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=f"{metrics}:2: not valid JSON"):
        train(run_config(data_dir, tmp_path, max_steps=8, save_every=2, eval_every=0), resume=True)
    assert (tmp_path / "train_config.json").read_bytes() == saved
    assert json.loads(saved)["max_steps"] == 4


@pytest.mark.parametrize(
    ("key", "altered", "error"),
    [
        ("data", lambda data: {k: v for k, v in data.items() if k != "seed"}, "KeyError: 'seed'"),
        ("rng", lambda rng: {**rng, "torch": torch.zeros(3, dtype=torch.uint8)}, "RuntimeError: "),
        ("rng", lambda rng: {k: v for k, v in rng.items() if k != "numpy"}, "KeyError: 'numpy'"),
        ("step", lambda step: "two", "ValueError: invalid literal for int()"),
        ("lr_anchor", lambda anchor: {"step": 2}, "TypeError: "),
    ],
)
def test_a_train_state_entry_altered_by_hand_is_named_with_its_file(data_dir, tmp_path, key, altered, error):
    """A `data` entry lacking its seed stopped the resume with a bare KeyError: 'seed', a bad `rng`, `step` or
    `lr_anchor` with torch's or python's error, naming neither the file nor the entry."""
    train(run_config(data_dir, tmp_path, max_steps=2, save_every=2, eval_every=0))
    file = tmp_path / "checkpoints" / "step_2" / "train_state.pt"
    state = torch.load(file, weights_only=False)
    state[key] = altered(state.get(key))
    torch.save(state, file)
    more = run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0)
    with pytest.raises(CheckpointError) as refused:
        train(more, resume=True)
    assert str(refused.value).startswith(f"{file}: its {key!r} cannot be restored ({error}")
    assert f"move {file.parent} out of {file.parent.parent}" in str(refused.value)


@pytest.mark.parametrize("damaged", ["train_state.pt", "model.safetensors", "config.json"])
def test_a_damaged_checkpoint_file_says_how_to_resume_from_the_checkpoint_before_it(data_dir, tmp_path, damaged):
    config = run_config(data_dir, tmp_path / "run", max_steps=4, save_every=2, eval_every=0)
    train(config)
    newest = tmp_path / "run" / "checkpoints" / "step_4"
    (newest / damaged).write_bytes((newest / damaged).read_bytes()[:100])  # cut short
    more = run_config(data_dir, tmp_path / "run", max_steps=6, save_every=2, eval_every=0)
    with pytest.raises(CheckpointError, match=f"{newest / damaged}: .*truncated or damaged: .*move {newest} out of "):
        train(more, resume=True)
    newest.rename(tmp_path / "step_4.damaged")  # what the message says to do
    assert len(train(more, resume=True).losses) == 4  # steps 3 to 6, from step_2


def test_a_checkpoint_stripped_of_its_optimizer_state_is_named_as_such_not_as_a_missing_shard(data_dir, tmp_path):
    """A train_state.pt without its optimizer (removed to save space, as HF users delete optimizer.pt) was taken for a
    sharded run's and refused naming optimizer/.metadata and ranks sharing a file system, in a one-process run."""
    train(run_config(data_dir, tmp_path, max_steps=2, save_every=2, eval_every=0))
    newest = tmp_path / "checkpoints" / "step_2"
    state = torch.load(newest / "train_state.pt", weights_only=False)
    del state["optimizer"]
    torch.save(state, newest / "train_state.pt")
    with pytest.raises(CheckpointError) as refused:
        train(run_config(data_dir, tmp_path, max_steps=3, save_every=2, eval_every=0), resume=True)
    assert str(refused.value) == (
        f"{newest / 'train_state.pt'}: holds no optimizer state (no 'optimizer' key), and {newest} no optimizer/ "
        "folder of a sharded run's: the moments a resume goes on with were removed; start a new run from the "
        f"checkpoint's weights with init_from={newest} (a fresh optimizer), or move {newest} out of "
        f"{newest.parent}, and --resume continues from the checkpoint before it (if the run kept one)"
    )


def test_a_resume_given_fewer_steps_than_its_checkpoint_has_is_refused_naming_max_steps(data_dir, tmp_path):
    """It would train nothing, yet say it trained to the checkpoint's step and record the smaller max_steps."""
    train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0))
    newest = tmp_path / "checkpoints" / "step_4"
    with pytest.raises(ConfigError, match=f"field 'max_steps' has value 3, below step 4 of the checkpoint {newest}"):
        train(run_config(data_dir, tmp_path, max_steps=3, save_every=2, eval_every=0), resume=True)
    assert json.loads((tmp_path / "train_config.json").read_text())["max_steps"] == 4
    assert train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0), resume=True).step == 4


def test_a_resume_at_another_seq_len_is_refused_naming_seq_len_and_the_checkpoints_window_length(data_dir, tmp_path):
    """The data position counts windows of the checkpoint's length in an order drawn over them: at another length
    the run would go on at the same count of longer windows, skipping part of its data pass."""
    train(run_config(data_dir, tmp_path, max_steps=2, save_every=2, eval_every=0))
    newest = tmp_path / "checkpoints" / "step_2"
    with pytest.raises(
        ConfigError,
        match=f"field 'seq_len' has value 64, but the checkpoint {newest} .* in windows of seq_len=32 .*resume with "
        f"seq_len=32 .*init_from={newest} seq_len=64",
    ):
        train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0, seq_len=64), resume=True)
    assert json.loads((tmp_path / "train_config.json").read_text())["seq_len"] == 32
    assert train(run_config(data_dir, tmp_path, max_steps=4, save_every=2, eval_every=0), resume=True).step == 4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    train(run_config(data_dir, tmp_path, max_steps=2, save_every=2))
    good = (tmp_path / "checkpoints" / "step_2" / "model.safetensors").read_bytes()
    from seekstack.model import transformer

    monkeypatch.setattr(transformer, "linear_cross_entropy", lambda *a, **k: (torch.tensor(float("nan")), None))
    with pytest.raises(TrainingDiverged, match=r"step 3: loss=nan .*Last good checkpoint: .*step_2"):
        train(run_config(data_dir, tmp_path, max_steps=4, save_every=2), resume=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    assert (tmp_path / "checkpoints" / "step_2" / "model.safetensors").read_bytes() == good


def test_resume_restores_the_random_state_the_checkpointed_step_started_with(data_dir, tmp_path, monkeypatch):
    """Steps that draw random numbers (dropout, on-policy sampling) draw the same ones after a resume."""
    from seekstack.train import trainer

    original = trainer._Run.train_step
    states_at_step_start: dict[str, list[torch.Tensor]] = {"whole": [], "resumed": []}

    def drawing_step(self, run: str):
        states_at_step_start[run].append(torch.get_rng_state())
        metrics = original(self)
        torch.rand(3)  # what a step with dropout or sampling draws
        return metrics

    for run, resume in (("whole", False), ("resumed", tmp_path / "whole" / "checkpoints" / "step_2")):
        monkeypatch.setattr(trainer._Run, "train_step", lambda self, run=run: drawing_step(self, run))
        train(run_config(data_dir, tmp_path / run, max_steps=4, save_every=2, eval_every=0), resume=resume)
    assert not torch.equal(states_at_step_start["whole"][1], states_at_step_start["whole"][2])
    assert all(map(torch.equal, states_at_step_start["whole"][2:], states_at_step_start["resumed"]))
    assert len(states_at_step_start["resumed"]) == 2


def test_keyboard_interrupt_saves_a_checkpoint_that_resumes_exactly(data_dir, tmp_path, monkeypatch):
    whole = train(run_config(data_dir, tmp_path / "whole", max_steps=4, save_every=0))
    from seekstack.train import trainer

    original = trainer._Run.train_step

    at_step_start = {}

    def interrupted_step(self):
        if self.step == 2:
            at_step_start["torch"] = torch.get_rng_state()
            self.data.batch(4, progress=0.5)  # a micro-batch drawn before the interrupt must not be skipped on resume
            torch.rand(3)  # nor random numbers the step drew (on-policy distillation samples with torch's generator)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer._Run, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0))
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_2"]
    saved_rng = read_train_state(list_checkpoints(tmp_path / "cut")[0])["rng"]["torch"]
    assert torch.equal(saved_rng, at_step_start["torch"])
    monkeypatch.setattr(trainer._Run, "train_step", original)
    resumed = train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0), resume=True)
    assert resumed.losses == whole.losses[2:]


def interrupt_at_step_2(monkeypatch) -> None:
    """Ctrl-C in the third step, before its update."""
    from seekstack.train import trainer

    original = trainer._Run.train_step

    def interrupted_step(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer._Run, "train_step", interrupted_step)


def test_a_second_ctrl_c_during_the_save_the_first_began_lets_it_finish(data_dir, tmp_path, monkeypatch, capsys):
    from seekstack.train import trainer

    interrupt_at_step_2(monkeypatch)
    save = trainer.save_checkpoint

    def interrupted_again(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the user presses Ctrl-C again while the checkpoint is written
        return save(*args, **kwargs)

    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_again)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path, max_steps=4, save_every=0))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2"]
    saved = tmp_path / "checkpoints" / "step_2"
    assert f"interrupted: saved {saved}; continue with --resume" in capsys.readouterr().err


def test_a_checkpoint_the_disk_refuses_stops_the_run_naming_it_and_the_steps_lost(data_dir, tmp_path, monkeypatch):
    from seekstack.train import state

    save = state.torch.save

    def disk_full_at_step_4(obj, path):
        if Path(path).parent.name.startswith(".step_4."):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 19926080 vs 19925972")
        save(obj, path)

    monkeypatch.setattr(state.torch, "save", disk_full_at_step_4)
    with pytest.raises(OSError) as refused:
        train(run_config(data_dir, tmp_path, max_steps=6, save_every=2))
    checkpoints = tmp_path / "checkpoints"
    assert str(refused.value) == (
        f"{checkpoints / 'step_4'}: not written (torch.save was cut short: a full disk or a file size limit); nothing "
        f"was written, and what was there is as it was; training stopped at step 4: the steps since "
        f"{checkpoints / 'step_2'} are lost: free some space and continue from it with --resume"
    )
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2"]


def history(out_dir: Path) -> list[tuple]:
    """What metrics.jsonl says of each step and evaluation, in order: the step, its training loss, its val loss."""
    return [(m["step"], m.get("loss"), m.get("val_loss")) for m in read_metrics(out_dir)]


def test_ctrl_c_during_an_evaluation_logs_it_on_resume_as_an_uninterrupted_run_does(data_dir, tmp_path, monkeypatch):
    changes = dict(max_steps=4, eval_every=2, save_every=0, keep_checkpoints=3)
    train(run_config(data_dir, tmp_path / "whole", **changes))
    from seekstack.train import trainer

    original = trainer._Run.evaluate

    def interrupted_evaluation(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer._Run, "evaluate", interrupted_evaluation)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path / "cut", **changes))
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_2"]
    monkeypatch.setattr(trainer._Run, "evaluate", original)
    resumed = train(run_config(data_dir, tmp_path / "cut", **changes), resume=True)
    assert history(tmp_path / "cut") == history(tmp_path / "whole")  # step 2's val loss, then steps 3 and 4's
    assert len(resumed.losses) == 2
    train(run_config(data_dir, tmp_path / "cut", **changes), resume=tmp_path / "cut" / "checkpoints" / "step_2")
    assert history(tmp_path / "cut") == history(tmp_path / "whole")  # evaluated again, logged once


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_an_interrupt_after_a_steps_update_waits_for_its_log_line_and_keeps_the_step(
    data_dir, tmp_path, monkeypatch, signum
):
    whole = train(run_config(data_dir, tmp_path / "whole", max_steps=4, save_every=0, eval_every=0))
    from seekstack.train import trainer

    original = trainer.update_expert_bias

    def interrupted_bias_update(model, expert_load, rate):  # after the optimizer's update, before the log line
        original(model, expert_load, rate)
        if not list_checkpoints(tmp_path / "cut") and (tmp_path / "cut" / "metrics.jsonl").is_file():
            signal.raise_signal(signum)

    monkeypatch.setattr(trainer, "update_expert_bias", interrupted_bias_update)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0, eval_every=0))
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_2"]  # step 2 updated the weights: kept
    monkeypatch.setattr(trainer, "update_expert_bias", original)
    resumed = train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0, eval_every=0), resume=True)
    assert resumed.losses == whole.losses[2:]
    assert history(tmp_path / "cut") == history(tmp_path / "whole")


def test_sigterm_saves_a_checkpoint_that_resumes_exactly_as_ctrl_c_does(data_dir, tmp_path, monkeypatch, capsys):
    """A scheduler's preemption or `kill` in the third step, before its update: the step is re-run on resume."""
    whole = train(run_config(data_dir, tmp_path / "whole", max_steps=4, save_every=0, eval_every=0))
    from seekstack.train import trainer

    original = trainer._Run.train_step

    def terminated_step(self):
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(trainer._Run, "train_step", terminated_step)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0, eval_every=0))
    saved = tmp_path / "cut" / "checkpoints" / "step_2"
    assert list_checkpoints(tmp_path / "cut") == [saved]
    assert f"interrupted: saved {saved}; continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(trainer._Run, "train_step", original)
    resumed = train(run_config(data_dir, tmp_path / "cut", max_steps=4, save_every=0, eval_every=0), resume=True)
    assert resumed.losses == whole.losses[2:]
    assert history(tmp_path / "cut") == history(tmp_path / "whole")


# ---------------------------------------------------------------------------------- curriculum
CURRICULUM = {"train_easy": [0.7, 0.2, 0.1], "train_medium": [0.2, 0.5, 0.3], "train_hard": [0.1, 0.3, 0.6]}


@pytest.fixture(scope="module")
def bucket_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("buckets")
    for seed, split in enumerate(["train_easy", "train_medium", "train_hard", "val"], start=3):
        write_split(path, split, 8_000, seed=seed)
    return path


def test_curriculum_logs_the_mix_of_each_step_and_resumes_exactly(bucket_dir, tmp_path):
    config = run_config(bucket_dir, tmp_path / "whole", max_steps=6, save_every=3, mixture=CURRICULUM)
    whole = train(config)
    mixes = [m["mix"] for m in read_metrics(tmp_path / "whole") if "loss" in m]
    expected = [0.7, 0.7, 0.2, 0.2, 0.1, 0.1]  # train_easy's weight in each third of the 6 steps
    assert [mix["train_easy"] for mix in mixes] == pytest.approx(expected)
    assert all(sum(mix.values()) == pytest.approx(1.0) for mix in mixes)
    resumed_config = run_config(bucket_dir, tmp_path / "resumed", max_steps=6, save_every=3, mixture=CURRICULUM)
    resumed = train(resumed_config, resume=tmp_path / "whole" / "checkpoints" / "step_3")
    assert resumed.losses == whole.losses[3:]  # bit-for-bit, the source draws included


def test_more_steps_on_resume_continue_the_mixture_phases_and_mtp_weight_from_where_the_run_was(bucket_dir, tmp_path):
    changes = dict(max_steps=6, save_every=3, mixture=CURRICULUM, aux_loss_alpha=0.0, mtp_switch_fraction=0.5)
    train(run_config(bucket_dir, tmp_path, **changes))
    train(run_config(bucket_dir, tmp_path, **{**changes, "max_steps": 12}), resume=True)
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["mix"]["train_easy"] for m in steps[6:]] == pytest.approx([0.1] * 6)  # the last phase, not the second
    mtp_weights = [(m["loss"] - m["lm_loss"]) / m["mtp_loss"] for m in steps]  # loss = lm + lambda * mtp here
    assert mtp_weights == pytest.approx([0.3] * 3 + [0.1] * 9, rel=1e-4)  # late from step 4 on, never early again


def test_a_resumed_runs_progress_runs_on_from_where_it_was_over_the_steps_left():
    config = TrainConfig(max_steps=12)
    state = {"step": 6, "config": config.to_dict()}
    longer = TrainConfig(max_steps=20)
    anchor = resumed_progress_anchor(state, longer)
    assert anchor == ProgressAnchor(6, 0.5)
    assert [training_progress(step, longer, anchor) for step in (6, 13, 20)] == [0.5, 0.75, 1.0]
    again = resumed_progress_anchor({"step": 13, "config": longer.to_dict(), "progress_anchor": anchor.__dict__},
                                    TrainConfig(max_steps=41))  # fmt: skip
    assert again == ProgressAnchor(13, 0.75)
    assert resumed_progress_anchor(state, config) is None  # the same max_steps: step / max_steps
    assert mtp_weight_at(0.69, config) == 0.3 and mtp_weight_at(0.7, config) == 0.1


def test_mixture_config_errors_name_the_field(bucket_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"field 'mixture': mixture source 'train_hard' has 2 weights"):
        load_train_config(None, ["mixture={train_easy: [1, 1, 1], train_hard: [1, 1]}"])
    with pytest.raises(FileNotFoundError, match="no shard index at .*train_unknown_index.json"):
        train(run_config(bucket_dir, tmp_path, mixture={"train_unknown": 1.0}))


# ---------------------------------------------------------------------------------- speed and memory options
def test_activation_checkpointing_gives_the_same_loss_and_gradients(data_dir, tmp_path):
    from seekstack.parallel.parallelize import apply_activation_checkpointing

    config = run_config(data_dir, tmp_path)
    plain = build_model(config, TOKENIZER)
    checkpointed = build_model(config, TOKENIZER)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed)
    batch = torch.randint(VOCAB, (2, 33))
    losses = []
    for model in (plain, checkpointed):
        loss = model(batch, labels=batch).loss
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=name)
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_compile_keeps_parameter_names_so_checkpoints_do_not_change(data_dir, tmp_path):
    from seekstack.parallel.parallelize import apply_compile

    model = build_model(run_config(data_dir, tmp_path), TOKENIZER)
    names = list(model.state_dict())
    apply_compile(model)  # lazy: nothing is compiled before the first call
    assert list(model.state_dict()) == names


def test_bfloat16_on_cpu_autocasts_but_keeps_float32_weights(data_dir, tmp_path):
    from seekstack.checkpoint import load_pretrained

    result = train(run_config(data_dir, tmp_path, dtype="bfloat16", max_steps=8, lr=1e-2, save_every=0))
    assert all(math.isfinite(loss) for loss in result.losses) and result.losses[-1] < result.losses[0]
    float32 = train(run_config(data_dir, tmp_path / "f32", max_steps=8, lr=1e-2, save_every=0))
    assert result.losses[0] != float32.losses[0]  # autocast really ran the matmuls in bfloat16
    assert result.losses[0] == pytest.approx(float32.losses[0], abs=0.05)
    weights = load_pretrained(tmp_path / "checkpoints" / "step_8")
    assert {p.dtype for p in weights.parameters()} == {torch.float32}


def test_auto_dtype_trains_in_bfloat16_where_the_cpu_multiplies_it_natively_and_the_micro_batch_is_large():
    """A CPU with avx512_bf16 or amx_bf16 and micro-batches of MIN_BF16_TRAINING_FLOPS or more: the demo's `tiny` at
    16 x 256 tokens trains in bf16, at 4 x 32 in float32, as does any micro-batch on a CPU without them or a GPU."""
    import seekstack
    from seekstack.accounting import training_flops_per_token
    from seekstack.train.trainer import MIN_BF16_TRAINING_FLOPS

    cpu, amx, avx2 = torch.device("cpu"), {"avx512_bf16": True, "amx_bf16": True}, {"avx2": True}
    demo = training_flops_per_token(seekstack.preset("tiny"), 256) * 16 * 256
    assert step_dtype("auto", cpu, demo, {"avx512_bf16": True}) == (
        "bfloat16",
        "this CPU has avx512_bf16 and a micro-batch of 57.5 GFLOP trains faster in bf16",
    )
    small_batch = training_flops_per_token(seekstack.preset("tiny"), 32) * 4 * 32
    assert step_dtype("auto", cpu, small_batch, amx) == (
        "float32",
        "this CPU has avx512_bf16 and amx_bf16, but a micro-batch of 1.5 GFLOP (under 13) trains faster in float32",
    )
    assert step_dtype("auto", cpu, MIN_BF16_TRAINING_FLOPS, amx)[0] == "bfloat16"
    assert step_dtype("auto", cpu, demo, avx2) == ("float32", "this CPU has none of avx512_bf16, amx_bf16")
    assert step_dtype("float32", cpu, demo, amx) == ("float32", "")  # given: nothing to tell
    assert step_dtype("bfloat16", cpu, small_batch, amx) == ("bfloat16", "")
    assert step_dtype("auto", torch.device("cuda", 0), demo, amx)[0] == "float32"  # measured on CPUs alone


def test_auto_dtype_weighs_the_training_flops_of_a_micro_batch(data_dir, tmp_path, monkeypatch, capsys):
    """The trainer gives the rule the model's training FLOPs per token times the tokens of a micro-batch (4 x 32)."""
    import seekstack.train.trainer as trainer
    from seekstack.accounting import training_flops_per_token

    flops = training_flops_per_token(build_model(run_config(data_dir, tmp_path), TOKENIZER).config, 32) * 4 * 32
    monkeypatch.setattr("seekstack.infer.precision.cpu_features", lambda: {"avx512_bf16": True})
    for threshold, chosen in ((flops, "bfloat16"), (flops + 1, "float32")):
        monkeypatch.setattr(trainer, "MIN_BF16_TRAINING_FLOPS", threshold)
        train(run_config(data_dir, tmp_path / chosen, max_steps=1, eval_every=0, save_every=0, peak_flops=1e11))
        told = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtype ")]
        assert len(told) == 1 and told[0].startswith(f"dtype {chosen} (auto: this CPU has avx512_bf16")


def test_bfloat16_given_on_a_cpu_without_native_bf16_is_told_it_can_run_slower_than_float32():
    """torch widens bf16 to float32 around each op on a CPU with neither avx512_bf16 nor amx_bf16 (generate measured
    3.5x slower than float32, infer/precision.py): the run trains as given, and its start says so."""
    cpu, avx2 = torch.device("cpu"), {"avx2": True}
    assert step_dtype("bfloat16", cpu, 58_000_000, avx2) == (
        "bfloat16",
        "given, but this CPU has none of avx512_bf16, amx_bf16: bf16 can run slower there than float32",
    )
    assert step_dtype("float32", cpu, 58_000_000, avx2) == ("float32", "")


def test_a_run_in_the_default_dtype_says_which_it_chose_and_trains_as_that_dtype_given(data_dir, tmp_path, capsys):
    auto = train(run_config(data_dir, tmp_path / "auto", max_steps=2, eval_every=0, save_every=0))
    told = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtype ")]
    # the micro model's micro-batches are far under MIN_BF16_TRAINING_FLOPS: float32 on any CPU, with the way to bf16
    assert len(told) == 1 and told[0].startswith("dtype float32 (auto: ")
    assert told[0].endswith("); dtype=bfloat16 to train in bfloat16")
    given = train(run_config(data_dir, tmp_path / "given", max_steps=2, eval_every=0, save_every=0, dtype="float32"))
    assert auto.losses == given.losses
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtype ")]


def test_auto_dtype_decides_at_a_runs_start_and_a_resume_keeps_it_on_any_cpu():
    """A float32 run (the default before `auto`) resumed on an AMX CPU stays float32, a run that chose bf16 there stays
    bf16 on a CPU without: a precision switched mid-run changes its losses; the reason says what a new run takes."""
    cpu, amx, avx2 = torch.device("cpu"), {"avx512_bf16": True, "amx_bf16": True}, {"avx2": True}
    dtype, why = step_dtype("auto", cpu, 60e9, amx, started="float32")
    assert dtype == "float32" and why == (
        "the run's since its start, which a resume keeps; a new run here would take bfloat16: this CPU has "
        "avx512_bf16 and amx_bf16 and a micro-batch of 60.0 GFLOP trains faster in bf16"
    )
    assert step_dtype("auto", cpu, 60e9, avx2, started="bfloat16")[0] == "bfloat16"
    assert step_dtype("auto", cpu, 60e9, amx, started="bfloat16") == (
        "bfloat16",
        "this CPU has avx512_bf16 and amx_bf16 and a micro-batch of 60.0 GFLOP trains faster in bf16",
    )
    assert step_dtype("float32", cpu, 60e9, amx, started="bfloat16")[0] == "float32"  # given: a switch asked for


def test_a_run_resumed_with_auto_dtype_goes_on_in_the_dtype_its_checkpoint_computed_in(data_dir, tmp_path, capsys):
    config = run_config(data_dir, tmp_path, dtype="bfloat16", max_steps=2, eval_every=0, save_every=2, peak_flops=1e11)
    train(config)
    assert read_train_state(tmp_path / "checkpoints" / "step_2")["dtype"] == "bfloat16"
    capsys.readouterr()
    train(dataclasses.replace(config, dtype="auto", max_steps=3), resume=True)  # auto takes float32 for the micro model
    told = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtype ")]
    assert len(told) == 1 and told[0].endswith("); dtype=float32 to train in float32")
    assert told[0].startswith(
        "dtype bfloat16 (auto: the run's since its start, which a resume keeps; a new run here would take float32: "
    )
    assert read_train_state(tmp_path / "checkpoints" / "step_3")["dtype"] == "bfloat16"


def test_progress_reports_mfu_from_the_training_flops_and_peak(data_dir, tmp_path, capsys):
    from seekstack.accounting import training_flops_per_token
    from seekstack.train.mfu import default_peak_flops, flops_text, measured_core_matmul_rates, thread_cores

    config = run_config(data_dir, tmp_path, max_steps=2, eval_every=0, save_every=0)
    train(config)
    flops_per_token = training_flops_per_token(build_model(config, TOKENIZER).config, config.seq_len)
    peak = default_peak_flops(torch.device("cpu"))
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    for step in steps:
        assert step["mfu"] == pytest.approx(step["tokens_per_s"] * flops_per_token / step["peak_flops"])
        assert 0 < step["mfu"] < 1
    progress = capsys.readouterr().err.splitlines()
    assert (
        progress[-1].startswith("step 2/2  loss ") and " tok/s  MFU " in progress[-1] and "ETA 00:00:00" in progress[-1]
    )
    cores = thread_cores(torch.get_num_threads())
    core = statistics.median(measured_core_matmul_rates(torch.float32))
    assert peak.flops == cores * core > 1e9  # measured, not assumed
    # the peak and where it comes from are told at the start and logged with the first step (the report names them)
    source = "a 1024^3 float32 matmul measured on one CPU thread's clock, times " + f"{cores} core" + "s" * (cores > 1)
    assert peak.source == source and steps[0]["peak_source"] == source and "peak_source" not in steps[1]
    assert f"MFU against a peak of {flops_text(steps[0]['peak_flops'])}: {source}" in progress
    train(run_config(data_dir, tmp_path / "given", max_steps=1, eval_every=0, save_every=0, peak_flops=1e15))
    (given,) = [m for m in read_metrics(tmp_path / "given") if "loss" in m]
    assert given["mfu"] == pytest.approx(given["tokens_per_s"] * flops_per_token / 1e15)
    given_source = "peak_flops, as the config gives it, per machine (its CPUs, which its ranks share)"
    assert (given["peak_flops"], given["peak_source"]) == (1e15, given_source)


def test_the_eta_of_a_run_longer_than_a_day_counts_its_days_instead_of_wrapping_at_24_hours():
    assert eta_text(0.9) == "00:00:00"
    assert eta_text(23 * 3600 + 59 * 60 + 59) == "23:59:59"
    assert eta_text(86_400 + 2 * 3600 + 3 * 60 + 4) == "1d 02:03:04"  # a clock time read 02:03:04
    assert eta_text(11 * 86_400 + 3600) == "11d 01:00:00"


def test_a_peak_probed_on_a_busy_machine_is_probed_again_when_a_step_beats_it(data_dir, tmp_path, monkeypatch):
    """The start's matmul probe ran while other processes held the cores (here: read 1 MFLOP/s), so the first step's
    MFU came out far above 100%: the trainer probes again and reports against the higher peak."""
    import seekstack.train.trainer as trainer

    monkeypatch.setattr(trainer, "default_peak_flops", lambda device, dtype: Peak(1e6, "a probe on a busy machine"))
    train(run_config(data_dir, tmp_path, max_steps=2, eval_every=0, save_every=0))
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert len(steps) == 2 and all(0 < step["mfu"] < 1 for step in steps)
    assert (
        steps[0]["peak_source"] == "a probe on a busy machine, measured again at step 1"
        and steps[0]["peak_flops"] > 1e6
    )


def test_a_machine_busy_through_every_probe_is_probed_again_a_few_times_only(data_dir, tmp_path, monkeypatch, capsys):
    """Each probe costs about a step of the tiny model: a machine that reads low on every one is not probed on every
    step (the demo's log once held 296 steps of 450 above 100%)."""
    import seekstack.train.trainer as trainer

    probes = []
    monkeypatch.setattr(trainer, "default_peak_flops", lambda device, dtype: Peak(1e6, "a probe on a busy machine"))
    monkeypatch.setattr(trainer, "core_matmul_flops", lambda dtype: probes.append(dtype) or 1e6)
    train(run_config(data_dir, tmp_path, max_steps=6, eval_every=0, save_every=0))
    assert len(probes) == trainer.PEAK_PROBES < 6
    # an MFU above 100% is shown as what it is, not as a utilisation (it read "MFU 1234567.0%")
    last = capsys.readouterr().err.splitlines()[-1]
    mfu = read_metrics(tmp_path)[-1]["mfu"]
    assert mfu > 1 and f"  MFU n/a ({mfu:.0%} of a peak too low)  ETA " in last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_with_bfloat16_activation_checkpointing_and_compile(data_dir, tmp_path):
    from seekstack.checkpoint import load_pretrained

    config = run_config(
        data_dir, tmp_path, max_steps=6, lr=1e-2, save_every=0, dtype="bfloat16",
        activation_checkpointing=True, compile=True,
    )  # fmt: skip
    result = train(config)
    assert all(math.isfinite(loss) for loss in result.losses) and result.losses[-1] < result.losses[0]
    assert {p.dtype for p in load_pretrained(tmp_path / "checkpoints" / "step_6").parameters()} == {torch.float32}
    assert 0 < read_metrics(tmp_path)[0]["mfu"] < 1  # against the card's bf16 peak


def test_the_threads_field_sets_each_steps_threads_and_auto_watches_a_busy_machine(data_dir, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(run_config(data_dir, tmp_path / "fixed", threads=1, max_steps=3, eval_every=0, save_every=0))
        assert [m["threads"] for m in read_metrics(tmp_path / "fixed") if "loss" in m] == [1, 1, 1]
        assert torch.get_num_threads() == 2  # restored after the run
        # auto: step 2 (the second) looks on one thread; the machine's other core reads busy, so the rest stay on one
        monkeypatch.setattr(IdleCores, "idle", lambda self: 0.0)
        train(run_config(data_dir, tmp_path / "auto", max_steps=4, eval_every=0, save_every=0))
        assert [m["threads"] for m in read_metrics(tmp_path / "auto") if "loss" in m] == [2, 1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(data_dir, tmp_path):
    train(run_config(data_dir, tmp_path, max_steps=3, eval_every=0, save_every=0))
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(ConfigError, match=f"out_dir {tmp_path} holds a run \\(checkpoint step_3\\); continue it with"):
        train(run_config(data_dir, tmp_path, max_steps=2, eval_every=0, save_every=0))
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


HOLDER = """
import sys
from pathlib import Path
from seekstack.train.runs import out_dir_held
with out_dir_held(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def another_run_holding(out_dir: Path) -> Iterator[None]:
    """Another process holding `out_dir` as a run training into it does, until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.communicate(timeout=60)


def test_a_run_into_an_out_dir_another_run_is_training_into_is_refused_and_changes_nothing(data_dir, tmp_path):
    """Two runs started into one out_dir before either saved a checkpoint both trained: metrics.jsonl interleaved
    their steps and each saved checkpoints over the other's."""
    train(run_config(data_dir, tmp_path, max_steps=3, eval_every=0, save_every=0))
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with another_run_holding(tmp_path), another_run_holding(tmp_path / "new"):  # runs still training there
        for out_dir, resume in ((tmp_path, True), (tmp_path / "new", False)):
            with pytest.raises(RunInProgress, match=f"out_dir {out_dir}: another run is training into it now"):
                train(run_config(data_dir, out_dir, max_steps=5, eval_every=0, save_every=0), resume=resume)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files
    assert train(run_config(data_dir, tmp_path, max_steps=4, eval_every=0, save_every=0), resume=True).step == 4


@pytest.mark.parametrize(
    ("val_tokens", "problem"),
    [
        (10, "holds 10 tokens, too few for one window of 33"),
        (None, r"val_index\.json: tokenize split 'val' first \(\S+/data holds train\)"),
    ],
    ids=["too-small", "missing"],
)
def test_a_val_split_missing_or_too_small_to_evaluate_is_refused_before_the_first_step(tmp_path, val_tokens, problem):
    write_split(tmp_path / "data", "train", 20_000, seed=1)
    if val_tokens is not None:
        write_split(tmp_path / "data", "val", val_tokens, seed=2)  # `data build --val-fraction 0`: next to nothing
    with pytest.raises(ConfigError, match=f"{problem}; or set eval_every=0"):
        train(run_config(tmp_path / "data", tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step was trained for nothing
    assert train(run_config(tmp_path / "data", tmp_path / "run", eval_every=0, max_steps=1)).step == 1


def test_post_training_into_a_folder_holding_a_run_is_refused_before_its_data_or_teacher_is_read(
    data_dir, tmp_path, monkeypatch
):
    from seekstack.distill import run as distill_run
    from seekstack.distill.config import DistillConfig
    from seekstack.posttrain import rl, sft
    from seekstack.posttrain.config import GRPOConfig, SFTConfig

    train(run_config(data_dir, tmp_path, max_steps=3, eval_every=0, save_every=0))
    base = tmp_path / "checkpoints" / "step_3"

    def built(*args, **kwargs):
        raise AssertionError("the run's data or teacher was read before the folder was checked")

    for module, names in (
        (sft, ["SFTSource"]),
        (rl, ["GRPOSource"]),
        (distill_run, ["conversation_source", "DistillHooks"]),
    ):
        for name in names:
            monkeypatch.setattr(module, name, built)
    runs = (
        lambda: sft.run_sft(SFTConfig(out_dir=str(tmp_path), init_from=str(base))),
        lambda: rl.run_rl(GRPOConfig(out_dir=str(tmp_path), init_from=str(base))),
        lambda: distill_run.run_distill(
            DistillConfig(out_dir=str(tmp_path), teacher=str(base), data_dir=str(data_dir))
        ),
    )
    for run in runs:
        with pytest.raises(ConfigError, match="holds a run \\(checkpoint step_3\\); continue it with --resume"):
            run()


def test_a_seq_len_past_the_models_context_is_refused_and_a_finished_run_resumed_names_its_checkpoint(
    data_dir, tmp_path
):
    with pytest.raises(ConfigError, match="field 'seq_len' has value 300: longer than the model's context"):
        train(run_config(data_dir, tmp_path / "long", seq_len=300, model_overrides={**MICRO_MODEL,
              "max_position_embeddings": 256}))  # fmt: skip
    train(run_config(data_dir, tmp_path / "done", max_steps=2, eval_every=0, save_every=0))
    again = train(run_config(data_dir, tmp_path / "done", max_steps=2, eval_every=0, save_every=0), resume=True)
    assert again.step == 2 and again.checkpoint == tmp_path / "done" / "checkpoints" / "step_2"


def test_sft_rl_distill_or_lora_of_conversations_under_torchrun_is_refused_as_a_setting_every_rank_meets_alike(
    tmp_path,
):
    """A ValueError was printed by every rank (`fail(every_rank=True)`, for a rank's own file); a ConfigError is told
    once per machine. `distill data=traces.jsonl` under torchrun was told 'a batch source (sft, rl) runs in one
    process', naming neither distill nor its conversations; `lora train BASE chats.jsonl` was told 'a batch source
    (sft, rl, distill of conversations: data= or task=)', options it has not, and not the chat file it was given."""
    from seekstack.parallel.distributed import Ranks
    from seekstack.train.trainer import _Run

    rank_1_of_2 = Ranks(rank=1, world_size=2, device=torch.device("cpu"))
    config = TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError) as refused:
        _Run(config, rank_1_of_2, False, None, source=object(), held=contextlib.ExitStack())
    assert str(refused.value) == (
        "conversations (sft, rl and distill's data= or task=, lora train's chat DATA) are trained in one process; "
        "start the run without torchrun (token shards are trained under it: distill's data_dir=, lora train's shards "
        "or text)"
    )
    # distill was told 'parallel=fsdp does not train adapters', which it has none of
    with pytest.raises(ConfigError, match=r"fsdp does not train a model a stage wraps \(hooks: LoRA adapters, distill"):
        _Run(dataclasses.replace(config, parallel="fsdp"), rank_1_of_2, False, object(), None, contextlib.ExitStack())


def test_a_checkpoint_whose_optimizer_state_is_another_optimizers_is_refused_naming_its_file(data_dir, tmp_path):
    """torch's `loaded state dict has a different number of parameter groups` named no file and no way on."""
    train(run_config(data_dir, tmp_path, max_steps=3, eval_every=0))
    checkpoint = list_checkpoints(tmp_path)[-1]
    state = read_train_state(checkpoint)
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]  # one group, where this run has two
    torch.save(state, checkpoint / "train_state.pt")
    with pytest.raises(CheckpointError) as refused:
        train(run_config(data_dir, tmp_path, max_steps=6, eval_every=0), resume=True)
    assert str(refused.value) == (
        f"{checkpoint / 'train_state.pt'}: its optimizer state does not fit this run's optimizer (loaded state dict "
        "has a different number of parameter groups): it was saved for other parameters; start a new run from the "
        f"checkpoint's weights with init_from={checkpoint}"
    )


def test_a_tokenizer_other_than_the_datas_is_a_config_error_every_rank_meets_alike(tmp_path):
    """A `tokenizer` unlike the one the data was tokenized with was refused as a ValueError, which every rank of a
    torchrun printed ("error (rank 1): tokenizer ..."): a setting is alike on every rank, said by rank 0 alone."""
    from seekstack.train.trainer import tokenizer_files
    from tests.posttrain.support import byte_tokenizer

    byte_tokenizer(tmp_path / "tok")
    config = TrainConfig(tokenizer=str(tmp_path / "tok"), data_dir=str(tmp_path / "tokens"))
    with pytest.raises(ConfigError, match=r"tok/tokenizer.json is not the one .*tokens was tokenized with; set `tok"):
        tokenizer_files(config, {"sha256": "another tokenizer's", "path": None})


@pytest.mark.parametrize("rank", [0, 3])
def test_an_expert_parallel_checkpoint_of_fewer_ranks_is_refused_alike_on_every_rank(tmp_path, rank):
    """Resumed at 4 ranks, a checkpoint of 2 ranks' optimizer files was refused by ranks 2 and 3 alone, as a
    ValueError: ranks 0 and 1 found their own file and went on to load a state of other experts. Every rank looks at
    the last rank's file, and refuses it as a ConfigError, said once."""
    from types import SimpleNamespace

    from seekstack.parallel.distributed import Ranks
    from seekstack.train.state import rank_optimizer_file
    from seekstack.train.trainer import _Run

    for saved_rank in (0, 1):
        torch.save({}, tmp_path / rank_optimizer_file(saved_rank))
    run = SimpleNamespace(ranks=Ranks(rank, 4, torch.device("cpu")), config=TrainConfig(expert_parallel=4))
    with pytest.raises(ConfigError, match="holds expert-parallel optimizer state of another number of ranks"):
        _Run._load_rank_optimizer(run, tmp_path, {"expert_parallel": 2})


def test_a_multi_rank_runs_error_keeps_the_frames_of_the_error_its_caller_was_handling(monkeypatch, tmp_path):
    """A failed multi-rank run clears the locals of its own error's frames (they hold the DDP model), but not those of
    the error the caller called train in an `except` block for: they are the caller's, to debug post mortem."""
    from seekstack.parallel import distributed

    def disagree(settings, ranks, **_):
        distributed.require_rows_divisible(3, ranks)  # the run's own frame, innermost

    two_ranks = distributed.Ranks(0, 2, torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_distributed", lambda cpu_collectives: two_ranks)
    monkeypatch.setattr(distributed, "require_same_settings", disagree)

    def callers_step():
        callers_state = "the caller's"
        raise KeyError(callers_state)

    def innermost_locals(error: BaseException) -> dict:
        return [frame for frame, _ in traceback.walk_tb(error.__traceback__)][-1].f_locals

    try:
        callers_step()
    except KeyError as error:
        handled = error
        with pytest.raises(ConfigError) as failure:
            train(TrainConfig(out_dir=str(tmp_path)))
    assert failure.value.__context__ is handled
    assert innermost_locals(failure.value) == {}  # require_rows_divisible's, cleared
    assert innermost_locals(handled) == {"callers_state": "the caller's"}


def test_a_multi_rank_runs_error_keeps_the_locals_of_the_callers_own_code_it_ran(monkeypatch, tmp_path):
    """A failed multi-rank run clears the locals of its own frames (seekstack's and torch's: they hold the DDP model),
    not those of the caller's code it ran (hooks, a callback) in between: the caller's, to debug post mortem."""
    from seekstack.parallel import distributed

    def callers_check(settings, ranks, **_):  # the caller's code, run by train() as a hook is
        callers_state = "the caller's"
        distributed.require_rows_divisible(3, ranks)
        return callers_state

    two_ranks = distributed.Ranks(0, 2, torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_distributed", lambda cpu_collectives: two_ranks)
    monkeypatch.setattr(distributed, "require_same_settings", callers_check)
    with pytest.raises(ConfigError) as failure:
        train(TrainConfig(out_dir=str(tmp_path)))
    frames = {frame.f_code.co_name: frame.f_locals for frame, _ in traceback.walk_tb(failure.value.__traceback__)}
    assert frames["callers_check"]["callers_state"] == "the caller's"
    assert frames["require_rows_divisible"] == {}  # the run's own, cleared
