"""`d2v embed MODEL --data DST --out DIR`: Ray Data batch embedding of shard sets (workers/embed_job.py).

Reference: every sample is read back from the shard with webdataset (not our tar reader), written to a file
and embedded by the single-file path (`workers.embed.embed_files`, what `d2v embed FILE` runs), then pooled
from the pooling definition (mean of the final states after the prefix, tests/registry_helpers.pooled).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from model.checkpoint import load_encoder, save_checkpoint
from model.config import apply_overrides
from model.data2vec import Data2Vec
from model.encoder import Encoder
from model.presets import get_preset
from tests.registry_helpers import png_bytes, pooled
from workers.cli import main
from workers.embed import embed_files
from workers.embed_job import run_embed_job

PAYLOAD = {"vision": ("png", "jpg"), "audio": ("flac",), "text": ("ids.npy",)}


def tiny_checkpoint(root: Path, modality: str, shards: Path | None = None) -> Path:
    """Random-init tiny checkpoint; text takes the shard set's tokenizer (its ids must fit the vocabulary)."""
    cfg, extra = get_preset(modality, "tiny"), {}
    if modality == "text":
        from tokenizers import Tokenizer

        tok = (shards / "tokenizer.json").read_bytes()
        cfg = apply_overrides(cfg, [f"model.frontend.vocab_size={Tokenizer.from_str(tok.decode()).get_vocab_size()}"])
        extra["tokenizer.json"] = tok
    torch.manual_seed(1)
    return save_checkpoint(root, cfg, Data2Vec(cfg.model), Encoder(cfg.model), state={"step": 1}, extra_files=extra)


def reference(ckpt: Path, shard_dir: Path, tmp: Path) -> dict[str, np.ndarray]:
    """key -> pooled embedding through the single-file path, for every sample with a decodable payload."""
    cfg, enc = load_encoder(ckpt)
    out = {}
    (tmp / "ref").mkdir(parents=True, exist_ok=True)
    for tar in sorted(shard_dir.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            ext = next((e for e in PAYLOAD[cfg.model.modality] if e in s), None)
            if ext is None:  # no payload: the batch job must reject it
                continue
            f = tmp / "ref" / f"{len(out)}.{ext}"  # keys hold '/': the file is named by position
            if ext == "ids.npy":  # model-ready ids: <s> + the block, as the training loader sees it at offset 0
                ids = np.load(io.BytesIO(s[ext]))
                f = tmp / "ref" / f"{len(out)}.npy"
                np.save(f, np.concatenate([[cfg.model.frontend.bos_id], ids[: cfg.data.block_size - 1]]))
            else:
                f.write_bytes(s[ext])
            try:
                states = embed_files(enc, cfg, [f], None)[f.stem]
            except ValueError:  # undecodable: the batch job must reject it
                continue
            out[s["__key__"]] = pooled([states], cfg.model.modality)[0]
    return out


def read_rows(out: Path) -> dict[str, np.ndarray]:
    rows = {}
    for p in sorted(out.glob("*.parquet")):
        if p.name == "rejects.parquet":
            continue
        t = pq.read_table(p)
        emb = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
        for k, e in zip(t.column("key").to_pylist(), emb):
            rows[k] = e
    return rows


@pytest.mark.parametrize("modality", ["vision", "text", "audio"])
def test_shard_set_matches_single_file_path(modality, demo_shards, tmp_path):
    _, shards = demo_shards(modality)
    ckpt = tiny_checkpoint(tmp_path / "ckpt", modality, shards)
    out = tmp_path / "emb"
    m = run_embed_job(str(ckpt), shards, out, batch_size=5, actors=2)

    ref = reference(ckpt, shards, tmp_path)
    got = read_rows(out)
    n = pq.read_table(shards / "manifest.parquet").num_rows
    assert len(ref) == n and sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0, err_msg=k)
    assert m["counts"] == {"files": len(list(shards.glob("*.tar"))), "skipped_files": 0, "embedded": n, "rejected": 0}
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["inputs_fingerprint"] == m["inputs_fingerprint"] and on_disk["model"] == str(ckpt)
    assert {f["file"] for f in on_disk["files"]} == {t.stem + ".parquet" for t in shards.glob("*.tar")}
    assert pq.read_table(out / "rejects.parquet").num_rows == 0
    if modality == "vision":  # source column: the corpus file each row came from, as the shard manifest says
        man = pq.read_table(shards / "manifest.parquet").to_pylist()
        first = pq.read_table(out / f"{Path(man[0]['shard']).stem}.parquet").to_pylist()
        want = {r["key"]: r["source"] for r in man}
        assert all(r["source"] == want[r["key"]] for r in first)


def test_rerun_skips_finished_files_and_redoes_missing_ones(demo_shards, tmp_path):
    _, shards = demo_shards("vision")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "vision")
    out = tmp_path / "emb"
    run_embed_job(str(ckpt), shards, out, batch_size=8, actors=1)
    files = sorted(p for p in out.glob("vision-*.parquet"))
    stamp = {p.name: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in files}
    files[0].unlink()

    m = run_embed_job(str(ckpt), shards, out, batch_size=8, actors=1)
    assert m["counts"]["skipped_files"] == len(files) - 1
    for p in files[1:]:
        assert (os.stat(p).st_ino, os.stat(p).st_mtime_ns) == stamp[p.name], f"{p.name} was rewritten"
    assert files[0].is_file() and pq.read_table(files[0]).num_rows > 0
    assert not list(out.glob(".*.tmp"))


def test_bad_samples_go_to_rejects_and_the_rest_is_embedded(ray_local, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "vision-000000.tar")) as tw:
        for i in range(4):
            s = {"__key__": f"img{i}", "json": {"source": f"cls/img{i}.png"}, "png": png_bytes(20 + 4 * i)}
            if i == 2:
                s["png"] = b"\x89PNG\r\n\x1a\n but not really"
            tw.write(s)
        tw.write({"__key__": "nopayload", "json": {"source": "cls/x.txt"}, "txt": b"hello"})
    full = tmp_path / "full"  # a second shard cut short (a copy that died mid-transfer)
    full.mkdir()
    with wds.TarWriter(str(full / "vision-000001.tar")) as tw:
        for i in range(3):
            tw.write({"__key__": f"cut{i}", "json": {"source": f"cls/cut{i}.png"}, "png": png_bytes(40)})
    with tarfile.open(full / "vision-000001.tar") as tf:  # cut inside cut2's image (not in the end padding)
        end = next(m.offset_data + m.size // 2 for m in tf if m.name == "cut2.png")
    (shards / "vision-000001.tar").write_bytes((full / "vision-000001.tar").read_bytes()[:end])
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "vision")
    out = tmp_path / "emb"
    assert main(["embed", str(ckpt), "--data", str(shards), "--out", str(out), "--actors", "1"]) == 0

    rejects = {r["key"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert sorted(rejects) == ["cut2", "img2", "nopayload"]
    assert rejects["img2"]["shard"] == "vision-000000.tar" and rejects["img2"]["source"] == "cls/img2.png"
    assert "cannot decode the image" in rejects["img2"]["reason"]
    assert "no vision payload" in rejects["nopayload"]["reason"]
    assert rejects["cut2"]["shard"] == "vision-000001.tar" and "unexpected end of data" in rejects["cut2"]["reason"]
    (shards / "vision-000001.tar").unlink()  # webdataset (the reference) cannot read it; its whole copy can
    ref = {**reference(ckpt, shards, tmp_path / "a"), **reference(ckpt, full, tmp_path / "b")}
    got = read_rows(out)
    assert sorted(got) == ["cut0", "cut1", "img0", "img1", "img3"]
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5, rtol=0)
    assert json.loads((out / "manifest.json").read_text())["counts"]["rejected"] == 3


def test_raw_folder(ray_local, tmp_path):
    from PIL import Image

    src = tmp_path / "raw" / "a"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(src / f"p{i}.png")
    ckpt = tiny_checkpoint(tmp_path / "ckpt", "vision")
    run_embed_job(str(ckpt), tmp_path / "raw", tmp_path / "emb", actors=1)
    t = pq.read_table(tmp_path / "emb" / "raw-000000.parquet")
    assert t.column("source").to_pylist() == [f"a/p{i}.png" for i in range(3)]
    cfg, enc = load_encoder(ckpt)
    ref = pooled([embed_files(enc, cfg, [src / f"p{i}.png"], None)[f"p{i}"] for i in range(3)], "vision")
    got = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(3, -1)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_cli_refuses_inputs_together_with_data(tmp_path, capsys):
    assert main(["embed", str(tmp_path), "a.png", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "INPUT" in err and "--data" in err
    assert main(["embed", str(tmp_path), "a.png", "--out", "x.npz", "--actors", "2"]) == 2
    assert "--actors" in capsys.readouterr().err
