"""Targets, loss and collapse statistics against hand computations in numpy / plain loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.targets import build_targets, mean_std, mean_std_of, regression_loss, variance_stats


def rand(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def np_instance_norm(x: np.ndarray) -> np.ndarray:
    """x [B, T, D]: per sample, per channel, over time; biased variance, eps 1e-5."""
    out = np.empty_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for d in range(x.shape[2]):
            col = x[b, :, d].astype(np.float64)
            out[b, :, d] = (col - col.mean()) / np.sqrt(col.var() + 1e-5)
    return out


def np_layer_norm(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5)


# ------------------------------------------------------------------------------------------- targets
def test_instance_norm_matches_hand_computation_and_fairseq_form():
    layers = [rand(2, 9, 5, seed=i) for i in range(3)]
    y = build_targets(layers, 1, "instance", "none")
    np.testing.assert_allclose(y.numpy(), np_instance_norm(layers[-1].numpy()), atol=1e-5)
    fairseq = F.instance_norm(layers[-1].transpose(1, 2)).transpose(1, 2)  # BTC -> BCT -> BTC
    torch.testing.assert_close(y, fairseq)


def test_top_k_picks_the_last_k_and_averages():
    layers = [rand(2, 6, 4, seed=i) for i in range(6)]
    y = build_targets(layers, 3, "instance", "none")
    expected = np.mean([np_instance_norm(layers[i].numpy()) for i in (3, 4, 5)], axis=0)
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
    y_none = build_targets(layers, 2, "none", "none")
    np.testing.assert_allclose(y_none.numpy(), (layers[4].numpy() + layers[5].numpy()) / 2, atol=1e-6)
    with pytest.raises(ValueError):
        build_targets(layers, 7, "none", "none")


def test_layer_norm_per_layer_and_final_is_parameter_free():
    layers = [rand(2, 5, 8, seed=i) for i in range(4)]
    y = build_targets(layers, 2, "layer", "layer")  # vision v1: LN per layer, LN on the average
    avg = (np_layer_norm(layers[2].numpy()) + np_layer_norm(layers[3].numpy())) / 2
    np.testing.assert_allclose(y.numpy(), np_layer_norm(avg), atol=1e-5)


def test_padding_aware_instance_norm_equals_unpadded_slice():
    lengths = [9, 5]
    layers = [rand(2, 9, 4, seed=i) for i in range(3)]
    pad = torch.arange(9)[None, :] >= torch.tensor(lengths)[:, None]  # [B, T] True = padded
    y = build_targets(layers, 2, "instance", "instance", padding_mask=pad)
    for b, n in enumerate(lengths):
        sl = [layers[i][b : b + 1, :n].numpy() for i in (1, 2)]
        expected = np_instance_norm((np_instance_norm(sl[0]) + np_instance_norm(sl[1])) / 2)
        np.testing.assert_allclose(y[b : b + 1, :n].numpy(), expected, atol=1e-4)
    assert (y[1, 5:] == 0).all()
    # no padded step: identical to the unmasked path
    none_padded = torch.zeros(2, 9, dtype=torch.bool)
    torch.testing.assert_close(
        build_targets(layers, 2, "instance", "none", none_padded), build_targets(layers, 2, "instance", "none")
    )


def test_targets_are_float32_from_bf16():
    layers = [rand(1, 4, 4, seed=i).bfloat16() for i in range(2)]
    assert build_targets(layers, 2, "layer", "none").dtype == torch.float32


# ---------------------------------------------------------------------------------------------- loss
def test_smooth_l1_hand_values():
    beta = 2.0
    diff = torch.tensor([[0.5, 1.9, 2.0, 3.0, -4.0]])
    # |x| < beta: 0.5 x^2 / beta; else |x| - beta / 2
    by_hand = [0.5 * 0.25 / 2, 0.5 * 3.61 / 2, 2.0 - 1.0, 3.0 - 1.0, 4.0 - 1.0]
    pred, target = diff + 7.0, torch.full_like(diff, 7.0)
    got_sum = regression_loss(pred, target, "smooth_l1", beta, "sum", "one")
    got_mean = regression_loss(pred, target, "smooth_l1", beta, "mean", "one")
    assert got_sum.item() == pytest.approx(sum(by_hand), rel=1e-6)
    assert got_mean.item() == pytest.approx(sum(by_hand) / 5, rel=1e-6)
    # continuity at |x| = beta: quadratic branch limit 0.5 beta^2 / beta = linear branch beta - beta/2
    eps = 1e-3
    below = regression_loss(torch.tensor([[beta - eps]]), torch.zeros(1, 1), "smooth_l1", beta, "sum", "one")
    above = regression_loss(torch.tensor([[beta + eps]]), torch.zeros(1, 1), "smooth_l1", beta, "sum", "one")
    assert below.item() == pytest.approx(beta / 2, abs=2e-3) and above.item() == pytest.approx(beta / 2, abs=2e-3)
    with pytest.raises(ValueError):
        regression_loss(pred, target, "smooth_l1", 0.0, "sum", "one")


def test_l2_sum_inv_sqrt_dim_over_masked_positions():
    B, T, D = 3, 7, 16
    x, y = rand(B, T, D, seed=1), rand(B, T, D, seed=2)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) < 0.5  # [B, T]
    loss = regression_loss(x[mask], y[mask], "l2", 0.0, "sum", "inv_sqrt_dim")
    # reference: fairseq data2vec_audio, loop over masked steps
    total, count = 0.0, 0
    xn, yn = x.double().numpy(), y.double().numpy()
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                total += ((xn[b, t] - yn[b, t]) ** 2).sum() / math.sqrt(D)
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_loss_with_no_masked_rows_is_zero_and_differentiable():
    pred = torch.zeros(0, 4, requires_grad=True)
    loss = regression_loss(pred, torch.zeros(0, 4), "l2", 0.0, "sum", "inv_sqrt_dim")
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None


# ------------------------------------------------------------------------------- collapse statistics
def test_variance_stats_reduce_over_ranks_and_match_numpy():
    x = rand(50, 6, seed=4)
    ref = np.mean(np.sqrt(np.var(x.double().numpy(), axis=0, ddof=1) + 1e-6))
    assert mean_std_of(x) == pytest.approx(ref, rel=1e-10)
    rank0, rank1 = variance_stats(x[:17]), variance_stats(x[17:])  # all_reduce(SUM) == elementwise sum
    assert rank0.dtype == torch.float64 and rank0.shape == (13,)
    assert mean_std(rank0 + rank1) == pytest.approx(ref, rel=1e-10)
    # reference code: torch.sqrt(y.var(dim=0) + 1e-6).mean()
    assert mean_std_of(x) == pytest.approx(torch.sqrt(x.double().var(0) + 1e-6).mean().item(), rel=1e-10)


def test_mean_std_of_collapsed_features_is_sqrt_eps():
    x = torch.ones(10, 3) * 5
    assert mean_std_of(x) == pytest.approx(1e-3, rel=1e-6)
    assert math.isnan(mean_std_of(torch.ones(1, 3)))
