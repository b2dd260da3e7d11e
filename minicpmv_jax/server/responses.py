"""The response objects of OpenAI's API, as this server fills them.

Whole answers: ``chat.completion`` (``choices[i].message``) and ``text_completion`` (``choices[i].text``).
Streamed answers are server-sent events, ``data: <json>\\n\\n`` each, ending ``data: [DONE]\\n\\n``:
``chat.completion.chunk`` (the first per choice with ``delta.role = "assistant"``, then ``delta.content``
pieces, then an empty delta with its ``finish_reason``) or ``text_completion`` chunks (``text`` pieces,
then the ``finish_reason``). With ``stream_options.include_usage``, every chunk carries ``"usage": null``
and a last chunk with no choices carries the usage.

``finish_reason`` is ``"stop"`` (a stop token or stop string) or ``"length"`` (``max_tokens``);
``usage`` counts each prompt once (whatever ``n``) and every choice's generated tokens, the final stop
token included.
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["Choice", "usage", "chat_completion", "chat_chunk", "text_completion", "text_chunk", "usage_chunk",
           "sse", "SSE_DONE"]

SSE_DONE = b"data: [DONE]\n\n"

#: A choice's answer: (index, text, finish_reason).
Choice = tuple[int, str, str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(obj: str, response_id: str, model: str, created: int | None) -> dict[str, Any]:
    return {"id": response_id, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model}


def chat_completion(response_id: str, model: str, choices: list[Choice], use: dict[str, int]) -> dict[str, Any]:
    """A whole chat answer (``object: "chat.completion"``)."""
    return {**_head("chat.completion", response_id, model, None), "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": reason} for i, text, reason in choices],
            "usage": use}


def chat_chunk(response_id: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
    """One streamed piece of choice ``index`` (``object: "chat.completion.chunk"``)."""
    out = {**_head("chat.completion.chunk", response_id, model, created), "system_fingerprint": None,
           "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        out["usage"] = None
    return out


def text_completion(response_id: str, model: str, choices: list[Choice], use: dict[str, int]) -> dict[str, Any]:
    """A whole completion (``object: "text_completion"``)."""
    return {**_head("text_completion", response_id, model, None), "system_fingerprint": None,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, text, reason in choices],
            "usage": use}


def text_chunk(response_id: str, model: str, created: int, index: int, text: str,
               finish_reason: str | None = None, with_usage: bool = False) -> dict[str, Any]:
    """One streamed piece of completion ``index``."""
    out = {**_head("text_completion", response_id, model, created), "system_fingerprint": None,
           "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if with_usage:
        out["usage"] = None
    return out


def usage_chunk(obj: str, response_id: str, model: str, created: int, use: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``include_usage``: no choices, the usage."""
    return {**_head(obj, response_id, model, created), "system_fingerprint": None, "choices": [], "usage": use}


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
