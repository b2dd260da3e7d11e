"""What to train and how: :class:`TrainConfig`, :class:`LoRAConfig` and the path patterns they use.

Parameters and modules are named by their NNX path joined with ``/``, e.g. ``llm/layers/3/attn/q/kernel``
(module: ``llm/layers/3/attn/q``). Choices that depend on a path (which modules get LoRA adapters, which
parameters decay) are ordered regex rules, big_vision style, evaluated by :func:`first_match`: the first
pattern that *fully* matches decides, a pattern written ``"!regex"`` says "no", and a path that no pattern
matches gets "no". So ``("!llm/layers/0/.*", r"llm/layers/\\d+/attn/(q|k|v|o)")`` targets every layer's
attention projections except layer 0's.

Both configs are frozen dataclasses that round-trip through JSON (:meth:`TrainConfig.to_dict` /
:meth:`TrainConfig.from_dict`): checkpoints record them, and a resumed run is checked against them.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping, Sequence

__all__ = ["LoRAConfig", "TrainConfig", "first_match", "path_name", "DEFAULT_LORA_TARGETS", "DEFAULT_DECAY",
           "DEFAULT_LOSS_CHUNK", "COMPUTE_DTYPES"]

#: LoRA targets by default: the language model's attention projections q, k, v and o in every layer.
DEFAULT_LORA_TARGETS: tuple[str, ...] = (r"llm/layers/\d+/attn/(q|k|v|o)",)

#: Weight decay by default (as Hugging Face's Trainer): every parameter except biases and norm weights.
DEFAULT_DECAY: tuple[str, ...] = (r"!(.*/)?bias", r"!(.*/)?(\w*norm|ln\w*|post_ln)/(weight|scale|bias)", r".*")

#: Sequence positions per chunk of the chunked loss by default (``TrainConfig.loss_chunk``): with the
#: 151 666-word vocabulary a chunk's float32 logits take 0.31 GB per row, the whole sequence's 0.62 GB per
#: 1024 tokens (and the backward holds them); sequences up to 512 tokens are not chunked at all.
DEFAULT_LOSS_CHUNK = 512

#: Computation dtypes a config may name.
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")


def path_name(path: Sequence[str | int]) -> str:
    """An NNX path as the pattern rules see it: ``("llm", "layers", 0, "attn", "q")`` → ``llm/layers/0/attn/q``."""
    return "/".join(str(p) for p in path)


@functools.lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> tuple[tuple[re.Pattern, bool], ...]:
    out = []
    for pattern in patterns:
        negated = pattern.startswith("!")
        out.append((re.compile(pattern[1:] if negated else pattern), not negated))
    return tuple(out)


def first_match(patterns: Sequence[str], name: str) -> bool:
    """Whether ``name`` is selected by ordered ``patterns`` (the first full match decides; ``"!re"`` = no)."""
    for regex, selected in _compiled(tuple(patterns)):
        if regex.fullmatch(name):
            return selected
    return False


def _check_patterns(patterns: Any, where: str) -> tuple[str, ...]:
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{where}: expected a tuple of regex strings, got {patterns!r}")
    patterns = tuple(patterns)
    for p in patterns:
        try:
            re.compile(p[1:] if p.startswith("!") else p)
        except re.error as e:
            raise ValueError(f"{where}: pattern {p!r} is not a valid regex ({e})") from None
    return patterns


def _require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters ``y = base(x) + (alpha / rank) · B(A(dropout(x)))`` on the targeted projections.

    Attributes:
      rank: r, the adapters' inner width.
      alpha: the scale numerator (PEFT's ``lora_alpha``); the branch is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input during training (0 disables it).
      target_modules: ordered patterns over module paths (see the module doc); every matching
        ``layers.Einsum`` gets an adapter. Default: the LLM's q/k/v/o in every layer.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def __post_init__(self):
        _require(isinstance(self.rank, int) and self.rank >= 1, "LoRAConfig.rank", f"must be ≥ 1, got {self.rank!r}")
        _require(self.alpha > 0, "LoRAConfig.alpha", f"must be > 0, got {self.alpha!r}")
        _require(0.0 <= self.dropout < 1.0, "LoRAConfig.dropout", f"must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", _check_patterns(self.target_modules, "LoRAConfig.target_modules"))

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: optimizer, schedule, what is trained, precision.

    Attributes:
      learning_rate: peak learning rate, reached after ``warmup_steps`` (linear from 0), then a cosine
        decay to ``end_learning_rate`` at ``total_steps``.
      warmup_steps, total_steps, end_learning_rate: the schedule (in optimizer steps).
      weight_decay: AdamW's decoupled weight decay, applied to the parameters that ``decay`` selects.
      decay: ordered patterns over parameter paths (default: all but biases and norm weights).
      adam_b1, adam_b2, adam_eps: AdamW's moments and epsilon.
      max_grad_norm: clip the gradient to this global norm (None: no clipping).
      grad_accum_steps: micro-batches per optimizer step; the loss is normalised by the target tokens
        of all of them together, so 2 micro-batches of B rows give the step of one batch of 2B rows.
      seed: the dropout key (with the step number and micro-batch index folded in) and LoRA's A init.
      lora: adapters on the targeted projections (only they are trained in the LLM), or None for full
        fine-tuning of the language model.
      train_vision, train_resampler: also train the vision encoder / the resampler (fully, LoRA or not).
      remat: rematerialise every decoder layer in the backward pass (memory ≈ one residual per layer).
      compute_dtype: the dtype of the matrix products; trained parameters and the optimizer state are
        float32 ("master" weights), frozen ones stay as loaded.
      loss_chunk: compute ``lm_head`` and the cross-entropy over chunks of this many sequence positions,
        recomputing each chunk's logits in the backward (:func:`~minicpmv_jax.finetune.loss.hidden_loss_sums`),
        so no ``[B, T, V]`` float32 logits are kept; None: the whole sequence at once. Sequences no longer
        than a chunk are computed at once either way. Same loss and gradients up to float32 rounding;
        costs one more ``lm_head`` product per token (~2 % of a Qwen2-7B step) when it chunks.
    """

    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    end_learning_rate: float = 0.0
    weight_decay: float = 0.0
    decay: tuple[str, ...] = DEFAULT_DECAY
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accum_steps: int = 1
    seed: int = 0
    lora: LoRAConfig | None = None
    train_vision: bool = False
    train_resampler: bool = True
    remat: bool = True
    compute_dtype: str = "bfloat16"
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK

    def __post_init__(self):
        _require(self.learning_rate > 0, "TrainConfig.learning_rate", f"must be > 0, got {self.learning_rate!r}")
        _require(isinstance(self.total_steps, int) and self.total_steps >= 1, "TrainConfig.total_steps",
                 f"must be an integer ≥ 1, got {self.total_steps!r}")
        _require(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.total_steps,
                 "TrainConfig.warmup_steps",
                 f"must be in [0, total_steps={self.total_steps}], got {self.warmup_steps!r}")
        _require(0 <= self.end_learning_rate <= self.learning_rate, "TrainConfig.end_learning_rate",
                 f"must be in [0, learning_rate], got {self.end_learning_rate!r}")
        _require(self.weight_decay >= 0, "TrainConfig.weight_decay", f"must be ≥ 0, got {self.weight_decay!r}")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "TrainConfig.max_grad_norm",
                 f"must be > 0 or None, got {self.max_grad_norm!r}")
        _require(isinstance(self.grad_accum_steps, int) and self.grad_accum_steps >= 1, "TrainConfig.grad_accum_steps",
                 f"must be an integer ≥ 1, got {self.grad_accum_steps!r}")
        _require(self.compute_dtype in COMPUTE_DTYPES, "TrainConfig.compute_dtype",
                 f"must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        _require(self.lora is None or isinstance(self.lora, LoRAConfig), "TrainConfig.lora",
                 f"must be a LoRAConfig or None, got {type(self.lora).__name__}")
        _require(self.loss_chunk is None or (isinstance(self.loss_chunk, int) and not isinstance(self.loss_chunk, bool)
                                             and self.loss_chunk >= 1), "TrainConfig.loss_chunk",
                 f"must be an integer ≥ 1 or None, got {self.loss_chunk!r}")
        object.__setattr__(self, "decay", _check_patterns(self.decay, "TrainConfig.decay"))

    def to_dict(self) -> dict:
        """A JSON-ready dict (``lora`` nested, pattern tuples as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; an unknown key is an error that names it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key {unknown[0]!r} (known: {sorted(known)})")
        d = dict(d)
        if d.get("lora") is not None and not isinstance(d["lora"], LoRAConfig):
            lora = dict(d["lora"])
            lora_known = {f.name for f in dataclasses.fields(LoRAConfig)}
            bad = sorted(set(lora) - lora_known)
            if bad:
                raise ValueError(f"TrainConfig.lora: unknown key {bad[0]!r} (known: {sorted(lora_known)})")
            if "target_modules" in lora:
                lora["target_modules"] = tuple(lora["target_modules"])
            d["lora"] = LoRAConfig(**lora)
        if "decay" in d:
            d["decay"] = tuple(d["decay"])
        return cls(**d)
