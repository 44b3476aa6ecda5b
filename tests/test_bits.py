import pytest

from abqc.bits import BitPair, parse_bits, parse_pair
from abqc.errors import BitSpecError


@pytest.mark.parametrize("text,expected", [
    ("w4a8", BitPair(4, 8)),
    ("W2A8", BitPair(2, 8)),
    (" w6a6 ", BitPair(6, 6)),
    ("w4a16", BitPair(4, 16)),
    ("w2*a8", BitPair(2, 8, balanced=True)),
    ("w4a16g128", BitPair(4, 16, group_size=128)),
    ("w1a1", BitPair(1, 1)),
    ("w16a16", BitPair(16, 16)),
    ("w4a8g32f", BitPair(4, 8, group_size=32, frac_zero=True)),
    ("w3a16F", BitPair(3, 16, frac_zero=True)),
])
def test_parse_pair(text, expected):
    assert parse_pair(text) == expected


def test_pair_properties():
    assert parse_pair("w4a16").weight_only and not parse_pair("w4a8").weight_only
    assert parse_pair("w2*a8").w_planes == 3 and parse_pair("w2a8").w_planes == 2
    assert str(parse_pair("w2*a8g64")) == "w2*a8g64" and str(parse_pair("w4a8g32f")) == "w4a8g32f"
    assert parse_pair("w16a16").is_fp


@pytest.mark.parametrize("bad,fragment", [
    ("w9a8", "outside 1..8"),
    ("w0a8", "outside 1..8"),
    ("w4a9", "1..8 or 16"),
    ("w4a0", "1..8 or 16"),
    ("w4*a8", "only for 2-bit"),
    ("w4a8g48", "multiple of 32"),
    ("w2*a8f", "drop one of them"),
    ("w4a8fg32", "unknown bit string"),
    ("int4", "unknown bit string"),
    ("w4", "unknown bit string"),
    ("", "empty bit string"),
    ("w4a8,down", "selector=pair"),
    ("w4a8,foo=w8a8", "unknown override selector"),
    ("w4a8,5-2=w8a8", "empty layer range"),
    ("w4a8,down=w3", "unknown bit string"),
])
def test_bad_specs_name_the_problem(bad, fragment):
    with pytest.raises(BitSpecError, match=fragment) as e:
        parse_bits(bad)
    msg = str(e.value)
    # the message quotes the offending input and says what to do instead
    assert repr(bad) in msg or repr(bad.split(",")[-1].split("=")[0]) in msg or repr(bad.split("=")[-1]) in msg
    assert any(w in msg for w in ("accepted", "use", "write", "form", "drop", "must"))


def test_overrides_resolution():
    spec = parse_bits("w2a8,down=w4a8,0-2=w8a8,1.down=w6a6")
    assert spec.for_linear(10, "q") == BitPair(2, 8)
    assert spec.for_linear(10, "down") == BitPair(4, 8)
    assert spec.for_linear(0, "q") == BitPair(8, 8)
    assert spec.for_linear(2, "down") == BitPair(8, 8)   # later override of equal specificity wins
    assert spec.for_linear(1, "down") == BitPair(6, 6)   # layer+role beats layer or role alone
    assert str(spec) == "w2a8,down=w4a8,0-2=w8a8,1.down=w6a6"


def test_dict_overrides_and_layer_check():
    spec = parse_bits("w4a4", {"o": "w8a8", "3": "w16a16"})
    assert spec.for_linear(0, "o") == BitPair(8, 8)
    assert spec.for_linear(3, "q").is_fp
    spec.check_layers(4)
    with pytest.raises(BitSpecError, match="has 3 decoder layers"):
        spec.check_layers(3)
    with pytest.raises(BitSpecError):
        parse_bits(42)
