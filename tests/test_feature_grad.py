"""model.frontend.feature_grad_mult: the conv extractor's gradient scale (fairseq `feature_grad_mult`).

Independent references: autograd on an identical copy with the full gradient, scaled by hand (what
fairseq's GradMultiply does: forward identity, backward x scale), and the reference configs' values.
"""

from __future__ import annotations

import copy

import pytest
import torch

from model.config import ConfigError, apply_overrides
from model.frontends import AudioFrontend
from model.presets import get_preset


def _frontend(mult: float) -> AudioFrontend:
    cfg = get_preset("audio", "tiny")
    f = cfg.model.frontend.model_copy(update={"feature_grad_mult": mult})
    torch.manual_seed(0)
    fe = AudioFrontend(f, cfg.model.trunk.dim, cfg.model.trunk.ln_eps)
    fe.init_weights_(0.02, None, "torch")
    return fe.double()  # float64: scaling before or after the conv backward then agrees to ~1e-15


def _grads(fe: AudioFrontend, wav: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, _ = fe.features(wav)  # (B, T, D)
    torch.manual_seed(1)
    (x * torch.randn_like(x)).sum().backward()  # a loss with a gradient that differs per feature
    return x.detach(), {n: p.grad.clone() for n, p in fe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mult", [0.1, 0.37])
def test_extractor_gradient_is_scaled_by_exactly_the_factor_and_forward_is_unchanged(mult):
    ref = _frontend(1.0)
    scaled = copy.deepcopy(ref)
    scaled.cfg = scaled.cfg.model_copy(update={"feature_grad_mult": mult})
    wav = torch.randn(2, 2000, dtype=torch.float64)
    y_ref, g_ref = _grads(ref, wav)
    y, g = _grads(scaled, wav)
    assert torch.equal(y, y_ref)  # forward: bit-identical
    conv = [n for n in g_ref if n.startswith("conv.")]
    rest = [n for n in g_ref if not n.startswith("conv.")]
    assert conv and "proj.weight" in rest
    for n in conv:  # extractor: the full gradient times the factor, by hand
        torch.testing.assert_close(g[n], g_ref[n] * mult, rtol=1e-10, atol=1e-12)
        assert g_ref[n].abs().max() > 0
    for n in rest:  # after the extractor (its LayerNorm, projection): untouched
        assert torch.equal(g[n], g_ref[n])


def test_zero_freezes_the_extractor_but_not_what_follows():
    ref, frozen = _frontend(1.0), _frontend(0.0)
    wav = torch.randn(2, 2000, dtype=torch.float64)
    y_ref, g_ref = _grads(ref, wav)
    y, g = _grads(frozen, wav)
    assert torch.equal(y, y_ref)
    assert not any(p.requires_grad for p in frozen.conv.parameters())  # out of the optimiser and DDP
    assert not any(n.startswith("conv.") for n in g)
    assert set(g) == {n for n in g_ref if not n.startswith("conv.")}
    for n in g:
        assert torch.equal(g[n], g_ref[n])


def test_reference_values_in_the_presets():
    # fairseq examples/data2vec/config/audio/pretraining/base_librispeech.yaml: `feature_grad_mult: 1.0`
    # (the large model has no yaml of its own; Wav2Vec2Config's default is 1.0 as well)
    assert get_preset("audio", "base").model.frontend.feature_grad_mult == 1.0
    assert get_preset("audio", "large").model.frontend.feature_grad_mult == 1.0
    # tiny keeps it too (measured against .1 and 0 on the demo corpus: model/presets.py audio_tiny)
    assert get_preset("audio", "tiny").model.frontend.feature_grad_mult == 1.0
    with pytest.raises(ConfigError, match="feature_grad_mult"):
        apply_overrides(get_preset("audio", "tiny"), ["model.frontend.feature_grad_mult=-0.1"])
