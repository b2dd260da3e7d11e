"""Fine-tuning data (issue 7): the reference JSON/JSONL format, tokenisation as ``chat`` does it, assistant-only
targets, bucketed left-padded batches, deterministic order and resume, bad samples."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from helpers import noise_image
from minicpmv_jax.conversation import conversation_prompt
from minicpmv_jax.finetune.batching import FinetuneDataset, bucket_length
from minicpmv_jax.finetune.data import DataConfig, SampleError, SkippedSamplesWarning, default_buckets, load_samples
from minicpmv_jax.processor import IMAGE_TAG, MiniCPMVProcessor
from reference import rel_err

IM_END = "<|im_end|>"
BATCH_KEYS = {"input_ids", "attention_mask", "loss_mask", "image_bound", "pixel_values", "tgt_sizes",
              "image_sizes", "sample_ids"}


@pytest.fixture(scope="module")
def processor(tok_dir: str) -> MiniCPMVProcessor:
    return MiniCPMVProcessor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Image files under ``<root>/imgs`` (paths relative to the data files in ``<root>/data``)."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "imgs").mkdir()
    (root / "data").mkdir()
    specs = {"small.png": (0, 40, 30), "wide.png": (1, 700, 500)}
    for name, (seed, w, h) in specs.items():
        noise_image(seed, w, h).save(root / "imgs" / name)
    return root


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Samples of the reference format; images relative to <root>/data.
SINGLE = {"id": "single", "image": "../imgs/small.png",
          "conversations": [user("What is it?"), assistant("A cat.")]}
SINGLE_INLINE = {"id": "inline", "image": "../imgs/small.png",
                 "conversations": [user("Look: <image> and tell me."), assistant("Noise.")]}
NAMED = {"id": 7, "image": {"<image_00>": "../imgs/small.png", "<image_01>": "../imgs/wide.png"},
         "conversations": [user("Compare\n<image_01>\nand\n<image_00>"), assistant("The first is wider."),
                           user("Sure?"), assistant("Yes, quite sure.")]}
TEXT_ONLY = {"conversations": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!")]}
MULTI_TURN = {"id": "multi", "conversations": [user("1+1?"), assistant("2"), user("and 2+2?"),
                                               assistant("4, of course."), user("thanks")]}
GOOD = [SINGLE, SINGLE_INLINE, NAMED, TEXT_ONLY, MULTI_TURN]


def write_json(root, name, samples, jsonl=False):
    path = root / "data" / name
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.write("".join((s if isinstance(s, str) else json.dumps(s)) + "\n" for s in samples))
        else:
            json.dump(samples, f)
    return str(path)


def load(images, processor, samples, name="d.jsonl", **config):
    return FinetuneDataset.from_file(write_json(images, name, samples, jsonl=name.endswith("l")), processor,
                                     DataConfig(**{"max_slice_nums": 2, **config}))


PIL = {"small.png": noise_image(0, 40, 30), "wide.png": noise_image(1, 700, 500)}


def tagged(sample):
    """(system prompt, messages with image tags, images in tag order): the sample written as inference input."""
    files = sample.get("image") or {}
    files = {"<image>": files} if isinstance(files, str) else files
    msgs = [dict(m) for m in sample["conversations"]]
    system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else ""
    if list(files) == ["<image>"] and "<image>" not in msgs[0]["content"]:
        msgs[0]["content"] = "<image>\n" + msgs[0]["content"]
    order = []
    for m in msgs:
        for name in sorted(files, key=m["content"].find):
            if name in m["content"]:
                order.append(PIL[os.path.basename(files[name])])
                m["content"] = m["content"].replace(name, IMAGE_TAG)
    return system, msgs, order


def rendered(system, msgs):
    return ([{"role": "system", "content": system}] if system else []) + msgs


def runs(mask):
    """[start, end) of each run of True in a bool vector."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


# ---------------------------------------------------------------------------------------- format and tokens


def test_json_and_jsonl_give_the_same_samples(images, processor):
    a = load(images, processor, GOOD, "good.json")
    b = load(images, processor, GOOD, "good.jsonl")
    assert len(a) == len(b) == len(GOOD) and not a.bad and not b.bad
    for x, y in zip(a.samples, b.samples):
        assert np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.loss_mask, y.loss_mask)
        assert x.images == y.images
    assert [s.sample_id for s in a.samples] == ["single", "inline", "7", "good.json[3]", "multi"]
    assert [s.sample_id for s in b.samples] == ["single", "inline", "7", "good.jsonl:4", "multi"]
    # Relative image paths resolve against the data file's folder; named images come in text order.
    assert a.samples[2].images == (str(images / "data" / "../imgs/wide.png"),
                                   str(images / "data" / "../imgs/small.png"))
    assert a.samples[2].image_sizes == ((700, 500), (40, 30))


def test_targets_are_exactly_the_assistant_turns(images, processor):
    spaced = {"id": "ws", "conversations": [user("x"), assistant(" spaced\n\n"), user("y"), assistant("")]}
    ds = load(images, processor, GOOD + [spaced])
    tok = processor.tokenizer
    for raw, sample in zip(GOOD + [spaced], ds.samples, strict=True):
        answers = [m["content"] for m in raw["conversations"] if m["role"] == "assistant"]
        spans = runs(sample.loss_mask)
        assert len(spans) == len(answers)
        for (start, end), answer in zip(spans, answers):
            assert tok.decode(sample.input_ids[start:end]) == answer + IM_END
            assert sample.input_ids[end - 1] == tok.im_end_id
            assert tok.decode(sample.input_ids[start - 3:start]) == "<|im_start|>assistant\n"  # header: context
        assert not sample.loss_mask[0]
        for s, e in sample.image_bound:
            assert not sample.loss_mask[s - 1:e + 1].any()


def test_prompts_equal_inference_prompts(images, processor):
    """Before each assistant turn, the tokens are what ``chat`` feeds the model for the turns before it;
    the whole sequence is the processor's tokenisation of the rendered conversation."""
    ds = load(images, processor, GOOD)
    tok = processor.tokenizer
    for raw, sample in zip(GOOD, ds.samples, strict=True):
        system, msgs, imgs = tagged(raw)
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for i, (start, _) in zip(turns, runs(sample.loss_mask), strict=True):
            text, _ = conversation_prompt(msgs[:i], None, tok, system)
            expected = processor(text, [imgs[:text.count(IMAGE_TAG)]], max_slice_nums=2)
            assert np.array_equal(sample.input_ids[:start], expected["input_ids"][0])
        whole = processor(tok.apply_chat_template(rendered(system, msgs), add_generation_prompt=False), [imgs],
                          max_slice_nums=2)
        assert np.array_equal(sample.input_ids, whole["input_ids"][0])
        assert np.array_equal(sample.image_bound, whole["image_bound"][0])
    # chat's own message forms give the same prompts: an image before the text, images between lines.
    system, msgs, imgs = tagged(SINGLE)
    assert conversation_prompt([user("What is it?")], imgs[0], tok)[0] == conversation_prompt(msgs[:1], None, tok)[0]
    system, msgs, imgs = tagged(NAMED)
    chat_msgs = [{"role": "user", "content": ["Compare", imgs[0], "and", imgs[1]]}]
    assert conversation_prompt(chat_msgs, None, tok) == (conversation_prompt(msgs[:1], None, tok)[0], imgs)


def test_slicing_overrides(images, processor):
    sample = {"id": "w", "image": "../imgs/wide.png", "conversations": [user("?"), assistant("!")]}
    ds = load(images, processor, [sample], max_slice_nums=1, use_image_id=False)
    one = ds.samples[0]
    assert len(one.image_bound) == 1 and processor.tokenizer.image_id_start_id not in one.input_ids
    two = load(images, processor, [sample], max_slice_nums=2).samples[0]
    assert len(two.image_bound) == 3 and processor.tokenizer.image_id_start_id in two.input_ids


# ---------------------------------------------------------------------------------------- batches


def test_batch_runs_through_the_model(images, tiny_model, tiny_processor):
    """A training batch (image row, text row, padding row) goes through compute_logits unchanged; each row's
    logits equal those of the processor's batch for the same conversation (images in the same spans)."""
    path = write_json(images, "model.jsonl", [SINGLE, TEXT_ONLY], jsonl=True)
    ds = FinetuneDataset.from_file(path, tiny_processor, DataConfig(batch_size=3, shuffle=False, max_slice_nums=2))
    batch = next(ds.batches())
    assert set(batch) == BATCH_KEYS and batch["sample_ids"] == ["single", "model.jsonl:2", ""]
    logits = np.asarray(tiny_model.compute_logits(batch))
    assert logits.shape == (3, 128, tiny_model.config.llm.vocab_size) and np.isfinite(logits).all()
    tok = tiny_processor.tokenizer
    for row, raw in enumerate([SINGLE, TEXT_ONLY]):
        system, msgs, imgs = tagged(raw)
        alone = tiny_processor(tok.apply_chat_template(rendered(system, msgs), add_generation_prompt=False),
                               [imgs], max_slice_nums=2)
        n = alone["input_ids"].shape[1]
        assert np.array_equal(batch["input_ids"][row, -n:], alone["input_ids"][0])
        expected = np.asarray(tiny_model.compute_logits(alone))[0]
        assert rel_err(logits[row, -n:], expected) <= 1e-4
    assert len(batch["image_bound"][0]) == 1 and len(batch["pixel_values"][0]) == 1


def test_buckets_left_padding_and_padding_rows(images, processor):
    assert default_buckets(2048) == (64, 128, 256, 512, 1024, 2048)
    assert default_buckets(300) == (64, 128, 256, 300)
    assert default_buckets(40) == (40,)
    ds = load(images, processor, GOOD, batch_size=2, shuffle=False, buckets=(32, 100, 700), max_length=700)
    assert ds.steps_per_epoch() == 3
    batches = list(ds.batches())
    assert len(batches) == 3
    for k, batch in enumerate(batches):
        rows = ds.samples[2 * k: 2 * k + 2]
        length = batch["input_ids"].shape[1]
        assert length == min(b for b in (32, 100, 700) if b >= max(len(r) for r in rows))
        assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"].dtype == bool
        assert not batch["loss_mask"][:, 0].any()
        for r, sample in enumerate(rows):
            t = len(sample)
            assert np.array_equal(batch["input_ids"][r, length - t:], sample.input_ids)
            assert not batch["input_ids"][r, :length - t].any()
            assert batch["attention_mask"][r].sum() == t and batch["attention_mask"][r, length - t:].all()
            assert np.array_equal(batch["loss_mask"][r, length - t:], sample.loss_mask)
            assert np.array_equal(batch["image_bound"][r], sample.image_bound + length - t)
            assert len(batch["pixel_values"][r]) == len(sample.image_bound) == len(batch["tgt_sizes"][r])
            assert [tuple(p.shape[1:]) for p in batch["pixel_values"][r]] == \
                [tuple(14 * s) for s in batch["tgt_sizes"][r]]
    last = batches[-1]  # one sample + one padding row
    assert last["sample_ids"] == ["multi", ""]
    assert not last["attention_mask"][1].any() and not last["loss_mask"][1].any() and not last["input_ids"][1].any()
    assert last["image_bound"][1].shape == (0, 2) and last["pixel_values"][1] == [] and last["image_sizes"][1] == []


def test_shuffling_is_deterministic_per_seed_and_epoch(images, processor):
    samples = [dict(MULTI_TURN, id=f"m{i}") for i in range(6)] + [dict(TEXT_ONLY, id=f"t{i}") for i in range(6)]
    long = [dict(MULTI_TURN, id=f"l{i}", conversations=[user("x " * 80), assistant("y")]) for i in range(5)]
    ds = load(images, processor, samples + long, batch_size=4, seed=3)
    again = load(images, processor, samples + long, batch_size=4, seed=3)
    other = load(images, processor, samples + long, batch_size=4, seed=4)
    plan = lambda d, e: [list(b) for b in d.epoch_plan(e)]  # noqa: E731
    assert plan(ds, 0) == plan(again, 0) and plan(ds, 5) == plan(again, 5)
    assert plan(ds, 0) != plan(ds, 1) and plan(ds, 0) != plan(other, 0)
    for epoch in range(3):
        batches = plan(ds, epoch)
        assert sorted(i for b in batches for i in b) == list(range(17))
        assert [len(b) for b in batches] == [4, 4, 4, 4, 1]  # the partial batch comes last
        buckets = [{bucket_length(int(ds.lengths[i]), (64, 128, 256)) for i in b} for b in batches]
        assert sum(len(b) > 1 for b in buckets) <= 1  # grouped by length: at most one mixed batch
    ordered = load(images, processor, samples + long, batch_size=4, shuffle=False)
    assert plan(ordered, 0) == plan(ordered, 1) == [list(range(i, min(i + 4, 17))) for i in range(0, 17, 4)]


def same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert np.array_equal(a[key], b[key]), key
        else:
            flat = lambda x: [np.asarray(v) for v in x]  # noqa: E731
            for u, v in zip(a[key], b[key], strict=True):
                if isinstance(u, list):
                    assert len(u) == len(v) and all(np.array_equal(p, q) for p, q in zip(flat(u), flat(v))), key
                else:
                    assert np.array_equal(u, v), key


def test_start_step_resumes_the_same_batches(images, processor):
    ds = load(images, processor, GOOD * 2, batch_size=3, seed=11)
    full = list(ds.batches(epoch=2))
    assert len(full) == ds.steps_per_epoch() == 4
    for k in range(4):
        tail = list(ds.batches(epoch=2, start_step=k))
        assert len(tail) == 4 - k
        for a, b in zip(tail, full[k:]):
            same_batch(a, b)
    stream = ds.stream(start_step=6)  # epoch 1, step 2
    for expected in list(ds.batches(epoch=1))[2:] + full[:1]:
        same_batch(next(stream), expected)


# ---------------------------------------------------------------------------------------- bad samples


def bad_samples(root):
    """(sample or raw JSONL line, expected id, words of the reason)."""
    (root / "imgs" / "corrupt.png").write_bytes((root / "imgs" / "small.png").read_bytes()[:200])
    (root / "imgs" / "text.png").write_text("not an image")
    ok = [user("?"), assistant("!")]
    return [
        ({"id": "missing", "image": "../imgs/none.png", "conversations": ok}, "missing", "not found"),
        ({"id": "corrupt", "image": "../imgs/corrupt.png", "conversations": ok}, "corrupt", "truncated or corrupt"),
        ({"id": "notimage", "image": "../imgs/text.png", "conversations": ok}, "notimage", "not an image"),
        ({"id": "noanswer", "conversations": [user("?")]}, "noanswer", "no assistant turn"),
        ({"id": "role", "conversations": [user("?"), {"role": "tool", "content": "x"}, assistant("!")]}, "role",
         "role 'tool'"),
        ({"id": "system2", "conversations": [user("?"), {"role": "system", "content": "x"}, assistant("!")]},
         "system2", "role 'system'"),
        ({"id": "twice", "image": "../imgs/small.png", "conversations": [user("<image> <image>"), assistant("!")]},
         "twice", "2 times"),
        ({"id": "noimg", "conversations": [user("<image> what?"), assistant("!")]}, "noimg", "no image"),
        ({"id": "unused", "image": {"<image_00>": "../imgs/small.png", "<image_01>": "../imgs/small.png"},
          "conversations": [user("<image_00>"), assistant("!")]}, "unused", "<image_01> is referred to 0 times"),
        ({"id": "unknown", "image": {"<image_00>": "../imgs/small.png"},
          "conversations": [user("<image_00> <image_02>"), assistant("!")]}, "unknown", "<image_02>"),
        ({"id": "answer_img", "image": {"<image_00>": "../imgs/small.png"},
          "conversations": [user("?"), assistant("<image_00>")]}, "answer_img", "assistant message"),
        ({"id": "long", "conversations": [user("word " * 300), assistant("!")]}, "long", "max_length=256"),
        ({"id": "nocontent", "conversations": [{"role": "user"}, assistant("!")]}, "nocontent", "string 'content'"),
        ({"id": "badimage", "image": 3, "conversations": ok}, "badimage", "'image' must be"),
        ("[1, 2]", "bad.jsonl:16", "JSON object"),
        ('{"id": "broken", "conversations": [', "bad.jsonl:17", "not valid JSON"),
    ]


def test_bad_samples_are_skipped_and_reported(images, processor):
    cases = bad_samples(images)
    lines = [SINGLE] + [c[0] for c in cases]
    with pytest.warns(SkippedSamplesWarning, match=f"{len(cases)} of {len(lines)} samples are bad") as record:
        ds = load(images, processor, lines, "bad.jsonl", max_length=256)
    assert [s.sample_id for s in ds.samples] == ["single"]
    assert [b.sample_id for b in ds.bad] == [c[1] for c in cases]
    for b, (_, sample_id, words), line in zip(ds.bad, cases, range(2, 100)):
        assert words in b.reason, (sample_id, b.reason)
        assert b.location.endswith(f"bad.jsonl:{line}")
    message = str(record[0].message)
    assert all(f"(id {c[1]!r})" in message for c in cases)
    # Python's words for the setting; the report and the samples are there for a front end's own words
    assert message == record[0].message.report + "\nthey are skipped (on_bad='skip')"
    assert record[0].message.bad == ds.bad


def test_bad_samples_refused_with_one_error(images, processor):
    cases = bad_samples(images)
    with pytest.raises(SampleError, match="16 of 17 samples are bad") as err:
        load(images, processor, [SINGLE] + [c[0] for c in cases], "bad.jsonl", max_length=256, on_bad="error")
    assert [b.sample_id for b in err.value.bad] == [c[1] for c in cases]
    assert "bad.jsonl:13 (id 'long')" in str(err.value)
    assert str(err.value) == err.value.report + "\n(on_bad='skip' leaves them out)" and err.value.skippable
    with pytest.raises(SampleError, match="no usable sample"):
        load(images, processor, [c[0] for c in cases[:3]], "allbad.jsonl")
    with pytest.raises(SampleError, match="3 of 3 samples are bad") as err:
        load(images, processor, [c[0] for c in cases[:3]], "allbad.jsonl", on_bad="error")
    assert not err.value.skippable and "on_bad" not in str(err.value)   # skipping would leave nothing


def test_file_and_config_errors(images, processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="none.json"):
        load_samples(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": }]')
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON \(line 2"):
        load_samples(tmp_path / "broken.json")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no samples"):
        load_samples(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="strictly increasing"):
        DataConfig(buckets=(128, 64), max_length=100)
    with pytest.raises(ValueError, match="below max_length"):
        DataConfig(buckets=(64, 128), max_length=200)
    with pytest.raises(ValueError, match="on_bad"):
        DataConfig(on_bad="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        DataConfig(batch_size=0)


def test_image_changed_after_loading(images, processor, tmp_path):
    file = tmp_path / "img.png"
    noise_image(5, 40, 30).save(file)
    ds = FinetuneDataset.from_file(write_json(images, "changing.jsonl", [dict(SINGLE, image=str(file))], True),
                                   processor, DataConfig())
    noise_image(5, 700, 500).save(file)
    with pytest.raises(SampleError, match="'single'.*changed since the dataset was loaded"):
        next(ds.batches())
