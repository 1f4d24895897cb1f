"""seekstack as an lm-evaluation-harness model: `lm_eval --model seekstack --model_args pretrained=DIR`.

Log-likelihoods run the model's forward directly (right-padded batches, float32 log-softmax); generation runs on
the inference engine (all requests batched, stop strings matched on the streamed text). Tokenization and the
request-to-window bookkeeping are lm_eval's own (`TemplateLM._encode_pair`, its rolling windows), so per-request
log-likelihoods are those of lm_eval's HF backend on the same checkpoint loaded through transformers.

Shapes: B requests in a batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval.models  # noqa: F401  (lm_eval lists its own backends only into an empty registry: before ours)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from seekstack.checkpoint import load_pretrained
from seekstack.infer.engine import Engine
from seekstack.infer.params import SamplingParams
from seekstack.tokenizer import Tokenizer

# A scoring request as TemplateLM hands it over: (request strings or None, context ids, continuation ids).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@register_model("seekstack")
class SeekstackLM(TemplateLM):
    """A seekstack checkpoint directory (config.json, safetensors, tokenizer.json) as an lm_eval `LM`."""

    def __init__(
        self,
        pretrained: str | Path,
        tokenizer: str | Path | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
    ):
        super().__init__()
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size={batch_size!r}: seekstack takes a number of requests per batch, not 'auto'")
        self.batch_size_per_step = int(batch_size)
        self._device = torch.device(device or "cpu")
        self.model = load_pretrained(pretrained, dtype=getattr(torch, dtype), device=self._device).eval()
        self.tokenizer_ = Tokenizer.from_file(tokenizer or pretrained)
        self.max_length = max_length or self.model.config.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.engine = Engine(self.model, self.tokenizer_, max_batch_size=max_batch_size or self.batch_size_per_step)
        self.pretrained = str(pretrained)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) conditions on: BOS, as the HF backend uses."""
        return self.tokenizer_.bos_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_.source

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: object) -> list[int]:
        """Token ids of `string`, no BOS: our tokenizer_config says add_bos_token=false, as HF reads it too."""
        return self.tokenizer_.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], **kwargs: object) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether every continuation token is the argmax, per request.

        The input is (context + continuation)[-(max_length+1):][:-1], as lm_eval's HF backend cuts it; batches
        group requests of similar length (longest first) and are right-padded, which a causal model never sees.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size_per_step):
            batch = order[start : start + self.batch_size_per_step]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1] for i in batch]
            width = max(len(row) for row in rows)
            input_ids = torch.full((len(rows), width), self.tokenizer_.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):
                input_ids[r, : len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.model(input_ids.to(self._device)).logits.float(), dim=-1)  # (B, T, V)
            for r, i in enumerate(batch):
                continuation = requests[i][2]
                end = len(rows[r])
                scored = logprobs[r, end - len(continuation) : end]  # (len(continuation), V)
                target = torch.tensor(continuation, device=scored.device)
                total = scored.gather(1, target[:, None]).double().sum().item()  # float64: thousands of terms
                results[i] = (total, bool((scored.argmax(dim=-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, scored in disjoint windows of max_length tokens (lm_eval's own
        windows: the first conditions on BOS, each later one on the tokens before it)."""
        windows: list[TokenRequest] = []
        counts = []
        for (text,) in (request.args for request in requests):
            pieces = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            own = [(None, *make_disjoint_window(piece)) for piece in pieces]
            windows += own
            counts.append(len(own))
        scores = self._loglikelihood_tokens(windows)
        totals, start = [], 0
        for count in counts:
            totals.append(sum(score for score, _ in scores[start : start + count]))
            start += count
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Continue each context on the engine, all requests in one batch, until a stop string, EOS or
        max_gen_toks. `do_sample` false (the default) decodes greedily; otherwise temperature/top_p/top_k apply."""
        prompts, params = [], []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampled = bool(kwargs.pop("do_sample", False))
            params.append(
                SamplingParams(
                    max_new_tokens=max_new,
                    temperature=float(kwargs.get("temperature", 1.0)) if sampled else 0.0,
                    top_p=float(kwargs.get("top_p", 1.0)),
                    top_k=int(kwargs.get("top_k", 0)),
                    stop=tuple(stop for stop in until if stop),
                )
            )
            prompts.append(self.tok_encode(context)[-(self.max_length - max_new) :])  # left-truncated, as HF does
        return [completion.text for completion in self.engine.generate(prompts, params)]

    def get_model_info(self) -> dict:
        return {"model_path": self.pretrained, "model_type": self.model.config.model_type}


if __name__ == "__main__":  # lm_eval's own command line with `seekstack` registered: python -m seekstack.eval.harness
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
