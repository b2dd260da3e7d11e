"""``MiniCPMV.chat``: conversations with images in, answers out (docs/model.md §6–§8).

:class:`MiniCPMV` is the class users load (``minicpmv_jax.MiniCPMV``): the model of
:mod:`minicpmv_jax.model` plus :meth:`MiniCPMV.chat`, which calls :func:`chat`. It lives here, above
generation, so that the model's own file imports neither chat nor generation.

Steps, as in the reference ``chat()``:

1. :func:`~minicpmv_jax.conversation.conversation_prompt` — each message's content (a string, or a list of strings and images) is
   joined with ``\\n``, images becoming the tag ``(<image>./</image>)``; the optional ``system_prompt`` is
   prepended as a system message; the tokenizer's chat template renders it with the generation prompt.
2. The processor turns prompts and images into the batch (placeholders, pieces, ``image_bound``), the
   prompt truncated to ``max_inp_length`` tokens.
3. :func:`minicpmv_jax.generate.prepare_batch` pads the batch to buckets and encodes the image pieces —
   each piece's features are cached (:mod:`minicpmv_jax.feature_cache`), so a follow-up question about
   the same image does not run the vision tower again.
4. :func:`minicpmv_jax.generate.generate` runs prefill and the decode loop in one compiled call; or, with
   ``stream=True``, a jitted step driven from Python yields text as tokens arrive.
5. Answers: generated ids without the final stop token, decoded with special tokens kept, stripped of
   surrounding whitespace.

Unlike the reference, every generation keyword is honoured (unknown ones are an error), and token id 0
(``!``) is not deleted from answers.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from minicpmv_jax import generate as gen
from minicpmv_jax.conversation import conversation_prompt, nothing_asked
from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.generation_config import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from minicpmv_jax.host import fetch
from minicpmv_jax.model import MiniCPMVModel
from minicpmv_jax.text_stream import AnswerStream

__all__ = ["MiniCPMV", "chat", "answer_ids", "DEFAULT_MAX_INP_LENGTH"]

DEFAULT_MAX_INP_LENGTH = 8192


# ---------------------------------------------------------------------------------------- answers


def answer_ids(tokens: np.ndarray, length: int, stop_ids: Sequence[int]) -> list[int]:
    """A row's generated ids without its final stop token."""
    ids = [int(x) for x in tokens[:length]]
    if ids and ids[-1] in stop_ids:
        ids.pop()
    return ids


# ---------------------------------------------------------------------------------------- chat


def chat(model, image: Any, msgs: Sequence[Any], processor, sampling: bool = True,
         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream: bool = False, system_prompt: str = "",
         max_slice_nums: int | None = None, use_image_id: bool | None = None,
         max_inp_length: int = DEFAULT_MAX_INP_LENGTH, **generation_kwargs: Any) -> str | list[str] | Iterator[str]:
    """See :meth:`MiniCPMV.chat`."""
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
            if nothing_asked(conv, img):
                raise ValueError("the last message is an empty user message (no text, no image): nothing to "
                                 "answer")
        except (ValueError, TypeError) as e:
            raise type(e)(f"conversation {k}: {e}" if batched else str(e)) from None
        prompts.append(text)
        prompt_images.append(imgs)
    batch = processor(prompts, prompt_images, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                      max_length=max_inp_length)
    prepared = gen.prepare_batch(model, batch)
    stop_ids = tuple(processor.tokenizer.stop_ids)
    if stream:
        return _stream(model, prepared, config, stop_ids, processor.tokenizer)

    out = gen.generate(model, prepared, config, stop_ids)
    tokens, lengths = fetch(out.tokens), fetch(out.lengths)
    answers = [processor.tokenizer.decode(answer_ids(tokens[b], int(lengths[b]), stop_ids)).strip()
               for b in range(prepared.batch_size)]
    return answers if batched else answers[0]


def _stream(model, prepared: gen.PreparedBatch, config: GenerationConfig, stop_ids: tuple[int, ...],
            tokenizer) -> Iterator[str]:
    """Yields text pieces as tokens arrive; their concatenation is the non-streamed answer."""
    state = gen.prefill(model, prepared, config)
    step_once = gen.DecodeStepper(model, config, stop_ids)
    answer = AnswerStream(tokenizer, stop_ids)
    finished = False
    while not finished:
        step = int(state.step)
        state = step_once(state)
        token = int(fetch(state.tokens[:, step])[0])
        finished = bool(fetch(state.done)[0])
        piece = answer.feed(token, last=finished)
        if piece:
            yield piece


# ---------------------------------------------------------------------------------------- the user's model


class MiniCPMV(MiniCPMVModel):
    """MiniCPM-V 2.6 as users hold it: :class:`~minicpmv_jax.model.MiniCPMVModel` (loading,
    ``compute_logits``, ``forward``) plus :meth:`chat`. ``MiniCPMV.from_pretrained(path)`` returns one;
    ``MiniCPMV(cfg, rngs=...)`` has random weights."""

    def chat(self, image=None, msgs=None, processor=None, sampling: bool = True,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, stream: bool = False, system_prompt: str = "",
             max_slice_nums: int | None = None, use_image_id: bool | None = None,
             max_inp_length: int = DEFAULT_MAX_INP_LENGTH, **generation_kwargs):
        """Answers a conversation (or a batch of them) about images (docs/model.md §8).

        Args:
          image: a PIL image put before the first message's text (when that content is a string), or None;
            for a batch, one entry per conversation.
          msgs: ``[{"role": "user" | "assistant", "content": str | [str | PIL image, ...]}, ...]``, or a list
            of such conversations (then a list of answers is returned).
          processor: the checkpoint's :class:`~minicpmv_jax.processor.MiniCPMVProcessor`.
          sampling: True → top_p 0.8, top_k 100, temperature 0.7, repetition_penalty 1.05;
            False → beam search, 3 beams, repetition_penalty 1.2 (docs/model.md §7). Keywords override.
          max_new_tokens: tokens generated at most.
          stream: return an iterator of text pieces (one conversation; sampling or greedy).
          system_prompt: prepended as a system message when not empty.
          max_slice_nums, use_image_id: override the processor's configuration.
          max_inp_length: the prompt is cut to its first ``max_inp_length`` tokens.
          **generation_kwargs: ``min_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
            ``repetition_penalty``, ``num_beams``, ``length_penalty``, ``do_sample``, ``seed`` (same seed →
            same text). Unknown keywords raise ``TypeError``.

        Returns:
          The answer (str), a list of answers for a batch, or an iterator of pieces with ``stream=True``.
        """
        return chat(self, image, msgs, processor, sampling=sampling, max_new_tokens=max_new_tokens,
                    stream=stream, system_prompt=system_prompt, max_slice_nums=max_slice_nums,
                    use_image_id=use_image_id, max_inp_length=max_inp_length, **generation_kwargs)
