"""Pieces the CPU benchmarks share: the Qwen2-0.5B-shaped model they measure, and the process's own
memory counters (Linux ``/proc/self``). Imports no JAX, so a script can import it before choosing its
platform or spawning workers."""

from __future__ import annotations

import dataclasses


def qwen2_05b(layers: int):
    """tiny()'s vision tower with a Qwen2-0.5B-shaped language model of ``layers`` layers (hidden 896,
    14/2 heads, MLP 4864, vocabulary 151 936)."""
    from minicpmv_jax.config import tiny

    cfg = tiny()
    llm = dataclasses.replace(cfg.llm, hidden_size=896, num_hidden_layers=layers, num_attention_heads=14,
                              num_key_value_heads=2, intermediate_size=4864, vocab_size=151936)
    return dataclasses.replace(cfg, llm=llm, resampler=dataclasses.replace(cfg.resampler, embed_dim=896))


def status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``: the peak since start or reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
