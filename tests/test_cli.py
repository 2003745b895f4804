"""The d2v command line end to end: import -> embed -> export, checked against transformers' models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import require

transformers = require("transformers", "the CLI round trip is checked against its models")

from tests.test_hf_parity import HF_MODEL, hf_config, perturb_  # noqa: E402
from workers.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def d2v(*args: str) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A random, fully perturbed tiny HF model per modality, saved with save_pretrained."""
    out = {}
    for i, m in enumerate(("vision", "audio", "text")):
        torch.manual_seed(i)
        model = HF_MODEL[m](hf_config(m)).eval()
        perturb_(model, seed=10 + i)
        d = tmp_path_factory.mktemp(f"hf-{m}")
        model.save_pretrained(d)
        out[m] = (d, model)
    return out


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_import_embed_export_round_trip(modality, hf_dirs, tmp_path):
    hf_dir, hf_model = hf_dirs[modality]
    ckpt = tmp_path / "ckpt"
    assert d2v("import", hf_dir, "--out", ckpt) == 0
    g = torch.Generator().manual_seed(0)
    if modality == "vision":
        x = torch.randn(3, 32, 32, generator=g)
        hf_in = {"pixel_values": x[None]}
    elif modality == "audio":
        x = torch.randn(4000, generator=g)
        hf_in = {"input_values": x[None]}
    else:
        x = torch.randint(5, 50, (12,), generator=g)
        x[0], x[-1] = 0, 2
        hf_in = {"input_ids": x[None]}
    np.save(tmp_path / "sample.npy", x.numpy())
    out = tmp_path / "emb.npz"
    assert d2v("embed", ckpt, tmp_path / "sample.npy", "--out", out) == 0
    emb = np.load(out)["sample"]
    with torch.no_grad():
        ref = hf_model(**hf_in).last_hidden_state[0].numpy()
    assert emb.shape == ref.shape and emb.ndim == 2
    np.testing.assert_allclose(emb, ref, atol=1e-4)

    exported = tmp_path / "hf-out"
    assert d2v("export", ckpt, "--format", "hf", "--out", exported) == 0
    reloaded = HF_MODEL[modality].from_pretrained(exported).eval()
    with torch.no_grad():
        again = reloaded(**hf_in).last_hidden_state[0].numpy()
    np.testing.assert_allclose(again, emb, atol=1e-5)


def test_embed_raw_image_and_errors(hf_dirs, tmp_path, capsys):
    from PIL import Image

    ckpt = tmp_path / "ckpt"
    assert d2v("import", hf_dirs["vision"][0], "--out", ckpt) == 0
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    out = tmp_path / "e.npz"
    assert d2v("embed", ckpt, tmp_path / "a.png", "--out", out) == 0
    assert np.load(out)["a"].shape == (1 + 16, 32)  # CLS + 4x4 patches of the 32x32 centre crop
    assert d2v("embed", ckpt, tmp_path / "b.png", "--out", tmp_path / "f.npz") == 2
    err = capsys.readouterr().err
    assert "b.png" in err and not (tmp_path / "f.npz").exists()
    assert d2v("embed", ckpt, tmp_path / "missing.wav", "--out", out) == 2
    assert "missing.wav" in capsys.readouterr().err


def test_cli_help_runs_as_console_script():
    exe = Path(sys.executable).parent / "d2v"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "workers.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT, check=True)
    for sub in ("demo-data", "shard", "pretrain", "embed", "export", "import"):
        assert sub in out.stdout


# The version each modality pretrains with when none is given: the measured winner on its demo task
# (README, Quality; helper measurements of `make pretrain` + `d2v evaluate`), recorded here as a decision.
MEASURED_DEFAULT = {"vision": "v2", "audio": "v1", "text": "v1"}


@pytest.mark.parametrize("argv, modality, version", [
    *[([m], m, v) for m, v in MEASURED_DEFAULT.items()],  # no --version: the modality's default
    (["vision", "--version", "v1"], "vision", "v1"),  # an explicit --version wins
    (["audio", "--version", "v2"], "audio", "v2"),
])
def test_pretrain_version_default_per_modality(argv, modality, version, monkeypatch, tmp_path, capsys):
    """`d2v pretrain MODALITY` without --version resolves the modality's default preset; the run stops at the
    data check (no cluster), after the config is resolved."""
    from model.presets import get_preset
    from workers import pretrain as driver

    resolved = []
    real = driver.resolve_config
    monkeypatch.setattr(driver, "resolve_config", lambda *a: resolved.append(real(*a)) or resolved[-1])
    assert d2v("pretrain", *argv, "--data", tmp_path / "no-shards") == 2
    assert "no-shards" in capsys.readouterr().err  # stopped at the data check, named the path
    (cfg,) = resolved
    assert cfg.version == version and cfg.preset == get_preset(modality, "tiny", version).preset


def test_default_version_shown_and_used_by_make():
    """`d2v pretrain --help` shows the table; `make pretrain` passes --version only when VERSION= is given."""
    from workers.cli import build_parser

    helptext = build_parser()._subparsers._group_actions[0].choices["pretrain"].format_help()
    assert all(f"{m} {v}" in " ".join(helptext.split()) for m, v in MEASURED_DEFAULT.items())
    dry = ["make", "-n", "--no-print-directory", "pretrain", "MODALITY=vision", "STAMP=Makefile"]
    plain = subprocess.run(dry, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "d2v pretrain vision" in plain and "--version" not in plain
    given = subprocess.run([*dry, "VERSION=v1"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "--version v1" in given
