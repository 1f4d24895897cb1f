"""Command-line option types the benchmarks share, and the check of the options naming a model and its token data.
Every bench imports it, and with it ctrl_c.py: how Ctrl-C ends one run as a script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import ctrl_c  # noqa: F401 (a bench run ends in one line on Ctrl-C)

from seekstack.adapters.files import read_lora_config
from seekstack.checkpoint import read_config
from seekstack.eval.tasks import held_out_modules
from seekstack.posttrain.config import require_task
from seekstack.schema import ConfigError, check_field
from seekstack.tokens.shards import load_index
from seekstack.train.config import TrainConfig
from seekstack.train.runs import run_checkpoint


def positive_int(text: str) -> int:
    """An argparse type for how many (steps, reps, rounds, tokens, ...): a whole number of at least 1, so that a 0
    is refused by name before any work instead of failing on an empty median after it."""
    return whole_number(text, least=1)


def non_negative_int(text: str) -> int:
    """An argparse type for a size whose 0 has a meaning of its own (--draft-vocab 0: the whole vocabulary): a whole
    number of at least 0, so that a negative one is refused by name before any work."""
    return whole_number(text, least=0)


def new_token_count(text: str) -> int:
    """An argparse type for --new-tokens of a decode rate, t(N new tokens) - t(1 new token): at least 2, so that 1 is
    refused by name before any work instead of measuring 0 tok/s."""
    return whole_number(text, least=2, why="the decode rate is t(N new tokens) - t(1 new token)")


def check_context(parser: argparse.ArgumentParser, option: str, tokens: int, context: int, whose: str) -> None:
    """argparse's error naming `option` when its `tokens` run past `context`, the positions `whose` model has ("preset
    tiny's", a checkpoint's): positions it has none for, refused before any work, not in a traceback once a run is
    under way."""
    if tokens > context:
        parser.error(f"argument {option}: {tokens}: at most {context} ({whose} context)")


def number_between(least: float, most: float) -> Callable[[str], float]:
    """An argparse type for a number from `least` to `most` (a fraction pruned: 0 to 1), so that nan, inf or one out
    of range is refused by name before any work, not met in a traceback (or a result row of nan) after it."""

    def number(text: str) -> float:
        value = _number(text)
        if not least <= value <= most:  # nan is in no range
            raise argparse.ArgumentTypeError(f"{value:g}: a number from {least:g} to {most:g}")
        return value

    return number


def check_task(parser: argparse.ArgumentParser, task: str, difficulty: int | None) -> None:
    """argparse's error naming --task and --difficulty where the post-training task is none or refuses the difficulty
    (0, past its most: `require_task`), before any work, not in a traceback once a teacher or a run is under way."""
    try:
        require_task(task, difficulty=difficulty)
    except ConfigError as error:  # "field 'difficulty': difficulty 5000: at most 1000 ..."
        given = f"--task {task}" + (f" --difficulty {difficulty}" if difficulty is not None else "")
        parser.error(error.naming(given))


def config_number(cls: type, field: str) -> Callable[[str], float]:
    """An argparse type for a number that field `field` of config `cls` takes (SamplingParams' temperature), its range
    said once, in the config: one out of it (nan, inf) is refused by name before any work, not in its ConfigError
    traceback after it."""

    def number(text: str) -> float:
        value = _number(text)
        try:
            check_field(cls, field, value)
        except ConfigError as error:  # "has value nan: input should be a finite number"
            raise argparse.ArgumentTypeError(error.problem.removeprefix("has value ")) from None
        return value

    return number


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def whole_number(text: str, least: int, why: str = "") -> int:
    """`text` as a whole number of at least `least`, or argparse's error naming the value (and `why`, when given)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value}: at least {least}" + (f", {why}" if why else ""))
    return value


def read_by(read: Callable[[Path], object], folder_of: Callable[[str], Path] = Path) -> Callable[[str], Path]:
    """An argparse type for a folder that `read`, seekstack's reader of such folders, accepts: a missing folder or one
    of another kind is refused by name before any work, not in a traceback after the rest has loaded. The folder is
    `folder_of(text)`, the text itself unless told otherwise."""

    def folder(text: str) -> Path:
        try:
            path = folder_of(text)
            read(path)
        except (OSError, ValueError) as error:  # CheckpointError, ConfigError
            raise argparse.ArgumentTypeError(str(error)) from None
        return path

    return folder


# a learning rate as the trainers take it (TrainConfig's lr; post-training's and distill's have its rule)
learning_rate = config_number(TrainConfig, "lr")
# a checkpoint, or a training run's out_dir standing for its newest checkpoint, as on seekstack's command line
checkpoint_folder = read_by(read_config, folder_of=lambda text: run_checkpoint(text) or Path(text))
adapter_folder = read_by(read_lora_config)  # a LoRA adapter (adapter_config.json and its weights)
corpus_folder = read_by(held_out_modules)  # `seekstack data build`'s, of a val split


def token_shards(*splits: str) -> Callable[[str], Path]:
    """An argparse type for a folder of `seekstack data tokenize`'s token shards holding each of `splits` (train, val,
    a difficulty bucket such as train_easy), their indexes and shards checked (`load_index`)."""
    return read_by(lambda folder: [load_index(folder, split) for split in splits])


def load_model_and_data(parser: argparse.ArgumentParser, model: str, data: str) -> tuple:
    """The checkpoint at --model (loaded, eval mode) and the UTF-8 bytes of each token id of --data's val split (the
    checkpoint's tokenizer's, as `seekstack quantize` counts them); a --model that is no checkpoint, or a --data
    without train and val shards of its tokenizer, is refused as one line naming the option, before any work."""
    import seekstack
    from seekstack.tokenizer import tokenizer_json_path
    from seekstack.tokens.provenance import require_checkpoint_tokenizer
    from seekstack.tokens.token_bytes import split_byte_lengths

    try:
        network = seekstack.load_pretrained(model).eval()
    except (OSError, ValueError) as error:
        parser.error(f"--model {model}: {error}")
    try:
        for split in ("train", "val"):
            require_checkpoint_tokenizer(model, data, load_index(data, split)["tokenizer"])
        byte_lengths, estimated = split_byte_lengths(data, "val", tokenizer_json_path(model))
    except (OSError, ValueError) as error:
        parser.error(f"--data {data}: {error}")
    if estimated:
        print(f"note: {estimated}", file=sys.stderr)
    return network, byte_lengths
