"""Checkpoints of a fine-tuning run: the whole train state with Orbax's ``CheckpointManager``, and resume.

A run's folder holds one subfolder per saved step (``<dir>/<step>/``) with two items:

* ``state`` — the :class:`~minicpmv_jax.finetune.train_state.TrainState` as one Orbax PyTree: step,
  trainable parameters (float32; with LoRA only the adapters, plus the vision / resampler towers when
  trained), the optimizer state and the RNG key. The frozen base is *not* saved: it is the model the run
  started from, recorded in the metadata.
* ``metadata`` — JSON: format and version, the base model's path, the :class:`TrainConfig`, the LoRA
  targets, ``quantization`` (the base's weight-only quantization, ``QuantizationConfig.to_json()``, or
  null: the frozen base of a QLoRA run is the model loaded with that ``quantize=``, and is not saved either),
  and ``data``: whatever the loop needs to continue its input where it stopped (epoch, batch index, ...),
  passed to :meth:`TrainCheckpointer.save`.

Restoring (:meth:`TrainCheckpointer.restore`) reads each array straight into its sharding from
:meth:`Trainer.abstract_state` (every device its own shards), after checking that the saved run trained
the same parameters as the trainer does, over a base quantized the same way. Resuming at step k and running step k + 1 gives the same loss
and parameters as a run that never stopped: the state is complete, the dropout key of a step depends
only on (seed, step), and the data position comes back from the metadata.

Saves are asynchronous (the arrays are copied to host memory before :meth:`save` returns, so the next
step may donate them); :meth:`wait` / :meth:`close` finish them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.hub import resolve_model
from minicpmv_jax.quantization import QuantizationConfig

from .config import TrainConfig
from .train_state import TrainState, quantize_setting

__all__ = ["TrainCheckpointer", "stored_quantization", "FORMAT", "FORMAT_VERSION"]

FORMAT = "minicpmv-jax/train-state"
FORMAT_VERSION = 1

# TrainConfig fields that decide which parameters a state holds: a resume must agree on them.
_STATE_FIELDS = ("lora", "train_vision", "train_resampler")


def _host_int(x) -> int:
    """A replicated scalar as a Python int (reads this process's copy: works on multi-host meshes)."""
    if isinstance(x, jax.Array):
        x = x.addressable_data(0)
    return int(np.asarray(x))


def stored_quantization(meta: Mapping[str, Any]) -> QuantizationConfig | None:
    """The base model's quantization a checkpoint's metadata records (None: float; checkpoints written
    before QLoRA have no record and were float)."""
    record = meta.get("quantization")
    return None if record is None else QuantizationConfig.from_json(record, where="train-state metadata: quantization")


def _as_tree(state: TrainState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(TrainState)}


class TrainCheckpointer:
    """Saves and restores the train state of one run (see the module docstring).

    Args:
      directory: the run's checkpoint folder (created if missing).
      config: the run's :class:`TrainConfig` (recorded; checked on restore).
      base_model: what the model was loaded from, as for ``from_pretrained`` (its folder is recorded: a LoRA
        checkpoint needs it).
      lora_targets: the modules that have adapters (``Trainer.lora_targets``; recorded).
      quantization: the base model's weight-only quantization (``Trainer.quantization``; recorded, and a
        restore onto a trainer whose base is quantized otherwise is refused).
      save_every: :meth:`save` writes only every ``save_every`` steps, unless ``force``.
      max_to_keep: how many of the latest checkpoints stay (None: all).
      info: extra JSON-able metadata to record (e.g. the data config).
    """

    def __init__(self, directory: str | os.PathLike, config: TrainConfig, *,
                 base_model: str | os.PathLike | None = None, lora_targets: Sequence[str] = (),
                 quantization: QuantizationConfig | None = None, save_every: int = 1000, max_to_keep: int | None = 3, info: Mapping[str, Any] | None = None):
        if save_every < 1:
            raise ValueError(f"save_every must be ≥ 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.config = config
        self.base_model = None if base_model is None else os.path.abspath(resolve_model(base_model))
        self.lora_targets = list(lora_targets)
        self.quantization = quantization
        self.info = dict(info or {})
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "metadata"))

    # ------------------------------------------------------------------ saving

    def save(self, state: TrainState, *, data: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves ``state`` if its step is a multiple of ``save_every`` (or ``force``, e.g. at the end).

        ``data``: JSON-able position of the input (e.g. ``{"epoch": 1, "batch": 17}``) to resume from.
        Returns whether a checkpoint was started.
        """
        step = _host_int(state.step)
        if not force and step % self.save_every:
            return False
        metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "base_model": self.base_model,
                    "train_config": self.config.to_dict(), "lora_targets": self.lora_targets,
                    "quantization": None if self.quantization is None else self.quantization.to_json(),
                    "data": dict(data or {}), "info": self.info}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)), metadata=ocp.args.JsonSave(metadata))
        return self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until pending saves are written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def steps(self) -> list[int]:
        """Saved steps, oldest first."""
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the latest), checked for our format."""
        step = self._step(step)
        meta = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
        expected = {"format": FORMAT, "format_version": FORMAT_VERSION}
        found = {k: meta.get(k) for k in expected} if isinstance(meta, dict) else None
        if found != expected:
            raise ValueError(f"{os.path.join(self.directory, str(step))}: not a train-state checkpoint this build "
                             f"reads (metadata says {found}, expected {expected})")
        return meta

    def stored_params(self, step: int | None = None) -> list[tuple[str, ...]]:
        """Key paths of the parameters that ``step``'s checkpoint holds (read from its metadata only)."""
        step = self._step(step)
        item = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state")).item_metadata
        return sorted(key for key, _ in ock.flatten(item["params"]))

    def restore(self, trainer, step: int | None = None) -> tuple[TrainState, dict]:
        """``(state, metadata)`` of ``step`` (default: the latest), restored onto ``trainer``'s shardings.

        Raises ``ValueError`` when the checkpoint trained other parameters than ``trainer`` (its LoRA
        or tower flags differ; the message names the field) or over a base quantized otherwise (the message
        names ``quantize``), and ``FileNotFoundError`` without checkpoints.
        """
        step = self._step(step)
        meta = self.metadata(step)
        saved = TrainConfig.from_dict(meta["train_config"])
        for name in _STATE_FIELDS:
            if getattr(saved, name) != getattr(trainer.config, name):
                raise ValueError(f"{self.directory}/{step}: the checkpoint was trained with TrainConfig.{name}="
                                 f"{getattr(saved, name)!r}, the trainer has {getattr(trainer.config, name)!r}")
        saved_quantization, current = stored_quantization(meta), getattr(trainer, "quantization", None)
        if saved_quantization != current:
            raise ValueError(f"{self.directory}/{step}: the checkpoint was trained over a base model loaded with "
                             f"quantize={quantize_setting(saved_quantization)!r}, the trainer's model was loaded "
                             f"with quantize={quantize_setting(current)!r}: load the base as the run did")
        target = _as_tree(trainer.abstract_state())
        restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        trainer.drop_initial_params()
        return TrainState(**restored["state"]), meta

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        elif step not in self.steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step} (saved: {self.steps()})")
        return step
