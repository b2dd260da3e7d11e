"""Language-model parity: our Qwen2 vs transformers' Qwen2ForCausalLM on the same random tensors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from minicpmv_jax import qwen2
from minicpmv_jax.attention import Mask
from minicpmv_jax.kv_cache import KVCache
from minicpmv_jax import MiniCPMV
from reference import hf_logits, hf_qwen2, rel_err

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tiny_config):
    folder, tensors = tiny_checkpoint
    return MiniCPMV.from_pretrained(folder, dtype="float32"), hf_qwen2(tiny_config, tensors)


def _left_padded(lengths, seed=0, vocab=151_000):
    rng = np.random.default_rng(seed)
    length = max(lengths)
    ids = np.zeros((len(lengths), length), np.int32)
    mask = np.zeros((len(lengths), length), bool)
    for b, n in enumerate(lengths):
        ids[b, length - n:] = rng.integers(0, vocab, n)
        mask[b, length - n:] = True
    return ids, mask


def test_single_prompt_logits_match(models):
    ours, ref = models
    ids, mask = _left_padded([41], seed=1)
    got = np.asarray(ours.compute_logits({"input_ids": ids, "attention_mask": mask}))
    want = hf_logits(ref, ids, mask)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(want).max() > 1.0  # realistic spread: logits are not near zero
    assert rel_err(got, want) <= TOL


def test_left_padded_batch_matches_each_row(models):
    ours, ref = models
    ids, mask = _left_padded([5, 23, 1, 17], seed=2)
    got = np.asarray(ours.compute_logits({"input_ids": ids, "attention_mask": mask}))
    want = hf_logits(ref, ids, mask)
    for b in range(ids.shape[0]):
        rows = mask[b]
        assert rel_err(got[b][rows], want[b][rows]) <= TOL
        # The same prompt alone (no padding) gives the same logits: padding does not leak.
        alone = np.asarray(ours.compute_logits({"input_ids": ids[b:b + 1, rows[None].argmax():],
                                                "attention_mask": mask[b:b + 1, rows.argmax():]}))
        assert rel_err(alone[0], got[b][rows]) <= TOL


@pytest.mark.parametrize("attention", ["xla", "auto", "blockwise", "splash", "gpu_decode"])
def test_prefill_then_decode_matches_full_forward(models, attention):
    """Each decode step's logits equal the full forward's (dense) at that position (left-padded batch),
    whichever attention kernel runs the prefill and the decode steps (Pallas kernels in interpret mode
    on CPU)."""
    ours, _ = models
    llm = ours.llm
    try:
        llm.attention = attention
        _prefill_then_decode(llm)
    finally:
        llm.attention = "auto"


def _prefill_then_decode(llm):
    ids, mask = _left_padded([9, 14], seed=3)
    steps = 6
    rng = np.random.default_rng(4)
    more = rng.integers(0, 151_000, (2, steps)).astype(np.int32)
    full_ids = np.concatenate([ids, more], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(more, bool)], axis=1)
    full = np.asarray(llm(jnp.asarray(full_ids), jnp.asarray(full_mask)))   # no cache: "xla" unless asked

    cache_len = full_ids.shape[1] + 3  # spare slots stay masked
    cache = KVCache.zeros(llm.config, 2, cache_len, jnp.float32)
    key_valid = np.zeros((2, cache_len), bool)
    key_valid[:, : ids.shape[1]] = mask
    positions = qwen2.positions_from_mask(jnp.asarray(full_mask))
    t0 = ids.shape[1]
    hidden, cache = llm.hidden_states(llm.embed(jnp.asarray(ids)), positions[:, :t0],
                                      Mask(jnp.asarray(key_valid), 0), cache, 0)
    prefill_logits = np.asarray(llm.logits(hidden))
    for b in range(2):
        assert rel_err(prefill_logits[b][mask[b]], full[b, :t0][mask[b]]) <= TOL
    for s in range(steps):
        i = t0 + s
        key_valid[:, i] = True
        hidden, cache = llm.hidden_states(llm.embed(jnp.asarray(full_ids[:, i:i + 1])), positions[:, i:i + 1],
                                          Mask(jnp.asarray(key_valid), jnp.int32(i)), cache,
                                          jnp.int32(i))
        assert rel_err(np.asarray(llm.logits(hidden))[:, 0], full[:, i]) <= TOL


def test_bfloat16_close_to_float32(tiny_checkpoint, models):
    folder, _ = tiny_checkpoint
    f32, _ = models
    bf16 = MiniCPMV.from_pretrained(folder, dtype="bfloat16")
    leaf = bf16.llm.layers[0].attn.q.kernel[...]
    assert leaf.dtype == jnp.bfloat16
    ids, mask = _left_padded([19, 30], seed=5)
    batch = {"input_ids": ids, "attention_mask": mask}
    lo = np.asarray(bf16.compute_logits(batch))
    hi = np.asarray(f32.compute_logits(batch))
    assert lo.dtype == np.float32 and np.isfinite(lo[mask]).all()
    # bfloat16 keeps 8 mantissa bits; through 3 layers the logits stay within a few percent.
    assert rel_err(lo[mask], hi[mask]) < 5e-2
    assert (lo[mask].argmax(-1) == hi[mask].argmax(-1)).mean() > 0.9


def test_bfloat16_checkpoint_loads_bit_exact(tmp_path, tiny_config):
    """A bfloat16 checkpoint loaded as bfloat16 keeps the stored bits; as float32, the exact values."""
    from minicpmv_jax.testing.checkpoint import write_checkpoint
    tensors = write_checkpoint(tmp_path, tiny_config, seed=7, dtype="bfloat16", num_shards=1, tokenizer=False)
    want = tensors["llm.model.layers.1.mlp.down_proj.weight"]
    assert want.dtype == ml_dtypes.bfloat16
    m16 = MiniCPMV.from_pretrained(tmp_path, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(m16.llm.layers[1].mlp.down.kernel[...]), want.T)
    m32 = MiniCPMV.from_pretrained(tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.asarray(m32.llm.layers[1].mlp.down.kernel[...]), want.T.astype(np.float32))


def test_eval_shape_full_size():
    """The released 8B configuration builds abstractly with the documented parameter shapes."""
    from flax import nnx
    from minicpmv_jax.config import minicpmv_2_6
    cfg = minicpmv_2_6()
    abstract = nnx.eval_shape(lambda: MiniCPMV(cfg, dtype="bfloat16", rngs=nnx.Rngs(0)))
    attn = abstract.llm.layers[27].attn
    assert attn.q.kernel.shape == (3584, 28, 128) and attn.k.kernel.shape == (3584, 4, 128)
    assert abstract.llm.lm_head.kernel.shape == (3584, 151666)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract.llm, nnx.Param)))
    assert n == 2 * 151666 * 3584 + 28 * (3584 * 4608 + 4608 + 3584 ** 2 + 3 * 3584 * 18944 + 2 * 3584) + 3584


def test_processor_to_logits_end_to_end(tiny_checkpoint, models):
    """Chat prompts through the processor (left padding) and compute_logits, as a user runs them."""
    from minicpmv_jax import MiniCPMVProcessor
    folder, _ = tiny_checkpoint
    ours, ref = models
    processor = MiniCPMVProcessor.from_pretrained(folder)
    tok = processor.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": "Describe a flamingo 🦩 in one line."}]),
               tok.apply_chat_template([{"role": "system", "content": "Sei kurz."},
                                        {"role": "user", "content": "Was ist 2+2?"}])]
    batch = processor(prompts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == np.int32 and mask.dtype == bool and not mask[:, -1].__invert__().any()
    got = np.asarray(ours.compute_logits(batch))
    want = hf_logits(ref, ids, mask)
    assert rel_err(got[mask], want[mask]) <= TOL


def test_remat_keeps_a_full_forward_from_slot_zero_for_the_prefill_kernels(models):
    """With ``remat`` (fine-tuning) the causal offset of a full forward stays a static 0 through
    ``nnx.remat``, so a kernel that needs a prefill from slot 0 (splash, in interpret mode here) runs
    and gives the dense kernel's logits."""
    ours, _ = models
    llm = ours.llm
    ids, mask = _left_padded([9, 14], seed=5)
    want = np.asarray(llm(jnp.asarray(ids), jnp.asarray(mask)))
    try:
        llm.remat, llm.attention = True, "splash"
        got = np.asarray(llm(jnp.asarray(ids), jnp.asarray(mask)))
    finally:
        llm.remat, llm.attention = False, "auto"
    assert rel_err(got[mask], want[mask]) <= TOL
