"""Our encoders against Hugging Face transformers' Data2Vec{Vision,Audio,Text}Model (SPEC section 5).

HF is the independent reference: tiny random HF models (every parameter perturbed, so default inits
such as zero biases, unit LayerNorms or zero relative-position tables cannot hide a mapping error) are
imported and compared; our own random encoders are exported and loaded by stock `from_pretrained`.
HF runs with eager attention, ours with SDPA.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require

transformers = require("transformers", "the independent reference for our encoders")

from model.checkpoint import load_encoder  # noqa: E402
from model.config import ConfigError  # noqa: E402
from model.encoder import Encoder  # noqa: E402
from model.frontends import audio_frames  # noqa: E402
from model.hf import export_checkpoint, export_hf, import_checkpoint, import_hf  # noqa: E402
from model.presets import get_preset  # noqa: E402
from model.targets import build_targets  # noqa: E402

MODALITIES = ["vision", "audio", "text"]
HF_MODEL = {
    "vision": transformers.Data2VecVisionModel,
    "audio": transformers.Data2VecAudioModel,
    "text": transformers.Data2VecTextModel,
}
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)
N_SAMPLES = 4000  # audio input length (tiny extractors give 199 / 12 frames)


def hf_config(modality: str, **over):
    if modality == "vision":
        kw = dict(
            image_size=32, patch_size=8, layer_norm_eps=1e-6, use_shared_relative_position_bias=True,
            use_relative_position_bias=False, use_absolute_position_embeddings=False, use_mean_pooling=False,
            use_mask_token=True, layer_scale_init_value=0.1, drop_path_rate=0.0,
        )
    elif modality == "audio":
        kw = dict(
            conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), conv_bias=True,
            num_conv_pos_embeddings=2, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
            layerdrop=0.0, mask_time_prob=0.05,  # > 0 so that the model has a mask embedding
        )
    else:
        kw = dict(vocab_size=50, max_position_embeddings=24, type_vocab_size=1, layer_norm_eps=1e-5)
    cls = {"vision": transformers.Data2VecVisionConfig, "audio": transformers.Data2VecAudioConfig,
           "text": transformers.Data2VecTextConfig}[modality]
    c = cls(**{**TINY, **kw, **over})
    c._attn_implementation = "eager"
    return c


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_inputs(cfg, seed: int = 0):
    """-> (our input, HF forward kwargs, valid (B, T) bool over the output sequence incl. prefix, or None)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    if m.modality == "vision":
        s = m.frontend.image_size
        x = torch.randn(2, 3, s, s, generator=g)
        return x, {"pixel_values": x}, None
    if m.modality == "audio":
        x = torch.randn(2, N_SAMPLES, generator=g)
        return x, {"input_values": x}, None
    f = m.frontend
    x = torch.randint(5, f.vocab_size, (3, 12), generator=g)
    x[:, 0] = f.bos_id
    x[1, 8:] = f.pad_id
    x[2, 5:] = f.pad_id
    valid = x.ne(f.pad_id)
    return x, {"input_ids": x, "attention_mask": valid.long()}, valid


def max_diff(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    if valid is not None:
        a, b = a[valid], b[valid]
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf_ref(tmp_path_factory):
    """modality -> (perturbed HF model in eval mode, its save_pretrained directory), built once."""
    cache = {}

    def get(modality: str):
        if modality not in cache:
            torch.manual_seed(0)
            model = HF_MODEL[modality](hf_config(modality))
            perturb_(model, seed=1)
            path = tmp_path_factory.mktemp(f"hf-{modality}")
            model.save_pretrained(path)  # safetensors
            cache[modality] = (model.eval(), path)
        return cache[modality]

    return get


@pytest.fixture(scope="module")
def ours_exported(tmp_path_factory):
    """modality -> (cfg, our perturbed tiny-preset encoder in eval mode, its export_hf directory)."""
    cache = {}

    def get(modality: str):
        if modality not in cache:
            cfg = get_preset(modality, "tiny")
            torch.manual_seed(0)
            enc = Encoder(cfg.model)
            perturb_(enc, seed=2)
            path = tmp_path_factory.mktemp(f"export-{modality}") / "hf"
            export_hf(enc, cfg, path)
            cache[modality] = (cfg, enc.eval(), path)
        return cache[modality]

    return get


# ----------------------------------------------------------------------------------- import / export
@pytest.mark.parametrize("modality", MODALITIES)
def test_import_matches_hf(hf_ref, modality):
    hf, path = hf_ref(modality)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in a plain HF base-model directory is ignored
        cfg, enc = import_hf(path)
    assert cfg.model.modality == modality and not enc.training
    x, kw, valid = make_inputs(cfg)
    with torch.no_grad():
        ref = hf(**kw).last_hidden_state
        ours = enc(x).last
    assert ours.shape == ref.shape
    assert max_diff(ours, ref, valid) < 1e-4
    if valid is not None:  # padded positions agree too (same pad embedding, same masked attention)
        assert max_diff(ours, ref) < 1e-4


@pytest.mark.parametrize("modality", MODALITIES)
def test_export_loads_in_hf(ours_exported, modality):
    cfg, enc, path = ours_exported(modality)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == f"data2vec-{modality}" and "auto_map" not in config
    hf, info = HF_MODEL[modality].from_pretrained(path, attn_implementation="eager", output_loading_info=True)
    expected_missing = {"pooler.dense.weight", "pooler.dense.bias"} if modality == "text" else set()
    assert set(info["missing_keys"]) == expected_missing
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    x, kw, valid = make_inputs(cfg, seed=3)
    with torch.no_grad():
        diff = max_diff(hf.eval()(**kw).last_hidden_state, enc(x).last, valid)
    assert diff < 1e-5


@pytest.mark.parametrize("modality", MODALITIES)
def test_export_import_round_trip_is_exact(ours_exported, modality):
    cfg, enc, path = ours_exported(modality)
    cfg2, enc2 = import_hf(path)
    assert cfg2.model == cfg.model  # every model field survives config.json
    ours, back = enc.state_dict(), enc2.state_dict()
    assert ours.keys() == back.keys()
    for k in ours:
        assert torch.equal(back[k], ours[k]), k


def test_relative_position_bias_is_identity_at_trained_size(hf_ref):
    hf, path = hf_ref("vision")
    _, enc = import_hf(path)
    g = enc.cfg.frontend.grid
    with torch.no_grad():
        ref = hf.encoder.relative_position_bias((g, g), interpolate_pos_encoding=False)  # (1, H, N+1, N+1)
        assert torch.equal(enc.frontend.rel_pos(), ref)


# ------------------------------------------------------------------------------------------ targets
def hf_targets(modality: str, hf, kw: dict, k: int, valid) -> torch.Tensor:
    """SPEC 5: targets from HF modules, normalised with torch.nn.functional directly."""
    if modality == "vision":  # end of block = hidden_states[i + 1]; per-layer LN, final LN
        hs = hf(**kw, output_hidden_states=True).hidden_states[1:]
        layers = [F.layer_norm(h[:, 1:], h.shape[-1:]) for h in hs[-k:]]
        y = torch.stack(layers).mean(0)
        return F.layer_norm(y, y.shape[-1:])
    grabbed: list[torch.Tensor] = []
    blocks = hf.encoder.layers if modality == "audio" else hf.encoder.layer
    mods = [b.feed_forward.output_dense if modality == "audio" else b.output.dense for b in blocks]
    hooks = [mod.register_forward_hook(lambda _m, _i, out: grabbed.append(out)) for mod in mods]
    try:
        hf(**kw)
    finally:
        for h in hooks:
            h.remove()
    if modality == "audio":  # instance norm over time, per channel, per sample; no final norm
        layers = [F.instance_norm(h.transpose(1, 2)).transpose(1, 2) for h in grabbed[-k:]]
    else:  # parameter-free layer norm; no final norm
        layers = [F.layer_norm(h, h.shape[-1:]) for h in grabbed[-k:]]
    return torch.stack(layers).mean(0)


@pytest.mark.parametrize("modality", MODALITIES)
def test_targets_match_hf_hooks(hf_ref, modality):
    hf, path = hf_ref(modality)
    cfg, enc = import_hf(path)
    t, k = cfg.targets, 2  # top 2 of 3 blocks: the selection of the last K matters
    assert (t.layer_output, t.layer_norm, t.final_norm) == {
        "vision": ("block", "layer", "layer"), "audio": ("ffn", "instance", "none"), "text": ("ffn", "layer", "none")
    }[modality]
    x, kw, valid = make_inputs(cfg, seed=4)
    with torch.no_grad():
        out = enc(x, layer_output=t.layer_output)
        P = out.prefix_len
        pad = out.padding_mask[:, P:] if out.padding_mask is not None else None
        ours = build_targets([h[:, P:] for h in out.layers], k, t.layer_norm, t.final_norm, pad)
        ref = hf_targets(modality, hf, kw, k, valid)
    assert ours.shape == ref.shape
    assert max_diff(ours, ref, valid) < 1e-4


# ------------------------------------------------------------------------------------ masked inputs
@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_masked_inputs_match_hf(hf_ref, modality):
    hf, path = hf_ref(modality)
    cfg, enc = import_hf(path)
    x, kw, _ = make_inputs(cfg, seed=5)
    if modality == "vision":
        T = cfg.model.frontend.grid ** 2
        key = "bool_masked_pos"
    else:
        T = audio_frames(N_SAMPLES, cfg.model.frontend.conv_layers)
        key = "mask_time_indices"
    mask = torch.rand(x.shape[0], T, generator=torch.Generator().manual_seed(6)) < 0.5
    with torch.no_grad():
        ref = hf(**kw, **{key: mask}).last_hidden_state
        ours = enc(x, mask=mask).last
        unmasked = enc(x).last
    assert max_diff(ours, ref) < 1e-4
    assert max_diff(ours, unmasked) > 1e-2  # the mask embedding really was used


# --------------------------------------------------------------------------------- import variants
def test_audio_without_mask_embedding_and_task_model_prefix(tmp_path):
    """mask_time_prob=0 (no masked_spec_embed) and a CTC model (weights under `data2vec_audio.`)."""
    torch.manual_seed(0)
    ctc = transformers.Data2VecAudioForCTC(hf_config("audio", mask_time_prob=0.0, vocab_size=12))
    perturb_(ctc, seed=7)
    ctc.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lm_head"):
        cfg, enc = import_hf(tmp_path)
    x, kw, _ = make_inputs(cfg, seed=8)
    with torch.no_grad():
        assert max_diff(enc(x).last, ctc.data2vec_audio.eval()(**kw).last_hidden_state) < 1e-4


def test_import_from_pytorch_model_bin(hf_ref, tmp_path):
    """Legacy directories: pytorch_model.bin, read with torch.load(weights_only=True)."""
    hf, _ = hf_ref("text")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    cfg, enc = import_hf(tmp_path)
    x, kw, valid = make_inputs(cfg)
    with torch.no_grad():
        assert max_diff(enc(x).last, hf(**kw).last_hidden_state, valid) < 1e-4


@pytest.mark.parametrize(
    "modality, field, value",
    [
        ("vision", "use_absolute_position_embeddings", True),
        ("vision", "use_relative_position_bias", True),
        ("vision", "image_size", [32, 64]),
        ("audio", "feat_extract_norm", "group"),
        ("audio", "do_stable_layer_norm", True),
        ("audio", "hidden_act", "relu"),
        ("text", "type_vocab_size", 2),
        ("text", "is_decoder", True),
    ],
)
def test_unsupported_hf_settings_are_rejected(hf_ref, tmp_path, modality, field, value):
    _, path = hf_ref(modality)
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=field):
        import_hf(tmp_path)


def test_missing_or_foreign_hf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type='bert'"):
        import_hf(tmp_path)


# ---------------------------------------------------------------------------- checkpoint glue (CLI)
def _tiny_tokenizer(path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<s>", "<pad>", "</s>", "<mask>", "<unk>"]  # not the preset's unk=3, mask=4
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials)
    tok.save(str(path))


def test_text_checkpoint_import_export_with_tokenizer(hf_ref, tmp_path):
    hf, path = hf_ref("text")
    src = tmp_path / "src"
    src.mkdir()
    for f in path.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    _tiny_tokenizer(src / "tokenizer.json", hf.config.vocab_size)
    ckpt = import_checkpoint(src, tmp_path / "ckpt")
    assert (ckpt / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    cfg, enc = load_encoder(ckpt)
    assert (cfg.model.frontend.unk_id, cfg.model.frontend.mask_id) == (4, 3)  # read from tokenizer.json
    out = export_checkpoint(ckpt, tmp_path / "exported")
    assert (out / "tokenizer.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.mask_token == "<mask>" and tok.pad_token_id == cfg.model.frontend.pad_id
    assert tok("w1 w2", add_special_tokens=False)["input_ids"] == [6, 7]
    hf2 = HF_MODEL["text"].from_pretrained(out, attn_implementation="eager").eval()
    x, kw, valid = make_inputs(cfg)
    with torch.no_grad():
        ref = hf(**kw).last_hidden_state
        assert max_diff(enc(x).last, ref, valid) < 1e-4
        assert max_diff(hf2(**kw).last_hidden_state, ref, valid) < 1e-4


# ------------------------------------------------------------------ exported dirs need no d2v code
STANDALONE = r"""
import importlib.abc, json, sys

class _NoD2V(importlib.abc.MetaPathFinder):  # d2v may be pip-installed: make sure it is not used
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("model", "workers", "pipelines"):
            raise ImportError(f"d2v package {name} must not be needed")
        return None

sys.meta_path.insert(0, _NoD2V())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

jobs = json.loads(sys.argv[1])
out = {}
for modality, (model_dir, inputs) in jobs.items():
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    assert type(model).__module__.startswith("transformers."), type(model)
    with torch.no_grad():
        out[modality] = model(**load_file(inputs)).last_hidden_state.contiguous()
save_file(out, sys.argv[2])
"""


def test_exported_dirs_load_without_d2v(ours_exported, tmp_path):
    from safetensors.torch import load_file, save_file

    jobs, expected, valids = {}, {}, {}
    for modality in MODALITIES:
        cfg, enc, path = ours_exported(modality)
        x, kw, valid = make_inputs(cfg, seed=9)
        save_file({k: v.contiguous() for k, v in kw.items()}, tmp_path / f"{modality}-in.safetensors")
        jobs[modality] = (str(path), str(tmp_path / f"{modality}-in.safetensors"))
        with torch.no_grad():
            expected[modality] = enc(x).last
        valids[modality] = valid
    result = tmp_path / "out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-I", "-c", STANDALONE, json.dumps(jobs), str(result)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(result)
    for modality in MODALITIES:
        assert max_diff(got[modality], expected[modality], valids[modality]) < 1e-5
