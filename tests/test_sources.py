"""Real data through the Grain pipeline: ArrayRecord shards and TFDS, worker processes,
simulated hosts, exact resume, bad records skipped and counted, and training on both sources.

The shards here are written directly with records.encode_record (make_dataset, which refuses bad
files, is tested in test_make_dataset.py): that is how bad records reach a run in practice, from
shards written by other tools or damaged later.
"""

import io
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from tcjepa_jax import train as train_lib
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data import pipeline, records, transforms
from tcjepa_jax.data import synthetic
from tcjepa_jax.data.sources import array_record as array_record_source
from tcjepa_jax.data.tokenizer import Tokenizer, train_tokenizer
from tcjepa_jax.masks import MaskSpec

import test_train  # the tiny train config and its compiled programs (persistent cache)
import tiny_tfds

NUM_RECORDS = 48
SPEC = MaskSpec(grid=(8, 8))


# ---- Shards --------------------------------------------------------------------------------

def png(value: int, size: int = 16) -> bytes:
    """A uniform image whose every pixel is `value`: crops keep it, so batches reveal the record."""
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def jpeg(seed: int, size: int = 48) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


# Bad records by position: what is stored there, and the kind the pipeline counts it as.
BAD = {
    5: (records.encode_record(id="r5", image=jpeg(5)[:200], captions=["cut short."]),
        "truncated_image"),
    11: (records.encode_record(id="r11", image=b"", captions=["no pixels."]), "empty_image"),
    17: (records.encode_record(id="r17", image=b"just some text", captions=["text."]),
         "undecodable_image"),
    23: (records.encode_record(id="r23", image=png(23), captions=[]), "no_valid_captions"),
    29: (b"\x00\x01 not a record at all", "bad_record"),
}


def write_shards(directory, bad=False, per_shard=16):
    """NUM_RECORDS records in shards of `per_shard`; record i is a uniform image of value i."""
    os.makedirs(directory, exist_ok=True)
    for start in range(0, NUM_RECORDS, per_shard):
        name = f"shard-{start // per_shard:05d}-of-{NUM_RECORDS // per_shard:05d}.array_record"
        writer = ArrayRecordWriter(os.path.join(str(directory), name), "group_size:1")
        for i in range(start, start + per_shard):
            if bad and i in BAD:
                writer.write(BAD[i][0])
            else:
                captions = [f"record {i}.", "", "a grey square."] if i == 7 else [
                    f"record {i}.", "a grey square."]
                writer.write(records.encode_record(id=f"r{i}", image=png(i), captions=captions))
        writer.close()
    return str(directory)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("bad_shards"), bad=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(synthetic.iter_captions(0, 150),
                           str(tmp_path_factory.mktemp("tok") / "spm"), 64)
    return Tokenizer(path)


def config_for(data_dir, **overrides):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.batch_size = 4
    c.input = ml_collections.ConfigDict(dict(
        source="array_record", split="train", data_dir=data_dir, caption_file="",
        image_size=32, crop_scale=(0.3, 1.0), num_captions=2, max_caption_len=8,
        num_threads=2, prefetch=1, workers=0, skip_uncaptioned=True))
    c.input.update(overrides)
    return c


def record_values(batch):
    px = batch["image"][:, 0, 0, 0] * transforms.IMAGENET_STD[0] + transforms.IMAGENET_MEAN[0]
    return np.round(px * 255).astype(int).tolist()


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ---- The source ----------------------------------------------------------------------------

def test_array_record_source_reads_records_and_finds_shards(shards, tmp_path):
    paths = array_record_source.find_shards(shards)
    assert len(paths) == 3 and paths == sorted(paths)
    source = pipeline.make_source(config_for(shards).input, "train")
    assert len(source) == NUM_RECORDS
    r = source[20]
    assert r["id"] == "r20" and r["captions"] == ["record 20.", "a grey square."] and r["label"] == -1
    # A glob and a comma-separated list name the same shards.
    assert array_record_source.find_shards(os.path.join(shards, "shard-0000[01]*")) == paths[:2]
    assert array_record_source.find_shards(f"{paths[0]}, {paths[2]}") == [paths[0], paths[2]]
    for spec, needle in ((str(tmp_path / "missing"), "does not exist"),
                         (str(tmp_path / "*.array_record"), "make_dataset"),
                         (str(tmp_path), "no \\*.array_record shards found for directory"),
                         ("", "input.data_dir")):
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            pipeline.make_source(config_for(spec).input, "train")


def test_caption_file_replaces_stored_captions(shards, tmp_path):
    path = tmp_path / "captions.jsonl"
    path.write_text('{"id": "r3", "captions": ["from the file."]}\n'
                    '{"id": "r4", "captions": ["another one.", "two."]}\n')
    source = pipeline.make_source(config_for(shards, caption_file=str(path)).input, "train")
    assert source[3]["captions"] == ["from the file."]
    assert source[4]["captions"] == ["another one.", "two."]
    assert source[5]["captions"] is None  # not in the file: the pipeline counts it
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipeline.make_source(config_for(shards, caption_file=str(tmp_path / "no.jsonl")).input,
                             "train")


# ---- Workers, hosts, resume ----------------------------------------------------------------

@pytest.fixture(scope="module")
def no_worker_batches(shards, tokenizer):
    it = pipeline.make_train_iterator(config_for(shards), tokenizer, SPEC)
    return take(it, 14)  # crosses into the second epoch (48 records / 4)


@pytest.mark.parametrize("workers", [1, 2])
def test_same_batches_with_any_number_of_workers(shards, tokenizer, no_worker_batches, workers):
    it = pipeline.make_train_iterator(config_for(shards, workers=workers), tokenizer, SPEC)
    try:
        assert_same_batches(take(it, 14), no_worker_batches)
    finally:
        it.close()


def test_hosts_get_disjoint_records_covering_an_epoch(shards, tokenizer):
    seen = []
    for host in range(2):
        it = pipeline.make_train_iterator(config_for(shards, workers=1), tokenizer, SPEC,
                                          process_index=host, process_count=2)
        try:
            seen.append([v for b in take(it, 12) for v in record_values(b)])  # 12 x 2 = 24
        finally:
            it.close()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_RECORDS))


def test_resume_with_workers_gives_the_same_next_batches(shards, tokenizer, no_worker_batches):
    config = config_for(shards, workers=2)
    it = pipeline.make_train_iterator(config, tokenizer, SPEC)
    try:
        take(it, 5)
        state = it.get_state()
    finally:
        it.close()
    fresh = pipeline.make_train_iterator(config, tokenizer, SPEC)
    try:
        fresh.set_state(state)
        assert_same_batches(take(fresh, 9), no_worker_batches[5:14])
    finally:
        fresh.close()


def test_bad_records_are_skipped_and_counted_by_kind(bad_shards, tokenizer):
    it = pipeline.make_train_iterator(config_for(bad_shards, workers=2), tokenizer, SPEC)
    try:
        values = [v for b in take(it, 10) for v in record_values(b)]  # 40 of the 43 good ones
        state = it.get_state()
    finally:
        it.close()
    assert len(values) == 40 and not set(values) & set(BAD)
    counter = it.counter
    expected = {kind for _, kind in BAD.values()}
    assert set(counter.skipped) <= expected and counter.count >= 1
    assert counter.dropped["empty_caption"] <= 1
    metrics = counter.metrics()
    assert metrics["bad_records"] == counter.count
    assert all(metrics[f"bad_records/{k}"] == n for k, n in counter.skipped.items())
    # The counts are part of the checkpointed state, and an epoch shows every kind once.
    assert state["counts"]["skipped"] == dict(counter.skipped)
    it = pipeline.make_train_iterator(config_for(bad_shards), tokenizer, SPEC)
    take(it, 11)  # 44 good records: the 43 of the first epoch and one more
    assert set(it.counter.skipped) == {kind for _, kind in BAD.values()}
    assert all(1 <= n <= 2 for n in it.counter.skipped.values())
    assert 1 <= it.counter.dropped["empty_caption"] <= 2


def test_uncaptioned_records_can_train_unconditioned(bad_shards, tokenizer):
    config = config_for(bad_shards, skip_uncaptioned=False)
    it = pipeline.make_train_iterator(config, tokenizer, SPEC)
    batches = take(it, (NUM_RECORDS - len(BAD) + 1) // 4)
    assert "no_valid_captions" not in it.counter.skipped
    no_caption = [i for b in batches for i, valid in enumerate(b["caption_valid"]) if not valid.any()]
    assert len(no_caption) == 1


# ---- Training on real data -----------------------------------------------------------------

@pytest.fixture
def keep_sigterm_handler():
    import signal
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_training_on_array_record_with_bad_records(test_train_tokenizer_path, bad_shards,
                                                   tmp_path, keep_sigterm_handler, caplog):
    config = test_train.tiny_config(test_train_tokenizer_path)
    config.input.source = "array_record"
    config.input.data_dir = bad_shards
    config.input.workers = 1
    metrics = train_lib.train(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["loss"])
    assert metrics["bad_records"] >= 1
    kinds = {k.split("/", 1)[1] for k in metrics if k.startswith("bad_records/")}
    assert kinds <= {kind for _, kind in BAD.values()} and kinds
    assert os.listdir(tmp_path / "run" / "tensorboard")


def test_training_on_tfds(test_train_tokenizer_path, tmp_path, keep_sigterm_handler):
    name, examples = tiny_tfds.build_tiny_tfds(tmp_path / "tfds", num_examples=20, image_size=32)
    config = test_train.tiny_config(test_train_tokenizer_path)
    config.input.update(source="tfds", tfds_name=name, data_dir=str(tmp_path / "tfds"),
                        caption_key="captions", id_key="id", label_key="label")
    source = pipeline.make_source(config.input, "train")
    assert len(source) == 20
    record = source[3]
    assert isinstance(record["image"], bytes)
    by_id = {e[0]: e for e in examples}
    np.testing.assert_array_equal(pipeline.record_image(record), by_id[record["id"]][3])
    assert [c.decode() if isinstance(c, bytes) else c for c in record["captions"]] == list(
        by_id[record["id"]][1])
    assert record["label"] == by_id[record["id"]][2]
    metrics = train_lib.train(config, str(tmp_path / "run"))
    assert np.isfinite(metrics["loss"]) and metrics["bad_records"] == 0

    # A caption file joined on the id feature replaces the dataset's own captions.
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"id": "img_003.png", "captions": ["from the caption file."]}\n')
    config.input.caption_file = str(captions)
    source = pipeline.make_source(config.input, "train")
    assert [source[i]["captions"] for i in range(20) if source[i]["id"] == "img_003.png"] == [
        ["from the caption file."]]
    assert sum(source[i]["captions"] is None for i in range(20)) == 19


def test_train_tokenizer_on_array_record_captions(shards, tmp_path):
    """tools/train_tokenizer --config reads the captions of any source."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [test_train.REPO, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-m", "tcjepa_jax.tools.train_tokenizer",
         "--config=configs/synthetic_tiny.py", "--config.input.source=array_record",
         f"--config.input.data_dir={shards}", "--config.probe.enabled=False", "--vocab_size=40",
         f"--out={tmp_path / 'tok'}"], cwd=test_train.REPO, env=env, capture_output=True,
        text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = Tokenizer(str(tmp_path / "tok.model"))
    assert tokenizer.decode(tokenizer.encode(["record 12."], 16)[0][0]) == "record 12."


def test_tfds_user_errors(tmp_path):
    name, _ = tiny_tfds.build_tiny_tfds(tmp_path / "tfds", num_examples=4, image_size=16)
    base = dict(source="tfds", tfds_name=name, data_dir=str(tmp_path / "tfds"), image_key="image",
                caption_key="captions", id_key="id", label_key="")
    cases = [(dict(tfds_name="no_such_dataset_xyz"), "no_such_dataset_xyz"),
             (dict(caption_key="caption_text"), "caption_text"),
             (dict(data_dir=str(tmp_path / "empty")), "not prepared"),
             (dict(caption_file=str(tmp_path / "no.jsonl")), "does not exist")]
    for override, needle in cases:
        cfg = ml_collections.ConfigDict(dict(base, **override))
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            pipeline.make_source(cfg, "train")


@pytest.fixture(scope="module")
def test_train_tokenizer_path(tmp_path_factory):
    """The tokenizer test_train's programs were compiled for (same vocabulary, same program)."""
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "spm")
    return train_tokenizer(synthetic.iter_captions(0, 1000), prefix, vocab_size=256)


def test_missing_shards_is_a_user_error_before_compiling(test_train_tokenizer_path, tmp_path,
                                                         keep_sigterm_handler):
    config = test_train.tiny_config(test_train_tokenizer_path)
    config.input.source = "array_record"
    config.input.data_dir = str(tmp_path / "nothing_here")
    with pytest.raises(UserError, match="make_dataset"):
        train_lib.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
