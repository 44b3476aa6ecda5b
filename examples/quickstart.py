"""Quantize the shipped model, compare perplexity, and generate text.

    python examples/quickstart.py [--bits w4a8] [--method abq] [--windows 2]

Calibrates with the reference recipe (128 x 2048 tokens, 20 epochs) on a GPU and with a small one
(8 x 512 tokens, 2 epochs) on a CPU, where the full recipe would take hours.

Runs on the CPU reference kernels; with a CUDA GPU (and `pip install -e ".[gpu]"`) the quantized
linears run the generated bit-plane kernels instead.
"""
import argparse

import torch

import abqc

ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="w4a8")
ap.add_argument("--method", default="abq", choices=["abq", "lwc-mse", "smoothquant", "rtn"])
ap.add_argument("--windows", type=int, default=2, help="perplexity windows of 2048 tokens")
args = ap.parse_args()

model, tok, info = abqc.load()                       # SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)
print(f"{info.name}: {info.source}")
gpu = torch.cuda.is_available()
calib = abqc.data.calibration_samples(tok, 128 if gpu else 8, 2048 if gpu else 512)
small = {"epochs": 2, "epochs_2bit": 4, "batch": 4, "lr_clip": 5e-2, "lr_smooth": 1e-2}
qmodel = abqc.compile(model, bits=args.bits, method=args.method, calib=calib, calib_options=None if gpu else small)
for p in qmodel.report["passes"]:
    print(f"{p['name']}: {p['seconds']} s", {k: v for k, v in p["summary"].items() if not isinstance(v, (dict, list))})

fp = abqc.evaluate(model, tok, limit=args.windows)["ppl"]
q = abqc.evaluate(qmodel, tok, limit=args.windows)["ppl"]
print(f"perplexity on {args.windows} held-out Wikipedia windows: fp {fp:.2f}, {args.bits} {q:.2f}")

if torch.cuda.is_available():
    qmodel.cuda().half()
prompt = tok("The capital of France is", return_tensors="pt").input_ids.to(next(qmodel.parameters(), torch.empty(0)).device)
out = qmodel.generate(prompt, max_new_tokens=12, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
