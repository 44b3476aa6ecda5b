"""Quantize the shipped model, compare perplexity, and generate text.

    python examples/quickstart.py [--bits w4a8] [--windows 2]

Runs on the CPU reference kernels; with a CUDA GPU (and `pip install -e ".[gpu]"`) the quantized
linears run the generated bit-plane kernels instead.
"""
import argparse

import torch

import abqc

ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="w4a8")
ap.add_argument("--windows", type=int, default=2, help="perplexity windows of 2048 tokens")
args = ap.parse_args()

model, tok, info = abqc.load()                       # SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)
print(f"{info.name}: {info.source}")
qmodel = abqc.compile(model, bits=args.bits)
print("rtn:", qmodel.report["passes"][0]["summary"])
print("lower:", qmodel.report["passes"][1]["summary"])

fp = abqc.evaluate(model, tok, limit=args.windows)["ppl"]
q = abqc.evaluate(qmodel, tok, limit=args.windows)["ppl"]
print(f"perplexity on {args.windows} held-out Wikipedia windows: fp {fp:.2f}, {args.bits} {q:.2f}")

if torch.cuda.is_available():
    qmodel.cuda().half()
prompt = tok("The capital of France is", return_tensors="pt").input_ids.to(next(qmodel.parameters(), torch.empty(0)).device)
out = qmodel.generate(prompt, max_new_tokens=12, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
