"""Text demo corpus: human-written English from the running Python's standard library, read with `ast`.

Sources (nothing is imported or executed, so reading is safe and deterministic for a given Python version):
- every module/class/function docstring in the stdlib's .py files (test packages and site-packages skipped),
- the reference-manual topics in `pydoc_data/topics.py` (the language reference as plain text).

Documents are normalised (`inspect.cleandoc`, trailing spaces and empty lines dropped), so a document
never contains a blank line; documents with control characters are dropped; exact duplicates are kept once.

Layout:
    pretrain/<group>.txt      one raw-text file per stdlib top-level package/module (`asyncio.txt`,
                              `os.txt`, ..., `pydoc_topics.txt`); documents in source order, separated
                              by one blank line.
    labelled/{train,test}/<area>/<area>_<n>.txt
                              docstring -> which stdlib area it documents (CLASSES), balanced, 80/20.
Labelled documents are kept OUT of pretrain (the rest of those packages' docstrings stay in), so a
probe never scores text the encoder was pretrained on.
"""

from __future__ import annotations

import ast
import inspect
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.demo import log, split_counts

CLASSES = ("asyncio", "email", "logging", "multiprocessing", "unittest", "xml")  # >=146 usable docstrings each in 3.11
PER_CLASS = {"small": 15, "full": 120}  # labelled documents per class (balanced)
TEST_FRACTION = 0.2
SMALL_GROUP_DOCS = 30  # "small": pretrain keeps this many documents per group, from the CLASSES packages only
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TOPICS_FILE = "pydoc_data/topics.py"
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")


@dataclass(frozen=True)
class Doc:
    group: str  # stdlib top-level package or module ("email", "os"), or "pydoc_topics"
    text: str  # normalised: no blank lines, no trailing spaces


def build(root: Path, *, seed: int, size: str) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = list_sources(stdlib, groups=CLASSES if size == "small" else None)
    docs, n_unparsable = collect(stdlib, files)

    labelled = _choose_labelled(docs, PER_CLASS[size], np.random.default_rng([seed, 0]))
    taken = {d.text for split in labelled.values() for d in split}
    for split, split_docs in labelled.items():
        numbers: dict[str, int] = {}  # per-class running number
        for doc in split_docs:
            n = numbers[doc.group] = numbers.get(doc.group, -1) + 1
            _write(root / "labelled" / split / doc.group / f"{doc.group}_{n:04d}.txt", doc.text + "\n")

    groups: dict[str, list[str]] = {}
    for doc in docs:
        if doc.text not in taken and len(doc.text.split()) >= 3:
            groups.setdefault(doc.group, []).append(doc.text)
    if size == "small":
        groups = {g: texts[:SMALL_GROUP_DOCS] for g, texts in groups.items()}
    for group, texts in sorted(groups.items()):
        _write(root / "pretrain" / f"{group}.txt", "\n\n".join(texts) + "\n")

    return {
        "source": f"Python stdlib docstrings + {TOPICS_FILE} ({stdlib})",
        "classes": list(CLASSES),
        "labelled_in_pretrain": False,
        "counts": {
            "source_files": len(files),
            "unparsable_files": n_unparsable,
            "pretrain": {
                "files": len(groups),
                "documents": sum(len(t) for t in groups.values()),
                "characters": sum(len(s) for t in groups.values() for s in t),
            },
            "labelled": split_counts(root / "labelled", "txt"),
        },
    }


def list_sources(stdlib: Path, groups: tuple[str, ...] | None = None) -> list[Path]:
    """Sorted stdlib .py files (relative), without test packages; restricted to `groups` if given."""
    if not stdlib.is_dir():
        raise FileNotFoundError(f"demo-data text: the Python standard library is not at {stdlib} "
                                "(sysconfig 'stdlib' path); run with a full CPython installation")
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS & set(rel.parts) or rel.name.startswith("test_"):
            continue
        if groups is None or _group(rel) in groups:
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def collect(stdlib: Path, files: list[Path]) -> tuple[list[Doc], int]:
    """Normalised, de-duplicated documents in (file, source line) order; and the count of unparsable files."""
    docs, seen, bad = [], set(), 0
    for i, rel in enumerate(files, 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
                tree = ast.parse((stdlib / rel).read_bytes(), filename=str(rel))
        except (SyntaxError, ValueError, OSError):
            bad += 1
            continue
        texts = _topics(tree) if rel.as_posix() == TOPICS_FILE else _docstrings(tree)
        group = "pydoc_topics" if rel.as_posix() == TOPICS_FILE else _group(rel)
        for raw in texts:
            text = normalise(raw)
            if text and text not in seen:
                seen.add(text)
                docs.append(Doc(group, text))
        if i % 200 == 0:
            log(f"demo-data text: read {i}/{len(files)} stdlib files, {len(docs)} documents")
    return docs, bad


def normalise(raw: str) -> str | None:
    """Dedent, strip trailing spaces, drop empty lines; None for short or control-character text."""
    lines = [ln.rstrip() for ln in inspect.cleandoc(raw).splitlines()]
    text = "\n".join(ln for ln in lines if ln)
    if len(text) < 20 or _BAD_CHARS.search(text):
        return None
    return text


def _docstrings(tree: ast.Module) -> list[str]:
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))  # source order, not ast.walk's breadth-first order
    docs = [ast.get_docstring(tree, clean=False)] + [ast.get_docstring(n, clean=False) for n in nodes]
    return [d for d in docs if d]


def _topics(tree: ast.Module) -> list[str]:
    """The string values of `topics = {...}` in pydoc_data/topics.py, in file order."""
    return [v.value for n in ast.walk(tree) if isinstance(n, ast.Dict)
            for v in n.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]


def _choose_labelled(docs: list[Doc], per_class: int, rng: np.random.Generator) -> dict[str, list[Doc]]:
    """Balanced random `per_class` documents of each class (>= 6 words), TEST_FRACTION of them to test."""
    out: dict[str, list[Doc]] = {"train": [], "test": []}
    for cls in CLASSES:
        pool = [d for d in docs if d.group == cls and len(d.text) >= 40 and len(d.text.split()) >= 6]
        if len(pool) < per_class:
            raise ValueError(f"demo-data text: stdlib package {cls!r} has {len(pool)} usable docstrings, fewer "
                             f"than the {per_class} needed; change pipelines/demo_text.py CLASSES for this Python")
        picked = sorted(rng.choice(len(pool), per_class, replace=False))  # keep source order within a class
        n_test = max(1, round(per_class * TEST_FRACTION))
        test_ids = set(rng.permutation(picked)[:n_test].tolist())
        for i in picked:
            out["test" if i in test_ids else "train"].append(pool[i])
    return out


def _group(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _write(path: Path, text: str) -> None:
    # The whole tree is staged and renamed by build_demo, so a direct write is never seen half-done.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")
