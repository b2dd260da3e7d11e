"""Fine-tuning MiniCPM-V 2.6 in JAX: data, LoRA, the sharded train step, checkpoints and export.

The public API, importable from here (each name lives in one module of this package, imported on first
use: ``import minicpmv_jax.finetune`` alone does not load Orbax)::

    from minicpmv_jax import MiniCPMV, MiniCPMVProcessor
    from minicpmv_jax.finetune import DataConfig, FinetuneDataset, LoRAConfig, LoopConfig, TrainConfig, fit

    model = MiniCPMV.from_pretrained(path, dtype="bfloat16")
    data = FinetuneDataset.from_file("train.json", MiniCPMVProcessor.from_pretrained(path),
                                     DataConfig(max_length=2048, batch_size=4))
    result = fit(model, data, TrainConfig(lora=LoRAConfig(rank=16), total_steps=1000), "run/",
                 base_model=path, loop=LoopConfig(save_every=200))

* data (:mod:`.data`, :mod:`.batching`): :class:`DataConfig`, :func:`load_samples`, :class:`FinetuneDataset`,
  :class:`SampleError`, :class:`SkippedSamplesWarning`, :class:`BadSample`;
* what to train (:mod:`.config`, :mod:`.lora`): :class:`TrainConfig`, :class:`LoRAConfig`, :func:`apply_lora`,
  :func:`merge_lora`;
* the compiled steps (:mod:`.train_step`, :mod:`.train_state`, :mod:`.device_batch`): :class:`Trainer`,
  :class:`TrainState`, :class:`TrainBatch`, :func:`describe_trainable`;
* checkpoints and export (:mod:`.checkpoint`, :mod:`.export`): :class:`TrainCheckpointer`, :func:`export_model`;
* the loop (:mod:`.trainer`; ``minicpmv-jax finetune`` wraps it): :func:`fit`, :class:`LoopConfig`,
  :class:`FitResult`, :func:`evaluate`, :func:`read_log`, and its errors :class:`OutputExistsError`,
  :class:`SettingChangedError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from minicpmv_jax.lazy_exports import lazy_exports

# Public name → the module of this package that defines it.
_EXPORTS = {
    "DataConfig": "data", "SampleError": "data", "SkippedSamplesWarning": "data", "BadSample": "data",
    "load_samples": "data",
    "FinetuneDataset": "batching",
    "TrainConfig": "config", "LoRAConfig": "config",
    "apply_lora": "lora", "merge_lora": "lora",
    "Trainer": "train_step",
    "TrainState": "train_state", "describe_trainable": "train_state",
    "TrainBatch": "device_batch",
    "TrainCheckpointer": "checkpoint",
    "export_model": "export",
    "fit": "trainer", "LoopConfig": "trainer", "FitResult": "trainer", "evaluate": "trainer", "read_log": "trainer",
    "OutputExistsError": "trainer", "SettingChangedError": "trainer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from .batching import FinetuneDataset
    from .checkpoint import TrainCheckpointer
    from .config import LoRAConfig, TrainConfig
    from .data import BadSample, DataConfig, SampleError, SkippedSamplesWarning, load_samples
    from .device_batch import TrainBatch
    from .export import export_model
    from .lora import apply_lora, merge_lora
    from .train_state import TrainState, describe_trainable
    from .train_step import Trainer
    from .trainer import FitResult, LoopConfig, OutputExistsError, SettingChangedError, evaluate, fit, read_log


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
