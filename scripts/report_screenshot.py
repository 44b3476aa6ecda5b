"""Render a compile report to HTML and screenshot the page in headless Chromium (a visual check).

    python scripts/report_screenshot.py DIR [--png docs/report.png]     # DIR holds report.json
    python scripts/report_screenshot.py --demo [--png docs/report.png]  # compile a tiny random Llama with
                                                                        # method abq first (real pass output)
Needs chromium on PATH (apt-get install -y chromium).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def demo_report(directory: Path) -> Path:
    """Compile a tiny random Llama with the abq method on the shipped corpus; write its report.json."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import abqc
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = abqc.compile(model, bits="w2a8,down=w4a8", method="abq", calib=calib, calib_options={"epochs": 3},
                     progress=False)
    q.report["model"] = {"name": "tiny random Llama (4 layers)", "source": "scripts/report_screenshot.py --demo"}
    return q.write_report(directory)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 3400) -> Path:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png.resolve()}", html.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", help="folder with report.json")
    ap.add_argument("--demo", action="store_true", help="compile a tiny model with method abq and use its report")
    ap.add_argument("--png", default="docs/report.png", help="screenshot file (default docs/report.png)")
    args = ap.parse_args(argv)
    from abqc.report import write_html
    if not args.dir and not args.demo:
        ap.error("give DIR or --demo")
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="abqc-report-"))
    if args.demo:
        demo_report(directory)
    html = write_html(directory)
    print(f"page: {html}\nscreenshot: {screenshot(html, Path(args.png))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
