"""`d2v shard` against a real local Ray: shards read back by webdataset and Ray Data, planted bad inputs
rejected with reasons, byte-identical reruns, resume after a kill, refusal of changed inputs, text round trip.

Fixtures are tiny generated corpora (PIL images, numpy-synthesised audio, a few text files).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import struct
import unicodedata
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from pipelines import decode
from pipelines.manifest import sample_keys
from pipelines.shard import ShardJobError, run_shard
from pipelines.tokenizer import EOS_ID, SPECIAL_TOKENS, encode_documents, load_tokenizer, train_bpe

BOMB_LIMIT = 100_000  # max_image_pixels for the vision runs: good images are ≤ 64x64, the bomb claims 1000x1000


# ---------------------------------------------------------------- corpora

def _png_with_claimed_size(path, w, h):
    """A tiny real PNG whose IHDR claims w x h (CRC fixed): Pillow reads the header, not the pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", w, h)  # IHDR payload starts at byte 16: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def vision_src(tmp_path_factory):
    """~30 images: 3 class folders in ImageNet layout, many modes/formats, plus planted bad files."""
    root = tmp_path_factory.mktemp("vision_src")
    rng = np.random.default_rng(0)
    good = []

    def save(rel, img, **kw):
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        img.save(root / rel, **kw)
        good.append(rel)

    for c in ("n01440764", "n01443537", "n01484850"):
        for i in range(6):
            h, w = rng.integers(16, 64, 2)
            save(f"{c}/{c}_{i}.png", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    base = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    save("n01440764/rgb.jpg", base, quality=90)  # RGB JPEG, upright: stored as the source bytes
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored as PNG with swapped sides
    save("n01440764/rotated.jpg", base, exif=exif)
    save("n01443537/cmyk.jpg", base.convert("CMYK"))
    save("n01443537/grey16.png", Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)))
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent → white
    save("n01443537/alpha.png", rgba)
    pal = base.quantize(8)
    pal.info["transparency"] = 0
    save("n01484850/palette.png", pal, transparency=0)
    save("n01484850/anim.gif", base.quantize(16))
    save("n01484850/grey.bmp", base.convert("L"))
    save("n01484850/float.tiff", Image.fromarray(rng.random((20, 20), dtype=np.float32)))
    save("n01484850/bilevel.png", base.convert("1"))
    save("top_level.png", base)  # no class folder → label null
    # planted bad inputs: (rel, expected words in the reason)
    bad = {"n01440764/empty.png": "empty", "n01443537/notes.png": "not an image",
           "n01484850/truncated.png": "truncated", "n01484850/bomb.png": "decompression-bomb"}
    (root / "n01440764/empty.png").write_bytes(b"")
    (root / "n01443537/notes.png").write_text("this is a text file, not an image\n")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "n01484850/truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _png_with_claimed_size(root / "n01484850/bomb.png", 1000, 1000)
    return root, sorted(good), bad


@pytest.fixture(scope="module")
def vision_out(ray_local, vision_src, tmp_path_factory):
    src, _, _ = vision_src
    dst = tmp_path_factory.mktemp("vision_dst")
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    return dst, stats


def _tone(seconds, sr, freq=440.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) * np.linspace(0.2, 1.0, len(t))  # a swelling tone
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture(scope="module")
def audio_src(tmp_path_factory):
    """LibriSpeech-style tree with transcripts, several rates/formats/channels, and planted bad files."""
    root = tmp_path_factory.mktemp("audio_src")
    good = {  # rel → (seconds, rate, format/subtype, channels)
        "19/198/19-198-0000.flac": (1.0, 16000, ("FLAC", "PCM_16"), 1),
        "19/198/19-198-0001.wav": (1.2, 8000, ("WAV", "PCM_16"), 1),
        "19/198/19-198-0002.ogg": (0.8, 22050, ("OGG", "VORBIS"), 1),
        "19/227/19-227-0000.wav": (1.0, 44100, ("WAV", "FLOAT"), 2),
        "19/227/19-227-0001.flac": (0.7, 48000, ("FLAC", "PCM_24"), 2),
        "26/495/26-495-0000.mp3": (1.0, 22050, ("MP3", "MPEG_LAYER_III"), 1),
        "26/495/26-495-0001.wav": (2.5, 11025, ("WAV", "PCM_U8"), 1),
        "extra/clip.flac": (0.6, 32000, ("FLAC", "PCM_16"), 1),
    }
    for i, (rel, (sec, sr, (fmt, sub), ch)) in enumerate(sorted(good.items())):
        os.makedirs(os.path.dirname(root / rel), exist_ok=True)
        sf.write(root / rel, _tone(sec, sr, 220 + 40 * i, ch), sr, format=fmt, subtype=sub)
    (root / "19/198/19-198.trans.txt").write_text("19-198-0000 HELLO WORLD\n19-198-0001 GOOD MORNING\n"
                                                 "19-198-0002 A THIRD LINE\n")
    (root / "19/227/19-227.trans.txt").write_text("19-227-0000 STEREO INPUT\n")
    transcripts = {"19/198/19-198-0000.flac": "HELLO WORLD", "19/198/19-198-0001.wav": "GOOD MORNING",
                   "19/198/19-198-0002.ogg": "A THIRD LINE", "19/227/19-227-0000.wav": "STEREO INPUT"}
    bad = {"bad/silent.wav": "silent", "bad/short.flac": "too short", "bad/long.wav": "too long",
           "bad/garbage.wav": "not decodable", "bad/empty.flac": "empty", "bad/nan.wav": "nan",
           "README.TXT": "unsupported extension"}
    os.makedirs(root / "bad")
    sf.write(root / "bad/silent.wav", np.zeros(16000), 16000)
    sf.write(root / "bad/short.flac", _tone(0.2, 16000), 16000)
    sf.write(root / "bad/long.wav", _tone(3.5, 8000), 8000)
    (root / "bad/garbage.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    (root / "bad/empty.flac").write_bytes(b"")
    x = _tone(1.0, 16000).astype(np.float32)
    x[100] = np.nan
    sf.write(root / "bad/nan.wav", x, 16000, subtype="FLOAT")
    (root / "README.TXT").write_text("LibriSpeech-style readme\n")
    return root, sorted(good), transcripts, bad


DOCS = {  # file → its documents after normalisation (what the stream must decode back to)
    "a.txt": ["The quick brown fox jumps over the lazy dog.", "Second document.\nIt has two lines.",
              "Literal special tokens like <mask> and </s> are just text."],
    "b/c.txt": ["Café au lait, déjà vu — naïve façade.", "Ünïcödé and emoji 🙂 survive byte-level BPE."],
    "b/d.txt": [f"Document number {i}: " + ("lorem ipsum dolor sit amet " * (i % 4 + 1)).strip() for i in range(12)],
}


@pytest.fixture(scope="module")
def text_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_src")
    os.makedirs(root / "b")
    # a.txt: CRLF line ends, control chars, a BOM, extra blank lines → normalised to DOCS["a.txt"]
    raw_a = "\ufeff" + "\n\n\n".join(DOCS["a.txt"]).replace("\n", "\r\n").replace("quick", "qu\x07ick") + "\r\n"
    (root / "a.txt").write_bytes(raw_a.encode())
    nfd = "\n\n  \t\n".join(unicodedata.normalize("NFD", d) for d in DOCS["b/c.txt"])  # decomposed accents
    (root / "b/c.txt").write_bytes(nfd.encode())
    (root / "b/d.txt").write_text("\n\n".join(DOCS["b/d.txt"]) + "\n")
    bad = {"latin1.txt": "not valid UTF-8", "empty.txt": "empty", "blank.txt": "no text left",
           "notes.md": "unsupported extension"}
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("  \n\n\t\n\x0c\n")
    (root / "notes.md").write_text("# not a .txt file\n")
    return root, bad


# ---------------------------------------------------------------- helpers

def _files(dst) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(f"{dst}/*.tar")) + [f"{dst}/manifest.parquet", f"{dst}/rejects.parquet"]}


def _mtimes(dst) -> dict[str, int]:
    return {p: os.stat(p).st_mtime_ns for p in sorted(glob.glob(f"{dst}/*.tar")) + [f"{dst}/manifest.parquet"]}


def _wds_samples(dst):
    urls = sorted(glob.glob(f"{dst}/*.tar"))
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _check_layout(dst, stats, modality, per_shard):
    """Stable names, exact samples per shard, manifest == what webdataset and Ray Data read back."""
    man = pq.read_table(f"{dst}/manifest.parquet").to_pylist()
    n = len(man)
    names = sorted(os.path.basename(p) for p in glob.glob(f"{dst}/*.tar"))
    assert names == [f"{modality}-{i:06d}.tar" for i in range(-(-n // per_shard))]
    counts = [sum(r["shard"] == s for r in man) for s in names]
    assert counts[:-1] == [per_shard] * (len(names) - 1) and 1 <= counts[-1] <= per_shard
    samples = _wds_samples(dst)
    assert [s["__key__"] for s in samples] == [r["key"] for r in man]
    assert [os.path.basename(s["__url__"]) for s in samples] == [r["shard"] for r in man]
    assert stats["samples"] == n and stats["num_shards"] == len(names)
    assert not glob.glob(f"{dst}/*.tmp")
    import ray.data

    # decoder=None: Ray's default decoder cannot put png rows and jpg rows in one tensor column
    rows = ray.data.read_webdataset(sorted(glob.glob(f"{dst}/*.tar")), decoder=None).take_all()
    assert sorted(r["__key__"] for r in rows) == sorted(r["key"] for r in man)
    return man, samples


def _rejects(dst) -> dict[str, tuple[str, str]]:
    return {r["source"]: (r["stage"], r["reason"]) for r in pq.read_table(f"{dst}/rejects.parquet").to_pylist()}


# ---------------------------------------------------------------- vision

@pytest.mark.slow
def test_vision_shards_readable_exact_and_complete(vision_src, vision_out):
    src, good, bad = vision_src
    dst, stats = vision_out
    man, samples = _check_layout(dst, stats, "vision", 8)
    assert {r["source"] for r in man} == set(good)  # every good input is in a shard …
    rejects = _rejects(dst)
    assert set(rejects) == set(bad)  # … every bad one is rejected, with a reason naming the problem
    for rel, words in bad.items():
        assert words in rejects[rel][1], (rel, rejects[rel])
    assert stats["inputs"] == stats["samples"] + stats["rejects"] == len(good) + len(bad)
    for s, r in zip(samples, man):
        meta = json.loads(s["json"])
        assert meta["source"] == r["source"] and meta["label"] == r["label"]
        assert r["label"] == (os.path.dirname(r["source"]) or None)
        ext = "jpg" if "jpg" in s else "png"
        assert len(s[ext]) == r["bytes"] and ("jpg" in s) != ("png" in s)
        img = Image.open(io.BytesIO(s[ext]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"])
    by_src = {r["source"]: s for r, s in zip(man, samples)}
    assert by_src["n01440764/rgb.jpg"]["jpg"] == (src / "n01440764/rgb.jpg").read_bytes()  # untouched JPEG
    assert Image.open(io.BytesIO(by_src["n01440764/rotated.jpg"]["jpg"])).size == (24, 40)  # EXIF applied
    assert "jpg" in by_src["n01443537/cmyk.jpg"] and "png" in by_src["n01484850/anim.gif"]  # JPEG stays JPEG
    alpha = np.asarray(Image.open(io.BytesIO(by_src["n01443537/alpha.png"]["png"])))
    assert (alpha == 255).all()  # transparent → white
    grey = np.asarray(Image.open(io.BytesIO(by_src["n01443537/grey16.png"]["png"])))[..., 0].astype(int)
    ref = np.round((np.arange(32 * 32).reshape(32, 32) * 60) / 257)
    assert np.abs(grey - ref).max() <= 1  # 16-bit scaled, not clipped


@pytest.mark.slow
def test_vision_rerun_is_byte_identical_and_skips(vision_src, vision_out):
    src, _, _ = vision_src
    dst, first = vision_out
    before, mtimes = _files(dst), _mtimes(dst)
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert stats["shards_skipped"] == stats["num_shards"] == first["num_shards"]
    assert stats["shards_written"] == 0
    assert _files(dst) == before and _mtimes(dst) == mtimes


@pytest.mark.slow
def test_vision_resume_after_kill(ray_local, vision_src, vision_out, tmp_path):
    """Killed half-way: some shards, the manifest and the validation cache missing, a stale temp file."""
    src, _, _ = vision_src
    reference = _files(vision_out[0])
    dst = tmp_path / "dst"
    shutil.copytree(vision_out[0], dst)
    for name in ("vision-000001.tar", "vision-000003.tar", "manifest.parquet", "rejects.parquet",
                 "stats.json", "_stage1.parquet"):
        os.remove(dst / name)
    (dst / "vision-000001.tar.tmp").write_bytes(b"half a shard")
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert stats["shards_written"] == 2 and stats["shards_skipped"] == stats["num_shards"] - 2
    assert _files(dst) == reference
    assert not glob.glob(f"{dst}/*.tmp")


@pytest.mark.slow
def test_changed_inputs_refused_unless_overwrite(ray_local, vision_src, tmp_path):
    src = tmp_path / "src"
    for rel in vision_src[1][:5]:
        os.makedirs(os.path.dirname(src / rel), exist_ok=True)
        shutil.copy(vision_src[0] / rel, src / rel)
    dst = tmp_path / "dst"
    first = run_shard("vision", str(src), str(dst), samples_per_shard=2)
    assert first["samples"] == 5
    Image.new("RGB", (9, 9), (9, 9, 9)).save(src / "added.png")
    with pytest.raises(ShardJobError) as e:
        run_shard("vision", str(src), str(dst), samples_per_shard=2)
    assert str(dst) in str(e.value) and "--overwrite" in str(e.value)
    assert "input files 5" in str(e.value) and "→ 6" in str(e.value)
    with pytest.raises(ShardJobError, match="samples_per_shard"):  # changed options are refused too
        run_shard("vision", str(src), str(dst), samples_per_shard=3)
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=2, overwrite=True)
    assert stats["samples"] == 6 and "added.png" in pq.read_table(dst / "manifest.parquet")["source"].to_pylist()
    # the same job through file:// URIs gives the same bytes
    uri_dst = tmp_path / "uri_dst"
    run_shard("vision", f"file://{src}", f"file://{uri_dst}", samples_per_shard=2)
    assert _files(uri_dst) == _files(dst)


# ---------------------------------------------------------------- one decode per input (in-process runner)

def _serial(fn, specs):
    """shard_media's task runner, in this process: monkeypatched decoders see every call."""
    return (fn(*spec) for spec in specs)


@pytest.fixture
def counted(monkeypatch):
    """shard_media run in-process with decode_image counting its calls per input."""
    from pipelines import shard_media

    calls: list[int] = []
    real = shard_media.decode_image
    monkeypatch.setattr(shard_media, "_run_tasks", _serial)
    monkeypatch.setattr(shard_media, "decode_image", lambda data, **kw: calls.append(1) or real(data, **kw))
    return calls


@pytest.mark.slow
def test_vision_decodes_each_input_once(ray_local, vision_src, vision_out, counted, tmp_path):
    """Fresh run: one decode per input, the same bytes as the Ray run, no parts left; resume decodes only
    the chunk feeding a lost shard; a complete rerun decodes nothing."""
    src, good, bad = vision_src
    dst = tmp_path / "dst"
    run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert len(counted) == len(good) + len(bad)
    assert _files(dst) == _files(vision_out[0]) and not os.path.exists(dst / "_parts")
    run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert len(counted) == len(good) + len(bad)  # nothing decoded again
    os.remove(dst / "vision-000001.tar")  # the validation cache stays: only that shard's chunk is redone
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    redone = len(counted) - len(good) - len(bad)
    assert 0 < redone < len(good) + len(bad) and stats["shards_written"] == 1  # chunks of 16 inputs
    assert _files(dst) == _files(vision_out[0]) and not os.path.exists(dst / "_parts")


@pytest.mark.slow
def test_vision_interrupted_run_leaves_whole_shards_and_resumes(ray_local, vision_src, vision_out, counted,
                                                                 monkeypatch, tmp_path):
    """Killed during repack: no half-written shard under a final name; the rerun reuses the encoded parts."""
    from pipelines import shard_media

    src, good, bad = vision_src
    real, written = shard_media._repack_task, []

    def dies_after_two(index, *args):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(index)
        return real(index, *args)

    monkeypatch.setattr(shard_media, "_repack_task", dies_after_two)
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert sorted(glob.glob(f"{dst}/*.tar")) == [f"{dst}/vision-{i:06d}.tar" for i in written]
    assert not glob.glob(f"{dst}/*.tmp") and glob.glob(f"{dst}/_parts/*/part-*.tar")
    monkeypatch.setattr(shard_media, "_repack_task", real)
    stats = run_shard("vision", str(src), str(dst), samples_per_shard=8, max_image_pixels=BOMB_LIMIT)
    assert len(counted) == len(good) + len(bad)  # the parts of the killed run were reused, not re-decoded
    assert stats["shards_skipped"] == 2 and _files(dst) == _files(vision_out[0])
    assert not os.path.exists(dst / "_parts")


def test_repacked_shard_is_the_tar_tarfile_writes(tmp_path):
    """Members copied out of a part + tar_end == tarfile writing the same members into a fresh archive;
    a truncated part leaves neither a shard nor a temp file."""
    import pyarrow.fs as pafs
    import tarfile

    from pipelines import shard_media
    from pipelines.shard import Job

    rng = np.random.default_rng(0)
    members = [(f"k{i}/{'x' * (i * 40)}.{ext}", rng.bytes(int(rng.integers(0, 3000))))  # long names: PAX headers
               for i in range(5) for ext in ("png", "json")]
    parts = tmp_path / "parts"
    parts.mkdir()
    with tarfile.open(parts / "part-000000.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        offsets = []
        for name, data in members:
            offsets.append(tf.offset)
            shard_media.add_member(tf, name, data)
        offsets.append(tf.offset)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.PAX_FORMAT) as tf:  # members 2..7 only
        for name, data in members[2:8]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = \
                len(data), 0, 0o644, 0, 0, "", ""
            tf.addfile(info, io.BytesIO(data))
    job = Job("vision", pafs.LocalFileSystem(), "/", pafs.LocalFileSystem(), str(tmp_path / "dst"), {})
    os.makedirs(job.dst)
    keys = [f"k{i}/{'x' * (i * 40)}" for i in (1, 2, 3)]
    shard_media._repack_task(0, job, str(parts), keys, ["png"] * 3, [(0, offsets[2], offsets[4]),
                                                                    (0, offsets[4], offsets[8])])
    assert (tmp_path / "dst/vision-000000.tar").read_bytes() == ref.getvalue()
    data = (parts / "part-000000.tar").read_bytes()
    (parts / "part-000000.tar").write_bytes(data[:offsets[6]])
    with pytest.raises(ShardJobError, match="truncated"):
        shard_media._repack_task(1, job, str(parts), keys, ["png"] * 3, [(0, offsets[2], offsets[8])])
    assert sorted(os.listdir(job.dst)) == ["vision-000000.tar"]


# ---------------------------------------------------------------- audio

@pytest.mark.slow
def test_audio_shards(ray_local, audio_src, tmp_path):
    src, good, transcripts, bad = audio_src
    dst = tmp_path / "dst"
    stats = run_shard("audio", str(src), str(dst), samples_per_shard=3, min_seconds=0.5, max_seconds=3.0)
    man, samples = _check_layout(dst, stats, "audio", 3)
    assert {r["source"] for r in man} == set(good)
    rejects = _rejects(dst)
    assert set(rejects) == set(bad)
    for rel, words in bad.items():
        assert words in rejects[rel][1].lower(), (rel, rejects[rel])
    assert stats["inputs"] == stats["samples"] + stats["rejects"] and stats["sidecars"] == 2
    for s, r in zip(samples, man):
        x, sr = sf.read(io.BytesIO(s["flac"]), dtype="int16")
        info = sf.info(io.BytesIO(s["flac"]))
        assert sr == 16000 and x.ndim == 1 and info.subtype == "PCM_16" and len(x) == r["length"]
        y, sr0 = sf.read(str(src / r["source"]))
        assert abs(r["length"] / 16000 - len(y) / sr0) < 0.002  # resampled, not truncated or stretched
        meta = json.loads(s["json"])
        assert r["label"] == transcripts.get(r["source"]) == meta["label"]
        assert meta["speaker"] == (r["source"].split("/")[0] if r["source"][0].isdigit() else None)
    before = _files(dst)
    again = run_shard("audio", str(src), str(dst), samples_per_shard=3, min_seconds=0.5, max_seconds=3.0)
    assert again["shards_skipped"] == again["num_shards"] and _files(dst) == before


# ---------------------------------------------------------------- text

@pytest.mark.slow
def test_text_blocks_round_trip(ray_local, text_src, tmp_path):
    src, bad = text_src
    dst = tmp_path / "dst"
    stats = run_shard("text", str(src), str(dst), samples_per_shard=4, block_size=32, vocab_size=300)
    man, samples = _check_layout(dst, stats, "text", 4)
    tok = load_tokenizer((dst / "tokenizer.json").read_text())
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    blocks = [np.load(io.BytesIO(s["ids.npy"])) for s in samples]
    metas = [json.loads(s["json"]) for s in samples]
    assert all(b.dtype == np.int32 and b.ndim == 1 for b in blocks)
    # fairseq TokenBlockDataset(tokens_per_sample - 1, break_mode=complete_doc): <s> + block <= 32 tokens,
    # and a block never spans two documents: </s> (end of a document) can only be a block's last token
    assert all(2 <= len(b) <= 31 for b in blocks) and max(len(b) for b in blocks) == 31
    assert all(EOS_ID not in b[:-1] for b in blocks)
    assert [len(b) for b in blocks] == [r["length"] for r in man] == [m["length"] for m in metas]
    # every document comes back exactly, in sorted file order: blocks sit at their stream offsets; the
    # only gaps are dropped blocks that would have held just a document's </s>
    end = metas[-1]["offset"] + len(blocks[-1])
    stream = np.full(end, -1, np.int64)
    for b, m in zip(blocks, metas):
        stream[m["offset"]:m["offset"] + len(b)] = b
    gaps = np.flatnonzero(stream < 0)
    assert len(gaps) == stats["text"]["dropped_tail_tokens"]
    stream[gaps] = EOS_ID
    ends = np.flatnonzero(stream == EOS_ID)
    docs = [tok.decode(stream[a + 1 if i else 0:b].tolist(), skip_special_tokens=False)
            for i, (a, b) in enumerate(zip(np.r_[0, ends[:-1]], ends))]
    expected = [unicodedata.normalize("NFC", d) for d in DOCS["a.txt"] + DOCS["b/c.txt"] + DOCS["b/d.txt"]]
    assert docs == expected and ends[-1] == end - 1
    # a document shorter than a block is one block of its own (complete_doc, not packed with the next)
    short = [i for i, d in enumerate(expected) if len(tok.encode(d, add_special_tokens=False).ids) + 1 <= 31]
    assert short and stats["samples"] >= len(expected)
    starts = {m["offset"] for m in metas}
    for i in short:
        first = 0 if i == 0 else ends[i - 1] + 1
        block = blocks[[m["offset"] for m in metas].index(first)]
        assert first in starts and block[-1] == EOS_ID and len(block) == ends[i] - first + 1
    # accounting: every input file is used by a block or rejected, with a reason
    used = {src_ for m in metas for src_ in m["sources"]}
    rejects = _rejects(dst)
    assert used == set(DOCS) and set(rejects) == set(bad)
    for rel, words in bad.items():
        assert words in rejects[rel][1], (rel, rejects[rel])
    assert stats["inputs"] == stats["text"]["used_inputs"] + stats["rejects"]
    # a given tokenizer is copied and gives the same shards; a rerun skips everything
    dst2 = tmp_path / "dst2"
    run_shard("text", str(src), str(dst2), samples_per_shard=4, block_size=32, tokenizer=str(dst / "tokenizer.json"))
    assert _files(dst2) == _files(dst)
    assert (dst2 / "tokenizer.json").read_bytes() == (dst / "tokenizer.json").read_bytes()
    again = run_shard("text", str(src), str(dst), samples_per_shard=4, block_size=32, vocab_size=300)
    assert again["shards_skipped"] == again["num_shards"]
    assert pq.read_table(f"{dst}/manifest.parquet").to_pylist() == man  # rebuilt from the skipped shards


@pytest.mark.slow
def test_text_short_document_is_its_own_block(ray_local, tmp_path):
    """complete_doc: a short file's document is not packed into a block with another file's tokens."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("One document about tokens.\n\nAnother document about blocks.\n")
    (src / "zz.txt").write_text("Hi.\n")
    tok = train_bpe(decode.text_documents((src / "a.txt").read_bytes()), 300)
    (tmp_path / "tok.json").write_text(tok.to_str())
    docs = decode.text_documents((src / "a.txt").read_bytes()) + ["Hi."]
    want = [encode_documents(tok, [d]) for d in docs]  # each document's tokens + </s>
    stats = run_shard("text", str(src), str(tmp_path / "dst"), block_size=sum(len(w) for w in want) + 1,
                      tokenizer=str(tmp_path / "tok.json"))
    got = [np.load(io.BytesIO(s["ids.npy"])) for s in _wds_samples(tmp_path / "dst")]
    assert [g.tolist() for g in got] == [w.tolist() for w in want]  # three blocks, one per document
    assert stats["samples"] == 3 and stats["rejects"] == 0 and stats["text"]["dropped_tail_tokens"] == 0
    assert stats["inputs"] == stats["text"]["used_inputs"] == 2
    # a single file is a valid input too
    one = run_shard("text", str(src / "a.txt"), str(tmp_path / "one"), block_size=64,
                    tokenizer=str(tmp_path / "tok.json"))
    assert (one["inputs"], one["samples"], one["rejects"]) == (1, 2, 0)


def test_tokenizer_with_wrong_specials_is_refused(text_src, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]  # <s> and <pad> swapped
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    (tmp_path / "tok.json").write_text(tok.to_str())
    with pytest.raises(ValueError, match=r"'<s>' has id 1 \(expected 0\)"):
        run_shard("text", str(text_src[0]), str(tmp_path / "dst"), tokenizer=str(tmp_path / "tok.json"))


# ---------------------------------------------------------------- units (no Ray)

def test_complete_doc_block_counts_match_the_blocks():
    """The plan's per-piece block counts (stage 1) agree with the blocks the shard tasks cut."""
    from pipelines.shard import _count_docs, _doc_blocks

    room = 7
    docs = [np.arange(n, dtype=np.int32) for n in (2, 6, 7, 8, 9, 14, 15, 16, 29)]  # 8, 15, 29: k*7 + 1
    blocks = [b for d in docs for b in _doc_blocks(d, room)]
    assert _count_docs(docs, room) == (sum(map(len, docs)), len(blocks), 3)
    assert all(2 <= len(b) <= room for b in blocks)
    assert [len(b) for b in _doc_blocks(docs[4], room)] == [7, 2]  # split inside the document, never merged



def test_tokenizer_training_is_deterministic():
    docs = [f"sample {i} text with repeated words words words" for i in range(200)]
    assert train_bpe(iter(docs), 400).to_str() == train_bpe(iter(docs), 400).to_str()


def test_text_pieces_match_whole_file():
    rng = np.random.default_rng(0)
    parts = []
    for i in range(300):
        parts.append(" ".join("wörd" for _ in range(rng.integers(1, 30))))
        parts.append(["\n\n", "\r\n\r\n", "\n \t\n", "\n", " "][rng.integers(0, 5)])
    raw = ("\ufeff" + "".join(parts)).encode()
    stream = io.BytesIO(raw)
    pieces = list(decode.iter_pieces(stream.read, 256))
    assert len(pieces) > 5 and b"".join(p for _, p in pieces) == raw
    assert [d for off, p in pieces for d in decode.text_documents(p, offset=off)] == decode.text_documents(raw)


def test_sample_keys_unique_and_webdataset_safe():
    keys = sample_keys(["a/b.png", "a/b.jpg", "a b.png", "a_b.png", "x.y/z.tar.gz", "ü.png"])
    assert len(set(keys)) == len(keys)
    assert keys[0] == "a/b" and keys[4] == "x_y/z_tar"
    assert all("." not in k and k.isascii() for k in keys)


def test_decompression_bomb_guard(tmp_path):
    _png_with_claimed_size(tmp_path / "bomb.png", 1000, 1000)
    with pytest.raises(decode.Reject, match="decompression-bomb") as e:
        decode.decode_image((tmp_path / "bomb.png").read_bytes(), max_pixels=BOMB_LIMIT)
    assert e.value.stage == "validate"
    _png_with_claimed_size(tmp_path / "huge.png", 60000, 60000)  # beyond Pillow's own limit too
    with pytest.raises(decode.Reject, match="decompression-bomb"):
        decode.decode_image((tmp_path / "huge.png").read_bytes())
