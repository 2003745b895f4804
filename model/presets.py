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
    """data2vec v1 ViT-B/16 (BEiT-style trunk), data2vec_vision code values (beit/README.md command).

    Paper differences: EMA .9998 -> .9999 (code README run: constant .9998); target = FFN output
    (code: end of block, used here). 128 images x 16 GPUs = 2048 per update, 625 updates per epoch,
    800 epochs of ImageNet-1K = 500k updates, 10 warmup epochs. Attention dropout .05
    (--attn_drop_rate). Init: truncated normal(0, .02) cut at +-1 sigma (BEiT's trunc_normal_ wrapper).
    Collapse guard off: the vision reference has none (train.collapse_min_*_var = 0; set them to turn
    d2v's guard on as a product safety net).
    """
    return Config(
        preset="vision-base",
        model=ModelConfig(
            modality="vision",
            frontend=ImageFrontendConfig(image_size=224, patch_size=16),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="pre", ln_eps=1e-6,
                layer_scale_init=1e-4, qkv_bias="qv", rel_pos_bias=True, final_norm=True,
                dropout=0.0, attn_dropout=0.05, drop_path=0.25,
            ),
            head=HeadConfig(kind="linear"),
            init_trunc=1.0, init_outer="normal",
        ),
        masking=BlockMaskConfig(num_masked=120, min_block=16, min_aspect=0.3),
        teacher=TeacherConfig(tau0=0.9998, tau_end=0.9998, tau_steps=0, scope="all", precision="fp32"),
        targets=TargetConfig(top_k=6, layer_output="block", layer_norm="layer", final_norm="layer"),
        loss=LossConfig(kind="smooth_l1", beta=2.0, dim_reduce="mean", scale="one", normalize="rank_mean"),
        optim=OptimConfig(
            name="adamw", lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
            schedule="cosine", warmup_steps=6_250, final_lr=1e-5, clip_norm=3.0,
            no_decay_1d=True, no_decay=["cls_token"], decay=["mask_emb"],  # BEiT get_parameter_groups
        ),
        data=DataConfig(crop_scale=(0.08, 1.0), hflip=True, color_jitter=0.4),
        train=TrainConfig(
            max_steps=500_000, batch_size=128, checkpoint_every=5000,
            collapse_min_target_var=0.0, collapse_min_pred_var=0.0,
        ),
    )


# ImageNet-1K train images // (64 images x 64 GPUs): the reference's updates per epoch for ViT-L
VIT_L_STEPS_PER_EPOCH = 1_281_167 // 4096  # 312


def vision_large() -> Config:
    """data2vec v1 ViT-L/16, phase 1 of the reference: 24 x 1024, 16 heads, layer scale 1e-5, drop path .2,
    K=6 (blocks 18..23), attention dropout .15.

    beit/README.md: 64 images x 64 GPUs = 4096 per update (312 updates per epoch), lr 1e-3, constant EMA
    .9998, 800 epochs = 249,600 updates with 80 warmup epochs (24,960 updates). The published 1600-epoch
    model is a second 800-epoch run from these weights: see `vision_large_phase2`.
    """
    cfg = vision_base()
    spe = VIT_L_STEPS_PER_EPOCH
    return _update(
        cfg,
        preset="vision-large",
        **{
            **LARGE_TRUNK, "model.trunk.layer_scale_init": 1e-5, "model.trunk.drop_path": 0.2,
            "model.trunk.attn_dropout": 0.15,
            "optim.lr": 1e-3, "optim.warmup_steps": 80 * spe, "train.max_steps": 800 * spe,
            "train.batch_size": 64,
        },
    )


def vision_large_phase2() -> Config:
    """Phase 2 of the reference ViT-L (the 1600-epoch model): another 800 epochs at constant EMA .9999
    with 40 warmup epochs (12,480 updates) and a fresh cosine schedule, everything else as `vision_large`.

    The reference starts it from the phase-1 weights (--seed_model): a new run initialised from the phase-1
    student and teacher, not a resume (optimiser, schedule and step count start over). d2v has no option
    yet to initialise a run from another run's weights, so this preset documents the schedule and is not
    in the CLI's preset table (from a random init it would be just another 800-epoch run).
    """
    spe = VIT_L_STEPS_PER_EPOCH
    return _update(
        vision_large(),
        preset="vision-large-phase2",
        **{"teacher.tau0": 0.9999, "teacher.tau_end": 0.9999, "teacher.tau_steps": 0,
           "optim.warmup_steps": 40 * spe, "train.max_steps": 800 * spe},
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
    """data2vec v1 speech Base (fairseq base_librispeech.yaml): post-LN wav2vec 2.0 trunk, K=8 FFN outputs.

    Crops at max_sample_size 320,000 samples (20 s), drops clips under 32,000 (2 s). Batches by token
    budget: max_tokens 3.8M samples per GPU x 16 GPUs (~63 min of audio per update); fp16 there.
    Masks: require_same_masks (every row trimmed to the batch-minimum mask count). Init: fairseq
    init_bert_params (untruncated normal(0, .02)) on the transformer; positional convs, feature
    projection and regression head keep PyTorch's default init (they sit outside the module it is
    applied to). Collapse guard as the reference: stop when target std < .1 or prediction std < .01
    after 5,000 updates.
    Extractor: trained at the full gradient (feature_grad_mult 1.0, wav2vec 2.0 uses .1); the teacher averages
    only the transformer (ema_transformer_only) and takes the student's own extractor + projection output as
    its input, without gradient (fairseq runs the teacher under no_grad; d2v detaches, `teacher_targets`).
    Deviations: batches are filled in shuffled stream order, not length-sorted buckets as fairseq's
    batch_by_size, so cropping to the shortest clip discards more audio per batch.
    """
    return Config(
        preset="audio-base",
        model=ModelConfig(
            modality="audio",
            frontend=AudioFrontendConfig(feature_grad_mult=1.0),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-5,
                qkv_bias="qkv", input_norm=True, dropout=0.1, attn_dropout=0.1, activation_dropout=0.0,
                layerdrop=0.05,
            ),
            head=HeadConfig(kind="linear"),
            init_trunc=None, init_outer="torch",
        ),
        masking=SpanMaskConfig(mask_prob=0.65, span_length=10, min_spans=1, require_same_masks=True),
        teacher=TeacherConfig(tau0=0.999, tau_end=0.9999, tau_steps=30_000, scope="layers"),
        targets=TargetConfig(top_k=8, layer_output="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(kind="l2", dim_reduce="sum", scale="inv_sqrt_dim"),
        optim=OptimConfig(
            name="adam", lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
            schedule="tri_stage", tri_stage=(0.03, 0.9, 0.07), tri_stage_final_scale=0.01, clip_norm=None,
        ),
        data=DataConfig(max_samples=320_000, min_samples=32_000, normalize=True),
        train=TrainConfig(
            max_steps=400_000, batch_size=8, max_tokens=3_800_000, checkpoint_every=5000,
            collapse_min_target_var=0.1, collapse_min_pred_var=0.01, collapse_after=5000,
        ),
    )


def audio_large() -> Config:
    """data2vec v1 speech Large: 24 x 1024, 16 heads, FFN 4096."""
    return _update(
        audio_base(),
        preset="audio-large",
        **LARGE_TRUNK,
    )


def audio_tiny() -> Config:
    """A debug twin of audio_base: 64-channel conv extractor (same 320x stride), 4 x 64 trunk, 2 s crops,
    batches of train.batch_size clips (no token budget).

    Measured with the real commands (`make pretrain MODALITY=audio`, 300 updates of 2 Ray workers x 16 clips,
    ~220 s; then `d2v evaluate`): linear probe 0.495 vs 0.335 for the random-init twin (MFCC mean+std 0.795).
    v2 tiny stays below that margin, so v1 is the default version for audio (DEFAULT_VERSION).
    Extractor gradient: the reference's full gradient (feature_grad_mult 1.0), kept on purpose. With it the
    extractor's frames become nearly alike within 100 updates (share of conv-output energy varying between
    frames .008 after the last conv layer vs .35 at init; adjacent-frame cosine .995 vs .65), yet this encoder
    probes and CTC-fine-tunes best of those measured: wav2vec 2.0's .1 changes nothing measurable (AdamW
    normalises each parameter's step, so a constant gradient scale cancels unless clipping or eps bite:
    same collapse metrics), and 0 (extractor frozen at its random init: no collapse, pretraining 3.5x faster)
    drops the probe to 0.390 (+5.5 over random; 0.415 after 1000 updates in the same wall time) and raises
    `d2v finetune --task asr` CER at 10 min from .832 to .944.
    """
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
            "train.max_tokens": None,
            **_TINY_TRAIN,
        },
    )


# --------------------------------------------------------------------------------------------- text


def text_base() -> Config:
    """data2vec v1 text Base (fairseq data2vec_text, RoBERTa trunk), K=10 FFN outputs.

    Paper: BERT masking 15% (80/10/10), EMA over 100k updates, tri-stage LR 5/80/15.
    Code (used here, fairseq text/pretraining/base.yaml): span masking p=.35, length 4, no random/unchanged,
    spans as mask_tokens_dataset.py (starts over all positions incl. <s>/</s>, cut at the end, no minimum);
    loss only where the input is <mask>; EMA anneal 300k; cosine, 10k warmup. Blocks of at most 512
    tokens (<s> + 511) that never span two documents (sample_break_mode complete_doc); max_tokens 8192
    per GPU x 16 GPUs. Init: init_bert_params (untruncated normal(0, .02)) on the encoder, PyTorch's
    default on the regression head. No collapse guard (the text reference has none; 0 = off).
    Deviations: a document longer than a block is cut at token boundaries (the reference cuts between
    sentences, each ending in </s>; our documents carry no sentence boundaries); a batch in which no
    token was masked gets one masked token (the loss needs one).
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
            init_trunc=None, init_outer="torch",
        ),
        masking=SpanMaskConfig(mask_prob=0.35, span_length=4, min_spans=0),
        teacher=TeacherConfig(tau0=0.999, tau_end=0.9999, tau_steps=300_000, scope="layers"),
        targets=TargetConfig(top_k=10, layer_output="ffn", layer_norm="layer", final_norm="none"),
        loss=LossConfig(kind="smooth_l1", beta=4.0, dim_reduce="sum", scale="one"),
        optim=OptimConfig(
            name="adam", lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
            schedule="cosine", warmup_steps=10_000, clip_norm=5.0,
        ),
        data=DataConfig(block_size=512),
        train=TrainConfig(
            max_steps=1_000_000, batch_size=16, max_tokens=8192, checkpoint_every=5000,
            collapse_min_target_var=0.0, collapse_min_pred_var=0.0,
        ),
    )


def text_large() -> Config:
    """data2vec v1 text Large (RoBERTa-large shape): 24 x 1024, 16 heads, FFN 4096."""
    return _update(
        text_base(),
        preset="text-large",
        **LARGE_TRUNK,
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
            "train.max_tokens": None,
            **_TINY_TRAIN,
            # measured on the docstring demo: 300 updates of 32 blocks do not beat the random-init probe,
            # 1000 updates of 16 blocks do (README, Quality)
            "train.max_steps": 1000, "train.batch_size": 8, "train.checkpoint_every": 250,
        },
    )


# ---------------------------------------------------------------------------------------------- api
# The "Large" trunk every modality shares (ViT-L / wav2vec 2.0 Large / RoBERTa-large): 24 x 1024, 16 heads, FFN 4096.
LARGE_TRUNK = {"model.trunk.dim": 1024, "model.trunk.depth": 24, "model.trunk.heads": 16, "model.trunk.ffn_dim": 4096}

_TINY_TRAIN = {
    "train.max_steps": 300, "train.batch_size": 16, "train.checkpoint_every": 100, "train.log_every": 10,
    "train.collapse_after": 100, "data.shuffle_buffer": 256,
}

PRESETS: dict[tuple[str, str], Callable[[], Config]] = {
    ("vision", "tiny"): vision_tiny, ("vision", "base"): vision_base, ("vision", "large"): vision_large,
    ("audio", "tiny"): audio_tiny, ("audio", "base"): audio_base, ("audio", "large"): audio_large,
    ("text", "tiny"): text_tiny, ("text", "base"): text_base, ("text", "large"): text_large,
}


# The data2vec version `d2v pretrain` / `make pretrain` / `d2v workflow` use when none is given: per modality,
# the one whose tiny preset beats its random-init twin by more on the demo task within the same CPU budget
# (measured with `make pretrain` + `d2v evaluate`, README Quality). An explicit --version / VERSION= wins.
DEFAULT_VERSION: dict[str, str] = {"vision": "v2", "audio": "v1", "text": "v1"}


def default_version(modality: str) -> str:
    """DEFAULT_VERSION[modality]; errors name the modalities."""
    try:
        return DEFAULT_VERSION[modality]
    except KeyError:
        raise ConfigError(f"no default version for modality={modality!r}; modalities: {sorted(DEFAULT_VERSION)}") from None


def get_preset(modality: str, size: str = "base", version: str = "v1") -> Config:
    """The preset config for (modality, size, version); errors name the allowed values."""
    if version not in ("v1", "v2"):
        raise ConfigError(f"version={version!r} is not a data2vec version; allowed: 'v1', 'v2'")
    if version == "v2":
        from .presets_v2 import PRESETS_V2  # imported here: presets_v2 derives from this module

        table = PRESETS_V2
    else:
        table = PRESETS
    try:
        return table[(modality, size)]()
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
