"""Demo corpora (pipelines/demo*.py): layouts of the real datasets, decodable media, labelled splits that
are disjoint and complete, byte-for-byte determinism, and skip_existing. Uses size="small" (seconds)."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.demo import build_demo

MODALITIES = ["vision", "text", "audio"]  # audio needs espeak-ng (installed by `make setup`): missing, it fails


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each modality built twice with the same seed, lazily: {modality: (dir_a, dir_b, summary_a)}."""
    cache = {}

    def get(modality):
        if modality not in cache:
            a, b = tmp_path_factory.mktemp(f"{modality}_a"), tmp_path_factory.mktemp(f"{modality}_b")
            summary = build_demo(modality, a, seed=0, size="small")
            build_demo(modality, b, seed=0, size="small")
            cache[modality] = (a, b, summary)
        return cache[modality]

    return get


def _labelled_files(root: Path, ext: str) -> dict[str, dict[str, list[Path]]]:
    return {split: {d.name: sorted(d.glob(f"*.{ext}")) for d in sorted((root / "labelled" / split).iterdir())}
            for split in ("train", "test")}


def _check_labelled(root: Path, ext: str, classes: list[str], summary: dict) -> dict:
    files = _labelled_files(root, ext)
    for split in ("train", "test"):
        assert sorted(files[split]) == sorted(classes), f"{split}: every class present"
        assert all(files[split][c] for c in classes), f"{split}: no empty class"
        assert {c: len(v) for c, v in files[split].items()} == summary["counts"]["labelled"][split]
    return files


# ------------------------------------------------------------------------------------------ all modalities


@pytest.mark.parametrize("modality", MODALITIES)
def test_deterministic_and_done_last(built, modality):
    a, b, summary = built(modality)
    hashes = _tree_hashes(a)
    assert hashes == _tree_hashes(b), "same seed must give byte-identical files"
    assert "DONE.json" in hashes and not list(a.glob(".building-*")), "no staging folder left behind"
    assert summary["modality"] == modality and summary["seed"] == 0 and summary["size"] == "small"


@pytest.mark.parametrize("modality", MODALITIES)
def test_skip_existing_reuses_the_build_without_running_a_generator(built, modality, monkeypatch):
    import pipelines.demo as demo

    a, _, summary = built(modality)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in a.rglob("*")}

    def no_build(name):
        raise AssertionError(f"skip_existing ran the {name} generator for a matching DONE.json")

    monkeypatch.setattr(demo, "_builder", no_build)
    with pytest.raises(AssertionError, match="ran the"):  # the guard is live: a plain build reaches it
        build_demo(modality, a, seed=0, size="small")
    again = build_demo(modality, a, seed=0, size="small", skip_existing=True)
    assert again == summary
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in a.rglob("*")} == before, "nothing rewritten"


def test_skip_existing_rebuilds_for_another_seed(tmp_path):
    first = build_demo("vision", tmp_path, seed=0, size="small")
    hashes = _tree_hashes(tmp_path / "labelled")
    second = build_demo("vision", tmp_path, seed=1, size="small", skip_existing=True)
    assert second["seed"] == 1 and first["seed"] == 0
    assert _tree_hashes(tmp_path / "labelled") != hashes, "another seed draws other renderings and splits"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="modality"):
        build_demo("video", tmp_path)
    with pytest.raises(ValueError, match="size"):
        build_demo("text", tmp_path, size="medium")


def test_failed_build_never_looks_finished(tmp_path, monkeypatch):
    import pipelines.demo_text as demo_text

    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "old.txt").write_text("from an earlier build\n")
    (tmp_path / "DONE.json").write_text('{"format": 0}')

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo_text, "collect", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_demo("text", tmp_path, size="small")
    assert not (tmp_path / "DONE.json").exists(), "a failed build must not leave a DONE marker"
    assert (tmp_path / "pretrain" / "old.txt").exists() and not list(tmp_path.glob(".building-*"))


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        build_demo("audio", tmp_path, size="small")
    assert not (tmp_path / "DONE.json").exists() and not list(tmp_path.glob(".building-*"))


# ------------------------------------------------------------------------------------------------ vision


def test_vision_imagenet_layout_and_pngs(built):
    from PIL import Image

    root, _, summary = built("vision")
    classes = [f"digit_{d}" for d in range(10)]
    assert sorted(p.name for p in (root / "pretrain" / "train").iterdir()) == classes
    pretrain = sorted((root / "pretrain" / "train").glob("*/*"))
    assert len(pretrain) == summary["counts"]["pretrain"] >= 100
    for path in pretrain + sorted((root / "labelled").rglob("*.png")):
        assert re.fullmatch(rf"{path.parent.name}_\d+\.png", path.name), path
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32)), path

    files = _check_labelled(root, "png", classes, summary)
    train = {p.name for v in files["train"].values() for p in v}
    test = {p.name for v in files["test"].values() for p in v}
    assert not train & test, "labelled train/test share a source scan"


def test_vision_digits_stay_recognisable(built):
    """A linear classifier on raw grey pixels beats chance by far: the renderings keep the digit."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    root, _, summary = built("vision")
    files = _labelled_files(root, "png")

    def xy(split):
        items = [(p, c) for c, ps in files[split].items() for p in ps]
        x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).ravel() / 255 for p, _ in items])
        return x - x.mean(1, keepdims=True), [c for _, c in items]  # remove the paper brightness

    clf = LogisticRegression(max_iter=2000).fit(*xy("train"))
    assert clf.score(*xy("test")) > 0.6  # chance is 0.1


# ------------------------------------------------------------------------------------------------- audio


def test_audio_librispeech_layout_and_transcripts(built):
    root, _, summary = built("audio")
    flacs = sorted((root / "pretrain").rglob("*.flac"))
    assert len(flacs) == summary["counts"]["pretrain"]["utterances"] >= 40
    by_chapter: dict[Path, set[str]] = {}
    for path in flacs:
        spk, ch = path.parent.parent.name, path.parent.name
        assert re.fullmatch(rf"{spk}-{ch}-\d{{4}}\.flac", path.name), path
        by_chapter.setdefault(path.parent, set()).add(path.stem)
    for folder, ids in by_chapter.items():
        trans = folder / f"{folder.parent.name}-{folder.name}.trans.txt"
        lines = trans.read_text(encoding="utf-8").splitlines()
        assert lines == sorted(lines)
        assert {line.split(" ", 1)[0] for line in lines} == ids, f"{trans} lines match the FLAC files"
        assert all(re.fullmatch(r"\S+ [A-Z' ]+", line) for line in lines), trans
        assert sorted(p.name for p in folder.iterdir()) == sorted([f"{i}.flac" for i in ids] + [trans.name])


def _check_speech(path: Path, min_s: float, max_s: float) -> None:
    import soundfile as sf

    info = sf.info(str(path))
    assert (info.format, info.samplerate, info.channels) == ("FLAC", 16_000, 1), path
    assert min_s <= info.duration <= max_s, (path, info.duration)
    wave, _ = sf.read(str(path), dtype="float32")
    frames = wave[: len(wave) // 400 * 400].reshape(-1, 400)  # 25 ms frames
    rms = np.sqrt((frames**2).mean(1)) + 1e-9
    assert rms.max() > 0.03, f"{path}: too quiet"
    assert 20 * np.log10(rms.max() / np.percentile(rms, 5)) > 20, f"{path}: no speech above the noise floor"


def test_audio_files_are_16k_mono_flac_speech(built):
    root, _, _ = built("audio")
    for path in sorted((root / "pretrain").rglob("*.flac")):
        _check_speech(path, 0.8, 6.0)
    for path in sorted((root / "labelled").rglob("*.flac")):
        _check_speech(path, 0.4, 2.5)


def test_audio_keyword_split_by_speaker(built):
    root, _, summary = built("audio")
    files = _check_labelled(root, "flac", summary["classes"], summary)
    assert len(summary["classes"]) == 10
    speakers = {split: {p.name.split("-")[0] for v in files[split].values() for p in v} for split in files}
    assert all(re.fullmatch(r"\d+-\d+\.flac", p.name) for s in files.values() for v in s.values() for p in v)
    assert speakers["train"] and speakers["test"] and not speakers["train"] & speakers["test"]


# -------------------------------------------------------------------------------------------------- text


def test_text_raw_corpus_and_labelled_split(built):
    root, _, summary = built("text")
    shards = sorted((root / "pretrain").iterdir())
    assert shards and all(re.fullmatch(r"[A-Za-z0-9_]+\.txt", p.name) for p in shards)
    docs = []
    for shard in shards:
        text = shard.read_bytes().decode("utf-8")  # strict: valid UTF-8
        assert text.endswith("\n") and "\n\n\n" not in text
        docs += text.rstrip("\n").split("\n\n")
    assert len(docs) == summary["counts"]["pretrain"]["documents"] >= 50
    words = " ".join(docs).split()
    assert len(words) > 2000 and sum(w.isalpha() for w in words) / len(words) > 0.5, "English prose, not code"

    files = _check_labelled(root, "txt", summary["classes"], summary)
    texts = {split: {p.read_bytes().decode("utf-8").strip() for v in files[split].values() for p in v}
             for split in files}
    assert all(len(t.split()) >= 6 for s in texts.values() for t in s)
    assert not texts["train"] & texts["test"], "labelled train/test share a document"
    assert not (texts["train"] | texts["test"]) & set(docs), "labelled documents are kept out of pretrain"
