import math

import pytest
import torch

from abqc import data, perplexity as evaluate
from abqc.errors import DataError
from conftest import tiny_model


def test_wiki_split_is_deterministic_and_disjoint():
    docs = data.documents("wiki")
    assert len(docs) == 2349 and not any("<doc" in d or "</doc>" in d for d in docs[:50])
    calib, ev = data.split_text("wiki", "calib"), data.split_text("wiki", "eval")
    assert calib == data.split_text("wiki", "calib")
    cal_docs, ev_docs = set(calib.split("\n\n")), set(ev.split("\n\n"))
    assert not ({d for d in docs[4::5]} & {d for i, d in enumerate(docs) if i % 5 != 4} - ev_docs)
    assert ev.startswith(docs[4]) and calib.startswith(docs[0])
    assert 0.15 < len(ev) / (len(ev) + len(calib)) < 0.25
    assert docs[4] not in cal_docs


def test_c4_and_unknown_corpus(tmp_path):
    assert len(data.documents("c4")) > 100
    with pytest.raises(DataError, match="unknown corpus 'wikitext2'"):
        data.corpus_file("wikitext2")
    f = tmp_path / "t.txt"
    f.write_text("a\nb\nc\nd\ne\n")
    assert data.split_text(str(f), "eval") == "e"


class ByteTok:
    """Tokenizer stub for tests: one token per byte."""

    def __call__(self, text, return_tensors=None):
        class R:
            pass
        r = R()
        r.input_ids = torch.tensor([list(text.encode()[:3000])]) % 256
        return r


def test_calibration_samples():
    s = data.calibration_samples(ByteTok(), n=4, seqlen=64, seed=3)
    assert s.shape == (4, 64) and s.dtype == torch.int64
    assert torch.equal(s, data.calibration_samples(ByteTok(), n=4, seqlen=64, seed=3))
    assert not torch.equal(s, data.calibration_samples(ByteTok(), n=4, seqlen=64, seed=4))
    with pytest.raises(DataError, match="fewer than one window"):
        data.calibration_samples(ByteTok(), n=1, seqlen=10_000)
    with pytest.raises(DataError, match="at least one sample"):
        data.calibration_samples(ByteTok(), n=0, seqlen=16)


def test_perplexity_protocol_matches_manual():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (100,))
    res = evaluate.perplexity(model, ids=ids, seqlen=32, progress=False)
    assert res["windows"] == 3 and res["tokens"] == 3 * 31          # remainder dropped, windows disjoint
    total = 0.0
    with torch.no_grad():
        for w in range(3):
            x = ids[w * 32:(w + 1) * 32]
            logits = model(x[None]).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
    assert math.isclose(res["ppl"], math.exp(total / 93), rel_tol=1e-5)
    assert evaluate.perplexity(model, ids=ids, seqlen=32, limit=1, progress=False)["windows"] == 1


def test_perplexity_errors():
    model = tiny_model("llama")
    with pytest.raises(DataError, match="exceeds the model's maximum of 128"):
        evaluate.perplexity(model, ids=torch.zeros(1000, dtype=torch.long), seqlen=256, progress=False)
    with pytest.raises(DataError, match="fewer than one window"):
        evaluate.perplexity(model, ids=torch.zeros(10, dtype=torch.long), seqlen=32, progress=False)
