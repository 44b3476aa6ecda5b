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


def tile_weights(w_planes: torch.Tensor, group_words: int) -> torch.Tensor:
    """int32 [P, N, KW] -> int32 [ceil(N/16), G*SG, P, 32, 4] (device and dtype kept)."""
    p, n, kw = w_planes.shape
    if kw % group_words:
        raise ValueError(f"group_words {group_words} must divide the word count {kw}")
    groups, sg = kw // group_words, steps_per_group(group_words)
    nt = -(-n // 16)
    dev = w_planes.device
    padded = torch.zeros(p, nt * 16 + 1, kw + 1, dtype=torch.int32, device=dev)   # extra zero row/word
    padded[:, :n, :kw] = w_planes
    lane = torch.arange(32, device=dev)
    g, t = lane // 4, lane % 4
    row_in_tile = torch.stack([g, g + 8, g, g + 8], -1)                   # [32, 4]
    slot = torch.stack([t, t, t + 4, t + 4], -1)                          # [32, 4]
    rows = torch.arange(nt, device=dev).view(nt, 1, 1) * 16 + row_in_tile  # [NT, 32, 4]
    rows = torch.where(rows < n, rows, nt * 16)                            # padding rows -> zero row
    s = torch.arange(groups * sg, device=dev).view(-1, 1, 1)
    grp, within = s // sg, (s % sg) * 8 + slot                             # [S, 32, 4]
    words = torch.where(within < group_words, grp * group_words + within, kw)
    tiles = padded[:, rows[:, None], words[None]]                          # [P, NT, S, 32, 4]
    return tiles.permute(1, 2, 0, 3, 4).contiguous()
