"""Checkpoint directories: exact round trips, clear errors naming the file, atomic writes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import model.checkpoint as ckpt_mod
from model.checkpoint import (
    CheckpointError,
    load_config,
    load_encoder,
    load_state,
    load_student,
    load_tensors,
    save_checkpoint,
)
from model.config import ConfigError
from model.data2vec import Data2Vec
from model.presets import get_preset


@torch.no_grad()
def perturb_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def sample_input(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    f = cfg.model.frontend
    if cfg.model.modality == "vision":
        return torch.randn(2, 3, f.image_size, f.image_size, generator=g)
    if cfg.model.modality == "audio":
        return torch.randn(2, 2000, generator=g)
    return torch.randint(5, f.vocab_size, (2, 16), generator=g)


def make(modality: str = "vision"):
    cfg = get_preset(modality, "tiny")
    torch.manual_seed(0)
    student = perturb_(Data2Vec(cfg.model), seed=1)
    teacher = perturb_(copy.deepcopy(student.encoder), seed=2)
    return cfg, student, teacher


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_round_trip_is_exact(tmp_path, modality):
    cfg, student, teacher = make(modality)
    state = {"step": 123, "tau": 0.999, "rng": [1, 2, 3]}
    path = save_checkpoint(
        tmp_path / "ckpt", cfg, student, teacher, state=state,
        extra_files={"tokenizer.json": b'{"fake": true}', "notes.txt": b"hello"},
    )
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "teacher.safetensors", "config.yaml", "state.json", "tokenizer.json", "notes.txt"]
    )
    assert load_config(path) == cfg
    assert load_state(path) == state
    assert (path / "tokenizer.json").read_bytes() == b'{"fake": true}'

    cfg2, student2 = load_student(path)
    assert cfg2 == cfg
    assert_same_state(student2, student)
    _, enc_s = load_encoder(path, which="student")
    _, enc_t = load_encoder(path, which="teacher")
    assert not enc_s.training and not enc_t.training
    assert_same_state(enc_s, student.encoder)
    assert_same_state(enc_t, teacher)

    x = sample_input(cfg)
    with torch.no_grad():
        assert torch.equal(enc_s(x).last, student.encoder.eval()(x).last)
        assert torch.equal(enc_t(x).last, teacher.eval()(x).last)
        T = enc_s(x).last.shape[1] - enc_s.prefix_len
        mask = torch.zeros(x.shape[0], T, dtype=torch.bool)
        mask[:, ::3] = True
        pred, _ = student.eval()(x, mask)
        pred2, _ = student2.eval()(x, mask)
        assert torch.equal(pred, pred2)


def test_overwrite_replaces_whole_directory(tmp_path):
    cfg, student, teacher = make()
    path = tmp_path / "ckpt"
    save_checkpoint(path, cfg, student, teacher, state={"step": 1})
    save_checkpoint(path, cfg, student)  # no teacher, no state this time
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp / old leftovers
    assert load_state(path) is None


def test_shared_and_wrapped_tensors(tmp_path):
    """Tied weights are saved (safetensors rejects aliasing tensors); DDP/compile prefixes are stripped."""
    cfg, student, _ = make()

    class Wrapper(nn.Module):  # what DDP (`module.`) looks like from state_dict's point of view
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    path = save_checkpoint(tmp_path / "ddp", cfg, Wrapper(student))
    assert_same_state(load_student(path)[1], student)

    tied = nn.Module()
    tied.a, tied.b = nn.Linear(4, 4), nn.Linear(4, 4)
    tied.b.weight = tied.a.weight
    tied.view = nn.Parameter(torch.arange(10.0)[2:6])  # a view into a larger buffer
    path = save_checkpoint(tmp_path / "tied", cfg, tied)
    t = load_tensors(path / "model.safetensors")
    assert torch.equal(t["a.weight"], t["b.weight"]) and torch.equal(t["view"], torch.arange(2.0, 6.0))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    cfg, student, teacher = make()
    path = save_checkpoint(tmp_path / "ckpt", cfg, student, teacher)

    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    load_student(path)
    load_encoder(path, which="teacher")


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "remove, call",
    [
        ("config.yaml", lambda p: load_config(p)),
        ("model.safetensors", lambda p: load_student(p)),
        ("model.safetensors", lambda p: load_encoder(p)),
        ("teacher.safetensors", lambda p: load_encoder(p, which="teacher")),
    ],
)
def test_missing_file_is_named(tmp_path, remove, call):
    cfg, student, teacher = make()
    path = save_checkpoint(tmp_path / "ckpt", cfg, student, teacher)
    (path / remove).unlink()
    with pytest.raises(FileNotFoundError, match=remove):
        call(path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_student(tmp_path / "nope")


def test_corrupt_files_are_named(tmp_path):
    cfg, student, teacher = make()
    path = save_checkpoint(tmp_path / "ckpt", cfg, student, teacher)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_student(path)
    (path / "teacher.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError, match="teacher.safetensors"):
        load_encoder(path, which="teacher")
    (path / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(CheckpointError, match="config.yaml"):
        load_config(path)
    (path / "config.yaml").write_text(cfg.to_yaml().replace("depth: 4", "depth: -1"))
    with pytest.raises(ConfigError, match=r"(?s)config.yaml.*model.trunk.depth"):
        load_config(path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    cfg, student, _ = make()
    path = save_checkpoint(tmp_path / "ckpt", cfg, student)
    (path / "config.yaml").write_text(cfg.to_yaml().replace("depth: 4", "depth: 3"))
    with pytest.raises(CheckpointError, match=r"(?s)model.safetensors.*blocks.3"):
        load_student(path)


# ------------------------------------------------------------------------------------------ atomic
def test_failed_save_leaves_no_partial_directory(tmp_path, monkeypatch):
    cfg, student, teacher = make()
    real = ckpt_mod._save_tensors
    calls = []

    def failing(path, state):
        calls.append(path.name)
        if path.name == "teacher.safetensors":  # model.safetensors is already written by now
            raise OSError("disk full (simulated)")
        real(path, state)

    monkeypatch.setattr(ckpt_mod, "_save_tensors", failing)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ckpt", cfg, student, teacher)
    assert calls == ["model.safetensors", "teacher.safetensors"]
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a tmp dir

    # a failed re-save leaves the previous complete checkpoint untouched
    monkeypatch.setattr(ckpt_mod, "_save_tensors", real)
    path = save_checkpoint(tmp_path / "ckpt", cfg, student, state={"step": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(ckpt_mod, "_save_tensors", failing)
    with pytest.raises(OSError):
        save_checkpoint(path, cfg, student, teacher, state={"step": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert json.loads((path / "state.json").read_text()) == {"step": 1}


def test_bad_extra_file_names(tmp_path):
    cfg, student, _ = make()
    for name in ("config.yaml", "../escape.txt", "sub/dir.txt"):
        with pytest.raises(ValueError, match="plain file name"):
            save_checkpoint(tmp_path / "ckpt", cfg, student, extra_files={name: b""})
    assert not (tmp_path / "ckpt").exists()


def test_never_replaces_an_unrelated_directory(tmp_path):
    cfg, student, _ = make()
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="config.yaml"):
        save_checkpoint(other, cfg, student)
    assert [p.name for p in other.iterdir()] == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_checkpoint(empty, cfg, student)  # an empty directory is fine
    assert (empty / "model.safetensors").is_file()
