"""The fused CPU kernels' build and load (cpu_kernels.py): where they build, locks and half-written libraries between
processes, and what a user is told when the library cannot be used."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from seekstack.model import cpu_kernels


def test_a_library_that_does_not_load_is_warned_of_with_the_loaders_reason(tmp_path, monkeypatch):
    """torch says "Could not load this library: PATH" and keeps why (an undefined symbol of an edited kernel, a
    damaged file) as the exception's cause; the warning said only the first part."""
    damaged = tmp_path / "damaged.so"
    damaged.write_bytes(b"not a shared library" * 100)

    def load_the_damaged_library(**kwargs):
        torch.ops.load_library(str(damaged))

    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load_the_damaged_library)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match=r"Could not load this library: .*damaged\.so \(.*invalid ELF header\)"):
        assert not cpu_kernels.available()


def test_a_library_another_process_just_built_is_loaded_not_dropped_as_unproven(tmp_path, monkeypatch):
    """Two ranks building at once: B waits on A's build lock, which torch removes before A loads the library and
    proves it; B took A's new library for a truncated one and deleted it (A then ran without kernels, or B rebuilt)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_folder(tmp_path)
    folder.mkdir(parents=True)
    library = folder / f"{cpu_kernels._library_name()}.so"
    (folder / "lock").touch()  # A building

    def a_finishes_its_build(seconds):
        library.write_bytes(b"\x7fELF" + bytes(4000))
        (folder / "lock").unlink()  # before A loads the library and writes its proof

    found = []

    def b_loads(**kwargs):
        found.append(library.exists())  # where it is not, B's load rebuilds it (~15 s)
        raise OSError("stop before loading")

    monkeypatch.setattr(time, "sleep", a_finishes_its_build)
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", b_loads)
    with pytest.warns(UserWarning, match="stop before loading"):
        cpu_kernels.available()
    assert found == [True]


def test_a_process_arriving_after_the_builders_lock_is_gone_leaves_its_library_to_be_loaded(tmp_path, monkeypatch):
    """torch removes its build lock before the builder loads the library and proves it: B, starting then, found no
    lock and an unproven library, and deleted it under A (A loading a missing or half-relinked file)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_folder(tmp_path)
    library = folder / f"{cpu_kernels._library_name()}.so"
    built, found, b_arrived = [], {}, threading.Event()
    a, b = (threading.Thread(target=lambda: built.append(cpu_kernels._build()), name=name) for name in "AB")
    flock = fcntl.flock

    def waiting_its_turn(file, operation):
        if threading.current_thread() is b:  # B asks for its turn: it has touched nothing, and blocks until A is done
            b_arrived.set()
        flock(file, operation)

    def build_or_load(**kwargs):
        if threading.current_thread() is a:  # A builds, torch drops its lock, then A loads
            (folder / "lock").touch()
            library.write_bytes(b"\x7fELF" + bytes(4000))
            (folder / "lock").unlink()
            b.start()
            assert b_arrived.wait(10)  # B waiting its turn, or (not waiting) done checking: found no lock, dropped it
        b_arrived.set()
        found[threading.current_thread().name] = library.exists()

    monkeypatch.setattr(fcntl, "flock", waiting_its_turn)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", build_or_load)
    monkeypatch.setattr(torch.library, "register_fake", lambda name: lambda shape: shape)  # no ops loaded here
    a.start()
    a.join()
    b.join()
    assert built == [True, True] and found == {"A": True, "B": True}


def test_a_process_waiting_its_turn_while_another_builds_says_it_waits(tmp_path, monkeypatch, capsys):
    """Two processes starting at once on a fresh install (torchrun's ranks): the second waited the ~15 s build in
    silence."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_folder(tmp_path)
    library = folder / f"{cpu_kernels._library_name()}.so"
    said = []
    b = threading.Thread(target=cpu_kernels._build, name="B")

    def build(**kwargs):
        if threading.current_thread() is not b and not b.is_alive():  # A builds while B arrives
            b.start()
            for _ in range(100):  # B's note, or 5 s
                said.append(capsys.readouterr().err)
                if "note: waiting" in said[-1]:
                    break
                time.sleep(0.05)
            library.write_bytes(b"\x7fELF" + bytes(4000))

    monkeypatch.setattr(torch.utils.cpp_extension, "load", build)
    monkeypatch.setattr(torch.library, "register_fake", lambda name: lambda shape: shape)  # no ops loaded here
    assert cpu_kernels._build()
    b.join()
    assert f"note: waiting for another process building cpu_kernels.cpp in {folder}\n" in "".join(said)


def test_the_kernels_build_under_torch_extensions_dir_where_it_is_set(tmp_path, monkeypatch):
    folders = []

    def record_and_fail(**kwargs):
        folders.append(Path(kwargs["build_directory"]))
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    monkeypatch.setattr(torch.utils.cpp_extension, "load", record_and_fail)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="did not build"):
        assert not cpu_kernels.available()
    assert [folder.parent for folder in folders] == [tmp_path]


def test_another_version_of_the_kernels_source_builds_a_library_of_its_own(tmp_path, monkeypatch):
    """ninja rebuilds only a source newer than its library: an update whose cpu_kernels.cpp kept an older time (an
    unpacked archive, `cp -p`) loaded the library of the old source, whose cross_entropy_rows took 3 arguments where
    linear_cross_entropy passes 4 ("expected at most 3 argument(s) but received 4")."""
    names = []

    def record_and_fail(**kwargs):
        names.append(kwargs["name"])
        raise RuntimeError("Ninja is required to load C++ extensions")

    source = tmp_path / cpu_kernels.SOURCE.name
    monkeypatch.setattr(cpu_kernels, "SOURCE", source)
    monkeypatch.setattr("torch.utils.cpp_extension.load", record_and_fail)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    for text in ("// the schema before", "// the schema after", "// the schema before"):
        source.write_text(text)
        monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
        with pytest.warns(UserWarning, match="did not build"):
            assert not cpu_kernels.available()
    assert names[0] != names[1] and names[2] == names[0]  # the same source finds its library again


@pytest.mark.parametrize("key", ["flags", "Features"], ids=["x86", "arm"])
def test_the_build_folder_tells_apart_cpus_with_other_instruction_sets(tmp_path, key):
    tags = []
    for flags in ("fp asimd sve", "fp asimd"):  # a CPU with SVE, one without: a build for the first is not for both
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\n{key}\t\t: {flags}\n")
        tags.append(cpu_kernels._cpu_tag(cpuinfo))
    assert tags[0] != tags[1]


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_waited_for_saying_so(tmp_path, capsys):
    """The next process after a build killed mid-way (SIGKILL, the OOM killer) waited up to 2 minutes in silence."""
    stale = tmp_path / "stale" / "lock"
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (time.time() - 2 * cpu_kernels.STALE_LOCK_SECONDS,) * 2)
    assert cpu_kernels._clear_stale_lock(stale) is False  # no build finished: its library is proven or dropped
    assert not stale.exists()

    live = tmp_path / "live" / "lock"
    live.parent.mkdir()
    live.touch()
    finished = threading.Timer(1.0, live.unlink)  # the other build finishing
    finished.start()
    started = time.monotonic()
    assert cpu_kernels._clear_stale_lock(live) is True  # the other build's library, not yet proven: kept
    assert time.monotonic() - started >= 0.9 and not live.exists()
    said = capsys.readouterr().err.splitlines()
    assert said[0].startswith(f"note: removing {stale}, left ") and len(said) == 2  # the wait told once
    assert said[1].startswith("note: waiting up to 1") and said[1].endswith(
        f" s for {live}: a build under way, or one that was killed, left it"
    )


def test_a_kernel_library_no_process_loaded_as_it_is_is_rebuilt_not_loaded(tmp_path):
    library = tmp_path / f"{cpu_kernels.NAME}.so"
    library.write_bytes(b"\x7fELF" + bytes(100))  # a link cut short: loading it would kill the process
    cpu_kernels._drop_unproven(library)
    assert not library.exists()

    library.write_bytes(b"\x7fELF" + bytes(4000))
    cpu_kernels._proof(library).write_text(cpu_kernels._signature(library))  # what a successful load records
    cpu_kernels._drop_unproven(library)
    assert library.exists()
    with library.open("r+b") as damaged:
        damaged.truncate(1000)
    cpu_kernels._drop_unproven(library)
    assert not library.exists()


def test_two_installations_build_the_kernels_in_folders_of_their_own(tmp_path, monkeypatch):
    """ninja rebuilt the shared library whenever another installation's source path had built it last, so a
    checkout and its clone (or two venvs) rebuilt it over each other at every process's first use."""
    here = cpu_kernels._build_folder(tmp_path)
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "clone" / cpu_kernels.SOURCE.name)
    there = cpu_kernels._build_folder(tmp_path)
    assert here != there and here.parent == there.parent == tmp_path
    assert here.name.startswith(f"{cpu_kernels.NAME}-torch{torch.__version__}-")
    monkeypatch.undo()
    assert cpu_kernels._build_folder(tmp_path) == here  # the same installation finds its build again


def _decode_op_arguments(name: str) -> tuple:
    """Arguments of an op a compiled decode step calls, at odd shapes (3 rows, 37 columns, 5 of 6 experts, 11 keys)."""
    x, weight = torch.randn(3, 37), torch.randn(70, 37)
    experts, routing = torch.tensor([[0, 4], [2, 0], [5, 1]]), torch.rand(3, 2)
    query, keys, mask = torch.randn(2, 3, 1, 24), torch.randn(2, 11, 24), torch.rand(2, 1, 11) < 0.8
    return {
        "rows_linear": (x, weight),
        "rows_linear_panels": (x, weight, cpu_kernels.weight_panels(weight)),
        "grouped_experts": (x, experts, routing, torch.randn(6, 16, 37), torch.randn(6, 37, 8)),
        "latent_attention_rows": (query, keys, mask, 0.2, 16),
        "route_rows": (torch.rand(3, 8), torch.randn(8), 4, 2, True, 3),
    }[name]


@pytest.mark.parametrize(
    "name", ["rows_linear", "rows_linear_panels", "grouped_experts", "latent_attention_rows", "route_rows"]
)
def test_the_decode_ops_registered_shapes_are_the_ones_they_return(name):
    """Compiled decode steps plan their buffers by the ops' registered (fake) outputs and, without inductor's size
    asserts (engine.py DECODE_COMPILE_OPTIONS), no longer check them at each call: torch's opcheck does here."""
    assert cpu_kernels.available()
    op = getattr(torch.ops.seekstack, name).default
    torch.library.opcheck(op, _decode_op_arguments(name), test_utils=("test_schema", "test_faketensor"))
