"""The `gpt2-onnx` command line: the package's top layer, which nothing else imports.

`gpt2_onnx.cli.main` holds the entry point; the commands live beside it by the layer they
drive (runtime, export, serve) and share `gpt2_onnx.cli.common`.
"""

from gpt2_onnx.cli.main import app, main

__all__ = ["app", "main"]
