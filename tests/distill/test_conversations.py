"""`seekstack distill` on conversations (the SFT stage's data and batch source): every loss on the assistant's
tokens only, on-policy answers to the conversations' prompts from the current weights, held-out conversations scored
every eval_every steps (as SFT's), exact resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from seekstack.checkpoint import load_pretrained
from seekstack.config import ConfigError
from seekstack.distill.config import DistillConfig
from seekstack.distill.losses import kl_divergence
from seekstack.distill.model import DistillModel
from seekstack.distill.onpolicy import StudentGenerations, conversation_prompts, generated_positions
from seekstack.distill.run import DistillHooks, run_distill
from seekstack.distill.teacher import Teacher, TopKCache, layer_outputs
from seekstack.infer import Engine, SamplingParams
from seekstack.model.head_loss import IGNORE_INDEX
from seekstack.model.transformer import Transformer
from seekstack.posttrain.conversations import (
    HELD_OUT_FILE,
    conversation_key,
    encode_conversation,
    labelled_text_bytes,
    read_held_out,
    task_conversations,
    write_conversations,
)
from seekstack.posttrain.packing import best_fit_decreasing
from seekstack.posttrain.sft import SFTSource
from seekstack.posttrain.tasks import make_task
from seekstack.tokenizer import TOKENIZER_FILE
from seekstack.train.plot import plot_run
from seekstack.train.state import set_rng_state
from tests.distill.support import DENSE_STUDENT, VOCAB, write_teacher
from tests.posttrain.support import byte_tokenizer, loss_and_gradients


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_conversations")
    byte_tokenizer(root / "tokenizer")
    return {"teacher": write_teacher(root / "teacher", root / "tokenizer")}


def conversation_config(workspace, out_dir, **changes) -> DistillConfig:
    """1-digit addition traces (about 90 byte tokens each, most of them the prompt) for a dense micro student."""
    base = dict(
        model="tiny", model_overrides=DENSE_STUDENT, out_dir=str(out_dir), teacher=str(workspace["teacher"]),
        task="addition", difficulty=1, examples=16, seq_len=128, batch_size=2, max_steps=4, lr=3e-3, min_lr=3e-4,
        warmup_steps=1, eval_every=0, save_every=2, keep_checkpoints=2,
    )  # fmt: skip
    return DistillConfig(**{**base, **changes}).validate()


def test_conversation_losses_count_the_assistant_tokens_only(workspace, tmp_path):
    config = conversation_config(workspace, tmp_path, ce_weight=0.3, kd_weight=0.7, temperature=2.0,
                                 feature_layers={0: 1}, feature_loss="mse")  # fmt: skip
    input_ids, labels = SFTSource(config).batch(2, progress=0.0)
    torch.manual_seed(0)
    student = Transformer(config.model_config())
    teacher = Teacher(workspace["teacher"], "float32", torch.device("cpu"))
    model = DistillModel(student, teacher, config, VOCAB).train()
    loss = model(input_ids, labels=labels).loss
    answer = labels[:, 1:] != IGNORE_INDEX  # (B, T - 1): the positions predicting the assistant's tokens
    assert 0 < answer.sum() < answer.numel() / 2  # the system and user turns and the padding are left out
    with torch.no_grad(), layer_outputs(student, [0]) as mine, layer_outputs(teacher.model, [1]) as theirs:
        student_logits = student(input_ids).logits[:, :-1][answer]
        teacher_logits = teacher.model(input_ids).logits[:, :-1][answer]
        ce = F.cross_entropy(student_logits, labels[:, 1:][answer])
        softened_kl = kl_divergence((teacher_logits / 2).log_softmax(-1), (student_logits / 2).log_softmax(-1)).mean()
        feature = F.mse_loss(model.projections.maps["0"](mine[0][:, :-1][answer]), theirs[1][:, :-1][answer])
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * 4 * softened_kl + feature, rtol=1e-5, atol=1e-6)


def test_on_policy_prompts_end_before_the_last_trained_assistant_turn_and_only_generated_tokens_are_compared(
    tmp_path,
):
    """As TRL's GKD prompts with a conversation's messages but the last, the student answers the last trained
    assistant turn, the turns before it its context (it answered the first turn, the later ones dropped: a multi-turn
    conversation's later turns were never answered on-policy)."""
    input_ids = torch.tensor([[5, 6, 7, 8, 2], [5, 6, 9, 4, 2]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 2], [IGNORE_INDEX] * 3 + [4, IGNORE_INDEX]])
    assert conversation_prompts(input_ids, labels) == [[5, 6, 7, 8], [5, 6, 9]]
    tokenizer = byte_tokenizer(tmp_path)
    chat = [{"role": "user", "content": "1 + 2?"}, {"role": "assistant", "content": "<think> 3 </think> 3"}]
    chat += [{"role": "user", "content": "还有 2 + 2？"}, {"role": "assistant", "content": "<think> 4 </think> 4"}]
    ids, row_labels = encode_conversation(tokenizer, chat)
    assert conversation_prompts(torch.tensor([ids]), torch.tensor([row_labels])) == [
        tokenizer.encode_chat(chat[:3], add_generation_prompt=True)
    ]
    # prompts of 2 and 3 tokens answered with 3 and 1 tokens: positions 1..3 and 2 predict the answers
    compared = generated_positions(torch.tensor([2, 3]), torch.tensor([3, 1]), width=6)
    assert compared.tolist() == [[False, True, True, True, False], [False, False, True, False, False]]


def test_on_policy_answers_come_from_the_current_weights_not_stale_cached_prompts(workspace, tmp_path):
    config = conversation_config(workspace, tmp_path)
    source = SFTSource(config)
    input_ids, labels = source.batch(2, progress=0.0)  # the same system prompt: prefix blocks the cache shares
    torch.manual_seed(0)
    student = Transformer(config.model_config())
    generations = StudentGenerations(student, source.tokenizer, 2, 128, prompt_tokens=None, temperature=1.0)
    torch.manual_seed(1)
    generations(input_ids, labels)
    with torch.no_grad():  # an optimizer step: the weights change in place
        for parameter in student.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    torch.manual_seed(2)
    rows, no_labels, compared, _, _ = generations(input_ids, labels)
    fresh = StudentGenerations(student, source.tokenizer, 2, 128, prompt_tokens=None, temperature=1.0)
    torch.manual_seed(2)
    assert torch.equal(rows, fresh(input_ids, labels)[0])
    assert (no_labels == IGNORE_INDEX).all() and compared.any(dim=1).all()
    assert student.training


def test_on_policy_answers_that_stop_early_leave_their_padding_out_of_the_moe_statistics(workspace, tmp_path):
    """An answer that ends at EOS is padded to the longest row: the student's expert load counts its tokens (prompt,
    answer, EOS) and not the padding after them, as SFT's and GRPO's rows do."""
    config = conversation_config(workspace, tmp_path)
    source = SFTSource(config)
    input_ids, labels = source.batch(4, progress=0.0)
    student = Transformer(config.model_config())
    with torch.no_grad():
        student.lm_head.weight.zero_()  # every token equally likely: EOS ends some answers early, not all
    generations = StudentGenerations(student, source.tokenizer, 4, 128, prompt_tokens=None, temperature=1.0)
    torch.manual_seed(0)
    rows, _, compared, counted, _ = generations(input_ids, labels)
    prompt_lengths = torch.tensor([len(prompt) for prompt in conversation_prompts(input_ids, labels)])
    eos = source.tokenizer.eos_id
    lengths = torch.tensor(
        [p + next((t + 1 for t, token in enumerate(row[p:].tolist()) if token == eos), row.shape[0] - p)
         for p, row in zip(prompt_lengths.tolist(), rows, strict=True)]
    )  # fmt: skip
    assert (lengths < rows.shape[1]).any() and (lengths == rows.shape[1]).any()  # padded rows beside a full one
    assert torch.equal(counted.sum(dim=1), lengths)
    assert torch.equal(counted, torch.arange(rows.shape[1])[None, :] < lengths[:, None])
    assert not (compared & ~counted[:, 1:]).any()  # the teacher compares nothing that is not counted


def test_conversation_distillation_goes_on_policy_after_its_warm_up_and_resumes_exactly(workspace, tmp_path):
    changes = dict(lmbda=1.0, on_policy_after=2, feature_layers={1: 2}, max_steps=4, save_every=2)
    whole = run_distill(conversation_config(workspace, tmp_path / "whole", **changes))
    lines = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # reference answers (cross-entropy) for 2 steps, then the student's own answers (no reference, no cross-entropy)
    assert ["lm_loss" in line for line in lines] == [True, True, False, False]
    assert [line["assistant_tokens"] > 0 for line in lines] == [True, True, False, False]
    assert all(line["lm_loss"] > 0 for line in lines[:2])
    teacher_tokenizer = (workspace["teacher"] / TOKENIZER_FILE).read_bytes()
    assert (whole.checkpoint / TOKENIZER_FILE).read_bytes() == teacher_tokenizer  # tokenizer "" = the teacher's

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_4")
    resumed = run_distill(conversation_config(workspace, tmp_path / "cut", **changes), resume=True)
    assert resumed.losses == whole.losses[2:]  # bit for bit, on-policy from the first resumed step


def test_ctrl_c_during_a_step_leaves_the_on_policy_warm_up_to_the_steps_completed(workspace, tmp_path, monkeypatch):
    changes = dict(lmbda=1.0, on_policy_after=2, max_steps=3, save_every=0)
    whole = run_distill(conversation_config(workspace, tmp_path / "whole", **changes))
    score, scored = Teacher.score, []

    def interrupted(self, *args, **kwargs):
        scored.append(self)
        if len(scored) == 2:  # Ctrl-C while the teacher scores step 2's micro-batch
            raise KeyboardInterrupt
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Teacher, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_distill(conversation_config(workspace, tmp_path / "cut", **changes))
    monkeypatch.setattr(Teacher, "score", score)
    resumed = run_distill(conversation_config(workspace, tmp_path / "cut", **changes), resume=True)
    for run in ("whole", "cut"):  # was: the cut step's micro-batch counted, step 2 of the resumed run on-policy
        lines = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert ["lm_loss" in line for line in lines] == [True, True, False]
    assert resumed.losses == whole.losses[1:]  # bit for bit


def evaluations(out_dir) -> list[dict]:
    """The val_loss records of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if "val_loss" in record]


def test_held_out_conversations_are_left_out_of_training_and_val_loss_is_the_students_loss_on_them(workspace, tmp_path):
    data = write_conversations(task_conversations(make_task("addition", 1), 16, seed=0), tmp_path / "sums.jsonl")
    changes = dict(task="", data=str(data), val_fraction=0.25, eval_every=2, eval_batches=2, save_every=0)
    config = conversation_config(workspace, tmp_path / "run", **changes)
    run_distill(config)  # was: eval_every evaluated nothing, and no val_loss was logged
    source = SFTSource(config, holds_out=True)  # type: ignore[arg-type]
    assert len(source.validation) == 4 and len(source.rows.rows) == 12
    assert {tuple(ids) for ids, _ in source.validation}.isdisjoint(tuple(ids) for ids, _ in source.rows.rows)
    assert read_held_out(tmp_path / "run") == {conversation_key(c) for c in source.held_out}
    logged = evaluations(tmp_path / "run")
    assert [record["step"] for record in logged] == [2, 4]
    # directly: the student's summed cross-entropy on every assistant token of the 4 held-out conversations, and its
    # KL from the teacher (beta 0, temperature 1) at the positions predicting them, over the tokenizer's ids
    student = load_pretrained(tmp_path / "run" / "checkpoints" / "step_4").eval()
    teacher = load_pretrained(workspace["teacher"]).eval()
    nats, kl, targets, text_bytes = 0.0, 0.0, 0, 0
    for ids, labels in source.validation:
        answer = torch.tensor(labels[1:]) != IGNORE_INDEX
        with torch.no_grad():
            logits, teacher_logits = (model(torch.tensor([ids])).logits[0, :-1] for model in (student, teacher))
        nats += F.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum").item()
        mine, theirs = (x[answer, : source.tokenizer.vocab_size].log_softmax(-1) for x in (logits, teacher_logits))
        kl += kl_divergence(theirs, mine).sum().item()
        targets += int(answer.sum())
        text_bytes += labelled_text_bytes(source.tokenizer, labels, config.seq_len)
    assert logged[-1]["val_loss"] == pytest.approx(nats / targets, rel=1e-5)
    assert logged[-1]["val_bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)
    assert logged[-1]["val_divergence"] == pytest.approx(kl / targets, rel=1e-4)


def test_a_resumed_conversation_run_keeps_its_held_out_set_and_logs_the_same_val_loss(workspace, tmp_path):
    changes = dict(val_fraction=0.25, eval_every=2, eval_batches=2, max_steps=4, save_every=2, threads=2)
    run_distill(conversation_config(workspace, tmp_path / "whole", **changes))
    held_out = read_held_out(tmp_path / "whole")
    assert len(held_out) == 4  # distinct problems of the task's held-out split
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_4")
    run_distill(conversation_config(workspace, tmp_path / "cut", **changes), resume=True)
    assert read_held_out(tmp_path / "cut") == held_out
    assert evaluations(tmp_path / "cut") == evaluations(tmp_path / "whole")  # step 4's scored the same conversations


def test_a_conversation_run_from_before_its_hold_out_resumes_only_on_its_rows(workspace, tmp_path):
    """A run started before distillation held conversations out trained on all of them and has no held_out.json. On a
    data file, holding some out now changes its rows: refused naming init_from; holding none out, it resumes. A task's
    held-out problems come from another split: its rows are the same, so it resumes and records them."""
    data = write_conversations(task_conversations(make_task("addition", 1), 16, seed=0), tmp_path / "sums.jsonl")
    on_data, held_out = dict(task="", data=str(data)), dict(val_fraction=0.25, eval_every=2)
    for run_dir, source in ((tmp_path / "data", on_data), (tmp_path / "task", {})):
        run_distill(conversation_config(workspace, run_dir, max_steps=2, save_every=2, **source))
        (run_dir / HELD_OUT_FILE).unlink()  # the run folder an earlier seekstack left

    with pytest.raises(ValueError, match="has no held_out.json: its run was started by an earlier") as refusal:
        run_distill(conversation_config(workspace, tmp_path / "data", max_steps=3, **on_data, **held_out), resume=True)
    assert f"init_from={tmp_path / 'data'} (its newest checkpoint) and another out_dir" in str(refusal.value)
    assert run_distill(conversation_config(workspace, tmp_path / "data", max_steps=3, **on_data), resume=True).step == 3
    assert read_held_out(tmp_path / "data") == set()

    task_run = conversation_config(workspace, tmp_path / "task", max_steps=3, **held_out)
    assert run_distill(task_run, resume=True).step == 3
    assert len(read_held_out(tmp_path / "task")) == 4


def test_held_out_fields_are_refused_on_token_shards_or_out_of_range_naming_their_key(workspace, tmp_path):
    for changes, message in [
        (dict(task="", val_fraction=0.1), "field 'val_fraction' must be unset without data or task"),
        (dict(task="", val_data="chats.jsonl"), "field 'val_data' must be unset without data or task"),
        (dict(val_fraction=1.0), "field 'val_fraction' must be below 1 (1 leaves nothing to train on)"),
        (dict(val_data="nope.jsonl"), "field 'val_data' must be a JSONL file of conversations, not 'nope.jsonl'"),
    ]:
        with pytest.raises(ConfigError) as refusal:
            conversation_config(workspace, tmp_path / "run", **changes)
        assert message in str(refusal.value), (changes, str(refusal.value))


def test_teacher_cache_serves_conversation_batches_on_a_rerun_and_keeps_on_policy_answers_out(workspace, tmp_path):
    cache = tmp_path / "cache"
    first = run_distill(conversation_config(workspace, tmp_path / "first", teacher_cache=str(cache), cache_top_k=16))
    cached = sorted(cache.glob("*.pt"))
    assert len(cached) == 4  # one per step's batch of reference answers (was: none, the option ignored)
    rerun = run_distill(conversation_config(workspace, tmp_path / "rerun", teacher_cache=str(cache), cache_top_k=16))
    assert sorted(cache.glob("*.pt")) == cached and rerun.losses == first.losses  # read back, not scored again
    changes = dict(teacher_cache=str(tmp_path / "on_policy_cache"), lmbda=1.0, on_policy_after=2, max_steps=3)
    run_distill(conversation_config(workspace, tmp_path / "on_policy", **changes))
    assert len(list((tmp_path / "on_policy_cache").glob("*.pt"))) == 2  # the student's own answers differ every time


def test_teacher_cache_keys_a_conversation_batch_by_its_compared_positions_too(workspace, tmp_path):
    teacher = Teacher(workspace["teacher"], "float32", torch.device("cpu"), TopKCache(tmp_path / "cache", 16, "t"))
    rows = torch.randint(0, VOCAB, (2, 9))
    answer, longer_answer = torch.zeros(2, 8, dtype=torch.bool), torch.zeros(2, 8, dtype=torch.bool)
    answer[:, 5:], longer_answer[:, 3:] = True, True  # the same tokens with an earlier turn of weight 1
    first = teacher.score(rows, answer, []).logits
    assert first.shape == (6, VOCAB) and teacher.score(rows, longer_answer, []).logits.shape == (10, VOCAB)
    exact = teacher.model(rows).logits[:, :-1][answer].log_softmax(-1).topk(16, dim=-1)
    torch.testing.assert_close(first.gather(1, exact.indices), exact.values, atol=1e-2, rtol=0)
    teacher.model.forward = None  # the teacher must not run again
    torch.testing.assert_close(teacher.score(rows, answer, []).logits, first)


def test_on_policy_distillation_trains_on_past_conversations_whose_prompt_fills_seq_len(workspace, tmp_path, capsys):
    """A prompt longer than seq_len leaves no room for an answer: it is left out of the training rows (as the start's
    note says), whatever the batch size, and the run goes on."""
    short = [{"role": "user", "content": f"What is {i} + {i}?"} for i in range(3)]
    long_prompt = {"role": "user", "content": "x" * 500}
    conversations = [[question, {"role": "assistant", "content": "Even."}] for question in [*short, long_prompt]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    changes = dict(task="", data=str(data), seq_len=64, lmbda=1.0, feature_layers={1: 2}, save_every=0)
    for batch_size in (1, 2):  # 1: a micro-batch of the long prompt alone; 2: beside an answered one
        out_dir = tmp_path / f"batch_{batch_size}"
        result = run_distill(conversation_config(workspace, out_dir, batch_size=batch_size, **changes))
        err = capsys.readouterr().err
        assert "1 of 4 conversations have no assistant token within seq_len=64" in err
        assert "step 4/4  loss (total) " in err  # no next-token loss: nothing was labelled
        assert result.step == 4 and (out_dir / "checkpoints" / "step_4").is_dir()
        lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(line["loss"]) and "lm_loss" not in line for line in lines)
    assert plot_run(out_dir).is_file()  # its curves leave out the next-token loss it has none of


def test_a_conversation_run_refused_after_its_conversations_are_read_writes_nothing_into_out_dir(workspace, tmp_path):
    """A student whose context is shorter than seq_len is refused once it is built, after the conversations were
    read and split: held_out.json was written by then, into an out_dir the refused run never used."""
    short_context = {**DENSE_STUDENT, "max_position_embeddings": 64}
    config = conversation_config(workspace, tmp_path / "run", model_overrides=short_context, val_fraction=0.25)
    with pytest.raises(ConfigError, match="field 'seq_len' has value 128: longer than the model's context"):
        run_distill(config)
    assert not (tmp_path / "run").exists()


def test_val_divergence_is_shown_where_val_loss_is_in_the_progress_plot_and_report(
    workspace, tmp_path, capsys, monkeypatch
):
    """val_divergence (the student's T^2 JSD_beta from its teacher on the held-out conversations) was logged to
    metrics.jsonl only: the evaluation's line, the curves and the report's validation table showed val_loss alone."""
    from seekstack.eval.report import _training
    from seekstack.train import plot

    changes = dict(val_fraction=0.25, eval_every=2, max_steps=4, save_every=0)
    run_distill(conversation_config(workspace, tmp_path / "run", **changes))
    logged = evaluations(tmp_path / "run")
    err = capsys.readouterr().err
    for record in logged:
        assert f"bits/byte, divergence {record['val_divergence']:.4f}" in err

    figures = []
    monkeypatch.setattr(plot.plt, "close", figures.append)
    plot_run(tmp_path / "run")
    curves = {line.get_label(): line.get_ydata().tolist() for line in figures[0].axes[0].get_lines()}
    assert curves["validation divergence"] == [record["val_divergence"] for record in logged]

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    table = _training(tmp_path / "run", tmp_path / "report", {}, records)
    assert "| step | val loss | val bits/byte | val divergence |" in table
    assert (
        f"| 4 | {logged[-1]['val_loss']:.4f} | {logged[-1]['val_bpb']:.4f} | {logged[-1]['val_divergence']:.4f} |"
        in table
    )


SHORT_CHATS = [
    [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}],
    [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join(["one"] * 6)}],
]


def test_a_packed_batch_has_the_distillation_loss_and_gradients_of_the_same_conversations_padded(workspace, tmp_path):
    """TRL's packing=True on distillation (the student's cross-entropy, the teacher's divergence and its hidden states
    all per conversation): the same loss and gradients as one conversation a row."""
    data = write_conversations(SHORT_CHATS, tmp_path / "chats.jsonl")
    changes = dict(data=str(data), task="", ce_weight=0.3, kd_weight=0.7, temperature=2.0)
    config = conversation_config(workspace, tmp_path, **changes, feature_layers={0: 1}, packing=True)
    padded, packed = SFTSource(config), SFTSource(config, packing=True)
    padded_batch, packed_batch = padded.batch(4, 0.0), packed.batch(len(packed.rows.rows), 0.0)
    assert packed_batch[0].shape[0] < 4  # every conversation, in fewer rows
    torch.manual_seed(0)
    model = DistillModel(
        Transformer(config.model_config()), Teacher(workspace["teacher"], "float32", torch.device("cpu")), config, VOCAB
    ).train()

    (rows, row_grads) = loss_and_gradients(model, padded, padded_batch)
    (pack, pack_grads) = loss_and_gradients(model, packed, packed_batch)
    torch.testing.assert_close(pack.loss, rows.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pack.lm_loss, rows.lm_loss, rtol=1e-5, atol=1e-6)
    for grad, reference in zip(pack_grads, row_grads, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


def test_packed_held_out_conversations_score_the_val_loss_and_divergence_of_the_same_conversations_padded(
    workspace, tmp_path
):
    """With packing the held-out rows are packed too (TRL's eval_packing follows packing): the student's loss and
    its divergence from the teacher, each a mean over the assistant tokens, are those of the rows padded."""
    data = write_conversations(SHORT_CHATS, tmp_path / "chats.jsonl")
    val_data = write_conversations(SHORT_CHATS, tmp_path / "held_out.jsonl")
    changes = dict(data=str(data), task="", val_data=str(val_data), eval_every=2, beta=0.5, temperature=2.0)
    config = conversation_config(workspace, tmp_path, **changes, packing=True)
    torch.manual_seed(0)
    model = DistillModel(
        Transformer(config.model_config()), Teacher(workspace["teacher"], "float32", torch.device("cpu")), config, VOCAB
    ).eval()
    scores = []
    for packing in (False, True):
        batches = SFTSource(config, holds_out=True, packing=packing).validation_batches(4, 1)
        loss, divergence, targets = 0.0, 0.0, 0
        for batch in batches:
            packed = {} if batch.positions is None else {"positions": batch.positions}
            with torch.no_grad():
                out = model(batch.input_ids, labels=batch.labels, keep_logits=False, **packed)
                terms = model.validation_terms(batch.input_ids, batch.labels, out, **packed)
            count = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
            loss, divergence, targets = (
                loss + out.lm_loss * count,
                divergence + terms["divergence"] * count,
                targets + count,
            )
        scores.append((loss / targets, divergence / targets, sum(batch.input_ids.numel() for batch in batches)))
    (padded_loss, padded_divergence, padded_size), (packed_loss, packed_divergence, packed_size) = scores
    assert packed_size < padded_size
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_divergence, padded_divergence, rtol=1e-5, atol=1e-6)


def test_packed_conversations_are_answered_each_on_its_own_and_the_answers_packed_again(workspace, tmp_path):
    """On-policy with packing: the student answers each conversation of a packed row from its own prompt, and the
    answered conversations are packed again, each with its positions from 0; the teacher compares the positions
    predicting generated tokens alone, the MoE statistics count every token but the padding."""
    data = write_conversations(SHORT_CHATS, tmp_path / "chats.jsonl")
    config = conversation_config(workspace, tmp_path, data=str(data), task="", packing=True, lmbda=1.0)
    packed = SFTSource(config, packing=True)
    input_ids, labels, positions = packed.batch(len(packed.rows.rows), 0.0)
    assert input_ids.shape[0] < len(SHORT_CHATS)  # several conversations a row
    prompts = conversation_prompts(input_ids, labels, positions)
    assert sorted(prompts) == sorted(conversation_prompts(*SFTSource(config).batch(len(SHORT_CHATS), 0.0)))

    torch.manual_seed(0)
    student = Transformer(config.model_config())
    generations = StudentGenerations(student, packed.tokenizer, 2, 128, prompt_tokens=None, temperature=1.0)
    rows, no_labels, compared, counted, answered_positions = generations(input_ids, labels, positions)
    assert (no_labels == IGNORE_INDEX).all()
    expected_compared, answered_prompts, answered_lengths = torch.zeros_like(compared), [], []
    for row, starts in enumerate(answered_positions == 0):
        offsets = starts.nonzero().flatten().tolist()
        length = int(counted[row].sum())  # the row's tokens, the padding after them left out
        assert counted[row].tolist() == [t < length for t in range(rows.shape[1])]
        for start, end in zip(offsets, [*offsets[1:], length], strict=True):
            prompt = next(p for p in prompts if rows[row, start : start + len(p)].tolist() == p)
            answered_prompts.append(prompt)
            answered_lengths.append(end - start)
            expected_compared[row, start + len(prompt) - 1 : end - 1] = True  # predicting the generated tokens
            assert answered_positions[row, start:end].tolist() == list(range(end - start))
    assert sorted(answered_prompts) == sorted(prompts)
    # packed again as packing packs: answers that fit together share a row (how long each runs is the student's draw)
    assert rows.shape[0] == len(best_fit_decreasing(answered_lengths, 128))
    assert torch.equal(compared, expected_compared)


def test_packed_conversations_are_answered_in_one_wave_each_as_its_seed_draws_it_alone(
    workspace, tmp_path, monkeypatch
):
    """The engine was made for batch_size answers at once, so 2 packed rows of 11 conversations were answered in 6
    waves of 2 (2.89 s, now 0.66 s); in one wave, each answer is still the one its seed draws answered alone."""
    data = write_conversations(SHORT_CHATS * 4, tmp_path / "chats.jsonl")
    config = conversation_config(workspace, tmp_path, data=str(data), task="", packing=True, lmbda=1.0)
    packed = SFTSource(config, packing=True)
    input_ids, labels, positions = packed.batch(2, 0.0)
    prompts = conversation_prompts(input_ids, labels, positions)
    assert input_ids.shape[0] == 2 and len(prompts) > 4
    torch.manual_seed(0)
    student = Transformer(config.model_config())
    step, together = Engine.step, []

    def counted_step(engine):
        together.append(engine.stats().running)
        return step(engine)

    monkeypatch.setattr(Engine, "step", counted_step)
    generations = StudentGenerations(student, packed.tokenizer, 2, 128, prompt_tokens=None, temperature=1.0)
    torch.manual_seed(1)
    rows, _, _, counted, answered_positions = generations(input_ids, labels, positions)
    assert max(together) == len(prompts)  # every conversation answered in one wave
    answers = []  # the packed rows' conversations, each its prompt and the student's answer
    for row, starts in enumerate(answered_positions == 0):
        offsets, length = starts.nonzero().flatten().tolist(), int(counted[row].sum())
        answers += [rows[row, start:end].tolist() for start, end in zip(offsets, [*offsets[1:], length], strict=True)]

    torch.manual_seed(1)  # each conversation's seed, drawn as StudentGenerations draws them
    seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
    alone = Engine(student, packed.tokenizer, max_batch_size=1, max_model_len=128)
    for prompt, seed in zip(prompts, seeds, strict=True):
        params = SamplingParams(max_new_tokens=128 - len(prompt), temperature=1.0, seed=seed)
        answers.remove(prompt + alone.generate([prompt], params)[0].token_ids)  # ValueError where it differs
    assert answers == []


def test_packed_conversation_distillation_trains_off_and_on_policy(workspace, tmp_path):
    data = write_conversations(SHORT_CHATS * 2, tmp_path / "chats.jsonl")
    for lmbda in (0.0, 1.0):
        changes = dict(data=str(data), task="", packing=True, lmbda=lmbda)
        result = run_distill(conversation_config(workspace, tmp_path / str(lmbda), **changes))
        assert result.step == 4 and all(math.isfinite(loss) for loss in result.losses)
        records = [json.loads(line) for line in (tmp_path / str(lmbda) / "metrics.jsonl").read_text().splitlines()]
        # on-policy every step: the student's own answers, no reference tokens, so no lm_loss
        assert all(("lm_loss" in record) == (lmbda == 0.0) for record in records if "loss" in record)


def test_an_on_policy_steps_loss_is_the_token_mean_over_the_answers_its_micro_batches_scored(workspace, tmp_path):
    """Each micro-batch's share of the step's loss counted the reference answers' tokens, which an on-policy
    micro-batch no longer holds: the step's loss was no mean over the tokens the divergence scored. TRL normalises
    by the tokens scored. Step 2 recomputed from step_1's weights, rows and RNG: the mean over both micro-batches'
    generated tokens."""
    data = write_conversations(SHORT_CHATS * 2, tmp_path / "chats.jsonl")
    changes = dict(data=str(data), task="", lmbda=1.0, ce_weight=0.0, kd_weight=1.0, batch_size=1,
                   grad_accum_steps=2, max_steps=2, save_every=1, eval_every=0, val_fraction=0.0)  # fmt: skip
    config = conversation_config(workspace, tmp_path / "run", **changes)
    run_distill(config)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step_1 = tmp_path / "run" / "checkpoints" / "step_1"
    state = torch.load(step_1 / "train_state.pt", weights_only=False)
    model = DistillHooks(config).prepare(load_pretrained(step_1)).train()
    source = SFTSource(config, holds_out=True)
    source.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    divergences, counts = [], []
    with torch.no_grad():
        for _ in range(2):
            input_ids, labels = source.batch(1, progress=0.5)
            assert torch.rand(()) < 1.0  # the on-policy draw
            rows, _, compared, _, _ = model.generations(input_ids, labels)
            student_logits = model.student(rows).logits[:, :-1][compared]
            teacher_logits = model.teacher.score(rows, compared, [], True).logits
            divergences.append(model.divergence(student_logits, teacher_logits))
            counts.append(int(compared.sum()))
    assert counts[0] != counts[1]  # answers of different lengths: their shares differ
    expected = sum(d * n for d, n in zip(divergences, counts, strict=True)) / sum(counts)
    assert logged[1]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logged[1]["answer_tokens"] == sum(counts)  # the student's answers, which its divergence trained


def test_an_on_policy_runs_report_counts_the_answer_tokens_it_scored_the_students_own_included(workspace, tmp_path):
    """The report's "tokens trained (labelled assistant tokens)" of a run with lmbda=0.5 read "30 of 766 positions":
    the on-policy steps logged assistant_tokens 0, the student's answers, which the divergence trains, uncounted."""
    from seekstack.eval.report import _model

    result = run_distill(conversation_config(workspace, tmp_path / "run", lmbda=0.5))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    on_policy = [r for r in records if "lm_loss" not in r]
    assert 0 < len(on_policy) < len(records)
    assert all(r["assistant_tokens"] == 0 < r["answer_tokens"] for r in on_policy)
    assert all(r["answer_tokens"] == r["assistant_tokens"] > 0 for r in records if "lm_loss" in r)
    answers = sum(round(r["answer_tokens"]) for r in records)
    assert answers > sum(round(r["assistant_tokens"]) for r in records)
    positions = sum(round(r["tokens_per_s"] * r["step_s"]) for r in records)
    train_config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    model = _model(tmp_path / "run", result.checkpoint, train_config, records)
    kind = "answer tokens scored: the reference's, or on-policy the student's own"
    assert f"| tokens trained ({kind}) | {answers:,} of {positions:,} positions (4 steps) |" in model
