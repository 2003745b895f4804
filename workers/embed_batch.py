"""`d2v embed MODEL --data DST --out OUT_DIR`: pooled embeddings of a whole shard set (or raw folder) on Ray Data.

Inputs (the model's modality picks what is read):
  shard set  DST/<modality>-NNNNNN.tar as `d2v shard` writes them (pipelines/manifest.py): one unit per shard
  raw folder every file under DST with a payload suffix of the modality (image / audio / .txt, .npy ids),
             in sorted order, UNIT_FILES files per unit (`raw-NNNNNN`)
Job: a Ray Data dataset of units -> `map_batches` on an actor pool (`UnitEmbedder`: one encoder per actor,
loaded once; a GPU per actor when the cluster has GPUs) -> each actor writes `OUT_DIR/<unit>.parquet`
(temp + rename) and streams a summary back; the driver prints progress and, at the end, writes
`OUT_DIR/rejects.parquet` and `OUT_DIR/manifest.json` (both temp + rename).

Output rows: key (sample key in the shard; raw: path without suffix), source (the corpus file it came from),
embedding fixed_size_list<float32>[D] = the linear probe's pooling (workers.evaluate.pool: mean of the final
hidden states over non-padded positions after the prefix), the same numbers as the pyfunc model.
Preprocessing = `d2v embed`'s eval mode (the pyfunc decoders: workers/registry/pyfunc_model.py). Text shard
blocks are `ids.npy` without <s>: as in training (workers/loader.py) <s> is prepended and the block cut to
block_size - 1 ids at offset 0 (no random window).

Resume: a unit whose Parquet exists and records the same weights hash and input fingerprint (schema metadata
`d2v.embed`) is skipped. Bad samples (undecodable payload, missing payload, a tar cut short, a model error)
go to rejects.parquet (key, shard, source, reason); they never stop the job.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.config import Config
from model.encoder import Encoder

UNIT_FILES = 256  # raw folder: files per output file
META_KEY = b"d2v.embed"
REJECTS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("source", pa.string()),
                            ("reason", pa.string())])
# payload member / file suffixes per modality, in the order a sample's members are tried
PAYLOADS = {
    "vision": ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"),
    "audio": ("flac", "wav", "ogg", "mp3"),
    "text": ("ids.npy", "npy", "txt"),
}
# raw folders: file suffixes per modality (text: .txt only, since a loose .npy is model-ready for `d2v embed`,
# not a shard block)
RAW_SUFFIXES = {"vision": PAYLOADS["vision"], "audio": PAYLOADS["audio"], "text": ("txt",)}


class EmbedJobError(ValueError):
    """The job cannot start (no inputs, wrong modality, bad arguments); says what to do."""


@dataclass(frozen=True)
class Unit:
    """One output file's worth of input: a shard tar, or a chunk of raw files."""

    name: str  # output stem: "vision-000003" or "raw-000000"
    root: str  # DST
    files: tuple[str, ...]  # relative to root: the shard, or the raw files
    is_tar: bool
    fingerprint: str  # sha256 of "relpath\tsize\tmtime_ns" lines of its files


# ---------------------------------------------------------------------------------------------- inputs
def list_units(data: Path, modality: str) -> list[Unit]:
    """DST -> its units: the modality's shards if there are any, else the raw files with a payload suffix."""
    from pipelines.manifest import SHARD_RE

    if not data.is_dir():
        raise EmbedJobError(f"--data {data}: no such directory (give a `d2v shard` output or a folder of files)")
    tars = sorted(p.name for p in data.iterdir() if SHARD_RE.match(p.name))
    if tars:
        mine = [t for t in tars if t.startswith(modality + "-")]
        if not mine:
            raise EmbedJobError(f"--data {data}: holds {tars[0].split('-')[0]} shards but the model is a {modality} "
                                "model; point --data at a shard set of the model's modality")
        return [_unit(data, t[: -len(".tar")], [t], True) for t in mine]
    suffixes = {"." + s for s in RAW_SUFFIXES[modality]}
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
    if not files:
        raise EmbedJobError(f"--data {data}: no {modality} shards ({modality}-NNNNNN.tar) and no files ending in "
                            f"{', '.join(sorted(suffixes))}")
    return [_unit(data, f"raw-{i // UNIT_FILES:06d}", files[i : i + UNIT_FILES], False)
            for i in range(0, len(files), UNIT_FILES)]


def _unit(root: Path, name: str, files: list[str], is_tar: bool) -> Unit:
    lines = []
    for f in files:
        st = (root / f).stat()
        lines.append(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return Unit(name, str(root), tuple(files), is_tar, hashlib.sha256("".join(lines).encode()).hexdigest())


Sample = tuple[str, str, str | None, bytes | str]  # key, source, payload suffix (None: reject), bytes or reason


def iter_samples(unit: Unit, modality: str) -> Iterator[Sample]:
    """The unit's samples in stored order; a sample without a payload, or a tar cut short, comes out as a
    reject (suffix None, the reason as payload) instead of an exception."""
    if not unit.is_tar:
        for rel in unit.files:
            key, ext = rel.rsplit(".", 1)
            try:
                yield key, rel, ext.lower(), (Path(unit.root) / rel).read_bytes()
            except OSError as err:  # vanished or unreadable since the listing
                yield key, rel, None, f"cannot read the file ({type(err).__name__}: {err})"
        return
    key, members = None, {}
    try:
        with tarfile.open(Path(unit.root) / unit.files[0], mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                head, _, base = m.name.rpartition("/")  # webdataset: key = path up to the basename's first dot
                stem, _, ext = base.partition(".")
                k = f"{head}/{stem}" if head else stem
                if k != key and key is not None:
                    yield _sample(key, members, modality)
                    members = {}
                key = k
                members[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        if key is not None:
            members = {**members, "_error": f"shard unreadable after this sample ({type(err).__name__}: {err})"}
        else:
            yield "", "", None, f"shard unreadable ({type(err).__name__}: {err})"
    if key is not None:
        if "_error" in members:
            yield key, "", None, members["_error"]
        else:
            yield _sample(key, members, modality)


def _sample(key: str, members: dict[str, bytes], modality: str) -> Sample:
    try:
        source = str(json.loads(members["json"]).get("source", "")) if "json" in members else ""
    except (ValueError, AttributeError):
        source = ""
    for ext in PAYLOADS[modality]:
        if ext in members:
            return key, source, ext, members[ext]
    return key, source, None, (f"no {modality} payload member (expected one of {', '.join(PAYLOADS[modality])}; "
                               f"found {', '.join(sorted(members)) or 'nothing'})")


# -------------------------------------------------------------------------------------------- decoding
def decode_ids(data: bytes, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    """A shard block (int ids, no <s>) -> <s> + the first block_size - 1 ids, as the training loader at offset 0."""
    from workers.registry.pyfunc_model import BadInput

    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # numpy raises several types for a bad .npy
        raise BadInput(f"not a .npy array ({type(err).__name__}: {err})") from None
    f = cfg.model.frontend
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise BadInput(f"expected a non-empty 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= f.vocab_size:
        raise BadInput(f"token ids outside [0, {f.vocab_size})")
    window = min(cfg.data.block_size, f.max_positions - f.pad_id - 1) - 1
    return torch.from_numpy(np.concatenate([[f.bos_id], ids[:window]]).astype(np.int64))  # (T,)


def decoder_for(ext: str) -> Callable[[Any, Config, Path | None], torch.Tensor]:
    from workers.registry import pyfunc_model as pm

    if ext in ("ids.npy", "npy"):
        return decode_ids
    if ext == "txt":
        return lambda data, cfg, tok: pm.decode_text(data.decode("utf-8"), cfg, tok)
    return pm.decode_audio if ext in PAYLOADS["audio"] else pm.decode_image


# ------------------------------------------------------------------------------------------- embedding
@torch.no_grad()
def pooled(enc: Encoder, cfg: Config, xs: list[torch.Tensor], keys: list[str], device: torch.device) -> np.ndarray:
    """Inputs -> (N, D) pooled embeddings; padded batches where padding is exact, else one pass per length."""
    from workers.evaluate import PAD_IS_EXACT, collate, pool

    out = np.zeros((len(xs), cfg.model.trunk.dim), dtype=np.float32)
    groups: dict[object, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(None if PAD_IS_EXACT[cfg.model.modality] else tuple(x.shape), []).append(i)
    for idx in groups.values():
        x, pad = collate([xs[i] for i in idx], [Path(keys[i]) for i in idx], cfg)
        out[idx] = pool(enc(x.to(device), None if pad is None else pad.to(device))).float().cpu().numpy()
    return out


def embed_unit(unit: Unit, enc: Encoder, cfg: Config, tokenizer: Path | None, out_dir: Path, batch_size: int,
               weights_sha: str, device: torch.device) -> dict:
    """Embed one unit and write OUT_DIR/<unit>.parquet (temp + rename); -> its summary (counts, rejects)."""
    t0 = time.monotonic()
    keys: list[str] = []
    sources: list[str] = []
    vecs: list[np.ndarray] = []
    rejects: list[dict] = []
    shard = unit.files[0] if unit.is_tar else ""
    pending: list[tuple[str, str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        try:
            vecs.append(pooled(enc, cfg, [x for _, _, x in pending], [k for k, _, _ in pending], device))
            keys.extend(k for k, _, _ in pending)
            sources.extend(s for _, s, _ in pending)
        except (RuntimeError, ValueError):  # one input the model rejects: find it, keep the others
            for k, s, x in pending:
                try:
                    vecs.append(pooled(enc, cfg, [x], [k], device))
                    keys.append(k)
                    sources.append(s)
                except (RuntimeError, ValueError) as err:
                    rejects.append({"key": k, "shard": shard, "source": s, "reason": f"model rejected it: {err}"})
        pending.clear()

    for key, source, ext, payload in iter_samples(unit, cfg.model.modality):
        src = source  # shards: the json's source; raw folders: the file itself
        if ext is None:
            rejects.append({"key": key, "shard": shard or src, "source": src, "reason": str(payload)})
            continue
        try:
            pending.append((key, src, decoder_for(ext)(payload, cfg, tokenizer)))
        except Exception as err:  # BadInput, unicode errors, decoder bugs: the sample is rejected, not the job
            rejects.append({"key": key, "shard": shard or src, "source": src, "reason": f"{ext}: {err}"})
        if len(pending) >= batch_size:
            flush()
    flush()
    dim = cfg.model.trunk.dim
    flat = np.concatenate(vecs).reshape(-1) if vecs else np.zeros(0, np.float32)
    table = pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(sources, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)})
    meta = {"unit": unit.name, "inputs": list(unit.files), "fingerprint": unit.fingerprint,
            "weights_sha256": weights_sha, "rows": len(keys), "rejects": rejects}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    write_atomic(out_dir / f"{unit.name}.parquet", lambda f: pq.write_table(table, f))
    return {**meta, "seconds": time.monotonic() - t0, "skipped": False}


def finished(path: Path, unit: Unit, weights_sha: str) -> dict | None:
    """The summary stored in an existing output when it was made from the same inputs and weights, else None."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(pq.read_schema(path).metadata[META_KEY])
    except Exception:  # not ours, or unreadable: redo it
        return None
    if meta.get("fingerprint") != unit.fingerprint or meta.get("weights_sha256") != weights_sha:
        return None
    return {**meta, "seconds": 0.0, "skipped": True}


def write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    """write(file object) into a temp file next to `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------- actors
class UnitEmbedder:
    """Ray Data actor: loads the encoder once, then embeds every unit of each batch it is given."""

    def __init__(self, ckpt: str, out_dir: str, batch_size: int, weights_sha: str, threads: int) -> None:
        from model.checkpoint import load_encoder

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.enc = load_encoder(ckpt, which="student", map_location=self.device)  # eval mode
        tok = Path(ckpt) / "tokenizer.json"
        self.tok = tok if tok.is_file() else None
        self.out, self.batch_size, self.sha = Path(out_dir), batch_size, weights_sha

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        done = [embed_unit(Unit(**json.loads(u)), self.enc, self.cfg, self.tok, self.out, self.batch_size, self.sha,
                           self.device) for u in batch["unit"]]
        return {"summary": [json.dumps(s) for s in done]}
