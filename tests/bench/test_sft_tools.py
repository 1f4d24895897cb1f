"""bench/sft_tools.py's scores read replies as the server's tool-call parser reads them."""

import random
import sys
from types import SimpleNamespace

from tests.bench.support import BENCH

sys.path.insert(0, str(BENCH))  # the script imports options.py as its sibling
from bench.sft_tools import call_scores, conversation  # noqa: E402
from seekstack.tokenizer import TOOL_CALLS_BEGIN, TOOL_CALLS_END, tool_call_text  # noqa: E402


class RepliesAs:
    """An engine that answers each prompt with the next of `replies` ((text, finish_reason))."""

    def __init__(self, replies: list[tuple[str, str]]) -> None:
        self.tokenizer = SimpleNamespace(encode_chat=lambda messages, tools: [0])
        self.replies = replies

    def generate(self, prompts, params):
        return [SimpleNamespace(text=text, finish_reason=reason) for text, reason in self.replies[: len(prompts)]]


def test_a_call_cut_by_max_new_tokens_is_no_call_the_parser_reads():
    """Since the server's parser keeps a call cut by max_tokens (6802566), the bench counted one as a call made."""
    asked = conversation(random.Random(0), "Oslo")
    name, arguments = (asked[1]["tool_calls"][0]["function"][key] for key in ("name", "arguments"))
    whole = TOOL_CALLS_BEGIN + tool_call_text(name, arguments) + TOOL_CALLS_END
    assert call_scores(RepliesAs([(whole, "stop")]), [asked]) == (1.0, 1.0, 1.0)
    assert call_scores(RepliesAs([(whole[: whole.index(arguments) + 3], "length")]), [asked]) == (0.0, 0.0, 0.0)
