"""Logits processing and sampling (minicpmv_jax.sampling) against transformers' processors and generate.

Our functions run under ``jax.jit`` (XLA rewrites that change the last bit only show up there) on random
logits with a realistic spread, deliberate ties and ``-inf`` entries; results must be bitwise equal to
HF's, except for top-p's choice *among equal logits* at the cut, where torch's sort order is unspecified
(there the number of dropped tokens per tied value must match).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from helpers import prompt_ignore_length
from minicpmv_jax import sampling as sp
from reference import tiny_hf_qwen2

# HF warns that with inputs_embeds the penalty only sees generated tokens: exactly the semantics we test.
pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")

V = 1009
STOP = np.array([11, 500, -1], np.int32)          # padded with -1
STOP_HF = [11, 500]

_penalty = jax.jit(sp.apply_repetition_penalty)
_suppress = jax.jit(sp.suppress_stop_tokens)
_temperature = jax.jit(sp.apply_temperature)
_process = jax.jit(sp.process_logits, static_argnames="do_sample")
_beam_log_probs = jax.jit(sp.beam_log_probs)
_update_seen = jax.jit(sp.update_seen)


def make_logits(seed, rows=6, v=V):
    """float32 [rows, v]: N(0, 3²), 40% snapped to a 0.5 grid (many exact ties), a unique maximum per row,
    stop id 11 made likely, and -inf entries in row 0 (as left by earlier processors)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 3.0, (rows, v)).astype(np.float32)
    snap = rng.random((rows, v)) < 0.4
    x[snap] = np.round(x[snap] * 2.0) / 2.0
    x[:, 11] = x.max(-1) - 0.25
    x[np.arange(rows), rng.integers(12, v, rows)] = x.max(-1) + 0.75
    x[0, rng.choice(np.arange(12, v), 30, replace=False)] = -np.inf
    return x


def generated_ids(seed, rows=6, length=9):
    """Generated ids [rows, length] with repeats, including ids whose logits are negative, zero or -inf."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, (rows, length)).astype(np.int64)


def seen_of(ids, start=None):
    seen = jnp.zeros((ids.shape[0], V), bool)
    for pos in range(ids.shape[1]):
        seen = _update_seen(seen, jnp.asarray(ids[:, pos], jnp.int32), pos, start)
    return seen


def warped(x, **gen):
    """``x`` through the warpers alone, on the path generation takes: ``process_logits`` (sampling) with
    nothing seen, no stop suppression and temperature 1 (``x / 1`` is exact), so only top-k / top-p act."""
    x = jnp.asarray(x)
    return np.asarray(_process(x, jnp.zeros(x.shape, bool), 0, sp.SamplingParams.make(**gen), jnp.asarray(STOP)))


def assert_same_filter(got, want, scores):
    """Kept scores bitwise equal; dropped sets equal up to which of several equal scores is dropped."""
    got, want, scores = np.asarray(got), np.asarray(want), np.asarray(scores)
    got_drop, want_drop = np.isneginf(got), np.isneginf(want)
    np.testing.assert_array_equal(np.where(got_drop, 0, got), np.where(got_drop, 0, scores))
    np.testing.assert_array_equal(np.where(want_drop, 0, want), np.where(want_drop, 0, scores))
    for r in range(scores.shape[0]):
        differ = got_drop[r] != want_drop[r]
        for value in np.unique(scores[r][differ]):
            group = scores[r] == value
            assert group.sum() > 1, f"row {r}: token with unique score {value} dropped differently"
            assert got_drop[r][group].sum() == want_drop[r][group].sum(), f"row {r}: tie group {value}"


# --------------------------------------------------------------------------- single processors


@pytest.mark.parametrize("penalty", [1.05, 1.2, 0.7, 2.0])
def test_repetition_penalty(penalty):
    x, ids = make_logits(0), generated_ids(1)
    x[1, ids[1, 0]] = 0.0
    want = hf.RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(ids), torch.from_numpy(x)).numpy()
    got = _penalty(jnp.asarray(x), seen_of(ids), jnp.float32(penalty))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_update_seen_start_is_hfs_prompt_ignore_length():
    """With inputs_embeds HF skips the first pad_len *generated* ids of a left-padded row."""
    x, ids = make_logits(2), generated_ids(3)
    mask = np.ones((6, 7), np.int64)
    mask[1, :2] = 0
    mask[4, :5] = 0
    start = jnp.asarray(prompt_ignore_length(mask))
    np.testing.assert_array_equal(np.asarray(start), [0, 2, 0, 0, 5, 0])
    ignore = (torch.from_numpy(mask) != 0).int().argmax(dim=1)        # as _get_logits_processor computes it
    np.testing.assert_array_equal(ignore.numpy(), np.asarray(start))
    want = hf.RepetitionPenaltyLogitsProcessor(1.3, prompt_ignore_length=ignore)(
        torch.from_numpy(ids), torch.from_numpy(x)).numpy()
    got = _penalty(jnp.asarray(x), seen_of(ids, start), jnp.float32(1.3))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert not np.array_equal(np.asarray(got), np.asarray(_penalty(jnp.asarray(x), seen_of(ids), 1.3)))


@pytest.mark.parametrize("num_generated", [0, 2, 3, 5])
def test_min_new_tokens(num_generated):
    x = make_logits(4)
    ids = torch.zeros((6, num_generated), dtype=torch.long)
    want = hf.MinNewTokensLengthLogitsProcessor(0, 3, STOP_HF)(ids, torch.from_numpy(x)).numpy()
    got = _suppress(jnp.asarray(x), jnp.asarray(STOP), num_generated, jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(got), want)
    assert np.isneginf(np.asarray(got)[:, 11]).all() == (num_generated < 3)


@pytest.mark.parametrize("temperature", [0.7, 1.3, 0.05, 1.0])
def test_temperature(temperature):
    x = make_logits(5)
    want = hf.TemperatureLogitsWarper(temperature)(None, torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.asarray(_temperature(jnp.asarray(x), jnp.float32(temperature))), want)


@pytest.mark.parametrize("k", [1, 2, 7, 100, V - 1, V, V + 5])
def test_top_k(k):
    x = make_logits(6)
    x[2, :20] = np.sort(x[2])[-7]                 # a tie at the 7th largest value: HF keeps all of them
    want = hf.TopKLogitsWarper(k)(None, torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(warped(x, top_k=k), want)


def test_top_k_disabled():
    x = make_logits(6)
    for k in (0, None):
        np.testing.assert_array_equal(warped(x, top_k=k), x)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p(p):
    for seed in (7, 8, 9):
        x = make_logits(seed) * np.float32(0.4)      # flatter: the nucleus spans many (tied) tokens
        want = hf.TopPLogitsWarper(p)(None, torch.from_numpy(x)).numpy()
        got = warped(x, top_p=p)
        assert_same_filter(got, want, x)
        assert (~np.isneginf(np.asarray(got))).sum(-1).min() >= 1


def test_top_p_disabled_even_with_underflowing_probabilities():
    x = make_logits(7)
    x[3, 5] = -500.0                                   # softmax underflows to exactly 0
    # top_k = V keeps every token but makes the filter run, with top-p off.
    np.testing.assert_array_equal(warped(x, top_k=V, top_p=1.0), x)


def test_top_p_tie_across_the_cut():
    """Four equal best tokens, cut at 0.4 of the mass: HF and we drop one of them; we drop the lowest id."""
    x = np.full((1, 12), -np.inf, np.float32)
    x[0, [3, 5, 8, 9]] = 1.5
    want = hf.TopPLogitsWarper(0.6)(None, torch.from_numpy(x)).numpy()
    got = warped(x, top_p=0.6)
    assert np.isneginf(want).sum() == np.isneginf(got).sum() == 9
    assert np.isneginf(got[0, 3])


def test_top_p_cut_is_rounded_like_torch():
    """Five equal logits: the first cumulative probability is float32(0.2), exactly torch's cut for top_p 0.8
    (float32(1 - 0.8) computed in double), so one token is dropped; 1 - float32(0.8) would keep all five."""
    params = sp.SamplingParams.make(top_p=0.8)
    assert params.top_p_cut == np.float32(1.0 - 0.8) != np.float32(1.0) - np.float32(0.8)
    x = np.full((1, 9), -np.inf, np.float32)
    x[0, 2:7] = 0.25
    want = hf.TopPLogitsWarper(0.8)(None, torch.from_numpy(x)).numpy()
    got = np.asarray(_process(jnp.asarray(x), jnp.zeros((1, 9), bool), 0, params, jnp.asarray(STOP)))
    assert np.isneginf(want).sum() == np.isneginf(got).sum() == 5


# --------------------------------------------------------------------------- HF's own processor lists


@pytest.fixture(scope="module")
def hf_small():
    cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def hf_processor_list(model, mask, **gen):
    """The processors ``generate`` builds from embeddings (``input_ids_seq_length`` 0) for ``gen``."""
    config = transformers.GenerationConfig(eos_token_id=STOP_HF, pad_token_id=0, **gen)
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    return model._get_logits_processor(generation_config=config, input_ids_seq_length=0, device="cpu",
                                       model_kwargs={"attention_mask": torch.from_numpy(mask)})


def _padded_mask(rows=6, length=8):
    mask = np.ones((rows, length), np.int64)
    mask[1, :3] = 0
    mask[-1, :6] = 0
    return mask


SAMPLING = [
    dict(temperature=0.7, top_k=100, top_p=0.8, repetition_penalty=1.05, min_new_tokens=0),   # docs/model.md §7
    dict(temperature=1.3, top_k=0, top_p=0.95, repetition_penalty=1.2, min_new_tokens=5),
    dict(temperature=0.5, top_k=7, top_p=1.0, repetition_penalty=0.8, min_new_tokens=2),
    dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_new_tokens=0),
]


@pytest.mark.parametrize("gen", SAMPLING)
def test_process_logits_matches_hf_sampling_list(hf_small, gen):
    mask, ids = _padded_mask(), generated_ids(10, length=3)
    processors = hf_processor_list(hf_small, mask, do_sample=True, **gen)
    names = [type(p).__name__ for p in processors]
    assert names == sorted(names, key=["RepetitionPenaltyLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
                                       "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"].index)
    for seed in (11, 12):
        x = make_logits(seed) * np.float32(0.5)
        want = processors(torch.from_numpy(ids), torch.from_numpy(x)).numpy()
        seen = seen_of(ids, jnp.asarray(prompt_ignore_length(mask)))
        got = _process(jnp.asarray(x), seen, ids.shape[1], sp.SamplingParams.make(**gen), jnp.asarray(STOP))
        # Dropped sets may differ only inside tie groups of the (penalised, tempered) scores.
        before_filter = hf.LogitsProcessorList(processors[:len([n for n in names if not n.startswith("Top")])])
        assert_same_filter(got, want, before_filter(torch.from_numpy(ids), torch.from_numpy(x)).numpy())


def test_greedy_processing_matches_hf_list(hf_small):
    mask, ids = _padded_mask(), generated_ids(13, length=2)
    gen = dict(repetition_penalty=1.2, min_new_tokens=4, temperature=0.7, top_k=5)   # warpers unused
    processors = hf_processor_list(hf_small, mask, do_sample=False, **gen)
    x = make_logits(14)
    want = processors(torch.from_numpy(ids), torch.from_numpy(x))
    seen = seen_of(ids, jnp.asarray(prompt_ignore_length(mask)))
    got = _process(jnp.asarray(x), seen, 2, sp.SamplingParams.make(**gen), jnp.asarray(STOP), do_sample=False)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    np.testing.assert_array_equal(np.asarray(sp.greedy(got)), torch.argmax(want, dim=-1).numpy())


def test_beam_log_probs_match_hf_list(hf_small):
    mask, ids = np.repeat(_padded_mask(2), 3, axis=0), generated_ids(15, length=3)
    processors = hf_processor_list(hf_small, mask, num_beams=3, do_sample=False, repetition_penalty=1.2,
                                   min_new_tokens=4)
    x = make_logits(16)
    params = sp.SamplingParams.make(repetition_penalty=1.2, min_new_tokens=4)
    seen = seen_of(ids, jnp.asarray(prompt_ignore_length(mask)))
    got = np.asarray(_beam_log_probs(jnp.asarray(x), seen, 3, params, jnp.asarray(STOP)))
    # Same log-softmax input → bitwise equal processing ...
    ours_log_softmax = np.array(jax.jit(jax.nn.log_softmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, processors(torch.from_numpy(ids), torch.from_numpy(ours_log_softmax)).numpy())
    # ... and jax's log-softmax equals torch's to float32 rounding.
    want = processors(torch.from_numpy(ids), torch.log_softmax(torch.from_numpy(x), dim=-1)).numpy()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- jit and sampling behaviour


def test_parameters_are_traced_not_static():
    traces = []

    @jax.jit
    def decode(key, logits, seen, n, params):
        traces.append(1)
        return sp.sample(key, sp.process_logits(logits, seen, n, params, jnp.asarray(STOP)))

    x, seen = jnp.asarray(make_logits(17)), seen_of(generated_ids(18))
    outs = [decode(jax.random.key(0), x, seen, n, sp.SamplingParams.make(**gen))
            for n, gen in zip([0, 3, 9, 1], SAMPLING)]
    assert len(traces) == 1
    assert len({tuple(np.asarray(o)) for o in outs}) > 1


def test_top_k_1_sampling_is_greedy():
    x, seen = jnp.asarray(make_logits(19)), seen_of(generated_ids(20))
    greedy = sp.greedy(_process(x, seen, 1, sp.SamplingParams.make(repetition_penalty=1.05), jnp.asarray(STOP),
                                do_sample=False))
    params = sp.SamplingParams.make(temperature=0.7, top_k=1, top_p=0.8, repetition_penalty=1.05)
    scores = _process(x, seen, 1, params, jnp.asarray(STOP))
    for i in range(16):
        np.testing.assert_array_equal(np.asarray(sp.sample(jax.random.key(i), scores)), np.asarray(greedy))


def test_same_key_same_samples():
    scores = _process(jnp.asarray(make_logits(21)), jnp.zeros((6, V), bool), 0,
                      sp.SamplingParams.make(temperature=1.5, top_p=0.99), jnp.asarray(STOP))
    a, b = sp.sample(jax.random.key(3), scores), sp.sample(jax.random.key(3), scores)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    draws = {tuple(np.asarray(sp.sample(jax.random.key(k), scores))) for k in range(8)}
    assert len(draws) > 1


def test_samples_follow_the_processed_distribution():
    x = np.random.default_rng(22).normal(0.0, 1.5, (1, 13)).astype(np.float32)
    params = sp.SamplingParams.make(temperature=0.7, top_k=6, top_p=0.9)
    scores = _process(jnp.asarray(x), jnp.zeros((1, 13), bool), 0, params, jnp.asarray(STOP[:0]))
    keys = jax.random.split(jax.random.key(4), 20000)
    draws = np.asarray(jax.vmap(sp.sample, in_axes=(0, None))(keys, scores))[:, 0]
    freq = np.bincount(draws, minlength=13) / draws.size
    probs = np.asarray(jax.nn.softmax(scores[0]))
    assert (freq[probs == 0] == 0).all() and (probs == 0).sum() >= 7
    np.testing.assert_allclose(freq, probs, atol=0.015)


def test_bad_parameters_name_the_argument():
    cases = [(dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
             (dict(temperature=True), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
             (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"), (dict(repetition_penalty=0.0),
                                                                      "repetition_penalty"),
             (dict(min_new_tokens=-2), "min_new_tokens"), (dict(min_new_tokens=1.5), "min_new_tokens")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=name):
            sp.SamplingParams.make(**kwargs)


# --------------------------------------------------------------------------- decode loops vs generate

VOCAB, HIDDEN, MAX_NEW, PAD = 257, 128, 10, 0


@pytest.fixture(scope="module")
def model():
    return tiny_hf_qwen2(VOCAB, HIDDEN)


def _prompt():
    rng = np.random.default_rng(2)
    emb = torch.from_numpy(rng.normal(0.0, 1.0, (2, 6, HIDDEN)).astype(np.float32))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    return emb, mask


def decode_loop(model, emb, mask, params, stop, do_sample, seed=0):
    """HF ``_sample``'s order with our functions: process, choose, pad finished rows, record, stop."""
    b = emb.shape[0]
    stop_ids = jnp.asarray(stop, jnp.int32)
    start = jnp.asarray(prompt_ignore_length(mask.numpy()))
    seen = jnp.zeros((b, VOCAB), bool)
    unfinished = np.ones(b, bool)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    use_mask = not bool((mask == 1).all())
    out_tokens = []
    with torch.no_grad():
        out = model(inputs_embeds=emb, attention_mask=mask if use_mask else None, position_ids=positions,
                    use_cache=True, logits_to_keep=1)
        for n in range(MAX_NEW):
            scores = _process(jnp.asarray(out.logits[:, -1].float().numpy()), seen, n, params, stop_ids,
                              do_sample=do_sample)
            tokens = sp.sample(jax.random.fold_in(jax.random.key(seed), n), scores) if do_sample \
                else sp.greedy(scores)
            tokens = np.where(unfinished, np.asarray(tokens), PAD)
            seen = _update_seen(seen, jnp.asarray(tokens), n, start)
            out_tokens.append(tokens)
            unfinished &= ~np.isin(tokens, stop)
            if not unfinished.any():
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=torch.tensor(tokens, dtype=torch.long)[:, None],
                        attention_mask=mask if use_mask else None, position_ids=positions, cache=out.cache,
                        use_cache=True, logits_to_keep=1)
    return np.stack(out_tokens, axis=1)


@pytest.mark.parametrize("do_sample", [False, True])
def test_decode_loop_matches_hf_generate(model, do_sample):
    """Greedy (penalty 1.3, min_new_tokens 3) and top-k=1 sampling (docs/model.md §7 warpers) on a padded batch."""
    emb, mask = _prompt()
    with torch.no_grad():
        free = model.generate(inputs_embeds=emb, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                              eos_token_id=None, pad_token_id=PAD).numpy()
    stop = [int(free[0, 1]), int(free[1, 4])]          # ids the model really generates, early
    gen = dict(temperature=0.7, top_k=1, top_p=0.8, repetition_penalty=1.05) if do_sample \
        else dict(repetition_penalty=1.3, min_new_tokens=3)
    with torch.no_grad():
        want = model.generate(inputs_embeds=emb, attention_mask=mask, do_sample=do_sample, max_new_tokens=MAX_NEW,
                              eos_token_id=stop, pad_token_id=PAD, **gen).numpy()
    got = decode_loop(model, emb, mask, sp.SamplingParams.make(**gen), stop, do_sample)
    np.testing.assert_array_equal(got, want)
    assert np.isin(got, stop).any(), "no row stopped early: the stop path was not exercised"
