"""GPU weight layout: canonical bit-planes [P, N, KW] -> MMA-fragment tiles.

Tile order [N/16][S][P][32 lanes][4 words], S = G * SG steps of 256 bits (SG = ceil(group_words / 8)
steps per K group; words past a group's end are zero so a step never mixes groups). Lane (g, t) of
the m16n8k256 A fragment holds rows g and g+8 of the 16-channel tile, words t and t+4 of the step:
  [row g, word t], [row g+8, word t], [row g, word t+4], [row g+8, word t+4]
so one 16-byte load per lane and plane fetches a whole fragment, 512 contiguous bytes per warp.
"""
from __future__ import annotations

import torch


def steps_per_group(group_words: int) -> int:
    return -(-group_words // 8)


def _fragment_index(n: int, kw: int, group_words: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [NT, 32, 4], words [S, 32, 4]): where each tile slot lives in the canonical [N, KW] planes;
    padding slots point at row NT*16 / word KW (one extra zero row and word)."""
    if kw % group_words:
        raise ValueError(f"group_words {group_words} must divide the word count {kw}")
    groups, sg, nt = kw // group_words, steps_per_group(group_words), -(-n // 16)
    lane = torch.arange(32, device=device)
    g, t = lane // 4, lane % 4
    row_in_tile = torch.stack([g, g + 8, g, g + 8], -1)                   # [32, 4]
    slot = torch.stack([t, t, t + 4, t + 4], -1)                          # [32, 4]
    rows = torch.arange(nt, device=device).view(nt, 1, 1) * 16 + row_in_tile  # [NT, 32, 4]
    rows = torch.where(rows < n, rows, nt * 16)                            # padding rows -> zero row
    s = torch.arange(groups * sg, device=device).view(-1, 1, 1)
    grp, within = s // sg, (s % sg) * 8 + slot                             # [S, 32, 4]
    words = torch.where(within < group_words, grp * group_words + within, kw)
    return rows, words


def tile_weights(w_planes: torch.Tensor, group_words: int) -> torch.Tensor:
    """int32 [P, N, KW] -> int32 [ceil(N/16), G*SG, P, 32, 4] (device and dtype kept)."""
    p, n, kw = w_planes.shape
    rows, words = _fragment_index(n, kw, group_words, w_planes.device)
    padded = torch.zeros(p, rows.shape[0] * 16 + 1, kw + 1, dtype=torch.int32, device=w_planes.device)
    padded[:, :n, :kw] = w_planes
    tiles = padded[:, rows[:, None], words[None]]                          # [P, NT, S, 32, 4]
    return tiles.permute(1, 2, 0, 3, 4).contiguous()


def untile_weights(tiles: torch.Tensor, n: int, kw: int, group_words: int) -> torch.Tensor:
    """The inverse of tile_weights: int32 [ceil(N/16), G*SG, P, 32, 4] -> [P, N, KW]."""
    nt, steps, p = tiles.shape[:3]
    rows, words = _fragment_index(n, kw, group_words, tiles.device)
    if (nt, steps) != (rows.shape[0], words.shape[0]):
        raise ValueError(f"tiles {tuple(tiles.shape)} do not hold N={n}, KW={kw}, group_words={group_words}")
    out = torch.zeros(p, nt * 16 + 1, kw + 1, dtype=tiles.dtype, device=tiles.device)
    out[:, rows[:, None], words[None]] = tiles.permute(2, 0, 1, 3, 4)     # padding slots land in the extras
    return out[:, :n, :kw].contiguous()


def byte_codes(u: torch.Tensor, steps: int) -> torch.Tensor:
    """Activation codes [M, K] (0..255) -> uint8 [8*steps, roundup(M, 8), 32], the wgmma8 family's activation
    layout (what quant_u8 writes on the GPU; zero past K and in rows >= M here). Per 256-wide K step s the
    code of k = 256s + 128h + 32t + 8e + c goes to chunk 8s + c, byte 16h + 4t + e of its token row (the K
    order in which a tiled weight word's bit 8e + c is byte e of MMA chunk c), and each chunk's rows are in
    the MMA's core-matrix order: 8-row groups of [half h][row][16 bytes]."""
    m, k = u.shape
    if k > steps * 256:
        raise ValueError(f"{k} codes per row do not fit {steps} steps of 256")
    mp = -(-m // 8) * 8
    full = torch.zeros(mp, steps * 256, dtype=torch.uint8, device=u.device)
    full[:m, :k] = u.to(torch.uint8)
    x = full.view(mp // 8, 8, steps, 2, 4, 4, 8)            # [mg, mr, s, h, t, e, c]
    x = x.permute(2, 6, 0, 3, 1, 4, 5)                       # [s, c, mg, h, mr, t, e]
    return x.reshape(steps * 8, mp, 32).contiguous()
