"""data2vec 2.0 presets: typed functions, base -> large / tiny, values from the reference code.

Source: fairseq examples/data2vec/config/v2/{base,large}_{images,audio,text}_only_task.yaml and the
defaults of models/data2vec2.py (Data2VecMultiConfig) and models/modalities/*.py where a yaml is silent
(see ../shared/SPEC.md section 3). Mapping of the reference onto our one trunk:

- The reference splits the blocks into a modality "prenet" (prenet_depth) and the shared `depth` blocks
  and averages the top K of the shared ones; here they are one stack of prenet_depth + depth post-LN
  blocks, and K counts from the top, so the same blocks are averaged. Its prenet LayerNorm on the
  embeddings (post-LN models) is `trunk.input_norm` (vision, speech; text has the embedding LN instead).
- `model.head` is unused in v2: the decoder's projection is the regression head.
- Per-GPU batch sizes are the yaml's `dataset.batch_size` (vision, text) or max_tokens (speech); the
  reference trains on `distributed_world_size` GPUs, noted per preset.
- Weight decay: the reference exempts 1-D tensors, biases and the ALiBi scale (optim.no_decay_1d).
- Init: fairseq init_bert_params (untruncated normal .02, init_trunc None).

Deliberate differences (kept because our trunk is shared with v1; none changes what is trained):
- the CLS token is initialised normal(0, .02) by the shared vision front end; the reference draws it
  from normal(0, 1) (init_extra_token_zero: false).
- the vision patch embedding keeps the shared front end's init (reference: xavier_uniform).
- text: padded steps are left out of the loss (the reference includes them; our loader rarely pads).
"""

from __future__ import annotations

from .config import (
    AudioFrontendConfig,
    Config,
    DataConfig,
    DecoderConfig,
    FrameBlockMaskConfig,
    ImageFrontendConfig,
    InverseBlockMaskConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RandomMaskConfig,
    TargetConfig,
    TeacherConfig,
    TextFrontendConfig,
    TrainConfig,
    TrunkConfig,
    V2Config,
)
from .presets import _TINY_TRAIN, LARGE_TRUNK, _update

_L2 = LossConfig(kind="l2", dim_reduce="sum", scale="inv_sqrt_dim")  # loss_beta 0, loss_scale null -> 1/sqrt(D)


# ------------------------------------------------------------------------------------------- vision
def vision_base() -> Config:
    """data2vec 2.0 ViT-B/16, base_images_only_task.yaml.

    2 prenet + 10 blocks = 12 x 768 post-LN, LN on embeddings, fixed 2-D sin-cos positions, CLS; no
    dropout. Inverse block masking 3x3, mask_prob .8 + adjust .07 (157 of 196 masked), M=16. K=10 (the
    10 shared blocks), instance norm per layer, final LayerNorm; CLS loss .01. EMA .9998 -> .99999 over
    100k, the whole encoder averaged, the teacher runs its own patch embedding (ema_local_encoder).
    Decoder: Conv2d 6 x (k3, 768, 16 groups), residual. Adam (.9, .95) wd .05, lr 1e-3, cosine with
    50,040 warmup updates, clip 4, 375,300 updates; 16 images x 16 GPUs per update. Collapse guard off
    (min_target_var / min_pred_var 0). Crops: RandomResizedCrop scale (.2, 1), flip, no colour jitter.
    Paper vs code: the paper's table lists the same values.
    """
    return Config(
        version="v2",
        preset="vision-base-v2",
        model=ModelConfig(
            modality="vision",
            frontend=ImageFrontendConfig(image_size=224, patch_size=16, pos_embed="sincos"),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-6, qkv_bias="qkv",
                input_norm=True, dropout=0.0, attn_dropout=0.0, activation_dropout=0.0,
            ),
            init_trunc=None,
        ),
        masking=InverseBlockMaskConfig(mask_prob=0.8, mask_prob_adjust=0.07, block=3),
        teacher=TeacherConfig(tau0=0.9998, tau_end=0.99999, tau_steps=100_000, scope="all"),
        targets=TargetConfig(top_k=10, layer_output="ffn", layer_norm="instance", final_norm="layer"),
        loss=_L2,
        optim=OptimConfig(
            name="adam", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, schedule="cosine",
            warmup_steps=50_040, final_lr=0.0, clip_norm=4.0, no_decay_1d=True,
        ),
        data=DataConfig(crop_scale=(0.2, 1.0), hflip=True, color_jitter=0.0),
        train=TrainConfig(
            max_steps=375_300, batch_size=16, checkpoint_every=25_000,
            collapse_min_target_var=0.0, collapse_min_pred_var=0.0,
        ),
        v2=V2Config(
            clone_batch=16, mask_noise_std=0.01, cls_loss=0.01, teacher_local_encoder=True,
            decoder=DecoderConfig(dims=2, layers=6, kernel=3, width=768, groups=16, residual=True, input_dropout=0.0),
        ),
    )


def vision_large() -> Config:
    """data2vec 2.0 ViT-L/16, large_images_only_task.yaml: 24 x 1024, 16 heads (prenet 0), K=18.

    mask_prob .75 + adjust .1; decoder 3 x (k5, 1024, 16 groups); EMA .9998 -> .99999 over 150k;
    lr 4e-4; 8 images x 16 GPUs per update.
    """
    return _update(
        vision_base(),
        preset="vision-large-v2",
        **{
            **LARGE_TRUNK,
            "targets.top_k": 18, "masking.mask_prob": 0.75, "masking.mask_prob_adjust": 0.1,
            "v2.decoder.layers": 3, "v2.decoder.kernel": 5, "v2.decoder.width": 1024,
            "teacher.tau_steps": 150_000, "optim.lr": 4e-4, "train.batch_size": 8,
        },
    )


def vision_tiny() -> Config:
    """A CPU debug twin of vision_base: 32x32 images, 4x4 patches (8x8 grid: one 3x3 kept block + 3
    patches, 52 of 64 masked), 4 x 64 trunk, M=8, K=3, decoder 3 x (k3, 64, 8 groups); EMA/optimiser
    scaled to a thousand updates.

    Measured on the demo digits (plain process, 1000 updates, 84 s): linear probe 0.774 vs 0.557 for the
    random-init twin (v1 tiny, 1000 updates: 0.262 vs 0.245). With the real commands (`make pretrain
    MODALITY=vision`, 2 Ray workers x 16, 226 s; then `d2v evaluate`): probe 0.744 vs 0.557 random-init vs
    0.872 raw 8x8 pixels; fine-tune 0.986 vs 0.964 from random init. The default version for vision
    (presets.DEFAULT_VERSION).
    """
    return _update(
        vision_base(),
        preset="vision-tiny-v2",
        **{
            "model.frontend.image_size": 32, "model.frontend.patch_size": 4,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "targets.top_k": 3, "v2.clone_batch": 8,
            "v2.decoder.layers": 3, "v2.decoder.width": 64, "v2.decoder.groups": 8,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.warmup_steps": 30, "optim.clip_norm": 4.0, "data.crop_scale": (0.5, 1.0),
            **_TINY_TRAIN,
            "train.max_steps": 1000, "train.checkpoint_every": 250,
        },
    )


# -------------------------------------------------------------------------------------------- audio
def audio_base() -> Config:
    """data2vec 2.0 speech Base, base_audio_only_task.yaml.

    wav2vec 2.0 conv extractor, 5 x conv k19 (conv_pos_width 95 / depth 5) g16 positions + ALiBi with a
    learned per-head scale; 12 x 768 post-LN (prenet 0), LN + dropout .1 on the input, dropout/attention
    dropout .1 (Data2VecMultiConfig defaults), layerdrop .05. Frame-block masking: 5 frames, mask_prob .5
    + adjust .05, M=8. K=8, instance norm per layer, no final norm. EMA .999 -> .99999 over 75k, the whole
    encoder averaged but the teacher contextualises the student's conv features (ema_local_encoder false).
    Decoder: Conv1d 4 x (k7, 384, 16 groups), input dropout .1. Adam (.9, .98) eps 1e-6 wd .01, lr 7.5e-4,
    cosine with 8k warmup, no clipping, 400k updates; crops 2-20 s; max_tokens 1e6 samples x 8 GPUs.
    """
    return Config(
        version="v2",
        preset="audio-base-v2",
        model=ModelConfig(
            modality="audio",
            frontend=AudioFrontendConfig(pos_conv_depth=5, pos_conv_kernel=19, pos_conv_groups=16, alibi=True),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-5, qkv_bias="qkv",
                input_norm=True, dropout=0.1, attn_dropout=0.1, activation_dropout=0.0, layerdrop=0.05,
            ),
            init_trunc=None, init_outer="torch",
        ),
        masking=FrameBlockMaskConfig(mask_prob=0.5, mask_prob_adjust=0.05, block=5),
        teacher=TeacherConfig(tau0=0.999, tau_end=0.99999, tau_steps=75_000, scope="all"),
        targets=TargetConfig(top_k=8, layer_output="ffn", layer_norm="instance", final_norm="none"),
        loss=_L2,
        optim=OptimConfig(
            name="adam", lr=7.5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, schedule="cosine",
            warmup_steps=8_000, final_lr=0.0, clip_norm=None, no_decay_1d=True,
        ),
        data=DataConfig(max_samples=320_000, min_samples=32_000, normalize=True),
        train=TrainConfig(max_steps=400_000, batch_size=8, max_tokens=1_000_000, checkpoint_every=25_000),
        v2=V2Config(
            clone_batch=8, mask_noise_std=0.01, cls_loss=0.0, teacher_local_encoder=False,
            decoder=DecoderConfig(dims=1, layers=4, kernel=7, width=384, groups=16, residual=True, input_dropout=0.1),
        ),
    )


def audio_large() -> Config:
    """data2vec 2.0 speech Large, large_audio_only_task.yaml: 8 prenet + 16 = 24 x 1024, 16 heads, K=16,
    layerdrop 0, mask_prob .55 + adjust .1, M=12, EMA .9997 -> 1.0 over 300k, decoder width 768,
    lr 4e-4, cosine 10k warmup, clip 1, 600k updates, max_tokens 320k samples x 48 GPUs."""
    return _update(
        audio_base(),
        preset="audio-large-v2",
        **{
            **LARGE_TRUNK,
            "model.trunk.layerdrop": 0.0, "targets.top_k": 16, "v2.clone_batch": 12,
            "masking.mask_prob": 0.55, "masking.mask_prob_adjust": 0.1, "v2.decoder.width": 768,
            "teacher.tau0": 0.9997, "teacher.tau_end": 1.0, "teacher.tau_steps": 300_000,
            "optim.lr": 4e-4, "optim.warmup_steps": 10_000, "optim.clip_norm": 1.0,
            "train.max_steps": 600_000, "train.max_tokens": 320_000, "train.batch_size": 1,
        },
    )


def audio_tiny() -> Config:
    """A CPU debug twin of audio_base: 64-channel conv extractor (same 320x stride), 4 x 64 trunk, M=4,
    K=3, decoder 4 x (k7, 64, 16 groups), 2 s crops, no layerdrop.

    Measured on the demo speech corpus (plain process, 300 updates, linear probe vs the random-init twin):
    this decoder 0.375 vs 0.335; a 2 x (k7, 32, 8 groups) one 0.335 vs 0.335. v1 tiny: 0.470 vs 0.335.
    With the real commands (`make pretrain MODALITY=audio VERSION=v2`, 2 Ray workers x 16, ~265 s; `d2v
    evaluate`): 0.325 vs 0.335 (v1 tiny: 0.495 vs 0.335), so audio defaults to v1 (presets.DEFAULT_VERSION).
    """
    return _update(
        audio_base(),
        preset="audio-tiny-v2",
        **{
            "model.frontend.conv_layers": [(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] * 2,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "model.trunk.layerdrop": 0.0, "targets.top_k": 3, "v2.clone_batch": 4,
            "v2.decoder.layers": 4, "v2.decoder.width": 64, "v2.decoder.groups": 16,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.lr": 1e-3, "optim.warmup_steps": 30,
            "data.max_samples": 32_000, "data.min_samples": 4_000, "train.max_tokens": None,
            **_TINY_TRAIN,
        },
    )


# --------------------------------------------------------------------------------------------- text
def text_base() -> Config:
    """data2vec 2.0 text Base, base_text_only_task.yaml.

    RoBERTa embeddings (learned positions, embedding LN, dropout .1), 12 x 768 post-LN. Random masking
    mask_prob .48 (mask_length 1), no <mask> token, M=8. K=12, instance norm per layer, no final norm.
    EMA .9999 -> .99999 over 100k, blocks only (ema_encoder_only). Decoder: Conv1d 5 x (k9, 768, 1
    group), no residual, head 768 -> 1536 -> 768. Loss scale 1 (loss_scale: 1; SPEC's "x 1/sqrt(D)"
    holds for speech and vision only). Adam (.9, .98) eps 1e-6 wd .01, lr 2e-4, cosine with 4k
    warmup, clip 1, 1M updates; 4 blocks of 512 tokens x 16 GPUs per update.
    """
    return Config(
        version="v2",
        preset="text-base-v2",
        model=ModelConfig(
            modality="text",
            frontend=TextFrontendConfig(vocab_size=50265, max_positions=514),
            trunk=TrunkConfig(
                dim=768, depth=12, heads=12, ffn_dim=3072, norm_style="post", ln_eps=1e-5, qkv_bias="qkv",
                dropout=0.1, attn_dropout=0.1, activation_dropout=0.0,
            ),
            init_trunc=None,
        ),
        masking=RandomMaskConfig(mask_prob=0.48),
        teacher=TeacherConfig(tau0=0.9999, tau_end=0.99999, tau_steps=100_000, scope="layers"),
        targets=TargetConfig(top_k=12, layer_output="ffn", layer_norm="instance", final_norm="none"),
        loss=LossConfig(kind="l2", dim_reduce="sum", scale="one"),
        optim=OptimConfig(
            name="adam", lr=2e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, schedule="cosine",
            warmup_steps=4_000, final_lr=0.0, clip_norm=1.0, no_decay_1d=True,
        ),
        data=DataConfig(block_size=512),
        train=TrainConfig(max_steps=1_000_000, batch_size=4, checkpoint_every=50_000),
        v2=V2Config(
            clone_batch=8, mask_noise_std=0.01, cls_loss=0.0, teacher_local_encoder=False,
            decoder=DecoderConfig(
                dims=1, layers=5, kernel=9, width=768, groups=1, residual=False, input_dropout=0.1,
                proj_layers=2, proj_ratio=2.0,
            ),
        ),
    )


def text_large() -> Config:
    """data2vec 2.0 text Large, large_text_only_task.yaml: 24 x 1024, 16 heads, K=24, LayerNorm per
    layer + instance norm of the average (differs from Base), mask_prob .5, lr 1e-4, 600k updates,
    2 blocks x 32 GPUs per update. Decoder as Base (768 wide, head 768 -> 1536 -> 1024)."""
    return _update(
        text_base(),
        preset="text-large-v2",
        **{
            **LARGE_TRUNK,
            "targets.top_k": 24, "targets.layer_norm": "layer", "targets.final_norm": "instance",
            "masking.mask_prob": 0.5, "optim.lr": 1e-4, "train.max_steps": 600_000, "train.batch_size": 2,
        },
    )


def text_tiny() -> Config:
    """A CPU debug twin of text_base: 4 x 64 trunk, 128-token blocks, 4k vocabulary (set from the
    tokenizer), M=4, K=4, decoder 2 x (k9, 64, 1 group) + head 64 -> 128 -> 64."""
    return _update(
        text_base(),
        preset="text-tiny-v2",
        **{
            "model.frontend.vocab_size": 4096, "model.frontend.max_positions": 130,
            "model.trunk.dim": 64, "model.trunk.depth": 4, "model.trunk.heads": 4, "model.trunk.ffn_dim": 256,
            "targets.top_k": 4, "v2.clone_batch": 4, "v2.decoder.layers": 2, "v2.decoder.width": 64,
            "teacher.tau0": 0.99, "teacher.tau_end": 0.999, "teacher.tau_steps": 300,
            "optim.lr": 1e-3, "optim.warmup_steps": 30, "data.block_size": 128,
            **_TINY_TRAIN,
            "train.max_steps": 1000, "train.batch_size": 8, "train.checkpoint_every": 250,
        },
    )


PRESETS_V2 = {
    ("vision", "tiny"): vision_tiny, ("vision", "base"): vision_base, ("vision", "large"): vision_large,
    ("audio", "tiny"): audio_tiny, ("audio", "base"): audio_base, ("audio", "large"): audio_large,
    ("text", "tiny"): text_tiny, ("text", "base"): text_base, ("text", "large"): text_large,
}
