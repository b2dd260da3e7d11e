"""Fine-tuning data: the reference JSON / JSONL format → validated, tokenised samples.

**Format** (OpenBMB MiniCPM-V ``finetune/``). A data file is a JSON array of samples, or JSONL (one sample per
line). A sample is an object with an optional ``id``, an optional ``image`` and ``conversations``::

    {"id": "0", "image": "cats/1.jpg",
     "conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                       {"role": "assistant", "content": "A cat."}]}

``image`` is one path (the text refers to it as ``<image>``; without a ``<image>`` in the text the image goes
before the first user message's text, as the reference does) or an object of named paths
(``{"<image_00>": "a.jpg", "<image_01>": "b.jpg"}``, each name written exactly once in the user text, images
taken in the order the text names them). Relative paths resolve against the data file's folder. A sample may
have no image. ``conversations`` alternates ``user`` and ``assistant`` messages (string contents), optionally
after one leading ``system`` message, which becomes the chat's ``system_prompt``.

**Tokenisation** — as :meth:`MiniCPMV.chat <minicpmv_jax.chat.MiniCPMV.chat>` builds prompts, so that training
matches inference: image references become the tag ``(<image>./</image>)``; the checkpoint's chat template
renders the conversation; each tag becomes its image's placeholder as the processor writes it
(:func:`~minicpmv_jax.slicing.plan_slices` and :func:`~minicpmv_jax.slicing.image_placeholder`, with
``max_slice_nums`` and ``use_image_id`` overridable). The text before an assistant turn is exactly
:func:`~minicpmv_jax.conversation.conversation_prompt` of the turns before it (checked for every sample), and the
targets are each assistant text and the ``<|im_end|>`` closing it. The rendered conversation is tokenised in
segments cut at those targets, so the targets decode to exactly the assistant texts; everything else
(system, user turns, role headers, image placeholders, the ``\\n`` after ``<|im_end|>``) is context.

**Validation** happens once, when the dataset is built: every sample is parsed, its images decoded (a missing,
truncated or corrupt file is found here), tokenised and measured. Bad samples — malformed JSON line, missing
or unreadable image, no assistant turn, a role other than user/assistant, image references not matching the
images, longer than ``max_length`` (refused, never truncated: that would cut the answer) — are reported by
id, file and line, then skipped with a :class:`SkippedSamplesWarning` or refused with one
:class:`SampleError` (``on_bad``). Image pixels are not kept: each batch decodes its images again.

Batches of these samples: :class:`minicpmv_jax.finetune.batching.FinetuneDataset`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import warnings
from typing import Any, Callable, Literal, Sequence

import numpy as np

from minicpmv_jax import slicing
from minicpmv_jax.conversation import conversation_prompt
from minicpmv_jax.image_processing import load_image
from minicpmv_jax.processor import IMAGE_TAG, MiniCPMVProcessor, image_bounds

__all__ = ["DataConfig", "SampleError", "SkippedSamplesWarning", "RawSample", "BadSample", "EncodedSample",
           "MIN_BUCKET", "default_buckets", "load_samples", "encode_sample", "encode_samples", "check_workers",
           "parallel_map"]

#: How a single image is referenced in the reference format.
SINGLE_IMAGE = "<image>"
_NAMED_IMAGE = r"<image_\d+>"
# Joins the context / target segments of a rendered conversation while its image tags are expanded.
_SEGMENT_SEP = "\x00"
_MAX_LISTED = 20  # bad samples named in a warning or error
#: The smallest default bucket.
MIN_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How a fine-tuning data file becomes batches.

    Attributes:
      max_length: the most tokens a sample may have (longer samples are bad samples, not truncated).
      buckets: the lengths batches are padded to, increasing, the largest ≥ ``max_length``; None: powers of
        two from 64 below ``max_length``, then ``max_length`` (:func:`default_buckets`).
      batch_size: B, rows per batch (a last partial batch is filled with empty padding rows).
      shuffle: permute samples every epoch (seeded with ``(seed, epoch)``); False keeps the file order.
      seed: the shuffling seed (non-negative int).
      group_by_length: with ``shuffle``, batch samples of similar length together.
      max_slice_nums, use_image_id: override the processor config (None keeps it).
      on_bad: ``"skip"`` bad samples with a warning, or ``"error"``: refuse the file with one SampleError.
    """

    max_length: int = 2048
    buckets: tuple[int, ...] | None = None
    batch_size: int = 1
    shuffle: bool = True
    seed: int = 0
    group_by_length: bool = True
    max_slice_nums: int | None = None
    use_image_id: bool | None = None
    on_bad: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        for name in ("max_length", "batch_size") + (("max_slice_nums",) if self.max_slice_nums is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"DataConfig.seed must be a non-negative int, got {self.seed!r}")
        for name in ("shuffle", "group_by_length") + (("use_image_id",) if self.use_image_id is not None else ()):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DataConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.on_bad not in ("skip", "error"):
            raise ValueError(f"DataConfig.on_bad must be 'skip' or 'error', got {self.on_bad!r}")
        if self.buckets is not None:
            buckets = tuple(self.buckets)
            if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
                raise ValueError(f"DataConfig.buckets must be positive ints (or None), got {self.buckets!r}")
            if any(a >= b for a, b in zip(buckets, buckets[1:])):
                raise ValueError(f"DataConfig.buckets must be strictly increasing, got {buckets}")
            if buckets[-1] < self.max_length:
                raise ValueError(f"the largest of DataConfig.buckets {buckets} is below max_length="
                                 f"{self.max_length}: samples of up to max_length tokens would fit no bucket")
            object.__setattr__(self, "buckets", buckets)

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        """``buckets``, or the default for ``max_length``."""
        return self.buckets if self.buckets is not None else default_buckets(self.max_length)

    def slicing(self, processor: MiniCPMVProcessor) -> tuple[int, bool]:
        """(max_slice_nums, use_image_id): these overrides, else ``processor``'s config."""
        return (processor.config.max_slice_nums if self.max_slice_nums is None else self.max_slice_nums,
                processor.config.use_image_id if self.use_image_id is None else self.use_image_id)


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from :data:`MIN_BUCKET` below ``max_length``, then ``max_length`` itself.

    ``default_buckets(2048) == (64, 128, 256, 512, 1024, 2048)``; ``default_buckets(300) == (64, 128, 256,
    300)``; ``default_buckets(40) == (40,)``.
    """
    buckets = []
    size = MIN_BUCKET
    while size < max_length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_length,)


class SampleError(ValueError):
    """Bad samples in a data file (``on_bad="error"``), or no usable sample at all.

    Attributes:
      report: what is wrong, e.g. the bad samples by id, file and line.
      bad: the bad samples.
      skippable: ``on_bad="skip"`` would have left the bad samples out instead (the message says so after
        the report; a command line can say it with its own option).
    """

    def __init__(self, report: str, bad: Sequence["BadSample"] = (), skippable: bool = False) -> None:
        super().__init__(report + ("\n(on_bad='skip' leaves them out)" if skippable else ""))
        self.report = report
        self.bad = list(bad)
        self.skippable = skippable


class SkippedSamplesWarning(UserWarning):
    """Bad samples were left out of a dataset (``on_bad="skip"``): ``report`` names them, ``bad`` lists them
    (the message is the report and a line saying they are skipped because of ``on_bad``)."""

    def __init__(self, report: str, bad: Sequence["BadSample"]) -> None:
        super().__init__(report + "\nthey are skipped (on_bad='skip')")
        self.report = report
        self.bad = list(bad)


class _Refused(Exception):
    """Why one sample cannot be used (becomes a BadSample)."""


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One entry of a data file before validation.

    Attributes:
      source: the data file's path.
      index: 0-based position among the file's samples.
      line: 1-based line of a JSONL file, or None for an item of a JSON array.
      data: the parsed JSON value (None when the line is not valid JSON).
      error: why the entry could not be parsed, or None.
    """

    source: str
    index: int
    line: int | None
    data: Any
    error: str | None = None

    @property
    def location(self) -> str:
        """``file:line`` (JSONL) or ``file[index]`` (JSON array)."""
        return f"{self.source}:{self.line}" if self.line is not None else f"{self.source}[{self.index}]"

    @property
    def sample_id(self) -> str:
        """The sample's ``id`` as a string, else its place in the file (``name.jsonl:7``, ``name.json[3]``)."""
        if isinstance(self.data, dict) and self.data.get("id") is not None:
            return str(self.data["id"])
        name = os.path.basename(self.source)
        return f"{name}:{self.line}" if self.line is not None else f"{name}[{self.index}]"


@dataclasses.dataclass(frozen=True)
class BadSample:
    """A sample left out (or refused), with where it is and why."""

    sample_id: str
    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location} (id {self.sample_id!r}): {self.reason}"


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedSample:
    """A validated sample, tokenised; its image pixels are produced again when it is batched.

    Attributes:
      sample_id: see :attr:`RawSample.sample_id`.
      input_ids: int32 [T], the rendered conversation with image placeholders.
      loss_mask: bool [T]; True where the token is a target (assistant text and its ``<|im_end|>``).
      image_bound: int32 [n, 2], the placeholder spans ``[start, end)`` in this sample's own positions.
      images: the image files (absolute or as resolved), in placeholder order.
      image_sizes: (W, H) per image, as decoded at validation.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_bound: np.ndarray
    images: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.input_ids)


# ---------------------------------------------------------------------------------------- reading


def load_samples(path: str | os.PathLike) -> list[RawSample]:
    """Reads a data file (``~`` expanded): a JSON array (the file starts with ``[``) or JSONL (one sample per
    line).

    A JSONL line that is not valid JSON becomes a RawSample with ``error`` set (a bad sample, reported
    later); blank lines are ignored.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not UTF-8, a JSON array that does not parse, or holds no sample.
    """
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fine-tuning data file {path} not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); a data "
                             "file is one JSON array of samples, or JSONL with one sample per line") from None
        samples = [RawSample(path, i, None, item) for i, item in enumerate(items)]
    else:
        samples = []
        for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
            if not line.strip():
                continue
            try:
                samples.append(RawSample(path, len(samples), lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                samples.append(RawSample(path, len(samples), lineno, None,
                                         f"not valid JSON: {e.msg} (column {e.colno})"))
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


# ---------------------------------------------------------------------------------------- one sample


def _messages(data: Any) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, user/assistant messages) of a sample, checked."""
    if not isinstance(data, dict):
        raise _Refused(f"a sample must be a JSON object, got {type(data).__name__}")
    conversations = data.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _Refused("'conversations' must be a non-empty list of {'role': ..., 'content': ...}")
    messages = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(
                msg.get("content"), str):
            raise _Refused(f"conversations[{i}] must be an object with a string 'role' and a string 'content', "
                           f"got {json.dumps(msg)[:80]}")
        if msg["role"] not in ("user", "assistant") and not (i == 0 and msg["role"] == "system"):
            raise _Refused(f"conversations[{i}] has role {msg['role']!r}: expected 'user' or 'assistant' "
                           "(only the first message may be 'system')")
        if _SEGMENT_SEP in msg["content"] or IMAGE_TAG in msg["content"]:
            raise _Refused(f"conversations[{i}] contains {IMAGE_TAG!r} or a NUL character, which the "
                           "processor reserves (refer to images as <image> or by name)")
        messages.append({"role": msg["role"], "content": msg["content"]})
    system = messages.pop(0)["content"] if messages[0]["role"] == "system" else ""
    if not messages or messages[0]["role"] != "user":
        raise _Refused("the first message (after an optional system message) must be from the user")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Refused("no assistant turn: the sample has nothing to train on")
    return system, messages


def _image_files(data: dict, folder: str) -> dict[str, str]:
    """Image name → file path (relative paths resolved against ``folder``); {} for a text-only sample."""
    image = data.get("image")
    if image is None:
        return {}
    if isinstance(image, str):
        named = {SINGLE_IMAGE: image}
    elif isinstance(image, dict) and image and all(isinstance(k, str) and k and isinstance(v, str)
                                                   for k, v in image.items()):
        named = dict(image)
    else:
        raise _Refused("'image' must be a path or an object of named paths ({\"<image_00>\": path, ...}), "
                       f"got {json.dumps(image)[:80]}")
    files = {}
    for name, file in named.items():
        file = os.path.join(folder, file)
        if not os.path.isfile(file):
            raise _Refused(f"image file not found: {file}" + (f" (image {name})" if len(named) > 1 else ""))
        files[name] = file
    return files


def _tag_images(messages: list[dict[str, str]], files: dict[str, str]) -> list[str]:
    """Replaces image references in ``messages`` by :data:`IMAGE_TAG` (in place); the files in tag order."""
    names = sorted(files, key=len, reverse=True)
    pattern = re.compile("|".join([re.escape(n) for n in names] + [re.escape(SINGLE_IMAGE), _NAMED_IMAGE]))
    order: list[str] = []
    for i, msg in enumerate(messages):
        found = pattern.findall(msg["content"])
        if not found:
            continue
        unknown = [n for n in found if n not in files]
        if unknown:
            raise _Refused(f"conversations mention {unknown[0]} but the sample has no image of that name "
                           f"(images: {sorted(files) or 'none'})")
        if msg["role"] != "user":
            raise _Refused(f"an assistant message refers to image {found[0]}: images belong in user messages")
        order.extend(found)
        msg["content"] = pattern.sub(IMAGE_TAG, msg["content"])
    if list(files) == [SINGLE_IMAGE] and not order:  # the reference's default place for a single image
        messages[0]["content"] = IMAGE_TAG + "\n" + messages[0]["content"]
        order = [SINGLE_IMAGE]
    for name in files:
        if order.count(name) != 1:
            raise _Refused(f"image {name} is referred to {order.count(name)} times in the user text; "
                           "each image must be referred to exactly once")
    return [files[name] for name in order]


def _target_spans(system: str, messages: list[dict[str, str]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its targets (assistant text + ``<|im_end|>``).

    Each assistant turn must follow exactly the inference prompt of the turns before it.
    """
    rendered = ([{"role": "system", "content": system}] if system else []) + messages
    full = tokenizer.apply_chat_template(rendered, add_generation_prompt=False)
    im_end = tokenizer.id_to_token(tokenizer.im_end_id)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt, _ = conversation_prompt(messages[:i], None, tokenizer, system)
        target = msg["content"] + im_end
        if not (full.startswith(prompt) and full.startswith(target, len(prompt))):
            raise _Refused(f"the chat template does not render assistant turn {i} as the inference prompt "
                           f"followed by the answer and {im_end}")
        spans.append((len(prompt), len(prompt) + len(target)))
    return full, spans


def encode_sample(raw: RawSample, processor: MiniCPMVProcessor, config: DataConfig) -> EncodedSample:
    """Validates and tokenises one sample (see the module docstring).

    Raises:
      SampleError: the sample cannot be used; ``bad`` holds its BadSample.
    """
    try:
        if raw.error is not None:
            raise _Refused(raw.error)
        system, messages = _messages(raw.data)
        files = _image_files(raw.data, os.path.dirname(os.path.abspath(raw.source)))
        images = _tag_images(messages, files)
        full, spans = _target_spans(system, messages, processor.tokenizer)
        cuts = [0, *[c for span in spans for c in span], len(full)]
        segments = [full[a:b] for a, b in zip(cuts, cuts[1:])]  # context, target, context, …, context
        expanded, sizes, pieces = _expand_tags(_SEGMENT_SEP.join(segments), images, processor, config)
        segments = expanded.split(_SEGMENT_SEP)
        tokens = processor.tokenizer.encode_batch(segments)
        ids = np.asarray([t for seg in tokens for t in seg], np.int32)
        loss_mask = np.concatenate([np.full(len(seg), k % 2 == 1) for k, seg in enumerate(tokens)]).astype(bool)
        if len(ids) > config.max_length:
            raise _Refused(f"{len(ids)} tokens, more than max_length={config.max_length} (refused rather than "
                           "truncated: truncation would cut the answer)")
        bounds = image_bounds(ids, processor.tokenizer)
        if len(bounds) != pieces:
            raise _Refused(f"{len(bounds)} image placeholder spans for {pieces} image pieces: the text contains "
                           "image placeholder tokens of its own (<image>, <slice>, …)")
    except _Refused as e:
        reason = str(e)
    except (ValueError, OSError) as e:  # ImageError, the processor's and the chat template's refusals
        reason = f"{type(e).__name__}: {e}"
    else:
        return EncodedSample(raw.sample_id, ids, loss_mask, bounds, tuple(images), tuple(sizes))
    bad = BadSample(raw.sample_id, raw.location, reason)
    raise SampleError(str(bad), [bad])


def _expand_tags(text: str, files: Sequence[str], processor: MiniCPMVProcessor,
                 config: DataConfig) -> tuple[str, list[tuple[int, int]], int]:
    """Replaces the k-th image tag of ``text`` by the k-th image's placeholder, as the processor does, from the
    image's size alone: each file is decoded (a truncated or corrupt one fails here) but not resized — pixels
    are made per batch. Returns (text, (W, H) per image, number of pieces)."""
    max_slice_nums, use_image_id = config.slicing(processor)
    cfg = processor.config
    parts = text.split(IMAGE_TAG)
    if len(parts) - 1 != len(files):
        raise _Refused(f"{len(parts) - 1} image tags for {len(files)} images")
    out, sizes, pieces = [parts[0]], [], 0
    for k, file in enumerate(files):
        width, height = load_image(file).size
        plan = slicing.plan_slices(width, height, max_slice_nums if cfg.slice_mode else 1, cfg.scale_resolution,
                                   cfg.patch_size)
        out += [slicing.image_placeholder(k, plan.grid, use_image_id, cfg.image_feature_size), parts[k + 1]]
        sizes.append((width, height))
        pieces += plan.num_pieces
    return "".join(out), sizes, pieces


def encode_samples(raw: Sequence[RawSample], processor: MiniCPMVProcessor, config: DataConfig,
                   source: str = "fine-tuning data", workers: int = 1) -> tuple[list[EncodedSample], list[BadSample]]:
    """:func:`encode_sample` for every sample, on ``workers`` threads, then ``config.on_bad``: bad samples are
    skipped with one :class:`SkippedSamplesWarning` naming them, or refused with one :class:`SampleError`.

    Returns:
      (the good samples in file order, the bad ones).

    Raises:
      SampleError: bad samples with ``on_bad="error"`` (all of them listed), or no usable sample.
    """
    def encode(sample: RawSample) -> EncodedSample | BadSample:
        try:
            return encode_sample(sample, processor, config)
        except SampleError as e:
            return e.bad[0]

    results = parallel_map(encode, raw, workers)
    samples = [r for r in results if isinstance(r, EncodedSample)]
    bad = [r for r in results if isinstance(r, BadSample)]
    if bad and config.on_bad == "error":
        raise SampleError(_report(bad, len(raw), source), bad, skippable=bool(samples))
    if not samples:
        raise SampleError(f"{source}: no usable sample" + (f"\n{_report(bad, len(raw), source)}" if bad else ""), bad)
    if bad:
        warnings.warn(SkippedSamplesWarning(_report(bad, len(raw), source), bad), stacklevel=4)
    return samples, bad


def check_workers(workers: int | None) -> int:
    """``workers`` checked; None: one per CPU, at most 8."""
    if workers is None:
        return min(8, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    return workers


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(x) for x in items]``, on ``workers`` threads when there is more than one item (PIL and the
    tokenizer release the GIL)."""
    if workers == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(items))) as pool:
        return list(pool.map(fn, items))


def _report(bad: Sequence[BadSample], total: int, source: str) -> str:
    listed = "\n".join(f"  {b}" for b in bad[:_MAX_LISTED])
    more = f"\n  … and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return f"{source}: {len(bad)} of {total} samples are bad:\n{listed}{more}"
