"""data2vec 2.0 mask generators: M masks per sample, precomputed in the loader (fairseq data_utils).

Convention: True = masked. Every row of one call masks the same number of steps (the student drops masked
steps, so the kept tokens of a batch must form a rectangle). All draws go through the optional
`torch.Generator`, so a seeded generator gives the same masks on every run.

- vision, `inverse_block_mask`: compute_block_mask_2d with inverse_mask=True -- square blocks of *kept*
  patches (base: 3x3, mask_prob .8, adjust .07: 196 - int(196 x .2) = 157 of 196 patches masked).
- speech, `frame_block_mask`: compute_block_mask_1d -- spans of `block` frames (base: 5, mask_prob .5, adjust .05).
- text, `random_mask`: MAE random_masking -- keep int(T x (1 - mask_prob)) uniformly chosen tokens.
"""

from __future__ import annotations

import torch


def _centres(rows: int, length: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """(rows, count) block centres, uniform over [0, length) with replacement (torch.randint in the reference)."""
    return torch.randint(0, length, (rows, count), generator=generator)


def _fix_count(marked: torch.Tensor, target: int, generator: torch.Generator | None) -> torch.Tensor:
    """Add or remove uniformly chosen cells of each row until exactly `target` are marked.

    marked: (R, L) bool, modified in place and returned. The reference draws the cells to change with
    torch.multinomial over the marked (or unmarked) cells: uniform without replacement, as here.
    """
    for row in marked:
        n = int(row.sum())
        if n == target:
            continue
        pool = row.nonzero().flatten() if n > target else (~row).nonzero().flatten()  # cells to flip
        pick = pool[torch.randperm(pool.numel(), generator=generator)[: abs(n - target)]]
        row[pick] = n < target
    return marked


def _place_blocks(
    rows: int, side: int, dims: int, fraction: float, adjust: float, block: int, generator
) -> torch.Tensor:
    """Mark blocks of `block` (per axis) cells around random centres; exactly int(L x fraction) marked per row.

    side: grid side (dims=2: side x side cells) or sequence length (dims=1). Returns (rows, L) bool.
    """
    L = side**dims
    count = int(L * ((fraction + adjust) / block**dims))  # same float order as the reference
    centre = _centres(rows, L, count, generator)  # (R, C) flat indices
    offsets = torch.arange(block) - block // 2  # block 3 -> -1, 0, 1; block 4 -> -2..1
    marked = torch.zeros(rows, L, dtype=torch.bool)
    r = torch.arange(rows)[:, None, None]  # (R, 1, 1)
    if dims == 1:
        idx = (centre[..., None] + offsets).clamp(0, L - 1)  # (R, C, block), clipped at the ends
        marked[r, idx] = True
    else:
        cy, cx = centre // side, centre % side  # (R, C)
        ys = (cy[..., None, None] + offsets[:, None]).clamp(0, side - 1)  # (R, C, block, 1)
        xs = (cx[..., None, None] + offsets[None, :]).clamp(0, side - 1)  # (R, C, 1, block)
        marked[r[..., None], ys * side + xs] = True  # (R, C, block, block) cells
    return _fix_count(marked, int(L * fraction), generator)


def inverse_block_mask(
    num: int,
    grid: int,
    mask_prob: float = 0.8,
    mask_prob_adjust: float = 0.07,
    block: int = 3,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`num` vision masks over a grid x grid patch grid -> (num, grid^2) bool, row-major, True = masked.

    Blocks of kept patches are placed (fraction 1 - mask_prob, plus mask_prob_adjust when placing), the kept
    count is fixed at int(N x (1 - mask_prob)), and the mask is the complement.
    """
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob={mask_prob} must be in (0, 1)")
    keep_fraction = 1 - mask_prob  # the reference inverts the probability first (same float rounding)
    return ~_place_blocks(num, grid, 2, keep_fraction, mask_prob_adjust, block, generator)


def frame_block_mask(
    num: int,
    frames: int,
    mask_prob: float = 0.5,
    mask_prob_adjust: float = 0.05,
    block: int = 5,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`num` speech masks over `frames` feature frames -> (num, frames) bool, exactly int(frames x mask_prob) True."""
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob={mask_prob} must be in (0, 1)")
    if frames < 2:
        raise ValueError(f"frames={frames}: too short to mask (need at least 2 feature frames)")
    return _place_blocks(num, frames, 1, mask_prob, mask_prob_adjust, block, generator)


def random_mask(
    num: int, length: int, mask_prob: float = 0.48, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """`num` text masks over `length` tokens -> (num, length) bool; int(length x (1 - mask_prob)) kept per row.

    MAE random_masking: the tokens with the smallest of `length` uniform draws are kept.
    """
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob={mask_prob} must be in (0, 1)")
    keep = int(length * (1 - mask_prob))
    order = torch.rand(num, length, generator=generator).argsort(dim=1)  # (num, L): ascending noise
    mask = torch.ones(num, length, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], False)
    return mask


def make_masks(cfg, num: int, steps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The preset's v2 masks for one sample: cfg = a Config's masking section -> (num, steps) bool.

    steps: patches (vision, a square grid), feature frames (speech) or tokens (text).
    """
    kind = cfg.kind
    if kind == "inverse_block":
        grid = int(round(steps**0.5))
        if grid * grid != steps:
            raise ValueError(f"inverse_block masking needs a square patch grid, got {steps} patches")
        return inverse_block_mask(num, grid, cfg.mask_prob, cfg.mask_prob_adjust, cfg.block, generator=generator)
    if kind == "frame_block":
        return frame_block_mask(num, steps, cfg.mask_prob, cfg.mask_prob_adjust, cfg.block, generator=generator)
    if kind == "random":
        return random_mask(num, steps, cfg.mask_prob, generator=generator)
    raise ValueError(f"masking.kind={kind!r} is not a data2vec 2.0 masking; allowed: inverse_block, frame_block, random")
