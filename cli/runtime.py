"""The runtime's commands of `gpt2-onnx`: generate, score, tokenize, decode, info and bench.

Each adapts its arguments to a typed library function (gpt2_onnx.runtime) and leaves errors to
`call`. Without onnxruntime (`pip install gpt2-onnx` alone) `--help`, `info`, `tokenize` and
`decode` work; generation names the extra to add.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpt2_onnx.cli.common import (
    DEVICE_HELP,
    PRECISION_HELP,
    app,
    call,
    err,
    fail,
    interrupt_code,
)


@app.command()
def generate(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `gpt2-onnx export`.")],
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.")],
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    greedy: Annotated[bool, typer.Option(help="Pick the most likely token each step.")] = False,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens.")] = 50,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature (0 = greedy).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="CTRL penalty (1 = none).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed: same seed, same tokens.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text (repeatable).")]
    = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [physical cores].")] = None,
    show_top: Annotated[int, typer.Option(help="Show the top N candidates at each step.")] = 0,
    fast_load: Annotated[bool, typer.Option(
        help="Skip weight prepacking: faster load, less memory, fp32 variants only.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")]
    = False,
) -> None:
    """Generate text; streams to stdout, timings to stderr."""
    from gpt2_onnx.runtime.generator import TextGenerator

    gen = call(TextGenerator.load, model_dir, device=device, precision=precision,
               threads=threads, fast_load=fast_load)
    # The options as one GenerationParams, checked here (a bad one: one line naming it).
    params = call(gen.params, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                  top_p=top_p, temperature=temperature, repetition_penalty=repetition_penalty,
                  seed=seed, stop=stop or None, show_top=show_top)
    if json_out or show_top:
        results = call(gen.generate, list(prompts), params=params)
        for res in results:
            if show_top:
                _print_steps(res)
            if json_out:
                sys.stdout.write(json.dumps(_result_json(res), ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(res.prompt + res.text + "\n")
            _print_timings(res.timings, len(res.ids))
        return
    # Every prompt and setting is checked before the first one prints anything.
    call(gen.validate, list(prompts), params=params)
    for prompt in prompts:
        streamed: list[str] = []
        pieces = call(gen.stream, prompt, params=params)
        try:
            sys.stdout.write(prompt)
            sys.stdout.flush()
            start = time.perf_counter()
            for piece in pieces:
                streamed.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep what was streamed
            sys.stdout.write("\n")
            sys.stdout.flush()
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(interrupt_code(exc)) from None
        sys.stdout.write("\n")
        elapsed = time.perf_counter() - start
        err.print(f"[dim]{len(''.join(streamed))} chars in {elapsed:.2f} s[/]")


def _result_json(res: Any) -> dict[str, Any]:
    doc = {"prompt": res.prompt, "prompt_ids": res.prompt_ids, "ids": res.ids, "text": res.text,
           "finish_reason": res.finish_reason, "timings": asdict(res.timings)}
    if res.steps:
        doc["steps"] = [asdict(s) for s in res.steps]
    return doc


def _print_timings(t: Any, n: int) -> None:
    err.print(f"[dim]{n} tokens; prefill {t.prefill_ms:.1f} ms; "
              f"decode {t.decode_tokens_per_s:.2f} tok/s[/]")


def _print_steps(res: Any) -> None:
    # Token texts are data, not markup ("[/" is a token): escape every cell.
    table = Table(title=escape(f"top candidates: {res.prompt!r}"), show_lines=False)
    table.add_column("step", justify="right")
    table.add_column("candidates (probability)")
    table.add_column("chosen")
    for s in res.steps:
        cands = "  ".join(f"{c.text!r} {c.prob:.3f}" for c in s.candidates)
        table.add_row(str(s.step), escape(cands), escape(f"{s.chosen.text!r} {s.chosen.prob:.3f}"))
    err.print(table)


# --------------------------------------------------------------------------- score


@app.command()
def score(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `gpt2-onnx export`.")],
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files; each is one text.")],
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    stride: Annotated[int | None, typer.Option(
        help="Window step for texts longer than the context [half the context].")] = None,
    bos: Annotated[bool, typer.Option(
        help="Score every token (<|endoftext|> put first); --no-bos skips the first.")] = True,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads [physical cores].")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per file, then "
                                           "the total.")] = False,
) -> None:
    """Perplexity of each FILE under the model: tokens, perplexity, tokens/s (stdout)."""
    from gpt2_onnx.runtime.generator import TextGenerator
    from gpt2_onnx.runtime.scoring import perplexity

    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"{f}: cannot read it as UTF-8 text ({exc})")
    gen = call(TextGenerator.load, model_dir, device=device, precision=precision,
               threads=threads)
    start = time.perf_counter()
    scores = call(gen.score, texts, batch_size=batch_size, add_bos=bos, stride=stride)
    elapsed = time.perf_counter() - start
    n_tokens = sum(s.n_tokens for s in scores)
    rate = n_tokens / elapsed if elapsed > 0 else 0.0
    total_ppl = perplexity(scores) if n_tokens else float("nan")
    if json_out:
        # Strict JSON: no NaN. An empty text has no perplexity: null and the reason.
        for f, s in zip(files, scores, strict=True):
            sys.stdout.write(json.dumps({"file": str(f), "tokens": s.n_tokens,
                                         "total_logprob": s.total_logprob,
                                         **_perplexity_json(s.perplexity, s.n_tokens)},
                                        allow_nan=False) + "\n")
        sys.stdout.write(json.dumps({"total": True, "tokens": n_tokens,
                                     **_perplexity_json(total_ppl, n_tokens),
                                     "seconds": elapsed, "tokens_per_s": rate,
                                     "precision": gen.precision}, allow_nan=False) + "\n")
        return
    table = Table(title=escape(f"{model_dir} ({gen.precision}, {gen.device})"))
    table.add_column("file")
    table.add_column("tokens", justify="right")
    table.add_column("perplexity", justify="right")
    for f, s in zip(files, scores, strict=True):
        table.add_row(escape(str(f)), str(s.n_tokens), f"{s.perplexity:.3f}")
    if len(files) > 1:
        table.add_row("[bold]all[/]", str(n_tokens), f"{total_ppl:.3f}")
    Console().print(table)
    err.print(f"[dim]{n_tokens} tokens in {elapsed:.2f} s ({rate:.0f} tokens/s)[/]")


def _perplexity_json(value: float, n_tokens: int) -> dict[str, Any]:
    if n_tokens:
        return {"perplexity": value}
    return {"perplexity": None, "note": "no tokens scored (empty text): perplexity undefined"}


# --------------------------------------------------------------------------- tokens and info


def _tokenizer_only(model_dir: Path) -> Any:
    from gpt2_onnx.runtime.generator import load_tokenizer
    from gpt2_onnx.runtime.manifest import read_manifest

    manifest = call(read_manifest, model_dir)
    return call(load_tokenizer, model_dir / manifest.tokenizer, manifest.dims.vocab_size), manifest


@app.command()
def tokenize(model_dir: Path, text: str) -> None:
    """Print the token ids of TEXT as a JSON list."""
    from gpt2_onnx.runtime.generator import encode_text

    tok, _ = _tokenizer_only(model_dir)
    sys.stdout.write(json.dumps(call(encode_text, tok, text, "text")) + "\n")


@app.command()
def decode(model_dir: Path, ids: list[int]) -> None:
    """Print the text of token IDS."""
    tok, manifest = _tokenizer_only(model_dir)
    bad = [i for i in ids if not 0 <= i < manifest.dims.vocab_size]
    if bad:
        fail(f"ids {bad[:5]} are outside [0, {manifest.dims.vocab_size - 1}]")
    sys.stdout.write(tok.decode(ids, skip_special_tokens=False) + "\n")


@app.command()
def info(
    model_dir: Path,
    check_files: Annotated[bool, typer.Option(
        "--check-files", help="Verify every file's sha256 against the manifest.")] = False,
) -> None:
    """Show the manifest: source, dims, variants, files, versions, verify summary."""
    from gpt2_onnx.runtime import manifest as mf

    m = call(mf.read_manifest, model_dir)
    table = Table(title=escape(str(model_dir)), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("source", escape(json.dumps(m.source)))
    d = m.dims
    table.add_row("dims", f"{d.n_layer} layers, {d.n_head} heads x {d.head_dim}, width "
                  f"{d.n_embd}, {d.n_positions} positions, vocab {d.vocab_size}")
    for p, v in m.variants.items():
        size = sum(m.files[f].size for f in (v.graph, *v.data) if f in m.files)
        table.add_row(escape(f"variant {p}"), escape(f"{v.graph} ({size / 1e6:.1f} MB, "
                                                      f"{v.dtype}, kv {v.io.kv_layout})"))
    if m.genai:
        table.add_row("onnxruntime-genai", escape(f"{m.genai['config']} runs {m.genai['variant']} "
                                                  f"({m.genai['graph']})"))
    table.add_row("files", escape(", ".join(f"{n} {e.size / 1e6:.1f} MB"
                                            for n, e in m.files.items())))
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    if m.verify:
        status = "passed" if m.verify.get("passed") else "FAILED"
        table.add_row("verify", escape(f"{status}: " + "; ".join(
            f"{c.get('variant')} {c.get('check')} {c.get('figure')}"
            for c in m.verify.get("checks", []))))
    else:
        table.add_row("verify", "not run")
    Console().print(table)
    if check_files:
        call(mf.check_files, model_dir, m)
        err.print(f"[green]all {len(m.files)} files match their sha256[/]")


@app.command()
def bench(
    model_dir: Annotated[Path, typer.Argument(help="Model directory from `gpt2-onnx export`.")],
    precision: Annotated[str | None,
                         typer.Option(help=PRECISION_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores).")]
    = None,
    contexts: Annotated[str | None, typer.Option(
        help="Prompt lengths of the decode figures, comma-separated [8, n_positions/4, "
        "~0.88 n_positions: 8,256,900 for 1024 positions].")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per decode figure.")] = 32,
    batch: Annotated[int, typer.Option(help="Rows of the batch-throughput figure.")] = 8,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt of the time-to-first-token "
                                                    "figure.")] = 512,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full result as JSON.")]
    = False,
) -> None:
    """Measure this machine: decode tok/s, time to first token, batch throughput, load, memory."""
    from gpt2_onnx.runtime.device import import_onnxruntime

    call(import_onnxruntime)  # the extra to add, before the bench module imports onnxruntime
    from gpt2_onnx.runtime.bench import bench_model, summary_rows

    try:
        lengths = (None if contexts is None else
                   tuple(int(c) for c in contexts.split(",") if c.strip()))
    except ValueError:
        fail(f"--contexts {contexts!r}: give comma-separated integers, e.g. 8,256,900")
    err.print("[dim]measuring: synthetic prompts, greedy; several prefills and decodes[/]")
    result = call(bench_model, model_dir, precision=precision, device=device, threads=threads,
                  contexts=lengths, new_tokens=new_tokens, batch=batch,
                  prompt_tokens=prompt_tokens)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=escape(f"gpt2-onnx bench {model_dir}"), show_header=False)
    table.add_column("figure", style="bold")
    table.add_column("value")
    for name, value in summary_rows(result):
        table.add_row(escape(name), escape(value))
    Console().print(table)
