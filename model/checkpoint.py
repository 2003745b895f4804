"""Checkpoint directories: safetensors weights + the resolved config, written atomically, never unpickled.

Layout of a checkpoint directory:

    model.safetensors     student state dict (Data2Vec: `encoder.*` + `head.*`)
    teacher.safetensors   EMA teacher state dict (an Encoder's), optional
    config.yaml           the resolved Config (`Config.to_yaml()`)
    state.json            training state (step, ...), optional
    tokenizer.json        text tokenizer, optional; any other extra file the caller adds

`save_checkpoint` writes everything into `<dir>.tmp-<pid>` and renames it into place, so a reader sees
either the previous complete checkpoint or the new complete one, never a half-written directory.
Errors name the file at fault: a missing file raises FileNotFoundError, a corrupt or mismatching one
CheckpointError (a ConfigError, so the CLI reports it as a user error).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ConfigError, validate
from .data2vec import Data2Vec
from .data2vec2 import Data2Vec2
from .encoder import Encoder

MODEL_FILE = "model.safetensors"
TEACHER_FILE = "teacher.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
_RESERVED = {MODEL_FILE, TEACHER_FILE, CONFIG_FILE, STATE_FILE}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


class CheckpointError(ConfigError):
    """A checkpoint file that is corrupt or does not fit its config; the message names the file."""


# ------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` as a whole.

    On an exception the temporary directory is removed and `path` is left as it was. An existing
    `path` is moved aside first and deleted after the new one is in place (directories cannot be
    replaced by a single rename on POSIX), so `path` is never a mix of old and new files. To never
    delete an unrelated directory, an existing `path` must be empty or hold `marker` (e.g. config.yaml).
    """
    path = Path(path)
    if path.exists() and not (path / marker).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not a previous output (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    dir: str | os.PathLike,
    cfg: Config,
    student: nn.Module,
    teacher: nn.Module | None = None,
    state: dict[str, Any] | None = None,
    extra_files: Mapping[str, bytes | str | os.PathLike] | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically; returns its path.

    An existing `dir` is replaced as a whole if it is a checkpoint (has config.yaml) or empty;
    anything else raises FileExistsError.

    student: the Data2Vec student (unwrapped; DDP `module.` / compile `_orig_mod.` prefixes are stripped).
    teacher: the EMA teacher's Encoder (or anything with `state_dict()`), optional.
    state: JSON-serialisable training state, optional.
    extra_files: file name -> bytes or a path to copy (e.g. {"tokenizer.json": Path(...)}).
    """
    dir = Path(dir)
    for name in extra_files or {}:
        if name in _RESERVED or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} must be a plain file name other than {sorted(_RESERVED)}")
    with atomic_dir(dir, marker=CONFIG_FILE) as tmp:
        _save_tensors(tmp / MODEL_FILE, student.state_dict())
        if teacher is not None:
            _save_tensors(tmp / TEACHER_FILE, teacher.state_dict())
        _write(tmp / CONFIG_FILE, cfg.to_yaml().encode())
        if state is not None:
            _write(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True).encode())
        for name, src in (extra_files or {}).items():
            _write(tmp / name, src if isinstance(src, bytes) else Path(src).read_bytes())
    return dir


def _save_tensors(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """safetensors needs contiguous, CPU, non-aliasing tensors: copy only those that share storage."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        for p in _WRAPPER_PREFIXES:
            name = name.removeprefix(p)
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if ptr in seen or not whole:  # tied / shared weights, or a view into a larger buffer
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    save_file(out, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsync'ed
        _fsync(path)


# ------------------------------------------------------------------------------------------- reading
def _require(dir: Path, name: str) -> Path:
    if not dir.is_dir():
        raise FileNotFoundError(f"{dir}: no such checkpoint directory")
    path = dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint directory")
    return path


def load_config(dir: str | os.PathLike) -> Config:
    """The resolved Config saved with the checkpoint."""
    path = _require(Path(dir), CONFIG_FILE)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping, got {type(data).__name__}")
    try:
        return validate(data)
    except ConfigError as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_state(dir: str | os.PathLike) -> dict[str, Any] | None:
    """The training state saved with the checkpoint, or None if it has none."""
    path = Path(dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file -> {name: tensor}; corrupt files raise CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read safetensors weights ({err})") from None


def load_weights(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """load_state_dict(strict=True) with a message that names the file and the mismatching keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        msg = str(err).replace("\n\t", " ").replace("\n", " ")
        raise CheckpointError(f"{path}: weights do not fit config.yaml: {msg}") from None


def load_student(dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[Config, nn.Module]:
    """-> (cfg, the student the training loop builds: Data2Vec, or Data2Vec2 with its decoder for version v2,
    with its saved weights), in training mode."""
    dir = Path(dir)
    cfg = load_config(dir)
    path = _require(dir, MODEL_FILE)
    model = Data2Vec2(cfg.model, cfg.v2) if cfg.version == "v2" else Data2Vec(cfg.model)
    load_weights(model, load_tensors(path, map_location), path)
    return cfg, model.to(map_location)


def load_encoder(
    dir: str | os.PathLike, which: Literal["student", "teacher"] = "student", map_location: str | torch.device = "cpu"
) -> tuple[Config, Encoder]:
    """-> (cfg, the student's or the EMA teacher's Encoder), in eval mode."""
    dir = Path(dir)
    if which not in ("student", "teacher"):
        raise ValueError(f"which={which!r}; expected 'student' or 'teacher'")
    cfg = load_config(dir)
    if which == "teacher" and not (dir / TEACHER_FILE).is_file():
        raise FileNotFoundError(f"{dir / TEACHER_FILE}: missing (this checkpoint was saved without a teacher)")
    path = _require(dir, MODEL_FILE if which == "student" else TEACHER_FILE)
    state = load_tensors(path, map_location)
    if which == "student" or all(k.startswith("encoder.") for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    enc = Encoder(cfg.model)
    load_weights(enc, state, path)
    return cfg, enc.to(map_location).eval()
