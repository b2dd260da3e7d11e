"""The serving engine: requests in, streamed answers out, many at once over fixed decode slots.

One scheduler loop owns the device (JetStream's prefill / insert / generate over decode slots). Each
iteration of :meth:`Engine.step`:

1. frees the slots of cancelled requests (their client went away);
2. admits the oldest queued request when a slot is free and no other prompt is being prefilled: its
   image pieces go through the vision tower (the model's feature cache reused), its prompt is embedded;
3. prefills at most ``prefill_chunk`` prompt tokens: chunks of the prompt being prefilled, and when one
   is done and inserted into its slot, the next queued prompts while the budget lasts (16 short
   questions arriving together start within one iteration) — a long prompt (a 64-frame video) takes one
   chunk per iteration, interleaved with decoding instead of stalling the running slots for its whole
   prefill;
4. runs one decode step for all slots (:func:`minicpmv_jax.engine.slots.decode_step`: one compiled
   program whatever requests occupy the slots) and hands each running request its token, decoded
   incrementally (:class:`~minicpmv_jax.text_stream.AnswerStream`: the same text as ``chat``).

:meth:`Engine.start` runs that loop in a background thread; :meth:`Engine.submit` queues a request
(first come, first served; a full queue raises :class:`~minicpmv_jax.engine.request.QueueFull`) from any
thread. Without the thread, :meth:`Engine.run_until_idle` drives the same loop (tests, scripts).

Answers do not depend on company: a slot's row of every computation reads only that slot's cache, token
and parameters, and a slot samples with its own key (``fold_in(key(seed), i)`` for its i-th token, drawn
as a request alone draws it). Greedy answers are the tokens of ``model.chat`` with the same settings.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import pickle
import threading
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from minicpmv_jax import kv_cache, sharding
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generate import PREFILL_CHUNK, prepare_batch, sampling_params
from minicpmv_jax.host import fetch
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax.text_stream import AnswerStream

from . import slots as S
from .request import EngineError, EngineStopped, Output, QueueFull, Request, RequestHandle

__all__ = ["EngineConfig", "Engine", "EngineStats"]

log = logging.getLogger("minicpmv_jax.engine")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine is sized.

    Attributes:
      max_batch: decode slots (requests generating at once).
      max_len: cache slots per request: its prompt plus its answer must fit (longer is refused).
      prefill_chunk: prompt tokens prefilled per scheduler iteration (a power of two): several short
        prompts, or one chunk of a longer one, decode steps of the other slots in between (a prompt is
        cut into chunks when the attention kernel takes a causal offset: the blockwise and dense ones;
        else it is prefilled at once, alone in its iteration).
      max_queue: requests waiting for a slot; one more is refused with :class:`QueueFull`.
    """

    max_batch: int = 8
    max_len: int = 4096
    prefill_chunk: int = PREFILL_CHUNK
    max_queue: int = 64

    def __post_init__(self) -> None:
        for name, minimum in (("max_batch", 1), ("max_len", 16), ("prefill_chunk", 16), ("max_queue", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ArgumentError("{} must be an int ≥ {minimum}, got {value!r}", name, minimum=minimum, value=v)
        if self.prefill_chunk & (self.prefill_chunk - 1):
            raise ArgumentError("{} must be a power of two, got {value}", "prefill_chunk", value=self.prefill_chunk)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot: requests waiting, slots running (or being prefilled), tokens generated so far,
    decode steps run."""

    queued: int
    running: int
    generated_tokens: int
    steps: int


@dataclasses.dataclass
class _Running:
    """A request in a slot: its handle and answer stream."""

    handle: RequestHandle
    answer: AnswerStream
    last: float


@dataclasses.dataclass
class _Prefill:
    """A prompt being prefilled chunk by chunk into its staging cache, its slot reserved."""

    handle: RequestHandle
    slot: int
    x: jax.Array
    mask: jax.Array
    cache: KVCache
    length: int          # L, real prompt tokens
    chunk: int
    starts: list[int]
    logits: jax.Array | None = None


class Engine:
    """Continuous batching over ``config.max_batch`` decode slots of one model.

    Args:
      model: a loaded :class:`~minicpmv_jax.model.MiniCPMVModel` (on a mesh or not).
      processor: its :class:`~minicpmv_jax.processor.MiniCPMVProcessor` (the tokenizer decodes answers).
      config: sizes (:class:`EngineConfig`).
      rules: the sharding rules the programs are traced with (default: the current context's).
      observer: optional callbacks for metrics, any object with ``first_token(seconds)``,
        ``token(seconds)`` (time since the request's previous token) and ``finished(handle)``.
    """

    def __init__(self, model, processor, config: EngineConfig = EngineConfig(), *,
                 rules: sharding.Rules | None = None, observer: Any = None) -> None:
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        self.model = model
        self.processor = processor
        self.config = config
        self.observer = observer
        rules = sharding.current_context().rules if rules is None else rules
        self._context = sharding.ShardingContext(model.mesh, rules)
        self._graphdef, self._params = nnx.split(model)
        self._stop_ids = tuple(processor.tokenizer.stop_ids)
        self._slots = S.empty_slots(model, config.max_batch, config.max_len, rules)
        self._release = np.zeros(config.max_batch, bool)
        self._running: list[_Running | None] = [None] * config.max_batch
        self._prefill: _Prefill | None = None
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._generated = 0
        self._steps = 0
        # Several processes (one mesh over hosts): process 0 schedules; at each step it sends the others
        # what arrived (new requests, cancellations) and every process runs the same deterministic loop.
        self._multihost = jax.process_count() > 1
        self._leader = jax.process_index() == 0
        self._inbox: list[RequestHandle] = []      # submitted, not yet sent to the other processes
        self._keys = itertools.count()               # a number per submission (request ids may repeat)
        self._leader_stopped = False

    # ------------------------------------------------------------------ submitting

    def check(self, request: Request) -> None:
        """Raises ``ArgumentError`` (naming the field) for a request this engine can never run."""
        if not isinstance(request, Request):
            raise TypeError(f"request must be an engine Request, got {type(request).__name__}")
        config = request.config
        if config.strategy == "beam":
            raise ArgumentError("{} must be 1 in the engine (beam search runs in chat(); the engine samples or "
                                "decodes greedily)", "num_beams")
        ids = np.asarray(request.prompt["input_ids"])
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ArgumentError("{} must hold one prompt [1, L], got shape {shape}", "input_ids",
                                shape=tuple(ids.shape))
        length = request.prompt_tokens
        if length + config.max_new_tokens > self.config.max_len:
            raise ArgumentError("{} too long: the prompt has {length} tokens and max_new_tokens is {new}, "
                                "together more than the engine's max_len of {max_len}", "prompt",
                                length=length, new=config.max_new_tokens, max_len=self.config.max_len)

    def submit(self, request: Request, *, loop=None) -> RequestHandle:
        """Queues ``request``; returns its handle at once (iterate it for the answer).

        ``loop``: an asyncio event loop, to consume the handle with ``async for`` on it.

        Raises:
          ArgumentError: a request the engine can never run (:meth:`check`).
          QueueFull: ``config.max_queue`` requests are already waiting.
          EngineStopped: the engine is shutting down.
        """
        if not self._leader:
            raise RuntimeError("on several processes, requests are submitted on process 0; the others call "
                               "Engine.follow()")
        self.check(request)
        handle = RequestHandle(request, loop)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the engine is shutting down and accepts no new requests")
            if len(self._queue) + len(self._inbox) >= self.config.max_queue:
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting): try again later")
            handle.key = next(self._keys)
            (self._inbox if self._multihost else self._queue).append(handle)
            self._lock.notify_all()
        return handle

    def generate(self, request: Request):
        """Submits ``request`` and waits for its :class:`~minicpmv_jax.engine.request.Completion` (drives
        the loop itself when the engine has no thread)."""
        handle = self.submit(request)
        if self._thread is None:
            self.run_until_idle()
        return handle.result()

    # ------------------------------------------------------------------ state

    def stats(self) -> EngineStats:
        with self._lock:
            running = sum(r is not None for r in self._running) + (self._prefill is not None)
            return EngineStats(len(self._queue), running, self._generated, self._steps)

    @property
    def started(self) -> bool:
        """The scheduler runs in its background thread (:meth:`start`)."""
        return self._thread is not None

    def idle(self) -> bool:
        """No request queued, prefilling or running."""
        with self._lock:
            return not self._queue and not self._inbox and self._prefill is None \
                and all(r is None for r in self._running)

    # ------------------------------------------------------------------ the loop

    def run_until_idle(self) -> None:
        """Drives the scheduler until every submitted request has finished (no thread needed)."""
        while not self.idle():
            self.step()

    def step(self) -> None:
        """One scheduler iteration: cancellations, admissions and prefill chunks (``prefill_chunk`` prompt
        tokens at most), one decode step."""
        cancelled = self._sync()
        if self._leader_stopped:
            return
        self._cancel(cancelled)
        budget = self.config.prefill_chunk      # prompt tokens prefilled per iteration, at most
        while True:
            if self._prefill is None:
                self._admit()
            p = self._prefill
            if p is None or (p.chunk > budget and budget < self.config.prefill_chunk):
                break             # (a prompt prefilled at once may exceed the budget, alone)
            budget -= p.chunk
            self._prefill_chunk()
        if any(r is not None for r in self._running):
            self._decode()

    def _free_slot(self) -> int | None:
        reserved = None if self._prefill is None else self._prefill.slot
        for b, r in enumerate(self._running):
            if r is None and b != reserved:
                return b
        return None

    # ------------------------------------------------------------------ several processes

    def _sync(self, stop: bool = False) -> set[int]:
        """This iteration's inputs, the same on every process: the requests submitted since the last step
        join the queue, and the keys of the cancelled requests are returned. On several processes process 0
        sends them (``stop``: the engine stops) and the others receive them."""
        with self._lock:
            new, self._inbox = self._inbox, []
            live = list(self._queue) + new + [r.handle for r in self._running if r is not None]
            live += [] if self._prefill is None else [self._prefill.handle]
        cancelled = {h.key for h in live if h.cancelled}
        if self._multihost:
            sent = _broadcast((stop, [(h.key, h.request) for h in new], sorted(cancelled)) if self._leader else None)
            stop, requests, cancelled = sent[0], sent[1], set(sent[2])
            if not self._leader:
                new = [_Mirror(request, key) for key, request in requests]
            self._leader_stopped = stop
        with self._lock:
            self._queue.extend(new)
        return cancelled

    def follow(self) -> None:
        """On processes 1… of a multi-host mesh: runs the steps process 0's engine runs (the same programs
        in the same order), until process 0's engine stops. Process 0 takes the requests
        (:meth:`submit`, the server) and runs :meth:`start` or :meth:`run_until_idle` as usual."""
        if not self._multihost or self._leader:
            raise RuntimeError("Engine.follow() runs on processes 1… of a multi-host engine")
        while not self._leader_stopped:
            self.step()

    # ------------------------------------------------------------------ the loop's parts

    def _cancel(self, cancelled: set[int]) -> None:
        for b, r in enumerate(self._running):
            if r is not None and r.handle.key in cancelled:
                self._release[b] = True
                self._end(b, "cancelled")
        p = self._prefill
        if p is not None and p.handle.key in cancelled:
            self._prefill = None
            self._close(p.handle, "cancelled")
        with self._lock:
            gone = [h for h in self._queue if h.key in cancelled]
            for h in gone:
                self._queue.remove(h)
        for h in gone:
            self._close(h, "cancelled")

    def _admit(self) -> None:
        slot = self._free_slot()
        if slot is None:
            return
        with self._lock:
            if not self._queue:
                return
            handle = self._queue.popleft()
        try:
            self._prefill = self._start_prefill(handle, slot)
        except Exception as e:          # a request that cannot run must not stop the others
            self._fail(handle, e)

    def _start_prefill(self, handle: RequestHandle, slot: int) -> _Prefill:
        model = self.model
        prepared = prepare_batch(model, handle.request.prompt)   # image pieces through the feature cache
        t = prepared.ids.shape[1]
        x = S.embed_prompt(self._graphdef, self._params, prepared.ids, prepared.features, prepared.feature_index,
                           context=self._context)
        chunk = min(self.config.prefill_chunk, t)
        with sharding.use_mesh(self._context):
            kernel = model.llm.attention_kernel(chunk, cached=True)
        if kernel not in ("blockwise", "xla"):
            chunk = t                  # the platform kernels prefill from slot 0 only
        return _Prefill(handle=handle, slot=slot, x=x, mask=prepared.mask, cache=self._staging(t), length=handle.prompt_tokens, chunk=chunk,
                        starts=list(range(0, t, chunk)))

    def _staging(self, t: int) -> KVCache:
        cfg, dtype = self.model.config.llm, self.model.llm.dtype
        if self.model.mesh is not None:
            return kv_cache.sharded_zeros(cfg, 1, t, self.model.mesh, dtype, self._context.rules)
        return _zeros(cfg, t, dtype)

    def _fail(self, handle: RequestHandle, error: Exception) -> None:
        log.exception("request %s failed", handle.request_id, exc_info=error)
        self._close(handle, "error", error=EngineError(f"request {handle.request_id} failed: {error}"))

    def _prefill_chunk(self) -> None:
        """The next chunk of the prompt being prefilled; if it fails, only that request fails."""
        try:
            self._prefill_next()
        except Exception as e:
            p, self._prefill = self._prefill, None
            if p is not None:
                self._fail(p.handle, e)

    def _prefill_next(self) -> None:
        p = self._prefill
        start = p.starts.pop(0)
        p.cache, p.logits = S.prefill_chunk(self._graphdef, self._params, p.cache, p.x, p.mask,
                                            np.int32(start), chunk=p.chunk, context=self._context)
        if p.starts:
            return
        config = p.handle.request.config
        t = p.mask.shape[1]
        shift = int(np.clip(t + config.max_new_tokens - self.config.max_len, 0, t - p.length))
        stop_ids = np.full(S.MAX_STOP_IDS, -1, np.int32)
        stop_ids[:len(self._stop_ids)] = self._stop_ids[:S.MAX_STOP_IDS]
        key = np.asarray(jax.random.key_data(jax.random.key(config.seed)), np.uint32)
        params = jax.tree.map(np.asarray, sampling_params(config))
        self._slots = S.insert(self._slots, np.int32(p.slot), p.cache, p.mask, p.logits, np.int32(shift), params,
                               np.bool_(config.do_sample), stop_ids, np.int32(config.max_new_tokens), key,
                               context=self._context)
        self._release[p.slot] = False
        with self._lock:
            self._running[p.slot] = _Running(p.handle, AnswerStream(self.processor.tokenizer, self._stop_ids,
                                                                    p.handle.request.stop), time.perf_counter())
            self._prefill = None

    def _decode(self) -> None:
        release = self._release.copy()
        self._release[:] = False
        self._slots, out = S.decode_step(self._graphdef, self._params, self._slots, release, context=self._context)
        tokens, done = fetch(out.token), fetch(out.done)
        now = time.perf_counter()
        self._steps += 1
        for b, r in enumerate(self._running):
            if r is None:
                continue
            h = r.handle
            token = int(tokens[b])
            h.completion_tokens += 1
            self._generated += 1
            if self.observer is not None:
                if h.first_token_at is None:
                    self.observer.first_token(now - h.submitted)
                else:
                    self.observer.token(now - r.last)
            if h.first_token_at is None:
                h.first_token_at = now
            r.last = now
            finished = bool(done[b])
            text = r.answer.feed(token, last=finished)
            if r.answer.stopped and not finished:
                text += r.answer.finish()
                self._release[b] = True       # the device still thinks it runs: free it next step
                finished = True
            if finished:
                reason = "stop" if (token in self._stop_ids or r.answer.stopped) else "length"
                self._end(b, reason, text, (token,))
            else:
                h._emit(Output(text, (token,), None, h.prompt_tokens, h.completion_tokens))

    def _end(self, slot: int, reason: str, text: str = "", token_ids: tuple[int, ...] = (),
             error: BaseException | None = None) -> None:
        r = self._running[slot]
        with self._lock:
            self._running[slot] = None
            self._lock.notify_all()
        self._close(r.handle, reason, text, token_ids, error)

    def _close(self, handle: RequestHandle, reason: str, text: str = "", token_ids: tuple[int, ...] = (),
               error: BaseException | None = None) -> None:
        """Where every request ends (finished, cancelled, failed): its last piece, then the observer."""
        handle._finish(reason, text, token_ids, error)
        if self.observer is not None:
            self.observer.finished(handle)

    # ------------------------------------------------------------------ the thread

    def start(self) -> "Engine":
        """Runs the scheduler loop in a background thread (returns self)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._thread = threading.Thread(target=self._loop, name="minicpmv-engine", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue and not self._inbox and self._prefill is None \
                        and all(r is None for r in self._running):
                    self._lock.wait(timeout=0.5)
                    if self._multihost:
                        break             # an empty step: the other processes wait in it
                if self._stopping:
                    if self._multihost:
                        self._sync(stop=True)
                    return
            try:
                self.step()
            except Exception:                 # keep serving; the failed requests were told
                log.exception("engine step failed")
                self._fail_all("the engine step failed (see the server log)")

    def _fail_all(self, why: str) -> None:
        for b, r in enumerate(self._running):
            if r is not None:
                self._release[b] = True
                self._end(b, "error", error=EngineError(why))
        if self._prefill is not None:
            p, self._prefill = self._prefill, None
            self._close(p.handle, "error", error=EngineError(why))

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stops accepting requests, lets the ones in flight finish (at most ``timeout`` seconds; None: no
        limit), then cancels what is left and stops the thread. Returns whether everything finished."""
        with self._lock:
            self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle() and (deadline is None or time.monotonic() < deadline):
            if self._thread is None:
                self.step()
            else:
                time.sleep(0.01)
        drained = self.idle()
        if not drained:
            with self._lock:
                pending = list(self._queue) + [r.handle for r in self._running if r is not None]
                pending += [] if self._prefill is None else [self._prefill.handle]
            for h in pending:
                h.cancel()
            if self._thread is None:
                self.step()
            else:
                end = time.monotonic() + 10
                while not self.idle() and time.monotonic() < end:
                    time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif self._multihost:
            self._sync(stop=True)
        return drained

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Mirror(RequestHandle):
    """A request on processes 1…: run like process 0's, its answer read by nobody."""

    def __init__(self, request: Request, key: int) -> None:
        super().__init__(request)
        self.key = key

    def _emit(self, output) -> None:
        pass


#: Messages between processes are padded to a multiple of this many bytes (few compiled broadcasts).
_MESSAGE_BLOCK = 1 << 16


def _broadcast(message: Any) -> Any:
    """Process 0's ``message`` (any picklable value) on every process; the others pass None."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(message), np.uint8) if message is not None else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    buffer = np.zeros(-(-size // _MESSAGE_BLOCK) * _MESSAGE_BLOCK, np.uint8)
    buffer[:len(data)] = data
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size].tobytes())


@functools.partial(jax.jit, static_argnames=("cfg", "t", "dtype"))
def _zeros(cfg, t: int, dtype) -> KVCache:
    """A staging cache ``[1, t, K, H]`` per layer."""
    return KVCache.zeros(cfg, 1, t, dtype)
