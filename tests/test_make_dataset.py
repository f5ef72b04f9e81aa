"""Tests of the record format, decoding, caption files and tools/make_dataset (folder and TFDS)."""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import grain
import numpy as np
import pytest
from PIL import Image

from tcjepa_jax.data import captions as captions_lib
from tcjepa_jax.data import decode
from tcjepa_jax.data import records
from tcjepa_jax.tools.dataset_inputs import InputError
from tcjepa_jax.tools.dataset_writer import write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BG = np.asarray(decode.BACKGROUND, np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    """Pillow's own decode + RGB conversion: the reference for lossy formats."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def noise(h, w, seed=0, channels=3):
    shape = (h, w, channels) if channels else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def read_dataset(out: str, manifest: dict) -> dict:
    """{id: decoded record} over the manifest's shards, read back with Grain."""
    paths = [os.path.join(out, s["name"]) for s in manifest["shards"]]
    source = grain.sources.ArrayRecordDataSource(paths)
    assert len(source) == manifest["num_records"]
    rs = [records.decode_record(source[i]) for i in range(len(source))]
    return {r["id"]: r for r in rs}


# --- records -------------------------------------------------------------------------------------

def test_record_roundtrip_and_malformed():
    data = records.encode_record(id="a/b.jpg", image=b"\xff\xd8xyz", captions=["one", "two"],
                                 label=3)
    assert records.decode_record(data) == {"id": "a/b.jpg", "image": b"\xff\xd8xyz",
                                           "captions": ["one", "two"], "label": 3}
    unlabelled = records.encode_record(id="x", image=b"", captions=[])
    assert records.decode_record(unlabelled)["label"] == -1
    import msgpack  # pylint: disable=import-outside-toplevel
    bad = [b"", b"\xc1garbage", msgpack.packb([1, 2]), msgpack.packb({"id": "x"}),
           msgpack.packb({"v": 2, "id": "x", "img": b"", "cap": [], "lbl": -1}),
           msgpack.packb({"v": 1, "id": 5, "img": b"", "cap": [], "lbl": -1}),
           msgpack.packb({"v": 1, "id": "x", "img": b"", "cap": [1], "lbl": -1}),
           data[:-3]]
    for b in bad:
        with pytest.raises(decode.BadRecord) as e:
            records.decode_record(b)
        assert e.value.kind == "bad_record"
    with pytest.raises(ValueError, match="UTF-8"):
        records.encode_record(id="bad\udcff", image=b"", captions=["x"])


# --- decode --------------------------------------------------------------------------------------

def test_clean_captions():
    kept, dropped = decode.clean_captions(
            ["  a cat. ", b"a dog", b"\xff\xfe", "\ud800 lone", "", "   ", 7, None, "last"])
    assert kept == ["a cat.", "a dog", "last"]
    assert dropped == collections.Counter(
            invalid_utf8_caption=2, empty_caption=2, invalid_caption=2)
    assert decode.clean_captions(("x",)) == (["x"], collections.Counter())
    assert decode.clean_captions(None) == ([], collections.Counter())
    assert decode.clean_captions("not a list") == ([], collections.Counter())


def test_decode_image_other_modes_and_failures(monkeypatch):
    grey16 = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1361)
    big_endian = Image.frombytes("I;16B", (8, 6), grey16.astype(">u2").tobytes())
    out = decode.decode_image(encode(big_endian, "TIFF"))
    np.testing.assert_array_equal(out, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, 2))
    ints = Image.fromarray(np.array([[-5, 0, 256, 70000]], np.int32))
    assert decode.decode_image(encode(ints, "TIFF"))[0, :, 0].tolist() == [0, 0, 1, 255]
    floats = Image.fromarray(np.array([[-1.0, 0.0, 0.5, 1.0, 7.0]], np.float32))
    assert decode.decode_image(encode(floats, "TIFF"))[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    la = np.stack([np.full((4, 4), 200, np.uint8), np.array([[0, 255, 0, 255]] * 4, np.uint8)], -1)
    out = decode.decode_image(encode(Image.fromarray(la), "PNG"))
    assert (out[:, 0] == BG).all() and (out[:, 1] == 200).all()
    bilevel = Image.fromarray(noise(5, 7, channels=0) > 127)
    out = decode.decode_image(encode(bilevel, "PNG"))
    assert out.shape == (5, 7, 3) and set(np.unique(out)) <= {0, 255}
    for fmt in ("PNG", "JPEG"):
        out = decode.decode_image(encode(Image.fromarray(noise(9, 5)), fmt))
        assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable

    def kind(data):
        with pytest.raises(decode.BadRecord) as e:
            decode.decode_image(data)
        return e.value.kind

    assert kind(b"") == kind(None) == "empty_image"
    jpeg = encode(Image.fromarray(noise(32, 32)), "JPEG")
    assert kind(jpeg[: len(jpeg) // 2]) == "truncated_image"
    assert kind(b"hello, not an image") == kind(12) == kind("text") == "undecodable_image"
    rng = np.random.default_rng(1)
    for _ in range(30):  # corrupted files raise BadRecord, never anything else
        png = encode(Image.fromarray(noise(8, 8)), "PNG")
        data = bytearray(jpeg if rng.random() < 0.5 else png)
        for i in rng.integers(0, len(data), 8):
            data[i] = rng.integers(0, 256)
        try:
            decode.decode_image(bytes(data))
        except decode.BadRecord as e:
            assert e.kind in ("truncated_image", "undecodable_image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32 * 32 > 2 * 100: a "bomb"
    assert kind(jpeg) == "undecodable_image"
    monkeypatch.setattr(decode.Image, "open", lambda f: Image.new("RGB", (0, 3)))
    assert kind(jpeg) == "zero_size_image"


# --- caption files -------------------------------------------------------------------------------

def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return str(path)


def test_caption_file(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [
            {"id": "train/cat.jpg", "captions": ["a cat.", ""]},
            {"id": 42, "captions": "the answer."},
            {"id": "dog", "captions": ["a dog."]},
            {"id": "train/cat.jpg", "captions": ["a duplicate."]},
            b"",
            b"{not json",
            b'["a list"]',
            {"id": None, "captions": ["x"]},
            {"id": "nocaps"},
            {"id": "badcaps", "captions": {"a": 1}},
            b'{"id": "latin", "captions": ["caf\xe9"]}',
    ])
    cf = captions_lib.CaptionFile(path)
    assert len(cf) == 3
    assert cf.bad_lines == collections.Counter(
            bad_caption_line=5, invalid_utf8_caption_line=1, duplicate_caption_id=1)
    assert cf.get("train/cat.jpg") == ["a cat.", ""]
    assert cf.get("42") == ["the answer."] and cf.get("x/42.png") == ["the answer."]
    assert cf.get("photos/dog.jpeg") == ["a dog."]  # by basename without extension
    assert cf.get("cat.jpg") is None and cf.get("nowhere") is None
    again = pickle.loads(pickle.dumps(cf))
    assert len(pickle.dumps(cf)) < 2000 and again.get("train/cat.jpg") == ["a cat.", ""]
    keys = ["train/cat.jpg", "42", "dog", "missing"] * 50
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(again.get, keys)) == [cf.get(k) for k in keys]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        captions_lib.CaptionFile(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="no valid lines"):
        captions_lib.CaptionFile(write_lines(tmp_path / "bad.jsonl", [b"nope", {"id": 1}]))


def test_caption_file_hash_collisions(tmp_path, monkeypatch):
    monkeypatch.setattr(captions_lib, "_hash", lambda key: 7)  # every id collides
    path = write_lines(tmp_path / "c.jsonl", [{"id": "a", "captions": ["first a"]},
                                              {"id": "b", "captions": ["b"]},
                                              {"id": "a", "captions": ["second a"]}])
    cf = captions_lib.CaptionFile(path)
    assert len(cf) == 2 and cf.bad_lines == {"duplicate_caption_id": 1}
    assert cf.get("a") == ["first a"] and cf.get("b") == ["b"] and cf.get("c") is None


# --- make_dataset from a folder ------------------------------------------------------------------

def make_image_folder(root):
    """Writes image files of many formats and modes (and bad ones) and a caption file.

    Returns (caption file, {id: (expected pixels, expected captions)}) for the good images.
    """
    root.mkdir()
    (root / "sub").mkdir()
    expected, files = {}, {}
    rgb = noise(20, 30)

    def add(name, data, pixels, caps=None):
        files[name] = data
        if pixels is not None:
            expected[name] = (pixels, caps or [f"a picture called {name}."])

    add("rgb.png", encode(Image.fromarray(rgb), "PNG"), rgb)
    data = encode(Image.fromarray(rgb), "JPEG", quality=90)
    add("sub/rgb.jpg", data, pillow_rgb(data))
    grey = noise(20, 30, channels=0)
    add("grey.png", encode(Image.fromarray(grey), "PNG"), np.repeat(grey[..., None], 3, 2))
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 10:20], alpha[:, 20:] = 255, 100
    rgba = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1))
    blend = (rgb.astype(int) * 100 + BG.astype(int) * 155 + 127) // 255
    add("rgba.png", encode(rgba, "PNG"),
        np.concatenate([np.broadcast_to(BG, (20, 10, 3)), rgb[:, 10:20], blend[:, 20:]], 1))
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    index = np.random.default_rng(3).integers(0, 4, (20, 30)).astype(np.uint8)
    pal = Image.frombytes("P", (30, 20), index.tobytes())
    pal.putpalette(palette.flatten().tolist())
    add("palette.png", encode(pal, "PNG", transparency=0), np.where(
            (index == 0)[..., None], BG, palette[index]))
    deep = (np.arange(600, dtype=np.uint32).reshape(20, 30) * 109 % 65536).astype(np.uint16)
    add("deep16.png", encode(Image.fromarray(deep), "PNG"),
        np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, 2))
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(pillow_rgb(data).astype(int) - rgb).mean() < 20  # the Adobe inversion is undone
    add("cmyk.jpg", data, pillow_rgb(data))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(rgb), "JPEG", exif=exif.tobytes(), quality=90)
    add("sub/rotated.jpg", data, np.rot90(pillow_rgb(data), k=-1))
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    add("anim.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        np.broadcast_to(np.uint8([255, 0, 0]), (20, 30, 3)))
    add("rgb.bmp", encode(Image.fromarray(rgb), "BMP"), rgb)
    add("rgb.tiff", encode(Image.fromarray(rgb), "TIFF"), rgb)
    data = encode(Image.fromarray(rgb), "WEBP", quality=80)
    add("rgb.webp", data, pillow_rgb(data))
    add("mixed.png", encode(Image.fromarray(rgb), "PNG"), rgb, ["first.", "second."])
    # the bad ones: counted by kind, never written
    add("truncated.jpg", files["sub/rgb.jpg"][:300], None)
    add("empty.jpg", b"", None)
    add("text.jpg", b"this is not an image\n", None)
    add("nocaptions.png", files["rgb.png"], None)
    add("emptycaption.png", files["rgb.png"], None)
    add(".hidden.png", files["rgb.png"], None)
    for name, data in files.items():
        (root / name).write_bytes(data)
    os.symlink(root / "nowhere.png", root / "broken_link.png")  # reading it raises: a read error

    lines = [{"id": name, "captions": expected[name][1]} for name in sorted(expected)
             if name != "mixed.png"]
    lines[0]["id"] = os.path.splitext(lines[0]["id"])[0]  # matched by the name without extension
    lines += [{"id": "mixed.png", "captions": ["first.", "  ", "second."]},
              {"id": "emptycaption.png", "captions": [" "]},
              {"id": "truncated.jpg", "captions": ["x"]}, {"id": "empty.jpg", "captions": ["x"]},
              {"id": "text.jpg", "captions": ["x"]}, {"id": "broken_link", "captions": ["x"]},
              b"{malformed"]
    return write_lines(root.parent / "captions.jsonl", lines), expected


EXPECTED_SKIPS = {"truncated_image": 1, "empty_image": 1, "undecodable_image": 1,
                  "missing_captions": 1, "no_valid_captions": 1, "read_error": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder") / "images"
    caption_file, expected = make_image_folder(root)
    return str(root), caption_file, expected


def test_folder_roundtrip(folder, tmp_path):
    root, caption_file, expected = folder
    out = str(tmp_path / "out")
    manifest = write_dataset(out, images=root, captions=caption_file, shard_size=7, workers=2)
    assert manifest["format"] == "tcjepa_jax.records/1"
    assert manifest["num_records"] == len(expected) and len(manifest["shards"]) == 3
    assert manifest["skipped"] == EXPECTED_SKIPS
    assert manifest["dropped_captions"] == {"empty_caption": 2}
    assert manifest["caption_file_bad_lines"] == {"bad_caption_line": 1}
    assert len(manifest["read_errors"]) == 1 and "broken_link.png" in manifest["read_errors"][0]
    assert manifest["captions"]["sentences_per_image"] == {
            "mean": round((len(expected) + 1) / len(expected), 3), "min": 1, "max": 2}
    assert manifest["source"]["images"] == root and manifest["source"]["num_items"] == 19
    got = read_dataset(out, manifest)
    assert set(got) == set(expected)  # ids are relative paths; hidden and bad files are not there
    for key, (pixels, caps) in expected.items():
        r = got[key]
        assert r["captions"] == caps and r["label"] == -1, key
        with open(os.path.join(root, key), "rb") as f:
            assert r["image"] == f.read(), key  # the original bytes, not re-encoded
        image = decode.decode_image(r["image"])
        assert image.shape == pixels.shape, key
        np.testing.assert_array_equal(image, pixels, err_msg=key)
    assert decode.decode_image(got["sub/rotated.jpg"]["image"]).shape == (30, 20, 3)  # was 20 x 30
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def class_folder(root, counts=(3, 1, 3)):
    """An ImageNet-style folder: class_<c>/img<i>.png; and a caption file next to it."""
    lines = []
    for c, n in enumerate(counts):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(n):
            name = f"class_{c}/img{i}.png"
            (root / name).write_bytes(encode(Image.fromarray(noise(8, 8, seed=10 * c + i)), "PNG"))
            lines.append({"id": name, "captions": [f"class {c} image {i}."]})
    return str(root), write_lines(root.parent / "captions.jsonl", lines)


def dataset_files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
            if n.startswith("shard-") or n.startswith(".shard-")}


def test_labels_resume_refuse_and_overwrite(tmp_path, capsys):
    root, caption_file = class_folder(tmp_path / "images")
    args = dict(images=root, captions=caption_file, label_from="dirname", shard_size=2, workers=1)
    clean = write_dataset(str(tmp_path / "clean"), **args)
    got = read_dataset(str(tmp_path / "clean"), clean)
    assert {k: r["label"] for k, r in got.items()} == {
            f"class_{c}/img{i}.png": c for c, n in enumerate((3, 1, 3)) for i in range(n)}
    assert clean["label_names"] == ["class_0", "class_1", "class_2"]
    assert not clean["skipped"] and clean["num_records"] == 7

    out = str(tmp_path / "out")
    write_dataset(out, **args)
    shard1 = os.path.join(out, clean["shards"][1]["name"])
    os.remove(shard1)  # an interrupted run: shard 1 not committed, shard 2 half written,
    os.remove(os.path.join(out, "manifest.json"))  # no manifest yet
    temp = os.path.join(out, f".{clean['shards'][2]['name']}.tmp")
    with open(temp, "wb") as f:
        f.write(b"partial")
    os.remove(os.path.join(out, clean["shards"][2]["name"]))
    capsys.readouterr()
    resumed = write_dataset(out, **{**args, "workers": 2})  # workers do not change the content
    assert "2 of 4 shards were already complete" in capsys.readouterr().out
    assert not os.path.exists(temp) and os.path.exists(shard1)
    assert dataset_files(out) == dataset_files(str(tmp_path / "clean"))
    assert {k: v for k, v in resumed.items() if k != "created"} == {
            k: v for k, v in clean.items() if k != "created"}

    write_dataset(out, **args)
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"different arguments: --shard_size=2 \(now 3\)"):
        write_dataset(out, **{**args, "shard_size": 3})
    with pytest.raises(InputError, match="--overwrite"):
        write_dataset(out, **{**args, "shard_size": 3})
    redone = write_dataset(out, **{**args, "shard_size": 3}, overwrite=True)
    assert len(redone["shards"]) == 3 and len(os.listdir(out)) == 2 * 3 + 2  # old shards gone

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by make_dataset"):
        write_dataset(str(foreign), **args)
    write_dataset(str(foreign), **args, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"not": "ours"}')
    with pytest.raises(InputError, match="manifest.json that make_dataset did not write"):
        write_dataset(str(tmp_path / "other"), **args, overwrite=True)


def test_user_errors(folder, tmp_path):
    root, caption_file, _ = folder
    out = str(tmp_path / "out")
    cases = [
            (dict(images=root), "needs --captions"),
            (dict(images=root, tfds="x", captions=caption_file), "exactly one input"),
            (dict(images=str(tmp_path / "nope"), captions=caption_file), "no such folder"),
            (dict(images=root, captions=str(tmp_path / "nope.jsonl")), "does not exist"),
            (dict(images=root, captions=caption_file, caption_key="c"), "go with --tfds"),
            (dict(tfds="tiny_captions"), "needs captions"),
    ]
    cases.append((dict(images=root, captions=caption_file, label_from="dirname"),
                  "have no class folder"))
    (tmp_path / "empty").mkdir()
    cases.append((dict(images=str(tmp_path / "empty"), captions=caption_file), "no .*files"))
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            write_dataset(out, **kwargs)
    assert not os.path.exists(out)
    with pytest.raises(InputError, match="--out"):
        write_dataset("", images=root, captions=caption_file)


def test_cli(folder, tmp_path):
    root, caption_file, expected = folder
    cmd = [sys.executable, "-m", "tcjepa_jax.tools.make_dataset", f"--images={root}",
           f"--out={tmp_path / 'out'}", "--shard_size=10"]
    done = subprocess.run(cmd + [f"--captions={caption_file}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"wrote {len(expected)} records in 2 shards" in done.stdout
    for kind in [*EXPECTED_SKIPS, "empty_caption", "bad_caption_line"]:
        assert kind in done.stdout, kind
    failed = subprocess.run(cmd[:-1] + [f"--captions={tmp_path / 'missing.jsonl'}",
                                        f"--out={tmp_path / 'out2'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == [
            f"error: --captions={tmp_path / 'missing.jsonl'}: caption file does not exist"]
