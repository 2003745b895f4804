"""Hugging Face interop: our Encoder <-> a `Data2Vec{Vision,Audio,Text}Model` directory (SPEC section 5).

    export_hf(encoder, cfg, out_dir)         config.json + model.safetensors (+ tokenizer.json), HF names
    import_hf(hf_dir) -> (cfg, encoder)      the reverse, from model.safetensors or pytorch_model.bin
    export_checkpoint / import_checkpoint    the same between a d2v checkpoint directory and an HF one

transformers is not imported here (it is a dev dependency, used by the tests as the reference): the HF
`config.json` is written by hand, and HF's config defaults for the fields we read are restated below.
The exported directory needs no d2v code: it has no `auto_map`, only stock model types.

Mapping (exact unless noted):
- our fused qkv projection <-> HF query/key/value; vision has no key bias in HF (a key bias adds a
  per-query constant to the logits and cancels in softmax, so it is dropped on export and on import).
- vision layer scale ls1/ls2 <-> lambda_1/lambda_2; the shared relative position table <->
  `encoder.relative_position_bias.relative_position_bias_table` (HF's bilinear resize of the table is the
  identity at the trained grid size); our final norm <-> `layernorm` (`use_mean_pooling=False`).
- text: HF adds token_type_embeddings[0] to every token; on import it is folded into every row of our
  position table, on export it is written as zeros (`type_vocab_size=1`). The text pooler is not part of
  data2vec and is not exported: `from_pretrained` reports `pooler.dense.{weight,bias}` as missing and
  initialises them randomly; `last_hidden_state` does not depend on them.
- audio: `mask_time_prob` is exported as HF's default 0.05 so that HF keeps the mask embedding
  (`masked_spec_embed`); HF applies it only in training. HF checkpoints without it (mask_time_prob=0)
  import with a freshly initialised mask embedding.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from .checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    atomic_dir,
    load_encoder,
    load_tensors,
    save_checkpoint,
)
from .config import Config, ConfigError, ModelConfig, validate
from .data2vec import Data2Vec
from .encoder import Encoder
from .presets import get_preset

MODEL_TYPE = {"vision": "data2vec-vision", "audio": "data2vec-audio", "text": "data2vec-text"}
ARCHITECTURE = {"vision": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}
_BASE_PREFIX = {"vision": "data2vec_vision.", "audio": "data2vec_audio.", "text": "data2vec_text."}

# HF (transformers 5) config defaults of the fields we read: a config.json may omit any of them.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "vision": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02, layer_norm_eps=1e-12,
        image_size=224, patch_size=16, num_channels=3, use_mask_token=False, use_absolute_position_embeddings=False,
        use_relative_position_bias=False, use_shared_relative_position_bias=False, layer_scale_init_value=0.1,
        drop_path_rate=0.1, use_mean_pooling=True,
    ),
    "audio": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
        hidden_dropout=0.1, activation_dropout=0.1, attention_dropout=0.1, feat_proj_dropout=0.0, layerdrop=0.1,
        initializer_range=0.02, layer_norm_eps=1e-5, feat_extract_activation="gelu",
        conv_dim=[512] * 7, conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_bias=False,
        num_conv_pos_embedding_groups=16, conv_pos_kernel_size=19, num_conv_pos_embeddings=5, add_adapter=False,
    ),
    "text": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
        type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, is_decoder=False, add_cross_attention=False, position_embedding_type="absolute",
    ),
}

# ------------------------------------------------------------------------------------ name mapping
# Per block: (HF block prefix, our sub-module/param -> HF name, HF names of query/key/value).
_BLOCK: dict[str, tuple[str, dict[str, str], tuple[str, str, str]]] = {
    "vision": (
        "encoder.layer",
        {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
         "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "ls1": "lambda_1", "ls2": "lambda_2"},
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
    ),
    "audio": (
        "encoder.layers",
        {"norm1": "layer_norm", "norm2": "final_layer_norm", "attn.proj": "attention.out_proj",
         "mlp.fc1": "feed_forward.intermediate_dense", "mlp.fc2": "feed_forward.output_dense"},
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    "text": (
        "encoder.layer",
        {"norm1": "attention.output.LayerNorm", "norm2": "output.LayerNorm", "attn.proj": "attention.output.dense",
         "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
        ("attention.self.query", "attention.self.key", "attention.self.value"),
    ),
}
# Outside the blocks; "{j}" stands for a layer index.
_TOP: dict[str, dict[str, str]] = {
    "vision": {
        "frontend.patch_embed": "embeddings.patch_embeddings.projection",
        "frontend.cls_token": "embeddings.cls_token",
        "frontend.mask_emb": "embeddings.mask_token",
        "frontend.rel_pos.table": "encoder.relative_position_bias.relative_position_bias_table",
        "final_norm": "layernorm",
    },
    "audio": {
        "frontend.conv.{j}.conv": "feature_extractor.conv_layers.{j}.conv",
        "frontend.conv.{j}.norm": "feature_extractor.conv_layers.{j}.layer_norm",
        "frontend.proj_norm": "feature_projection.layer_norm",
        "frontend.proj": "feature_projection.projection",
        "frontend.mask_emb": "masked_spec_embed",
        "frontend.pos_conv.{j}.conv": "encoder.pos_conv_embed.layers.{j}.conv",
        "input_norm": "encoder.layer_norm",
    },
    "text": {
        "frontend.tokens": "embeddings.word_embeddings",
        "frontend.positions": "embeddings.position_embeddings",
        "frontend.norm": "embeddings.LayerNorm",
    },
}
_QKV = re.compile(r"blocks\.(\d+)\.attn\.(qkv\.weight|qkv\.bias|q_bias|v_bias)")
_TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
_OPTIONAL = {"frontend.mask_emb"}  # HF omits it without use_mask_token / with mask_time_prob=0
_IGNORABLE = re.compile(
    r"pooler\..*|.*relative_position_index|embeddings\.(position_ids|token_type_ids)|.*attention\.attention\.key\.bias"
)


def hf_name(modality: str, name: str) -> str:
    """Our Encoder state-dict name -> the HF Data2Vec*Model name (not for the fused qkv, see _QKV)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m:
        prefix, table, _ = _BLOCK[modality]
        head, rest = f"{prefix}.{m.group(1)}.", m.group(2)
    else:
        head, rest, table = "", name, _TOP[modality]
    j = re.search(r"\.(\d+)\.", rest)
    tmpl = re.sub(r"\.\d+\.", ".{j}.", rest, count=1)
    module, _, leaf = tmpl.rpartition(".")
    for key, suffix in ((tmpl, ""), (module, "." + leaf)):
        if key in table:
            return head + table[key].format(j=j.group(1) if j else "") + suffix
    raise KeyError(f"no Hugging Face name for {name!r} ({modality})")


# ------------------------------------------------------------------------------------------ export
def export_hf(
    encoder: Encoder, cfg: Config, out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None
) -> Path:
    """Write `encoder` as a HF Data2Vec*Model directory (config.json, model.safetensors[, tokenizer.json]).

    `Data2Vec{Vision,Audio,Text}Model.from_pretrained(out_dir).last_hidden_state` then equals
    `encoder(x).last` (eval mode). Raises ConfigError if cfg uses a setting HF cannot express. Written
    atomically; an existing out_dir is replaced only if it is empty or an HF model dir (has config.json).
    """
    m = cfg.model
    if tokenizer_json is not None and m.modality != "text":
        raise ValueError(f"tokenizer_json given for a {m.modality} model")
    hf_cfg = _hf_config(m)
    hf_cfg["dtype"] = str(next(encoder.parameters()).dtype).removeprefix("torch.")
    state = _to_hf_state(encoder.state_dict(), m)
    return _write_hf_dir(out_dir, hf_cfg, state, tokenizer_json, m.frontend)


def _write_hf_dir(out_dir, hf_cfg: dict, state: dict[str, torch.Tensor], tokenizer_json=None, frontend=None,
                  files: dict[str, str] | None = None) -> Path:
    """config.json + model.safetensors (+ tokenizer.json and its config for text, + extra text `files`),
    written atomically: an existing out_dir is replaced only if it is empty or an HF model dir."""
    with atomic_dir(out_dir, marker="config.json") as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        _save_safetensors(tmp / "model.safetensors", state)
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, tmp / TOKENIZER_FILE)
            tok_cfg = _tokenizer_config(Path(tokenizer_json), frontend)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path), {"format": "pt"})


_NO_EXPORT = ("no stock HF class holds this encoder exactly, so nothing was exported. The d2v checkpoint itself works "
              "with `d2v embed`, `d2v evaluate` and the registry's MLflow model; data2vec v1 presets (all modalities) "
              "and text v2 export to HF")


def _unsupported(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{field}={value!r} cannot be exported to Hugging Face: {why}; {_NO_EXPORT}")


def _hf_config(m: ModelConfig) -> dict[str, Any]:
    """Our ModelConfig -> the HF config.json dict (stock model type, no custom code)."""
    t, f = m.trunk, m.frontend
    want = {"vision": ("pre", False, None), "audio": ("post", True, False), "text": ("post", False, False)}
    norm_style, input_norm, final_norm = want[m.modality]
    if getattr(f, "alibi", False):  # data2vec 2.0 speech
        raise _unsupported("model.frontend.alibi", True, "HF Data2VecAudioModel has no ALiBi attention bias (data2vec "
                           "2.0 speech adds -|i-j| x slope x a learned per-head scale to every block's logits)")
    if t.norm_style != norm_style:
        raise _unsupported("model.trunk.norm_style", t.norm_style,
                           f"HF {ARCHITECTURE[m.modality]} blocks are {norm_style}-LN, these are {t.norm_style}-LN")
    if t.input_norm != input_norm:
        raise _unsupported("model.trunk.input_norm", t.input_norm, f"HF {m.modality} requires {input_norm}")
    if final_norm is not None and t.final_norm != final_norm:
        raise _unsupported("model.trunk.final_norm", t.final_norm, f"HF {m.modality} has no final LayerNorm")
    common = dict(
        model_type=MODEL_TYPE[m.modality], architectures=[ARCHITECTURE[m.modality]],
        hidden_size=t.dim, num_hidden_layers=t.depth, num_attention_heads=t.heads, intermediate_size=t.ffn_dim,
        hidden_act="gelu", layer_norm_eps=t.ln_eps, initializer_range=m.init_std,
    )
    if m.modality == "vision":
        if f.pos_embed != "none":  # HF's absolute embeddings are learned and cover CLS; not mapped here
            raise _unsupported("model.frontend.pos_embed", f.pos_embed, "the HF export maps only the relative "
                               "position bias, not a fixed absolute position table")
        return dict(
            common, image_size=f.image_size, patch_size=f.patch_size, num_channels=f.in_chans,
            use_mask_token=True, use_absolute_position_embeddings=False, use_relative_position_bias=False,
            use_shared_relative_position_bias=t.rel_pos_bias, use_mean_pooling=not t.final_norm,
            layer_scale_init_value=t.layer_scale_init or 0.0, hidden_dropout_prob=t.dropout,
            attention_probs_dropout_prob=t.attn_dropout, drop_path_rate=t.drop_path,
        )
    if m.modality == "audio":
        if t.drop_path:
            raise _unsupported("model.trunk.drop_path", t.drop_path, "HF Data2VecAudio has layerdrop, no drop path")
        chans, kernels, strides = (list(x) for x in zip(*f.conv_layers))
        return dict(
            common, conv_dim=chans, conv_kernel=kernels, conv_stride=strides, conv_bias=f.conv_bias,
            feat_extract_activation="gelu", num_conv_pos_embeddings=f.pos_conv_depth,
            conv_pos_kernel_size=f.pos_conv_kernel, num_conv_pos_embedding_groups=f.pos_conv_groups,
            hidden_dropout=t.dropout, attention_dropout=t.attn_dropout, activation_dropout=t.activation_dropout,
            feat_proj_dropout=f.feature_dropout, layerdrop=t.layerdrop, mask_time_prob=0.05, add_adapter=False,
        )
    return dict(
        common, vocab_size=f.vocab_size, max_position_embeddings=f.max_positions, type_vocab_size=1,
        pad_token_id=f.pad_id, bos_token_id=f.bos_id, eos_token_id=f.eos_id, hidden_dropout_prob=t.dropout,
        attention_probs_dropout_prob=t.attn_dropout, position_embedding_type="absolute", is_decoder=False,
        add_cross_attention=False,
    )


def _to_hf_state(state: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    mod, D = m.modality, m.trunk.dim
    prefix, _, (qn, kn, vn) = _BLOCK[mod]
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if _QKV.fullmatch(name):
            continue
        out[hf_name(mod, name)] = t.reshape(1, 1, D) if (mod, name) == ("vision", "frontend.mask_emb") else t
    for i in range(m.trunk.depth):
        p = f"{prefix}.{i}."
        w = state[f"blocks.{i}.attn.qkv.weight"]  # (3D, D): rows q | k | v
        zero = w.new_zeros(D)
        if m.trunk.qkv_bias == "qkv":
            bq, bk, bv = state[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        elif m.trunk.qkv_bias == "qv":
            bq, bk, bv = state[f"blocks.{i}.attn.q_bias"], zero, state[f"blocks.{i}.attn.v_bias"]
        else:
            bq = bk = bv = zero
        for hf, wt, b in ((qn, w[:D], bq), (kn, w[D : 2 * D], bk), (vn, w[2 * D :], bv)):
            out[p + hf + ".weight"] = wt
            if not (mod == "vision" and hf == kn):  # HF vision has no key bias (it cancels in softmax)
                out[p + hf + ".bias"] = b
    if mod == "text":
        out[_TOKEN_TYPES] = state["frontend.tokens.weight"].new_zeros(1, D)  # fairseq has no token types
    return out


def _tokenizer_config(tokenizer_json: Path, f: Any) -> dict[str, Any]:
    """A minimal tokenizer_config.json so that AutoTokenizer can load the copied tokenizer.json."""
    by_id = {i: s for s, i in _token_ids(tokenizer_json).items()}
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": f.max_positions - f.pad_id - 1
    }
    for key, i in (("bos_token", f.bos_id), ("eos_token", f.eos_id), ("pad_token", f.pad_id),
                   ("unk_token", f.unk_id), ("mask_token", f.mask_id)):
        if i in by_id:
            out[key] = by_id[i]
    return out


def _token_ids(tokenizer_json: Path) -> dict[str, int]:
    """token string -> id for the tokenizer's vocabulary and added tokens (tokenizers JSON format)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    ids.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return ids


# ------------------------------------------------------------------------------------------ import
def import_hf(hf_dir: str | os.PathLike) -> tuple[Config, Encoder]:
    """A HF Data2Vec{Vision,Audio,Text}Model directory -> (our Config, Encoder with its weights), eval mode.

    The Config starts from the matching preset (base, or large for width >= 1024) with the model fields
    taken from config.json; targets.top_k and vision masking are shrunk to fit small models.
    Unsupported HF settings raise ConfigError naming the config.json field.
    """
    hf_dir = Path(hf_dir)
    hf = _read_hf_config(hf_dir)
    cfg = _config_from_hf(hf, hf_dir)
    state, src = _read_hf_weights(hf_dir, cfg.model.modality)
    enc = Encoder(cfg.model)
    enc.load_state_dict(_from_hf_state(state, enc, cfg.model, src), strict=True)
    return cfg, enc.eval()


def _read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (not a Hugging Face model directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    modality = {v: k for k, v in MODEL_TYPE.items()}.get(data.get("model_type"))
    if modality is None:
        raise ConfigError(
            f"{path}: model_type={data.get('model_type')!r} is not supported; "
            f"expected one of {sorted(MODEL_TYPE.values())}"
        )
    return {**_HF_DEFAULTS[modality], **data, "_modality": modality}


def _reject(hf_dir: Path, field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{hf_dir / 'config.json'}: {field}={value!r} is not supported: {why}")


def _square(hf_dir: Path, hf: dict[str, Any], field: str) -> int:
    v = hf[field]
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise _reject(hf_dir, field, v, "only square images/patches (HF's relative bias assumes a square grid)")
        v = v[0]
    return int(v)


def _config_from_hf(hf: dict[str, Any], hf_dir: Path) -> Config:
    mod = hf["_modality"]
    for field in ("hidden_act", "feat_extract_activation"):
        if hf.get(field, "gelu") != "gelu":
            raise _reject(hf_dir, field, hf[field], "only exact 'gelu' is implemented")
    size = "large" if hf["hidden_size"] >= 1024 else "base"
    data = get_preset(mod, size).to_dict()
    data["preset"] = f"hf:{MODEL_TYPE[mod]}"
    trunk = data["model"]["trunk"]
    trunk.update(
        dim=hf["hidden_size"], depth=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"], ln_eps=hf["layer_norm_eps"],
    )
    data["model"]["init_std"] = hf["initializer_range"]
    fe = data["model"]["frontend"]
    if mod == "vision":
        _vision_fields(hf, hf_dir, trunk, fe, data)
    elif mod == "audio":
        _audio_fields(hf, hf_dir, trunk, fe)
    else:
        _text_fields(hf, hf_dir, trunk, fe)
    data["targets"]["top_k"] = min(data["targets"]["top_k"], trunk["depth"])
    try:
        return validate(data)
    except ConfigError as err:
        raise ConfigError(f"{hf_dir / 'config.json'} does not give a valid d2v config: {err}") from None


def _vision_fields(hf: dict, hf_dir: Path, trunk: dict, fe: dict, data: dict) -> None:
    if hf["use_absolute_position_embeddings"]:
        raise _reject(hf_dir, "use_absolute_position_embeddings", True, "d2v vision uses the relative position bias")
    if hf["use_relative_position_bias"]:
        raise _reject(hf_dir, "use_relative_position_bias", True,
                      "per-layer bias tables; only use_shared_relative_position_bias is implemented")
    image, patch = _square(hf_dir, hf, "image_size"), _square(hf_dir, hf, "patch_size")
    if image % patch:
        raise _reject(hf_dir, "image_size", image, f"not a multiple of patch_size={patch}")
    fe.update(image_size=image, patch_size=patch, in_chans=hf["num_channels"])
    ls = hf["layer_scale_init_value"]
    trunk.update(
        layer_scale_init=ls if ls > 0 else None, rel_pos_bias=bool(hf["use_shared_relative_position_bias"]),
        final_norm=not hf["use_mean_pooling"], dropout=hf["hidden_dropout_prob"],
        attn_dropout=hf["attention_probs_dropout_prob"], drop_path=hf["drop_path_rate"], qkv_bias="qv",
    )
    n = (image // patch) ** 2  # BEiT masks 120 of 196 patches in blocks of >= 16: keep the ratios
    data["masking"].update(num_masked=min(n - 1, max(1, round(120 / 196 * n))), min_block=max(1, round(16 / 196 * n)))


def _audio_fields(hf: dict, hf_dir: Path, trunk: dict, fe: dict) -> None:
    if hf.get("feat_extract_norm", "layer") != "layer":
        raise _reject(hf_dir, "feat_extract_norm", hf["feat_extract_norm"], "data2vec audio uses 'layer'")
    if hf.get("do_stable_layer_norm", False):
        raise _reject(hf_dir, "do_stable_layer_norm", True, "data2vec audio is post-LN")
    if hf["add_adapter"]:
        raise _reject(hf_dir, "add_adapter", True, "the adapter is not part of the data2vec encoder")
    lens = {len(hf[k]) for k in ("conv_dim", "conv_kernel", "conv_stride")}
    if len(lens) != 1:
        raise _reject(hf_dir, "conv_dim", hf["conv_dim"], "conv_dim, conv_kernel and conv_stride differ in length")
    fe.update(
        conv_layers=[list(x) for x in zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"])],
        conv_bias=bool(hf["conv_bias"]), pos_conv_depth=hf["num_conv_pos_embeddings"],
        pos_conv_kernel=hf["conv_pos_kernel_size"], pos_conv_groups=hf["num_conv_pos_embedding_groups"],
        feature_dropout=hf["feat_proj_dropout"],
    )
    trunk.update(
        dropout=hf["hidden_dropout"], attn_dropout=hf["attention_dropout"],
        activation_dropout=hf["activation_dropout"], layerdrop=hf["layerdrop"], qkv_bias="qkv",
    )


def _text_fields(hf: dict, hf_dir: Path, trunk: dict, fe: dict) -> None:
    if hf["type_vocab_size"] != 1:
        raise _reject(hf_dir, "type_vocab_size", hf["type_vocab_size"], "data2vec text has no token types (use 1)")
    if hf["is_decoder"] or hf["add_cross_attention"]:
        raise _reject(hf_dir, "is_decoder", hf["is_decoder"], "only the bidirectional encoder is supported")
    if hf["position_embedding_type"] != "absolute":
        raise _reject(hf_dir, "position_embedding_type", hf["position_embedding_type"], "only 'absolute'")
    fe.update(
        vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"], pad_id=hf["pad_token_id"],
        bos_id=hf["bos_token_id"], eos_id=hf["eos_token_id"],
    )
    tok = hf_dir / TOKENIZER_FILE
    if tok.is_file():  # HF's config has no unk/mask ids; the tokenizer knows them
        ids = _token_ids(tok)
        fe.update({k: ids[s] for k, s in (("unk_id", "<unk>"), ("mask_id", "<mask>")) if s in ids})
    trunk.update(dropout=hf["hidden_dropout_prob"], attn_dropout=hf["attention_probs_dropout_prob"], qkv_bias="qkv")


def _read_hf_weights(hf_dir: Path, modality: str) -> tuple[dict[str, torch.Tensor], Path]:
    """model.safetensors (or its sharded index), else pytorch_model.bin loaded with weights_only=True."""
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        src = hf_dir / "model.safetensors"
        state = load_tensors(src)
    elif index.is_file():
        src, state = index, {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_tensors(hf_dir / shard))
    elif (hf_dir / "pytorch_model.bin").is_file():
        src = hf_dir / "pytorch_model.bin"
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe pickles
            raise CheckpointError(f"{src}: cannot read weights ({type(err).__name__}: {err})") from None
    else:
        raise FileNotFoundError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
    prefix, out = _BASE_PREFIX[modality], {}
    for k, v in state.items():  # task-model checkpoints nest the base model under e.g. `data2vec_audio.`
        k = k.removeprefix(prefix)
        k = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))  # legacy LayerNorm names
        out[k] = v
    return out, src


def _from_hf_state(
    hf: dict[str, torch.Tensor], enc: Encoder, m: ModelConfig, src: Path
) -> dict[str, torch.Tensor]:
    mod = m.modality
    prefix, _, (qn, kn, vn) = _BLOCK[mod]
    ours = enc.state_dict()
    used: set[str] = set()
    missing: list[str] = []

    def get(name: str) -> torch.Tensor | None:
        if name not in hf:
            missing.append(name)
            return None
        used.add(name)
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    for name, ref in ours.items():
        qkv = _QKV.fullmatch(name)
        if qkv:
            i, part = qkv.groups()
            p = f"{prefix}.{i}."
            if part == "qkv.weight":
                ws = [get(p + n + ".weight") for n in (qn, kn, vn)]
                t = torch.cat(ws) if all(w is not None for w in ws) else None
            elif part == "qkv.bias":
                bs = [get(p + n + ".bias") for n in (qn, kn, vn)]
                t = torch.cat(bs) if all(b is not None for b in bs) else None
            else:  # vision q_bias / v_bias; a key bias, if any, is dropped (exact)
                t = get(p + (qn if part == "q_bias" else vn) + ".bias")
        else:
            key = hf_name(mod, name)
            if name in _OPTIONAL and key not in hf:
                out[name] = ref  # keep our initialisation (HF model had no mask embedding)
                continue
            t = get(key)
            if t is not None and name == "frontend.positions.weight":
                tt = get(_TOKEN_TYPES)  # HF adds token type 0 to every token: fold it in (exact)
                t = t + tt[0] if tt is not None else t
        if t is None:
            continue
        if t.numel() != ref.numel():
            raise CheckpointError(
                f"{src}: {name} needs shape {tuple(ref.shape)} but the HF weight has {tuple(t.shape)}"
            )
        out[name] = t.reshape(ref.shape).to(ref.dtype)
    if missing:
        raise CheckpointError(f"{src}: missing weights {sorted(set(missing))[:8]} (of {len(set(missing))})")
    ignored = sorted(k for k in hf if k not in used and not _IGNORABLE.fullmatch(k))
    if ignored:
        warnings.warn(f"{src}: ignored {len(ignored)} weights that are not part of the encoder: {ignored[:8]}")
    return out


# ------------------------------------------------------------------------------- checkpoint glue
def import_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """HF directory -> d2v checkpoint directory (model.safetensors, config.yaml[, tokenizer.json]).

    The student's encoder is the imported one; its regression head is freshly initialised (seed 0):
    HF models carry no data2vec head. No teacher is written: training initialises it from the student.
    """
    cfg, enc = import_hf(hf_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = Data2Vec(cfg.model)
    student.encoder.load_state_dict(enc.state_dict())
    tok = Path(hf_dir) / TOKENIZER_FILE
    extra = {TOKENIZER_FILE: tok} if cfg.model.modality == "text" and tok.is_file() else None
    return save_checkpoint(out_dir, cfg, student, extra_files=extra)


def export_checkpoint(
    ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, which: Literal["student", "teacher"] = "student"
) -> Path:
    """d2v checkpoint directory -> HF directory, with the student's (or EMA teacher's) encoder.

    For text the checkpoint's tokenizer.json, if any, is copied along.
    """
    cfg, enc = load_encoder(ckpt_dir, which=which)
    tok = Path(ckpt_dir) / TOKENIZER_FILE
    return export_hf(enc, cfg, out_dir, tokenizer_json=tok if cfg.model.modality == "text" and tok.is_file() else None)


__all__ = ["export_hf", "import_hf", "export_checkpoint", "import_checkpoint", "hf_name"]
