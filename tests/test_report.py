"""abqc report: a report.json renders to one self-contained HTML page; absent data says "not run"."""
import json
import random
import re

import pytest

from abqc.errors import AbqcError
from abqc.report import bit_map, load_report, render, write_html

ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def synthetic_report(layers: int = 4) -> dict:
    """A report shaped like the calibration passes' (sensitivity, smoothquant, abq) plus eval and kernels."""
    rnd = random.Random(0)
    return {
        "abqc_version": "0.1.0", "bits": "w2a8,down=w4a8", "method": "abq", "model_type": "llama",
        "n_layers": layers, "model": {"name": "tiny", "source": "test"}, "seconds": 1.5,
        "eval": {"fp": {"ppl": 18.0, "windows": 8, "seqlen": 2048, "corpus": "wiki"},
                 "quantized": {"ppl": 21.6, "windows": 8, "seqlen": 2048, "corpus": "wiki"}},
        "passes": [
            {"name": "sensitivity", "summary": {}, "seconds": 0.1,
             "details": [{"layer": i, "role": r, "error": rnd.random()} for i in range(layers) for r in ROLES]},
            {"name": "smoothquant", "summary": {}, "seconds": 0.1,
             "details": [{"layer": i, "pair": "input_layernorm->q,k,v", "scale_min": 0.1, "scale_max": 4.0}
                         for i in range(layers)]},
            {"name": "abq", "summary": {"epochs": 2}, "seconds": 3.0,
             "details": [{"layer": i, "loss_curve": [1.0 / (s + 1 + i) for s in range(20)],
                          "clip_alpha": [rnd.uniform(0.7, 1) for _ in range(50)],
                          "clip_beta": [rnd.uniform(0.7, 1) for _ in range(50)],
                          "smooth_scales": [rnd.uniform(0.2, 3) for _ in range(50)]} for i in range(layers)]},
            {"name": "lower[real]", "summary": {"compression_vs_fp16": 6.1}, "seconds": 0.2,
             "details": [{"layer": 0, "role": "q", "bits": "w2a8", "shape": [64, 64], "kernel": "gemv",
                          "tile": ["gemv", 1, 1, 2]}]},
        ],
    }


def test_full_report_renders_every_section_with_plots():
    page = render(synthetic_report())
    assert page.startswith("<!DOCTYPE html>") and "not run" not in page and "could not render" not in page
    # sensitivity, bit map, clip/smooth histograms, smoothquant ranges, loss curves
    assert page.count('src="data:image/png;base64,') == 5
    assert "21.600" in page and "+20.0%" in page                  # PPL table with the change vs FP
    assert "gemv" in page                                         # kernel configs
    # self-contained: nothing fetched from elsewhere
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_empty_report_says_not_run_for_each_section():
    page = render({"passes": []})
    # overview: no model info, no passes; then PPL, sensitivity, bit map, clipping/smoothing, loss, kernels
    assert page.count("not run") == 8 and "<img" not in page


def test_malformed_rows_are_skipped_not_fatal():
    rep = synthetic_report(2)
    rep["passes"][0]["details"] += [{"layer": "x"}, "junk", {"role": "q", "error": None}]
    rep["passes"][2]["details"] = [{"layer": 0, "loss_curve": "nan", "clip_alpha": [0.9, "a", None, [0.8]]}]
    rep["eval"] = {"fp": {"ppl": None}}
    page = render(rep)
    assert page.count('src="data:image/png;base64,') == 4       # loss curve skipped, alpha histogram kept
    assert "not run: no calibration loss curves" in page and "not run: perplexity" in page


def test_bit_map_falls_back_to_the_bit_spec():
    layers, cells = bit_map({"bits": "w2a8,down=w4a8,1.q=w8a8", "n_layers": 3, "passes": []})
    assert layers == [0, 1, 2] and cells[(0, "down")] == "w4a8" and cells[(1, "q")] == "w8a8"
    assert cells[(2, "k")] == "w2a8"


def test_write_html_and_clear_errors(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps(synthetic_report(2)))
    out = write_html(tmp_path)
    assert out == tmp_path / "report.html" and "Calibration loss per block" in out.read_text()
    with pytest.raises(AbqcError, match="no report at"):
        load_report(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(AbqcError, match="not valid JSON"):
        load_report(tmp_path / "bad.json")
    with pytest.raises(AbqcError, match="JSON object"):
        render([1, 2])
