"""gpt2_onnx.export: GPT-2 checkpoint -> verified ONNX model directory (needs the export extra:
torch, transformers, optimum-onnx). Heavy imports happen inside functions."""
