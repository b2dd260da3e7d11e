"""Renders a checkpoint's Jinja ``chat_template`` the way ``transformers`` does.

Chat templates come from model repositories, so they are untrusted code: they run in jinja2's
``ImmutableSandboxedEnvironment``. The environment is configured like transformers' own
(``transformers.utils.chat_template_utils``): ``trim_blocks`` and ``lstrip_blocks`` on, the
``loopcontrols`` extension (``{% break %}``/``{% continue %}``), a JSON ``tojson`` filter that does not
escape HTML, and the globals ``raise_exception(msg)``, ``strftime_now(fmt)``, ``dict(...)`` and
``namespace(...)``. The ``{% generation %}…{% endgeneration %}`` block that transformers uses to mark
assistant tokens is accepted and renders its body unchanged.

The template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's
named special tokens (``bos_token``, ``eos_token``, … — those that are set), overridable by keyword.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or that refused the conversation (``raise_exception``)."""


class _GenerationBlock(jinja2.ext.Extension):
    """Parses ``{% generation %}…{% endgeneration %}`` and renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attribute names (no route to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set namespace attribute {name!r}")


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles ``source`` in the sandboxed environment described in the module docstring (cached)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat_template does not compile: line {e.lineno}: {e.message}") from e


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies the messages, dropping keys whose value is None (as transformers does)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("cannot apply the chat template to an empty conversation")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str] | None = None,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Renders one conversation with the template ``source``.

    Args:
      source: the Jinja template text.
      messages: the conversation, a list of dicts (``role``, ``content``, …).
      add_generation_prompt: whether to end with the assistant header.
      special_tokens: named special tokens passed as template variables (``eos_token`` …).
      tools, documents: passed through for templates that use them.
      **kwargs: further template variables; they override ``special_tokens`` of the same name.

    Raises:
      ChatTemplateError: the template does not compile or calls ``raise_exception``.
    """
    template = compile_chat_template(source)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(
            messages=_normalize_messages(messages),
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.exceptions.SecurityError:
        raise
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat_template failed: {e}") from e
