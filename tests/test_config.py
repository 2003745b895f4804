"""Configs: presets carry the reference-code values of SPEC 2; invalid values are rejected naming the field."""

import pytest

from model.config import Config, ConfigError, apply_overrides
from model.presets import PRESETS, get_preset


@pytest.mark.parametrize("key", sorted(PRESETS))
def test_presets_validate_and_round_trip_yaml(key):
    cfg = PRESETS[key]()
    assert Config.from_yaml(cfg.to_yaml()) == cfg


def test_vision_base_matches_spec_row():
    c = get_preset("vision", "base")
    t = c.model.trunk
    assert (t.dim, t.depth, t.heads, t.ffn_dim, t.norm_style) == (768, 12, 12, 3072, "pre")
    assert (t.ln_eps, t.layer_scale_init, t.qkv_bias, t.rel_pos_bias, t.drop_path) == (1e-6, 1e-4, "qv", True, 0.25)
    assert c.model.frontend.grid ** 2 == 196 and c.masking.num_masked == 120 and c.masking.min_block == 16
    assert (c.targets.top_k, c.targets.layer_output, c.targets.layer_norm, c.targets.final_norm) == (
        6, "block", "layer", "layer")
    assert (c.loss.kind, c.loss.beta, c.loss.dim_reduce) == ("smooth_l1", 2.0, "mean")
    assert (c.teacher.tau0, c.teacher.tau_end, c.teacher.scope) == (0.9998, 0.9998, "all")
    o = c.optim
    assert (o.name, o.betas, o.eps, o.weight_decay, o.lr, o.clip_norm, o.final_lr) == (
        "adamw", (0.9, 0.999), 1e-8, 0.05, 2e-3, 3.0, 1e-5)
    large = get_preset("vision", "large")
    assert (large.model.trunk.depth, large.model.trunk.dim, large.model.trunk.layer_scale_init) == (24, 1024, 1e-5)
    assert large.model.trunk.drop_path == 0.2 and large.optim.lr == 1e-3


def test_audio_base_matches_spec_row():
    c = get_preset("audio", "base")
    f, t = c.model.frontend, c.model.trunk
    assert [k for _, k, _ in f.conv_layers] == [10, 3, 3, 3, 3, 2, 2]
    assert [s for _, _, s in f.conv_layers] == [5, 2, 2, 2, 2, 2, 2]
    assert {ch for ch, _, _ in f.conv_layers} == {512} and not f.conv_bias
    assert (f.pos_conv_depth, f.pos_conv_kernel, f.pos_conv_groups) == (5, 19, 16)
    assert (t.norm_style, t.input_norm, t.dropout, t.attn_dropout, t.layerdrop) == ("post", True, 0.1, 0.1, 0.05)
    assert (c.masking.kind, c.masking.mask_prob, c.masking.span_length) == ("span", 0.65, 10)
    assert (c.teacher.tau0, c.teacher.tau_end, c.teacher.tau_steps, c.teacher.scope) == (
        0.999, 0.9999, 30_000, "layers")
    assert (c.targets.top_k, c.targets.layer_output, c.targets.layer_norm, c.targets.final_norm) == (
        8, "ffn", "instance", "none")
    assert (c.loss.kind, c.loss.scale, c.loss.dim_reduce) == ("l2", "inv_sqrt_dim", "sum")
    assert (c.optim.lr, c.optim.betas, c.optim.schedule, c.optim.tri_stage) == (
        5e-4, (0.9, 0.98), "tri_stage", (0.03, 0.9, 0.07))
    assert c.train.max_steps == 400_000 and c.optim.clip_norm is None


def test_text_base_matches_spec_row():
    c = get_preset("text", "base")
    assert c.model.frontend.pad_id == 1 and c.model.frontend.max_positions == 514
    assert (c.masking.kind, c.masking.mask_prob, c.masking.span_length) == ("span", 0.35, 4)
    assert (c.targets.top_k, c.targets.layer_norm, c.loss.kind, c.loss.beta, c.loss.scale) == (
        10, "layer", "smooth_l1", 4.0, "one")
    assert (c.model.head.kind, c.model.head.hidden_mult) == ("mlp", 2)
    assert (c.teacher.tau0, c.teacher.tau_end, c.teacher.tau_steps) == (0.999, 0.9999, 300_000)
    assert (c.optim.lr, c.optim.clip_norm, c.optim.warmup_steps) == (2e-4, 5.0, 10_000)


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=abc", "optim.lr"),
        ("optim.lrr=1", "optim.lrr"),
        ("model.trunk.heads=5", "model.trunk"),
        ("masking.kind=span", "masking.kind"),
        ("optim.schedule=linear", "optim.schedule"),
        ("targets.top_k=9", "targets.top_k"),
        ("loss.kind=smooth_l1", "loss.beta"),
        ("model.frontend.image_size=30", "image_size"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    cfg = get_preset("vision", "tiny")
    if override.startswith("loss.kind"):
        cfg = get_preset("audio", "tiny")
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(cfg, [override])


def test_enum_errors_list_allowed_values():
    with pytest.raises(ConfigError, match="cosine.*tri_stage.*constant"):
        apply_overrides(get_preset("vision", "tiny"), ["optim.schedule=linear"])


def test_overrides_parse_yaml_values():
    cfg = apply_overrides(get_preset("text", "tiny"), ["optim.lr=3e-4", "train.max_steps=7", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9)


def test_switching_union_kind_takes_new_defaults():
    cfg = apply_overrides(get_preset("text", "tiny"), ["masking.kind=bert"])
    assert cfg.masking.kind == "bert" and cfg.masking.mask_prob == 0.15


def test_unknown_preset_lists_allowed():
    with pytest.raises(ConfigError, match="sizes"):
        get_preset("vision", "huge")
