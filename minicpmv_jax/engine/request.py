"""What goes into the serving engine and what comes back out.

A :class:`Request` is one prompt as the processor encodes it (``input_ids [1, L]`` and its image pieces),
a :class:`~minicpmv_jax.generation_config.GenerationConfig` (greedy or sampling) and optional stop
strings. :func:`request_from_messages` builds one from a conversation exactly as ``chat`` builds its
prompt. :meth:`Engine.submit <minicpmv_jax.engine.engine.Engine.submit>` returns a :class:`RequestHandle`,
which yields :class:`Output` pieces as tokens arrive (blocking iteration, or ``async for`` when the
handle was created for an event loop), and can be cancelled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from typing import Any, Mapping, Sequence

from minicpmv_jax.conversation import conversation_prompt, nothing_asked
from minicpmv_jax.generation_config import GenerationConfig

__all__ = ["Request", "Output", "Completion", "RequestHandle", "EngineError", "QueueFull", "EngineStopped",
           "request_from_messages", "FINISH_REASONS"]

#: Why a request ended: a stop id or stop string ("stop"), its token budget or the cache ("length"), its
#: client went away ("cancelled"), or the engine could not run it ("error").
FINISH_REASONS = ("stop", "length", "cancelled", "error")

_ids = itertools.count()


class EngineError(RuntimeError):
    """The engine could not run a request (its message says why)."""


class QueueFull(EngineError):
    """The admission queue is full: try again later (HTTP 429/503)."""


class EngineStopped(EngineError):
    """The engine is shutting down and accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt to answer.

    Attributes:
      prompt: the processor's output for ONE prompt (``input_ids`` / ``attention_mask`` ``[1, L]``,
        ``image_bound``, ``pixel_values``, …): :func:`request_from_messages`, or
        ``processor(text, [images])`` for a raw text prompt.
      config: greedy (``do_sample=False, num_beams=1``) or sampling; ``seed`` makes sampling reproducible.
      stop: strings that end the answer (cut before them).
      request_id: a name for logs and metrics (default: ``req-<n>``).
    """

    prompt: Mapping[str, Any]
    config: GenerationConfig
    stop: tuple[str, ...] = ()
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")

    @property
    def prompt_tokens(self) -> int:
        """L, the prompt's length in tokens (image placeholders included)."""
        return int(self.prompt["attention_mask"][0].sum())


def request_from_messages(processor, msgs: Sequence[Mapping[str, Any]], config: GenerationConfig, *,
                          image: Any = None, system_prompt: str = "", max_slice_nums: int | None = None,
                          use_image_id: bool | None = None, max_inp_length: int | None = None,
                          stop: Sequence[str] = (), request_id: str | None = None) -> Request:
    """A conversation (``chat``'s ``msgs``: text and PIL images) → a :class:`Request`, its prompt built as
    :meth:`MiniCPMV.chat <minicpmv_jax.chat.MiniCPMV.chat>` builds it (same arguments, same meaning)."""
    text, images = conversation_prompt(msgs, image, processor.tokenizer, system_prompt)
    if nothing_asked(msgs, image):
        raise ValueError("the last message is an empty user message (no text, no image): nothing to answer")
    prompt = processor([text], [images], max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                       max_length=max_inp_length)
    extra = {} if request_id is None else {"request_id": request_id}
    return Request(prompt=prompt, config=config, stop=tuple(stop), **extra)


@dataclasses.dataclass(frozen=True)
class Output:
    """A piece of an answer: new ``text`` and ``token_ids``; ``finish_reason`` (one of
    :data:`FINISH_REASONS`) on the request's last piece, else None; running token counts."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole answer (:meth:`RequestHandle.result`): ``text`` equals ``chat``'s answer for the same
    settings; ``token_ids`` are the generated ids (the final stop id included); times in seconds."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None
    duration: float


class RequestHandle:
    """A submitted request: iterate it (or ``async for`` it, if made for an event loop) for its
    :class:`Output` pieces; :meth:`cancel` frees its slot at the engine's next step."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.key = -1          # the engine's number for this submission (set by Engine.submit)
        self.prompt_tokens = request.prompt_tokens
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()
        self._result: Completion | None = None
        self._loop = loop
        self._events: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop is not None \
            else queue.SimpleQueue()

    # ------------------------------------------------------------------ the engine's side

    def _emit(self, output: Output | BaseException) -> None:
        if self._loop is None:
            self._events.put(output)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, output)
        except RuntimeError:      # the loop is closed: nobody is listening any more
            self._cancelled.set()

    def _finish(self, reason: str, text: str = "", token_ids: tuple[int, ...] = (),
                error: BaseException | None = None) -> None:
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self.error = error
        self._emit(Output(text, token_ids, reason, self.prompt_tokens, self.completion_tokens))
        if error is not None:
            self._emit(error)

    # ------------------------------------------------------------------ the client's side

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Stop generating: the slot is freed at the engine's next step (a no-op once finished)."""
        self._cancelled.set()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this handle was made for an event loop: use `async for`")
        while True:
            out = self._events.get()
            if isinstance(out, BaseException):
                raise out
            yield out
            if out.finish_reason is not None and out.finish_reason != "error":
                return

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this handle was made without an event loop: iterate it with `for`")
        while True:
            out = await self._events.get()
            if isinstance(out, BaseException):
                raise out
            yield out
            if out.finish_reason is not None and out.finish_reason != "error":
                return

    def result(self) -> Completion:
        """Waits for the whole answer (iterating the handle: call it instead of iterating, not after); a
        second call returns the same completion."""
        if self._result is None:
            text, ids, reason = [], [], None
            for out in self:
                text.append(out.text)
                ids.extend(out.token_ids)
                reason = out.finish_reason
            self._result = self._completion("".join(text), tuple(ids), reason)
        return self._result

    def _completion(self, text: str, ids: tuple[int, ...], reason: str) -> Completion:
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        return Completion(self.request_id, text, ids, reason, self.prompt_tokens, self.completion_tokens, ttft,
                          (self.finished_at or time.perf_counter()) - self.submitted)
