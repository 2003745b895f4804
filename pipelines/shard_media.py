"""`d2v shard vision|audio`: each input read and decoded ONCE, exact-size shards, byte-identical reruns.

Stages (called from pipelines.shard.run_shard, which lists, plans the DST and writes manifest/stats):
  encode   one Ray task per contiguous chunk of the sorted input listing: read → decode → validate →
           encode each input once and append its `<key>.<ext>` + `<key>.json` tar members to a part file
           DST/_parts/<plan>/part-NNNNNN.tar; return one metadata row per input (reject reason, or payload
           size and the byte range its members occupy in the part). The rows are also written next to the
           part (part-NNNNNN.parquet), so a resumed job reuses finished chunks without decoding them again.
  plan     driver: good inputs in sorted order → shard i holds samples [i*N, (i+1)*N)
  repack   one Ray task per shard: copy its samples' member byte ranges out of the parts (no decoding) and
           end the archive exactly as tarfile does → `<name>.tmp` → rename. Members carry the fixed headers
           of manifest.write_tar and a tar header does not depend on its position, so a shard is the same
           bytes as writing its samples directly. Shards already in place are checked and skipped.
  cleanup  the parts are deleted once every shard is in place.

Why parts: the plan needs the global count of good inputs before any shard can be cut, so the encoded
bytes must wait somewhere; a part file on the output filesystem costs one extra sequential copy, where the
previous design decoded every input twice. Memory: a task holds one sample at a time; the driver holds one
small Arrow row per input (and the manifest rows at the end), never a payload.
"""

from __future__ import annotations

import bisect
import io
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from pipelines import fs
from pipelines import manifest as mf
from pipelines.decode import Reject, decode_audio, decode_image
from pipelines.manifest import ShardJobError

PARTS = "_parts"  # DST/_parts/<plan id>/part-NNNNNN.{tar,parquet}: encoded chunks until the shards exist
TASKS_PER_JOB = 64  # inputs are cut into about this many chunks (load balance vs per-task overhead) …
CHUNK_LIMITS = {"vision": (16, 1024), "audio": (4, 256)}  # … of at least/at most this many inputs
COPY_BYTES = 8 << 20  # repack copies part ranges in pieces of this size

ROWS_SCHEMA = pa.schema([  # one row per input: the encode result, cached as DST/_stage1.parquet
    ("idx", pa.int64()), ("source", pa.string()), ("key", pa.string()),
    ("stage", pa.string()), ("reason", pa.string()),  # null when the input is good
    ("ext", pa.string()), ("length", pa.int64()), ("label", pa.string()),
    ("bytes", pa.int64()),  # payload size (json excluded)
    ("part", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),  # members' byte range in the part
])


def shard_media(job, inputs: list, sidecars: list, list_rejects: list, fingerprint: str, log,
                fresh: bool = False) -> tuple[pa.Table, dict]:
    """Encode, plan, repack; → (per-input rows for the rejects, result for pipelines.shard._finish)."""
    chunk = _chunk_size(job.modality, len(inputs))
    parts = posixpath.join(job.dst, PARTS, f"{fingerprint[:16]}-c{chunk}")
    _drop_stale_parts(job, keep=None if fresh else parts)
    job.dst_fs.create_dir(parts, recursive=True)
    specs = _ChunkSpecs(job, inputs, sidecars, list_rejects, chunk, parts)
    rows = _cached_rows(job, fingerprint)
    if rows is None:
        rows = _encode(job, specs, range(specs.count), log)
        rows = pa.concat_tables([rows, specs.rejects_table()]).sort_by("idx")
        mf.save_stage1(job.dst_fs, job.dst, rows, fingerprint)
    else:
        log("encode results reused from a previous run")
    good = rows.filter(pc.is_null(rows.column("reason")))
    spp = job.options["samples_per_shard"]
    n_shards = -(-good.num_rows // spp)
    present = set(fs.list_dir(job.dst_fs, job.dst))
    missing = [i for i in range(n_shards) if mf.shard_name(job.modality, i) not in present]
    needed = _parts_of(good, missing, spp)
    if (absent := [c for c in needed if not specs.done(c)]):  # resumed after the parts were deleted
        _check_same(_encode(job, specs, absent, log), rows)
    results = _repack(job, good, n_shards, parts, log, rows.num_rows - good.num_rows)
    _delete_dir(job.dst_fs, posixpath.join(job.dst, PARTS))
    return rows, {"manifest": _manifest_rows(job.modality, good, spp), "results": results, "extra_rejects": []}


def _chunk_size(modality: str, n: int) -> int:
    """Inputs per encode task: a function of the listing only, so a resumed job finds the same parts."""
    lo, hi = CHUNK_LIMITS[modality]
    return min(hi, max(lo, -(-n // TASKS_PER_JOB)))


# ---------------------------------------------------------------- encode

class _ChunkSpecs:
    """Chunk c covers inputs [c*size, (c+1)*size) of the sorted listing (list-stage rejects left out)."""

    def __init__(self, job, inputs, sidecars, list_rejects, size: int, parts: str):
        self.job, self.inputs, self.size, self.parts = job, inputs, size, parts
        self.count = -(-len(inputs) // size)
        self.list_rejects = list_rejects
        self.rejected = {r for r, _, _ in list_rejects}
        self._rejected_idx = [i for i, e in enumerate(inputs) if e.rel in self.rejected]  # sorted
        self.keys = mf.sample_keys([e.rel for e in inputs])  # over the whole listing: rejects never shift a key
        self.trans: dict[str, list[str]] = {}
        for e in sidecars:  # folder → its LibriSpeech `*.trans.txt` files
            self.trans.setdefault(posixpath.dirname(e.rel), []).append(e.rel)

    def rows(self, c: int) -> list[tuple]:
        lo, hi = c * self.size, min((c + 1) * self.size, len(self.inputs))
        return [(i, self.inputs[i].rel, self.keys[i], self.trans.get(posixpath.dirname(self.inputs[i].rel)))
                for i in range(lo, hi) if self.inputs[i].rel not in self.rejected]

    def n_rows(self, c: int) -> int:
        """len(rows(c)), without building them."""
        lo, hi = c * self.size, min((c + 1) * self.size, len(self.inputs))
        return hi - lo - (bisect.bisect_left(self._rejected_idx, hi) - bisect.bisect_left(self._rejected_idx, lo))

    def done(self, c: int) -> bool:
        return fs.exists(self.job.dst_fs, _part_path(self.parts, c, "parquet"))

    def rejects_table(self) -> pa.Table:
        idx = {e.rel: i for i, e in enumerate(self.inputs)}
        return _rows_table([{"idx": idx[rel], "source": rel, "key": self.keys[idx[rel]], "stage": stage,
                             "reason": reason} for rel, stage, reason in self.list_rejects])


def _encode(job, specs: _ChunkSpecs, chunks: Iterable[int], log) -> pa.Table:
    """Run encode tasks for `chunks`; their rows concatenated in input order."""
    chunks = list(chunks)
    total = sum(specs.n_rows(c) for c in chunks)
    tables, done, bad, t0 = {}, 0, 0, time.monotonic()
    work = ((c, job, specs.parts, specs.rows(c)) for c in chunks)  # rows built as tasks are submitted
    for c, table in _run_tasks(_encode_task, work):
        tables[c] = table
        done += table.num_rows
        bad += table.num_rows - table.column("reason").null_count
        rate = done / max(time.monotonic() - t0, 1e-9)
        log.tick(f"encode {done}/{total} | rejects {bad} | {rate:.1f}/s | ETA {(total - done) / max(rate, 1e-9):.0f} s",
                 final=len(tables) == len(chunks))
    return pa.concat_tables([tables[c] for c in sorted(tables)] or [ROWS_SCHEMA.empty_table()])


def _encode_task(c: int, job, parts: str, rows: list[tuple]) -> tuple[int, pa.Table]:
    """Decode + validate + encode every input of chunk c once; members → part tar, rows → part parquet."""
    meta_path = _part_path(parts, c, "parquet")
    if fs.exists(job.dst_fs, meta_path):  # finished by an earlier, interrupted run of the same plan
        return c, mf.read_table(fs.read_bytes(job.dst_fs, meta_path))
    out, cache = [], {}
    with fs.atomic_output(job.dst_fs, _part_path(parts, c, "tar")) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for idx, rel, key, trans in rows:
                row = {"idx": idx, "source": rel, "key": key}
                try:
                    row.update(_encode_one(job, tf, c, rel, key, trans, cache))
                except Reject as r:
                    row.update(stage=r.stage, reason=r.reason)
                except OSError as e:
                    row.update(stage="read", reason=f"cannot read: {e}")
                except Exception as e:  # a decoder bug must not crash the job or pass the input silently
                    row.update(stage="decode", reason=f"unexpected {type(e).__name__}: {e}")
                out.append(row)
    table = _rows_table(out)
    fs.write_bytes(job.dst_fs, meta_path, mf.table_bytes(table))  # last: its presence means the part is whole
    return c, table


def _encode_one(job, tf: tarfile.TarFile, c: int, rel: str, key: str, trans, cache: dict) -> dict:
    sample = _decode(job, rel, fs.read_bytes(job.src_fs, job.src(rel)))
    label, extra = _label(job, rel, trans, cache)
    payload = sample.encode()
    meta = {"source": rel, "label": label, "length": sample.length, **sample.meta, **extra}
    start = tf.offset
    add_member(tf, f"{key}.{sample.ext}", payload)
    add_member(tf, f"{key}.json", mf.json_bytes(meta))
    return {"ext": sample.ext, "length": sample.length, "label": label, "bytes": len(payload),
            "part": c, "start": start, "end": tf.offset}


def _decode(job, rel: str, data: bytes):
    o = job.options
    if job.modality == "vision":
        return decode_image(data, max_side=o["image_max_side"], max_pixels=o["max_image_pixels"])
    ext = posixpath.splitext(rel)[1].lower()
    return decode_audio(data, ext, min_seconds=o["min_seconds"], max_seconds=o["max_seconds"])


def _label(job, rel: str, trans: list[str] | None, cache: dict) -> tuple[str | None, dict]:
    """vision: the class folder (ImageNet `<class>/<file>`); audio: LibriSpeech transcript + speaker."""
    if job.modality == "vision":
        return (posixpath.basename(posixpath.dirname(rel)) or None), {}
    stem = posixpath.splitext(posixpath.basename(rel))[0]
    parts = stem.split("-")
    speaker = parts[0] if len(parts) == 3 and all(p.isdigit() for p in parts) else None
    for t in trans or []:
        if t not in cache:
            try:
                lines = fs.read_bytes(job.src_fs, job.src(t)).decode("utf-8", errors="replace").splitlines()
                cache[t] = dict(line.strip().split(" ", 1) for line in lines if " " in line.strip())
            except OSError:
                cache[t] = {}
        if stem in cache[t]:
            return cache[t][stem], {"speaker": speaker}
    return None, {"speaker": speaker}


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with the fixed header fields of manifest.write_tar (so parts repack byte-exactly)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _rows_table(rows: list[dict]) -> pa.Table:
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], f.type) for f in ROWS_SCHEMA},
                    schema=ROWS_SCHEMA)


def _cached_rows(job, fingerprint: str) -> pa.Table | None:
    t = mf.load_stage1(job.dst_fs, job.dst, fingerprint)
    return t.select(ROWS_SCHEMA.names).cast(ROWS_SCHEMA) if t is not None and \
        set(ROWS_SCHEMA.names) <= set(t.column_names) else None  # an older format's cache: encode again


def _check_same(new: pa.Table, cached: pa.Table) -> None:
    """Chunks re-encoded on resume must give the rows the plan was cut from (else an input changed)."""
    cols = ["idx", "reason", "bytes", "start", "end"]
    old = cached.filter(pc.is_in(cached.column("idx"), value_set=new.column("idx"))).select(cols)
    if not new.select(cols).equals(old):
        raise ShardJobError("inputs re-encoded to resume the job no longer give the bytes the shards were "
                            "planned from; an input changed while the job ran. Re-run with --overwrite.")


# ---------------------------------------------------------------- repack

def _parts_of(good: pa.Table, shards: list[int], spp: int) -> list[int]:
    """The chunks whose parts hold the samples of `shards`."""
    part = good.column("part").to_numpy()
    return sorted({int(p) for i in shards for p in set(part[i * spp:(i + 1) * spp])})


def _repack(job, good: pa.Table, n_shards: int, parts: str, log, n_rejects: int) -> dict[int, dict]:
    spp = job.options["samples_per_shard"]

    def work():  # built as tasks are submitted: only the specs in flight exist at once
        for i in range(n_shards):
            s = good.slice(i * spp, spp)
            yield (i, job, parts, s.column("key").to_pylist(), s.column("ext").to_pylist(),
                   _ranges(s.column("part").to_pylist(), s.column("start").to_pylist(), s.column("end").to_pylist()))

    results, samples, skipped, t0 = {}, 0, 0, time.monotonic()
    for i, r in _run_tasks(_repack_task, work()):
        results[i] = r
        samples += min(spp, good.num_rows - i * spp)
        skipped += r["skipped"]
        rate = samples / max(time.monotonic() - t0, 1e-9)
        eta = (good.num_rows - samples) / max(rate, 1e-9)
        log.tick(f"shards {len(results)}/{n_shards} ({skipped} skipped) | samples {samples}/{good.num_rows} "
                 f"| rejects {n_rejects} | {rate:.1f} samples/s | ETA {eta:.0f} s", final=len(results) == n_shards)
    return results


def _ranges(part: list[int], start: list[int], end: list[int]) -> list[tuple[int, int, int]]:
    """Samples' (part, start, end) with neighbours in the same part merged into one range."""
    out: list[list[int]] = []
    for p, a, b in zip(part, start, end):
        if out and out[-1][0] == p and out[-1][2] == a:
            out[-1][2] = b
        else:
            out.append([p, a, b])
    return [tuple(r) for r in out]


def _repack_task(index: int, job, parts: str, keys: list[str], exts: list[str],
                 ranges: list[tuple[int, int, int]]) -> tuple[int, dict]:
    """Shard `index` = its samples' member bytes, copied from the parts, + the tar end-of-archive blocks."""
    path = posixpath.join(job.dst, mf.shard_name(job.modality, index))
    members = [f"{k}.{x}" for k, e in zip(keys, exts) for x in (e, "json")]
    if mf.existing_shard(job.dst_fs, path, members) is not None:  # raises if it holds other samples
        return index, {"skipped": True}
    with fs.atomic_output(job.dst_fs, path) as out:
        n = 0
        for p, a, b in ranges:
            src = _part_path(parts, p, "tar")
            with job.dst_fs.open_input_file(src) as f:
                for off in range(a, b, COPY_BYTES):
                    data = f.read_at(min(COPY_BYTES, b - off), off)
                    if len(data) != min(COPY_BYTES, b - off):
                        raise ShardJobError(f"{src} ends at byte {off + len(data)}, before the planned {b}; "
                                            "the part was truncated. Re-run with --overwrite.")
                    out.write(data)
            n += b - a
        out.write(tar_end(n))
    return index, {"skipped": False}


def tar_end(offset: int) -> bytes:
    """What tarfile.close() appends after `offset` bytes of members: two zero blocks, then zeros to a record."""
    end = offset + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)


def _manifest_rows(modality: str, good: pa.Table, spp: int) -> list[tuple]:
    cols = [good.column(c).to_pylist() for c in ("key", "source", "bytes", "length", "label")]
    return [(key, mf.shard_name(modality, i // spp), src, size, length, label)
            for i, (key, src, size, length, label) in enumerate(zip(*cols))]


# ---------------------------------------------------------------- tasks and parts

def _run_tasks(fn: Callable, specs: Iterable[tuple]) -> Iterator:
    """fn(*spec) as Ray tasks, at most 2×CPUs in flight; yields results in completion order."""
    remote = ray.remote(num_cpus=1)(fn)
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    specs, pending = iter(specs), []
    while True:
        while len(pending) < limit and (spec := next(specs, None)) is not None:
            pending.append(remote.remote(*spec))
        if not pending:
            return
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def _part_path(parts: str, c: int, ext: str) -> str:
    return posixpath.join(parts, f"part-{c:06d}.{ext}")


def _drop_stale_parts(job, keep: str | None) -> None:
    """Parts of another plan (other inputs, options or chunking) are useless; `keep` None drops all."""
    root = posixpath.join(job.dst, PARTS)
    infos = job.dst_fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    for i in infos:
        if i.path.rstrip("/") == (keep or "").rstrip("/"):
            continue
        if i.type == pafs.FileType.Directory:
            _delete_dir(job.dst_fs, i.path)
        else:
            fs.delete(job.dst_fs, i.path)


def _delete_dir(dst_fs: pafs.FileSystem, path: str) -> None:
    try:
        dst_fs.delete_dir(path)
    except FileNotFoundError:
        pass
