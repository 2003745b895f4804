"""Mask generators: BEiT block masks (vision), fairseq span masks (audio, text) and BERT masking (text).

Plain CPU tensor functions, meant to run inside DataLoader workers. Every random draw goes through the
optional `torch.Generator` argument (no python `random`, no numpy global state), so a seeded generator
gives the same masks on every run. Convention throughout: True = masked.
"""

from __future__ import annotations

import math

import torch


def _uniform(generator: torch.Generator | None, n: int = 1) -> list[float]:
    """n draws from U[0, 1) as python floats."""
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()


# -------------------------------------------------------------------------------------------- vision
def _place_block(
    mask: torch.Tensor, min_block: int, max_new: int, log_aspect: tuple[float, float], generator
) -> int:
    """One BEiT `_mask` call: up to 10 attempts to place a rectangle that adds 1..max_new new cells.

    mask: [H, W] bool, modified in place. Returns the number of newly masked cells (0 = gave up).
    """
    grid_h, grid_w = mask.shape
    for _ in range(10):
        u_area, u_aspect, u_top, u_left = _uniform(generator, 4)
        # BEiT: random.uniform(min_num_patches, max_mask_patches) (also valid when max < min)
        area = min_block + (max_new - min_block) * u_area
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u_aspect)
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w >= grid_w or h >= grid_h:
            continue
        top = int(u_top * (grid_h - h + 1))  # random.randint(0, H - h), inclusive
        left = int(u_left * (grid_w - w + 1))
        window = mask[top : top + h, left : left + w]  # [h, w] view
        new = h * w - int(window.sum())
        if 0 < new <= max_new:
            window.fill_(True)
            return new
    return 0


def block_mask(
    grid_h: int,
    grid_w: int,
    num_masked: int,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BEiT block-wise masking (microsoft/unilm beit/masking_generator.py, used by data2vec vision).

    Rectangles are placed one after another: target area ~ U[min_block, min(max_block, still_needed)],
    log aspect ~ U[log(min_aspect), log(1/min_aspect)], side lengths rounded, top-left uniform; a
    rectangle is accepted if it masks between 1 and `still_needed` new cells (overlap with earlier
    rectangles allowed, only new cells count). 10 attempts per rectangle; generation stops when
    `num_masked` cells are masked or a rectangle could not be placed. The count therefore never exceeds
    `num_masked` but may fall short of it (rarely, e.g. ~1-2% of patches on average for 120 of 14x14).

    Returns: [grid_h * grid_w] bool, row-major over the patch grid, True = masked.
    """
    total = grid_h * grid_w
    if not 0 <= num_masked <= total:
        raise ValueError(f"num_masked={num_masked} must be in [0, {total}] for a {grid_h}x{grid_w} grid")
    if not 0 < min_aspect <= 1:
        raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)  # [H, W]
    count = 0
    while count < num_masked:
        max_new = min(num_masked - count, max_block)
        delta = _place_block(mask, min_block, max_new, log_aspect, generator)
        if delta == 0:
            break
        count += delta
    return mask.flatten()  # [H*W]


# --------------------------------------------------------------------------------------------- spans
def span_mask(
    length: int,
    mask_prob: float,
    span_length: int,
    min_spans: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Span masking of fairseq `compute_mask_indices` (mask_type "static", no_overlap False).

    num_spans = int(mask_prob * length / span_length + U[0,1)) (probabilistic rounding), at least
    `min_spans`; span starts are drawn uniformly without replacement from range(length - span_length);
    each span masks start .. start + span_length - 1; spans may overlap, so with mask_prob .65 and
    span 10 about 1 - (1 - .065)^10 = 49% of the steps end up masked.

    Because starts are < length - span_length, the last step is never masked and the whole sequence
    never is. Short sequences are clamped: the span shrinks to at most length - 1 steps, and at most
    (length - span) spans are drawn (one per possible start). When length <= span_length that is one
    span masking steps 0 .. length - 2; a sequence of length <= 1 gets no mask at all.

    Returns: [length] bool, True = masked.
    """
    mask = torch.zeros(length, dtype=torch.bool)  # [T]
    span = min(span_length, length - 1)
    if span <= 0:
        return mask
    num_spans = int(mask_prob * length / span_length + _uniform(generator)[0])
    num_spans = max(min_spans, num_spans)
    n_starts = length - span  # >= 1
    num_spans = min(num_spans, n_starts)
    starts = torch.randperm(n_starts, generator=generator)[:num_spans]  # [S]
    idx = starts[:, None] + torch.arange(span)[None, :]  # [S, span]
    mask[idx.flatten()] = True
    return mask


def span_mask_batch(
    lengths: list[int],
    max_len: int,
    mask_prob: float,
    span_length: int,
    min_spans: int = 1,
    *,
    same_count: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Span masks for a padded batch: row b is `span_mask(lengths[b], ...)`, positions >= lengths[b] False.

    same_count: fairseq `require_same_masks` — afterwards unmask random positions in each row until
    every row has as many masked positions as the least-masked row (so masked rows can be stacked).

    Returns: [B, max_len] bool, True = masked.
    """
    if any(n > max_len for n in lengths):
        raise ValueError(f"lengths {lengths} exceed max_len={max_len}")
    mask = torch.zeros(len(lengths), max_len, dtype=torch.bool)  # [B, T]
    for b, n in enumerate(lengths):
        mask[b, :n] = span_mask(n, mask_prob, span_length, min_spans, generator=generator)
    if same_count and len(lengths) > 0:
        target = int(mask.sum(1).min())
        for b in range(len(lengths)):
            idx = mask[b].nonzero().squeeze(1)  # [M_b]
            drop = idx[torch.randperm(len(idx), generator=generator)[target:]]
            mask[b, drop] = False
    return mask


# ---------------------------------------------------------------------------------------------- text
def mlm_mask(
    ids: torch.Tensor,
    mask_id: int,
    mask_prob: float,
    span_length: int = 1,
    min_spans: int = 0,
    leave_unmasked: float = 0.0,
    random_token: float = 0.0,
    random_ids: tuple[int, int] = (0, 1),
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM input noising of fairseq MaskTokensDataset (data2vec text, mask_multiple_length spans).

    ids: [T] one sample, <s> and </s> included (they can be masked, as in the reference).
    num_spans = int(mask_prob * T / span_length + U[0,1)) (at least min_spans, at most T); starts drawn
    uniformly without replacement from all T positions; each span covers start .. start+span_length-1,
    cut at the end of the sequence. Of the chosen positions, each independently stays unchanged with
    probability leave_unmasked, becomes a random id in [random_ids[0], random_ids[1]) with probability
    random_token, else <mask>.

    Returns (new_ids [T], target_mask [T] bool): target_mask = the positions that became <mask>, the only
    loss positions (data2vec_text.py regresses where src_tokens == <mask>, not at random/unchanged ones).
    """
    if leave_unmasked + random_token > 1:
        raise ValueError("leave_unmasked + random_token must be <= 1")
    T = len(ids)
    num = int(mask_prob * T / span_length + _uniform(generator)[0])
    num = min(max(num, min_spans), T)
    starts = torch.randperm(T, generator=generator)[:num]  # [S]
    idx = (starts[:, None] + torch.arange(span_length)[None, :]).flatten()  # [S * span]
    chosen = torch.zeros(T, dtype=torch.bool)  # [T]
    chosen[idx[idx < T]] = True
    to_mask, to_random = chosen, torch.zeros_like(chosen)
    p_other = leave_unmasked + random_token
    if p_other > 0:
        other = chosen & (torch.rand(T, generator=generator, dtype=torch.float64) < p_other)  # [T]
        if random_token == 0:
            unchanged = other
        elif leave_unmasked == 0:
            unchanged, to_random = torch.zeros_like(other), other
        else:
            keep = torch.rand(T, generator=generator, dtype=torch.float64) < leave_unmasked / p_other  # [T]
            unchanged, to_random = other & keep, other & ~keep
        to_mask = chosen & ~unchanged & ~to_random
    new_ids = ids.masked_fill(to_mask, mask_id)  # [T]
    n_rand = int(to_random.sum())
    if n_rand:
        draws = torch.randint(random_ids[0], random_ids[1], (n_rand,), generator=generator)
        new_ids[to_random] = draws.to(ids.dtype)
    return new_ids, to_mask


def bert_mask(
    ids: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    num_special: int,
    mask_prob: float = 0.15,
    replace_mask: float = 0.8,
    replace_random: float = 0.1,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (the data2vec paper's text setting) as fairseq MaskTokensDataset with span 1.

    ids: [T] one sample. int(mask_prob * T + U) positions chosen over all T (specials included); of those
    replace_mask become <mask>, replace_random a random id in [num_special, vocab_size) (keep <mask>,
    and the other specials, out of that range; it may equal the original id, as in BERT), the rest stay.
    Returns (new_ids [T], target_mask [T]) with target_mask = the <mask> positions only (data2vec_text.py).
    """
    if replace_mask + replace_random > 1:
        raise ValueError("replace_mask + replace_random must be <= 1")
    return mlm_mask(ids, mask_id, mask_prob, 1, 0, 1.0 - replace_mask - replace_random, replace_random,
                    (num_special, vocab_size), generator=generator)


def text_span_mask(
    ids: torch.Tensor,
    mask_id: int,
    mask_prob: float = 0.35,
    span_length: int = 4,
    min_spans: int = 0,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span masking for text (fairseq data2vec_text code: mask_prob .35, mask_multiple_length 4, every
    chosen position -> <mask>): `mlm_mask` without random or unchanged replacements.

    Returns (new_ids [T], target_mask [T] bool = the masked positions; may be empty for a short sample).
    """
    return mlm_mask(ids, mask_id, mask_prob, span_length, min_spans, generator=generator)
