"""Mask generators against the reference algorithms (BEiT MaskingGenerator, fairseq compute_mask_indices,
BERT 80/10/10) and closed-form expectations computed here."""

import math
import random

import numpy as np
import pytest
import torch

from model.masking import bert_mask, block_mask, span_mask, span_mask_batch, text_span_mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D mask."""
    out, n = [], 0
    for v in mask.tolist() + [False]:
        if v:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


# ---------------------------------------------------------------------------------------- block mask
def beit_reference(h: int, w: int, num: int, min_p: int, min_aspect: float, rng: random.Random) -> np.ndarray:
    """Port of microsoft/unilm beit/masking_generator.py (MaskingGenerator.__call__), python RNG."""
    mask = np.zeros((h, w), dtype=int)
    log_ar = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num:
        max_p = num - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_p, max_p)
            ar = math.exp(rng.uniform(*log_ar))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - mask[top : top + bh, left : left + bw].sum()
                if 0 < new <= max_p:
                    for i in range(top, top + bh):
                        for j in range(left, left + bw):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


def adjacent_pairs(m: np.ndarray) -> int:
    """Horizontally + vertically adjacent masked pairs: large for blocky masks, small for scattered ones."""
    return int((m[:, 1:] & m[:, :-1]).sum() + (m[1:, :] & m[:-1, :]).sum())


def test_block_mask_shape_and_bounds():
    g = gen(0)
    counts = []
    for _ in range(200):
        m = block_mask(14, 14, 120, generator=g)
        assert m.shape == (196,) and m.dtype == torch.bool
        counts.append(int(m.sum()))
    assert max(counts) <= 120
    assert np.mean(counts) >= 0.9 * 120


def test_block_mask_matches_beit_reference_statistics():
    g, rng = gen(1), random.Random(1)
    ours = [block_mask(14, 14, 120, 16, None, 0.3, generator=g).view(14, 14).numpy() for _ in range(300)]
    ref = [beit_reference(14, 14, 120, 16, 0.3, rng).astype(bool) for _ in range(300)]
    mean_ours, mean_ref = np.mean([m.sum() for m in ours]), np.mean([m.sum() for m in ref])
    assert abs(mean_ours - mean_ref) < 0.5, (mean_ours, mean_ref)  # s.e. ~0.06
    adj_ours, adj_ref = np.mean([adjacent_pairs(m) for m in ours]), np.mean([adjacent_pairs(m) for m in ref])
    assert abs(adj_ours - adj_ref) < 1.5, (adj_ours, adj_ref)  # s.e. ~0.25
    # blockiness: a uniformly scattered mask of 120/196 has ~2*182*(120/196)^2 ~ 136 adjacent pairs
    assert adj_ours > 180
    # aspect range symmetric around 1: as many horizontal as vertical neighbour pairs
    o = np.stack(ours)
    horizontal, vertical = (o[:, :, 1:] & o[:, :, :-1]).sum() / 300, (o[:, 1:] & o[:, :-1]).sum() / 300
    assert abs(horizontal - vertical) < 2.0, (horizontal, vertical)
    # placement covers the whole grid, with the reference's border frequency (~0.27 vs ~0.93 centre)
    assert o.any(0).all()

    def border(ms):
        f = np.mean(ms, axis=0)
        return np.mean([f[0].mean(), f[-1].mean(), f[:, 0].mean(), f[:, -1].mean()])

    assert abs(border(ours) - border(ref)) < 0.04, (border(ours), border(ref))


def test_block_mask_single_square_block_is_row_major_rectangle():
    # area fixed at 9, aspect 1 -> exactly one 3x3 square, accepted on the first attempt
    for seed in range(20):
        m = block_mask(6, 8, 9, min_block=9, max_block=9, min_aspect=1.0, generator=gen(seed)).view(6, 8)
        rows, cols = m.nonzero(as_tuple=True)
        assert int(m.sum()) == 9
        assert rows.max() - rows.min() == 2 and cols.max() - cols.min() == 2


def test_block_mask_block_sides_stay_below_grid_sides():
    # BEiT accepts a block only if h < grid_h and w < grid_w: a forced 3x3 block never fits a 3x3 grid
    assert not block_mask(3, 3, 9, min_block=9, max_block=9, min_aspect=1.0, generator=gen(0)).any()
    assert block_mask(4, 4, 9, min_block=9, max_block=9, min_aspect=1.0, generator=gen(0)).sum() == 9


def test_block_mask_deterministic_and_seed_dependent():
    a = block_mask(14, 14, 120, generator=gen(7))
    b = block_mask(14, 14, 120, generator=gen(7))
    c = block_mask(14, 14, 120, generator=gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_block_mask_rejects_too_many():
    with pytest.raises(ValueError):
        block_mask(4, 4, 17)


# ----------------------------------------------------------------------------------------- span mask
def expected_span_fraction(length: int, mask_prob: float, span: int) -> float:
    """Exact E[masked fraction]: S starts without replacement from range(n), n = length - span,
    S = int(mask_prob * length / span + U) (floor or floor+1 with the fractional part's probability)."""
    n = length - span
    x = mask_prob * length / span
    lo = int(x)
    total = 0.0
    for s, p in ((lo, 1 - (x - lo)), (lo + 1, x - lo)):
        s = min(max(s, 1), n)
        for t in range(length):
            k = len([st for st in range(max(0, t - span + 1), t + 1) if st < n])  # starts covering t
            total += p * (1 - math.comb(n - k, s) / math.comb(n, s))
    return total / length


def test_span_mask_ratio_matches_closed_form_and_spec():
    g = gen(0)
    frac = np.mean([span_mask(500, 0.65, 10, generator=g).float().mean().item() for _ in range(2000)])
    expected = expected_span_fraction(500, 0.65, 10)
    assert abs(frac - expected) < 0.005, (frac, expected)
    # SPEC: ~49% (1 - (1 - .065)^10 for an unbounded sequence)
    assert abs(frac - (1 - (1 - 0.065) ** 10)) < 0.02


def test_span_mask_runs_are_whole_spans():
    g = gen(1)
    for _ in range(200):
        m = span_mask(300, 0.3, 10, generator=g)
        assert all(r >= 10 for r in runs(m))  # union of overlapping length-10 spans
        assert not m[-1]  # starts < length - span: the last step is never masked


def test_span_mask_min_one_span_when_tiny():
    g = gen(2)
    for _ in range(100):
        m = span_mask(500, 0.001, 10, min_spans=1, generator=g)  # 0.05 expected spans
        assert runs(m) in ([10], [10, 10]), runs(m)
    assert sum(runs(span_mask(500, 0.001, 10, min_spans=0, generator=gen(3)))) in (0, 10)


@pytest.mark.parametrize("length", [0, 1, 2, 5, 10, 11])
def test_span_mask_short_sequences_never_fully_masked(length):
    for seed in range(20):
        m = span_mask(length, 0.65, 10, generator=gen(seed))
        assert m.shape == (length,)
        if length <= 1:
            assert not m.any()
        else:
            assert m.any() and not m.all()
    if 2 <= length <= 10:  # one span of length - 1 from step 0
        assert span_mask(length, 0.65, 10, generator=gen(0)).tolist() == [True] * (length - 1) + [False]


def test_span_mask_deterministic_and_seed_dependent():
    assert torch.equal(span_mask(400, 0.65, 10, generator=gen(5)), span_mask(400, 0.65, 10, generator=gen(5)))
    assert not torch.equal(span_mask(400, 0.65, 10, generator=gen(5)), span_mask(400, 0.65, 10, generator=gen(6)))


def test_span_mask_batch_respects_lengths_and_same_count():
    lengths = [120, 57, 200, 3]
    m = span_mask_batch(lengths, 200, 0.65, 10, generator=gen(0))
    assert m.shape == (4, 200)
    for b, n in enumerate(lengths):
        assert not m[b, n:].any() and m[b, :n].any()
    m2 = span_mask_batch(lengths, 200, 0.65, 10, same_count=True, generator=gen(0))
    assert len(set(m2.sum(1).tolist())) == 1
    assert (m2 <= m).all()  # only drops masked positions
    # compute_mask_indices(require_same_masks): each row keeps a random min_len-subset of its own mask
    assert int(m2[0].sum()) == int(m.sum(1).min())
    with pytest.raises(ValueError):
        span_mask_batch([300], 200, 0.65, 10)


# ---------------------------------------------------------------------------------------------- text
# fairseq MaskTokensDataset (mask_multiple_length, as data2vec text uses it), per sample of T tokens:
#   num = int(p * T / L + U);  starts = choice(T, num, replace=False);  spans start..start+L-1, kept < T
# so position j is masked unless none of the w_j = min(L, j + 1) starts that cover it was drawn:
#   P(j masked | num) = 1 - C(T - w_j, num) / C(T, num)   (hypergeometric, closed form below)


def p_masked(T: int, L: int, p: float, j: int) -> float:
    """P(position j masked) under the reference algorithm, averaged over the probabilistic rounding."""
    x = p * T / L
    lo = math.floor(x)
    w = min(L, j + 1)
    miss = lambda n: math.comb(T - w, n) / math.comb(T, n)  # noqa: E731
    return 1 - ((1 - (x - lo)) * miss(lo) + (x - lo) * miss(lo + 1))


def text_ids(t: int) -> torch.Tensor:
    ids = torch.randint(10, 1000, (t,), generator=gen(99))
    ids[0], ids[-1] = 0, 2  # <s> ... </s>
    return ids


def test_text_span_mask_matches_mask_tokens_dataset_position_by_position():
    T, L, p, n = 40, 4, 0.35, 20_000
    ids, g = text_ids(T), gen(0)
    hits = torch.zeros(T)
    counts = set()
    for _ in range(n):
        new, tgt = text_span_mask(ids, mask_id=7, mask_prob=p, span_length=L, generator=g)
        assert torch.equal(tgt, new == 7) and torch.equal(new[~tgt], ids[~tgt])  # all chosen -> <mask>
        hits += tgt.float()
        counts.add(len(runs(tgt)) <= math.floor(p * T / L) + 1)
    assert counts == {True}  # never more spans than the rounding allows: no forced extra spans
    for j in range(T):  # <s> (j=0, only its own start covers it) and </s> (j=T-1, spans cut) included
        assert abs(hits[j] / n - p_masked(T, L, p, j)) < 0.015, j
    assert hits[0] > 0 and hits[-1] > 0  # the reference can mask <s> and </s>


def test_text_span_mask_has_no_minimum():
    # T=5, p=.35, L=4: num = int(.4375 + U) is 0 with probability .5625 -> nothing masked, as in the reference
    ids, g = text_ids(5), gen(1)
    empty = sum(not text_span_mask(ids, 99, 0.35, 4, generator=g)[1].any() for _ in range(4000))
    assert abs(empty / 4000 - (1 - 0.4375)) < 0.03
    # min_spans is a knob, off in the text presets
    assert all(text_span_mask(ids, 99, 0.35, 4, min_spans=1, generator=g)[1].any() for _ in range(200))


def test_bert_mask_counts_replacements_and_loss_positions():
    T = 100
    ids, g = text_ids(T), gen(0)
    chosen_n, n_mask, n_rand, n_same = [], 0, 0, 0
    for _ in range(3000):
        new, tgt = bert_mask(ids, mask_id=1000, vocab_size=1000, num_special=4, generator=g)
        # data2vec_text.py: loss only where the input is <mask>, never at random / unchanged tokens
        assert torch.equal(tgt, new == 1000)
        rand = (new != ids) & ~tgt
        assert ((new[rand] >= 4) & (new[rand] < 1000)).all()
        n_mask += int(tgt.sum())
        n_rand += int(rand.sum())
        chosen_n.append(int(tgt.sum()) + int(rand.sum()))
    # MaskTokensDataset: num = int(.15 * 100 + U) = 15 chosen over all positions; 80% <mask>, 10% random
    # (a random id equal to the original, 1 in 996, counts as unchanged here)
    total = 3000 * 15
    assert abs(n_mask / total - 0.8) < 0.01
    assert abs(n_rand / total - 0.1 * (1 - 1 / 996)) < 0.01
    assert max(chosen_n) <= 15


def test_bert_mask_chooses_specials_too():
    ids, g = text_ids(20), gen(3)  # int(.15 * 20 + U) = 3 chosen of 20 -> P(<s> chosen and <mask>) = .15 x .8
    hits = sum(bool(bert_mask(ids, 50, 50, 4, generator=g)[1][0]) for _ in range(4000))
    assert abs(hits / 4000 - 0.15 * 0.8) < 0.02
