"""Bit specifications: "w4a8", "w2*a8" (bit-balanced INT2), "w4a16g128" and per-layer/role overrides.

Grammar (case-insensitive, spaces ignored):
    pair     := "w" WBITS ["*"] "a" ABITS ["g" GROUP] ["f"]
    WBITS    := 1..8 (16 = keep FP)
    ABITS    := 1..8 or 16 (16 = activations stay floating point, i.e. weight-only)
    GROUP    := weight group size along K, a multiple of 32 (default: per output channel)
    "f"      := fractional zero point: each weight group's exact [min, max] range with a zero point kept to
                2^-8 instead of an integer (a scale plus a float offset, GGUF-Q4_1 style); asymmetric weights
    spec     := pair ("," selector "=" pair)*
    selector := ROLE | LAYERS | LAYERS "." ROLE
    ROLE     := q | k | v | o | gate | up | down
    LAYERS   := N | N "-" M        (inclusive, 0-based decoder layer indices)

"*" selects bit balance, which only exists for 2-bit weights: the symmetric grid {-2,-1,0,1,2}.
Five levels need three bit-planes, so "w2*" stores and computes like W3 (reported as W2*).
Later overrides win over earlier ones; a layer+role selector beats both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BitSpecError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
# ASCII digits only, and few of them: int() of a huge or non-ASCII digit string must never be reached
_PAIR = re.compile(r"^w(\d{1,6})(\*?)a(\d{1,6})(?:g(\d{1,9}))?(f?)$", re.ASCII)
_SELECTOR = re.compile(r"^(?:(\d{1,9})(?:-(\d{1,9}))?)?(?:\.?(q|k|v|o|gate|up|down))?$", re.ASCII)
_ACCEPTED = ('accepted: "w<1-8>a<1-8|16>" with optional "*" after the weight bits for the 2-bit '
             'balanced grid, "g<group>" for per-group weights and a final "f" for fractional weight zero '
             'points, e.g. "w4a8", "w2*a8", "w4a16g128", "w4a8g32f", '
             'plus overrides like "w2a8,down=w4a8,0-2=w8a8,29.o=w4a8"')


@dataclass(frozen=True)
class BitPair:
    """Weight/activation bits of one linear. a_bits == 16 means weight-only (activations stay FP)."""

    w_bits: int
    a_bits: int
    balanced: bool = False       # INT2 grid {-2,-1,0,1,2}, stored as 3 planes
    group_size: int | None = None  # None: per output channel
    frac_zero: bool = False      # weight zero points in steps of 2^-8 over the exact [min, max] (quant.py)

    @property
    def weight_only(self) -> bool:
        return self.a_bits >= 16

    @property
    def is_fp(self) -> bool:
        return self.w_bits >= 16

    @property
    def w_planes(self) -> int:
        """Bit-planes stored and multiplied for the weights (W2* needs 3)."""
        return 3 if self.balanced else self.w_bits

    def __str__(self) -> str:
        s = f"w{self.w_bits}{'*' if self.balanced else ''}a{self.a_bits}"
        return s + (f"g{self.group_size}" if self.group_size else "") + ("f" if self.frac_zero else "")


def parse_pair(text: str) -> BitPair:
    t = str(text).strip().lower().replace(" ", "")
    m = _PAIR.match(t)
    if not m:
        raise BitSpecError(f"unknown bit string {text!r}; {_ACCEPTED}")
    w, star, a, g, frac = int(m[1]), bool(m[2]), int(m[3]), m[4], bool(m[5])
    if w == 16 and a == 16 and not star and g is None and not frac:
        return BitPair(16, 16)
    if not 1 <= w <= 8:
        raise BitSpecError(f"weight bits {w} in {text!r} are outside 1..8 (use w16a16 to keep a layer FP); {_ACCEPTED}")
    if not (1 <= a <= 8 or a == 16):
        raise BitSpecError(f"activation bits {a} in {text!r} must be 1..8 or 16 (weight-only); {_ACCEPTED}")
    if star and w != 2:
        raise BitSpecError(f"bit balance '*' in {text!r} exists only for 2-bit weights (w2*); drop the '*'")
    if star and frac:
        raise BitSpecError(f"{text!r} asks for bit balance '*' (a symmetric grid, zero point 2) and a fractional "
                           "zero point 'f' (asymmetric grids only): drop one of them")
    group = None
    if g is not None:
        group = int(g)
        if group <= 0 or group % 32:
            raise BitSpecError(f"group size {group} in {text!r} must be a positive multiple of 32 "
                               "(bit-planes pack 32 weights per word)")
    return BitPair(w, a, star, group, frac)


@dataclass(frozen=True)
class Selector:
    first: int | None
    last: int | None
    role: str | None

    def matches(self, layer: int, role: str) -> bool:
        if self.role is not None and self.role != role:
            return False
        return self.first is None or self.first <= layer <= self.last

    @property
    def specificity(self) -> int:
        return (self.first is not None) + (self.role is not None)

    def __str__(self) -> str:
        s = "" if self.first is None else (f"{self.first}" if self.first == self.last else f"{self.first}-{self.last}")
        return s + ("." if s and self.role else "") + (self.role or "")


def parse_selector(text: str) -> Selector:
    t = str(text).strip().lower().replace(" ", "")
    m = _SELECTOR.match(t)
    if not t or not m:
        raise BitSpecError(f"unknown override selector {text!r}: use a role ({', '.join(ROLES)}), "
                           'a layer "3", a range "0-2", or both "0-2.down"')
    first = int(m[1]) if m[1] is not None else None
    last = int(m[2]) if m[2] is not None else first
    if first is not None and last < first:
        raise BitSpecError(f"empty layer range in selector {text!r}: write the smaller index first")
    return Selector(first, last, m[3])


@dataclass(frozen=True)
class BitSpec:
    """A default pair plus ordered overrides; `for_linear(layer, role)` resolves one linear."""

    default: BitPair
    overrides: tuple[tuple[Selector, BitPair], ...] = ()

    def for_linear(self, layer: int, role: str) -> BitPair:
        best, best_rank = self.default, (-1, -1)
        for order, (sel, pair) in enumerate(self.overrides):
            if sel.matches(layer, role) and (sel.specificity, order) >= best_rank:
                best, best_rank = pair, (sel.specificity, order)
        return best

    def check_layers(self, n_layers: int) -> None:
        for sel, _ in self.overrides:
            if sel.last is not None and sel.last >= n_layers:
                raise BitSpecError(f"override selector '{sel}' names layer {sel.last}, but the model has "
                                   f"{n_layers} decoder layers (0..{n_layers - 1})")

    def __str__(self) -> str:
        return ",".join([str(self.default)] + [f"{s}={p}" for s, p in self.overrides])


def check_pair(pair: BitPair) -> BitPair:
    """A BitPair built in code passes the same checks as a parsed one (its string must parse back to it)."""
    if not isinstance(pair, BitPair):
        raise BitSpecError(f"expected a bit pair like 'w4a8' or BitPair(4, 8), got {type(pair).__name__}; {_ACCEPTED}")
    try:
        parsed = parse_pair(str(pair))
    except BitSpecError as e:
        raise BitSpecError(f"invalid {pair!r}: {e}") from None
    if parsed != pair:
        raise BitSpecError(f"invalid {pair!r}: bits must be ints (w 1..8 or 16, a 1..8 or 16) and group_size None "
                           "or a positive multiple of 32")
    return pair


def _check_selector(sel: Selector) -> Selector:
    if not isinstance(sel, Selector) or parse_selector(str(sel)) != sel:
        raise BitSpecError(f"invalid override selector {sel!r}: build BitSpec overrides with "
                           "parse_selector('0-2.down')")
    return sel


def parse_bits(bits: "str | BitPair | BitSpec", overrides: dict | None = None) -> BitSpec:
    """Parse "w2a8" or "w2a8,down=w4a8" (and/or a dict of overrides) into a BitSpec."""
    if isinstance(bits, BitSpec):
        ov = tuple((_check_selector(sel), check_pair(p)) for sel, p in bits.overrides)
        spec = BitSpec(check_pair(bits.default), ov)
    elif isinstance(bits, BitPair):
        spec = BitSpec(check_pair(bits))
    elif isinstance(bits, str):
        parts = [p for p in bits.replace(";", ",").split(",")]
        if not parts[0].strip():
            raise BitSpecError(f"empty bit string {bits!r}; {_ACCEPTED}")
        default = parse_pair(parts[0])
        ov = []
        for p in parts[1:]:
            if "=" not in p:
                raise BitSpecError(f"override {p!r} in {bits!r} needs the form selector=pair, e.g. down=w4a8")
            sel, pair = p.split("=", 1)
            ov.append((parse_selector(sel), parse_pair(pair)))
        spec = BitSpec(default, tuple(ov))
    else:
        raise BitSpecError(f"bits must be a string like 'w4a8', got {type(bits).__name__}; {_ACCEPTED}")
    if overrides:
        if not isinstance(overrides, dict):
            raise BitSpecError("overrides must be a dict like {'down': 'w4a8', '0-2': 'w8a8'}")
        extra = tuple((parse_selector(k), check_pair(v) if isinstance(v, BitPair) else parse_pair(v))
                      for k, v in overrides.items())
        spec = BitSpec(spec.default, spec.overrides + extra)
    return spec
