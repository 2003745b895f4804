"""data2vec 2.0: the multi-mask step, the masks, the conv decoder and the presets.

Independent references: SPEC section 3 and the fairseq v2 yaml files (preset values, mask counts),
Hugging Face's ViT-MAE sin-cos table and BLOOM's ALiBi slopes, and equivalences that must hold whatever
the implementation (dropping a token == hiding it from attention; M copies share one teacher pass).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import ConfigError, apply_overrides
from model.data2vec import Batch
from model.data2vec2 import Data2Vec2, clone_masks, data2vec2_loss, teacher_targets_v2, visible
from model.decoder import ConvDecoder, decoder_input
from model.frontends import audio_frames, sincos_2d
from model.layers import alibi_slopes
from model.masking_v2 import frame_block_mask, inverse_block_mask, make_masks, random_mask
from model.presets import get_preset
from model.teacher import EMATeacher

from .conftest import require

B = 2  # samples per test batch


def _inputs(cfg, batch: int, g: torch.Generator) -> torch.Tensor:
    f = cfg.model.frontend
    if cfg.model.modality == "vision":
        return torch.randn(batch, 3, f.image_size, f.image_size, generator=g)
    if cfg.model.modality == "audio":
        return torch.randn(batch, 8000, generator=g)
    return torch.randint(5, f.vocab_size, (batch, 64), generator=g)


def _v2_batch(cfg, seed: int) -> Batch:
    """A v2 micro-batch as the loader would give it: inputs and (B, M, T) masks from seeded generators."""
    g = torch.Generator().manual_seed(seed)
    x = _inputs(cfg, B, g)
    if cfg.model.modality == "vision":
        steps = cfg.model.frontend.grid ** 2
    elif cfg.model.modality == "audio":
        steps = int(audio_frames(x.shape[1], cfg.model.frontend.conv_layers))
    else:
        steps = x.shape[1]
    mask = torch.stack([make_masks(cfg.masking, cfg.v2.clone_batch, steps, generator=g) for _ in range(B)])
    return Batch(inputs=x, mask=mask)


def _setup(modality: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = get_preset(modality, "tiny", "v2")
    student = Data2Vec2(cfg.model, cfg.v2)
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    return cfg, student, teacher, _v2_batch(cfg, seed)  # mask (B, M, T)


# ------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_v2_step_visible_only_one_teacher_pass_shared_targets(modality):
    cfg, student, teacher, batch = _setup(modality)
    M, P = cfg.v2.clone_batch, student.encoder.prefix_len
    T = batch.mask.shape[-1]
    K = int((~batch.mask[0, 0]).sum())
    seen: dict[str, list] = {"student": [], "teacher": [], "decoder": []}
    student.encoder.blocks[0].register_forward_hook(lambda m, a, o: seen["student"].append(tuple(a[0].shape)))
    teacher.model.blocks[0].register_forward_hook(lambda m, a, o: seen["teacher"].append(tuple(a[0].shape)))
    student.decoder.register_forward_hook(lambda m, a, o: seen["decoder"].append(tuple(o.shape)))

    loss, pred, target = data2vec2_loss(student, teacher.model, cfg, batch)

    D = cfg.model.trunk.dim
    assert seen["student"] == [(B * M, P + K, D)]  # only the kept tokens (+ CLS) reach the blocks
    assert seen["teacher"] == [(B, P + T, D)]  # one pass, one row per sample, unmasked
    assert seen["decoder"] == [(B * M, T, D)]  # the decoder predicts every step of every copy
    n = int(batch.mask.sum())
    assert pred.shape == target.shape == (n, D)  # loss only at the masked steps of all copies
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None for n_, p in student.named_parameters() if p.requires_grad), "unused parameter"
    assert not any("decoder" in k for k in teacher.state_dict()), "the decoder must not be in the teacher"

    # the M copies of a sample share its targets: wherever two copies mask the same step, same target row
    flat = clone_masks(batch.mask, M)  # (B*M, T)
    row_of = torch.full(flat.shape, -1)
    row_of[flat] = torch.arange(n)
    for b in range(B):
        a, c = b * M, b * M + 1
        both = flat[a] & flat[c]
        assert both.any()
        torch.testing.assert_close(target[row_of[a][both]], target[row_of[c][both]], rtol=0, atol=0)
    # ... and different samples do get different targets
    other = flat[0] & flat[M]
    assert not torch.allclose(target[row_of[0][other]], target[row_of[M][other]])


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_dropping_tokens_equals_hiding_them_from_attention(modality):
    """Encoding only the kept steps must give exactly what the full encoder gives at those steps when the
    dropped steps are hidden from attention (padding) -- positions (conv + ALiBi for speech, learned
    for text) stay those of the original sequence."""
    cfg, student, _, batch = _setup(modality)
    enc = student.encoder.eval()
    mask = clone_masks(batch.mask, cfg.v2.clone_batch)[:: cfg.v2.clone_batch]  # one copy per sample (B, T)
    keep = visible(mask)
    with torch.no_grad():
        feats, _ = enc.features(batch.inputs)
        x = feats.masked_fill(mask[..., None], 0.0)
        dropped = enc.context(x, None, keep=keep).last  # (B, K, D)
        hidden = enc.context(x, mask).last  # (B, T, D), masked steps are padding
    kept_rows = torch.gather(hidden, 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
    torch.testing.assert_close(dropped, kept_rows, rtol=1e-5, atol=1e-5)


def test_visible_keeps_original_order_and_rejects_ragged_masks():
    mask = torch.tensor([[True, False, True, False, False], [False, False, True, True, False]])
    assert visible(mask).tolist() == [[1, 3, 4], [0, 1, 4]]
    with pytest.raises(ValueError, match="same number of steps"):
        visible(torch.tensor([[True, False, False], [True, True, False]]))


def test_decoder_input_restores_order_and_fills_noise():
    torch.manual_seed(0)
    vis = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) + 1.0  # (B, K, D), nonzero
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    full = decoder_input(vis, keep, 400, noise_std=0.01)
    assert full.shape == (2, 400, 4)
    for b in range(2):
        torch.testing.assert_close(full[b, keep[b]], vis[b])
    filled = torch.ones(2, 400, dtype=torch.bool)
    filled[0, keep[0]] = filled[1, keep[1]] = False
    noise = full[filled]
    assert abs(noise.mean().item()) < 2e-3 and 0.009 < noise.std().item() < 0.011  # N(0, 0.01^2) (SPEC 3)


def test_text_decoder_is_the_reference_shape():
    """base_text_only_task.yaml: 5 x Conv1d(768, 768, k9, groups 1), no residual, head 768 -> 1536 -> 768."""
    cfg = get_preset("text", "base", "v2")
    dec = ConvDecoder(cfg.v2.decoder, cfg.model.trunk.dim)
    D = 768
    expected = 5 * (D * D * 9 + D) + (D * 2 * D + 2 * D) + (2 * D * D + D)
    assert sum(p.numel() for p in dec.parameters()) == expected
    assert dec.residual == [False] * 5
    audio = get_preset("audio", "base", "v2")  # 768 -> 384 first layer cannot be residual, the rest are
    assert ConvDecoder(audio.v2.decoder, 768).residual == [False, True, True, True]


def test_v2_step_is_deterministic_given_the_seeds():
    losses = []
    for _ in range(2):
        cfg, student, teacher, batch = _setup("vision", seed=3)
        torch.manual_seed(7)  # dropout / decoder noise draws
        losses.append(data2vec2_loss(student, teacher.model, cfg, batch)[0].item())
    assert losses[0] == losses[1]


def test_teacher_targets_follow_the_preset_norms():
    """Vision v2: instance norm per layer, then a LayerNorm of the average: every target vector is
    zero-mean unit-variance over D (the final LayerNorm), whatever the teacher."""
    cfg, student, teacher, batch = _setup("vision")
    feats = student.encoder.features(batch.inputs)
    y, pad = teacher_targets_v2(teacher.model, cfg, batch.inputs, None, feats)
    assert pad is None and y.shape == (B, cfg.model.frontend.grid ** 2, cfg.model.trunk.dim)
    torch.testing.assert_close(y.mean(-1), torch.zeros(y.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(y.shape[:2]), atol=1e-3, rtol=0)


# -------------------------------------------------------------------------------------------- masks
def test_vision_inverse_block_masks_157_of_196_in_blocks():
    """SPEC 3: inverse block 3x3, R .8 (+A .07) -> 157 of 196 patches masked; the kept patches come in
    blocks (a kept patch almost always has a kept neighbour, unlike uniform masking of the same count)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.cat([inverse_block_mask(16, 14, 0.8, 0.07, 3, generator=g) for _ in range(50)])  # (800, 196)
    assert masks.sum(1).float().mean().item() == 157.0
    assert (masks.sum(1) == 157).all()  # require_same_masks: every copy drops the same count

    def kept_with_kept_neighbour(m):
        k = (~m).view(-1, 1, 14, 14).float()
        cross = torch.tensor([[[[0.0, 1, 0], [1, 0, 1], [0, 1, 0]]]])
        return ((F.conv2d(k, cross, padding=1) > 0) & (k > 0)).sum().item() / k.sum().item()

    uniform = random_mask(800, 196, 0.8, generator=g)
    assert kept_with_kept_neighbour(masks) > 0.9 > 0.6 > kept_with_kept_neighbour(uniform)
    assert masks.float().mean(0).min() > 0.6  # every patch position gets masked often (no fixed hole)


def test_speech_frame_block_masks_half_in_spans():
    g = torch.Generator().manual_seed(0)
    m = frame_block_mask(400, 250, 0.5, 0.05, 5, generator=g)  # 5 s at 50 Hz
    assert (m.sum(1) == 125).all()  # int(T x R), every row

    def mean_run(x):
        runs = (x[:, 1:] & ~x[:, :-1]).sum() + x[:, 0].sum()
        return x.sum().item() / runs.item()

    # spans of 5 overlap and merge, and the count fix-up cuts a few: ~4 frames per run, vs 2 when uniform
    assert mean_run(m) > 4.0 > 2.5 > mean_run(random_mask(400, 250, 0.5, generator=g))


def test_text_random_masks_keep_52_percent_uniformly():
    g = torch.Generator().manual_seed(0)
    m = random_mask(2000, 128, 0.48, generator=g)
    assert (m.sum(1) == 128 - int(128 * 0.52)).all()
    freq = m.float().mean(0)
    assert (freq - 62 / 128).abs().max() < 0.05  # every position equally likely


def test_masks_are_deterministic_given_a_generator():
    for kind in ("vision", "audio", "text"):
        cfg = get_preset(kind, "base", "v2")
        a = make_masks(cfg.masking, 4, 196, generator=torch.Generator().manual_seed(5))
        b = make_masks(cfg.masking, 4, 196, generator=torch.Generator().manual_seed(5))
        c = make_masks(cfg.masking, 4, 196, generator=torch.Generator().manual_seed(6))
        assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------------- positions, ALiBi
def test_sincos_positions_match_hf_vit_mae():
    transformers = require("transformers", "ViT-MAE sin-cos table is the reference")
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAEEmbeddings

    hf_cfg = transformers.ViTMAEConfig(hidden_size=64, image_size=32, patch_size=4, num_channels=3)
    emb = ViTMAEEmbeddings(hf_cfg)
    emb.initialize_weights()
    torch.testing.assert_close(sincos_2d(8, 64), emb.position_embeddings[0, 1:].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("heads", [12, 16, 6])
def test_alibi_slopes_match_bloom(heads):
    require("transformers", "BLOOM's ALiBi slopes are the reference")
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # (H, 1, 2): slope x position
    torch.testing.assert_close(alibi_slopes(heads), alibi[:, 0, 1], rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ presets
# (modality, size): values from SPEC 3 and fairseq examples/data2vec/config/v2/<size>_<mod>_only_task.yaml
SPEC_V2 = {
    ("vision", "base"): dict(dim=768, depth=12, heads=12, K=10, M=16, mask=(0.8, 0.07, 3), final="layer",
                             tau=(0.9998, 0.99999, 100_000), dec=(2, 6, 3, 768, 16, True), lr=1e-3,
                             betas=(0.9, 0.95), wd=0.05, warmup=50_040, clip=4.0, cls=0.01, scale="inv_sqrt_dim"),
    ("vision", "large"): dict(dim=1024, depth=24, heads=16, K=18, M=16, mask=(0.75, 0.1, 3), final="layer",
                              tau=(0.9998, 0.99999, 150_000), dec=(2, 3, 5, 1024, 16, True), lr=4e-4,
                              betas=(0.9, 0.95), wd=0.05, warmup=50_040, clip=4.0, cls=0.01, scale="inv_sqrt_dim"),
    ("audio", "base"): dict(dim=768, depth=12, heads=12, K=8, M=8, mask=(0.5, 0.05, 5), final="none",
                            tau=(0.999, 0.99999, 75_000), dec=(1, 4, 7, 384, 16, True), lr=7.5e-4,
                            betas=(0.9, 0.98), wd=0.01, warmup=8_000, clip=None, cls=0.0, scale="inv_sqrt_dim"),
    ("audio", "large"): dict(dim=1024, depth=24, heads=16, K=16, M=12, mask=(0.55, 0.1, 5), final="none",
                             tau=(0.9997, 1.0, 300_000), dec=(1, 4, 7, 768, 16, True), lr=4e-4,
                             betas=(0.9, 0.98), wd=0.01, warmup=10_000, clip=1.0, cls=0.0, scale="inv_sqrt_dim"),
    ("text", "base"): dict(dim=768, depth=12, heads=12, K=12, M=8, mask=(0.48,), final="none",
                           tau=(0.9999, 0.99999, 100_000), dec=(1, 5, 9, 768, 1, False), lr=2e-4,
                           betas=(0.9, 0.98), wd=0.01, warmup=4_000, clip=1.0, cls=0.0, scale="one"),
    ("text", "large"): dict(dim=1024, depth=24, heads=16, K=24, M=8, mask=(0.5,), final="instance",
                            tau=(0.9999, 0.99999, 100_000), dec=(1, 5, 9, 768, 1, False), lr=1e-4,
                            betas=(0.9, 0.98), wd=0.01, warmup=4_000, clip=1.0, cls=0.0, scale="one"),
}


@pytest.mark.parametrize("key", sorted(SPEC_V2))
def test_v2_presets_follow_spec_and_reference_yaml(key):
    s, c = SPEC_V2[key], get_preset(*key, version="v2")
    t, d, o, m = c.model.trunk, c.v2.decoder, c.optim, c.masking
    assert c.version == "v2" and t.norm_style == "post"  # SPEC 3: post-LN blocks in all modalities
    assert (t.dim, t.depth, t.heads, t.ffn_dim) == (s["dim"], s["depth"], s["heads"], 4 * s["dim"])
    assert (c.targets.top_k, c.v2.clone_batch, c.targets.final_norm) == (s["K"], s["M"], s["final"])
    assert c.targets.layer_output == "ffn"  # FFN output before the residual
    assert c.targets.layer_norm == ("layer" if key == ("text", "large") else "instance")
    assert tuple(getattr(m, f) for f in ("mask_prob", "mask_prob_adjust", "block")[: len(s["mask"])]) == s["mask"]
    assert (c.teacher.tau0, c.teacher.tau_end, c.teacher.tau_steps) == s["tau"]
    assert (d.dims, d.layers, d.kernel, d.width, d.groups, d.residual) == s["dec"]
    assert (o.lr, o.betas, o.weight_decay, o.warmup_steps, o.clip_norm) == (s["lr"], s["betas"], s["wd"], s["warmup"], s["clip"])
    assert o.schedule == "cosine" and o.name == "adam" and o.no_decay_1d
    assert c.v2.cls_loss == s["cls"] and c.v2.mask_noise_std == 0.01
    assert (c.loss.kind, c.loss.dim_reduce, c.loss.scale) == ("l2", "sum", s["scale"])
    mod = key[0]
    assert c.teacher.scope == ("layers" if mod == "text" else "all")  # text: ema_encoder_only
    assert c.v2.teacher_local_encoder == (mod == "vision")  # ema_local_encoder
    if mod == "vision":
        assert c.model.frontend.pos_embed == "sincos" and not t.rel_pos_bias and t.input_norm
        assert t.ln_eps == 1e-6 and t.dropout == 0.0
    if mod == "audio":
        f = c.model.frontend
        assert f.alibi and (f.pos_conv_depth, f.pos_conv_kernel, f.pos_conv_groups) == (5, 19, 16)
        assert t.layerdrop == (0.05 if key[1] == "base" else 0.0)
    if mod == "text":
        assert d.proj_layers == 2 and d.proj_ratio == 2.0  # head 768 -> 1536 -> D


def test_tiny_v2_presets_build_and_validate():
    for mod in ("vision", "audio", "text"):
        cfg = get_preset(mod, "tiny", "v2")
        assert cfg.version == "v2" and cfg.model.trunk.dim == 64


def test_v2_config_errors_name_the_field():
    cfg = get_preset("vision", "tiny", "v2")
    with pytest.raises(ConfigError, match="masking.kind"):
        apply_overrides(cfg, ["masking.kind=block"])
    with pytest.raises(ConfigError, match="rel_pos_bias"):
        apply_overrides(cfg, ["model.trunk.rel_pos_bias=true"])
    with pytest.raises(ConfigError, match="v2.decoder.groups"):
        apply_overrides(cfg, ["v2.decoder.groups=7"])
    with pytest.raises(ConfigError, match="v2.decoder.kernel"):
        apply_overrides(cfg, ["v2.decoder.kernel=4"])
    with pytest.raises(ConfigError, match="masking.kind='inverse_block' is not valid for vision with version='v1'"):
        apply_overrides(cfg, ["version=v1"])
    v1 = get_preset("vision", "tiny")
    with pytest.raises(ConfigError, match="version='v2' needs a v2 section"):
        apply_overrides(v1, ["version=v2", "masking.kind=inverse_block"])
    text = get_preset("text", "tiny", "v2")
    with pytest.raises(ConfigError, match="v2.cls_loss"):
        apply_overrides(text, ["v2.cls_loss=0.01"])
    assert apply_overrides(cfg, ["v2.clone_batch=4"]).v2.clone_batch == 4


# ------------------------------------------------------------------------------ loader and loop
@pytest.mark.parametrize("modality", ["vision", "text"])  # teacher scope 'all' / 'layers'
def test_v2_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch, modality):
    """The training loop with version v2: kill after the step-2 checkpoint, resume; later losses and the final
    student (encoder + decoder), teacher, optimizer and state equal the uninterrupted run's exactly."""
    import itertools

    from tests import test_train

    cfg = apply_overrides(get_preset(modality, "tiny", "v2"),
                          ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1"])

    def stream(cfg, calls):
        def batches_from(position):
            calls.append(position)
            for i in itertools.count(position):
                yield _v2_batch(cfg, 1000 + i)

        return batches_from

    monkeypatch.setattr(test_train, "stream", stream)  # run_until's batches: v2 ones
    dirs = [tmp_path / n for n in ("full", "part", "rest")]
    for d in dirs:
        d.mkdir()
    want, _ = test_train.run_until(cfg, dirs[0])
    test_train.run_until(cfg, dirs[1], crash_at=2)
    got, calls = test_train.run_until(cfg, dirs[2], resume=dirs[1] / "step_00000002")
    assert calls == [2] and got == {s: want[s] for s in (3, 4)}
    test_train.assert_same_checkpoint(dirs[0] / "step_00000004", dirs[2] / "step_00000004")
    from safetensors.torch import load_file

    student = load_file(dirs[0] / "step_00000004" / "model.safetensors")
    teacher = load_file(dirs[0] / "step_00000004" / "teacher.safetensors")
    assert any(k.startswith("decoder.") for k in student) and not any("decoder" in k for k in teacher)


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_loader_precomputes_m_masks_per_sample_deterministically(tmp_path, modality):
    """The loader's collate gives (B, M, T) masks with the preset's counts (vision tiny 8x8 grid: 64 -
    int(64 x .2) = 52 masked; speech int(T x .5); text int(T x .52) kept, no <mask> token), and a loader
    started at step 2 replays step 2 exactly (masks included)."""
    from tests.test_loader import same, take, write_shards
    from workers.loader import build_loader

    shards = write_shards(str(tmp_path), modality, [8, 8])
    cfg = apply_overrides(get_preset(modality, "tiny", "v2"),
                          ["train.batch_size=3", "data.num_workers=0", "data.shuffle_buffer=4"])
    full = take(build_loader(cfg, shards, num_samples=16), 3)
    M = cfg.v2.clone_batch
    for b in full:
        Bn, T = len(b), b.mask.shape[-1]
        assert b.mask.shape == (Bn, M, T) and b.teacher_inputs is None
        counts = b.mask.sum(-1)
        want = {"vision": 52, "audio": int(T * 0.5), "text": T - int(T * (1 - 0.48))}[modality]
        assert (counts == want).all()
        assert not torch.equal(b.mask[0, 0], b.mask[0, 1])  # M different masks per sample
        if modality == "text":
            assert not (b.inputs == cfg.model.frontend.mask_id).any()  # v2 text: no mask token
    resumed = take(build_loader(cfg, shards, num_samples=16, start_step=2), 1)
    assert same(full[2], resumed[0])


# ------------------------------------------------------------------------- checkpoints and export
@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_v2_checkpoint_holds_the_encoder_downstream_jobs_load(tmp_path, modality):
    """model.safetensors = the v2 student (encoder.* + decoder.*); load_encoder (evaluate, embed, registry)
    rebuilds exactly the student's encoder -- ALiBi scale and sin-cos positions included."""
    from model.checkpoint import load_encoder, save_checkpoint

    cfg, student, _, batch = _setup(modality)
    with torch.no_grad():  # move the parameters away from their init so a fresh Encoder would differ
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ck", cfg, student.eval())
    loaded_cfg, enc = load_encoder(tmp_path / "ck")
    assert loaded_cfg.version == "v2" and loaded_cfg.v2 == cfg.v2
    with torch.no_grad():
        torch.testing.assert_close(enc(batch.inputs).last, student.encoder(batch.inputs).last, rtol=0, atol=0)


def test_v2_text_encoder_exports_to_hf_exactly(tmp_path):
    """Text v2 keeps RoBERTa's encoder, so Data2VecTextModel holds it exactly; vision v2 (post-LN, sin-cos)
    has no HF class and is refused with the field named."""
    transformers = require("transformers", "Data2VecTextModel is the reference")
    from model.encoder import Encoder
    from model.hf import export_hf

    torch.manual_seed(0)
    cfg = get_preset("text", "tiny", "v2")
    enc = Encoder(cfg.model).eval()
    export_hf(enc, cfg, tmp_path / "hf")
    hf = transformers.Data2VecTextModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(5, cfg.model.frontend.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(enc(ids).last, hf(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    vision = get_preset("vision", "tiny", "v2")
    with pytest.raises(ConfigError, match="model.trunk.norm_style"):
        export_hf(Encoder(vision.model), vision, tmp_path / "hf-vision")
