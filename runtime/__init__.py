"""gpt2_onnx.runtime: torch-free GPT-2 generation on onnxruntime (imports only onnxruntime,
tokenizers and numpy)."""
