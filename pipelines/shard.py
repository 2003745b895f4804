"""`d2v shard`: raw files → exact-size WebDataset shards + manifest, as a resumable Ray Data job.

Vision and audio go through pipelines/shard_media.py (each input read and decoded once, encoded chunks
repacked byte-for-byte into shards); the stages below are those of the text flow.

Stages (each a pure function of the sorted input listing, so reruns are byte-identical):
  list      sorted listing of SRC; its fingerprint + options → DST/_plan.json, written before any shard
  validate  Ray Data map_batches over the listing: decode + validate every input, keep METADATA only
            (text: files are cut into ~8 MiB pieces at blank lines; tokens and blocks are counted per
            piece: fairseq sample_break_mode complete_doc, blocks never span two documents)
  plan      driver: good inputs in sorted order → shard i holds samples [i*N, (i+1)*N)
  write     one Ray task per shard: re-read + encode its inputs, tar → `<name>.tmp` → rename into place;
            shards already in place are skipped (their tar index, and for text the blocks' json
            source/length, are read back for the manifest)
  finish    manifest.parquet, rejects.parquet, stats.json (atomic; identical files are left untouched)

Memory: the driver holds per-input metadata only (Arrow, tens of bytes per input); payloads never leave
the task that encodes them and a task holds one shard. The price is decoding good inputs twice: the plan
needs the global count of good inputs before any shard can be cut, and decoding again is cheaper than
keeping (or shuffling) every payload in the object store until then. Validation results are cached in
DST/_stage1.parquet, so a resumed job only redoes the shards that are missing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data

from pipelines import fs
from pipelines import manifest as mf
from pipelines.decode import AUDIO_EXTS, MAX_IMAGE_PIXELS, TEXT_EXTS, Reject, iter_pieces, text_documents
from pipelines.manifest import ShardJobError
from pipelines.shard_media import shard_media  # vision/audio: one decode per input
from pipelines.tokenizer import EOS_ID, load_tokenizer, train_bpe

Modality = Literal["vision", "audio", "text"]
BREAK_MODE = "complete_doc"  # text blocks: fairseq TokenBlockDataset break mode (data2vec text base.yaml)
PIECE_BYTES = 8 << 20  # text files are validated/encoded in pieces of about this size
ROWS_PER_TASK = {"vision": 16, "audio": 8, "text": 4, "pieces": 8}  # inputs per validate task

_COUNT_SCHEMA = pa.schema([("idx", pa.int64()), ("k", pa.int64()), ("tokens", pa.int64()),
                           ("blocks", pa.int64()), ("dropped", pa.int64())])


@dataclass(frozen=True)
class Job:
    """What every Ray task needs; small and picklable."""

    modality: str
    src_fs: pafs.FileSystem
    src_root: str
    dst_fs: pafs.FileSystem
    dst: str
    options: dict
    tokenizer_json: str | None = None

    def src(self, rel: str) -> str:
        return posixpath.join(self.src_root, rel)


def run_shard(modality: Modality, input: str, output: str, *, samples_per_shard: int = 1000,
              tokenizer: str | None = None, overwrite: bool = False, block_size: int = 512,
              vocab_size: int = 4096, image_max_side: int | None = None, min_seconds: float = 0.5,
              max_seconds: float = 30.0, max_image_pixels: int = MAX_IMAGE_PIXELS,
              ray_address: str | None = None) -> dict:
    """Shard `input` into `output`; returns the stats also written to `output/stats.json`.

    samples_per_shard counts text blocks for text. See the module docstring for the stages and
    pipelines/manifest.py for the output formats.
    """
    t_start = time.monotonic()
    _check_args(modality, samples_per_shard, block_size, image_max_side, min_seconds, max_seconds)
    src, dst = fs.resolve(input), fs.resolve(output)
    root, entries = fs.list_files(src)
    if not entries:
        raise ShardJobError(f"input {input} contains no files; point --input at the raw corpus")
    _check_not_nested(src, dst)
    tok_json = _given_tokenizer(tokenizer) if modality == "text" and tokenizer else None
    options = _options(modality, samples_per_shard, block_size, vocab_size, image_max_side, max_image_pixels,
                       min_seconds, max_seconds, tok_json)
    plan = {"format": mf.FORMAT_VERSION, "modality": modality, "input": input, "inputs": len(entries),
            "input_bytes": sum(e.size for e in entries), "options": options,
            "fingerprint": mf.fingerprint(entries, modality, options)}
    mf.prepare_dst(dst, plan, overwrite)
    job = Job(modality, src.fs, root, dst.fs, dst.path, options, tok_json)
    log = _Log(modality)
    log(f"{len(entries)} files ({plan['input_bytes'] / 1e6:.1f} MB) under {input} → {output}")

    inputs, sidecars, list_rejects = _classify(modality, entries, explicit_file=(root != src.path))
    with _ray_session(ray_address, log):
        if modality == "text":
            stage1, job = _stage1_text(job, inputs, list_rejects, plan["fingerprint"], log)
            result = _shard_text(job, stage1, log)
        else:
            stage1, result = shard_media(job, inputs, sidecars, list_rejects, plan["fingerprint"], log, overwrite)
    return _finish(job, plan, output, stage1, result, len(inputs), len(sidecars), time.monotonic() - t_start, log)


# ---------------------------------------------------------------- setup

def _check_args(modality, samples_per_shard, block_size, image_max_side, min_seconds, max_seconds) -> None:
    if modality not in ("vision", "audio", "text"):
        raise ValueError(f"modality must be vision, audio or text, not {modality!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 tokens, got {block_size}")
    if image_max_side is not None and image_max_side < 1:
        raise ValueError(f"image_max_side must be >= 1 or None, got {image_max_side}")
    if not 0 <= min_seconds < max_seconds:
        raise ValueError(f"need 0 <= min_seconds < max_seconds, got {min_seconds} and {max_seconds}")


def _options(modality, spp, block_size, vocab_size, max_side, max_pixels, min_s, max_s, tok_json) -> dict:
    """The options that shape the output (and so belong in the fingerprint), per modality."""
    if modality == "vision":
        return {"samples_per_shard": spp, "image_max_side": max_side, "max_image_pixels": max_pixels}
    if modality == "audio":
        return {"samples_per_shard": spp, "min_seconds": min_s, "max_seconds": max_s}
    return {"samples_per_shard": spp, "block_size": block_size, "break_mode": BREAK_MODE,
            "vocab_size": None if tok_json else vocab_size,
            "tokenizer_sha256": hashlib.sha256(tok_json.encode()).hexdigest() if tok_json else None}


def _given_tokenizer(uri: str) -> str:
    loc = fs.resolve(uri)
    try:
        text = fs.read_bytes(loc.fs, loc.path).decode("utf-8")
    except (FileNotFoundError, UnicodeDecodeError) as e:
        raise ValueError(f"--tokenizer {uri}: cannot read it as a UTF-8 JSON file ({e})") from None
    load_tokenizer(text, where=f"--tokenizer {uri}")  # raises with the contract if specials are wrong
    return text


def _check_not_nested(src: fs.Location, dst: fs.Location) -> None:
    if type(src.fs) is type(dst.fs) and (dst.path + "/").startswith(src.path.rstrip("/") + "/"):
        raise ValueError(f"--output {dst.uri} is inside --input {src.uri}; its files would become inputs. "
                         "Choose an output outside the input tree.")


def _classify(modality, entries, explicit_file: bool):
    """→ (inputs, sidecars, list-stage rejects). Inputs are every file except sidecars (transcripts)."""
    inputs, sidecars, rejects = [], [], []
    allowed = {"audio": AUDIO_EXTS, "text": TEXT_EXTS}.get(modality)
    for e in entries:
        ext = posixpath.splitext(e.rel)[1].lower()
        if modality == "audio" and e.rel.lower().endswith(".trans.txt"):
            sidecars.append(e)
            continue
        inputs.append(e)
        if allowed and not explicit_file and ext not in allowed:
            rejects.append((e.rel, "list", f"unsupported extension {ext or '(none)'!r} for {modality}; "
                                           f"expected one of {', '.join(sorted(allowed))}"))
    return inputs, sidecars, rejects


@contextmanager
def _ray_session(address: str | None, log):
    """Use a running Ray; else connect to `address`/RAY_ADDRESS; else start a local one (and stop it)."""
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address and address.startswith(("http://", "https://")):  # `d2v shard` submits itself (workers/submit.py)
            raise ValueError(f"RAY_ADDRESS={address} is a Ray Jobs address: run this through `d2v shard`, which "
                             "submits it as a job there, or point RAY_ADDRESS at the cluster (host:6379)")
        if address:  # the tasks import `pipelines` from this checkout, and reach the same stores as this shell
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            ray.init(address=address, runtime_env=fs.cluster_runtime_env(root))
        else:  # headroom: the driver and Ray Data's scheduling share the box with the tasks
            ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, runtime_env=_local_env())
        started = True
        log(f"ray: {'connected to ' + address if address else 'started a local instance'}")
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # our progress lines replace them
    try:
        yield
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()  # disconnects from a remote cluster; stops only a local one we started


def _local_env() -> dict:
    """Workers of a local instance must import this package even when it is not pip-installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the folder holding pipelines/
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


class _Log:
    """Progress lines to stderr; `tick` prints at most every `every` seconds (and always at the end)."""

    def __init__(self, modality: str, every: float = 2.0):
        self.prefix, self.every, self.last = f"d2v shard {modality}:", every, 0.0

    def __call__(self, msg: str) -> None:
        print(self.prefix, msg, file=sys.stderr, flush=True)

    def tick(self, msg: str, final: bool = False) -> None:
        if final or time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self(msg)


# ---------------------------------------------------------------- Ray helpers

def _map(fn, rows: pa.Table, job: Job, rows_per_task: int, what: str, log, schema=None) -> pa.Table:
    """Ray Data map_batches of `fn(table, job)` over `rows`, streamed back with progress; sorted by idx."""
    if rows.num_rows == 0:
        return (schema or mf.STAGE1_SCHEMA).empty_table()
    rows_per_task = max(rows_per_task, -(-rows.num_rows // 4096))  # ≤ ~4k tasks, however big the corpus
    blocks = [rows.slice(i, rows_per_task) for i in range(0, rows.num_rows, rows_per_task)]
    ds = ray.data.from_arrow(blocks).map_batches(fn, fn_kwargs={"job": job}, batch_size=None,
                                                 batch_format="pyarrow", num_cpus=1)
    out, done, bad, t0 = [], 0, 0, time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        out.append(batch)
        done += batch.num_rows
        bad += batch.num_rows - batch.column("reason").null_count if "reason" in batch.column_names else 0
        rate = done / max(time.monotonic() - t0, 1e-9)
        log.tick(f"{what} {done}/{rows.num_rows} | rejects {bad} | {rate:.1f}/s", final=done == rows.num_rows)
    keys = [("idx", "ascending")] + ([("k", "ascending")] if "k" in rows.column_names else [])
    return pa.concat_tables(out).sort_by(keys)


def _run_shard_tasks(task, specs: list[tuple], log, samples_total: int, rejects: int) -> dict[int, dict]:
    """One Ray task per shard spec (spec[0] = shard index), at most 2×CPUs in flight; results by index."""
    remote = ray.remote(num_cpus=1)(task)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending, results, todo = [], {}, list(reversed(specs))
    samples, skipped, t0 = 0, 0, time.monotonic()
    while todo or pending:
        while todo and len(pending) < limit:
            pending.append(remote.remote(*todo.pop()))
        ready, pending = ray.wait(pending, num_returns=1)
        r = ray.get(ready[0])
        results[r["index"]] = r
        samples += len(r["sizes"])
        skipped += r["skipped"]
        rate = samples / max(time.monotonic() - t0, 1e-9)
        log.tick(f"shards {len(results)}/{len(specs)} ({skipped} skipped) | samples {samples}/{samples_total} "
                 f"| rejects {rejects} | {rate:.1f} samples/s", final=len(results) == len(specs))
    return results


def _list_rejects(inputs, list_rejects) -> pa.Table:
    idx_of = {e.rel: i for i, e in enumerate(inputs)}
    return mf.stage1_rows(idx=[idx_of[r] for r, _, _ in list_rejects], source=[r for r, _, _ in list_rejects],
                 stage=[s for _, s, _ in list_rejects], reason=[m for _, _, m in list_rejects])


# ---------------------------------------------------------------- vision / audio: pipelines/shard_media.py


# ---------------------------------------------------------------- text

def _stage1_text(job, inputs, list_rejects, fingerprint, log) -> tuple[pa.Table, Job]:
    """Validate + piece + count tokens; trains the tokenizer (one Ray task) when none is given."""
    tok_path = posixpath.join(job.dst, mf.TOKENIZER)
    if job.tokenizer_json is not None:
        fs.write_bytes(job.dst_fs, tok_path, job.tokenizer_json.encode(), only_if_changed=True)
    elif fs.exists(job.dst_fs, tok_path):  # resumed run: the same plan trained it already
        job = replace(job, tokenizer_json=fs.read_bytes(job.dst_fs, tok_path).decode())
        log("tokenizer reused from a previous run")
    if job.tokenizer_json is not None and (cached := mf.load_stage1(job.dst_fs, job.dst, fingerprint)) is not None:
        log("validation results reused from a previous run")
        return cached, job
    rejected = {r for r, _, _ in list_rejects}
    todo = [(i, e.rel) for i, e in enumerate(inputs) if e.rel not in rejected]
    rows = pa.table({"idx": pa.array([i for i, _ in todo], pa.int64()),
                     "rel": pa.array([r for _, r in todo], pa.string())})
    table = _map(_validate_text, rows, job, ROWS_PER_TASK["text"], "validate", log)
    table = pa.concat_tables([table, _list_rejects(inputs, list_rejects)]).sort_by("idx")
    if job.tokenizer_json is None:
        good = table.filter(pc.is_null(table.column("reason")))
        pieces = _pieces(good)
        log(f"training a byte-level BPE tokenizer (vocab {job.options['vocab_size']}) on {good.num_rows} files")
        tok_json = ray.get(ray.remote(num_cpus=1)(_train_task).remote(job, pieces))
        fs.write_bytes(job.dst_fs, tok_path, tok_json.encode())
        job = replace(job, tokenizer_json=tok_json)
        counted = _map(_count_text, pa.table({k: pieces[k] for k in ("idx", "k", "rel", "start", "end")}), job,
                       ROWS_PER_TASK["pieces"], "count tokens", log, schema=_COUNT_SCHEMA)
        table = _with_tokens(table, counted)
    mf.save_stage1(job.dst_fs, job.dst, table, fingerprint)
    return table, job


def _pieces(table: pa.Table) -> dict[str, np.ndarray]:
    """Flatten good files' pieces in stream order: idx, k (piece number), rel, start, end, tokens, and
    (once counted) blocks and dropped tokens per piece (kept in the file's `meta` JSON)."""
    starts = table.column("piece_start").combine_chunks()
    parent = pc.list_parent_indices(starts).to_numpy()
    counts = pc.list_value_length(starts).to_numpy()
    k = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, np.int64)
    tokens = table.column("piece_tokens").combine_chunks()
    metas = [json.loads(m) if m else {} for m in table.column("meta").to_pylist()]
    counted = all("piece_blocks" in m for m in metas)
    per_piece = (lambda key: np.asarray([v for m in metas for v in m[key]], np.int64)) if counted else None
    return {"idx": table.column("idx").to_numpy()[parent], "k": k,
            "rel": np.asarray(table.column("source").to_pylist(), dtype=object)[parent],
            "start": pc.list_flatten(starts).to_numpy(),
            "end": pc.list_flatten(table.column("piece_end").combine_chunks()).to_numpy(),
            "tokens": pc.list_flatten(tokens).to_numpy(zero_copy_only=False) if tokens.null_count == 0 else None,
            "blocks": per_piece("piece_blocks") if per_piece else None,
            "dropped": per_piece("piece_dropped") if per_piece else None}


def _with_tokens(table: pa.Table, counted: pa.Table) -> pa.Table:
    """Attach per-piece counts (sorted by idx, k): tokens as the `piece_tokens` list column, blocks and
    dropped tokens as `piece_blocks` / `piece_dropped` lists in each good file's `meta` JSON."""
    lengths = pc.fill_null(pc.list_value_length(table.column("piece_start").combine_chunks()), 0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = counted.column("tokens").combine_chunks()
    rejected = pc.is_valid(table.column("reason")).combine_chunks()
    arr = pa.ListArray.from_arrays(pa.array(offsets), values, mask=rejected)
    blocks, dropped = (counted.column(c).to_numpy() for c in ("blocks", "dropped"))
    metas = []
    for i, m in enumerate(table.column("meta").to_pylist()):
        if m is not None:
            a, b = offsets[i], offsets[i + 1]
            m = json.dumps({**json.loads(m), "piece_blocks": blocks[a:b].tolist(),
                            "piece_dropped": dropped[a:b].tolist()})
        metas.append(m)
    table = table.set_column(table.schema.get_field_index("meta"), "meta", pa.array(metas, pa.string()))
    return table.set_column(table.schema.get_field_index("piece_tokens"), "piece_tokens", arr)


def _doc_tokens(tok, docs: list[str]) -> list[np.ndarray]:
    """Documents -> per document its tokens then </s> (int32), as pipelines.tokenizer.encode_documents."""
    encs = tok.encode_batch(list(docs), add_special_tokens=False)
    return [np.asarray(e.ids + [EOS_ID], dtype=np.int32) for e in encs]


def _doc_blocks(doc: np.ndarray, size: int) -> list[np.ndarray]:
    """complete_doc: one document's tokens (ending in </s>) -> consecutive blocks of at most `size` tokens,
    never mixed with another document. A long document is cut at token boundaries (fairseq cuts between
    its sentences; ours carry none); a last piece that would hold only the </s> is dropped (fairseq keeps
    blocks of more than one token)."""
    blocks = [doc[i:i + size] for i in range(0, len(doc), size)]
    return blocks[:-1] if len(blocks) > 1 and len(blocks[-1]) < 2 else blocks


def _count_docs(docs: list[np.ndarray], size: int) -> tuple[int, int, int]:
    """(tokens, blocks, dropped tokens) of these documents under _doc_blocks, without building blocks."""
    tokens = blocks = dropped = 0
    for d in docs:
        n, full = len(d), -(-len(d) // size)
        lone = full > 1 and n - (full - 1) * size < 2
        tokens, blocks, dropped = tokens + n, blocks + full - lone, dropped + lone
    return tokens, blocks, dropped


def _block_room(job: Job) -> int:
    """Tokens per stored block: block_size - 1, the loader prepends <s> (fairseq tokens_per_sample - 1)."""
    return max(1, job.options["block_size"] - 1)


def _read_pieces(job: Job, rel: str):
    with job.src_fs.open_input_stream(job.src(rel), compression=None) as f:
        yield from iter_pieces(f.read, PIECE_BYTES)


def _validate_text(batch: pa.Table, job: Job) -> pa.Table:
    """Per file: UTF-8 + normalisation check, piece boundaries, token and block counts (tokenizer known)."""
    tok = load_tokenizer(job.tokenizer_json) if job.tokenizer_json else None
    names = ("idx", "source", "stage", "reason", "length", "meta", "piece_start", "piece_end", "piece_tokens")
    out: dict[str, list] = {k: [] for k in names}
    for idx, rel in zip(batch.column("idx").to_pylist(), batch.column("rel").to_pylist()):
        starts, ends, counts, docs, nbytes = [], [], [], 0, 0
        try:
            for offset, data in _read_pieces(job, rel):
                nbytes += len(data)
                if d := text_documents(data, offset=offset):
                    starts.append(offset)
                    ends.append(offset + len(data))
                    counts.append(_count_docs(_doc_tokens(tok, d), _block_room(job)) if tok else None)
                    docs += len(d)
            if not starts:
                raise Reject("no text left after normalisation (only whitespace/control characters)"
                             if nbytes else "empty file (0 bytes)", "validate" if nbytes else "read")
            meta = {"documents": docs}
            if tok:
                meta.update(piece_blocks=[c[1] for c in counts], piece_dropped=[c[2] for c in counts])
            tokens = [c[0] for c in counts] if tok else None
            row = (None, None, sum(tokens) if tok else None, json.dumps(meta), starts, ends, tokens)
        except Reject as r:
            row = (r.stage, r.reason) + (None,) * 5
        except OSError as e:
            row = ("read", f"cannot read: {e}") + (None,) * 5
        except Exception as e:  # never crash the job on one input
            row = ("decode", f"unexpected {type(e).__name__}: {e}") + (None,) * 5
        for k, v in zip(names, (idx, rel) + row):
            out[k].append(v)
    return mf.stage1_rows(**out)


def _train_task(job: Job, pieces: dict) -> str:
    def docs():
        for rel, start, end in zip(pieces["rel"], pieces["start"], pieces["end"]):
            data = fs.read_range(job.src_fs, job.src(rel), int(start), int(end))
            yield from text_documents(data, offset=int(start))

    return train_bpe(docs(), job.options["vocab_size"]).to_str()


def _count_text(batch: pa.Table, job: Job) -> pa.Table:
    tok = load_tokenizer(job.tokenizer_json)
    counts = []
    for rel, start, end in zip(*(batch.column(c).to_pylist() for c in ("rel", "start", "end"))):
        docs = text_documents(fs.read_range(job.src_fs, job.src(rel), start, end), offset=start)
        counts.append(_count_docs(_doc_tokens(tok, docs), _block_room(job)))
    cols = [pa.array([c[i] for c in counts], pa.int64()) for i in range(3)]
    return pa.table([batch.column("idx"), batch.column("k"), *cols], schema=_COUNT_SCHEMA)


def _shard_text(job: Job, stage1: pa.Table, log) -> dict:
    """Every good file's documents in sorted order, each cut into blocks of at most block_size - 1 tokens
    (complete_doc: a block never holds two documents); spp blocks per shard, numbered over the corpus."""
    B, spp, room = job.options["block_size"], job.options["samples_per_shard"], _block_room(job)
    p = _pieces(stage1.filter(pc.is_null(stage1.column("reason"))))
    n = len(p["start"])
    bends = np.cumsum(p["blocks"]) if n else np.zeros(0, np.int64)  # block index after each piece
    boffs = bends - p["blocks"] if n else bends
    toffs = np.cumsum(p["tokens"]) - p["tokens"] if n else bends  # first token of each piece in the stream
    n_blocks = int(bends[-1]) if n else 0
    total, dropped = (int(p["tokens"].sum()), int(p["dropped"].sum())) if n else (0, 0)
    specs = []
    for index, b0 in enumerate(range(0, n_blocks, spp)):
        b1 = min(b0 + spp, n_blocks)
        lo, hi = np.searchsorted(bends, b0, "right"), np.searchsorted(boffs, b1, "left")
        chunk = [(p["rel"][i], int(p["start"][i]), int(p["end"][i]), int(boffs[i]), int(p["blocks"][i]),
                  int(toffs[i])) for i in range(lo, hi) if p["blocks"][i]]
        specs.append((index, job, b0, b1, chunk))
    log(f"{total} tokens → {n_blocks} blocks of at most {room} tokens + <s> ({BREAK_MODE}; {dropped} lone </s> "
        f"dropped) in {len(specs)} shards")
    results = _run_shard_tasks(_text_shard_task, specs, log, n_blocks, stage1.num_rows - len(set(p["rel"])))
    manifest = []
    for index in range(len(specs)):
        r, name = results[index], mf.shard_name("text", index)
        for b, size, (source, length) in zip(range(index * spp, n_blocks), r["sizes"], r["blocks"]):
            manifest.append((f"block-{b:09d}", name, source, size, length, None))
    return {"manifest": manifest, "results": results, "extra_rejects": [],
            "text": {"tokens": total - dropped, "dropped_tail_tokens": dropped, "used_inputs": len(set(p["rel"])),
                     "block_size": B}}


def _text_shard_task(index: int, job: Job, b0: int, b1: int, chunk: list[tuple]) -> dict:
    """Write blocks [b0, b1); returns payload sizes and (source, length) per block."""
    path = posixpath.join(job.dst, mf.shard_name("text", index))
    members = [f"block-{b:09d}.{x}" for b in range(b0, b1) for x in ("ids.npy", "json")]
    if (sizes := mf.existing_shard(job.dst_fs, path, members)) is not None:
        return {"index": index, "sizes": sizes, "skipped": True, "blocks": _stored_blocks(job, path)}
    tok, room = load_tokenizer(job.tokenizer_json), _block_room(job)
    blocks = []  # (source, token offset in the stream, ids) for every block of the chunk's pieces
    for rel, start, end, _, n, toff in chunk:
        docs = _doc_tokens(tok, text_documents(fs.read_range(job.src_fs, job.src(rel), start, end), offset=start))
        before = len(blocks)
        for d in docs:
            blocks += [(rel, toff + i * room, ids) for i, ids in enumerate(_doc_blocks(d, room))]
            toff += len(d)
        if len(blocks) - before != n:
            raise ShardJobError(f"{job.src(rel)} bytes {start}-{end} now give {len(blocks) - before} blocks, not {n}; "
                                "it changed while the job ran. Re-run with --overwrite.")
    base = chunk[0][3] if chunk else b0
    mine = blocks[b0 - base:b1 - base]

    def samples():
        for b, (rel, toff, ids) in zip(range(b0, b1), mine):
            meta = {"source": rel, "sources": [rel], "label": None, "length": len(ids), "offset": toff}
            yield f"block-{b:09d}", "ids.npy", _npy_bytes(ids.astype("<i4")), meta

    sizes = mf.write_shard(job.dst_fs, path, samples())
    return {"index": index, "sizes": sizes, "skipped": False, "blocks": [(r, len(ids)) for r, _, ids in mine]}


def _stored_blocks(job: Job, path: str) -> list[tuple[str, int]]:
    """(source, length) of each block of a shard already in place, from its json members."""
    import tarfile

    with job.dst_fs.open_input_file(path) as f, tarfile.open(fileobj=f) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return [(m["source"], m["length"]) for m in metas]


def _npy_bytes(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------- finish

def _finish(job: Job, plan: dict, output: str, stage1: pa.Table, result: dict, n_inputs: int, n_sidecars: int,
            seconds: float, log) -> dict:
    bad = stage1.filter(pc.is_valid(stage1.column("reason")))
    rejects = sorted([tuple(r.values()) for r in bad.select(["source", "stage", "reason"]).to_pylist()]
                     + result["extra_rejects"])
    rows = result["manifest"]
    manifest, rej = mf.table_of(rows, mf.MANIFEST_SCHEMA), mf.table_of(rejects, mf.REJECTS_SCHEMA)
    fs.write_bytes(job.dst_fs, posixpath.join(job.dst, mf.MANIFEST), mf.table_bytes(manifest), only_if_changed=True)
    fs.write_bytes(job.dst_fs, posixpath.join(job.dst, mf.REJECTS), mf.table_bytes(rej), only_if_changed=True)
    skipped = sum(r["skipped"] for r in result["results"].values())
    stats = {
        "modality": job.modality, "input": plan["input"], "output": output,
        "inputs": n_inputs, "sidecars": n_sidecars, "samples": len(rows), "rejects": len(rejects),
        "rejects_by_stage": dict(sorted(Counter(s for _, s, _ in rejects).items())),
        "num_shards": len(result["results"]), "samples_per_shard": job.options["samples_per_shard"],
        "shards_written": len(result["results"]) - skipped, "shards_skipped": skipped,
        "payload_bytes": int(sum(r[3] for r in rows)), "input_fingerprint": plan["fingerprint"],
        "seconds": round(seconds, 3), "samples_per_second": round(len(rows) / max(seconds, 1e-9), 2),
        "config": plan["options"], "format": mf.FORMAT_VERSION,
    }
    if "text" in result:
        stats["text"] = result["text"]
    fs.write_bytes(job.dst_fs, posixpath.join(job.dst, mf.STATS), json.dumps(stats, indent=2).encode() + b"\n")
    mf.remove_temps(job.dst_fs, job.dst)
    log(f"done: {stats['samples']} samples in {stats['num_shards']} shards ({skipped} skipped), "
        f"{stats['rejects']} rejects, {seconds:.1f} s ({stats['samples_per_second']} samples/s)")
    return stats
