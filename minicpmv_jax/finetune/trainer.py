"""The fine-tuning loop: :func:`fit` trains a model on a :class:`FinetuneDataset`, logs, evaluates,
checkpoints, resumes and exports. ``minicpmv-jax finetune`` is a thin command line around it.

A run owns one output folder::

    OUTPUT/
      log.jsonl       one JSON object per logged step (train) and per evaluation (see below)
      checkpoints/    the train state every ``save_every`` steps and at the end (:class:`TrainCheckpointer`)
      model/          the fine-tuned model, LoRA merged, in the converter's format (``MiniCPMV.from_pretrained``)

**Steps.** ``TrainConfig.total_steps`` optimizer steps; step s (1-based) consumes the dataset's global
batches ``(s − 1)·A … s·A − 1`` (``A = grad_accum_steps``) from :meth:`FinetuneDataset.stream`, so the
data order depends only on the data config, never on where a run was interrupted. Batches are read,
their images decoded and packed by a background thread (``prefetch`` steps ahead) while the device runs
the previous step; metrics stay on the device until a log line needs them.

**Log.** A train entry covers the steps since the previous multiple of ``log_every`` (the *window*):
``step``, ``epoch`` (batches consumed / batches per epoch), ``loss`` (mean over the window's target
tokens), ``lr`` and ``grad_norm`` (of the entry's step; the norm before clipping), ``tokens`` (non-padding
input tokens of the window), ``target_tokens``, ``samples``, ``tokens_per_s``, ``samples_per_s`` (wall
time of this process since its previous entry) and ``elapsed`` (training seconds of the run, resumes
included). An eval entry: ``step``, ``eval_loss`` (mean over every target token of the eval set),
``eval_tokens``, ``eval_samples``, ``eval_seconds``, ``elapsed``. Lines go to stdout too.

**Resume** (``resume=True``) restores the latest checkpoint onto the trainer's shardings, drops the log
entries after its step and continues: the same batches, dropout keys and window sums (saved in the
checkpoint's metadata), so the log of a resumed run equals an uninterrupted one's in every field but the
timings. The data and train configs must match the checkpoint's (``total_steps`` may grow: the schedule
then changes; ``loss_chunk``, ``remat`` and ``on_bad`` may change), and so must the samples (their number,
the bad ones skipped, their tokens) and the base model's quantization (``quantize``): an
:class:`~minicpmv_jax.errors.ArgumentError` names the setting that differs, or the data. Ctrl-C saves the
current step before stopping.

**QLoRA.** A model loaded with ``from_pretrained(..., quantize="int8" | "int4")`` trains LoRA adapters over
its frozen integer projections (full fine-tuning of it is refused); its checkpoints record the quantization,
and ``OUTPUT/model`` is a float model: every adapter merged into its dequantized kernel, every other quantized
projection dequantized (the manifest's ``finetune`` entry records ``base_quantization``; it has no
``quantization`` record, so ``from_pretrained`` loads it as a plain float folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from minicpmv_jax import sharding
from minicpmv_jax.errors import ArgumentError

from .batching import FinetuneDataset
from .checkpoint import TrainCheckpointer
from .config import TrainConfig
from .data import DataConfig
from .export import export_model
from .checkpoint import stored_quantization
from .train_state import TrainState, describe_trainable, quantize_setting
from .train_step import Trainer

__all__ = ["LoopConfig", "FitResult", "fit", "evaluate", "read_log", "prefetch", "check_output",
           "OutputExistsError", "SettingChangedError", "LOG_FILE", "CHECKPOINT_DIR", "MODEL_DIR"]

LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
# TrainConfig fields a resumed run may change (every other difference is an error): loss_chunk and remat
# change no result, only memory and speed.
_RESUMABLE_CHANGES = ("total_steps", "loss_chunk", "remat")
# DataConfig fields a resumed run may change: on_bad only decides whether bad samples stop the run (which
# samples are used is compared on its own).
_RESUMABLE_DATA_CHANGES = ("on_bad",)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """How :func:`fit` runs, logs and saves (what is trained is the :class:`TrainConfig`).

    Attributes:
      log_every: write a log entry every this many optimizer steps (and at the last step).
      eval_every: evaluate on the eval dataset every this many steps; None: only after the last step.
      save_every: checkpoint every this many steps (and at the last step).
      max_to_keep: newest checkpoints kept (None: all).
      resume: continue from the latest checkpoint of the output folder; False requires a new or empty folder.
      export: write ``OUTPUT/model`` at the end; ``export_dtype`` casts every parameter (None: as trained,
        i.e. float32 trained and load-dtype frozen parameters).
      progress: show a tqdm progress bar (stderr); verbose: print log entries to stdout.
      prefetch: optimizer steps of batches prepared ahead by the background thread.
    """

    log_every: int = 10
    eval_every: int | None = None
    save_every: int = 500
    max_to_keep: int | None = 3
    resume: bool = False
    export: bool = True
    export_dtype: str | None = None
    progress: bool = True
    verbose: bool = True
    prefetch: int = 2

    def __post_init__(self):
        for name in ("log_every", "save_every", "prefetch") + tuple(
                n for n in ("eval_every", "max_to_keep") if getattr(self, n) is not None):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopConfig.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` leaves: the final ``state`` and its ``trainer`` (``trainer.model(state)`` is the
    tuned model), the ``output`` folder, the step it ``resumed_from`` (None: a fresh run), the whole
    ``log`` (the entries of ``log.jsonl``) and the exported ``model_dir`` (None without export)."""

    state: TrainState
    trainer: Trainer
    output: str
    resumed_from: int | None
    log: list[dict]
    model_dir: str | None


# --------------------------------------------------------------------------- background batches


def prefetch(items: Iterator[Any], size: int) -> Iterator[Any]:
    """``items`` produced by a background thread, at most ``size`` ahead, in order. An exception in the
    producer is raised here; closing the returned generator stops the thread."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as e:  # forwarded to the consumer
            buffer.put((done, e))

    thread = threading.Thread(target=produce, name="finetune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():      # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _counts(micro_batches: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """(non-padding input tokens, real samples) of host micro-batches."""
    tokens = sum(int(np.asarray(b["attention_mask"]).sum()) for b in micro_batches)
    samples = sum(sum(1 for s in b["sample_ids"] if s) for b in micro_batches)
    return tokens, samples


def _step_batches(dataset: FinetuneDataset, trainer: Trainer, first_batch: int, accum: int) -> Iterator[tuple]:
    """``(packed host TrainBatch, tokens, samples)`` per optimizer step, from global batch ``first_batch``."""
    stream = dataset.stream(start_step=first_batch)
    while True:
        micro = [next(stream) for _ in range(accum)]
        yield (trainer.pack(micro), *_counts(micro))


# --------------------------------------------------------------------------- evaluation


def evaluate(trainer: Trainer, state: TrainState, dataset: FinetuneDataset, prefetch_batches: int = 2) -> dict:
    """Mean loss of ``state`` over every target token of ``dataset`` (one epoch in its batch order, no
    dropout): ``{"eval_loss", "eval_tokens", "eval_samples"}``."""
    total, tokens = 0.0, 0
    for batch in prefetch((trainer.pack([b]) for b in dataset.batches(epoch=0)), prefetch_batches):
        out = jax.device_get(trainer.eval_step(state, trainer.put_batch(batch)))
        total += float(out["loss_sum"])
        tokens += int(out["tokens"])
    return {"eval_loss": total / max(tokens, 1), "eval_tokens": tokens, "eval_samples": len(dataset)}


# --------------------------------------------------------------------------- the log


def read_log(output: str | os.PathLike) -> list[dict]:
    """The entries of ``OUTPUT/log.jsonl`` (empty when there is none)."""
    path = os.path.join(os.fspath(output), LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class _RunLog:
    """Appends entries to ``log.jsonl`` (process 0 only) and echoes them; on resume keeps the entries up
    to the restored step."""

    def __init__(self, output: str, keep_until: int, echo: Callable[[str], None] | None):
        self.path = os.path.join(output, LOG_FILE)
        self.echo = echo
        self.primary = jax.process_index() == 0
        if self.primary:
            kept = [e for e in read_log(output) if e.get("step", 0) <= keep_until]
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in kept)
            os.replace(tmp, self.path)

    def write(self, entry: dict, line: str) -> None:
        if not self.primary:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        if self.echo is not None:
            self.echo(line)


class _Window:
    """The metrics of the steps since the last log entry. Step metrics stay on the device until
    :meth:`flush`; the sums are part of a checkpoint so that a resumed run logs the same window."""

    FIELDS = ("loss_sum", "target_tokens", "tokens", "samples", "steps")

    def __init__(self, carried: Mapping[str, Any] | None = None):
        self.pending: list[tuple[dict, int, int]] = []
        self.sums = {k: (carried or {}).get(k, 0) for k in self.FIELDS}
        self.last: dict = {}

    def add(self, metrics: dict, tokens: int, samples: int) -> None:
        self.pending.append((metrics, tokens, samples))

    def flush(self) -> dict:
        """Reads the pending steps' metrics (waits for their steps); returns the sums."""
        for metrics, tokens, samples in jax.device_get(self.pending):
            count = int(metrics["tokens"])
            self.sums["loss_sum"] += float(metrics["loss"]) * count
            self.sums["target_tokens"] += count
            self.sums["tokens"] += tokens
            self.sums["samples"] += samples
            self.sums["steps"] += 1
            self.last = metrics
        self.pending = []
        return dict(self.sums)

    def reset(self) -> None:
        self.sums = {k: 0 for k in self.FIELDS}


# --------------------------------------------------------------------------- fit


class OutputExistsError(ArgumentError, FileExistsError):
    """The output folder cannot hold a new run: it is not a folder, or not empty without ``resume`` (a
    ``FileExistsError`` whose message names the settings ``output`` and ``resume``)."""


def check_output(output: str, resume: bool) -> None:
    """Raises :class:`OutputExistsError` unless ``output`` may hold a new run (absent or empty) or ``resume``
    is set."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise OutputExistsError("{} exists and is not a folder", f"output={output!r}")
    if not resume and os.path.isdir(output) and os.listdir(output):
        raise OutputExistsError("{} exists and is not empty: pass {} to continue its run, or choose a new folder",
                                f"output={output!r}", "resume=True")


class SettingChangedError(ArgumentError):
    """Resuming the checkpoint in ``output`` (of ``step``) with another value of a setting: ``setting``
    (``"DataConfig.batch_size"``, ``"TrainConfig.lora.rank"``) was ``before`` then and is ``now``.

    ``spell(name, value)`` writes a setting into the message, by default as Python does (``batch_size=2``);
    a front end raises the error again with its own spelling (e.g. a command line's argparse dest and value,
    which it then names by the flag).
    """

    def __init__(self, output: str, step: int, setting: str, before: Any, now: Any,
                 spell: Callable[[str, Any], str] = lambda name, value: f"{name}={value!r}") -> None:
        super().__init__("{} holds a checkpoint (step {step}) written with {}; this run has {}: resume with the "
                         "same settings, or start a new run in another folder",
                         spell("output", output), spell(setting, before), spell(setting, now), step=step)
        self.output, self.step, self.setting, self.before, self.now = output, step, setting, before, now


def _data_info(dataset: FinetuneDataset) -> dict:
    """What fixes the batches besides the configs (checked on resume): the number of usable and of bad
    samples, and a digest of every sample's tokens and targets in file order."""
    digest = hashlib.sha256()
    for sample in dataset.samples:
        for part in (np.int64(len(sample)), sample.input_ids, sample.loss_mask):
            digest.update(np.ascontiguousarray(part).tobytes())
    return {"samples": len(dataset), "bad_samples": len(dataset.bad), "digest": digest.hexdigest(),
            "config": json.loads(json.dumps(dataclasses.asdict(dataset.config)))}


def _first_change(name: str, old: Any, new: Any, resumable: Sequence[str] = (), first: Sequence[str] = ()
                  ) -> tuple[str, Any, Any] | None:
    """The first field of the dataclasses ``old`` and ``new`` (named ``name``) that differs, as
    ``(qualified name, old value, new value)``, looking into fields that are dataclasses themselves
    (``TrainConfig.lora.rank``); None when only ``resumable`` fields differ. The fields ``first`` are
    compared before the others (a setting whose change changes the defaults of others)."""
    for field in sorted(dataclasses.fields(old), key=lambda f: f.name not in first):
        before, now = getattr(old, field.name), getattr(new, field.name)
        if before == now or field.name in resumable:
            continue
        qualified = f"{name}.{field.name}"
        if dataclasses.is_dataclass(before) and type(before) is type(now):
            return _first_change(qualified, before, now)
        return qualified, before, now
    return None


def _check_resume(meta: Mapping[str, Any], config: TrainConfig, data_config: DataConfig, info: Mapping[str, Any],
                  output: str, quantization=None) -> None:
    """Refuses to continue the checkpoint of ``meta`` with other settings or other samples: the error names
    the first setting that differs (a DataConfig field first: they decide the batches; then the TrainConfig,
    then the base model's ``quantize``), else the data."""
    saved = meta.get("info", {}).get("data", {})
    step = meta["step"]
    change = (_first_change("DataConfig", DataConfig(**saved["config"]), data_config, _RESUMABLE_DATA_CHANGES)
              or _first_change("TrainConfig", TrainConfig.from_dict(meta["train_config"]), config,
                               _RESUMABLE_CHANGES, first=("lora",)))
    if change is None and stored_quantization(meta) != quantization:
        change = ("quantize", quantize_setting(stored_quantization(meta)), quantize_setting(quantization))
    if change is not None:
        raise SettingChangedError(output, step, *change)
    current = info["data"]
    details = {"samples": f"{saved.get('samples')} usable samples then, {current['samples']} now",
               "bad_samples": f"{saved.get('bad_samples')} bad samples skipped then, {current['bad_samples']} now",
               "digest": "as many samples, but other tokens"}
    for key, detail in details.items():
        if key in saved and saved[key] != current[key]:     # (checkpoints of earlier versions lack the digest)
            raise ArgumentError("{} holds a checkpoint (step {step}) trained on other data than this run's {} "
                                "({detail}): the batches would not continue; resume with the same data, or start a "
                                "new run in another folder", f"output={output!r}", "dataset", step=step, detail=detail)


def _format(entry: dict, total: int) -> str:
    if "eval_loss" in entry:
        return (f"step {entry['step']}/{total}  eval_loss {entry['eval_loss']:.4f}  "
                f"({entry['eval_samples']} samples, {entry['eval_seconds']:.1f} s)")
    return (f"step {entry['step']}/{total}  loss {entry['loss']:.4f}  lr {entry['lr']:.3g}  grad_norm "
            f"{entry['grad_norm']:.3g}  tokens/s {entry['tokens_per_s']:.1f}  samples/s "
            f"{entry['samples_per_s']:.2f}  epoch {entry['epoch']:.2f}  elapsed {entry['elapsed']:.1f} s")


def fit(model, dataset: FinetuneDataset, config: TrainConfig, output: str | os.PathLike, *,
        base_model: str | os.PathLike, eval_dataset: FinetuneDataset | None = None,
        loop: LoopConfig = LoopConfig(), mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules = sharding.TRAINING_RULES) -> FitResult:
    """Fine-tunes ``model`` for ``config.total_steps`` optimizer steps (see the module docstring).

    Args:
      model: a loaded :class:`~minicpmv_jax.model.MiniCPMVModel` (on ``mesh`` when sharded); it becomes the
        trainer's (LoRA adapters are added to it in place). Loaded with ``quantize=`` it is trained with
        LoRA over its quantized projections (QLoRA; ``config.lora`` must be set). Pass it without keeping a reference (e.g.
        ``fit(MiniCPMV.from_pretrained(...), ...)``) so that the load-dtype copies of the trained parameters
        are freed once their float32 masters exist.
      dataset: the training batches (``DataConfig.batch_size`` rows per micro-batch).
      config: what to train; ``grad_accum_steps`` micro-batches per step.
      output: the run's folder (see the module docstring).
      base_model: the folder ``model`` was loaded from (recorded in checkpoints; its tokenizer and config
        files go into the export).
      eval_dataset: held-out samples, evaluated every ``loop.eval_every`` steps and after the last one.
      mesh, rules: as for :class:`Trainer` (default: the model's mesh, ``sharding.TRAINING_RULES``).

    Raises:
      OutputExistsError: ``output`` is not empty and ``loop.resume`` is False (a ``FileExistsError``).
      SettingChangedError: resuming a checkpoint of other settings (it names the field, e.g.
        ``DataConfig.batch_size``, with both values; ``quantize`` for a base quantized otherwise).
      ArgumentError: full fine-tuning (``config.lora=None``) of a quantized model.
      ArgumentError: resuming a checkpoint of other data (the message names the ``dataset``).
    """
    output = os.path.abspath(os.fspath(output))
    check_output(output, loop.resume)
    trainer = Trainer(model, config, mesh=mesh, rules=rules)
    del model               # the trainer's now: unreferenced, its initial trained arrays are freed after init_state
    info = {"data": _data_info(dataset)}
    os.makedirs(output, exist_ok=True)
    ckpt = TrainCheckpointer(os.path.join(output, CHECKPOINT_DIR), config, base_model=base_model,
                             lora_targets=trainer.lora_targets, quantization=trainer.quantization,
                             save_every=loop.save_every,
                             max_to_keep=loop.max_to_keep, info=info)
    echo = (lambda line: tqdm.write(line, file=sys.stdout)) if loop.verbose else None
    try:
        resumed_from, position = None, {}
        if loop.resume and ckpt.latest_step() is not None:
            meta = ckpt.metadata()
            _check_resume(meta, config, dataset.config, info, output, trainer.quantization)
            state, meta = ckpt.restore(trainer)
            resumed_from, position = int(meta["step"]), meta["data"]
        else:
            state = trainer.init_state()
        start = resumed_from or 0
        log = _RunLog(output, start, echo)
        if echo is not None:
            what = f"resuming at step {start}" if resumed_from is not None else "training"
            echo(f"{what}: {describe_trainable(state.params)}; {config.total_steps} steps of "
                 f"{config.grad_accum_steps} × {dataset.config.batch_size} rows; output {output}")
        if start < config.total_steps:
            state = _train(trainer, state, ckpt, log, dataset, eval_dataset, loop, start, position)
        ckpt.wait()
    finally:
        ckpt.close()
    model_dir = None
    if loop.export:
        facts = {"step": int(jax.device_get(state.step)), "train_config": config.to_dict()}
        if trainer.quantization is not None:
            facts["base_quantization"] = trainer.quantization.to_json()
        model_dir = export_model(trainer.model(state), os.path.join(output, MODEL_DIR), base_model=base_model,
                                 dtype=loop.export_dtype, overwrite=True, info=facts)
        if echo is not None:
            echo(f"exported the fine-tuned model (LoRA merged) to {model_dir}")
    return FitResult(state, trainer, output, resumed_from, read_log(output), model_dir)


def _train(trainer: Trainer, state: TrainState, ckpt: TrainCheckpointer, log: _RunLog, dataset: FinetuneDataset,
           eval_dataset: FinetuneDataset | None, loop: LoopConfig, start: int, position: Mapping[str, Any]
           ) -> TrainState:
    """Steps ``start + 1 … total_steps`` with logging, evaluation and checkpoints; returns the last state."""
    config = trainer.config
    total, accum, per_epoch = config.total_steps, config.grad_accum_steps, dataset.steps_per_epoch()
    window = _Window(position.get("window"))
    elapsed0, t0 = float(position.get("elapsed", 0.0)), time.perf_counter()
    rate = {"t": t0, "tokens": 0, "samples": 0}               # this process's throughput since the last entry
    saved_step = start

    def save(step: int, force: bool = False) -> None:
        nonlocal saved_step
        if step == saved_step or not (force or step % loop.save_every == 0):
            return
        data = {"batches": step * accum, "epoch": step * accum // per_epoch, "batch": step * accum % per_epoch,
                "elapsed": elapsed0 + time.perf_counter() - t0, "window": window.flush()}
        ckpt.save(state, data=data, force=True)
        saved_step = step

    def write_train(step: int) -> None:
        sums = window.flush()
        now = time.perf_counter()
        seconds = max(now - rate["t"], 1e-9)
        last = window.last
        entry = {"step": step, "epoch": step * accum / per_epoch,
                 "loss": sums["loss_sum"] / max(sums["target_tokens"], 1),
                 "lr": float(last["learning_rate"]), "grad_norm": float(last["grad_norm"]),
                 "tokens": sums["tokens"], "target_tokens": sums["target_tokens"], "samples": sums["samples"],
                 "steps": sums["steps"], "tokens_per_s": rate["tokens"] / seconds,
                 "samples_per_s": rate["samples"] / seconds, "elapsed": elapsed0 + now - t0}
        log.write(entry, _format(entry, total))
        bar.set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        window.reset()
        rate.update(t=now, tokens=0, samples=0)

    def write_eval(step: int) -> None:
        t = time.perf_counter()
        entry = {"step": step, **evaluate(trainer, state, eval_dataset, loop.prefetch)}
        entry.update(eval_seconds=time.perf_counter() - t, elapsed=elapsed0 + time.perf_counter() - t0)
        log.write(entry, _format(entry, total))
        rate["t"] += entry["eval_seconds"]                     # evaluation is not training throughput

    batches = prefetch(_step_batches(dataset, trainer, start * accum, accum), loop.prefetch)
    bar = tqdm(total=total, initial=start, unit="step", desc="finetune", file=sys.stderr, disable=not loop.progress,
               dynamic_ncols=True)
    done = start                                               # the last step fully accounted for
    try:
        for step in range(start + 1, total + 1):
            batch, tokens, samples = next(batches)
            state, metrics = trainer.train_step(state, trainer.put_batch(batch))
            window.add(metrics, tokens, samples)
            rate["tokens"] += tokens
            rate["samples"] += samples
            done = step
            bar.update(1)
            if step % loop.log_every == 0 or step == total:
                write_train(step)
            if eval_dataset is not None and ((loop.eval_every and step % loop.eval_every == 0) or step == total):
                write_eval(step)
            save(step, force=step == total)
    except KeyboardInterrupt:
        _save_on_interrupt(lambda: done > start and int(jax.device_get(state.step)) == done,
                           lambda: save(done, force=True), ckpt, done)
        raise
    finally:
        batches.close()
        bar.close()
    return state


def _save_on_interrupt(completed: Callable[[], bool], save: Callable[[], None], ckpt: TrainCheckpointer,
                       step: int) -> None:
    """Ctrl-C: checkpoints the last completed step (when its state is intact) so ``--resume`` continues."""
    try:
        if not completed():
            return
        save()
        ckpt.wait()
    except Exception as e:  # e.g. the state was donated to a step that the interrupt cut short
        print(f"\ninterrupted: could not save step {step} ({e})", file=sys.stderr)
        return
    print(f"\ninterrupted: saved step {step} in {ckpt.directory}; continue with --resume", file=sys.stderr)
