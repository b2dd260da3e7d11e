"""``MiniCPMV.chat``: conversations with images in, answers out (docs/model.md §6–§8).

Steps, as in the reference ``chat()``:

1. :func:`conversation_prompt` — each message's content (a string, or a list of strings and images) is
   joined with ``\\n``, images becoming the tag ``(<image>./</image>)``; the optional ``system_prompt`` is
   prepended as a system message; the tokenizer's chat template renders it with the generation prompt.
2. The processor turns prompts and images into the batch (placeholders, pieces, ``image_bound``), the
   prompt truncated to ``max_inp_length`` tokens.
3. Image pieces are encoded — each piece's features are cached, so a follow-up question about the same
   image does not run the vision tower again — and written into their placeholder spans.
4. :func:`minicpmv_jax.generate.generate` runs prefill and the decode loop in one compiled call; or, with
   ``stream=True``, a jitted step driven from Python yields text as tokens arrive.
5. Answers: generated ids without the final stop token, decoded with special tokens kept, stripped of
   surrounding whitespace.

Unlike the reference, every generation keyword is honoured (unknown ones are an error), and token id 0
(``!``) is not deleted from answers.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import weakref
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from minicpmv_jax import generate as gen
from minicpmv_jax import sampling
from minicpmv_jax.buckets import MIN_LENGTH, bucket, pad_left
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from minicpmv_jax.image_inputs import feature_slots, pack_for_encoder, pieces_bucket
from minicpmv_jax.host import fetch
from minicpmv_jax.processor import IMAGE_TAG

__all__ = ["conversation_prompt", "chat", "PreparedBatch", "prepare_batch", "answer_ids",
           "DEFAULT_MAX_INP_LENGTH"]

DEFAULT_MAX_INP_LENGTH = 8192
_ROLES = ("user", "assistant")


# ---------------------------------------------------------------------------------------- prompts


def conversation_prompt(msgs: Sequence[Mapping[str, Any]], image: Any, tokenizer, system_prompt: str = ""
                        ) -> tuple[str, list[Image.Image]]:
    """One conversation → (rendered prompt with image tags, its images in tag order).

    ``msgs``: ``[{"role": "user" | "assistant", "content": str | [str | PIL image, ...]}, ...]``, starting
    with a user message. ``image`` (a PIL image or None) is put before the first message's text when
    that content is a plain string, as the reference does.

    Raises:
      ValueError / TypeError: naming the message and part that is malformed.
    """
    if isinstance(msgs, (str, bytes)) or not isinstance(msgs, Sequence) or not msgs:
        raise ValueError("msgs must be a non-empty list of {'role': ..., 'content': ...} messages")
    if not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a str, got {type(system_prompt).__name__}")
    images: list[Image.Image] = []
    rendered = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise ValueError(f"msgs[{i}] must be a dict with 'role' and 'content', got {msg!r:.80}")
        role, content = msg["role"], msg["content"]
        if role not in _ROLES:
            raise ValueError(f"msgs[{i}]['role'] must be one of {_ROLES}, got {role!r}")
        if i == 0 and role != "user":
            raise ValueError(f"the first message must be from the user, got role {role!r}")
        if i == 0 and image is not None and isinstance(content, str):
            content = [image, content]
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, Sequence):
            raise TypeError(f"msgs[{i}]['content'] must be a str or a list of str and images, "
                            f"got {type(content).__name__}")
        texts = []
        for j, part in enumerate(parts):
            if isinstance(part, Image.Image):
                images.append(part)
                texts.append(IMAGE_TAG)
            elif isinstance(part, str):
                texts.append(part)
            else:
                raise TypeError(f"msgs[{i}]['content'][{j}] must be a str or a PIL image, got "
                                f"{type(part).__name__}")
        rendered.append({"role": role, "content": "\n".join(texts)})
    return tokenizer.apply_chat_template(rendered, add_generation_prompt=True), images


def _nothing_asked(msgs: Sequence[Mapping[str, Any]], image: Any) -> bool:
    """Whether a (valid) conversation ends in a user message with neither text nor an image."""
    last = msgs[-1]
    parts = [last["content"]] if isinstance(last["content"], str) else list(last["content"])
    if len(msgs) == 1 and image is not None:
        parts.append(image)
    return last["role"] == "user" and all(isinstance(p, str) and not p.strip() for p in parts)


# ---------------------------------------------------------------------------------------- vision features

# Per model: piece digest → features [Q, D] on device (LRU). Kept outside the NNX module so that the
# module's state stays parameters only.
_FEATURE_CACHES: "weakref.WeakKeyDictionary[Any, collections.OrderedDict]" = weakref.WeakKeyDictionary()
FEATURE_CACHE_SIZE = 256  # pieces (a 1344² image is 10)


@dataclasses.dataclass
class FeatureCacheStats:
    hits: int = 0
    misses: int = 0


_STATS: "weakref.WeakKeyDictionary[Any, FeatureCacheStats]" = weakref.WeakKeyDictionary()


def feature_cache_stats(model) -> FeatureCacheStats:
    """Hits and misses of ``model``'s piece-feature cache (pieces encoded = misses)."""
    return _STATS.setdefault(model, FeatureCacheStats())


def _digest(piece: np.ndarray) -> bytes:
    piece = np.ascontiguousarray(piece, np.float32)
    return hashlib.blake2b(piece.tobytes(), digest_size=16, person=str(piece.shape).encode()[:16]).digest()


def encode_pieces(model, pieces: Sequence[np.ndarray]) -> list[jax.Array]:
    """Features ``[Q, D]`` per piece; pieces seen before (same pixels) come from the cache."""
    cache = _FEATURE_CACHES.setdefault(model, collections.OrderedDict())
    stats = feature_cache_stats(model)
    keys = [_digest(p) for p in pieces]
    missing = list(dict.fromkeys(k for k in keys if k not in cache))
    stats.hits += len(keys) - len(missing)
    stats.misses += len(missing)
    if missing:
        first = {k: p for k, p in zip(keys, pieces)}
        todo = [first[k] for k in missing]
        cfg = model.config
        arrays = pack_for_encoder(todo, patch_size=cfg.vision.patch_size, side=cfg.vision.num_patches_per_side)
        features = model.encode_pieces_packed(*arrays)
        for i, k in enumerate(missing):
            cache[k] = features[i]
    out = []
    for k in keys:
        cache.move_to_end(k)
        out.append(cache[k])
    while len(cache) > FEATURE_CACHE_SIZE:
        cache.popitem(last=False)
    return out


# ---------------------------------------------------------------------------------------- batches


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A processor batch padded to buckets, with image features in place for generation.

    ``ids``/``mask`` ``[B', T']`` (left-padded), ``row_valid [B']``, ``features [N, Q, D]`` or None and
    ``feature_index [B', T']`` or None; ``batch_size`` is the number of real rows.
    """

    ids: jax.Array
    mask: jax.Array
    row_valid: jax.Array
    features: jax.Array | None
    feature_index: jax.Array | None
    batch_size: int


def prepare_batch(model, batch: Mapping[str, Any]) -> PreparedBatch:
    """Pads ``batch`` (the processor's dict) to power-of-two B and T and encodes its image pieces."""
    ids = np.asarray(batch["input_ids"], np.int32)
    mask = np.asarray(batch["attention_mask"], bool)
    b = ids.shape[0]
    padded = pad_left(ids, mask)
    bb, bt = padded.ids.shape
    row_valid = np.arange(bb) < b
    features = feature_index = None
    bounds = batch.get("image_bound") or []
    if any(len(x) for x in bounds):
        pixel_values = batch["pixel_values"]
        index, used = feature_slots(bounds, [len(p) for p in pixel_values], (bb, bt), [padded.offset] * b,
                                    model.config.resampler.num_queries)
        per_piece = encode_pieces(model, [pixel_values[r][j] for r, j in used])
        features = _stack(per_piece, pieces_bucket(len(per_piece)), model.mesh)
        feature_index = model.put(index)
    return PreparedBatch(model.put(padded.ids), model.put(padded.mask), model.put(row_valid), features,
                         feature_index, b)


def _stack(per_piece: list[jax.Array], size: int, mesh) -> jax.Array:
    """Per-piece features ``[Q, D]`` → ``[size, Q, D]`` (zero rows after them), replicated on ``mesh``."""
    pad = size - len(per_piece)
    stack = lambda xs: jnp.stack(list(xs) + [jnp.zeros_like(xs[0])] * pad)  # noqa: E731
    if mesh is None:
        return stack(per_piece)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(stack, out_shardings=replicated)(per_piece)


def answer_ids(tokens: np.ndarray, length: int, stop_ids: Sequence[int]) -> list[int]:
    """A row's generated ids without its final stop token."""
    ids = [int(x) for x in tokens[:length]]
    if ids and ids[-1] in stop_ids:
        ids.pop()
    return ids


# ---------------------------------------------------------------------------------------- chat


def _sampling_params(config: GenerationConfig) -> "sampling.SamplingParams":
    return sampling.SamplingParams.make(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                        repetition_penalty=config.repetition_penalty,
                                        min_new_tokens=config.min_new_tokens)


def chat(model, image: Any, msgs: Sequence[Any], processor, sampling: bool = True,
         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream: bool = False, system_prompt: str = "",
         max_slice_nums: int | None = None, use_image_id: bool | None = None,
         max_inp_length: int = DEFAULT_MAX_INP_LENGTH, **generation_kwargs: Any) -> str | list[str] | Iterator[str]:
    """See :meth:`minicpmv_jax.model.MiniCPMV.chat`."""
    if processor is None:
        raise ValueError("chat needs processor= (MiniCPMVProcessor.from_pretrained(path))")
    batched = bool(msgs) and isinstance(msgs, Sequence) and not isinstance(msgs, (str, bytes)) \
        and isinstance(msgs[0], Sequence) and not isinstance(msgs[0], (str, bytes, Mapping))
    conversations = list(msgs) if batched else [msgs]
    if batched:
        images = [None] * len(conversations) if image is None else list(image)
        if len(images) != len(conversations):
            raise ValueError(f"image must hold one entry per conversation: got {len(images)} for "
                             f"{len(conversations)} conversations")
    else:
        images = [image]
    config = GenerationConfig.for_chat(sampling, max_new_tokens=max_new_tokens, **generation_kwargs)
    if stream and (batched or config.strategy == "beam"):
        raise ArgumentError("{} needs a single conversation and sampling or greedy decoding (beam search only "
                            "knows its answer at the end)", "stream=True")

    prompts, prompt_images = [], []
    for k, (conv, img) in enumerate(zip(conversations, images)):
        try:
            text, imgs = conversation_prompt(conv, img, processor.tokenizer, system_prompt)
            if _nothing_asked(conv, img):
                raise ValueError("the last message is an empty user message (no text, no image): nothing to "
                                 "answer")
        except (ValueError, TypeError) as e:
            raise type(e)(f"conversation {k}: {e}" if batched else str(e)) from None
        prompts.append(text)
        prompt_images.append(imgs)
    batch = processor(prompts, prompt_images, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                      max_length=max_inp_length)
    prepared = prepare_batch(model, batch)
    stop_ids = tuple(processor.tokenizer.stop_ids)
    num_new = bucket(config.max_new_tokens, MIN_LENGTH)
    params = _sampling_params(config)
    if stream:
        return _stream(model, prepared, config, params, stop_ids, num_new, processor.tokenizer)

    out = gen.generate(model, prepared.ids, prepared.mask, prepared.features, prepared.feature_index,
                       prepared.row_valid, strategy=config.strategy, sampling_params=params, stop_ids=stop_ids,
                       max_new_tokens=config.max_new_tokens, num_new=num_new, num_beams=config.num_beams,
                       length_penalty=config.length_penalty, seed=config.seed)
    tokens, lengths = fetch(out.tokens), fetch(out.lengths)
    answers = [processor.tokenizer.decode(answer_ids(tokens[b], int(lengths[b]), stop_ids)).strip()
               for b in range(prepared.batch_size)]
    return answers if batched else answers[0]


def _stream(model, prepared: PreparedBatch, config: GenerationConfig, params, stop_ids, num_new: int,
            tokenizer) -> Iterator[str]:
    """Yields text pieces as tokens arrive; their concatenation is the non-streamed answer."""
    state = gen.prefill(model, prepared.ids, prepared.mask, prepared.features, prepared.feature_index,
                        prepared.row_valid, num_new=num_new, seed=config.seed)
    decoder = tokenizer.stream_decoder()
    strip = _StripStream()
    while True:
        step = int(state.step)
        state = gen.decode_step(model, state, sampling_params=params, stop_ids=stop_ids,
                                max_new_tokens=config.max_new_tokens, do_sample=config.do_sample)
        token = int(fetch(state.tokens[:, step])[0])
        finished = bool(fetch(state.done)[0])
        if not (finished and token in stop_ids):
            piece = strip.feed(decoder.step(token))
            if piece:
                yield piece
        if finished:
            break
    piece = strip.feed(decoder.flush(), last=True)
    if piece:
        yield piece


class _StripStream:
    """Streams text with surrounding whitespace removed, as ``str.strip`` would on the whole."""

    def __init__(self) -> None:
        self._started = False
        self._held = ""  # trailing whitespace not yet known to be inner

    def feed(self, piece: str, last: bool = False) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        text = self._held + piece
        body = text.rstrip()
        self._held = "" if last else text[len(body):]
        return body
