"""OpenAI's request bodies → engine requests.

``POST /v1/chat/completions`` and ``POST /v1/completions`` bodies are validated by the pydantic models
:class:`ChatCompletionRequest` and :class:`CompletionRequest` (strict types: ``"5"`` is not a number, and
``true`` not an int), then turned into one :class:`~minicpmv_jax.engine.Request` per choice
(:func:`chat_requests`, :func:`completion_requests`). Everything a request can get wrong is a 400
:class:`~minicpmv_jax.server.errors.APIError` naming the field (``messages[0].content[2].type``).

The sampling parameters, OpenAI's meaning kept:

* ``temperature`` (default 1.0) with ``top_p`` (default 1.0) samples; ``temperature`` 0 decodes greedily;
* ``max_tokens`` / ``max_completion_tokens`` (≥ 1; default: what fits, at most 2048) with the prompt must
  fit the engine's ``max_len``;
* ``n`` choices: with ``seed`` s, choice i samples with seed s + i (mod 2³²), so a seeded request is
  reproducible; without, each choice draws a random seed;
* ``stop``: a string or a list of strings; the answer is cut before the first one;
* ``frequency_penalty`` / ``presence_penalty``: not supported, refused unless 0; ``logprobs``, tools,
  ``response_format`` other than text, ``echo``, ``suffix``, ``best_of`` > n, ``logit_bias`` likewise.

Extensions in the body (``extra_body`` of OpenAI's client), as vLLM names them: ``repetition_penalty``
(default 1.0: off), ``top_k`` (default 0: off; -1 also means off), ``min_tokens``, and for chat
``max_slice_nums`` and ``use_image_id`` (default: the checkpoint's processor configuration, or the video
recipe's when the request holds a video).

Messages: roles ``system`` (and ``developer``, its newer name), ``user`` and ``assistant``; system
messages, wherever they are, are joined into the system prompt; content is a string or a list of parts
``text``, ``image_url`` and ``video_url`` (:mod:`minicpmv_jax.server.media`). Parsing decodes images:
call the converters from a worker thread.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from minicpmv_jax.engine import Request, request_from_messages
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from minicpmv_jax.video import VIDEO_OPTIONS

from .errors import APIError, bad_request, from_validation_error
from .limits import Limits
from .media import load_image_url, load_video_url

__all__ = ["ChatCompletionRequest", "CompletionRequest", "chat_requests", "completion_requests", "parse",
           "prompt_tokens", "bad_setting"]

#: The engine's (and GenerationConfig's) names of settings → the API's.
_API_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
_INT64 = dict(ge=-2 ** 63, le=2 ** 63 - 1)


class _Body(BaseModel):
    # Fields OpenAI's clients may send that change nothing here (user, metadata, store, …) are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """The fields both endpoints share."""

    #: Fields this server cannot honour: refused unless absent, 0 or empty.
    refused: ClassVar[tuple[str, ...]] = ("frequency_penalty", "presence_penalty", "logit_bias")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, **_INT64)
    stop: list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    # extensions (vLLM's names)
    repetition_penalty: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[dict[str, Any]]

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, v: Any) -> Any:
        return [{"type": "text", "text": v}] if isinstance(v, str) else v


class ChatCompletionRequest(_Sampling):
    """The body of ``POST /v1/chat/completions``."""

    refused: ClassVar[tuple[str, ...]] = _Sampling.refused + ("logprobs", "top_logprobs", "tools", "functions")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_slice_nums: int | None = Field(None, ge=1)
    use_image_id: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """The body of ``POST /v1/completions`` (text prompts; token-id prompts are not supported)."""

    refused: ClassVar[tuple[str, ...]] = _Sampling.refused + ("logprobs", "echo", "suffix")

    prompt: list[str] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class _TextPart(_Body):
    type: Literal["text"]
    text: str


class _URL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class _ImagePart(_Body):
    type: Literal["image_url"]
    image_url: _URL


class _VideoPart(_Body):
    type: Literal["video_url"]
    video_url: _URL


_PARTS = {"text": _TextPart, "image_url": _ImagePart, "video_url": _VideoPart}


def parse(model: type[BaseModel], body: Any, prefix: str = "") -> Any:
    """``body`` (parsed JSON) validated as ``model``; a 400 naming the first bad field otherwise."""
    if not isinstance(body, dict) and not prefix:
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e, prefix) from None


# ---------------------------------------------------------------------------------------- generation


def _refuse_unsupported(body: _Sampling) -> None:
    for name in body.refused:
        if getattr(body, name):
            hint = "; use the repetition_penalty extension instead" if name.endswith("_penalty") else ""
            raise bad_request(f"{name} is not supported by this server (only absent, 0 or empty{hint})", name,
                              "unsupported_parameter")
    if isinstance(body, CompletionRequest) and (body.best_of or body.n) > body.n:
        raise bad_request("best_of > n is not supported by this server", "best_of", "unsupported_parameter")
    if isinstance(body, ChatCompletionRequest) and (body.response_format or {}).get("type", "text") != "text":
        raise bad_request("response_format other than text is not supported by this server", "response_format",
                          "unsupported_parameter")
    for k, s in enumerate(body.stop or ()):
        if not s:
            raise bad_request(f"stop[{k}] is empty: a stop string needs at least one character", f"stop[{k}]")


def _max_tokens(body: _Sampling, prompt_tokens: int, max_len: int, prompt_field: str) -> int:
    room = max_len - prompt_tokens
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if room < 1:
        raise bad_request(f"the prompt has {prompt_tokens} tokens: no room left for an answer in this server's "
                          f"context of {max_len} tokens (--max-len)", prompt_field, "context_length_exceeded")
    if asked is None:
        return min(DEFAULT_MAX_NEW_TOKENS, room)
    if asked > room:
        raise bad_request(f"the prompt ({prompt_tokens} tokens) plus {name} ({asked}) is more than this server's "
                          f"context of {max_len} tokens (--max-len): at most {room} new tokens fit", name,
                          "context_length_exceeded")
    return asked


def _configs(body: _Sampling, max_new_tokens: int) -> list[GenerationConfig]:
    """One generation config per choice."""
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=body.min_tokens,
                  repetition_penalty=body.repetition_penalty)
    try:
        if body.temperature == 0:
            return [GenerationConfig(do_sample=False, **common)] * body.n
        seeds = [body.seed + i if body.seed is not None else secrets.randbits(32) for i in range(body.n)]
        return [GenerationConfig(do_sample=True, temperature=1.0 if body.temperature is None else body.temperature,
                                 top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k, 0),
                                 seed=s % 2 ** 32, **common) for s in seeds]
    except ArgumentError as e:
        raise bad_setting(e) from None


def bad_setting(e: ArgumentError) -> APIError:
    """A 400 for a library setting error (GenerationConfig, the processor, the engine), worded with the
    API's field names (``max_new_tokens`` → ``max_tokens``)."""
    param = _API_NAMES.get(e.settings[0], e.settings[0]) if e.settings else None
    return bad_request(e.worded(lambda s: _API_NAMES.get(s, s)), param)


def _choices(first: Request, body: _Sampling, max_len: int, request_id: str, prompt_field: str) -> list[Request]:
    configs = _configs(body, _max_tokens(body, first.prompt_tokens, max_len, prompt_field))
    return [dataclasses.replace(first, config=c, stop=tuple(body.stop or ()), request_id=f"{request_id}-{i}")
            for i, c in enumerate(configs)]


# ---------------------------------------------------------------------------------------- chat


def chat_requests(body: ChatCompletionRequest, processor, *, max_len: int, limits: Limits,
                  local_root: str | None, request_id: str) -> list[Request]:
    """A chat body → its ``n`` engine requests (media decoded, prompt built as ``chat`` builds it)."""
    _refuse_unsupported(body)
    parts = [[_part(part, f"messages[{i}].content[{j}]") for j, part in enumerate(m.content)]
             for i, m in enumerate(body.messages)]
    images = sum(isinstance(p, _ImagePart) for message in parts for p in message)
    if images > limits.max_images:
        raise bad_request(f"too many images: the request has {images}, this server takes at most "
                          f"{limits.max_images} (--max-images)", "messages", "too_many_images")
    system, msgs, frames, video = [], [], 0, False
    for i, (message, message_parts) in enumerate(zip(body.messages, parts)):
        content: list[Any] = []
        for j, part in enumerate(message_parts):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, _TextPart):
                content.append(part.text)
            elif message.role in ("system", "developer"):
                raise bad_request(f"{where}: a {message.role} message holds text only", f"{where}.type")
            elif isinstance(part, _ImagePart):
                content.append(load_image_url(part.image_url.url, f"{where}.image_url.url", limits, local_root))
            else:
                if frames >= limits.max_video_frames:
                    raise _too_many_frames(limits, where)
                clip = load_video_url(part.video_url.url, f"{where}.video_url.url", limits, local_root,
                                      limits.max_video_frames)
                frames += len(clip)
                if frames > limits.max_video_frames:
                    raise _too_many_frames(limits, where)
                content += clip
                video = True
        if message.role in ("system", "developer"):
            system.append("\n".join(content))
        else:
            msgs.append({"role": message.role, "content": content})
    if not msgs:
        raise bad_request("messages: no user message (only system messages)", "messages")
    options = dict(VIDEO_OPTIONS) if video else {}
    options.update({k: v for k in ("max_slice_nums", "use_image_id") if (v := getattr(body, k)) is not None})
    try:
        first = request_from_messages(processor, msgs, GenerationConfig(), system_prompt="\n".join(system),
                                      **options)
    except ArgumentError as e:
        raise bad_setting(e) from None
    except (ValueError, TypeError) as e:   # the conversation's shape, an image the processor cannot use
        raise bad_request(f"messages: {e}", "messages") from None
    return _choices(first, body, max_len, request_id, "messages")


def _part(part: dict[str, Any], where: str) -> _TextPart | _ImagePart | _VideoPart:
    kind = part.get("type")
    model = _PARTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise bad_request(f"{where}.type: unknown content part type {kind!r} (this server takes "
                          f"{', '.join(_PARTS)})", f"{where}.type")
    return parse(model, part, where)


def _too_many_frames(limits: Limits, where: str) -> APIError:
    return bad_request(f"{where}: too many video frames: the request's videos give more than this server's "
                       f"limit of {limits.max_video_frames} (--max-video-frames)", where, "too_many_images")


# ---------------------------------------------------------------------------------------- completions


def completion_requests(body: CompletionRequest, processor, *, max_len: int, request_id: str) -> list[Request]:
    """A completions body → ``n`` engine requests per prompt, prompt after prompt."""
    _refuse_unsupported(body)
    out: list[Request] = []
    for k, text in enumerate(body.prompt):
        field = "prompt" if len(body.prompt) == 1 else f"prompt[{k}]"
        if not text:
            raise bad_request(f"{field} is empty", field)
        try:
            first = Request(prompt=processor([text]), config=GenerationConfig())
        except ValueError as e:
            raise bad_request(f"{field}: {e}", field) from None
        out += _choices(first, body, max_len, f"{request_id}-{k}" if len(body.prompt) > 1 else request_id, field)
    return out


def prompt_tokens(requests: Sequence[Request], n: int) -> int:
    """The usage's prompt tokens: each prompt once, whatever ``n``."""
    return sum(r.prompt_tokens for r in requests[::n])
