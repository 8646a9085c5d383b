"""`python -m gpt2_onnx.cli` = `gpt2-onnx`."""

from gpt2_onnx.cli.main import main

main()
