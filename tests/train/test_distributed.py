"""Data parallelism: two gloo ranks on CPU train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from seekstack.train.trainer import train
from tests.support import free_port, spawn
from tests.train.test_trainer import data_dir, read_metrics, run_config  # noqa: F401  (data_dir is a fixture)


def _rank_main(rank: int, world_size: int, port: int, config, resume: bool = False) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    train(config, resume=resume)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_ranks_match_one_process_at_the_same_global_batch(data_dir, tmp_path):  # noqa: F811
    single = train(run_config(data_dir, tmp_path / "one", max_steps=3, eval_every=0, save_every=0))
    config = run_config(data_dir, tmp_path / "two", max_steps=3, eval_every=0, save_every=0)
    spawn(_rank_main, (2, free_port(), config))
    two = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert [m["step"] for m in two] == [1, 2, 3]
    for one_loss, metrics in zip(single.losses, two, strict=True):
        assert metrics["loss"] == pytest.approx(one_loss, abs=1e-5)
    one = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    assert two[-1]["maxvio"] == pytest.approx(one[-1]["maxvio"], abs=1e-5)  # loads all-reduced across ranks


def test_ranks_that_disagree_are_told_by_the_first_differences_naming_what_one_lacks():
    """A data_dir missing on rank 1 listed each of rank 0's files as `=None`, every one of them."""
    from seekstack.parallel.distributed import _differences

    rank_0 = {f"tokens/train_{shard:05d}.bin": "40,000 bytes" for shard in range(7)}
    assert _differences({"tokens/extra.bin": "8 bytes"}, rank_0) == (
        "tokens/train_00000.bin=missing (rank 0: 40,000 bytes), tokens/train_00001.bin=missing (rank 0: 40,000 "
        "bytes), tokens/train_00002.bin=missing (rank 0: 40,000 bytes), tokens/train_00003.bin=missing (rank 0: "
        "40,000 bytes), tokens/train_00004.bin=missing (rank 0: 40,000 bytes) and 3 more"
    )


def _rank_counting_validation_rows(rank: int, world_size: int, port: int, config, rows) -> None:
    from seekstack.train import trainer

    batches_of = trainer._Run._validation_batches

    def counted(self):
        batches = batches_of(self)
        rows[rank] = [batch.input_ids.shape[0] for batch in batches]
        return batches

    trainer._Run._validation_batches = counted
    _rank_main(rank, world_size, port, config)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ranks_share_each_validation_batch_and_log_one_process_s_validation(data_dir, tmp_path):  # noqa: F811
    """Under DDP rank 0 scored every validation row alone while the other ranks waited: an evaluation took one
    process's time at any number of ranks (under FSDP each rank scored every row). A short last batch the ranks do
    not divide is counted once."""
    steps = dict(max_steps=1, eval_every=1, eval_batches=11, save_every=0, seq_len=24)  # the whole val split
    train(run_config(data_dir, tmp_path / "one", **steps))
    rows = mp.Manager().dict()
    config = run_config(data_dir, tmp_path / "two", **steps)
    spawn(_rank_counting_validation_rows, (2, free_port(), config, rows))
    # 83 windows and 7 tokens more: 20 micro-batches of batch_size=4 rows, half on each rank, the last 3 windows and
    # the window of the 7 targets after them, each batch scored whole on each rank
    assert rows[0] == rows[1] == [2] * 20 + [3] + [1]
    (two,), (one,) = ([m for m in read_metrics(tmp_path / run) if "val_loss" in m] for run in ("two", "one"))
    for name in ("val_loss", "val_bpb", "val_maxvio"):
        assert two[name] == pytest.approx(one[name], abs=1e-5), name


def test_each_rank_takes_its_own_slice_of_the_global_batch():
    from seekstack.parallel.distributed import Ranks, local_rows

    batch = torch.arange(12).reshape(6, 2)
    slices = [local_rows(batch, Ranks(rank, 3, torch.device("cpu"))) for rank in range(3)]
    assert torch.equal(torch.cat(slices), batch) and torch.equal(slices[1], torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4 ranks"):
        local_rows(batch, Ranks(0, 4, torch.device("cpu")))


def test_under_torchrun_rank_0_alone_prints_an_error_every_rank_meets_and_all_exit_with_its_code(
    torchrun_environment, capsys
):
    import typer

    from seekstack.cli.common import fail

    message = "batch_size=3 is not divisible by the 2 ranks (WORLD_SIZE)"
    for rank, printed in ((0, f"error: {message}\n"), (1, "")):
        torchrun_environment(rank)
        with pytest.raises(typer.Exit) as exited:
            fail(message)
        assert exited.value.exit_code == 1
        assert capsys.readouterr().err == printed, rank


def test_under_torchrun_an_error_is_printed_by_the_first_rank_of_each_machine_whose_log_its_user_reads(
    torchrun_environment, capsys
):
    """A config file of node 2's own with a typo: its ranks (1 and 2 here) met the error alone, and nothing was said."""
    import typer

    from seekstack.cli.common import fail

    message = "override 'max_step=5': unknown field 'max_step'"
    for rank, local_rank, printed in ((1, "0", f"error (rank 1): {message}\n"), (2, "1", "")):
        torchrun_environment(rank, 4, LOCAL_RANK=local_rank)
        with pytest.raises(typer.Exit):
            fail(message)
        assert capsys.readouterr().err == printed, rank


def test_under_torchrun_an_error_that_may_be_one_ranks_own_is_printed_by_that_rank_naming_it(
    torchrun_environment, capsys
):
    """A missing file of rank 1's own (its optimizer part, its node's shard) is not left unsaid; a config error
    every rank meets is printed once."""
    import typer

    from seekstack.cli.common import user_errors
    from seekstack.schema import ConfigError

    torchrun_environment(1)
    for error, printed in (
        (FileNotFoundError("/node2/optimizer_rank1.pt: no such file"), "error (rank 1): /node2/optimizer_rank1.pt"),
        (ConfigError("batch_size=3 is not divisible by the 2 ranks"), ""),
    ):
        with pytest.raises(typer.Exit), user_errors():
            raise error
        said = capsys.readouterr().err
        assert said.startswith(printed) if printed else said == ""


def test_a_model_vocabulary_other_than_the_datas_is_a_setting_printed_once_per_machine(
    torchrun_environment, capsys, tmp_path
):
    """model.vocab_size=97 on shards of 96 ids was a ValueError, which each rank of the machine printed as an error of
    its own ('error: ...', 'error (rank 1): ...'): every rank meets it alike."""
    import typer

    from seekstack.cli.common import user_errors
    from seekstack.train.trainer import require_vocabulary

    message = f"{tmp_path}: its tokenizer has 96 tokens, fewer than model vocab_size=97: ids 96..96 decode to no token"
    for rank, printed in ((0, f"error: {message}; set model.vocab_size=96\n"), (1, "")):
        torchrun_environment(rank)
        with pytest.raises(typer.Exit), user_errors():
            require_vocabulary(97, 96, tmp_path)
        assert capsys.readouterr().err == printed, rank


def _rank_failing_while_rank_0_evaluates(rank: int, world_size: int, port: int, config, ended) -> None:
    """Rank 1 fails after step 1; rank 0 is in its evaluation (its own work, no collective) when the SIGTERM that
    stops the ranks left reaches it."""
    import time

    from seekstack.train import trainer

    def evaluate(self):
        if rank == 1:
            raise RuntimeError("rank 1 failed")
        time.sleep(60)  # a long evaluation

    trainer._Run.evaluate = evaluate
    try:
        _rank_main(rank, world_size, port, config)
    except Exception as error:
        ended[rank] = (type(error).__name__, str(error))
        raise


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_when_a_rank_fails_the_ranks_left_end_at_once_on_sigterm_naming_it(data_dir, tmp_path):  # noqa: F811
    """torchrun (as mp.spawn) sends SIGTERM to the ranks left when one fails, and kills those still running 30 s on."""
    import time

    config = run_config(data_dir, tmp_path / "run", max_steps=3, eval_every=1, save_every=0)
    ended = mp.Manager().dict()
    started = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed"):
        spawn(_rank_failing_while_rank_0_evaluates, (2, free_port(), config, ended))
    # ended by the signal, not by rank 0's 60 s evaluation running out (spawning and imports take up to ~30 s on a
    # loaded 2-core machine, so a bound of 25 s failed there once at 28 s)
    assert time.monotonic() - started < 55
    assert ended[0][0] == "RankEnded" and ended[0][1].startswith("rank 1 (process ")


def _rank_given_its_own_seq_len(rank: int, world_size: int, port: int, configs, refused) -> None:
    from seekstack.schema import ConfigError

    try:
        _rank_main(rank, world_size, port, configs[rank])
    except ConfigError as error:
        refused[rank] = str(error)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ranks_given_different_configs_are_refused_on_every_rank_naming_the_key_and_both_values(data_dir, tmp_path):  # noqa: F811
    """Rank 1 given seq_len=16 trained other rows than rank 0 under one DDP model, silently."""
    configs = [run_config(data_dir, tmp_path / "run", max_steps=2, eval_every=0, save_every=0, seq_len=seq_len)
               for seq_len in (32, 16)]  # fmt: skip
    refused = mp.Manager().dict()
    spawn(_rank_given_its_own_seq_len, (2, free_port(), configs, refused))
    assert refused[0] == refused[1]
    assert "rank 1 has seq_len=16 (rank 0: 32)" in refused[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _rank_on_a_machine_of_its_own(
    rank: int, world_size: int, port: int, config, refused, machines: Path, resume: bool = False
) -> None:
    """A rank whose working directory is `machines/machine{rank}`: a relative data_dir or out_dir is its own."""
    from seekstack.schema import ConfigError

    os.chdir(machines / f"machine{rank}")
    try:
        _rank_main(rank, world_size, port, config, resume)
    except ConfigError as error:
        refused[rank] = str(error)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_a_shard_missing_on_one_rank_is_refused_on_every_rank_naming_it(data_dir, tmp_path):  # noqa: F811
    """Rank 1 without the train shard failed alone; rank 0 waited in its next collective for gloo's 'Connection
    closed by peer' traceback, and a rank with another copy of the shards at the same path trained on other rows."""
    for machine in ("machine0", "machine1"):
        shutil.copytree(data_dir, tmp_path / machine / "tokens")
    (tmp_path / "machine1" / "tokens" / "train_00000.bin").unlink()
    config = run_config(Path("tokens"), tmp_path / "run", max_steps=2, eval_every=0, save_every=0)
    refused = mp.Manager().dict()
    spawn(_rank_on_a_machine_of_its_own, (2, free_port(), config, refused, tmp_path))
    assert refused[0] == refused[1]
    assert refused[0] == (
        "the ranks were given different token shards in data_dir: rank 1 has tokens/train_00000.bin=missing (rank 0: "
        "40,000 bytes); every rank must read the same files: a file system they share, or the same copy on each machine"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_an_out_dir_one_rank_does_not_share_is_refused_where_ranks_write_their_part_of_checkpoints(data_dir, tmp_path):  # noqa: F811
    """FSDP's rank 1 wrote its optimizer shard into a folder of the same name on its own disk: the run ended with
    'trained to step 6', its checkpoints without that shard, which a resume cannot load."""
    for machine in ("machine0", "machine1"):
        (tmp_path / machine).mkdir()
    config = run_config(data_dir, Path("run"), parallel="fsdp", max_steps=2, eval_every=0, save_every=1)
    refused = mp.Manager().dict()
    spawn(_rank_on_a_machine_of_its_own, (2, free_port(), config, refused, tmp_path))
    assert refused[0] == refused[1]
    assert refused[0].startswith("out_dir run: rank 1 does not see the files rank 0 writes there")
    assert refused[0].endswith("give an out_dir on a file system every rank shares")
    assert not (tmp_path / "machine0" / "run" / "checkpoints").exists()
    assert not (tmp_path / "machine0" / "run" / "train_config.json").exists()  # refused before its first write
    assert not (tmp_path / "machine1" / "run").exists()
    assert not list((tmp_path / "machine0" / "run").glob(".ranks_see_*"))


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_ranks_resuming_from_checkpoints_of_different_steps_are_refused_naming_them(data_dir, tmp_path):  # noqa: F811
    """Under DDP (no file of its own in a checkpoint) a rank whose out_dir held an older checkpoint resumed from it:
    another data position and learning rate under rank 0's weights, and one fewer step to run."""
    steps = dict(max_steps=3, eval_every=0, save_every=1, keep_checkpoints=3)
    train(run_config(data_dir, tmp_path / "machine0" / "run", **{**steps, "max_steps": 2}))
    shutil.copytree(tmp_path / "machine0" / "run", tmp_path / "machine1" / "run")
    shutil.rmtree(tmp_path / "machine1" / "run" / "checkpoints" / "step_2")
    refused = mp.Manager().dict()
    config = run_config(data_dir, Path("run"), **steps)
    spawn(_rank_on_a_machine_of_its_own, (2, free_port(), config, refused, tmp_path, True))
    assert refused[0] == refused[1]
    assert refused[0] == (
        "the ranks were given different checkpoints to resume from: rank 1 has step=1 (rank 0: 2); every rank must "
        "resume from the same checkpoint: give an out_dir on a file system every rank shares"
    )


@pytest.mark.parametrize(
    ("environment", "named"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is not a number of processes"),
    ],
)
def test_a_torchrun_environment_set_by_hand_and_wrong_is_refused_naming_the_variable(monkeypatch, environment, named):
    """WORLD_SIZE left in the environment without RANK ended in a KeyError: 'RANK' traceback, a non-number in
    'invalid literal for int()'."""
    from seekstack.parallel.distributed import init_distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=named):
        init_distributed()


@pytest.mark.parametrize(
    ("local_rank", "named"),
    [
        (None, "WORLD_SIZE=2 is set but LOCAL_RANK is not: each rank computes on GPU cuda:LOCAL_RANK of its machine"),
        ("1", r"LOCAL_RANK=1 names no GPU of this machine, which shows 1 \(cuda:0 to cuda:0, as CUDA_VISIBLE_DEVICES"),
    ],
)
def test_a_gpu_rank_without_a_local_rank_naming_one_of_its_machines_gpus_is_refused_naming_it(
    monkeypatch, local_rank, named
):
    """Every GPU rank started without LOCAL_RANK took cuda:0 (LOCAL_RANK read as 0), and one past the machine's GPUs
    met CUDA's 'invalid device ordinal'; torchrun sets LOCAL_RANK on each rank of a machine, 0 to nproc-per-node-1."""
    from seekstack.parallel.distributed import init_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"cuda:{device} was taken"))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)  # the address is checked first
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(ValueError, match=named):
        init_distributed()


def _rank_refused_before_building_a_model(rank: int, world_size: int, port: int, config, refused) -> None:
    from seekstack.schema import ConfigError
    from seekstack.train import trainer

    def build_model(*args):
        raise AssertionError("the model was built before the ranks were checked")

    trainer.build_model = build_model
    try:
        _rank_main(rank, world_size, port, config)
    except ConfigError as error:
        refused[rank] = str(error)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_a_batch_the_ranks_do_not_divide_is_refused_as_a_config_error_before_the_model_is_built(data_dir, tmp_path):  # noqa: F811
    """It was a ValueError at the first step, after the model (or init_from's checkpoint) was built, printed by
    every rank as one of its own."""
    config = run_config(data_dir, tmp_path / "run", batch_size=5, max_steps=2, eval_every=0, save_every=0)
    refused = mp.Manager().dict()
    spawn(_rank_refused_before_building_a_model, (2, free_port(), config, refused))
    assert refused[0] == refused[1] == "batch_size=5 is not divisible by the 2 ranks (WORLD_SIZE)"


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_expert_parallel_over_another_number_of_ranks_is_refused_as_a_config_error_before_the_model_is_built(
    data_dir,  # noqa: F811
    tmp_path,
):
    """It was found once the model (or init_from's checkpoint, or the resumed one) was built, and printed by every
    rank as an error of its own."""
    config = run_config(data_dir, tmp_path / "run", expert_parallel=3, max_steps=2, eval_every=0, save_every=0)
    refused = mp.Manager().dict()
    spawn(_rank_refused_before_building_a_model, (2, free_port(), config, refused))
    expected = "expert_parallel=3 must equal the number of ranks (2): experts are split over all of them"
    assert refused[0] == refused[1] == expected


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_cpu_offload_on_a_cpu_run_is_refused_as_a_config_error_before_the_model_is_built(data_dir, tmp_path):  # noqa: F811
    """It was found by FSDP's sharding, after the model was built, and printed by every rank as an error of its own."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = run_config(data_dir, tmp_path / "run", parallel="fsdp", cpu_offload=True, max_steps=2, eval_every=0)
    refused = mp.Manager().dict()
    spawn(_rank_refused_before_building_a_model, (2, free_port(), config, refused))
    assert refused[0] == refused[1] and refused[0].startswith("cpu_offload=true keeps FSDP's shards in CPU memory")


def test_float8_on_a_cpu_is_refused_as_a_config_error_before_the_model_is_built(data_dir, tmp_path, monkeypatch):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from seekstack.schema import ConfigError
    from seekstack.train import trainer

    def build_model(*args):
        raise AssertionError("the model was built before float8 was checked")

    monkeypatch.setattr(trainer, "build_model", build_model)
    with pytest.raises(ConfigError, match="float8=true needs an NVIDIA GPU with FP8 tensor cores.*on a CPU"):
        trainer.train(run_config(data_dir, tmp_path / "f8", float8=True, max_steps=1, eval_every=0, save_every=0))


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_peak_flops_given_for_cpu_ranks_of_one_machine_counts_once_as_the_cpus_they_share(data_dir, tmp_path):  # noqa: F811
    """peak_flops counted once per rank, so two CPU ranks on one machine given its CPUs' peak divided their FLOP/s by
    twice that peak (MFU halved), where the probed peak counts the cores they share once."""
    config = run_config(data_dir, tmp_path / "run", max_steps=1, eval_every=0, save_every=0, peak_flops=1e9)
    spawn(_rank_main, (2, free_port(), config))
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["peak_flops"] for m in logged] == [1e9]
    assert (
        logged[0]["peak_source"] == "peak_flops, as the config gives it, per machine (its CPUs, which its ranks share)"
    )


def _rank_resuming(rank: int, world_size: int, port: int, config, refused) -> None:
    try:
        _rank_main(rank, world_size, port, config, resume=True)
    except Exception as error:
        refused[rank] = (type(error).__name__, str(error))


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_a_resume_rank_0_refuses_over_its_metrics_file_is_refused_on_every_rank_quoting_it(data_dir, tmp_path):  # noqa: F811
    """Rank 0 alone reads metrics.jsonl: its refusal of a damaged line left rank 1 going on into its next collective,
    which met gloo's 'Connection closed by peer' once rank 0 had ended."""
    run = tmp_path / "run"
    train(run_config(data_dir, run, max_steps=2, save_every=2, eval_every=0))
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:-20], *lines[1:]]) + "\n")
    refused = mp.Manager().dict()
    config = run_config(data_dir, run, max_steps=4, save_every=2, eval_every=0)
    spawn(_rank_resuming, (2, free_port(), config, refused))
    assert refused[0][0] == "ValueError" and refused[0][1].startswith(f"{metrics}:1: not valid JSON")
    assert refused[1] == ("ConfigError", f"ValueError on rank 0: {refused[0][1]}")
