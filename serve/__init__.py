"""gpt2_onnx.serve: an OpenAI-compatible HTTP server on the runtime's continuous-batching engine.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client): `pip install "gpt2-onnx[serve]"`.
This package imports the runtime; the runtime never imports it. Nothing is imported here, so
`gpt2_onnx.cli.serve` loads (and gives the install hint) without the extra:

    from gpt2_onnx.serve.app import create_app      # a FastAPI app over a started Engine
    from gpt2_onnx.serve.routes import build_router  # the routes alone, for another host
"""
