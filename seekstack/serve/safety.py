"""The content policy (`moderation.Policy`) applied to API requests: which categories a caller gets, their
prompts blocked or redacted, the category that acted and its billing on the bill, and /v1/moderations."""

from __future__ import annotations

import uuid

from seekstack.serve.billing import Bill
from seekstack.serve.errors import APIError
from seekstack.serve.keys import ApiKey
from seekstack.serve.moderation import Category, Hit, Policy, redacted, scan
from seekstack.serve.protocol import completion_prompts
from seekstack.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
)
from seekstack.tokenizer import Tokenizer


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
        bill: Bill,
    ) -> bool:
        """400 when a category blocks the prompt's text (the bill names the category; a refused request has no tokens
        and costs nothing), else redact it in place; returns whether the text changed. A token-id prompt is read as
        its decoded text, and a redacted one becomes the token ids of its redacted text."""
        is_chat = isinstance(body, ChatCompletionRequest)
        prompts = [message.text() for message in body.messages] if is_chat else completion_prompts(body)
        cleaned = list(prompts)
        for index, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
            hits = scan(categories, text)
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
            text = redacted(text, hits)
            cleaned[index] = text if isinstance(prompt, str) else self.tokenizer.encode(text)
        if cleaned == prompts:
            return False
        if is_chat:
            for message, text in zip(body.messages, cleaned, strict=True):
                message.content = text
        else:
            body.prompt = cleaned[0] if isinstance(body.prompt, str) else cleaned
        return True

    def note(self, bill: Bill, hits: list[Hit]) -> Hit | None:
        """Record the first acting category on the bill (a blocking one first) with its billing; return the blocking
        hit."""
        blocking = next((hit for hit in hits if hit.action == "block"), None)
        if hits and (bill.moderation is None or blocking is not None):
            acting = blocking or hits[0]
            bill.moderation = acting.category
            bill.free = self.policy.categories[acting.category].rule.billing == "none"
        return blocking

    def moderations(self, body: ModerationRequest, key: ApiKey | None) -> ModerationResponse:
        """OpenAI's /v1/moderations under the caller's categories: per input, each category found and its score (a
        classifier's probability, else 1 or 0)."""
        categories = self.categories_for(key)
        results = []
        for text in [body.input] if isinstance(body.input, str) else body.input:
            hits = scan(categories, text)
            found = {category.name: any(hit.category == category.name for hit in hits) for category in categories}
            scores = {
                category.name: category.classifier.score(text) if category.classifier else float(found[category.name])
                for category in categories
            }
            results.append(ModerationResult(flagged=any(found.values()), categories=found, category_scores=scores))
        return ModerationResponse(
            id=f"modr-{uuid.uuid4().hex}", model=body.model or "seekstack-policy", results=results
        )
