"""The OpenAI-compatible HTTP API over the engine: routes, authentication, rate limits, billing, streaming.

Every generation request, whatever its outcome after authentication, leaves one row in the usage
ledger, written before the response's last byte (for streams: before `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.metadata import version
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from seekstack.adapters.registry import UnknownAdapter
from seekstack.infer.engine import Engine
from seekstack.infer.outputs import TokenLogprob
from seekstack.schema import ConfigError, shown_value
from seekstack.serve.access import DEFAULT_MAX_BODY_BYTES, check_open_mode_request, read_body
from seekstack.serve.adapter_routes import add_adapter_routes
from seekstack.serve.billing import Bill
from seekstack.serve.bridge import AsyncEngine, RequestFailure, RequestGroup
from seekstack.serve.budget import BudgetHolds, OverBudget, affordable_tokens, most_cost_pico
from seekstack.serve.chat_page import add_chat_page
from seekstack.serve.database import Database, in_write_thread
from seekstack.serve.errors import APIError, internal_error, invalid_body, invalid_value, named_model, parse_body
from seekstack.serve.keys import (
    ApiKey,
    KeyStore,
    Plan,
    format_amount,
    format_cost,
    format_duration,
    utc_time,
)
from seekstack.serve.ledger import Ledger, parse_day, total_cost
from seekstack.serve.metrics import STATS_INTERVAL_S, ServerMetrics
from seekstack.serve.moderation import Category, HeldLogprobs, ModeratedStream, Policy
from seekstack.serve.openapi import describe, error_responses, generation_responses, json_request
from seekstack.serve.protocol import (
    candidates,
    chat_logprobs,
    completion_logprobs,
    completion_prompts,
    echo_only,
    json_format,
    longest_token_chars,
    prompt_ids,
    refuse_overlong_text,
    refuse_unsampleable,
    refuse_unsupported,
    requested_length_name,
    requested_max_tokens,
    sampling_params,
    tools_tokens,
    vllm_prompt_logprobs,
)
from seekstack.serve.ratelimit import (
    LIMIT_HEADERS,
    Charge,
    NeverFits,
    RateLimited,
    RateLimiter,
    limit_headers,
)
from seekstack.serve.reasoning import ReasoningSplit, given_start
from seekstack.serve.request_ids import HEADER as REQUEST_ID
from seekstack.serve.request_ids import LEFT_HEADERS, RequestIds, SentIds, request_id_of, take_body_request_id
from seekstack.serve.safety import ContentSafety
from seekstack.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
    ModerationRequest,
    ModerationResponse,
    PromptTokensDetails,
    ServerVersion,
    Usage,
    UsageReport,
)
from seekstack.serve.tokenize_routes import TOKENIZE_REQUESTS, add_tokenize_routes
from seekstack.serve.tool_calls import ToolCallParser, forced_calls_format, message_with_calls

log = logging.getLogger("seekstack.serve")
CLIENT_CLOSED = 499  # nginx's status for a client that left before the response ended
# A request the server cut off as it stopped (past --shutdown-timeout, or a second Ctrl-C): its failure, at no cost
SERVER_STOPPED = 503
CUT_OFF = "stopping: cut off a request still running"
STOP_NOW_POLL_S = 0.1  # how often a stopping server looks for a second Ctrl-C while it waits
# How long a stopping server waits for the calls cut off and the engine before saying so: a step is milliseconds, but
# torch.compile's first decode step takes minutes on a large model
STOP_WAIT_NOTE_S = 1.0
# The ledger's model for a request naming one this server does not serve (a typo, a client's control characters or
# megabytes): one row of `seekstack usage` a key and day, not one a name; the name sent goes to the log
UNKNOWN_MODEL = "(unknown)"
USAGE_REPORT_PARAMETERS = ("key", "since", "until", "model")  # /v1/admin/usage's query
SHOULD_RETRY = "x-should-retry"  # OpenAI's clients read "false" as: do not send this request again
# OpenAI's routes an OpenAI client may call that this server does not have: why, in the 404
ABSENT_ROUTES = {
    "/v1/embeddings": "the model is a decoder trained for next-token prediction, and its pooled hidden states are no "
    "embedding model",
    "/v1/responses": "this server answers OpenAI's Chat Completions API (/v1/chat/completions), not its Responses API",
}


class EventStream(StreamingResponse):
    """Server-sent events that notice a client leaving at once, not at the next write, then run `on_close`
    however the stream ended (also when the client left before the first event: the generator never ran), with
    the status of a stream that did not record its own ending: CLIENT_CLOSED, or SERVER_STOPPED when the server
    cancelled it."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[int], Awaitable[None]]):
        super().__init__(events)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        ended_by = CLIENT_CLOSED
        try:
            async with anyio.create_task_group() as tasks:

                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        except asyncio.CancelledError:  # not the client leaving (that ends the task group): the server stopping
            ended_by = SERVER_STOPPED
            raise
        finally:
            await self.body_iterator.aclose()
            await self.on_close(ended_by)


# Characters JSON leaves unescaped in a string that Python's str.splitlines (httpx's iter_lines) ends a line at: a
# generated NEL or line separator cut an event's `data:` line in two for such a client
LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event of `payload` as JSON, on one line for any client's line splitting."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data.translate(LINE_BREAKS_JSON_KEEPS)}\n\n"


class Server:
    """State behind the routes: the engine bridge, keys, ledger, limits and metrics."""

    def __init__(
        self,
        engine: Engine,
        database: Database,
        model_name: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        policy: Policy | None = None,
        reasoning_parser: str | None = None,
        log_requests: bool = False,
        log_stats: bool = True,
    ):
        self.engine = engine
        self.log_requests, self.log_stats = log_requests, log_stats  # vLLM's --enable-log-requests, --disable-log-stats
        self.reasoning_parser = reasoning_parser  # "deepseek_r1": chat replies split at </think> (serve.reasoning)
        self.max_body_bytes = max_body_bytes
        self.max_token_chars = longest_token_chars(engine.tokenizer)
        self.safety = ContentSafety(policy, engine.tokenizer)
        self.model_name = model_name or engine.model_name
        if self.model_name == UNKNOWN_MODEL:
            raise ValueError(
                f"the served model name {UNKNOWN_MODEL!r} is what the ledger records requests for models this server "
                "does not serve under; give the model another name (--served-model-name)"
            )
        self.keys = KeyStore(database)
        self.ledger = Ledger(database)
        self.budgets = BudgetHolds(self.ledger)
        self.limiter = RateLimiter(database)
        self.metrics = ServerMetrics(self.model_name, engine.max_model_len)
        self.bridge = AsyncEngine(engine, self.metrics)
        self.created = int(time.time())
        self.calls: set[asyncio.Task] = set()  # the tasks answering generation calls, until each has its row
        # set by a second Ctrl-C (launch.QuietCutOffs): the shutdown waits no longer for the calls and the engine
        self.stop_now = threading.Event()

    def track_call(self) -> None:
        """Count the current task as answering a generation call until it ends (its row and charge written)."""
        task = asyncio.current_task()
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        if not self.keys.any_keys():
            log.warning("no API keys in %s: serving without authentication", self.keys.database.location)
        self.bridge.start()
        stats = asyncio.create_task(self.log_stats_every_interval()) if self.log_stats else None
        yield
        if stats is not None:
            stats.cancel()
        # Calls still running past --shutdown-timeout were cancelled just before (uvicorn): each closes with the
        # engine thread's report of its abort, then writes its row and settles its charge; the thread stops after.
        # A second Ctrl-C (`stop_now`) ends the wait: the process exits at once, the rows of the calls cut off left as a
        # crash leaves them (a stream's billed so far, another's none)
        waiting = asyncio.ensure_future(self.calls_and_engine_ended())
        note_at = time.monotonic() + STOP_WAIT_NOTE_S
        while not waiting.done():
            if self.stop_now.is_set():
                waiting.cancel()
                log.warning("stopping now (a second Ctrl-C), not waiting for the requests cut off and the engine")
                break
            if note_at is not None and time.monotonic() >= note_at:
                log.warning("stopping: waiting for the requests cut off and the engine's step in progress to end (a "
                            "compile can take minutes); Ctrl-C again to exit without waiting")  # fmt: skip
                note_at = None
            await asyncio.wait({waiting}, timeout=STOP_NOW_POLL_S)
        if waiting.done() and not waiting.cancelled():
            waiting.result()  # the wait's error, the engine stop's included, fails the shutdown as it is raised

    async def calls_and_engine_ended(self) -> None:
        """Wait for the generation calls to have their rows, then for the engine thread to end."""
        if self.calls:
            await asyncio.wait(self.calls)
        await self.bridge.stop_async()

    async def log_stats_every_interval(self) -> None:
        """vLLM's stats line (throughput, requests running and waiting, cache usage) every STATS_INTERVAL_S seconds
        in which the server worked."""
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            line = self.metrics.stats_line(time.monotonic())
            if line is not None:
                log.info(line)

    def authenticate(self, request: Request, admin: bool = False) -> ApiKey | None:
        """The caller's key (None while no key exists: the server is open, to loopback JSON requests only); 401
        without a valid one (none, unknown, revoked, or expired)."""
        if not self.keys.any_keys():
            check_open_mode_request(request)
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            # a header of another form (the key without "Bearer " before it) is not a missing key
            problem = "the Authorization header holds no Bearer API key" if header.strip() else "missing API key"
            raise APIError(401, f"{problem}: send the header 'Authorization: Bearer sk-ss-...'", code="no_api_key")
        key = self.keys.verify(token.strip())
        if key is None:
            raise APIError(401, "the API key is not valid or was revoked", code="invalid_api_key")
        if key.expired(time.time()):
            raise APIError(401, f"the API key expired at {utc_time(key.expires_at)} UTC", code="expired_api_key")
        if admin and not key.admin:
            raise APIError(403, f"key {key.name!r} is not an admin key", "permission_error", code="admin_required")
        return key

    def models(self, key: ApiKey | None = None) -> ModelList:
        """The base model, then each LoRA adapter loaded on it (those `key` may use)."""
        lora, length = self.engine.lora, self.engine.max_model_len
        adapters = [
            ModelCard(
                id=name, root=str(root), parent=self.model_name, created=lora.loaded_at[name], max_model_len=length
            )
            for name, root in lora.folders.items()
        ]
        checkpoint = None if self.engine.model_dir is None else str(self.engine.model_dir)
        cards = [ModelCard(id=self.model_name, root=checkpoint, created=self.created, max_model_len=length), *adapters]
        return ModelList(data=[card for card in cards if key is None or key.may_use(card.id)])

    def model(self, model_id: str, key: ApiKey | None = None) -> ModelCard:
        """One card of `models` (OpenAI's models.retrieve); `unknown_model`'s 404 for a model `key` may not see."""
        for card in self.models(key).data:
            if card.id == model_id:
                return card
        raise self.unknown_model(model_id, key)

    def adapter_for(self, model: str, key: ApiKey | None = None) -> str | None:
        """The adapter a request's `model` names (None: the base model); `unknown_model`'s 404 for one this server
        does not have or `key` may not use."""
        if (key is not None and not key.may_use(model)) or not self.serves(model):
            raise self.unknown_model(model, key)
        return None if model == self.model_name else model

    def serves(self, model: object) -> bool:
        """Whether `model` names the base model or a LoRA adapter loaded on it."""
        return isinstance(model, str) and (model == self.model_name or model in self.engine.lora.weights)

    def recorded_model(self, named: object) -> str:
        """The model the ledger records a request under, from the `model` its body names (None or "": the base's, as
        vLLM's default): a name this server serves as it is, any other as UNKNOWN_MODEL, the name logged."""
        if named is None or named == "":
            return self.model_name
        if self.serves(named):
            return named
        log.warning("A request named the model %s, which is not served; its usage is recorded under the model %r",
                    shown_value(named), UNKNOWN_MODEL)  # fmt: skip
        return UNKNOWN_MODEL

    def unknown_model(self, model: str, key: ApiKey | None = None) -> APIError:
        """The 404, in OpenAI's shape, for a `model` this server does not have or `key` may not use, alike (a key
        learns nothing of the models it may not see), naming those it may use; a long `model` or model id is shown by
        its start."""
        usable = ", ".join(shown_value(card.id) for card in self.models(key).data) or "none"
        message = f"the model {shown_value(model)} does not exist or you do not have access to it; you may use {usable}"
        return APIError(404, message, param="model", code="model_not_found")

    async def generate(self, request: Request, schema: type[ChatCompletionRequest | CompletionRequest]) -> Response:
        """A chat or text completion: validate, admit, submit, then answer in one piece or as a stream."""
        self.track_call()
        bill = Bill(self.ledger, None, self.model_name, request.url.path, time.perf_counter())
        bill.key = await asyncio.to_thread(self.authenticate, request)  # database reads: off the event loop
        charge = None  # the rate-limit charge, once admitted
        try:
            charge = await self.count(request, bill.key)  # counted, whatever comes of it
            await asyncio.to_thread(self.refuse_over_budget, bill.key)  # before any work: a database read
            bill.plan = bill.key.prices if bill.key else await asyncio.to_thread(self.ledger.default_plan)
            raw = await read_body(request, self.max_body_bytes)
            try:
                body = await asyncio.to_thread(parse_body, schema, raw)  # JSON and tokenizer: off the event loop
            except APIError:  # recorded under the model it names, where a field beside it failed
                bill.model = self.recorded_model(await asyncio.to_thread(named_model, raw))
                raise
            take_body_request_id(request, body.request_id)
            model = body.model or self.model_name  # none named: the base model, as vLLM's
            bill.model = self.recorded_model(model)  # in the response too, where it is served
            refuse_unsupported(body)
            adapter = self.adapter_for(model, bill.key)
            refuse_overlong_text(body, self.engine.max_model_len, self.max_token_chars)
            parsed = self.reasoning_parser is not None and isinstance(body, ChatCompletionRequest)  # R1 replies
            start = given_start(body, self.engine.tokenizer) if parsed else None  # the answer follows the reasoning
            forced = isinstance(body, ChatCompletionRequest) and body.tools  # tool_choice may force tool calls
            calls_format = await asyncio.to_thread(forced_calls_format, body, self.engine, start) if forced else None
            output_format = calls_format or await asyncio.to_thread(json_format, body, self.engine, start)  # grammars
            refuse_unsampleable(body, output_format is not None)
            prompts = await asyncio.to_thread(prompt_ids, body, self.engine.tokenizer)
            prompt_tokens = sum(len(prompt) for prompt in prompts)  # each prompt once, whatever n
            categories = self.safety.categories_for(bill.key)
            if categories and await asyncio.to_thread(self.safety.moderate_prompt, body, categories, bill):  # scans
                prompts = await asyncio.to_thread(prompt_ids, body, self.engine.tokenizer)  # redacted
                prompt_tokens = sum(len(prompt) for prompt in prompts)
            requests = [prompt for prompt in prompts for _ in range(candidates(body))]  # one per engine request
            unasked_limit = await asyncio.to_thread(
                self.unasked_limit, body, bill.key, bill.plan, prompt_tokens, len(requests)
            )
            listed = 0  # of the prompt's tokens, those listing the tools, read where the prompt leaves no room
            if prompt_tokens >= min(self.engine.max_model_len, self.engine.context_len):
                listed = await asyncio.to_thread(tools_tokens, body, self.engine.tokenizer, prompt_tokens)
            choices = [
                params
                for prompt in prompts
                for params in sampling_params(
                    body,
                    len(prompt),
                    self.engine.max_model_len,
                    unasked_limit,
                    self.engine.sampling_defaults,
                    self.engine.context_len,
                    listed,
                )
            ]
            if start is not None:  # stops match the answer
                choices = [dataclasses.replace(params, stop_after_reasoning=start) for params in choices]
            tokens = prompt_tokens + sum(params.max_new_tokens for params in choices)
            await asyncio.to_thread(
                self.hold_budget, bill, prompt_tokens, tokens - prompt_tokens, requested_length_name(body)
            )
            request.scope["state"][LEFT_HEADERS] = await in_write_thread(
                self.reserve, bill.key, charge, tokens
            )  # headers
            constraints = [output_format.constraint() for _ in choices] if output_format else None
            try:
                group = await self.bridge.submit(requests, choices, adapter, constraints)
            except UnknownAdapter:  # unloaded since adapter_for found it
                raise self.unknown_model(model, bill.key) from None
            except ValueError as error:  # what the engine judges: allowed_token_ids all banned (bad_words, min_tokens)
                raise invalid_value(error) from None
            self.metrics.request_params_n.observe(body.n)
            self.metrics.request_params_max_tokens.observe(max(params.max_new_tokens for params in choices))
        except ClientDisconnect:  # gone before its body arrived
            await bill.record_async(CLIENT_CLOSED)
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:  # the server stopping: at no cost, its rate-limit charge included
            await self.close_bill(bill, SERVER_STOPPED, charge, 0)
            return _answered_stop()
        except Exception as error:  # refused (or failed) after its charge, if any: it uses none of it
            await self.close_bill(bill, error.status if isinstance(error, APIError) else 500, charge, 0)
            raise
        bill.prompt_tokens = prompt_tokens
        # the request's id (a client's X-Request-Id, else a new one) names the response, as vLLM names it
        response_id = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{request_id_of(request)}"
        usage = ChoicesUsage([len(prompt) for prompt in prompts], candidates(body), billed=not echo_only(body))
        if self.log_requests:
            log.info("Received request %s: model %r, %d prompt tokens, %d choices of at most %d tokens%s", response_id,
                     bill.model, prompt_tokens, len(choices), max(params.max_new_tokens for params in choices),
                     ", streamed" if body.stream else "")  # fmt: skip

        async def finish(status: int) -> None:
            """Free the request's engine slots, bill it, settle its rate-limit charge (no-ops when done before). A
            prompt none of whose choices the engine had started (a client that left while it was queued) is not
            billed; the tokens generated before the abort that nobody read are."""
            closed = await group.close()
            for index, output in closed.unread:
                usage.count(index, output, bill)
            unstarted = closed.unstarted
            if unstarted:
                per_prompt = candidates(body)
                bill.prompt_tokens = sum(
                    len(prompt)
                    for number, prompt in enumerate(prompts)
                    if not unstarted.issuperset(range(number * per_prompt, (number + 1) * per_prompt))
                )
            failed = 500 <= (bill.status or status) < 600  # a stream records its own ending first
            # a request the server failed, like one it refused, uses none of the key's tokens per minute
            await self.close_bill(bill, status, charge, 0 if failed else bill.total_tokens)
            if self.log_requests:
                log.info("Finished request %s: status %d, %d prompt + %d completion tokens in %.2f s", response_id,
                         bill.status or status, bill.prompt_tokens, bill.completion_tokens,
                         time.perf_counter() - bill.started)  # fmt: skip

        if body.stream:
            try:
                await in_write_thread(bill.open)
            except asyncio.CancelledError:  # the server stopping as the row is written (the bill's lock orders both)
                await finish(SERVER_STOPPED)
                return _answered_stop()
            except Exception:  # the database refused its row: no stream, and no engine work for no one
                await finish(500)
                raise
            events = self.stream(body, prompts, group, bill, usage, categories, response_id)
            return EventStream(events, on_close=finish)
        status = CLIENT_CLOSED
        try:
            answer = self.complete(body, prompts, group, bill, usage, categories, response_id)
            response = await _unless_client_leaves(request, answer)
            status = 200
            return response
        except ClientLeft:
            return Response(status_code=CLIENT_CLOSED)
        except asyncio.CancelledError:  # the server stopping
            status = SERVER_STOPPED
            return _answered_stop()
        except Exception as error:
            answer = _refused_while_generating(error, bill) or internal_error(error, "generating")
            status = answer.status
            raise answer from None
        finally:
            await finish(status)  # before the response leaves

    async def close_bill(self, bill: Bill, status: int, charge: Charge | None, tokens: int) -> None:
        """Write a request's usage row with `status` (retried while the database is held), then correct its rate-limit
        `charge` to the `tokens` it used: the row never waits for the charge."""
        try:
            await bill.record_async(status)
        finally:
            self.budgets.release(bill)
            await self.settle(charge, tokens, retry=status != SERVER_STOPPED)

    async def settle(self, charge: Charge | None, tokens: int, retry: bool) -> None:
        """Correct a request's rate-limit `charge` (None: its key has no limits) to the `tokens` it used, trying again
        while the database is held if `retry` (not for a request a stopping server cuts off: the exit does not wait).
        A charge that cannot be corrected keeps the tokens admitted (the most the request could use, out of the window
        within a minute): logged, not raised, so the request's answer goes out."""
        if charge is None:
            return
        try:
            await in_write_thread(self.limiter.settle if retry else self.limiter.settle_once, charge, tokens)
        except Exception as error:
            log.warning("rate-limit charge %d keeps its admitted tokens, not the %d used: %s", charge.charge_id,
                        tokens, error)  # fmt: skip

    def unasked_limit(self, body, key: ApiKey | None, plan: Plan, prompt_tokens: int, requests: int) -> int | None:
        """The most tokens each of a call's `requests` engine requests may generate when it gives no max_tokens: its
        share of what is left of `key`'s tokens per minute (less what its window has charged) after the prompt, and of
        what its budget leaves (at `plan`'s prices); None for a call with max_tokens or a key without either limit."""
        if key is None or requested_max_tokens(body) is not None:
            return None
        limits = []
        if key.tpm is not None:
            limits.append((self.limiter.tokens_left(key.name, key.tpm) - prompt_tokens) // requests)
        if key.budget is not None:
            limits.append(affordable_tokens(plan, self.budgets.left_pico(key), prompt_tokens, requests))
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None

    def hold_budget(self, bill: Bill, prompt_tokens: int, completion_tokens: int, length_name: str | None) -> None:
        """Hold the most `bill`'s request may cost (its `prompt_tokens` and at most `completion_tokens`) against its
        key's budget while it runs; 429 `insufficient_quota` where that does not fit in what the budget leaves (told
        not to retry unless requests under way may leave room), naming the length field where the request gave one
        (`length_name`) and its prompt where it did not (it was given what the budget leaves, at least one token)."""
        if bill.key is None:
            return
        try:
            most = most_cost_pico(bill.plan, prompt_tokens, completion_tokens)
            self.budgets.hold(bill.key, bill, most, length_name)
        except OverBudget as error:
            headers = None if error.retry_may_fit else {SHOULD_RETRY: "false"}
            param = length_name or "messages"
            raise APIError(
                429, str(error), "insufficient_quota", param=param, code="insufficient_quota", headers=headers
            ) from None

    def refuse_over_budget(self, key: ApiKey | None) -> None:
        """429 `insufficient_quota`, as OpenAI's for an account out of credit, once the usage of `key`'s name has cost
        its budget (over the budget's period): refused before it is read, the request costs nothing; `x-should-retry:
        false` tells OpenAI's clients not to try again at once."""
        if key is None or key.budget is None:
            return
        budget = key.budget
        since = None if budget.period_s is None else time.time() - budget.period_s
        spent = self.ledger.spent(key.name, since)
        if spent >= budget.amount:
            period = "" if budget.period_s is None else f" in the last {format_duration(budget.period_s)}"
            until = "it is given a higher budget" if budget.period_s is None else "that spend falls below it"
            raise APIError(
                429,
                f"key {key.name!r} has spent {format_cost(spent)}{period}, its whole budget of "
                f"{format_amount(budget.amount)}: no request is served until {until}",
                "insufficient_quota",
                code="insufficient_quota",
                headers={SHOULD_RETRY: "false"},  # the openai client's retries would each count, and be refused
            )

    async def count(self, request: Request, key: ApiKey | None) -> Charge | None:
        """Count `request` against the key's requests per minute, at no tokens yet (None for a key without limits);
        429 over them. From then on its response, whatever it is, carries the `x-ratelimit-*` headers of the key's
        limits, as OpenAI's do (`RequestIds` puts them on it)."""
        if key is None or (key.rpm is None and key.tpm is None):
            return None
        with _rate_limit_errors():
            charge = await in_write_thread(self.limiter.admit, key.name, key.rpm, key.tpm)
        request.scope["state"][LEFT_HEADERS] = limit_headers(charge.requests, charge.tokens)
        return charge

    def reserve(self, key: ApiKey | None, charge: Charge | None, tokens: int) -> dict[str, str]:
        """Charge an admitted request (`charge`) the `tokens` it may use against the key's tokens per minute; 429 over
        them, 400 for more than the key may use in a minute. The `x-ratelimit-*` headers of the key's limits, this
        charge taken (none for a key without limits)."""
        if charge is None:
            return {}
        with _rate_limit_errors():
            return limit_headers(charge.requests, self.limiter.reserve(charge, key.name, key.tpm, tokens))

    async def complete(
        self,
        body,
        prompts: list[list[int]],
        group: RequestGroup,
        bill: Bill,
        usage: ChoicesUsage,
        categories: list[Category],
        response_id: str,
    ) -> JSONResponse:
        """Gather every choice of `prompts` (their token ids) and answer in one JSON body; `bill` counts the tokens as
        they come (`usage`); the content policy reads each choice as it is generated, as in `stream` (a choice it
        blocks stops there, billed for the tokens it had, and ends with finish_reason "content_filter")."""
        is_chat = isinstance(body, ChatCompletionRequest)
        n = len(group.request_ids)
        texts, logprobs, shown_logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        finish_reasons, stop_reasons, prompt_logprobs = [None] * n, [None] * n, [None] * n
        policy = ChoicesPolicy(self, body, group, bill, categories)
        splits = self.reasoning_splits(body, n)
        only_echo = echo_only(body)
        async for index, output in group:
            usage.count(index, output, bill)
            prompt_logprobs[index] = prompt_logprobs[index] or output.prompt_logprobs  # on the first output
            if only_echo:  # the token sampled after the prompt is not shown
                finish_reasons[index], stop_reasons[index] = output.finish_reason, output.stop_reason
                continue
            if index in policy.blocked:  # delivered before its abort
                continue
            logprobs[index] += output.logprobs or []  # ranking best_of reads them all; the answer: those shown
            text, entries, blocked = policy.read(index, output, output.logprobs or [])
            finish_reasons[index] = "content_filter" if blocked else output.finish_reason
            stop_reasons[index] = None if blocked else output.stop_reason
            texts[index] += text
            shown_logprobs[index] += entries
        per_prompt = candidates(body)
        kept = []  # engine request of each choice: per prompt, the n candidates of the highest total logprob
        for first in range(0, n, per_prompt):
            ranked = sorted(range(first, first + per_prompt), key=lambda i: -sum(e.logprob for e in logprobs[i]))
            kept += sorted(ranked[: body.n]) if per_prompt == body.n else ranked[: body.n]
        messages = [AssistantMessage(content=text) for text in texts]
        if splits is not None:
            messages = [split.message(text) for split, text in zip(splits, texts, strict=True)]
            bill.reasoning_tokens = self.reasoning_tokens(splits, usage)
        if is_chat and body.offered_tools():
            for i, message in enumerate(messages):
                parser = ToolCallParser.for_request(body, self.engine.tokenizer)
                messages[i], finish_reasons[i] = message_with_calls(message, finish_reasons[i], parser)
        common = dict(id=response_id, created=int(time.time()), model=bill.model, usage=bill.usage())
        if is_chat:
            response = ChatCompletionResponse(
                prompt_logprobs=vllm_prompt_logprobs(prompt_logprobs[0]) if prompt_logprobs[0] else None,  # one prompt
                choices=[
                    ChatChoice(
                        index=position,
                        message=messages[i],
                        logprobs=chat_logprobs(shown_logprobs[i], self.engine.tokenizer) if body.logprobs else None,
                        finish_reason=finish_reasons[i],
                        stop_reason=stop_reasons[i],
                    )
                    for position, i in enumerate(kept)
                ],
                **common,
            )
        else:
            response = CompletionResponse(
                choices=[
                    CompletionChoice(
                        index=position,
                        text=self.echo_text(body, i // per_prompt) + texts[i],
                        logprobs=self.choice_logprobs(
                            body, prompts[i // per_prompt], prompt_logprobs[i], shown_logprobs[i]
                        ),
                        finish_reason=finish_reasons[i],
                        stop_reason=stop_reasons[i],
                        prompt_logprobs=vllm_prompt_logprobs(prompt_logprobs[i]) if prompt_logprobs[i] else None,
                    )
                    for position, i in enumerate(kept)
                ],
                **common,
            )
        return JSONResponse(response.model_dump())

    async def stream(
        self,
        body,
        prompts: list[list[int]],
        group: RequestGroup,
        bill: Bill,
        usage: ChoicesUsage,
        categories: list[Category],
        response_id: str,
    ) -> AsyncIterator[str]:
        """SSE chunks as the engine produces tokens of `prompts` (their token ids), through the content policy (a choice
        it blocks ends with finish_reason "content_filter"), each with its choice's usage so far when vLLM's
        continuous_usage_stats asks; billed, then the usage chunk if asked, then `data: [DONE]`. An echoed prompt comes
        first: at once, or with logprobs, with its choice's first output (which brings the prompt's logprobs)."""
        is_chat = isinstance(body, ChatCompletionRequest)
        n = len(group.request_ids)
        created = int(time.time())
        text_offsets = [0] * n
        echo_with_logprobs = not is_chat and body.echo and body.logprobs is not None
        only_echo = echo_only(body)
        unechoed = set(range(n)) if echo_with_logprobs else set()  # choices whose prompt is still to be echoed
        policy = ChoicesPolicy(self, body, group, bill, categories)
        splits = self.reasoning_splits(body, n)
        tools = is_chat and body.offered_tools()
        parsers = [ToolCallParser.for_request(body, self.engine.tokenizer) for _ in range(n)] if tools else None
        options = body.stream_options
        asked_usage = options is not None and options.include_usage
        continuous = asked_usage and options.continuous_usage_stats  # as vLLM
        kind = ChatCompletionChunk if is_chat else CompletionResponse

        def chunk(choices: list, usage_so_far: Usage | None) -> str:
            """The event of a chunk of `choices`; with include_usage it has `usage_so_far` (null but on the last
            chunk, or with continuous_usage_stats), and without, no usage field, as OpenAI's."""
            shown = {"usage": usage_so_far} if asked_usage else {}
            return sse(kind(id=response_id, created=created, model=bill.model, choices=choices, **shown))

        try:
            first_usage = bill.usage() if continuous else None  # the chunk of every choice: the call's, no tokens yet
            for i in range(n):  # one choice a chunk, as OpenAI and vLLM send them (a client reads choices[0])
                if is_chat:
                    yield chunk([_role_choice(i)], first_usage)
                elif body.echo and not echo_with_logprobs:
                    yield chunk([CompletionChoice(index=i, text=self.echo_text(body, i // body.n))], first_usage)
            async for index, output in group:
                usage.count(index, output, bill)
                bill.update_soon()
                choice_usage = usage.of_choice(index) if continuous else None
                if index in unechoed:  # as vLLM: the prompt's text and logprobs, before the choice's own
                    unechoed.discard(index)
                    prompt = prompts[index // body.n]
                    echo_logprobs = self.choice_logprobs(body, prompt, output.prompt_logprobs, [])
                    text_offsets[index] = sum(len(token) for token in echo_logprobs.tokens)
                    echo = CompletionChoice(
                        index=index, text=self.echo_text(body, index // body.n), logprobs=echo_logprobs
                    )
                    yield chunk([echo], choice_usage)
                if index in policy.blocked:  # delivered before its abort
                    continue
                # the token sampled after an echoed prompt alone is not shown: its chunk gives the finish reason
                text, entries, blocked = ("", [], False) if only_echo else policy.read(index, output, output.logprobs)
                finish_reason = "content_filter" if blocked else output.finish_reason
                stop_reason = None if blocked else output.stop_reason
                if not (text or entries or finish_reason):
                    continue
                if is_chat:
                    delta = ChatDelta(content=text)
                    if splits is not None:
                        reasoning, content = splits[index].push(text, final=finish_reason is not None)
                        delta = ChatDelta(reasoning_content=reasoning or None, content=content or None)
                    if parsers is not None:
                        delta, finish_reason = parsers[index].delta(delta, finish_reason)
                    shown_entries = body.logprobs and entries
                    if not (delta.model_dump() or shown_entries or finish_reason):
                        continue  # all held back (a call's head, a marker's start): no empty chunk, as vLLM sends none
                    choice = ChatChunkChoice(
                        index=index,
                        delta=delta,
                        logprobs=chat_logprobs(entries, self.engine.tokenizer) if shown_entries else None,
                        finish_reason=finish_reason,
                        stop_reason=stop_reason,
                    )
                    yield chunk([choice], choice_usage)
                else:
                    logprobs = None
                    if body.logprobs is not None and entries:
                        logprobs = completion_logprobs(entries, text_offsets[index])
                        text_offsets[index] += sum(len(entry.token) for entry in entries)
                    choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,
                                              stop_reason=stop_reason)  # fmt: skip
                    yield chunk([choice], choice_usage)
            if splits is not None:
                bill.reasoning_tokens = self.reasoning_tokens(splits, usage)
            await bill.record_async(200)  # before the usage chunk: a client that leaves once it has it had its answer
            if asked_usage:
                yield chunk([], bill.usage())
        except Exception as error:  # the status line has gone: the client learns it from an error event
            answer = _refused_while_generating(error, bill) or internal_error(error, "generating")
            await bill.record_async(answer.status)
            yield sse(answer.body())
        yield "data: [DONE]\n\n"

    def reasoning_splits(self, body, n: int) -> list[ReasoningSplit] | None:
        """A reasoning split for each of a chat call's `n` choices when the server parses reasoning, else None (text
        completions are raw text, as vLLM's)."""
        if self.reasoning_parser is None or not isinstance(body, ChatCompletionRequest):
            return None
        return [ReasoningSplit(given_start(body, self.engine.tokenizer)) for _ in range(n)]

    def reasoning_tokens(self, splits: list[ReasoningSplit], usage: ChoicesUsage) -> int:
        """The reasoning tokens of a call's choices, together (as its completion_tokens)."""
        return sum(
            split.reasoning_tokens(self.engine.tokenizer, tokens)
            for split, tokens in zip(splits, usage.completion_tokens, strict=True)
        )

    def choice_logprobs(
        self,
        body: CompletionRequest,
        prompt: list[int],
        prompt_entries: list[TokenLogprob | None] | None,
        entries: list[TokenLogprob],
    ) -> CompletionLogprobs | None:
        """A completion choice's legacy logprobs, if asked: with echo, the prompt's tokens first (the first one's
        logprob null), then its own, as OpenAI and vLLM give them."""
        if body.logprobs is None:
            return None
        if not body.echo:
            return completion_logprobs(entries, 0)
        first = self.engine.tokenizer.decode([prompt[0]])
        return completion_logprobs([*prompt_entries[1:], *entries], 0, unscored_first=first)

    def echo_text(self, body, prompt_index: int) -> str:
        """What a completion with `echo` puts before the text of a choice of prompt `prompt_index`: that prompt
        (decoded if given as ids)."""
        if isinstance(body, ChatCompletionRequest) or not body.echo:
            return ""
        prompt = completion_prompts(body)[prompt_index]
        return prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt)

    def usage_report(
        self,
        request: Request,
        key_name: str | None,
        since: str | None,
        model: str | None = None,
        until: str | None = None,
    ) -> UsageReport:
        """Admin: tokens and cost per key, day and model, optionally for one key, from a day on, to a day (included),
        for one model. A parameter given twice is refused, naming it (FastAPI would read the last alone), as is one it
        does not take (FastAPI would drop it: `?start_date=` or `?api_key=`, LiteLLM's, reported every key's usage)."""
        self.authenticate(request, admin=True)
        for param in request.query_params:
            if param not in USAGE_REPORT_PARAMETERS:
                raise APIError(400, f"/v1/admin/usage takes no parameter {shown_value(param)}: it takes "
                               f"{', '.join(USAGE_REPORT_PARAMETERS)} (since and until: YYYY-MM-DD)",
                               param=shown_value(param, str), code="unknown_parameter")  # fmt: skip
        for param in USAGE_REPORT_PARAMETERS:
            if len(given := request.query_params.getlist(param)) > 1:
                raise APIError(400, f"{param} given {len(given)} times ({', '.join(map(shown_value, given))}): give it "
                               "once",
                               param=param, code="invalid_value")  # fmt: skip
        bounds = {}
        for param, text in (("since", since), ("until", until)):
            try:
                bounds[param] = parse_day(text) if text else None
            except ValueError as error:
                raise APIError(400, str(error), param=param, code="invalid_value") from None
        try:
            days = self.ledger.daily(key_name, bounds["since"], model, bounds["until"])
        except ValueError as error:  # since after until
            raise APIError(400, str(error), param="until", code="invalid_value") from None
        if key_name is not None and not days and not self.keys.knows(key_name) and not self.ledger.knows(key_name):
            raise APIError(404, f"no key named {shown_value(key_name)}, and no usage recorded for one", param="key",
                           code="key_not_found")  # fmt: skip
        return UsageReport(data=[day.to_dict() for day in days], total_cost=total_cost(days))


class ChoicesUsage:
    """The tokens of a call's engine requests (`per_prompt` for each prompt, of `prompt_tokens` tokens each, in order)
    as they come: completion tokens summed over all (none unless `billed`: the token an echo of max_tokens 0 samples
    after its prompt, not shown, is neither reported nor billed); cached prompt tokens, for each prompt the most any of
    its choices read (they share the prompt, billed once), summed over the prompts."""

    def __init__(self, prompt_tokens: list[int], per_prompt: int, billed: bool):
        self.prompt_tokens, self.per_prompt, self.billed = prompt_tokens, per_prompt, billed
        requests = len(prompt_tokens) * per_prompt
        self.completion_tokens, self.cached_tokens = [0] * requests, [0] * requests

    def count(self, index: int, output, bill: Bill) -> None:
        """Take request `index`'s latest `output` into `bill`."""
        self.completion_tokens[index] = output.completion_tokens if self.billed else 0
        self.cached_tokens[index] = output.cached_tokens
        bill.completion_tokens = sum(self.completion_tokens)
        prompts = range(0, len(self.cached_tokens), self.per_prompt)
        bill.cached_tokens = sum(max(self.cached_tokens[first : first + self.per_prompt]) for first in prompts)

    def of_choice(self, index: int) -> Usage:
        """Request `index`'s usage so far, as vLLM's `continuous_usage_stats` puts it on each chunk of its choice:
        its prompt's tokens and its own completion tokens."""
        prompt, completion = self.prompt_tokens[index // self.per_prompt], self.completion_tokens[index]
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens[index]))  # fmt: skip


class ChoicesPolicy:
    """The content policy over the n choices of a call as they are generated (`complete` and `stream` alike): each
    choice's text goes through its ModeratedStream, and a choice the policy blocks is stopped there (billed for the
    tokens it had). Without categories it passes the text through. Where text is held back (by the policy, or while
    it may be the start of a stop string), the logprobs go out with their text (HeldLogprobs): only tokens whose
    whole text is shown, so a stop string's tokens never do."""

    def __init__(self, server: Server, body, group: RequestGroup, bill: Bill, categories: list[Category]):
        n = len(group.request_ids)
        self.safety, self.group, self.bill = server.safety, group, bill
        self.moderated = [ModeratedStream(categories) for _ in range(n)] if categories else None
        tokenizer = server.engine.tokenizer
        held_back = categories or body.stop
        self.held = [HeldLogprobs(tokenizer, body.skip_special_tokens) for _ in range(n)] if held_back else None
        self.shown = [0] * n  # characters of each choice's text shown
        self.blocked: set[int] = set()

    def read(self, index: int, output, entries: list | None) -> tuple[str, list | None, bool]:
        """What choice `index` shows of `output` (its text and its logprob `entries`), and whether it was blocked."""
        text, blocking, withheld = output.text, None, ()
        if self.moderated is not None:
            moderated = self.moderated[index]
            text, blocking = moderated.push(output.text, final=output.finished)
            self.safety.note(self.bill, moderated.hits)
            if blocking is not None:
                self.group.stop(index)
                self.blocked.add(index)
            self.shown[index], withheld = moderated.released, moderated.redacted_spans
        else:
            self.shown[index] += len(text)
        if entries is not None and self.held is not None:  # held back with their text
            self.held[index].add(entries, final=output.finished)
            entries = self.held[index].release(self.shown[index], withheld)
        return text, entries, blocking is not None


@contextmanager
def _rate_limit_errors() -> Iterator[None]:
    """The rate limiter's refusals as the API's errors: 429 with Retry-After and the key's `x-ratelimit-*` headers,
    400 for a request that never fits."""
    try:
        yield
    except NeverFits as error:
        raise APIError(400, str(error), param="max_tokens", code="tokens_over_rate_limit") from None
    except RateLimited as error:
        raise APIError(
            429, str(error), "rate_limit_error", code="rate_limit_exceeded",
            headers=error.headers(),
        ) from None  # fmt: skip


class ClientLeft(Exception):
    """The client hung up before its answer was ready."""


def _refused_while_generating(error: Exception, bill: Bill) -> APIError | None:
    """The 400 of an engine failure the request's own fields caused, a ConfigError naming the field (allowed_token_ids
    that a JSON grammar or bad_words forbid each of only after some tokens), marking `bill` free: its tokens so far are
    recorded at no cost, as a refusal's; None for any other failure (the server's 500)."""
    cause = error.__cause__ if isinstance(error, RequestFailure) else None
    if not isinstance(cause, ConfigError):
        return None
    bill.free = True
    return invalid_value(cause)


async def _unless_client_leaves(request: Request, work: Coroutine[Any, Any, JSONResponse]) -> JSONResponse:
    """Await `work`, or cancel it and raise `ClientLeft` as soon as the client disconnects."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: only a hang-up comes
            pass

    answer, hang_up = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({answer, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        left = not answer.done()
        if left:
            answer.cancel()
    if left:
        raise ClientLeft
    return answer.result()


def _answered_stop() -> JSONResponse:
    """The answer of a request the server cut off as it stopped (past --shutdown-timeout, or a second Ctrl-C) before
    its response began: 503 in OpenAI's shape, in place of uvicorn's plain-text 500, while the connection lasts. The
    cancellation is answered, so it ends here."""
    asyncio.current_task().uncancel()
    log.warning(CUT_OFF)
    message = "the server was stopped before this request finished; it is not charged"
    return APIError(SERVER_STOPPED, message, "server_error", code="server_stopped").response()


def _role_choice(index: int) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))


def create_app(
    engine: Engine,
    database: Database,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    policy: Policy | None = None,
    cors_origins: tuple[str, ...] = (),
    reasoning_parser: str | None = None,
    chat_page: bool = True,
    log_requests: bool = False,
    log_stats: bool = True,
) -> FastAPI:
    """The FastAPI application serving `engine`, with keys, ledger and prices in `database`; request bodies over
    `max_body_bytes` get 413; `policy` moderates prompts and generated text; web pages from `cors_origins` may
    call the API from a browser (with a key: CORS does not open the keyless mode to them); `reasoning_parser`
    ("deepseek_r1") splits chat replies into reasoning_content and content; `chat_page` serves the chat page at /;
    `log_requests` logs a line when each generation request is received and when it finishes, `log_stats` the engine's
    throughput every STATS_INTERVAL_S seconds (vLLM's --enable-log-requests and --disable-log-stats)."""
    server = Server(engine, database, model_name, max_body_bytes, policy, reasoning_parser, log_requests, log_stats)
    app = FastAPI(title="seekstack", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SentIds)  # inside CORS: a page reads its refusals too (an X-Request-Id it sent unlike an id)
    if cors_origins:
        # Any request header: OpenAI's JS client sends its own (x-stainless-*, openai-organization) on every call.
        # exposed: what OpenAI's JS client reads of an answer (x-should-retry: a budget's 429 is not sent again)
        exposed = ["Retry-After", REQUEST_ID, SHOULD_RETRY, *LIMIT_HEADERS]
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=exposed, max_age=600)  # fmt: skip
    app.add_middleware(RequestIds)  # every response's X-Request-Id (a preflight's too), a counted one's x-ratelimit-*
    app.state.server = server
    openapi_document = describe(app, [ChatCompletionRequest, CompletionRequest, ModerationRequest, *TOKENIZE_REQUESTS],
                                lambda: [card.id for card in server.models().data])  # fmt: skip

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
            if request.url.path in ABSENT_ROUTES:
                message += f": {ABSENT_ROUTES[request.url.path]}"
        elif error.status_code == 405:  # the route's methods, from its Allow header (kept on the answer)
            message = (
                f"method {request.method} is not allowed on {request.url.path}; it takes "
                f"{error.headers['Allow'].replace(', ', ' or ')}"
            )
        return APIError(error.status_code, message, headers=error.headers).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        return invalid_body(ValidationError.from_exception_data("parameters", error.errors())).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # answered outside the middleware (Starlette's ServerErrorMiddleware), so the request's id is set here
        answer = internal_error(error, f"answering {request.method} {request.url.path}").response()
        answer.headers[REQUEST_ID] = request_id_of(request)
        return answer

    health_answers: dict[str, Any] = {
        "response_model": Health,
        "responses": {503: {"model": Health, "description": "Engine stopped"}},
    }

    @app.get("/health", **health_answers)
    @app.head("/health", **health_answers)  # what uptime checks and load balancers probe with: an operation of its own
    @app.get("/ping", **health_answers)  # vLLM's other name for it (SageMaker's probe), GET and POST
    @app.post("/ping", **health_answers)
    async def health() -> JSONResponse:
        # Database reads, here and below, run off the event loop: one waiting for a database that another connection
        # holds (another server's write, `seekstack keys`) would stop every stream with it.
        healthy, auth = server.bridge.alive, await asyncio.to_thread(server.keys.any_keys)
        body = Health(status="ok" if healthy else "engine stopped", auth=auth)
        return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)

    @app.get("/version", response_model=ServerVersion)
    async def server_version() -> JSONResponse:
        """seekstack's version (vLLM's route, giving its own)."""
        return JSONResponse(ServerVersion(version=version("seekstack")).model_dump())

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        # Its `model` fields name the models served: where keys exist, a key is needed and sees those it may use,
        # as in /v1/models (a key learns nothing of the others).
        key = await asyncio.to_thread(server.authenticate, request)
        return JSONResponse(openapi_document([card.id for card in server.models(key).data]))

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {"description": "Prometheus text format"}})
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 403, 500))
    async def models(request: Request) -> JSONResponse:
        return JSONResponse(server.models(await asyncio.to_thread(server.authenticate, request)).model_dump())

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 403, 404, 500))
    async def model(model_id: str, request: Request) -> JSONResponse:
        return JSONResponse(server.model(model_id, await asyncio.to_thread(server.authenticate, request)).model_dump())

    generation_errors = (400, 401, 403, 404, 413, 415, 429, 500)

    @app.post(
        "/v1/chat/completions",
        openapi_extra=json_request(ChatCompletionRequest),
        responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk, *generation_errors),
    )
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, ChatCompletionRequest)

    @app.post(
        "/v1/completions",
        openapi_extra=json_request(CompletionRequest),
        responses=generation_responses(CompletionResponse, CompletionResponse, *generation_errors),
    )
    async def completions(request: Request) -> Response:
        return await server.generate(request, CompletionRequest)

    @app.post(
        "/v1/moderations",
        openapi_extra=json_request(ModerationRequest),
        response_model=ModerationResponse,
        responses=error_responses(400, 401, 403, 413, 415, 429, 500),
    )
    async def moderations(request: Request) -> JSONResponse:
        """Which of the server's content-policy categories each input falls in (none without a policy)."""
        key = await asyncio.to_thread(server.authenticate, request)
        await server.count(request, key)  # a request of the key's requests per minute, at no tokens
        raw = await read_body(request, server.max_body_bytes)
        body = await asyncio.to_thread(parse_body, ModerationRequest, raw)  # a 4 MB body: 70 ms of JSON
        answer = await asyncio.to_thread(server.safety.moderations, body, key)
        return JSONResponse(answer.model_dump())

    @app.get("/v1/admin/usage", response_model=UsageReport, responses=error_responses(400, 401, 403, 404, 500))
    async def admin_usage(
        request: Request,
        key: Annotated[str | None, Query(description="Only this key's usage (by name)")] = None,
        since: Annotated[
            str | None, Query(description="From this UTC day on, YYYY-MM-DD", json_schema_extra={"format": "date"})
        ] = None,
        model: Annotated[str | None, Query(description="Only this model's usage (the base or an adapter)")] = None,
        until: Annotated[
            str | None,
            Query(description="To this UTC day, itself included, YYYY-MM-DD", json_schema_extra={"format": "date"}),
        ] = None,
    ) -> JSONResponse:
        """Requests, tokens and cost per key, UTC day and model (admin keys only)."""
        report = await asyncio.to_thread(server.usage_report, request, key, since, model, until)
        return JSONResponse(report.model_dump())

    if chat_page:
        add_chat_page(app)  # GET /
    add_adapter_routes(app, server)  # POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    add_tokenize_routes(app, server)  # POST /tokenize, /detokenize
    return app
