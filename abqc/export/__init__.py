"""Export of compiled models: ONNX (abqc.export.onnx) and the optimised FX graph of a block (abqc.export.graph).

Import the submodules directly; onnx, onnxscript and onnxruntime are only needed by abqc.export.onnx.
"""
