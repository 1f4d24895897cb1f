"""The engine, driven from a background thread, seen by asyncio code as one queue per API request.

One thread calls `engine.step()` while any request is unfinished: every running request advances
in the same step (continuous batching), whichever HTTP connection it came from. Each step's
outputs go, through `call_soon_threadsafe`, to the queue of the API request they belong to; an
API request with n choices is n engine requests sharing one queue. New requests and aborts are handed
to the thread and applied before its next step, so neither the event loop nor a worker thread waits for a
step to end (a worker waiting on the engine's lock would hold up /health, keys and JSON parsing behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from seekstack.infer.engine import Engine
from seekstack.infer.outputs import RequestOutput
from seekstack.infer.params import SamplingParams
from seekstack.infer.sampling import TokenConstraint
from seekstack.serve.metrics import ServerMetrics

log = logging.getLogger("seekstack.serve")
IDLE_WAIT_S = 0.5
ABORT_REPORT_S = 30.0  # the longest a closing request waits to learn whether the engine had started it
ENGINE_END_POLL_S = 0.05  # how often a stopping server looks whether the engine thread has ended


class EngineFailure(RuntimeError):
    """The engine failed this request: its step raised (and every request in flight was ended), or its own sampling
    raised (`RequestFailure`)."""


class RequestFailure(EngineFailure):
    """The engine ended this request alone, its own sampling having raised (the cause), the others going on."""


@dataclass
class _Call:
    """One API call, for the metrics counted per request as vLLM counts them (its n choices count once)."""

    arrival: float  # perf_counter seconds
    running: int  # choices not finished or aborted yet
    scheduled_at: float | None = None  # when the engine first ran one of its choices (its queue time recorded)
    first_token: float | None = None  # when its first token came (its time to first token recorded)
    last_token: float | None = None  # when its latest token came
    prompts_counted: set[int] = field(default_factory=set)  # of its prompts, those whose tokens were counted
    prompt_tokens: int = 0  # of the prompts counted
    generated: int = 0  # tokens, all its choices together


@dataclass
class _Timing:
    """Per engine request (one choice): its call, which of the call's prompts it continues, its last token's time."""

    call: _Call
    prompt: int
    prompt_tokens: int
    last_token: float | None = None


@dataclass
class Closed:
    """What closing a request group found: choices the engine had not started, and outputs delivered but unread."""

    unstarted: set[int] = field(default_factory=set)  # choice indices
    unread: list[tuple[int, RequestOutput]] = field(default_factory=list)  # (choice index, output), in order


@dataclass
class RequestGroup:
    """The engine requests of one API call (one per choice) and the queue their outputs arrive on."""

    bridge: AsyncEngine
    request_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    unfinished: set[int] = field(init=False)  # choice indices

    def __post_init__(self) -> None:
        self.unfinished = set(range(len(self.request_ids)))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) as the engine produces them, until every choice has finished."""
        while self.unfinished:
            index, output = await self.queue.get()
            if isinstance(output, BaseException):
                raise EngineFailure(f"the engine step failed: {output}") from output
            if output.error is not None:
                raise RequestFailure(f"the engine failed this request alone: {output.error}") from output.cause
            if output.finished:
                self.unfinished.discard(index)
            yield index, output

    async def close(self) -> Closed:
        """Abort the choices still running (a client that left): their cache blocks are freed before the next step.
        Returns the choices the engine had not started (still queued: their prompts were never computed) and the
        outputs the aborted choices had delivered that nobody read (their tokens were generated all the same)."""
        running, self.unfinished = sorted(self.unfinished), set()
        if not running:
            return Closed()
        report = asyncio.get_running_loop().create_future()
        self.bridge.abort([self.request_ids[index] for index in running], report)
        try:
            started = await asyncio.wait_for(report, ABORT_REPORT_S)
        except TimeoutError:  # the engine thread is gone or stuck: count them as started
            return Closed(unread=self._unread())
        unstarted = {index for index, began in zip(running, started, strict=True) if not began}
        return Closed(unstarted, self._unread())

    def _unread(self) -> list[tuple[int, RequestOutput]]:
        """The outputs waiting in the queue. Once the engine thread has reported an abort, every output it routed
        before is here: its deliveries and its report reach the event loop in the order it made them."""
        waiting = []
        while not self.queue.empty():
            index, output = self.queue.get_nowait()
            if not isinstance(output, BaseException) and output.error is None:
                waiting.append((index, output))
        return waiting

    def stop(self, index: int) -> None:
        """Abort one choice (the content policy ended it); the others go on."""
        if index in self.unfinished:
            self.bridge.abort([self.request_ids[index]])
            self.unfinished.discard(index)


class AsyncEngine:
    """Runs an `Engine` in a background thread for asyncio callers."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int, _Timing]] = {}
        # (request ids, report, the timing of each still routed, when asked): aborts the engine thread applies before
        # its next step
        self._pending_aborts: list[tuple[list[str], asyncio.Future | None, dict[str, _Timing], float]] = []
        # (its caller's future, its group, the add): new requests the engine thread adds before its next step
        self._pending_adds: list[tuple[asyncio.Future, RequestGroup, Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Step the engine on a thread of its own from now on. Its compiled decode steps skip dynamo's guard check
        where the engine knows its answer: this thread is the only one in a server's process that calls compiled
        code (the handlers parse, tokenize and render; adapter loads wait for the step lock and compile nothing)."""
        self._thread = threading.Thread(target=self._run, name="seekstack-engine", daemon=True)
        self.engine.guard_skip_thread = self._thread
        self._thread.start()

    def stop(self) -> None:
        """End the engine thread; the engine's steps on the main thread skip the guard check again (its default)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._stopped()

    async def stop_async(self) -> None:
        """`stop`, the event loop going on while the engine thread ends its step in progress (a compile's may take
        minutes): a signal's handler, such as a second Ctrl-C, can act meanwhile."""
        self._stopping = True
        self._wake.set()
        while self._thread is not None and self._thread.is_alive():
            await asyncio.sleep(ENGINE_END_POLL_S)
        self._stopped()

    def _stopped(self) -> None:
        """What follows the engine thread's end: the main thread's steps skip the guard check again (the default), and
        the aborts that came after its last step are applied, their reports included."""
        if self._thread is not None:
            self.engine.guard_skip_thread = threading.main_thread()
        self._apply_aborts()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(
        self,
        prompts: list[list[int]],
        choices: list[SamplingParams],
        adapter: str | None = None,
        constraints: list[TokenConstraint] | None = None,
    ) -> RequestGroup:
        """Add one engine request per choice (prompts[i] with choices[i], constrained by constraints[i] if given),
        on the base or the LoRA adapter named `adapter`; a ValueError (prompt too long, bad parameter) adds none.

        `add_request` waits for the engine's lock, which a step holds throughout: the engine thread adds them before
        its next step. A caller cancelled meanwhile (a stopping server) gets none added, or its group closed."""
        group = RequestGroup(self, [f"req-{uuid.uuid4().hex}" for _ in choices])
        arrival, loop = time.perf_counter(), asyncio.get_running_loop()
        added = loop.create_future()
        add = functools.partial(self._add, group, loop, arrival, prompts, choices, adapter, constraints)
        with self._lock:
            self._pending_adds.append((added, group, add))
        self._wake.set()
        await added
        return group

    def _add(
        self,
        group: RequestGroup,
        loop: asyncio.AbstractEventLoop,
        arrival: float,
        prompts: list[list[int]],
        choices: list[SamplingParams],
        adapter: str | None,
        constraints: list[TokenConstraint] | None,
    ) -> None:
        added: list[str] = []
        call = _Call(arrival, running=len(group.request_ids))
        prompt_numbers: dict[int, int] = {}  # the n choices of a prompt share its list (app.py): one prompt
        try:
            for index, (request_id, prompt_ids, params) in enumerate(
                zip(group.request_ids, prompts, choices, strict=True)
            ):
                prompt = prompt_numbers.setdefault(id(prompt_ids), len(prompt_numbers))
                timing = _Timing(call, prompt, prompt_tokens=len(prompt_ids))
                with self._lock:  # routed before added, so no output can arrive unrouted
                    self._routes[request_id] = (loop, group.queue, index, timing)
                constraint = constraints[index] if constraints else None
                self.engine.add_request(prompt_ids, params, request_id, adapter, constraint)
                added.append(request_id)
        except BaseException:
            self.abort(added)
            with self._lock:
                for request_id in group.request_ids:
                    self._routes.pop(request_id, None)
            raise

    def abort(self, request_ids: list[str], report: asyncio.Future | None = None) -> None:
        """Stop routing these requests now; the engine thread aborts them before its next step and sets `report` (a
        future of the caller's loop) to whether each had started (`Engine.abort`; one finished already had). The
        engine thread counts each call ended then, once it knows whether the aborted choices' prompts were computed."""
        routed = {}
        with self._lock:
            for request_id in request_ids:
                route = self._routes.pop(request_id, None)
                if route is not None:
                    routed[request_id] = route[3]
            self._pending_aborts.append((request_ids, report, routed, time.perf_counter()))
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self._step()
            except Exception as error:  # the server must outlive a failing step: end what was in flight
                log.exception("engine step failed")
                self._fail_all(error)

    def _step(self) -> None:
        """Add and abort what was asked since the last step, then run one step and hand out its outputs (or wait,
        with nothing to run). Whatever of it raises ends the requests in flight (`_run`), not the engine thread, which
        every later request waits on."""
        self._apply_adds()
        self._apply_aborts()
        if not self.engine.has_unfinished():
            self._wake.wait(IDLE_WAIT_S)
            return
        generated = self._deliver(self.engine.step(), time.perf_counter())
        stats = self.engine.stats()
        self.metrics.engine_state(stats)
        self.metrics.adapters_state(self.engine.lora.max_loras, stats.running_adapters, stats.waiting_adapters)
        self.metrics.step_tokens(generated, stats.prefill_tokens)

    def _apply_adds(self) -> None:
        """Add the requests submitted since the last step, telling each caller how it went."""
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
        for added, group, add in adds:
            if added.cancelled():  # its caller is gone: nobody would read or close the requests
                continue
            try:
                add()
                error = None
            except Exception as raised:
                error = raised
            with contextlib.suppress(RuntimeError):  # its loop closed meanwhile (a server shutting down)
                added.get_loop().call_soon_threadsafe(self._answer_add, added, group, error)

    def _answer_add(self, added: asyncio.Future, group: RequestGroup, error: Exception | None) -> None:
        """On the caller's loop: settle its future, or close the group of a caller cancelled since its requests were
        added."""
        if added.cancelled():
            if error is None:
                self.abort(group.request_ids)
        elif error is not None:
            added.set_exception(error)
        else:
            added.set_result(None)

    def _apply_aborts(self) -> None:
        with self._lock:
            aborts, self._pending_aborts = self._pending_aborts, []
        for request_ids, report, routed, asked_at in aborts:
            started = [began is not False for began in self.engine.abort(request_ids)]  # None: it finished
            for request_id, began in zip(request_ids, started, strict=True):
                if request_id not in routed:
                    continue
                if began:  # its prompt computed, maybe in a step whose output it never got
                    self._count_prompt(routed[request_id])
                self._choice_ended(routed[request_id].call, "abort", asked_at)
            if report is not None:
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile (a server shutting down)
                    report.get_loop().call_soon_threadsafe(_settle, report, started)

    def _deliver(self, outputs: list[RequestOutput], now: float) -> int:
        """Route each output to its request's queue; returns the tokens the step generated. A request whose caller's
        loop has closed (nobody left to read it) is aborted."""
        generated, unread = 0, []
        with self._lock:
            for output in outputs:
                generated += len(output.token_ids)
                route = self._routes.get(output.request_id)
                if route is None:  # aborted meanwhile
                    continue
                self._observe(output, route[3], now)
                delivered = _send(route, output)
                if output.finished or not delivered:
                    del self._routes[output.request_id]
                if not (output.finished or delivered):
                    unread.append(output.request_id)
                    self._choice_ended(route[3].call, "abort", now)
        for request_id in unread:
            self.engine.abort(request_id)
        return generated

    def _observe(self, output: RequestOutput, timing: _Timing, now: float) -> None:
        metrics, call = self.metrics, timing.call
        if output.scheduled_at is not None and call.scheduled_at is None:
            call.scheduled_at = max(call.arrival, output.scheduled_at)
            metrics.queue_time.observe(call.scheduled_at - call.arrival)
        if output.token_ids:
            if timing.last_token is None:
                self._count_prompt(timing)
                metrics.prefix_cache_queries.inc(timing.prompt_tokens)  # each choice's lookup, as vLLM counts them
                metrics.prefix_cache_hits.inc(output.cached_tokens)
                if call.first_token is None:
                    call.first_token = now
                    metrics.time_to_first_token.observe(now - call.arrival)
            else:
                for _ in output.token_ids:  # several tokens in one step (speculative): share the gap
                    metrics.inter_token_latency.observe((now - timing.last_token) / len(output.token_ids))
            timing.last_token = call.last_token = now
            call.generated += len(output.token_ids)
            metrics.generation_tokens.inc(len(output.token_ids))
        if output.finished:
            self._choice_ended(call, output.finish_reason or "stop", now)

    def _count_prompt(self, timing: _Timing) -> None:
        """Count the prompt of `timing`'s choice as computed: once per prompt of a call, whatever its n, as the ledger
        bills it (a prompt none of whose choices the engine started is in neither)."""
        if timing.prompt not in timing.call.prompts_counted:
            timing.call.prompts_counted.add(timing.prompt)
            timing.call.prompt_tokens += timing.prompt_tokens
            self.metrics.prompt_tokens.inc(timing.prompt_tokens)

    def _choice_ended(self, call: _Call, reason: str, now: float) -> None:
        """Count the call as finished (with the reason of its last choice) once none of its choices runs."""
        call.running -= 1
        if call.running == 0:
            self.metrics.e2e_latency.observe(now - call.arrival)
            self.metrics.request_finished(reason, call.prompt_tokens, call.generated)
            if call.first_token is not None:  # its phases, as vLLM's: admitted, first token, last token
                self.metrics.request_phases(call.scheduled_at, call.first_token, call.last_token)

    def _fail_all(self, error: Exception) -> None:
        """End every request in flight with the failed step's `error`, each call counted as finished by an error."""
        with self._lock:
            routes, self._routes = self._routes, {}
            now = time.perf_counter()
            for *_, timing in routes.values():
                self._choice_ended(timing.call, "error", now)
        for request_id, route in routes.items():
            self.engine.abort(request_id)
            _send(route, error)


def _send(route: tuple[asyncio.AbstractEventLoop, asyncio.Queue, int, _Timing], item) -> bool:
    """Put (choice index, `item`) on a route's queue, from the engine thread; False where the caller's loop has closed
    (a server shutting down, a test's asyncio.run ended): the engine thread outlives it."""
    loop, queue, index, _ = route
    try:
        loop.call_soon_threadsafe(queue.put_nowait, (index, item))
    except RuntimeError:  # "Event loop is closed"
        return False
    return True


def _settle(report: asyncio.Future, result: list[bool]) -> None:
    if not report.done():  # its waiter may have given up (cancelled)
        report.set_result(result)
