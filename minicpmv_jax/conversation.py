"""A conversation → its prompt: messages of text and images rendered by the chat template (docs/model.md §6).

Host-side processing (PIL and the tokenizer, no JAX), shared by ``chat`` and by fine-tuning's data, which
must build training prompts exactly as ``chat`` builds inference prompts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from PIL import Image

from minicpmv_jax.processor import IMAGE_TAG

__all__ = ["conversation_prompt", "nothing_asked", "ROLES"]

ROLES = ("user", "assistant")


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
        if role not in ROLES:
            raise ValueError(f"msgs[{i}]['role'] must be one of {ROLES}, got {role!r}")
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


def nothing_asked(msgs: Sequence[Mapping[str, Any]], image: Any) -> bool:
    """Whether a (valid) conversation ends in a user message with neither text nor an image."""
    last = msgs[-1]
    parts = [last["content"]] if isinstance(last["content"], str) else list(last["content"])
    if len(msgs) == 1 and image is not None:
        parts.append(image)
    return last["role"] == "user" and all(isinstance(p, str) and not p.strip() for p in parts)
