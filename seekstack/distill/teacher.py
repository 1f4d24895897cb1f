"""The frozen teacher: a checkpoint that scores the student's rows under no-grad, with an optional on-disk cache
of its top-k next-token log-probabilities for repeated runs over the same batches.

Shapes: B rows, T tokens, N positions compared (those a (B, T - 1) mask selects; position t predicts token t + 1),
V vocabulary, D the teacher's hidden width, k cached log-probabilities per position.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from seekstack.atomic import write_atomic
from seekstack.checkpoint import load_pretrained
from seekstack.model.transformer import Transformer
from seekstack.tokenizer import TOKENIZER_FILE, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CACHE_INFO_FILE = "teacher.json"


def shared_tokenizer(
    teacher_dir: str | Path, fingerprint: str, student_tokenizer: str, conversational: bool
) -> Tokenizer:
    """The teacher checkpoint's tokenizer; ValueError unless it is the very tokenizer (of sha256 `fingerprint`,
    described by `student_tokenizer`) the student's data was encoded with (token shards), or encodes its conversations
    with (`conversational`): distillation compares next-token distributions id by id."""
    path = Path(teacher_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(
            f"teacher {teacher_dir} has no {TOKENIZER_FILE}: distillation needs the teacher's tokenizer to check it "
            f"is the student's ({student_tokenizer}); copy it into the checkpoint"
        )
    teacher_tokenizer = Tokenizer.from_file(path)
    if teacher_tokenizer.fingerprint != fingerprint:
        remedy = (
            "leave `tokenizer` unset (the teacher's encodes the conversations) and start a student of the teacher's "
            "tokenizer (a fresh one, or init_from a checkpoint of it)"
            if conversational
            else "tokenize the student's data with the teacher's tokenizer.json"
        )
        raise ValueError(
            f"teacher tokenizer {path} (vocabulary {teacher_tokenizer.vocab_size}) differs from the student's "
            f"{student_tokenizer}: teacher and student must share a tokenizer; {remedy}"
        )
    return teacher_tokenizer


@contextmanager
def layer_outputs(model: Transformer, layer_ids: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """The hidden states (B, T, D) leaving decoder blocks `layer_ids` in the forward passes run inside the block."""
    captured: dict[int, torch.Tensor] = {}

    def keep(layer_id: int):
        def hook(module, inputs, output) -> None:
            captured[layer_id] = output[0]  # a block returns (hidden, MoE statistics)

        return hook

    handles = [model.layers[i].register_forward_hook(keep(i)) for i in layer_ids]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class TeacherScores:
    """The teacher's next-token logits (or log-probabilities) at the compared positions, (N, V), and the hidden
    states of the layers asked for, each (B, T, D)."""

    logits: torch.Tensor
    states: dict[int, torch.Tensor] = field(default_factory=dict)


def weights_stamp(teacher_dir: str | Path) -> str:
    """A digest of the names, sizes and modification times of the teacher's weight files: it changes when a teacher
    is retrained or re-exported into the same folder, whose log-probabilities a cache of the first must not serve."""
    files = sorted(Path(teacher_dir).glob("*.safetensors"))
    stamps = [(file.name, file.stat().st_size, file.stat().st_mtime_ns) for file in files]
    return hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]


class TopKCache:
    """Top-k teacher log-probabilities of the compared positions of corpus and conversation batches on disk, one file
    per batch named by a hash of its tokens (and of its compared positions, unless it compares every one, as a corpus
    batch does). A cached distribution is the k log-probabilities with the rest of the mass spread evenly over the
    other tokens, so that every divergence (forward, reverse, JSD) is defined on it."""

    def __init__(self, folder: str | Path, top_k: int, teacher_dir: str | Path, teacher_dtype: str = "float32"):
        self.folder, self.top_k = Path(folder), top_k
        info = {"teacher": str(Path(teacher_dir).resolve()), "top_k": top_k, "weights": weights_stamp(teacher_dir)}
        if teacher_dtype != "float32":  # a float32 cache's info names no dtype, as those of earlier seekstacks
            info["teacher_dtype"] = teacher_dtype
        info_path = self.folder / CACHE_INFO_FILE
        try:
            held = json.loads(info_path.read_text()) if info_path.is_file() else info
            if not isinstance(held, dict):
                raise ValueError(f"a JSON {type(held).__name__}, not an object")
        except ValueError as error:  # cut short or edited: which teacher's log-probabilities it holds is unknown
            raise ValueError(
                f"teacher_cache {self.folder}: {info_path.name} is damaged ({error}); give another folder, or empty "
                "this one to cache again"
            ) from None
        if "weights" not in held:  # an earlier seekstack's cache named no weights: taken for its teacher's current
            held = {**held, "weights": info["weights"]}
        if held != info:
            raise ValueError(
                f"teacher_cache {self.folder} holds log-probabilities of {info_path.read_text().strip()}, not of "
                f"{json.dumps(info)}; use another folder for this teacher (a teacher retrained or re-exported into "
                "its folder has other weights), cache_top_k or teacher_dtype"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(info_path, json.dumps(info) + "\n")

    def _path(self, rows: torch.Tensor, compared: torch.Tensor, positions: torch.Tensor | None) -> Path:
        key = rows.cpu().numpy().tobytes() + str(tuple(rows.shape)).encode()
        if not compared.all():  # a conversation batch: its labels, not its tokens alone, choose the positions
            key += compared.cpu().numpy().tobytes()
        if positions is not None:  # packed rows: where each conversation starts changes what the teacher sees
            key += b"positions" + positions.cpu().numpy().tobytes()
        return self.folder / f"{hashlib.sha256(key).hexdigest()[:32]}.pt"

    def read(
        self, rows: torch.Tensor, compared: torch.Tensor, vocab_size: int, positions: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The cached (N, V) log-probabilities of the positions of `rows` (B, T), packed by `positions` when given,
        that `compared` (B, T - 1) selects, or None when not cached."""
        path = self._path(rows, compared, positions)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location=rows.device, weights_only=True)
            values, indices = stored["log_probs"].float(), stored["indices"].long()  # (N, k)
        except (MemoryError, torch.OutOfMemoryError, OSError):  # the machine's failing, not the file's: it stays
            raise
        except Exception as error:  # pickle and zip errors of a damaged file, or another file's keys
            raise ValueError(
                f"teacher_cache {self.folder}: {path.name} is damaged ({error!r}); delete it, and the teacher scores "
                "its batch again"
            ) from None
        tail_mass = (1 - values.exp().sum(-1, keepdim=True)).clamp(min=1e-12)
        spread = (tail_mass / (vocab_size - self.top_k)).log()  # (N, 1): each token outside the top k
        return spread.expand(-1, vocab_size).scatter(1, indices, values)

    def write(
        self, rows: torch.Tensor, compared: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor | None = None
    ) -> None:
        """Store the top-k log-probabilities of (N, V) `logits` at the positions of `rows` (packed by `positions`)
        that `compared` selects."""
        values, indices = logits.float().log_softmax(-1).topk(self.top_k, dim=-1)
        stored = {"log_probs": values.to(torch.float16).cpu(), "indices": indices.to(torch.int32).cpu()}
        write_atomic(self._path(rows, compared, positions), lambda path: torch.save(stored, path))


class Teacher:
    """A frozen checkpoint scoring rows: no gradients, eval mode, weights in `dtype`."""

    def __init__(self, directory: str | Path, dtype: str, device: torch.device, cache: TopKCache | None = None):
        self.directory = Path(directory)
        self.model = load_pretrained(directory, dtype=DTYPES[dtype], device=device, dequantize=True)
        self.model.requires_grad_(False)
        self.cache = cache

    @torch.no_grad()
    def score(
        self,
        rows: torch.Tensor,
        compared: torch.Tensor,
        layer_ids: list[int],
        generated: bool = False,
        positions: torch.Tensor | None = None,
    ) -> TeacherScores:
        """Logits at the positions `compared` (B, T - 1) selects, and the outputs of layers `layer_ids`, of rows
        packed by `positions` (B, T) when given; a batch of the data (not `generated` by the student, whose rows
        differ every time) comes from the cache when it holds it, and goes into it otherwise."""
        cacheable = self.cache is not None and not layer_ids and not generated
        if cacheable:
            cached = self.cache.read(rows, compared, self.model.config.vocab_size, positions)
            if cached is not None:
                return TeacherScores(cached)
        with layer_outputs(self.model, layer_ids) as states:
            B = rows.shape[0]
            # the head runs on the compared positions alone (logits_at asks for one position: a token cost)
            first = torch.zeros(B, dtype=torch.long, device=rows.device)
            hidden = self.model(rows, positions=positions, logits_at=first).hidden_states
        logits = self.model.lm_head(hidden[:, :-1][compared])
        if cacheable:  # from the cache from the first run on, so that a rerun trains on the same distributions
            self.cache.write(rows, compared, logits, positions)
            return TeacherScores(self.cache.read(rows, compared, self.model.config.vocab_size, positions))
        return TeacherScores(logits, dict(states))
