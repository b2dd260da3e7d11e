"""Beam search (minicpmv_jax.beam_search) against transformers' ``generate(num_beams=3)``.

Our ``step`` is driven in a Python loop with the logits of an HF model fed from ``inputs_embeds``, with
HF's own cache reordered by our ``beam_idx`` (so the logits are bitwise those of HF's generate, and
``beam_idx`` is checked as the loop will use it). Models: a tiny random ``Qwen2ForCausalLM``, and a bigram
stand-in whose stop ids are made so likely that more than W of the best 2·W candidates finish (the path
that needs HF's ``(1 + E)·W`` candidates). All W finished hypotheses and their scores are compared
(``num_return_sequences=W``), not only the best. Two processing modes:

* ``ours``: ``sampling.beam_log_probs`` (JAX log_softmax) — token ids must be identical; scores match to
  float32 rounding of log_softmax (jax and torch differ in the last bit).
* ``hf``: torch's log_softmax + HF's processors on our running sequences — ids AND scores bitwise equal,
  which pins the bookkeeping arithmetic (accumulation, length normalisation, -1e9 offsets).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.modeling_outputs import CausalLMOutputWithPast

from helpers import prompt_ignore_length
from minicpmv_jax import beam_search as bs
from minicpmv_jax import sampling as sp
from reference import tiny_hf_qwen2

# HF warns that with inputs_embeds the penalty only sees generated tokens: exactly the semantics we test.
pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")

VOCAB, HIDDEN, BEAMS, MAX_NEW, CAPACITY, PAD = 257, 128, 3, 12, 16, 0

_step = jax.jit(bs.step)
_log_probs = jax.jit(sp.beam_log_probs)
_reorder_seen = jax.jit(lambda seen, idx, tok, pos, start: sp.update_seen(bs.gather_beams(seen, idx), tok, pos, start))
_done = jax.jit(bs.done)


@pytest.fixture(scope="module")
def model():
    return tiny_hf_qwen2(VOCAB, HIDDEN)


class BigramLM(Qwen2ForCausalLM):
    """An HF model whose next-token logits depend only on the last token and its position (cheap, and its
    table can make stop ids as likely as we want)."""

    def __init__(self, table: np.ndarray):
        super().__init__(Qwen2Config(vocab_size=table.shape[1], hidden_size=8, intermediate_size=8,
                                     num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))
        self.table = torch.from_numpy(table)

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, cache=None, **kwargs):
        last = input_ids[:, -1] if input_ids is not None else torch.zeros(len(inputs_embeds), dtype=torch.long)
        wobble = torch.sin(0.9 * position_ids[:, -1:].float() + torch.arange(self.table.shape[1]))
        return CausalLMOutputWithPast(logits=(self.table[last] + 0.5 * wobble)[:, None],
                                      cache=DynamicCache() if cache is None else cache)


def make_prompt(seed, hidden=HIDDEN):
    """Embeddings [2, 7, D] and a left-padded mask (row 1 has 3 pad slots)."""
    rng = np.random.default_rng(seed)
    emb = torch.from_numpy(rng.normal(0.0, 1.0, (2, 7, hidden)).astype(np.float32))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    return emb, mask


def hf_generate(model, emb, mask, *, rep, lp, min_new, eos):
    """HF's answer with all W finished hypotheses: (ids [B·W, T], sequences_scores [B·W])."""
    with torch.no_grad():
        out = model.generate(inputs_embeds=emb, attention_mask=mask, num_beams=BEAMS, do_sample=False,
                             repetition_penalty=rep, length_penalty=lp, early_stopping=False,
                             max_new_tokens=MAX_NEW, min_new_tokens=min_new, eos_token_id=list(eos) or None,
                             pad_token_id=PAD, num_return_sequences=BEAMS, return_dict_in_generate=True,
                             output_scores=True)
    return out.sequences.numpy(), out.sequences_scores.numpy()


def run_ours(model, emb, mask, *, rep, lp, min_new, eos, mode="ours", start=None):
    """Our beam search with HF's model and cache, sequenced as the compiled loop will do it."""
    b, w, vocab = emb.shape[0], BEAMS, model.config.vocab_size
    params = bs.BeamParams.make(max_new_tokens=MAX_NEW, stop_ids=eos, length_penalty=lp, pad_id=PAD,
                                capacity=CAPACITY)
    sparams = sp.SamplingParams.make(repetition_penalty=rep, min_new_tokens=min_new)
    state = bs.init(params, b, w)
    if start is None:   # HF's prompt_ignore_length: the first pad_len generated tokens are not penalised
        start = jnp.asarray(prompt_ignore_length(mask.numpy()))
    start = bs.expand_beams(start, w)
    seen = jnp.zeros((b * w, vocab), bool)
    hf_processors = LogitsProcessorList()
    if rep != 1.0:
        hf_processors.append(RepetitionPenaltyLogitsProcessor(
            rep, prompt_ignore_length=torch.tensor(np.asarray(start), dtype=torch.long)))
    if min_new > 0:
        hf_processors.append(MinNewTokensLengthLogitsProcessor(0, min_new, torch.tensor(eos)))

    # HF's prefill on the expanded batch; the mask is dropped when it is all ones, as generate does.
    mask_x = mask.repeat_interleave(w, 0)
    positions = (mask_x.cumsum(-1) - 1).masked_fill(mask_x == 0, 0)
    use_mask = not bool((mask_x == 1).all())
    finished_before_last = crowded = False
    with torch.no_grad():
        out = model(inputs_embeds=emb.repeat_interleave(w, 0), attention_mask=mask_x if use_mask else None,
                    position_ids=positions, use_cache=True, logits_to_keep=1)
        while True:
            logits = out.logits[:, -1].float()
            t = state.step
            if mode == "ours":
                log_probs = _log_probs(jnp.asarray(logits.numpy()), seen, t, sparams, params.stop_ids)
            else:
                running = np.asarray(state.running_tokens)[:, :, :int(t)].reshape(b * w, -1)
                running = torch.tensor(running, dtype=torch.long)
                log_probs = hf_processors(running, torch.log_softmax(logits, dim=-1)).numpy()
            if int(t) + 1 < MAX_NEW:       # do more than W of the best 2·W candidates stop?
                totals = np.asarray(log_probs).reshape(b, w, vocab) + np.asarray(state.running_scores)[..., None]
                best = np.argsort(-totals.reshape(b, w * vocab), axis=1, kind="stable")[:, :2 * w] % vocab
                crowded |= bool((np.isin(best, eos).sum(1) > w).any())
            state, tokens, beam_idx = _step(state, log_probs)
            if bool(_done(state)):
                break
            finished_before_last |= bool(state.is_finished.any())
            seen = _reorder_seen(seen, beam_idx, tokens, t, start)
            cache = out.cache
            cache.reorder_cache(torch.tensor(np.asarray(beam_idx), dtype=torch.long))
            mask_x = torch.cat([mask_x, torch.ones(b * w, 1, dtype=mask_x.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)[:, None],
                        attention_mask=mask_x if use_mask else None, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
    best, best_lengths, best_scores = (np.asarray(x) for x in bs.finalize(state))
    lengths = np.asarray(state.finished_lengths).reshape(b * w)
    every = np.asarray(state.finished_tokens).reshape(b * w, -1)
    return dict(best=best, best_lengths=best_lengths, best_scores=best_scores, lengths=lengths,
                every=every[:, :lengths.max()],            # HF crops to the longest returned hypothesis
                every_scores=np.asarray(state.finished_scores).reshape(b * w), fill=int(params.fill_id),
                steps=int(state.step), finished_before_last=finished_before_last, crowded=crowded)


def compare_with_hf(model, emb, mask, **kw):
    """Both modes against HF; returns our ``ours``-mode result."""
    want, want_scores = hf_generate(model, emb, mask, **kw)
    for mode in ("hf", "ours"):
        got = run_ours(model, emb, mask, mode=mode, **kw)
        np.testing.assert_array_equal(got["every"], want)
        if mode == "hf":
            np.testing.assert_array_equal(got["every_scores"], want_scores)
        else:
            np.testing.assert_allclose(got["every_scores"], want_scores, rtol=1e-6)
        # finalize: the first hypothesis per row, as HF returns it with num_return_sequences=1.
        n = int(got["best_lengths"].max())
        np.testing.assert_array_equal(got["best"][:, :n], want[::BEAMS, :n])
        assert (want[::BEAMS, n:] == got["fill"]).all() and (got["best"][:, n:] == got["fill"]).all()
        np.testing.assert_array_equal(got["best_scores"], got["every_scores"][::BEAMS])
    return got


def liked_stop_ids(model, emb, mask, kind):
    """Stop ids that really get generated: ``first`` = the two likeliest first tokens of row 0; ``mid`` =
    the token at position 3 of row 0's answer without stop ids, plus id 5."""
    with torch.no_grad():
        if kind == "first":
            return torch.topk(model(inputs_embeds=emb[:1]).logits[0, -1], 2).indices.tolist()
        seqs = model.generate(inputs_embeds=emb, attention_mask=mask, num_beams=BEAMS, do_sample=False,
                              max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=PAD).numpy()
    return [int(seqs[0, 3]), 5]


# Prompt seeds chosen so that each case exercises its path (asserted in the test).
CASES = {
    "b1_penalty": dict(seed=1, batch=1, rep=1.2, lp=1.0, min_new=0, eos="mid"),
    "b2_padded_penalty": dict(seed=1, batch=2, rep=1.2, lp=1.0, min_new=0, eos="mid"),
    "b2_no_penalty_lp1.7": dict(seed=1, batch=2, rep=1.0, lp=1.7, min_new=0, eos="mid"),
    "b2_penalty_lp0.6": dict(seed=1, batch=2, rep=1.2, lp=0.6, min_new=0, eos="mid"),
    "b2_min_new_tokens": dict(seed=9, batch=2, rep=1.2, lp=1.0, min_new=5, eos="first"),
    "b1_early_stop": dict(seed=9, batch=1, rep=1.2, lp=1.0, min_new=0, eos="first"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_qwen2_matches_hf_generate(model, name):
    case = CASES[name]
    emb, mask = make_prompt(case["seed"])
    eos = liked_stop_ids(model, emb, mask, case["eos"])
    emb, mask = emb[:case["batch"]], mask[:case["batch"]]
    kw = dict(rep=case["rep"], lp=case["lp"], min_new=case["min_new"], eos=eos)
    got = compare_with_hf(model, emb, mask, **kw)

    # The paths each case exists for were really taken.
    if case["eos"] == "mid":
        assert got["finished_before_last"], "no hypothesis finished before the last step"
    if name == "b1_early_stop":
        assert got["steps"] < MAX_NEW, "the early-stop heuristic never ended the search"
    if case["min_new"]:
        assert (got["lengths"] > case["min_new"]).all()
        assert not np.isin(got["every"][:, :case["min_new"]], eos).any()
        free = run_ours(model, emb, mask, **dict(kw, min_new=0))
        assert (free["lengths"] <= case["min_new"]).any(), "min_new_tokens changed nothing"
    if name == "b2_padded_penalty":
        # HF exempts the first pad_len generated tokens of a padded row from the penalty; the case is
        # sensitive to that (penalising all generated tokens gives another answer).
        plain = run_ours(model, emb, mask, start=jnp.zeros((2,), jnp.int32), **kw)
        assert not np.array_equal(plain["every"], got["every"])


BIGRAM_CASES = [   # (table seed, stop-id boost, stop ids, repetition penalty, length penalty, min_new_tokens)
    (0, 2.5, [3, 17], 1.2, 1.0, 0),
    (1, 3.5, [3, 17], 1.0, 1.0, 0),
    (2, 3.0, [3, 17], 1.3, 0.5, 2),
    (3, 2.0, [3, 17], 1.2, 2.0, 0),
    (4, 3.0, [29], 1.2, 1.0, 0),
    (5, 0.0, [], 1.2, 1.0, 0),
]


def test_bigram_stop_heavy_matches_hf_generate():
    crowded = 0
    for seed, boost, eos, rep, lp, min_new in BIGRAM_CASES:
        table = np.random.default_rng(seed).normal(0.0, 2.0, (41, 41)).astype(np.float32)
        table[:, eos] += boost
        emb, mask = make_prompt(seed, hidden=8)
        got = compare_with_hf(BigramLM(table).eval(), emb, mask, rep=rep, lp=lp, min_new=min_new, eos=eos)
        crowded += got["crowded"]
    assert crowded >= 1, "never had more than W stopping candidates among the best 2·W"


class HFBeams:
    """The body of HF's ``_beam_search`` (prompt length 0, early_stopping=False), built from its own helper
    methods, so that our state can be compared with HF's after every step (not only the final answer)."""

    def __init__(self, model, batch, eos, lp):
        self.m, self.b, self.w, self.eos, self.lp = model, batch, BEAMS, eos, lp
        self.a = max(2, 1 + len(eos)) * BEAMS
        fill = (PAD or eos[0]) if eos else -1
        self.running = torch.full((batch, BEAMS, MAX_NEW), fill, dtype=torch.int64)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((batch, BEAMS))
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((batch, BEAMS), -1e9)
        self.finished = torch.zeros((batch, BEAMS), dtype=torch.bool)
        self.unsatisfied = torch.ones((batch, 1), dtype=torch.bool)
        self.running_indices = torch.full((batch, BEAMS, MAX_NEW), -1, dtype=torch.int32)
        self.indices = self.running_indices.clone()
        self.criteria = StoppingCriteriaList([MaxLengthCriteria(MAX_NEW)] + ([EosTokenCriteria(eos)] if eos else []))
        self.top_mask = torch.arange(self.a) < BEAMS
        self.t = 0

    def step(self, log_probs):
        m, b, w, a, t = self.m, self.b, self.w, self.a, self.t
        totals = (log_probs.reshape(b, w, -1) + self.running_scores[:, :, None]).reshape(b, -1)
        top, top_seqs, top_indices = m._get_top_k_continuations(
            accumulated_log_probs=totals, running_sequences=self.running, running_beam_indices=self.running_indices,
            cur_len=t, decoder_prompt_len=0, do_sample=False, beams_to_keep=a, num_beams=w, batch_size=b)
        hits = self.criteria(top_seqs[:, :, :t + 1].reshape(b * a, -1), None).reshape(b, a)
        self.running, self.running_scores, self.running_indices = m._get_running_beams_for_next_iteration(
            topk_log_probs=top, topk_running_sequences=top_seqs, topk_running_beam_indices=top_indices,
            next_token_hits_stopping_criteria=hits, num_beams=w)
        self.sequences, self.scores, self.indices, self.finished = m._update_finished_beams(
            sequences=self.sequences, topk_running_sequences=top_seqs, beam_scores=self.scores, topk_log_probs=top,
            beam_indices=self.indices, topk_running_beam_indices=top_indices,
            is_early_stop_heuristic_unsatisfied=self.unsatisfied, is_sent_finished=self.finished,
            next_token_hits_stopping_criteria=hits, top_num_beam_mask=self.top_mask, num_beams=w, cur_len=t,
            decoder_prompt_len=0, length_penalty=self.lp, early_stopping=False)
        beam_idx = self.running_indices[..., t].reshape(-1)
        self.t = t = t + 1
        self.unsatisfied = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.unsatisfied, running_beam_scores=self.running_scores,
            beam_scores=self.scores, is_sent_finished=self.finished, cur_len=t, max_length=MAX_NEW,
            decoder_prompt_len=0, early_stopping=False, length_penalty=self.lp)
        going = m._beam_search_has_unfinished_sequences(self.unsatisfied, self.finished, hits, False)
        return beam_idx, not bool(going)


def assert_same_state(ours, ref, beam_idx, ref_beam_idx):
    """Equal wherever HF's entries are real (ties among -1e9 placeholders may be ordered differently)."""
    t = ref.t
    real = ref.running_scores.numpy() > -1e8                                 # [B, W]
    np.testing.assert_array_equal(np.asarray(ours.running_scores)[real], ref.running_scores.numpy()[real])
    np.testing.assert_array_equal(np.asarray(ours.running_tokens)[real][:, :t], ref.running.numpy()[real][:, :t])
    np.testing.assert_array_equal(np.asarray(beam_idx)[real.reshape(-1)], ref_beam_idx.numpy()[real.reshape(-1)])
    done = ref.finished.numpy()
    np.testing.assert_array_equal(np.asarray(ours.is_finished), done)
    np.testing.assert_array_equal(np.asarray(ours.finished_scores)[done], ref.scores.numpy()[done])
    np.testing.assert_array_equal(np.asarray(ours.finished_tokens)[done][:, :MAX_NEW], ref.sequences.numpy()[done])
    lengths = (ref.indices.numpy() >= 0).sum(-1)
    np.testing.assert_array_equal(np.asarray(ours.finished_lengths)[done], lengths[done])
    np.testing.assert_array_equal(np.asarray(ours.improvable), ref.unsatisfied.numpy()[:, 0])


STEP_CASES = [   # (table seed, table std, stop-id boost, stop ids, length penalty, crowded: see below)
    (0, 1.0, 3.0, [3, 17], 1.0, True), (1, 1.0, 3.5, [3, 17], 2.0, True), (2, 1.5, 3.0, [3, 17], 0.7, False),
    (3, 1.0, 3.0, [3], 1.0, False), (4, 1.0, 3.0, [3, 17, 29], 1.5, False), (5, 2.0, 0.0, [], 1.0, False),
    (6, 2.0, 2.0, [3, 17], -0.5, False), (7, 2.0, 2.0, [3, 17], 1.0, False),
]


@pytest.mark.parametrize("seed,std,boost,eos,lp,expect_crowded", STEP_CASES)
def test_step_matches_hf_helpers_every_step(seed, std, boost, eos, lp, expect_crowded):
    """Stop-heavy bigram log-probs (often more than W of the best 2·W candidates stop, so running beams come
    from the extra E·W candidates), fed to our step and to HF's helpers; states compared after each step."""
    v, batch = 41, 2
    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, std, (v, v)).astype(np.float32)
    table[:, eos] += boost
    params = bs.BeamParams.make(max_new_tokens=MAX_NEW, stop_ids=eos, length_penalty=lp, pad_id=PAD,
                                capacity=CAPACITY)
    ours, ref = bs.init(params, batch, BEAMS), HFBeams(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=v, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1)), batch, eos, lp)
    last = np.zeros(batch * BEAMS, np.int64)
    crowded = False
    for _ in range(MAX_NEW):
        log_probs = torch.log_softmax(torch.from_numpy(table[last]) + torch.from_numpy(
            rng.normal(0.0, 0.5, (batch * BEAMS, v)).astype(np.float32)), dim=-1)
        totals = (log_probs.numpy().reshape(batch, BEAMS, v) + np.asarray(ours.running_scores)[..., None])
        best = np.argsort(-totals.reshape(batch, -1), axis=1, kind="stable")[:, :2 * BEAMS] % v
        crowded |= bool((np.isin(best, eos).sum(1) > BEAMS).any()) and ref.t + 1 < MAX_NEW
        ours, tokens, beam_idx = _step(ours, log_probs.numpy())
        ref_beam_idx, ref_done = ref.step(log_probs)
        assert_same_state(ours, ref, beam_idx, ref_beam_idx)
        assert bool(_done(ours)) == ref_done
        if ref_done:
            break
        last = np.asarray(tokens)
    if expect_crowded:
        assert crowded, "more than W of the best 2·W candidates never stopped"


# --------------------------------------------------------------------------- the compiled loop


def _bigram_logits(table, tokens, step):
    """A stand-in language model: logits [R, V] from the last token and the step."""
    return table[tokens] + 0.3 * jnp.sin(step.astype(jnp.float32) + jnp.arange(table.shape[1]))[None]


def _python_loop(table, params, sparams, first_tokens, active=None):
    """The loop body of the compiled loop below, step by step; returns the final state."""
    state = bs.init(params, first_tokens.shape[0] // BEAMS, BEAMS, active=active)
    seen = jnp.zeros((first_tokens.shape[0], table.shape[1]), bool)
    tokens = first_tokens
    while True:
        t = state.step
        log_probs = _log_probs(_bigram_logits(table, tokens, t), seen, t, sparams, params.stop_ids)
        state, tokens, beam_idx = _step(state, log_probs)
        if bool(_done(state)):
            return state
        seen = _reorder_seen(seen, beam_idx, tokens, t, None)


traces = []


@jax.jit
def _compiled_loop(table, params, sparams, first_tokens):
    traces.append(1)
    batch = first_tokens.shape[0] // BEAMS

    def body(carry):
        state, seen, tokens = carry
        t = state.step
        log_probs = sp.beam_log_probs(_bigram_logits(table, tokens, t), seen, t, sparams, params.stop_ids)
        state, tokens, beam_idx = bs.step(state, log_probs)
        seen = sp.update_seen(bs.gather_beams(seen, beam_idx), tokens, t)
        return state, seen, tokens

    carry = (bs.init(params, batch, BEAMS), jnp.zeros((batch * BEAMS, table.shape[1]), bool), first_tokens)
    state, _, _ = jax.lax.while_loop(lambda c: ~bs.done(c[0]), body, carry)
    return bs.finalize(state)


def test_while_loop_matches_python_loop_and_compiles_once():
    v = 53
    table = jnp.asarray(np.random.default_rng(3).normal(0.0, 2.5, (v, v)).astype(np.float32))
    traces.clear()
    for max_new, lp, rep, min_new in [(9, 1.0, 1.2, 0), (14, 0.5, 1.0, 3), (5, 2.0, 1.5, 0)]:
        params = bs.BeamParams.make(max_new_tokens=max_new, stop_ids=[2, 7], length_penalty=lp, pad_id=0,
                                    capacity=CAPACITY)
        sparams = sp.SamplingParams.make(repetition_penalty=rep, min_new_tokens=min_new)
        first = jnp.zeros((2 * BEAMS,), jnp.int32)
        want = bs.finalize(_python_loop(table, params, sparams, first))
        got = _compiled_loop(table, params, sparams, first)
        for g, w_ in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w_))
        assert int(got[1].max()) <= max_new
    assert len(traces) == 1


def test_inactive_rows_do_not_keep_the_loop_running():
    """A filler row (active=False) changes neither the real row's answer nor when the search ends."""
    table = np.random.default_rng(6).normal(0.0, 2.5, (53, 53)).astype(np.float32)
    table[:, [2, 7]] += 2.0                                   # seed and boost: row 0 ends first on its own
    table = jnp.asarray(table)
    params = bs.BeamParams.make(max_new_tokens=CAPACITY, stop_ids=[2, 7], length_penalty=0.8, pad_id=0)
    sparams = sp.SamplingParams.make(repetition_penalty=1.2)
    alone = _python_loop(table, params, sparams, jnp.full((BEAMS,), 5, jnp.int32))
    first = jnp.concatenate([jnp.full((BEAMS,), 5, jnp.int32), jnp.full((BEAMS,), 11, jnp.int32)])
    with_filler = _python_loop(table, params, sparams, first, active=jnp.array([True, False]))
    both = _python_loop(table, params, sparams, first)
    for a, b in zip(bs.finalize(alone), bs.finalize(with_filler)):
        np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0])
    assert int(with_filler.step) == int(alone.step) < int(both.step)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="max_new_tokens"):
        bs.BeamParams.make(max_new_tokens=0)
    with pytest.raises(ValueError, match="capacity"):
        bs.BeamParams.make(max_new_tokens=8, capacity=4)
    with pytest.raises(ValueError, match="length_penalty"):
        bs.BeamParams.make(max_new_tokens=8, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="stop_ids"):
        bs.BeamParams.make(max_new_tokens=8, stop_ids=[3, -1])
    with pytest.raises(ValueError, match="num_beams"):
        bs.init(bs.BeamParams.make(max_new_tokens=8), 1, 1)


def test_fill_id_follows_hf():
    # HF: `pad_token_id or eos_token_id[0]` (a pad id of 0 is falsy), -1 without stop ids.
    assert int(bs.BeamParams.make(max_new_tokens=4, stop_ids=[9, 4], pad_id=0).fill_id) == 9
    assert int(bs.BeamParams.make(max_new_tokens=4, stop_ids=[9, 4], pad_id=3).fill_id) == 3
    assert int(bs.BeamParams.make(max_new_tokens=4, stop_ids=[9, 4]).fill_id) == 9
    assert int(bs.BeamParams.make(max_new_tokens=4, pad_id=3).fill_id) == -1
