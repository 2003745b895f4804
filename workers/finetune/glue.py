"""GLUE's TSV files as GLUE ships them, and a GLUE-format demo task built from the demo text corpus.

A GLUE task directory holds `train.tsv` and `dev.tsv` (MNLI: `dev_matched.tsv`); `test.tsv` has no labels
and is not read. Files are tab-separated with no quoting (fields may contain `"`), as fairseq's and GLUE's
own readers split them. The columns are found by the header:
    sentence / label                               SST-2
    #1 String / #2 String / Quality                MRPC
    question1 / question2 / is_duplicate           QQP
    question / sentence / label                    QNLI
    sentence1 / sentence2 / label (or gold_label)  RTE, WNLI, MNLI
CoLA has no header: source, label, original label, sentence. Labels are strings (`0`/`1`, `entailment`, ...);
classes are the sorted labels of the train file. A line with the wrong number of fields or an empty label
is an error naming `file:line`.

`write_demo_glue(labelled, out)` builds two GLUE-format tasks from the demo text corpus (LABELLED/{train,test}/
<module>/<doc>.txt), deterministically: `DOCS` (SST-2 layout, `sentence<TAB>label`, label = the module a
docstring comes from) and `PAIRS` (MRPC layout, Quality = 1 iff both docstrings come from the same module).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import FinetuneError

TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                ("#1 String", "#2 String"), ("sentence",))
LABEL_COLUMNS = ("label", "gold_label", "is_duplicate", "Quality")
COLA_FIELDS = 4  # source, label, original label, sentence
DEV_FILES = ("dev.tsv", "dev_matched.tsv")
MRPC_HEADER = ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String")


@dataclass(frozen=True)
class Row:
    texts: tuple[str, ...]  # one sentence, or a pair
    label: str
    where: str  # file:line, for error messages


@dataclass(frozen=True)
class Glue:
    root: Path
    columns: tuple[str, ...]  # the text columns read ("sentence",) or a pair
    classes: list[str]  # sorted train labels; label index = position
    train: list[Row]
    dev: list[Row]


def is_glue(path: Path) -> bool:
    return (Path(path) / "train.tsv").is_file()


def read_tsv(path: Path) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """-> (header or None for CoLA's headerless layout, [(line number, fields)]); blank lines skipped."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = [(i, fields) for i, fields in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1)
                 if fields and any(x.strip() for x in fields)]
    if not lines:
        raise FinetuneError(f"{path}: empty file; a GLUE TSV has a header line and one example per line")
    head = lines[0][1]
    known = {c for cols in TEXT_COLUMNS for c in cols} | set(LABEL_COLUMNS)
    if known & set(head):
        return head, lines[1:]
    return None, lines


def layout(path: Path, header: list[str] | None) -> tuple[tuple[int, ...], int, tuple[str, ...]]:
    """-> (text column indices, label column index, text column names) for this file's header."""
    if header is None:
        return (3,), 1, ("sentence",)
    for cols in TEXT_COLUMNS:
        if all(c in header for c in cols):
            label = next((c for c in LABEL_COLUMNS if c in header), None)
            if label is None:
                raise FinetuneError(f"{path}:1: no label column (one of {list(LABEL_COLUMNS)}) in the header; "
                                    "GLUE's test.tsv has no labels: use train.tsv and dev.tsv")
            return tuple(header.index(c) for c in cols), header.index(label), cols
    raise FinetuneError(f"{path}:1: header {header} names no GLUE text columns (one of {list(TEXT_COLUMNS)})")


def read_rows(path: Path) -> tuple[tuple[str, ...], list[Row]]:
    """One GLUE TSV file -> (text column names, rows)."""
    header, lines = read_tsv(path)
    text_idx, label_idx, names = layout(path, header)
    width = len(header) if header is not None else COLA_FIELDS
    rows = []
    for n, fields in lines:
        where = f"{path}:{n}"
        if len(fields) != width:
            raise FinetuneError(f"{where}: {len(fields)} tab-separated fields, expected {width} "
                                f"({'the header' if header else 'CoLA layout'}); fix or remove this line")
        label = fields[label_idx].strip()
        if not label:
            raise FinetuneError(f"{where}: empty label in column {label_idx + 1}")
        rows.append(Row(tuple(fields[i] for i in text_idx), label, where))
    if not rows:
        raise FinetuneError(f"{path}: no examples after the header")
    return names, rows


def read_glue(root: Path) -> Glue:
    """A GLUE task directory -> train and dev rows; dev labels must occur in train."""
    root = Path(root)
    train_path = root / "train.tsv"
    if not train_path.is_file():
        raise FinetuneError(f"--data {root}: no train.tsv; a GLUE task directory holds train.tsv and dev.tsv")
    dev_path = next((root / f for f in DEV_FILES if (root / f).is_file()), None)
    if dev_path is None:
        raise FinetuneError(f"--data {root}: no {' or '.join(DEV_FILES)} to test on (GLUE's test.tsv has no labels)")
    names, train = read_rows(train_path)
    dev_names, dev = read_rows(dev_path)
    if dev_names != names:
        raise FinetuneError(f"{dev_path}:1: text columns {list(dev_names)} differ from train.tsv's {list(names)}")
    classes = sorted({r.label for r in train})
    if len(classes) < 2:
        raise FinetuneError(f"{train_path}: only {len(classes)} label; classification needs at least 2")
    for r in dev:
        if r.label not in classes:
            raise FinetuneError(f"{r.where}: label {r.label!r} does not occur in train.tsv (labels {classes})")
    return Glue(root, names, classes, train, dev)


# ----------------------------------------------------------------------------------------- encoding
class Encoder:
    """Sentences -> RoBERTa inputs: `<s> A </s>` or `<s> A </s></s> B </s>`, normalised and tokenised as
    `d2v shard` does (pipelines.decode.text_documents + the run's tokenizer.json), each sentence truncated
    so that the whole fits `max_tokens`."""

    def __init__(self, tokenizer_json: Path, max_tokens: int) -> None:
        from pipelines.tokenizer import load_tokenizer

        self.tok = load_tokenizer(Path(tokenizer_json).read_text(encoding="utf-8"), where=str(tokenizer_json))
        self.max_tokens = max_tokens

    def ids(self, text: str) -> list[int]:
        from pipelines.decode import text_documents
        from pipelines.tokenizer import EOS_ID

        docs = text_documents(text.encode("utf-8"))
        out: list[int] = []
        for e in self.tok.encode_batch(docs, add_special_tokens=False):
            out += e.ids + [EOS_ID]
        return out[:-1]

    def __call__(self, texts: tuple[str, ...]) -> list[int]:
        from pipelines.tokenizer import BOS_ID, EOS_ID

        parts = [self.ids(t) for t in texts]
        budget = self.max_tokens - 1 - 2 * len(parts)  # <s>, and </s> (</s></s> between a pair)
        while sum(map(len, parts)) > budget:  # truncate the longest first (transformers' longest_first)
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[longest] = parts[longest][:-1]
        out = [BOS_ID]
        for i, p in enumerate(parts):
            out += ([EOS_ID] if i else []) + p + [EOS_ID]
        return out


# ---------------------------------------------------------------------------------- the demo tasks
def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _docs(labelled: Path, split: str) -> list[tuple[str, str, str]]:
    """(id, module, one-line text) of every .txt document of a labelled split, sorted."""
    out = []
    for cls in sorted(d for d in (labelled / split).iterdir() if d.is_dir()):
        for f in sorted(cls.glob("*.txt")):
            out.append((f.stem, cls.name, _one_line(f.read_text(encoding="utf-8"))))
    if not out:
        raise FinetuneError(f"{labelled / split}: no .txt documents to build the GLUE-format demo task from")
    return out


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def write_demo_glue(labelled: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """-> {"DOCS": out/DOCS, "PAIRS": out/PAIRS}; identical files for identical inputs and seed."""
    labelled, out = Path(labelled), Path(out)
    rng = np.random.default_rng(seed)
    for split, name in (("train", "train.tsv"), ("test", "dev.tsv")):
        docs = _docs(labelled, split)
        _write(out / "DOCS" / name, ["sentence\tlabel"] + [f"{text}\t{module}" for _, module, text in docs])
        pairs = ["\t".join(MRPC_HEADER)]
        by_module: dict[str, list[int]] = {}
        for i, (_, module, _) in enumerate(docs):
            by_module.setdefault(module, []).append(i)
        for i, (doc_id, module, text) in enumerate(docs):  # one pair per document: same module half the time
            same = bool(rng.integers(2))
            pool = by_module[module] if same else [j for j, d in enumerate(docs) if d[1] != module]
            j = int(rng.choice([k for k in pool if k != i] or pool))
            pairs.append(f"{int(same)}\t{doc_id}\t{docs[j][0]}\t{text}\t{docs[j][2]}")
        _write(out / "PAIRS" / name, pairs)
    return {"DOCS": out / "DOCS", "PAIRS": out / "PAIRS"}
