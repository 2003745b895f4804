"""Typed configuration for d2v: one pydantic model per concern, validated on construction.

Every field is documented; invalid values or combinations are rejected with a message that names the
field. `Config` is the resolved whole that is saved with every run (`to_yaml` / `from_yaml`) and
overridden from the command line with `apply_overrides(cfg, ["optim.lr=1e-3", ...])`.
Presets live in `model.presets`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Modality = Literal["vision", "audio", "text"]


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error naming the key, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- model
class ImageFrontendConfig(_Strict):
    """Conv2d patch embedding + CLS token (BEiT / ViT)."""

    kind: Literal["image"] = "image"
    image_size: int = Field(224, gt=0, description="square input side in pixels")
    patch_size: int = Field(16, gt=0, description="square patch side; image_size must be a multiple")
    in_chans: int = Field(3, gt=0, description="input channels")
    pos_embed: Literal["none", "sincos"] = Field(
        "none", description="absolute positions added to the patch embeddings before masking: 'sincos' = fixed "
        "2-D sin-cos table (MAE layout, data2vec 2.0); 'none' (v1 uses the relative position bias instead)",
    )

    @model_validator(mode="after")
    def _check(self) -> "ImageFrontendConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.frontend.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        return self

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class AudioFrontendConfig(_Strict):
    """wav2vec 2.0 conv feature extractor ("layer_norm" mode) + LayerNorm + Linear, and the conv positional encoder."""

    kind: Literal["audio"] = "audio"
    conv_layers: list[tuple[int, int, int]] = Field(
        default_factory=lambda: [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2,
        description="(channels, kernel, stride) per conv layer; 16 kHz in -> ~50 Hz out with the default",
    )
    conv_bias: bool = Field(False, description="bias in the feature-extractor convs")
    pos_conv_depth: int = Field(5, ge=1, description="number of stacked positional conv layers")
    pos_conv_kernel: int = Field(19, ge=1, description="kernel of each positional conv layer")
    pos_conv_groups: int = Field(16, ge=1, description="groups of each positional conv layer")
    feature_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the extracted features")
    feature_grad_mult: float = Field(
        1.0, ge=0, description="scale of the gradient reaching the conv extractor (fairseq feature_grad_mult): "
        "forward unchanged, backward x this; 1 = full gradient (data2vec), .1 = wav2vec 2.0, 0 = extractor frozen",
    )
    alibi: bool = Field(
        False, description="ALiBi attention bias (-|i-j| x per-head slope) with a learned per-head scale, one bias "
        "for all blocks (data2vec 2.0 speech)",
    )

    @property
    def feature_dim(self) -> int:
        return self.conv_layers[-1][0]


class TextFrontendConfig(_Strict):
    """Token embeddings + learned absolute positions (RoBERTa offset) + embedding LayerNorm."""

    kind: Literal["text"] = "text"
    vocab_size: int = Field(50265, gt=4, description="vocabulary size (the tokenizer's, incl. specials)")
    max_positions: int = Field(514, gt=2, description="position table size incl. the pad offset (512 + 2)")
    pad_id: int = Field(1, ge=0, description="padding token id; positions start at pad_id + 1")
    bos_id: int = Field(0, ge=0, description="<s> token id")
    eos_id: int = Field(2, ge=0, description="</s> token id")
    unk_id: int = Field(3, ge=0, description="<unk> token id")
    mask_id: int = Field(4, ge=0, description="<mask> token id (masking replaces inputs with it)")


FrontendConfig = Annotated[
    Union[ImageFrontendConfig, AudioFrontendConfig, TextFrontendConfig], Field(discriminator="kind")
]


class TrunkConfig(_Strict):
    """The shared transformer trunk."""

    dim: int = Field(768, gt=0, description="model width D")
    depth: int = Field(12, gt=0, description="number of blocks")
    heads: int = Field(12, gt=0, description="attention heads; dim must be divisible by heads")
    ffn_dim: int = Field(3072, gt=0, description="hidden width of the feed-forward network")
    norm_style: Literal["pre", "post"] = Field(
        "post", description="pre-LN (BEiT/ViT) or post-LN (wav2vec 2.0 / RoBERTa) blocks"
    )
    ln_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon in the blocks")
    layer_scale_init: float | None = Field(
        None, gt=0, description="initial value of per-channel layer scale (BEiT), None = off"
    )
    qkv_bias: Literal["none", "qv", "qkv"] = Field(
        "qkv", description="attention input biases; 'qv' = BEiT (a key bias cancels in softmax)"
    )
    rel_pos_bias: bool = Field(False, description="one relative position bias table shared by all blocks")
    input_norm: bool = Field(
        False, description="LayerNorm on the block input before the first block (wav2vec 2.0 post-LN trunk)"
    )
    final_norm: bool = Field(False, description="LayerNorm after the last block (pre-LN trunks)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout after attention/FFN outputs")
    attn_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on attention probabilities")
    activation_dropout: float = Field(0.0, ge=0, lt=1, description="dropout after the FFN activation")
    drop_path: float = Field(0.0, ge=0, lt=1, description="max stochastic depth rate (linear over depth)")
    layerdrop: float = Field(0.0, ge=0, lt=1, description="probability of skipping a whole block in training")

    @model_validator(mode="after")
    def _check(self) -> "TrunkConfig":
        if self.dim % self.heads:
            raise ValueError(f"model.trunk.dim={self.dim} is not divisible by model.trunk.heads={self.heads}")
        if self.layerdrop > 0 and self.drop_path > 0:
            raise ValueError("model.trunk: use either layerdrop or drop_path, not both")
        return self


class HeadConfig(_Strict):
    """Regression head on the student's final output."""

    kind: Literal["linear", "mlp"] = Field("linear", description="Linear(D,D) or Linear(D,hD)-GELU-Linear(hD,D)")
    hidden_mult: int = Field(2, gt=0, description="hidden width multiple for kind='mlp'")


class ModelConfig(_Strict):
    modality: Modality = Field(description="which front end and data pipeline")
    frontend: FrontendConfig
    trunk: TrunkConfig = Field(default_factory=TrunkConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    init_std: float = Field(0.02, gt=0, description="std of the normal init of linear layers and embeddings")
    init_trunc: float | None = Field(
        None, gt=0, description="truncate the normal init at +-init_trunc x init_std (BEiT: 1.0); "
        "None = untruncated (fairseq init_bert_params)",
    )
    init_outer: Literal["normal", "torch"] = Field(
        "normal", description="init of the Linear layers outside the trunk (regression head, audio feature "
        "projection): 'normal' like the trunk (BEiT), 'torch' = PyTorch's default (fairseq speech/text)",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        want = {"vision": "image", "audio": "audio", "text": "text"}[self.modality]
        if self.frontend.kind != want:
            raise ValueError(
                f"model.frontend.kind={self.frontend.kind!r} does not fit model.modality={self.modality!r}; "
                f"expected {want!r}"
            )
        if self.trunk.rel_pos_bias and self.modality != "vision":
            raise ValueError("model.trunk.rel_pos_bias is only defined for vision (a 2-D patch grid)")
        return self


# ------------------------------------------------------------------------------------------- masking
class BlockMaskConfig(_Strict):
    """BEiT block masking on the patch grid."""

    kind: Literal["block"] = "block"
    num_masked: int = Field(120, gt=0, description="patches masked per image (120 of 196 = ~60%)")
    min_block: int = Field(16, gt=0, description="minimum patches per block")
    max_block: int | None = Field(None, description="maximum patches per block (None = num_masked)")
    min_aspect: float = Field(0.3, gt=0, description="min block aspect ratio; max is 1/min_aspect")


class SpanMaskConfig(_Strict):
    """Span masking (wav2vec 2.0 / fairseq compute_mask_indices): random starts, fixed length, overlaps allowed."""

    kind: Literal["span"] = "span"
    mask_prob: float = Field(0.65, gt=0, lt=1, description="fraction of steps chosen as span starts x length")
    span_length: int = Field(10, gt=0, description="length of each span in steps (tokens for text)")
    min_spans: int = Field(1, ge=0, description="at least this many spans per sample")
    require_same_masks: bool = Field(
        False, description="audio: trim every row of a batch to the batch-minimum mask count by unmasking "
        "random positions (fairseq compute_mask_indices require_same_masks)",
    )


class BertMaskConfig(_Strict):
    """BERT masking for text: choose prob of tokens; of those 80% <mask>, 10% random, 10% unchanged."""

    kind: Literal["bert"] = "bert"
    mask_prob: float = Field(0.15, gt=0, lt=1, description="fraction of tokens chosen (<s>, </s> included)")
    replace_mask: float = Field(0.8, ge=0, le=1, description="of the chosen, fraction replaced by <mask>")
    replace_random: float = Field(0.1, ge=0, le=1, description="of the chosen, fraction replaced by a random token")

    @model_validator(mode="after")
    def _check(self) -> "BertMaskConfig":
        if self.replace_mask + self.replace_random > 1:
            raise ValueError("masking.replace_mask + masking.replace_random must be <= 1")
        return self


class InverseBlockMaskConfig(_Strict):
    """data2vec 2.0 vision (fairseq compute_block_mask_2d, inverse): place square blocks of *kept* patches.

    Block centres: int(N x (1 - mask_prob + mask_prob_adjust) / block^2), uniform with replacement; each marks
    the block x block square around it (clipped at the border); then random cells are added or removed so that
    exactly int(N x (1 - mask_prob)) are kept. Every row masks the same number of patches.
    """

    kind: Literal["inverse_block"] = "inverse_block"
    mask_prob: float = Field(0.8, gt=0, lt=1, description="fraction of patches masked (the rest is kept)")
    mask_prob_adjust: float = Field(0.07, ge=0, lt=1, description="added to the kept fraction when placing blocks")
    block: int = Field(3, gt=1, description="side of the square blocks, in patches")


class FrameBlockMaskConfig(_Strict):
    """data2vec 2.0 speech (fairseq compute_block_mask_1d): spans of `block` frames around random centres.

    Centres: int(T x (mask_prob + mask_prob_adjust) / block), uniform with replacement; then random frames are
    added or removed so that exactly int(T x mask_prob) are masked in every row.
    """

    kind: Literal["frame_block"] = "frame_block"
    mask_prob: float = Field(0.5, gt=0, lt=1, description="fraction of frames masked")
    mask_prob_adjust: float = Field(0.05, ge=0, lt=1, description="added to mask_prob when placing spans")
    block: int = Field(5, gt=1, description="frames per span")


class RandomMaskConfig(_Strict):
    """data2vec 2.0 text (MAE random_masking): keep int(T x (1 - mask_prob)) uniformly chosen tokens, no <mask>."""

    kind: Literal["random"] = "random"
    mask_prob: float = Field(0.48, gt=0, lt=1, description="fraction of tokens masked (dropped from the student)")


MaskingConfig = Annotated[
    Union[
        BlockMaskConfig, SpanMaskConfig, BertMaskConfig, InverseBlockMaskConfig, FrameBlockMaskConfig,
        RandomMaskConfig,
    ],
    Field(discriminator="kind"),
]


# ------------------------------------------------------------------------------------------------ v2
class DecoderConfig(_Strict):
    """data2vec 2.0 conv decoder: `layers` x (grouped conv -> LayerNorm(no affine) -> GELU), a residual around
    each layer whose input and output widths match (when `residual`), then a projection back to D."""

    dims: Literal[1, 2] = Field(1, description="1: Conv1d over the sequence (speech, text); 2: Conv2d over the patch grid (vision)")
    layers: int = Field(4, gt=0, description="number of conv layers")
    kernel: int = Field(7, gt=0, description="conv kernel (odd, so the length is kept)")
    width: int = Field(384, gt=0, description="conv channels")
    groups: int = Field(16, gt=0, description="conv groups; must divide width and model.trunk.dim")
    residual: bool = Field(True, description="residual connection around layers whose in/out widths match")
    input_dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the encoder outputs fed to the decoder")
    proj_layers: int = Field(1, ge=1, description="1: Linear(width, D); 2: Linear(width, ratio x width) -> GELU -> Linear(., D)")
    proj_ratio: float = Field(2.0, gt=0, description="hidden width multiple of the first projection (proj_layers > 1)")

    @model_validator(mode="after")
    def _check(self) -> "DecoderConfig":
        if self.kernel % 2 == 0:
            raise ValueError(f"v2.decoder.kernel={self.kernel} must be odd (a 'same' conv keeps the length)")
        if self.width % self.groups:
            raise ValueError(f"v2.decoder.width={self.width} is not divisible by v2.decoder.groups={self.groups}")
        return self


class V2Config(_Strict):
    """data2vec 2.0: multi-mask student on visible tokens + conv decoder (model.head is not used)."""

    clone_batch: int = Field(8, ge=1, description="M: masked copies of each sample; the teacher runs once per sample")
    mask_noise_std: float = Field(0.01, ge=0, description="std of the N(0, std^2) noise filling masked decoder inputs")
    cls_loss: float = Field(
        0.0, ge=0, description="weight of the CLS loss (CLS output regresses the mean patch target); needs a CLS token"
    )
    teacher_local_encoder: bool = Field(
        False, description="True: the teacher runs its own (EMA) front end on the raw input (vision); False: it "
        "contextualises the student's local features (speech, text)",
    )
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)


# ------------------------------------------------------------------------------------------- teacher
class TeacherConfig(_Strict):
    """EMA teacher: tau rises linearly from tau0 to tau_end over tau_steps updates, then stays."""

    tau0: float = Field(0.999, ge=0, le=1, description="EMA decay at step 0")
    tau_end: float = Field(0.9999, ge=0, le=1, description="EMA decay from tau_steps on")
    tau_steps: int = Field(30000, ge=0, description="updates over which tau anneals (0 = constant tau_end)")
    scope: Literal["all", "layers"] = Field(
        "layers",
        description="'all': every encoder parameter averaged (vision); 'layers': only the transformer "
        "blocks and trunk norms averaged, front end and positional encoder copied from the student",
    )
    precision: Literal["student", "fp32"] = Field(
        "student",
        description="'student': the teacher's forward runs under the student's autocast (fairseq runs the whole "
        "fp16 model, teacher included); 'fp32': outside autocast in fp32 (data2vec_vision / BEiT)",
    )


# ------------------------------------------------------------------------------------- targets/loss
class TargetConfig(_Strict):
    top_k: int = Field(8, gt=0, description="average the outputs of the top K teacher blocks")
    layer_output: Literal["ffn", "block"] = Field(
        "ffn", description="'ffn': FFN output before the last residual; 'block': end of block"
    )
    layer_norm: Literal["instance", "layer", "none"] = Field(
        "instance", description="normalisation of each layer's output before averaging"
    )
    final_norm: Literal["instance", "layer", "none"] = Field("none", description="normalisation of the average")


class LossConfig(_Strict):
    kind: Literal["l2", "smooth_l1"] = Field("l2", description="regression loss")
    beta: float = Field(0.0, ge=0, description="smooth L1 transition point (kind='smooth_l1')")
    dim_reduce: Literal["sum", "mean"] = Field("sum", description="reduction over feature dims")
    scale: Literal["inv_sqrt_dim", "one"] = Field(
        "inv_sqrt_dim", description="multiply per-step loss by 1/sqrt(D) or 1"
    )
    normalize: Literal["global_count", "rank_mean"] = Field(
        "global_count",
        description="'global_count': sum over all ranks and micro-batches / their total masked steps (fairseq "
        "sample_size); 'rank_mean': mean per rank and micro-batch, averaged by DDP (data2vec_vision)",
    )

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.kind == "smooth_l1" and self.beta <= 0:
            raise ValueError("loss.beta must be > 0 for loss.kind='smooth_l1' (use kind='l2' for beta=0)")
        return self


# -------------------------------------------------------------------------------------- optimisation
class OptimConfig(_Strict):
    name: Literal["adam", "adamw"] = Field("adamw", description="decoupled weight decay in both cases")
    lr: float = Field(5e-4, gt=0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.98), description="Adam betas")
    eps: float = Field(1e-6, gt=0, description="Adam epsilon")
    weight_decay: float = Field(
        0.01, ge=0, description="decoupled weight decay, on the parameters the rules below leave"
    )
    no_decay_1d: bool = Field(
        False, description="no decay on 1-D tensors and `.bias` (BEiT get_parameter_groups); False = fairseq, "
        "which decays every parameter"
    )
    no_decay: list[str] = Field(
        default_factory=list, description="parameter names never decayed, matched as the name or a dotted suffix "
        "of it (BEiT no_weight_decay: cls_token, pos_embed)"
    )
    decay: list[str] = Field(
        default_factory=list, description="parameters decayed although 1-D here, because the reference's tensor is "
        "not 1-D (our (D,) mask_emb is BEiT's (1, 1, D) mask_token); same matching as no_decay"
    )
    schedule: Literal["cosine", "tri_stage", "constant"] = Field("cosine", description="LR schedule")
    warmup_steps: int = Field(0, ge=0, description="linear warmup (cosine)")
    final_lr: float = Field(0.0, ge=0, description="LR at the end of the cosine schedule")
    tri_stage: tuple[float, float, float] = Field(
        (0.03, 0.9, 0.07), description="tri_stage: warmup / hold / decay fractions of max_steps"
    )
    tri_stage_final_scale: float = Field(0.05, gt=0, description="tri_stage: final LR = lr x this")
    clip_norm: float | None = Field(None, gt=0, description="gradient clipping max norm, None = off")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.schedule == "tri_stage" and abs(sum(self.tri_stage) - 1.0) > 1e-6:
            raise ValueError(f"optim.tri_stage fractions must sum to 1, got {self.tri_stage}")
        return self


# ---------------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    # vision
    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="RandomResizedCrop area range")
    hflip: bool = Field(True, description="random horizontal flip")
    color_jitter: float = Field(0.4, ge=0, description="brightness/contrast/saturation jitter strength")
    # audio
    max_samples: int = Field(250_000, gt=0, description="audio: random crop to at most this many samples")
    min_samples: int = Field(32_000, gt=0, description="audio: shorter clips are dropped by the loader")
    normalize: bool = Field(True, description="audio: zero-mean unit-variance per utterance")
    # text
    block_size: int = Field(512, gt=2, description="text: tokens per training block")
    # loading
    shuffle_buffer: int = Field(1000, ge=0, description="sample shuffle buffer per loader worker")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per Train worker")


class TrainConfig(_Strict):
    max_steps: int = Field(400_000, gt=0, description="optimizer updates")
    batch_size: int = Field(8, gt=0, description="samples per worker per micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches per update")
    checkpoint_every: int = Field(1000, gt=0, description="checkpoint period in updates")
    log_every: int = Field(10, gt=0, description="metric/progress period in updates")
    seed: int = Field(0, description="global seed")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    max_failures: int = Field(3, ge=0, description="worker-group restarts before the run fails")
    max_tokens: int | None = Field(
        None, gt=0, description="token budget per micro-batch (fairseq max_tokens): audio samples / text "
        "tokens, batch cost = clips x longest clip (capped at the crop); None = batch_size clips",
    )
    collapse_min_target_var: float = Field(
        0.1, ge=0, description="stop if the mean per-dim target std falls below (0 = guard off)"
    )
    collapse_min_pred_var: float = Field(
        0.01, ge=0, description="stop if the mean per-dim prediction std falls below (0 = guard off)"
    )
    collapse_after: int = Field(5000, ge=0, description="collapse guard active from this update on")


class Config(_Strict):
    """The resolved configuration of one run."""

    version: Literal["v1", "v2"] = Field("v1", description="data2vec version")
    preset: str = Field("custom", description="name of the preset this config came from")
    model: ModelConfig
    masking: MaskingConfig
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    v2: V2Config | None = Field(None, description="data2vec 2.0 settings; required with version='v2', else None")

    @model_validator(mode="after")
    def _check(self) -> "Config":
        m = self.model.modality
        allowed = _MASKS[self.version][m]
        if self.masking.kind not in allowed:
            raise ValueError(
                f"masking.kind={self.masking.kind!r} is not valid for {m} with version={self.version!r}; allowed: {allowed}"
            )
        if self.version == "v2":
            _check_v2(self)
        elif self.v2 is not None:
            raise ValueError("v2: this section is only used with version='v2'; remove it or set version: v2")
        if isinstance(self.masking, BlockMaskConfig):
            n = self.model.frontend.grid ** 2  # type: ignore[union-attr]
            if self.masking.num_masked >= n:
                raise ValueError(f"masking.num_masked={self.masking.num_masked} must be < {n} patches")
        if self.train.max_tokens is not None:
            # one full-length sample must fit the budget (fairseq would drop or refuse longer ones)
            longest = {"vision": None, "audio": self.data.max_samples, "text": self.data.block_size}[m]
            if longest is None:
                raise ValueError("train.max_tokens is for audio and text; vision batches count images "
                                 "(train.batch_size); set train.max_tokens=null")
            if self.train.max_tokens < longest:
                raise ValueError(f"train.max_tokens={self.train.max_tokens} is below one full-length sample "
                                 f"({longest}: data.max_samples for audio, data.block_size for text)")
        if self.targets.top_k > self.model.trunk.depth:
            raise ValueError(
                f"targets.top_k={self.targets.top_k} exceeds model.trunk.depth={self.model.trunk.depth}"
            )
        return self

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Config":
        return cls.model_validate(yaml.safe_load(text))


_MASKS = {
    "v1": {"vision": ("block",), "audio": ("span",), "text": ("bert", "span")},
    "v2": {"vision": ("inverse_block",), "audio": ("frame_block",), "text": ("random",)},
}


def _check_v2(cfg: Config) -> None:
    """Combinations data2vec 2.0 cannot run; each message names the field."""
    if cfg.v2 is None:
        raise ValueError("version='v2' needs a v2 section (clone_batch, decoder, ...); start from get_preset(..., version='v2')")
    mod, dec = cfg.model, cfg.v2.decoder
    if mod.trunk.rel_pos_bias:
        raise ValueError("model.trunk.rel_pos_bias is not supported with version='v2' (masked patches are dropped); "
                         "use model.frontend.pos_embed='sincos'")
    if mod.trunk.dim % dec.groups:
        raise ValueError(f"v2.decoder.groups={dec.groups} does not divide model.trunk.dim={mod.trunk.dim}")
    is_image = isinstance(mod.frontend, ImageFrontendConfig)
    if dec.dims == 2 and not is_image:
        raise ValueError("v2.decoder.dims=2 needs a 2-D patch grid (model.modality='vision')")
    if cfg.v2.cls_loss > 0 and not is_image:
        raise ValueError(f"v2.cls_loss={cfg.v2.cls_loss} needs a CLS token (vision); set it to 0")
    if isinstance(cfg.masking, InverseBlockMaskConfig):
        n = mod.frontend.grid ** 2  # type: ignore[union-attr]
        if int(n * (1 - cfg.masking.mask_prob)) < 1:
            raise ValueError(f"masking.mask_prob={cfg.masking.mask_prob} keeps no patch of {n}; lower it")


class ConfigError(ValueError):
    """A configuration problem, with the field at fault named in the message."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"].removeprefix("Value error, ")
        extra = ""
        if e.get("ctx") and "expected" in e["ctx"]:
            extra = f" (allowed: {e['ctx']['expected']})"
        lines.append(f"{loc or '<config>'}: {msg}{extra}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a new Config with `a.b.c=value` overrides applied (values parsed as YAML)."""
    data = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(_unknown_key(parts[: i + 1], node))
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            # a discriminated union member may legitimately gain a field after 'kind' changes
            if not (isinstance(node, dict) and "kind" in node):
                raise ConfigError(_unknown_key(parts, node))
        node[parts[-1]] = yaml.safe_load(raw)
        if parts[-1] == "kind" and isinstance(node, dict):
            # switching a union member: keep only the new kind so defaults apply
            for k in list(node):
                if k != "kind":
                    del node[k]
    return validate(data)


def _unknown_key(parts: list[str], node: Any) -> str:
    allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
    return f"unknown config key {'.'.join(parts)!r}; allowed here: {allowed}"
