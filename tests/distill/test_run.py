"""`seekstack distill` through the trainer: the loss it trains on, the checkpoints it writes, exact resume, and the
refusals (tokenizers that differ, a teacher vocabulary short of the tokenizer's)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from typer.testing import CliRunner

from seekstack.checkpoint import CheckpointError, load_pretrained, save_pretrained
from seekstack.cli import app
from seekstack.config import ConfigError
from seekstack.distill.config import DistillConfig
from seekstack.distill.losses import kl_divergence
from seekstack.distill.model import DistillModel
from seekstack.distill.run import STATE_FILE, DistillHooks, run_distill
from seekstack.distill.teacher import Teacher, TopKCache
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import TOKENIZER_FILE, train_tokenizer
from seekstack.train.config import resolve_train_config
from seekstack.train.runs import TRAIN_STATE_FILE
from tests.conftest import micro_config
from tests.distill.support import DENSE_STUDENT, VOCAB, write_data, write_teacher
from tests.support import spawn
from tests.train.test_distributed import free_port


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    shards = write_data(root)
    return {"shards": shards, "teacher": write_teacher(root / "teacher", root / "tokenizer"), "root": root}


def distill_config(workspace, out_dir, **changes) -> DistillConfig:
    base = dict(
        model="tiny", model_overrides=DENSE_STUDENT, data_dir=str(workspace["shards"]), out_dir=str(out_dir),
        teacher=str(workspace["teacher"]), seq_len=24, batch_size=4, max_steps=4, lr=3e-3, min_lr=3e-4,
        warmup_steps=1, eval_every=2, eval_batches=1, save_every=2, keep_checkpoints=2, lmbda=0.5, prompt_tokens=12,
        feature_layers={0: 1, 1: 2}, feature_weights={1: 0.5}, feature_loss="cosine",
    )  # fmt: skip
    return DistillConfig(**{**base, **changes}).validate()


MOE_STUDENT = {**DENSE_STUDENT, "first_k_dense_replace": 1, "n_routed_experts": 4, "n_shared_experts": 1,
               "num_experts_per_tok": 2, "moe_intermediate_size": 16, "n_group": 2, "topk_group": 1,
               "num_nextn_predict_layers": 1}  # fmt: skip


@pytest.mark.parametrize("student_overrides", [DENSE_STUDENT, MOE_STUDENT], ids=["dense", "moe_with_mtp"])
def test_training_loss_is_ce_plus_t_squared_kl_to_the_teacher(workspace, tmp_path, student_overrides):
    config = distill_config(workspace, tmp_path, model_overrides=student_overrides, lmbda=0.0, feature_layers={},
                            feature_weights={}, ce_weight=0.3, kd_weight=0.7, temperature=2.0)  # fmt: skip
    torch.manual_seed(0)
    student = Transformer(config.model_config())
    teacher = Teacher(workspace["teacher"], "float32", torch.device("cpu"))
    model = DistillModel(student, teacher, config, VOCAB).train()
    rows = torch.randint(0, 300, (2, 9))
    loss = model(rows, labels=rows).loss
    with torch.no_grad():
        own = student(rows, labels=rows)  # the student's pretraining loss: CE (+ MTP and balance terms)
        student_logits, teacher_logits = student(rows).logits[:, :-1], teacher.model(rows).logits[:, :-1]
        ce = F.cross_entropy(student_logits.flatten(0, 1), rows[:, 1:].flatten())
        softened_kl = kl_divergence(
            (teacher_logits / 2).log_softmax(-1), (student_logits / 2).log_softmax(-1)
        ).mean()  # forward KL(teacher || student), every position
    expected = 0.3 * ce + (own.loss - own.lm_loss) + 0.7 * 4 * softened_kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    divergence_sum, positions = DistillHooks(config).step_terms(model)["divergence"].tolist()  # what the step logs
    assert positions == 16 and divergence_sum / positions == pytest.approx(4 * softened_kl.item(), rel=1e-5)
    assert (own.loss - own.lm_loss > 0) == (student_overrides is MOE_STUDENT)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert "teacher" not in dict(model.named_modules()) and len(list(model.parameters())) == len(
        list(student.parameters())
    )  # the teacher is neither trained nor saved; no feature maps without feature_layers
    model.eval()
    torch.testing.assert_close(model(rows, labels=rows).lm_loss, ce, rtol=1e-5, atol=1e-6)  # validation: the student


def test_distill_run_writes_the_student_alone_and_resumes_exactly(workspace, tmp_path):
    whole = run_distill(distill_config(workspace, tmp_path / "whole"))  # on-policy batches and feature maps
    checkpoint = whole.checkpoint
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["first_k_dense_replace"] == config["num_hidden_layers"]
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert not any("maps" in key or "mlp.experts" in key for key in keys)  # no feature maps; every layer dense
    assert load_pretrained(checkpoint).config.hidden_size == 32
    state = torch.load(checkpoint / STATE_FILE)
    maps = state["projections"]
    assert set(state) == {"projections"}  # the steps trained, which on_policy_after counts, are the trainer's
    assert {name: tuple(t.shape) for name, t in maps.items()} == {"maps.0.weight": (64, 32), "maps.1.weight": (64, 32)}
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "val_bpb" in line] == [2, 4]  # validation of the student
    assert all(line["val_divergence"] > 0 for line in lines if "val_bpb" in line)  # and of its gap to the teacher
    steps = [line for line in lines if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3, 4]  # each logs its terms beside the cross-entropy:
    for line in steps:  # loss = 0.5 CE + 0.5 T^2 JSD_beta + the feature term (a dense student: no MTP, no balance)
        cross_entropy = line.get("lm_loss", 0.0)  # none on a step of the student's own answers
        assert line["divergence"] > 0 and line["feature_distance"] > 0
        assert line["loss"] == pytest.approx(0.5 * cross_entropy + 0.5 * line["divergence"] + line["feature_distance"])

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_4")
    assert (tmp_path / "cut" / "checkpoints" / "step_2" / TRAIN_STATE_FILE).is_file()
    remapped = distill_config(workspace, tmp_path / "cut", feature_layers={0: 1}, feature_weights={})
    refusal = r"'feature_layers': maps student layers \[0\], but checkpoint .*step_2 holds the learned projections of"
    with pytest.raises(ConfigError, match=refusal + r" student layers \[0, 1\]"):  # was: RuntimeError, Missing key(s)
        run_distill(remapped, resume=True)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "cut", damaged)
    state_file = damaged / "checkpoints" / "step_2" / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])  # was: "[Errno 22] Invalid argument", naming no file
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state_file))}: not a readable training state .* dama"):
        run_distill(distill_config(workspace, damaged), resume=True)
    resumed = run_distill(distill_config(workspace, tmp_path / "cut"), resume=True)
    assert resumed.losses == whole.losses[2:]  # bit for bit
    resumed_maps = torch.load(tmp_path / "cut" / "checkpoints" / "step_4" / STATE_FILE)["projections"]
    assert all(torch.equal(maps[name], resumed_maps[name]) for name in maps)


def test_a_moe_student_trains_and_its_routers_bias_moves_with_the_expert_load(workspace, tmp_path):
    """The trainer's auxiliary-loss-free bias update reaches the student's routers through the DistillModel."""
    config = distill_config(workspace, tmp_path, model_overrides=MOE_STUDENT, max_steps=2, eval_every=0, save_every=2)
    checkpoint = run_distill(config).checkpoint
    bias = load_pretrained(checkpoint).block(1).mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # moved by bias_update_rate x sign(mean load - load) on each step


def test_a_teacher_with_another_tokenizer_is_refused(workspace, tmp_path):
    other = tmp_path / "other_teacher"
    shutil.copytree(workspace["teacher"], other)
    train_tokenizer(["a different corpus, so different merges"] * 30, vocab_size=290, out_path=other)
    result = CliRunner().invoke(app, ["distill", *overrides(workspace, tmp_path, teacher=other)])
    assert result.exit_code == 1
    assert "must share a tokenizer" in result.output and str(other / "tokenizer.json") in result.output
    assert "tokenize the student's data with the teacher's tokenizer.json" in result.output
    # conversations are encoded by the student's tokenizer, not tokenized beforehand: it was told to tokenize them
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    mine = str(workspace["root"] / "tokenizer")
    with pytest.raises(ValueError, match=r"must share a tokenizer; leave `tokenizer` unset \(the teacher's encodes"):
        DistillHooks(distill_config(workspace, tmp_path, teacher=str(other), data=str(chats), tokenizer=mine))
    (other / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        DistillHooks(distill_config(workspace, tmp_path, teacher=str(other)))


def test_a_teacher_folder_that_is_no_checkpoint_is_refused_naming_the_field(workspace, tmp_path):
    """A folder without config.json (a corpus folder given by mistake) was refused as '.../config.json: no such
    file; ...', naming no field, where a missing folder is refused as "field 'teacher' must be ..."."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(): pass\n")
    result = CliRunner().invoke(app, ["distill", *overrides(workspace, tmp_path / "run", teacher=corpus)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: field 'teacher': {corpus / 'config.json'}: no such file; a checkpoint ")
    assert not (tmp_path / "run").exists()


def test_shards_whose_recorded_tokenizer_is_gone_distill_from_the_teacher_of_the_sha256_they_record(
    workspace, tmp_path
):
    """Shards copied or moved without the tokenizer.json their index names train (`train`), but distill was refused
    with '.../tokenizer.json: no such file; train a tokenizer into ...': the teacher's is compared with the sha256."""
    moved = tmp_path / "moved"
    shutil.copytree(workspace["shards"], moved)
    for index in moved.glob("*_index.json"):
        info = json.loads(index.read_text())
        info["tokenizer"]["path"] = str(tmp_path / "gone" / TOKENIZER_FILE)
        index.write_text(json.dumps(info))
    changes = dict(data_dir=str(moved), max_steps=1, eval_every=0, save_every=0, feature_layers={}, feature_weights={})
    assert run_distill(distill_config(workspace, tmp_path / "run", **changes)).step == 1
    other = tmp_path / "other_teacher"
    shutil.copytree(workspace["teacher"], other)
    train_tokenizer(["a different corpus, so different merges"] * 30, vocab_size=290, out_path=other)
    with pytest.raises(ValueError, match=f"differs from the student's {tmp_path / 'gone'}.* of {moved}"):
        DistillHooks(distill_config(workspace, tmp_path / "refused", teacher=str(other), **changes))


def test_a_teacher_with_a_padded_vocabulary_is_compared_on_the_tokenizers_ids(workspace, tmp_path):
    padded = write_teacher(tmp_path / "padded", workspace["root"] / "tokenizer", vocab_size=VOCAB + 20)
    config = distill_config(workspace, tmp_path / "run", teacher=str(padded), lmbda=0.0, feature_layers={},
                            feature_weights={}, ce_weight=0.0, kd_weight=1.0, max_steps=1, eval_every=0)  # fmt: skip
    torch.manual_seed(0)
    student = Transformer(config.model_config())
    teacher = Teacher(padded, "float32", torch.device("cpu"))
    rows = torch.randint(0, VOCAB, (2, 9))
    loss = DistillModel(student, teacher, config, VOCAB).train()(rows, labels=rows).loss
    with torch.no_grad():
        student_logits, teacher_logits = student(rows).logits[:, :-1], teacher.model(rows).logits[:, :-1, :VOCAB]
        expected = kl_divergence(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert run_distill(config).checkpoint is not None  # a student of the tokenizer's 300 ids, as train makes it


def test_a_student_with_a_padded_vocabulary_writes_on_policy_rows_of_the_tokenizers_ids_alone(workspace, tmp_path):
    """The student's padded ids would decode to no token, and the teacher (of the tokenizer's 300) has no row for
    them: on-policy rows must never hold one, however likely the student makes them."""
    torch.manual_seed(0)
    student = Transformer(micro_config(vocab_size=VOCAB + 20, max_position_embeddings=128))
    with torch.no_grad():
        student.lm_head.weight[VOCAB:] = 100 * student.lm_head.weight[:20]  # the padded ids' logits dwarf the rest
    start = tmp_path / "start"
    save_pretrained(student, start)
    shutil.copyfile(workspace["root"] / "tokenizer" / TOKENIZER_FILE, start / TOKENIZER_FILE)
    config = distill_config(workspace, tmp_path / "run", init_from=str(start), model_overrides={}, lmbda=1.0,
                            feature_layers={}, feature_weights={}, max_steps=1, eval_every=0)  # fmt: skip
    assert run_distill(config).step == 1


def test_a_teacher_vocabulary_smaller_than_its_tokenizer_is_refused(workspace, tmp_path):
    short = write_teacher(tmp_path / "short", workspace["root"] / "tokenizer", vocab_size=VOCAB - 10)
    with pytest.raises(ValueError, match=rf"teacher's vocab_size={VOCAB - 10} .* smaller than its tokenizer's {VOCAB}"):
        run_distill(distill_config(workspace, tmp_path, teacher=str(short)))


def overrides(workspace, out_dir, **changes) -> list[str]:
    values = {"data_dir": workspace["shards"], "out_dir": out_dir, "teacher": workspace["teacher"], "max_steps": 1,
              "seq_len": 24, "batch_size": 2, **changes}  # fmt: skip
    return [f"{key}={value}" for key, value in values.items()] + ["model.num_hidden_layers=2"]


def _rank_main(rank: int, world_size: int, port: int, config: DistillConfig) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    run_distill(config)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ddp_ranks_distill_like_one_process_at_the_same_global_batch(workspace, tmp_path):
    changes = dict(lmbda=0.0, max_steps=2, eval_every=0, save_every=0)  # with the teacher and the feature maps
    single = run_distill(distill_config(workspace, tmp_path / "one", **changes))
    spawn(_rank_main, (2, free_port(), distill_config(workspace, tmp_path / "two", **changes)))
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in two] == pytest.approx(single.losses, abs=1e-5)
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for name in ("divergence", "feature_distance"):  # the terms' means over both ranks' positions, as one process's
        assert [line[name] for line in two] == pytest.approx([line[name] for line in one], abs=1e-5)


def test_teacher_scores_of_a_corpus_batch_come_from_the_top_k_cache_the_second_time(workspace, tmp_path):
    cache = TopKCache(tmp_path / "cache", top_k=16, teacher_dir=workspace["teacher"])
    teacher = Teacher(workspace["teacher"], "float32", torch.device("cpu"), cache)
    rows = torch.randint(0, 300, (2, 9))
    every_position = torch.ones(2, 8, dtype=torch.bool)
    first = teacher.score(rows, every_position, []).logits
    exact = teacher.model(rows).logits[:, :-1].flatten(0, 1).log_softmax(-1)
    top = exact.topk(16, dim=-1)
    torch.testing.assert_close(first.gather(1, top.indices), top.values, atol=1e-2, rtol=0)
    teacher.model.forward = None  # the teacher must not run again
    torch.testing.assert_close(teacher.score(rows, every_position, []).logits, first)


def test_on_policy_rows_of_a_student_trained_at_its_full_context_are_written_within_it(workspace, tmp_path):
    """A corpus row is seq_len + 1 tokens: at seq_len = the student's max_position_embeddings (which train takes) the
    engine was built one token longer and refused it, 'max_model_len=25 is longer than the model's context'."""
    student = {**DENSE_STUDENT, "max_position_embeddings": 24}
    changes = dict(lmbda=1.0, max_steps=1, eval_every=0, save_every=0, feature_layers={}, feature_weights={})
    config = distill_config(workspace, tmp_path / "run", model_overrides=student, **changes)
    assert run_distill(config).step == 1
    hooks = DistillHooks(config)
    model = hooks.prepare(Transformer(config.model_config()))
    rows = torch.randint(2, VOCAB, (4, 25))
    generated, labels, compared, _, _ = model.generations(rows, rows)
    assert generated.shape == (4, 24) and torch.equal(generated[:, :12], rows[:, :12])
    assert int(compared.sum(1)[0]) == 12  # the positions predicting the 12 written tokens


def test_a_teacher_cache_is_refused_for_a_teacher_rewritten_into_its_folder(workspace, tmp_path):
    """The cache was keyed on the teacher's folder alone: a teacher re-exported there was served the first one's
    log-probabilities without a word (its val_divergence equal to the first teacher's to 4 digits)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(workspace["teacher"], teacher)
    TopKCache(tmp_path / "cache", 16, teacher)
    TopKCache(tmp_path / "cache", 16, teacher)  # the same teacher: served
    model = load_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    save_pretrained(model, teacher)
    with pytest.raises(ValueError, match=r"holds log-probabilities of .*re-exported into its folder has other weights"):
        TopKCache(tmp_path / "cache", 16, teacher)


def test_a_teacher_of_a_context_shorter_than_seq_len_is_refused_before_anything_is_written(workspace, tmp_path):
    """It scored every position of a row all the same, the student learning its untrained predictions past its
    context (a teacher of 64 positions distilled rows of 91 tokens without a word)."""
    short = write_teacher(tmp_path / "short", workspace["root"] / "tokenizer", context=16)
    config = distill_config(workspace, tmp_path / "run", teacher=str(short), feature_layers={}, feature_weights={})
    refusal = f"field 'seq_len' must be at most the teacher's context of 16 tokens (max_position_embeddings of {short})"
    with pytest.raises(ConfigError, match=re.escape(refusal)):
        run_distill(config)
    assert not (tmp_path / "run").exists()
    assert run_distill(dataclasses.replace(config, seq_len=16, max_steps=1, eval_every=0)).step == 1


def test_configs_that_cannot_distill_are_refused_before_anything_is_written(workspace, tmp_path):
    refused = {
        "teacher": dict(teacher=str(tmp_path / "nosuch")),  # was: "has no tokenizer.json ... copy it"
        "kd_weight": dict(ce_weight=0.0, kd_weight=0.0),  # trained on a loss of 0
        "lmbda": dict(kd_weight=0.0, lmbda=0.5),  # was: on-policy rows generated, then trained on by nothing
        "task": dict(task="addition", data=str(tmp_path / "traces.jsonl")),  # which one was used?
        "cache_top_k": dict(teacher_cache=str(tmp_path / "cache"), cache_top_k=100_000),  # was: a traceback
        "teacher_cache": dict(teacher_cache=str(workspace["teacher"] / "config.json")),  # was: [Errno 17] File exists
        "data": dict(data=str(tmp_path)),  # was: [Errno 21] Is a directory
        "tokenizer": dict(tokenizer=str(tmp_path)),  # was: ".../tokenizer.json: no such file; train a tokenizer ..."
        "init_from": dict(init_from=str(tmp_path / "nosuch")),  # was: "...: no such folder"
    }
    logits_alone = dict(feature_layers={}, feature_weights={})
    for field, changes in refused.items():
        with pytest.raises(ConfigError, match=f"field '{field}' must be"):
            run_distill(distill_config(workspace, tmp_path / field, **logits_alone, **changes))
        assert not (tmp_path / field).exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("trl_name", "ours"),
    [("seq_kd=true", "`seekstack traces TEACHER --out traces.jsonl`"),
     ("max_new_tokens=128", "TRL's max_new_tokens is seq_len less the prompt"),
     ("teacher_model_name_or_path=runs/teacher", "is teacher here"),
     ("teacher_model_init_kwargs.dtype=bfloat16", "teacher_dtype=float32|bfloat16"),
     ("disable_dropout=true", "the models have no dropout"),
     ("top_k=10", "there is no top-k or top-p here (cache_top_k is the teacher cache's, not sampling's)"),
     ("top_p=0.9", "samples from its whole distribution at sample_temperature (TRL's top_p=1.0"),
     ("max_completion_length=128", "TRL's max_completion_length is seq_len less the prompt"),
     # were asked "did you mean" min_lr (the learning rate's floor) and grad_compression
     ("min_p=0.1", "there is no top-k or top-p here, nor min-p (TRL's min_p=None, its default)"),
     ("log_completions=true", "distill logs no completions"), ("num_completions_to_print=2", "logs no completions")],
)  # fmt: skip
def test_trls_gkd_field_names_are_refused_naming_what_does_their_work(trl_name, ours):
    """A TRL GKDConfig or DistillationConfig name is no field here: the refusal says what stands for it (seq_kd was
    offered seq_len, DistillationConfig's sampling top_k the teacher cache's cache_top_k)."""
    name = trl_name.split("=")[0].split(".")[0]
    with pytest.raises(ConfigError, match=f"unknown field '{name}'; .*{re.escape(ours)}"):
        resolve_train_config(None, [trl_name], cls=DistillConfig)


def test_the_readme_gives_the_keys_of_a_gkd_trainer_run_with_gkdconfigs_defaults(workspace):
    """Our defaults are not GKDConfig's (beta, lmbda, the sampling temperature, a CE term beside the divergence), and
    nothing said so: a TRL user's run with its defaults was off-policy forward KL. The README's command has TRL's."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    trl_defaults = {field.name: field.default for field in dataclasses.fields(gkd.GKDConfig)}
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    command = re.search(r"A `GKDTrainer` run with GKDConfig's\s+defaults is `seekstack distill \.\.\. ([^`]+)`", readme)
    assert command, "the README names no distill command for GKDConfig's defaults"
    config = resolve_train_config(None, [*command[1].split(), f"teacher={workspace['teacher']}"], cls=DistillConfig)
    defaults = DistillConfig()
    trl_divergence = (trl_defaults["beta"], trl_defaults["lmbda"])
    assert (config.beta, config.lmbda) == trl_divergence != (defaults.beta, defaults.lmbda)
    assert config.sample_temperature == trl_defaults["temperature"] != defaults.sample_temperature
    assert (config.ce_weight, config.kd_weight, config.temperature) == (0.0, 1.0, 1.0)  # the divergence alone, at T=1


def test_the_readme_gives_the_keys_of_a_distillation_trainer_run_whose_loss_is_trls(workspace):
    """TRL's DistillationTrainer applies its temperature to the divergence without Hinton's T^2, which the loss here
    has, and nothing said so: a TRL user's temperature=2 trained on 4 times its divergence. The README's command
    has the loss of a DistillationTrainer run at T=2, checked against TRL's own divergence on the same logits."""
    pytest.importorskip("trl")
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.trainer.distillation_config import DistillationConfig

    from seekstack.distill.losses import logit_distillation

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    command = re.search(r"a `DistillationTrainer` run at T=2 is `seekstack distill \.\.\.\s+([^`]+)`", readme)
    assert command, "the README names no distill command for a DistillationTrainer run"
    config = resolve_train_config(None, [*command[1].split(), f"teacher={workspace['teacher']}"], cls=DistillConfig)
    trl_beta = next(field.default for field in dataclasses.fields(DistillationConfig) if field.name == "beta")
    assert (config.beta, config.lmbda, config.ce_weight) == (trl_beta, 1.0, 0.0)  # on-policy, the divergence alone
    assert config.temperature == config.sample_temperature == 2.0
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 8), torch.randn(6, 12)  # (N, H) hidden states of unequal widths
    student_head, teacher_head = torch.randn(32, 8), torch.randn(32, 12)  # (V, H)
    beta, temperature = float(config.beta), config.temperature
    theirs, _ = ChunkedDivergenceFunction.apply(
        student, student_head, None, teacher, teacher_head, None, beta, temperature
    )
    ours = config.kd_weight * logit_distillation(student @ student_head.T, teacher @ teacher_head.T, beta, temperature)
    torch.testing.assert_close(ours, theirs.mean(), rtol=1e-5, atol=1e-6)
