"""MiniCPM-V 2.6 tokenizer: the checkpoint's ``tokenizer.json`` run by the ``tokenizers`` library.

The checkpoint is the source of truth (docs/model.md): every special-token id is looked up by its string in
the loaded files, never hard-coded. ``tokenizer_config.json`` supplies the named special tokens
(``eos_token``, ``pad_token``, ``unk_token``, …) and the Jinja ``chat_template``.

Behaviour matches ``transformers.AutoTokenizer`` on the same folder: :meth:`MiniCPMVTokenizer.encode`
adds no BOS (MiniCPM-V 2.6 uses none) and recognises added tokens such as ``<image>`` or ``<|im_end|>``
inside the text; :meth:`~MiniCPMVTokenizer.decode` keeps special tokens unless asked not to.

Note on ``<unk>``: the Qwen2 BPE vocabulary already holds the regular token ``<unk>`` (id 128244 in the
released vocabulary). The checkpoint also lists ``<unk>`` among its added tokens with a higher id, but
the ``tokenizers`` library (and so transformers) resolves the string to the BPE id. Looking ids up by
string, as we do, gives the same answer as the reference.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

from minicpmv_jax.chat_template import render_chat_template

__all__ = ["TokenizerError", "MiniCPMVTokenizer", "IncrementalDecoder"]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

#: Named special-token attributes handed to chat templates, as transformers does.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: Added tokens MiniCPM-V's prompts and generation rely on; a checkpoint lacking any is rejected at load.
REQUIRED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    "<unk>",
)


class TokenizerError(ValueError):
    """A tokenizer file that is missing, corrupt, or lacks a token MiniCPM-V needs."""


def _token_content(value: Any, source: str, key: str) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, null, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: {key} must be a string, null or {{'content': ...}}, got {value!r}")


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _chat_template_from_config(config: Mapping[str, Any], source: str) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{source}: chat_template lists templates {sorted(map(str, named))} but no 'default'")
    raise TokenizerError(f"{source}: chat_template must be a string, got {type(template).__name__}")


class MiniCPMVTokenizer:
    """Byte-level BPE tokenizer with MiniCPM-V's special tokens and chat template.

    Build it with :meth:`from_pretrained`; the constructor takes already-loaded parts.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: Mapping[str, Any],
        *,
        chat_template: str | None = None,
        source: str = TOKENIZER_FILE,
        config_source: str = TOKENIZER_CONFIG_FILE,
    ) -> None:
        """Wraps a loaded ``tokenizers.Tokenizer``.

        Args:
          tokenizer: the loaded ``tokenizer.json``.
          config: the ``tokenizer_config.json`` object (special tokens filled from
            ``special_tokens_map.json`` where absent).
          chat_template: Jinja template; default ``config["chat_template"]``.
          source, config_source: file names used in error messages.

        Raises:
          TokenizerError: a required or configured special token is not an added token of ``tokenizer``.
        """
        self._tok = tokenizer
        self._source = source
        self._config_source = config_source
        self._added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._chat_template = chat_template if chat_template is not None else _chat_template_from_config(
            config, config_source
        )
        self._special_tokens: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            content = _token_content(config.get(key), config_source, key)
            if content is not None:
                self._special_tokens[key] = content
        self._ids = {token: self._lookup(token, "required by MiniCPM-V") for token in REQUIRED_TOKENS}
        for key, token in self._special_tokens.items():
            self._ids[token] = self._lookup(token, f"named by {config_source}: {key}")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "MiniCPMVTokenizer":
        """Loads ``tokenizer.json`` and ``tokenizer_config.json`` from the folder ``path`` (``~`` expanded).

        ``special_tokens_map.json`` (optional) fills named special tokens the config lacks;
        ``chat_template.jinja`` (optional) overrides the config's ``chat_template``, as in transformers.
        """
        path = os.path.expanduser(os.fspath(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer folder {path} does not exist")
        tok_path = os.path.join(path, TOKENIZER_FILE)
        cfg_path = os.path.join(path, TOKENIZER_CONFIG_FILE)
        for required in (tok_path, cfg_path):
            if not os.path.isfile(required):
                raise FileNotFoundError(f"{required} is missing: a MiniCPM-V tokenizer folder needs "
                                        f"{TOKENIZER_FILE} and {TOKENIZER_CONFIG_FILE}")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tok_path} cannot be loaded by the tokenizers library: {e}") from e
        config = _read_json(cfg_path)
        map_path = os.path.join(path, SPECIAL_TOKENS_MAP_FILE)
        if os.path.isfile(map_path):
            for key, value in _read_json(map_path).items():
                if key in NAMED_SPECIAL_TOKENS and key not in config:
                    config[key] = value
        template = None
        template_path = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template_path):
            with open(template_path, encoding="utf-8") as f:
                template = f.read()
        return cls(tok, config, chat_template=template, source=tok_path, config_source=cfg_path)

    # ---------------------------------------------------------------- special tokens

    def _lookup(self, token: str, why: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None or token not in self._added:
            raise TokenizerError(f"{self._source} has no added token {token!r} ({why})")
        return token_id

    def token_to_id(self, token: str) -> int:
        """Id of ``token``; a TokenizerError naming the file if the vocabulary lacks it."""
        token_id = self._ids.get(token)
        if token_id is None:
            token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self._source} has no token {token!r}")
        return token_id

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of ``token_id``, or None for an id without a token."""
        return self._tok.id_to_token(int(token_id))

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set (``eos_token`` …), as passed to chat templates."""
        return dict(self._special_tokens)

    def _named(self, key: str) -> str:
        token = self._special_tokens.get(key)
        if token is None:
            raise TokenizerError(f"{self._config_source} sets no {key}")
        return token

    @property
    def bos_token(self) -> str | None:
        """The BOS token string, None for MiniCPM-V 2.6 (no BOS is ever added)."""
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str:
        return self._named("eos_token")

    @property
    def pad_token(self) -> str:
        return self._named("pad_token")

    @property
    def unk_token(self) -> str:
        return self._special_tokens.get("unk_token", "<unk>")

    @property
    def eos_id(self) -> int:
        """Id of the config's ``eos_token`` (``<|im_end|>`` for MiniCPM-V 2.6)."""
        return self._ids[self.eos_token]

    @property
    def pad_id(self) -> int:
        """Id of the config's ``pad_token`` (``<|endoftext|>``). Batches are still padded with 0 (docs/model.md §6)."""
        return self._ids[self.pad_token]

    @property
    def unk_id(self) -> int:
        """Id of the image placeholder token ``<unk>``."""
        return self._ids[self.unk_token]

    @property
    def im_start_id(self) -> int:
        return self._ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self._ids["<|im_end|>"]

    @property
    def endoftext_id(self) -> int:
        return self._ids["<|endoftext|>"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: ``<|im_end|>``, ``<|endoftext|>`` (and the config's eos if different)."""
        ids = [self.im_end_id, self.endoftext_id]
        if "eos_token" in self._special_tokens and self.eos_id not in ids:
            ids.append(self.eos_id)
        return tuple(ids)

    eos_ids = stop_ids

    @property
    def image_start_id(self) -> int:
        return self._ids["<image>"]

    @property
    def image_end_id(self) -> int:
        return self._ids["</image>"]

    @property
    def slice_start_id(self) -> int:
        return self._ids["<slice>"]

    @property
    def slice_end_id(self) -> int:
        return self._ids["</slice>"]

    @property
    def image_id_start_id(self) -> int:
        return self._ids["<image_id>"]

    @property
    def image_id_end_id(self) -> int:
        return self._ids["</image_id>"]

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows (regular plus added)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, added tokens in the text become their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for several texts (parallel in the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders ``messages`` with the checkpoint's ``chat_template`` (see :mod:`minicpmv_jax.chat_template`).

        Args:
          messages: ``[{"role": ..., "content": str}, ...]``.
          add_generation_prompt: end with the assistant header ``<|im_start|>assistant\\n``.
          tokenize: return :meth:`encode` of the rendered text instead of the text.
          **kwargs: extra template variables (override the special-token variables).
        """
        if self._chat_template is None:
            raise TokenizerError(f"{self._config_source} has no chat_template")
        text = render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self._special_tokens,
            **kwargs,
        )
        return self.encode(text) if tokenize else text

    # ---------------------------------------------------------------- streaming

    def stream_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh :class:`IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns ids arriving one at a time into text pieces that never split a UTF-8 character.

    Byte-level BPE can cut one character (an emoji, a CJK ideograph) across several tokens; a piece is only
    released once its bytes form whole characters. Built on ``tokenizers.decoders.DecodeStream``, which
    re-decodes a short window of recent ids and releases the new suffix unless it ends in an incomplete
    sequence (U+FFFD). Joining every piece from :meth:`step` and :meth:`flush` equals
    ``tokenizer.decode(all_ids, skip_special_tokens)``.
    """

    def __init__(self, tokenizer: MiniCPMVTokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted = 0  # characters released so far
        self._finished = False

    def step(self, token_id: int) -> str:
        """Feeds one id; returns the newly complete text ('' while a character is still partial)."""
        if self._finished:
            raise RuntimeError("IncrementalDecoder.step called after flush(); start a new decoder")
        token_id = int(token_id)
        self._ids.append(token_id)
        piece = self._stream.step(self._tokenizer.backend, token_id)
        if not piece:
            return ""
        self._emitted += len(piece)
        return piece

    def __call__(self, ids: Iterable[int]) -> Iterator[str]:
        """Feeds ``ids`` in order, yielding the non-empty pieces, then whatever :meth:`flush` releases."""
        for token_id in ids:
            piece = self.step(token_id)
            if piece:
                yield piece
        tail = self.flush()
        if tail:
            yield tail

    def flush(self) -> str:
        """Ends the stream and releases any held-back text (e.g. an unfinished byte sequence, as U+FFFD).

        Only call it once no more ids will come; :meth:`step` refuses ids afterwards.
        """
        self._finished = True
        full = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        tail = full[self._emitted :]
        self._emitted = len(full)
        return tail

    @property
    def ids(self) -> list[int]:
        """All ids fed so far."""
        return list(self._ids)
