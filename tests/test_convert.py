"""``minicpmv-jax convert``: HF folder → converted folder (Orbax parameters), its validation and atomicity.

Round trips compare the converted folder's model with the HF folder's model bit for bit (every parameter
and the logits). The conversions run with tiny row blocks and tiles and a small group budget, so the
streaming paths (several blocks per tensor, ragged tiles, several partial saves) are the ones tested.
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from minicpmv_jax import checkpoint_folder
from minicpmv_jax.convert_weights import ConvertError, _convert, _transpose, convert
from minicpmv_jax import checkpoint_names as names
from minicpmv_jax import config as C
from minicpmv_jax import orbax_checkpoint as ock
from minicpmv_jax.cli import main
from minicpmv_jax.config import ConfigError, MiniCPMVConfig
from minicpmv_jax.hf_checkpoint import CheckpointError
from minicpmv_jax import MiniCPMV
from minicpmv_jax.processor import MiniCPMVProcessor
from minicpmv_jax.testing.checkpoint import write_checkpoint

SMALL = C.tiny(vocab_size=1009, num_layers=2, vision_layers=2)
GROUP = 600_000          # bytes per partial save: several groups for every source dtype

# Source folders: dtype → (num_shards, extra write_checkpoint arguments).
SOURCES = {
    "bfloat16": (3, {}),
    "float16": (1, {"vision_layers": SMALL.num_vision_layers + 1}),   # one more vision layer than runs
    "float32": (2, {"tokenizer": True}),
}


@pytest.fixture(scope="module")
def streaming():
    """Tiny blocks and tiles (with ragged ends) for every conversion in this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_convert, "BLOCK_BYTES", 3000)
        mp.setattr(_transpose, "TILE_ROWS", 7)
        mp.setattr(_transpose, "PACK_ROWS", 12)
        yield


@pytest.fixture(scope="module")
def sources(tmp_path_factory, streaming):
    out = {}
    for dtype, (shards, extra) in SOURCES.items():
        folder = tmp_path_factory.mktemp(f"hf_{dtype}")
        write_checkpoint(folder, SMALL, seed=11, dtype=dtype, num_shards=shards,
                         **{"tokenizer": False, **extra})
        out[dtype] = str(folder)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sources):
    """(source dtype, --dtype) → converted folder, made once."""
    cache = {}

    def get(src_dtype, dtype=None):
        if (src_dtype, dtype) not in cache:
            dst = str(tmp_path_factory.mktemp("conv") / "out")
            with _ignoring_warning(src_dtype):
                convert(sources[src_dtype], dst, dtype=dtype, progress=False, group_bytes=GROUP)
            cache[src_dtype, dtype] = dst
        return cache[src_dtype, dtype]

    return get


def _ignoring_warning(src_dtype):
    """The extra vision layer of a source is reported (and never used)."""
    if SOURCES[src_dtype][1].get("vision_layers"):
        return pytest.warns(UserWarning, match=r"ignoring \d+ tensors .* vpm\.encoder\.layers\.")
    return contextlib.nullcontext()


def _params(model) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model))}


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8)), f"{k} differs"


def _batch():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, SMALL.llm.vocab_size, (2, 13)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False
    ids[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".convert-" in n or n.endswith(".partial_save")]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("src_dtype,dtype,load_dtype", [
    ("bfloat16", None, "bfloat16"),
    ("float16", None, "float16"),
    ("float32", None, "float32"),
    ("float32", "bfloat16", "bfloat16"),     # --dtype casts at conversion
    ("float16", "float32", "float32"),
    ("float32", None, "bfloat16"),           # stored float32, cast while restoring
    ("bfloat16", None, "float32"),
])
def test_round_trip_is_bit_identical(sources, converted, src_dtype, dtype, load_dtype):
    dst = converted(src_dtype, dtype)
    stored = ock.stored_params(dst)
    assert {str(d) for _, d in stored.values()} == {dtype or src_dtype}
    with _ignoring_warning(src_dtype):
        hf = MiniCPMV.from_pretrained(sources[src_dtype], dtype=load_dtype)
    conv = MiniCPMV.from_pretrained(dst, dtype=load_dtype)
    _assert_bit_identical(_params(hf), _params(conv))
    batch = _batch()
    assert np.array_equal(np.asarray(hf.compute_logits(batch)), np.asarray(conv.compute_logits(batch)))


def test_stored_layout_is_ours_and_manifest_describes_it(sources, converted):
    dst = converted("float16")
    stored = ock.stored_params(dst)
    d, n = SMALL.llm.hidden_size, SMALL.llm.num_attention_heads
    assert stored["llm", "layers", "1", "attn", "q", "kernel"] == ((d, n, d // n), np.dtype("float16"))
    assert stored["llm", "lm_head", "kernel"] == ((d, SMALL.llm.vocab_size), np.dtype("float16"))
    assert not any(k[:3] == ("vpm", "layers", str(SMALL.num_vision_layers)) for k in stored)
    manifest = ock.read_manifest(dst)
    assert manifest["dtype"] == {"requested": None, "stored": {"float16": len(stored)}}
    assert manifest["params"]["arrays"] == len(stored) and manifest["params"]["folder"] == "params"
    assert manifest["params"]["parameters"] == C.num_parameters(SMALL)
    assert manifest["ignored_tensors"] and all(t.startswith(f"vpm.encoder.layers.{SMALL.num_vision_layers}.")
                                               for t in manifest["ignored_tensors"])
    src_file = os.path.join(sources["float16"], "model.safetensors")
    assert manifest["source"]["files"] == [{"name": "model.safetensors", "bytes": os.path.getsize(src_file),
                                            "header_sha256": manifest["source"]["files"][0]["header_sha256"]}]
    assert len(manifest["source"]["files"][0]["header_sha256"]) == 64
    assert manifest["tool"]["minicpmv-jax"] and manifest["tool"]["orbax-checkpoint"]
    assert manifest["timing"]["fill_s"] > 0 and manifest["timing"]["wait_for_writes_s"] >= 0


def test_converted_folder_serves_config_tokenizer_and_processor(sources, converted):
    src, dst = sources["float32"], converted("float32", "bfloat16")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "preprocessor_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not [n for n in os.listdir(dst) if n.endswith(".safetensors") or n.endswith(".index.json")]
    assert MiniCPMVConfig.from_pretrained(dst) == MiniCPMVConfig.from_pretrained(src)
    texts = ["<|im_start|>user\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n", "Hi"]
    a, b = (MiniCPMVProcessor.from_pretrained(f)(texts) for f in (src, dst))
    assert np.array_equal(a["input_ids"], b["input_ids"]) and a["input_ids"].shape[1] > 5


def test_restore_passes_target_shardings_through(converted):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    dst = converted("bfloat16")
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    target = NamedSharding(mesh, PartitionSpec(None, "model"))
    abstract = nnx.eval_shape(lambda: MiniCPMV(SMALL, dtype="bfloat16", rngs=nnx.Rngs(0)))
    model = ock.restore_params(dst, abstract, shardings={("llm", "lm_head", "kernel"): target})
    assert model.llm.lm_head.kernel[...].sharding == target
    assert isinstance(model.llm.norm.weight[...].sharding, jax.sharding.SingleDeviceSharding)


class _CopyingTranspose(names.Transform):
    """A transform whose inverse is a copy, not a view: the converter falls back to the forward transform."""

    def __call__(self, x):
        return x.T

    def inverse(self, y):
        return np.ascontiguousarray(y.T)


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
def test_fill_matches_the_tables_forward_transforms(tmp_path, monkeypatch, out_dtype):
    """Block-wise filling through inverse views equals applying each transform to the whole tensor."""
    from safetensors.numpy import save_file
    from minicpmv_jax.convert_weights._source import RowReader
    from minicpmv_jax.hf_checkpoint import HFCheckpoint

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((15, 21)).astype(np.float32),
               "conv": rng.standard_normal((5, 3, 2, 2)).astype(np.float32),
               "b": rng.standard_normal(12).astype(np.float32)}
    save_file(tensors, tmp_path / "model.safetensors")
    entries = [names.Entry(("a",), "w", (15, 21)),
               names.Entry(("b",), "w", (15, 21), names.Transpose()),
               names.Entry(("c",), "w", (15, 21), names.SplitHeadsIn(5)),
               names.Entry(("d",), "w", (15, 21), names.MergeHeadsOut(3)),
               names.Entry(("e",), "w", (15, 21), names.Rows(4, 11, names.Transpose())),
               names.Entry(("f",), "conv", (5, 3, 2, 2), names.ConvToPatchKernel(3, 2)),
               names.Entry(("g",), "b", (12,), names.Rows(4, 8, names.SplitHeadsBias(2))),
               names.Entry(("h",), "w", (15, 21), _CopyingTranspose())]
    monkeypatch.setattr(_convert, "BLOCK_BYTES", 5 * 84)  # 5 rows of 84 bytes per block: ragged packed words
    monkeypatch.setattr(_transpose, "TILE_ROWS", 2)
    monkeypatch.setattr(_transpose, "PACK_ROWS", 4)
    with RowReader(HFCheckpoint.open(tmp_path)) as reader:
        reads, read_into, views, view, released, release = [], reader.read_into, [], reader.rows, [], reader.release
        monkeypatch.setattr(reader, "read_into", lambda name, start, out: (reads.append(out.nbytes),
                                                                           read_into(name, start, out)))
        monkeypatch.setattr(reader, "rows", lambda *a: views.append(a) or view(*a))
        monkeypatch.setattr(reader, "release", lambda *a: released.append(a) or release(*a))
        for job in _convert.plan(entries, reader, None if out_dtype is None else np.dtype(ml_dtypes.bfloat16)):
            got = _convert.fill(job, reader)
            want = np.ascontiguousarray(job.entry.transform(tensors[job.entry.name]).astype(job.dtype))
            assert got.shape == job.entry.shape and got.flags.c_contiguous, job.entry
            assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), job.entry
    assert reads and max(reads) <= 5 * 84                    # never more than one block per read
    assert views and released == views                       # every mapped block is dropped after use
    assert max((stop - start) * (84 if name == "w" else 48 if name == "conv" else 4)
               for name, start, stop in views) <= 5 * 84


@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float16", "float32", "float64"])
def test_packed_transpose_equals_the_plain_assignment(dtype):
    """``assign_rows`` into a transposed view, block by block with ragged edges, equals ``src.T``; the packed
    path is the one taken where the dtypes agree, and casts or other layouts take the plain one."""
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(3)
    for rows, cols in ((37, 11), (64, 5), (8, 8), (3, 7), (41, 1)):
        src = rng.integers(0, 120, (rows, cols)).astype(dtype)
        for step, pack, tile in ((5, 4, 3), (8, 32, 7), (13, 9, 2), (rows, 64, 256)):
            out = np.zeros((cols, rows), dtype)
            for i in range(0, rows, step):
                _transpose.assign_rows(out.T, i, src[i:i + step], tile_rows=tile, pack_rows=pack)
            assert np.array_equal(out.view(np.uint8), np.ascontiguousarray(src.T).view(np.uint8)), (rows, step)
    src, other = src[:0].reshape(0, 11), np.float64 if dtype == np.float32 else np.float32
    assert _transpose._rows_per_word(np.zeros((11, 37), dtype).T, src) == (0 if dtype.itemsize == 8 else 8 // dtype.itemsize)
    assert _transpose._rows_per_word(np.zeros((11, 37), other).T, src) == 0            # a cast
    assert _transpose._rows_per_word(np.zeros((37, 11), dtype), src) == 0              # not a transposed view


def test_ring_wraps_waits_for_sealed_batches_and_protects_the_open_one():
    from minicpmv_jax.convert_weights._ring import ALIGN, Ring, ring_bytes

    assert ring_bytes([100, 10, 10], 1000) == 128 + 64 + 64     # everything fits: never wraps
    assert ring_bytes([3000, 10, 2000, 10], 64) == 3008 + 64   # largest + slack
    ring = Ring(10 * ALIGN)
    waited = []
    a = ring.array((2, ALIGN), np.uint8)                       # [0, 2) lines
    b = ring.array((5, ALIGN), np.uint8)                       # [2, 7)
    a[...], b[...] = 1, 2
    assert not ring.fits(4 * ALIGN)                            # would wrap onto the open batch
    with pytest.raises(RuntimeError, match="open batch"):
        ring.array((4 * ALIGN,), np.uint8)
    ring.seal(lambda: waited.append("ab"))
    c = ring.array((3, ALIGN // 2), np.uint16)                 # [7, 10): nothing sealed in the way
    c[...] = 3
    assert waited == [] and np.all(a == 1) and np.all(b == 2)
    ring.seal(lambda: waited.append("c"))
    d = ring.array((ALIGN,), np.float32)                       # wraps to [0, 4): overlaps a and b only
    assert waited == ["ab"] and d.flags.c_contiguous and d.dtype == np.float32
    assert np.shares_memory(d, a) and not np.shares_memory(d, c)
    ring.seal(lambda: waited.append("d"))
    ring.array((7 * ALIGN,), np.uint8)        # [4, 11) does not fit; [0, 7) overlaps d: waits for c, then d
    assert waited == ["ab", "c", "d"]                          # oldest first: saves end in order
    assert ring.fits(3 * ALIGN) and not ring.fits(4 * ALIGN)
    with pytest.raises(ValueError, match="does not fit a ring"):
        ring.array((11 * ALIGN,), np.uint8)


def test_saved_arrays_are_not_reused_before_their_save_ends(tmp_path, sources, monkeypatch):
    """The ring reuses memory: no array may change between the start of its save and the save's end, and
    the groups keep to the budget. Saves are held back until waited on, so any early reuse shows."""
    real, groups = _convert._write_group, []

    class Deferred:
        def __init__(self, path, tree):
            self.args = path, tree
            self.leaves = [(k, v, v.copy()) for k, v in ock.flatten(tree)]

        def result(self):
            for key, now, then in self.leaves:
                assert np.array_equal(now.view(np.uint8), then.view(np.uint8)), f"{key} reused while saved"
            real(*self.args).result()

    def write(path, tree):
        groups.append(sum(v.nbytes for _, v in ock.flatten(tree)))
        return Deferred(path, tree)

    monkeypatch.setattr(_convert, "_write_group", write)
    waits = []
    monkeypatch.setattr(_convert.Ring, "seal", lambda self, wait, seal=_convert.Ring.seal:
                        seal(self, lambda: (waits.append(1), wait())))
    with _ignoring_warning("float16"):
        convert(sources["float16"], tmp_path / "out", dtype="float32", progress=False, group_bytes=GROUP)
    sizes = [v[0] for v in ock.stored_params(tmp_path / "out").values()]
    largest = max(int(np.prod(s)) * 4 for s in sizes)
    assert len(groups) > 3 and all(g <= max(GROUP, largest) for g in groups)
    assert sum(groups) == sum(int(np.prod(s)) * 4 for s in sizes)
    assert len(waits) >= 2                                    # the ring wrapped and waited for saves
    with _ignoring_warning("float16"):
        hf = MiniCPMV.from_pretrained(sources["float16"], dtype="float32")
    _assert_bit_identical(_params(hf), _params(MiniCPMV.from_pretrained(tmp_path / "out", dtype="float32")))


# --------------------------------------------------------------------------- bad input


def _truncate(folder):
    shard = os.path.join(folder, "model-00003-of-00003.safetensors")
    with open(shard, "rb") as f:
        data = f.read()
    with open(shard, "wb") as f:
        f.write(data[: len(data) * 2 // 3])


def _corrupt_header(folder):
    with open(os.path.join(folder, "model-00002-of-00003.safetensors"), "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)


def _drop_tensor(from_index):
    def drop(folder):
        from safetensors.numpy import load_file, save_file
        file = os.path.join(folder, "model-00001-of-00003.safetensors")
        data = load_file(file)
        del data["llm.model.embed_tokens.weight"]
        save_file(data, file)
        if from_index:
            path = os.path.join(folder, "model.safetensors.index.json")
            with open(path) as f:
                index = json.load(f)
            del index["weight_map"]["llm.model.embed_tokens.weight"]
            with open(path, "w") as f:
                json.dump(index, f)
    return drop


def _set_config(key, value):
    def edit(folder):
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg[key] = value
        with open(path, "w") as f:
            json.dump(cfg, f)
    return edit


def _remove(name):
    return lambda folder: os.remove(os.path.join(folder, name))


@pytest.mark.parametrize("damage,tensors,error", [
    (_truncate, None, r"model-00003-of-00003\.safetensors: (truncated|not a readable safetensors file .*not fully "
                      r"covered)"),
    (_corrupt_header, None, r"model-00002-of-00003\.safetensors: not a readable safetensors file"),
    (_drop_tensor(True), None, r"hf: tensor llm\.model\.embed_tokens\.weight is missing"),
    (_drop_tensor(False), None, r"model-00001-of-00003\.safetensors: tensor llm\.model\.embed_tokens\.weight "
                                r"listed in model\.safetensors\.index\.json is not in the file"),
    (None, {"llm.model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)},
     r"model-0000\d-of-00003\.safetensors: unexpected tensor llm\.model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"),
    (None, {"resampler.proj": np.ones((128, 127), np.float32)},
     r"model-0000\d-of-00003\.safetensors: tensor resampler\.proj has shape \[128, 127\], expected \[128, 128\]"),
    (_remove("model-00002-of-00003.safetensors"), None,
     r"model\.safetensors\.index\.json: points at model-00002-of-00003\.safetensors, which does not exist"),
    (_set_config("intermediate_size", 345), None,
     r"safetensors: tensor llm\.model\.layers\.0\.mlp\.gate_proj\.weight has shape \[344, 128\], "
     r"expected \[345, 128\]"),
    (_set_config("num_key_value_heads", 3), None, r"num_key_value_heads: num_attention_heads=4 is not a multiple"),
    (_remove("model.safetensors.index.json"), None, r"neither model\.safetensors\.index\.json nor"),
])
def test_bad_input_is_one_line_naming_file_and_tensor(tmp_path, capsys, damage, tensors, error):
    src, dst = tmp_path / "hf", tmp_path / "out"
    write_checkpoint(src, SMALL, seed=2, num_shards=3, tokenizer=False, tensors=tensors)
    if damage:
        damage(str(src))
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("minicpmv-jax convert: error: ")
    assert re.search(error, err), err
    assert not dst.exists() and not _leftovers(tmp_path)


def test_bad_input_raises_checkpoint_errors_from_the_api(tmp_path):
    write_checkpoint(tmp_path / "hf", SMALL, seed=2, num_shards=1, tokenizer=False,
                     tensors={"llm.model.norm.weight": np.ones(127, np.float32)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor llm\.model\.norm\.weight has shape"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    _set_config("hidden_act", "gelu")(str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="hidden_act"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_source_truncated_after_validation_is_an_error_not_a_crash(tmp_path):
    """Mapped views check the file still holds their rows (reading past its end would be SIGBUS)."""
    from safetensors.numpy import save_file
    from minicpmv_jax.convert_weights._source import RowReader
    from minicpmv_jax.hf_checkpoint import HFCheckpoint

    save_file({"w": np.arange(40 * 6, dtype=np.float32).reshape(40, 6)}, tmp_path / "model.safetensors")
    with RowReader(HFCheckpoint.open(tmp_path)) as reader:
        assert np.array_equal(reader.rows("w", 3, 5), np.arange(18, 30, dtype=np.float32).reshape(2, 6))
        reader.release("w", 3, 5)
        with open(tmp_path / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 24 * 4)
        assert reader.rows("w", 0, 30).shape == (30, 6)                  # still inside the file
        with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated inside tensor w"):
            reader.rows("w", 30, 40)
        with pytest.raises(CheckpointError, match=r"tensor w: rows 39\.\.41 lie outside its data"):
            reader.rows("w", 39, 41)


# --------------------------------------------------------------------------- atomic output


class _FailedSave:
    """A background save that fails when waited on."""

    def __init__(self, exc):
        self.exc = exc

    def result(self):
        raise self.exc


def _failing_after(calls: int, exc: BaseException, real, background: bool = False):
    """A ``_write_group`` whose saves after the first ``calls`` fail (when started, or in the background)."""
    count = {"n": 0}

    def write(path, tree):
        count["n"] += 1
        if count["n"] > calls:
            if background:
                return _FailedSave(exc)
            raise exc
        return real(path, tree)
    return write, count


@pytest.mark.parametrize("overwrite,background", [(False, False), (True, False), (False, True)])
def test_failure_half_way_leaves_dst_untouched(tmp_path, sources, monkeypatch, overwrite, background):
    dst = tmp_path / "out"
    before = None
    if overwrite:
        convert(sources["bfloat16"], dst, progress=False)
        before = {p: (dst / p).read_bytes() for p in ("convert_manifest.json", "config.json")}
        params_before = _params(MiniCPMV.from_pretrained(dst, dtype="bfloat16"))
    write, count = _failing_after(2, RuntimeError("injected write failure"), _convert._write_group, background)
    monkeypatch.setattr(_convert, "_write_group", write)
    with pytest.raises(RuntimeError, match="injected write failure"):
        convert(sources["bfloat16"], dst, dtype="float32", overwrite=overwrite, progress=False, group_bytes=GROUP)
    assert count["n"] == 3                                # two groups were written, the third failed
    assert not _leftovers(tmp_path)
    if overwrite:
        assert {p: (dst / p).read_bytes() for p in before} == before
        _assert_bit_identical(params_before, _params(MiniCPMV.from_pretrained(dst, dtype="bfloat16")))
    else:
        assert not dst.exists()


def test_disk_error_is_one_line_and_dst_kept(tmp_path, sources, monkeypatch, capsys):
    dst = tmp_path / "out"
    convert(sources["bfloat16"], dst, progress=False)
    manifest = (dst / "convert_manifest.json").read_bytes()
    write, _ = _failing_after(1, OSError(28, "No space left on device"), _convert._write_group)
    monkeypatch.setattr(_convert, "_write_group", write)
    monkeypatch.setattr(_convert, "GROUP_BYTES", GROUP)      # several saves
    assert main(["convert", sources["bfloat16"], str(dst), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in err and "was left as it was" in err
    assert (dst / "convert_manifest.json").read_bytes() == manifest and not _leftovers(tmp_path)


def test_failure_while_copying_files_leaves_nothing(tmp_path, sources, monkeypatch):
    def boom(src, dst):
        raise PermissionError(13, "Permission denied", src)
    monkeypatch.setattr(checkpoint_folder.shutil, "copyfile", boom)
    with pytest.raises(ConvertError, match="Permission denied"):
        convert(sources["bfloat16"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_failed_swap_puts_the_old_checkpoint_back(tmp_path, sources, monkeypatch):
    """With --overwrite DST is renamed aside, the new folder renamed in; if that fails, the old comes back."""
    dst = tmp_path / "out"
    convert(sources["bfloat16"], dst, progress=False)
    manifest = (dst / "convert_manifest.json").read_bytes()
    calls, rename = [], os.rename

    def flaky(a, b):
        if ".convert-" in os.path.basename(a) + os.path.basename(b):     # the converter's own renames
            calls.append((a, b))
            if len(calls) == 2:                                  # the staging folder → DST
                raise OSError(5, "Input/output error")
        rename(a, b)
    monkeypatch.setattr(checkpoint_folder.os, "rename", flaky)
    with pytest.raises(ConvertError, match=r"cannot move the converted folder into place .*Input/output error"):
        convert(sources["bfloat16"], dst, dtype="float32", overwrite=True, progress=False)
    assert len(calls) == 3 and calls[2][1] == str(dst)          # aside, (failed) in, back
    assert (dst / "convert_manifest.json").read_bytes() == manifest and not _leftovers(tmp_path)


def test_existing_destination_rules(tmp_path, sources):
    src, dst = sources["bfloat16"], tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match=r"out: already exists; pass --overwrite"):
        convert(src, dst, progress=False)
    with pytest.raises(ConvertError, match="was not written by minicpmv-jax convert; refusing"):
        convert(src, dst, overwrite=True, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConvertError, match="exists and is not a folder"):
        convert(src, tmp_path / "file", overwrite=True, progress=False)
    with pytest.raises(ConvertError, match="is or contains the source folder"):
        convert(src, src, overwrite=True, progress=False)
    with pytest.raises(ConvertError, match="parent folder .* does not exist"):
        convert(src, tmp_path / "no" / "out", progress=False)
    (dst / "keep.txt").unlink()                                  # an empty folder may be replaced
    convert(src, dst, overwrite=True, progress=False)
    convert(src, dst, dtype="float16", overwrite=True, progress=False)   # and a converted one
    assert ock.read_manifest(dst)["dtype"]["requested"] == "float16"
    assert not _leftovers(tmp_path)


# --------------------------------------------------------------------------- loading a converted folder


def test_converted_folder_that_no_longer_matches_its_config(tmp_path, converted):
    dst = tmp_path / "out"
    shutil.copytree(converted("bfloat16"), dst)
    _set_config("intermediate_size", 345)(str(dst))
    with pytest.raises(CheckpointError, match=r"params: parameter llm/layers/0/mlp/down/kernel has shape "
                                              r"\[344, 128\], .*config\.json implies \[345, 128\]"):
        MiniCPMV.from_pretrained(dst, dtype="bfloat16")
    _set_config("intermediate_size", SMALL.llm.intermediate_size)(str(dst))
    _set_config("num_hidden_layers", 3)(str(dst))
    with pytest.raises(CheckpointError, match=r"params: parameter llm/layers/2/\S+ is missing"):
        MiniCPMV.from_pretrained(dst, dtype="bfloat16")


def test_info_checks_a_converted_folder(tmp_path, converted, capsys):
    from minicpmv_jax import cli

    assert cli.main(["info", "--model", converted("bfloat16")]) == 0
    out = capsys.readouterr().out
    assert "converted (Orbax)" in out and "bfloat16" in out and ": OK" in out
    dst = tmp_path / "out"
    shutil.copytree(converted("bfloat16"), dst)
    _set_config("intermediate_size", 345)(str(dst))
    assert cli.main(["info", "--model", str(dst)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llm/layers/0/mlp/down/kernel" in err and "345" in err


def test_manifest_of_another_format_version_is_refused(tmp_path, converted):
    dst = tmp_path / "out"
    shutil.copytree(converted("bfloat16"), dst)
    manifest = json.loads((dst / ock.MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (dst / ock.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"convert_manifest\.json: format_version 99"):
        MiniCPMV.from_pretrained(dst)
    shutil.rmtree(dst / "params")
    manifest["format_version"] = ock.FORMAT_VERSION
    (dst / ock.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"params: no such folder"):
        MiniCPMV.from_pretrained(dst)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        MiniCPMV.from_pretrained(dst, mesh=object())


# --------------------------------------------------------------------------- the Hub


def test_hub_id_without_huggingface_hub_says_install_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ConvertError, match=r"openbmb/MiniCPM-V-2_6: no such folder; .* install the `hub` extra"):
        convert("openbmb/MiniCPM-V-2_6", tmp_path / "out", progress=False)
    with pytest.raises(ConvertError, match=r"\./nope: no such folder$"):
        convert("./nope", tmp_path / "out", progress=False)


def test_hub_download_failure_and_success(tmp_path, sources, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kw):
        raise LocalEntryNotFoundError("cannot reach huggingface.co and the files are not cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConvertError, match=r"openbmb/MiniCPM-V-2_6: .*downloading it from the Hugging Face Hub "
                                           r"failed \(LocalEntryNotFoundError"):
        convert("openbmb/MiniCPM-V-2_6", tmp_path / "out", progress=False)
    calls = []

    def cached(**kw):
        calls.append(kw)
        return sources["bfloat16"]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    convert("openbmb/MiniCPM-V-2_6", tmp_path / "out", progress=False)
    assert calls[0]["repo_id"] == "openbmb/MiniCPM-V-2_6" and "*.safetensors" in calls[0]["allow_patterns"]
    assert ock.read_manifest(tmp_path / "out")["source"]["location"] == "openbmb/MiniCPM-V-2_6"


# --------------------------------------------------------------------------- the console script


def test_console_script_converts(tmp_path, sources):
    exe = shutil.which("minicpmv-jax", path=os.path.dirname(sys.executable)) or shutil.which("minicpmv-jax")
    assert exe, "the minicpmv-jax console script is not installed"
    out = subprocess.run([exe, "convert", sources["bfloat16"], str(tmp_path / "out"), "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "converted" in out.stdout
    assert ock.read_manifest(tmp_path / "out")["dtype"]["stored"] == {"float32": len(ock.stored_params(
        tmp_path / "out"))}


def test_relative_paths_convert_load_and_info(tmp_path, sources, monkeypatch, capsys):
    """`minicpmv-jax convert src out` then `--model out` from the same folder: Orbax wants absolute paths."""
    src = tmp_path / "hf"
    shutil.copytree(sources["float32"], src)
    monkeypatch.chdir(tmp_path)
    with _ignoring_warning("float32"):
        assert main(["convert", "hf", "out"]) == 0
    capsys.readouterr()
    assert main(["info", "--model", "out"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    with _ignoring_warning("float32"):
        hf = MiniCPMV.from_pretrained("hf", dtype="float32")
    _assert_bit_identical(_params(hf), _params(MiniCPMV.from_pretrained("out", dtype="float32")))
