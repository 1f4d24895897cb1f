"""The content policy (`moderation.Policy`) applied to API requests: which categories a caller gets, their
prompts blocked or redacted, the category that acted and its billing on the bill, and /v1/moderations."""

from __future__ import annotations

import bisect
import codecs
import json
import uuid
from dataclasses import dataclass, replace

from seekstack.serve.billing import Bill
from seekstack.serve.errors import APIError
from seekstack.serve.keys import ApiKey
from seekstack.serve.moderation import Category, Hit, Policy, PolicyTimeout, redacted, scan
from seekstack.serve.protocol import completion_prompts, token_bytes
from seekstack.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
)
from seekstack.tokenizer import Tokenizer

# OpenAI's moderation categories, as its answer names them: each result holds them all (openai-python reads
# `results[0].categories.hate`); one the caller's policy does not define is not found, scores 0 and read no input
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent", "self-harm",
    "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


class ContentSafety:
    """A server's content policy (none: nothing is moderated)."""

    def __init__(self, policy: Policy | None, tokenizer: Tokenizer):
        self.policy, self.tokenizer = policy, tokenizer

    def categories_for(self, key: ApiKey | None) -> list[Category]:
        """The categories enforced for this caller."""
        if self.policy is None:
            return []
        return self.policy.for_caller(key.name if key else None, key.plan if key else None)

    def moderate_prompt(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        categories: list[Category],
        bill: Bill | None,
    ) -> bool:
        """400 when a category blocks the prompt's text (the bill names the category; a refused request has no tokens
        and costs nothing; None: /tokenize's count, billed nothing), else redact it in place; returns whether the text
        changed. A token-id prompt is read as the text it spells, and only its tokens that spell a redacted span are
        replaced (`redacted_ids`)."""
        is_chat = isinstance(body, ChatCompletionRequest)
        if is_chat:
            self._moderate_tools(body, categories, bill)
        prompts = [message.text() for message in body.messages] if is_chat else completion_prompts(body)
        cleaned = list(prompts)
        for index, prompt in enumerate(prompts):
            text, spelled = (prompt, None) if isinstance(prompt, str) else self._read_ids(prompt)
            hits = scanned(categories, text, "messages" if is_chat else "prompt")
            if not hits:
                continue
            blocking = self.note(bill, hits)
            if blocking is not None:
                raise APIError(
                    400,
                    f"the prompt was refused by this server's content policy (category {blocking.category!r})",
                    param="messages" if is_chat else "prompt",
                    code="content_policy_violation",
                )
            if isinstance(prompt, str):
                cleaned[index] = redacted(text, hits)
            elif spelled is None:  # token pieces that are not their text: the whole prompt encoded again
                cleaned[index] = self.tokenizer.encode(redacted(text, hits))
            else:
                cleaned[index] = redacted_ids(self.tokenizer, prompt, spelled, hits)
        if cleaned == prompts:
            return False
        if is_chat:
            for message, text in zip(body.messages, cleaned, strict=True):
                message.content = text
        else:
            body.prompt = cleaned[0] if isinstance(body.prompt, str) else cleaned
        return True

    def _moderate_tools(self, body: ChatCompletionRequest, categories: list[Category], bill: Bill | None) -> None:
        """400 when a blocking or redacting category is found in what a chat's prompt writes beside its messages' texts:
        the tools it lists and the calls a replayed history made, each read as its JSON with the escapes undone (a
        client's "\\u70b8"). Their fields are structured, so a span found there is refused, not redacted."""
        fields = [("tools", "a tool", tool) for tool in body.offered_tools() or ()]
        fields += [
            ("messages", "a replayed tool call", {"name": call.function.name,
                                                  "arguments": json.loads(call.function.arguments or "{}")})
            for message in body.messages
            for call in message.tool_calls or ()
        ]  # fmt: skip
        for param, what, field in fields:
            hits = scanned(categories, json.dumps(field, ensure_ascii=False), param)
            acting = self.note(bill, hits) or next((hit for hit in hits if hit.action == "redact"), None)
            if acting is not None:
                redacting = (
                    "" if acting.action == "block" else ", which redacts text: its fields are refused, not redacted"
                )
                message = (
                    f"{what} was refused by this server's content policy (category {acting.category!r}{redacting})"
                )
                raise APIError(400, message, param=param, code="content_policy_violation")

    def _read_ids(self, ids: list[int]) -> tuple[str, Spelling | None]:
        """The text token ids spell and, for a byte-level tokenizer (seekstack's, DeepSeek's), their `Spelling`; None
        for one whose pieces are not their text (SentencePiece's `▁how`, byte-fallback `<0xE2>`): read decoded."""
        spelled, decoded = Spelling.of(self.tokenizer, ids), self.tokenizer.decode(ids)
        return (decoded, spelled if spelled.text == decoded else None)

    def note(self, bill: Bill | None, hits: list[Hit]) -> Hit | None:
        """Record the first acting category on the bill, if any (a blocking one first) with its billing; return the
        blocking hit."""
        blocking = next((hit for hit in hits if hit.action == "block"), None)
        if bill is not None and hits and (bill.moderation is None or blocking is not None):
            acting = blocking or hits[0]
            bill.moderation = acting.category
            bill.free = self.policy.categories[acting.category].rule.billing == "none"
        return blocking

    @property
    def model(self) -> str:
        """What /v1/moderations names as the model that ran (OpenAI's answer names its moderation model, whatever
        was asked): the policy, by its file's name."""
        return f"seekstack-policy:{self.policy.name if self.policy else 'none'}"

    def moderations(self, body: ModerationRequest, key: ApiKey | None) -> ModerationResponse:
        """OpenAI's /v1/moderations under the caller's categories: per input (a multimodal input's text parts as one),
        each category found, its score (1 for a term or pattern found, else the classifier's probability, else 0), so
        a score at or over the category's threshold is a category found, and the input types it read (text); OpenAI's
        categories the policy does not define are there too, not found, at 0, having read nothing ([]); the request's
        `model` is not read (`model` answers)."""
        categories = self.categories_for(key)
        results = []
        for text in body.texts():
            hits = scanned(categories, text, "input")
            found = unchecked(False) | {
                category.name: any(hit.category == category.name for hit in hits) for category in categories
            }
            scores = unchecked(0.0) | {category.name: _score(category, hits, text) for category in categories}
            applied = unchecked([]) | {category.name: ["text"] for category in categories}
            results.append(ModerationResult(flagged=any(found.values()), categories=found, category_scores=scores,
                                            category_applied_input_types=applied))  # fmt: skip
        return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=self.model, results=results)


def unchecked(value: object) -> dict[str, object]:
    """`value` under each of OPENAI_CATEGORIES: what a result says of a category the policy does not check."""
    return dict.fromkeys(OPENAI_CATEGORIES, value)


def _score(category: Category, hits: list[Hit], text: str) -> float:
    """The category's score of a text: its hits' highest (1 for a span), else its classifier's probability, else 0."""
    scores = [hit.score for hit in hits if hit.category == category.name]
    if scores:
        return max(scores)
    return category.probability(text) if category.classifier is not None else 0.0


def scanned(categories: list[Category], text: str, param: str) -> list[Hit]:
    """`scan` of a request's text; 400 `content_policy_timeout` when a category's patterns take too long on it (the
    request can be neither passed unread nor judged)."""
    try:
        return scan(categories, text)
    except PolicyTimeout as error:
        raise APIError(400, f"this server's content policy could not check the {param}: {error}", param=param,
                       code="content_policy_timeout") from None  # fmt: skip


@dataclass
class Spelling:
    """The text token ids spell, as the byte-level decoder joins their bytes (part of a UTF-8 character in one token,
    the rest in the next), and where each token starts in it: before token i (and, at len(ids), after the last)
    `chars[i]` characters are complete, and `aligned[i]` says no part of the next one came before (a character
    boundary)."""

    text: str
    chars: list[int]
    aligned: list[bool]

    @classmethod
    def of(cls, tokenizer: Tokenizer, ids: list[int]) -> Spelling:
        """The spelling of `ids`; bytes that are no UTF-8 read as U+FFFD, as `Tokenizer.decode` reads them."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts, chars, aligned, length = [], [], [], 0
        for token_id in ids:
            chars.append(length)
            aligned.append(not decoder.getstate()[0])
            parts.append(decoder.decode(bytes(token_bytes(tokenizer, token_id))))
            length += len(parts[-1])
        parts.append(decoder.decode(b"", final=True))
        text = "".join(parts)
        return cls(text, [*chars, len(text)], [*aligned, True])

    def tokens_around(self, span: tuple[int, int]) -> tuple[int, int]:
        """The fewest whole tokens, [first, end), spelling whole characters, that hold the characters of `span`."""
        first = bisect.bisect_right(self.chars, span[0]) - 1
        while not self.aligned[first]:
            first -= 1
        end = max(first + 1, bisect.bisect_left(self.chars, span[1]))
        while not self.aligned[end]:
            end += 1
        return first, end


def redacted_ids(tokenizer: Tokenizer, ids: list[int], spelled: Spelling, hits: list[Hit]) -> list[int]:
    """`ids` with the tokens around each redacting hit's span (`Spelling.tokens_around`) replaced by the ids of their
    text redacted; every other id stays as sent (overlapping hits: the first wins, as in `redacted`)."""
    runs: list[tuple[int, int, list[Hit]]] = []  # [first, end) tokens and the hits they hold
    for hit in hits:
        if hit.action != "redact" or hit.span is None or (runs and hit.span[0] < runs[-1][2][-1].span[1]):
            continue
        first, end = spelled.tokens_around(hit.span)
        held = [hit]
        if runs and first < runs[-1][1]:  # a token shared with the run before: one run
            first, _, before = runs.pop()
            held = [*before, hit]
        runs.append((first, end, held))
    out, position = [], 0
    for first, end, held in runs:
        start = spelled.chars[first]
        shifted = [replace(hit, span=(hit.span[0] - start, hit.span[1] - start)) for hit in held]
        out += [*ids[position:first], *tokenizer.encode(redacted(spelled.text[start : spelled.chars[end]], shifted))]
        position = end
    return out + ids[position:]
