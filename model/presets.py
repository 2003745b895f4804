"""Presets: typed functions that build a `Config` and derive from each other (base -> large, base -> tiny).

Values follow the data2vec reference code (fairseq examples/data2vec, facebookresearch/data2vec_vision),
which produced the published numbers; where the paper says otherwise the docstring records it.
See ../shared/SPEC.md section 2.
"""

from __future__ import annotations

from typing import Callable

from .config import (
    AudioFrontendConfig,
    BlockMaskConfig,
    Config,
    ConfigError,
    DataConfig,
    HeadConfig,
    ImageFrontendConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    SpanMaskConfig,
    TargetConfig,
    TeacherConfig,
    TextFrontendConfig,
    TrainConfig,
    TrunkConfig,
)

# ------------------------------------------------------------------------------------------- vision


def vision_base() -> Config:
    """data2vec v1 ViT-B/16 (BEiT-style trunk), data2vec_vision code values.

    Paper differences: EMA .9998 -> .9999 (code README run: constant .9998); target = FFN output
    (code: end of block, used here). 2048 images/update over the cluster, 800 epochs of ImageNet-1K.
    """
    return Config(
        preset="vision-base",
        model=ModelConfig(
            modality="vision",
            frontend=ImageFrontendConfig(image_size=224, patch_size=16),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="pre", ln_eps=1e-6,
                layer_scale_init=1e-4, qkv_bias="qv", rel_pos_bias=True, final_norm=True,
                dropout=0.0, attn_dropout=0.0, drop_path=0.25,
            ),
            head=HeadConfig(kind="linear"),
        ),
        masking=BlockMaskConfig(num_masked=120, min_block=16, min_aspect=0.3),
        teacher=TeacherConfig(tau0=0.9998, tau_end=0.9998, tau_steps=0, scope="all"),
        targets=TargetConfig(top_k=6, layer_output="block", layer_norm="layer", final_norm="layer"),
        loss=LossConfig(kind="smooth_l1", beta=2.0, dim_reduce="mean", scale="one"),
        optim=OptimConfig(
            name="adamw", lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
            schedule="cosine", warmup_steps=6_250, final_lr=1e-5, clip_norm=3.0,
        ),
        data=DataConfig(crop_scale=(0.08, 1.0), hflip=True, color_jitter=0.4),
        train=TrainConfig(max_steps=500_000, batch_size=128, checkpoint_every=5000),
    )


def vision_large() -> Config:
    """data2vec v1 ViT-L/16: 24 x 1024, 16 heads, layer scale 1e-5, drop path .2, K=6 (blocks 18..23).

    4096 images/update, lr 1e-3, 80 warmup epochs. Paper: phase-2 EMA .9999.
    """
    cfg = vision_base()
    return _update(
        cfg,
        preset="vision-large",
        **{
            "model.trunk.dim": 1024, "model.trunk.depth": 24, "model.trunk.heads": 16,
            "model.trunk.ffn_dim": 4096, "model.trunk.layer_scale_init": 1e-5, "model.trunk.drop_path": 0.2,
            "optim.lr": 1e-3, "optim.warmup_steps": 25_000, "train.max_steps": 500_000,
        },
    )


def vision_tiny() -> Config:
    """A debug twin of vision_base for CPU tests and the demo corpus: 32x32 images, 8x8 patches (4x4 grid).

    Tuned so that a few CPU minutes learn something (measured on the digits demo, see README): quarter-digit
    patches with 10 of 16 masked make the masked content depend on which digit it is, layer scale 0.1
    (base: 1e-4) lets the blocks move within hundreds rather than many thousands of updates.
    """
    cfg = vision_base()
    return _update(
        cfg,
        preset="vision-tiny",
        **{
            "model.frontend.image_size": 32, "model.frontend.patch_size": 8,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "model.trunk.drop_path": 0.1, "model.trunk.layer_scale_init": 0.1,
            "masking.num_masked": 10, "masking.min_block": 2,
            "targets.top_k": 2,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.lr": 1e-3, "optim.warmup_steps": 30, "optim.final_lr": 1e-5,
            "data.crop_scale": (0.5, 1.0),
            **_TINY_TRAIN,
            "train.max_steps": 1000, "train.checkpoint_every": 250,
        },
    )


# -------------------------------------------------------------------------------------------- audio


def audio_base() -> Config:
    """data2vec v1 speech Base (fairseq base_librispeech): post-LN wav2vec 2.0 trunk, K=8 FFN outputs.

    Paper: max crop 2-20 s; code crops at 250k samples (~15.6 s). ~63 min of audio per update, fp16.
    """
    return Config(
        preset="audio-base",
        model=ModelConfig(
            modality="audio",
            frontend=AudioFrontendConfig(),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-5,
                qkv_bias="qkv", input_norm=True, dropout=0.1, attn_dropout=0.1, activation_dropout=0.0,
                layerdrop=0.05,
            ),
            head=HeadConfig(kind="linear"),
        ),
        masking=SpanMaskConfig(mask_prob=0.65, span_length=10, min_spans=1),
        teacher=TeacherConfig(tau0=0.999, tau_end=0.9999, tau_steps=30_000, scope="layers"),
        targets=TargetConfig(top_k=8, layer_output="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(kind="l2", dim_reduce="sum", scale="inv_sqrt_dim"),
        optim=OptimConfig(
            name="adam", lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
            schedule="tri_stage", tri_stage=(0.03, 0.9, 0.07), tri_stage_final_scale=0.01, clip_norm=None,
        ),
        data=DataConfig(max_samples=250_000, min_samples=32_000, normalize=True),
        train=TrainConfig(max_steps=400_000, batch_size=8, checkpoint_every=5000),
    )


def audio_large() -> Config:
    """data2vec v1 speech Large: 24 x 1024, 16 heads, FFN 4096."""
    return _update(
        audio_base(),
        preset="audio-large",
        **{"model.trunk.dim": 1024, "model.trunk.depth": 24, "model.trunk.heads": 16, "model.trunk.ffn_dim": 4096},
    )


def audio_tiny() -> Config:
    """A debug twin of audio_base: 64-channel conv extractor (same 320x stride), 4 x 64 trunk, 2 s crops."""
    cfg = audio_base()
    return _update(
        cfg,
        preset="audio-tiny",
        **{
            "model.frontend.conv_layers": [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "model.trunk.layerdrop": 0.0,
            "targets.top_k": 3,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.lr": 1e-3, "optim.tri_stage_final_scale": 0.05,
            "data.max_samples": 32_000, "data.min_samples": 4_000,
            **_TINY_TRAIN,
        },
    )


# --------------------------------------------------------------------------------------------- text


def text_base() -> Config:
    """data2vec v1 text Base (fairseq data2vec_text, RoBERTa trunk), K=10 FFN outputs.

    Paper: BERT masking 15% (80/10/10), EMA over 100k updates, tri-stage LR 5/80/15.
    Code (used here): span masking p=.35, length 4, no random/unchanged; EMA anneal 300k; cosine, 10k warmup.
    256 x 512 tokens per update.
    """
    return Config(
        preset="text-base",
        model=ModelConfig(
            modality="text",
            frontend=TextFrontendConfig(vocab_size=50265, max_positions=514),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-5,
                qkv_bias="qkv", dropout=0.1, attn_dropout=0.1, activation_dropout=0.0,
            ),
            head=HeadConfig(kind="mlp", hidden_mult=2),
        ),
        masking=SpanMaskConfig(mask_prob=0.35, span_length=4, min_spans=1),
        teacher=TeacherConfig(tau0=0.999, tau_end=0.9999, tau_steps=300_000, scope="layers"),
        targets=TargetConfig(top_k=10, layer_output="ffn", layer_norm="layer", final_norm="none"),
        loss=LossConfig(kind="smooth_l1", beta=4.0, dim_reduce="sum", scale="one"),
        optim=OptimConfig(
            name="adam", lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
            schedule="cosine", warmup_steps=10_000, clip_norm=5.0,
        ),
        data=DataConfig(block_size=512),
        train=TrainConfig(max_steps=1_000_000, batch_size=16, checkpoint_every=5000),
    )


def text_large() -> Config:
    """data2vec v1 text Large (RoBERTa-large shape): 24 x 1024, 16 heads, FFN 4096."""
    return _update(
        text_base(),
        preset="text-large",
        **{"model.trunk.dim": 1024, "model.trunk.depth": 24, "model.trunk.heads": 16, "model.trunk.ffn_dim": 4096},
    )


def text_tiny() -> Config:
    """A debug twin of text_base: 4 x 64 trunk, 128-token blocks, 4k vocabulary (set from the tokenizer).

    Per-worker batch 8: with the default 2 workers, 16 blocks per update for 1000 updates.
    """
    return _update(
        text_base(),
        preset="text-tiny",
        **{
            "model.frontend.vocab_size": 4096, "model.frontend.max_positions": 130,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "targets.top_k": 3,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.lr": 1e-3, "optim.warmup_steps": 30,
            "data.block_size": 128,
            **_TINY_TRAIN,
            # measured on the docstring demo: 300 updates of 32 blocks do not beat the random-init probe,
            # 1000 updates of 16 blocks do (README, Quality)
            "train.max_steps": 1000, "train.batch_size": 8, "train.checkpoint_every": 250,
        },
    )


# ---------------------------------------------------------------------------------------------- api
_TINY_TRAIN = {
    "train.max_steps": 300, "train.batch_size": 16, "train.checkpoint_every": 100, "train.log_every": 10,
    "train.collapse_after": 100, "data.shuffle_buffer": 256,
}

PRESETS: dict[tuple[str, str], Callable[[], Config]] = {
    ("vision", "tiny"): vision_tiny, ("vision", "base"): vision_base, ("vision", "large"): vision_large,
    ("audio", "tiny"): audio_tiny, ("audio", "base"): audio_base, ("audio", "large"): audio_large,
    ("text", "tiny"): text_tiny, ("text", "base"): text_base, ("text", "large"): text_large,
}


def get_preset(modality: str, size: str = "base", version: str = "v1") -> Config:
    """The preset config for (modality, size, version); errors name the allowed values."""
    if version != "v1":
        raise ConfigError(f"version={version!r} is not available yet; allowed: 'v1'")
    try:
        return PRESETS[(modality, size)]()
    except KeyError:
        mods = sorted({m for m, _ in PRESETS})
        sizes = sorted({s for _, s in PRESETS})
        raise ConfigError(
            f"no preset for modality={modality!r} size={size!r}; modalities: {mods}, sizes: {sizes}"
        ) from None


def _update(cfg: Config, preset: str, **dotted: object) -> Config:
    """Derive a preset: set dotted keys (validated) and rename."""
    from .config import validate

    data = cfg.to_dict()
    data["preset"] = preset
    for key, value in dotted.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        if last not in node:
            raise KeyError(f"preset {preset}: unknown key {key}")
        node[last] = value
    return validate(data)
