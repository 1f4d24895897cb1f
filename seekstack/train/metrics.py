"""A training run's metrics.jsonl: one JSON object per optimizer step and one per evaluation, appended as the run
goes; read back by `--resume`, `seekstack plot`, `report` and `rl-plot`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seekstack.jsonl import jsonl_records

METRICS_FILE = "metrics.jsonl"


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def is_evaluation(record: dict[str, Any]) -> bool:
    """Whether a metrics record is an evaluation's (a `val_loss`), not a training step's."""
    return "val_loss" in record


def replayed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records` as the runs that logged them left their history, in the order logged: a step's record drops the
    records logged before it for its step and past it (a resume from an earlier checkpoint trains them again, as
    `--resume` drops them), an evaluation's the evaluation logged before it for its step (a resume that runs it
    again)."""
    first_step_after = math.inf  # the lowest step a step record logged after this one trains
    evaluated_after: set[int] = set()  # the steps an evaluation logged after this one scores
    kept = []
    for record in reversed(records):
        step, evaluation = record["step"], is_evaluation(record)
        if step < first_step_after and not (evaluation and step in evaluated_after):
            kept.append(record)
        if evaluation:
            evaluated_after.add(step)
        else:
            first_step_after = min(first_step_after, step)
    return kept[::-1]


def read_metrics_file(path: Path, on_torn_tail: Callable[[str], None]) -> list[dict[str, Any]]:
    """The records of metrics.jsonl `path`: ValueError naming `path:line` for a line that is not JSON or not a
    record (an object with an integer `step`); a last line cut short by a stopped run is left out and `on_torn_tail`
    told why."""
    records = []
    for number, record in jsonl_records(path, on_torn_tail):
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError(
                f"{path}:{number}: not a metrics record (a JSON object with an integer 'step'); mend or delete "
                "that line"
            )
        records.append(record)
    return records


def column(records: list[dict[str, Any]], key: str, path: Path) -> list[float]:
    """Each record's number `key`; ValueError naming `path` and the step of a record without one."""
    values = [record.get(key) for record in records]
    for record, value in zip(records, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: the record of step {record['step']} has no number {key!r}; mend or delete it")
    return values


def step_tokens(record: dict[str, Any]) -> int:
    """The token positions a step record's step trained (padding included): its tokens/s x its time."""
    return round(record["tokens_per_s"] * record["step_s"])
