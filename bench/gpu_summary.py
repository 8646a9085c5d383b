"""The GPU check's one table: verify verdicts and benchmark rows side by side.

    python bench/gpu_summary.py OUT [--mode full|dry]

Reads OUT/steps.tsv (written by bench/gpu_check.sh), OUT/verify.json (`gpt2-onnx verify
--report`) and OUT/gpu-bench.json (bench/gpu_bench.py); writes OUT/gpu-check.json (all of it)
and OUT/gpu-check.md, and prints the markdown: one line of step results, then one table with a
row per engine, precision and shape (verify's verdict and worst logits difference for the
gpt2-onnx rows, speed against PyTorch at the same precision and shape).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# The PyTorch row a gpt2-onnx precision is compared with.
TORCH_PEER = {"fp32": "fp32", "fp16": "fp16", "fp16-fused": "fp16"}


def read_steps(out: Path) -> list[dict[str, Any]]:
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        rows.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
    return rows


def verify_by_variant(doc: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """precision -> {passed, failed checks, worst max abs logit difference}."""
    if not doc:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for c in doc["checks"]:
        v = out.setdefault(c["variant"], {"passed": True, "failed": [], "max_abs": 0.0})
        counts = c.get("status", "pass") != "not run" or c["check"] != "top-k-sampling"
        if counts and not c["passed"]:
            v["passed"] = False
            v["failed"].append(c["check"] + (" (not run)" if c.get("status") == "not run"
                                             else ""))
        v["max_abs"] = max(v["max_abs"], c["values"].get("max_abs", 0.0))
    return out


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(out: Path, mode: str) -> dict[str, Any]:
    steps = read_steps(out)
    verify = verify_by_variant(_load(out / "verify.json"))
    bench = _load(out / "gpu-bench.json") or {"rows": []}
    torch = {(r["precision"], r["batch"], r["context"]): r for r in bench["rows"]
             if r["engine"] == "torch"}
    rows = []
    for r in bench["rows"]:
        row = dict(r)
        if r["engine"] == "gpt2-onnx":
            v = verify.get(r["precision"])
            row["verify"] = None if v is None else v["passed"]
            row["verify_failed"] = [] if v is None else v["failed"]
            row["verify_max_abs"] = None if v is None else v["max_abs"]
            peer = torch.get((TORCH_PEER.get(r["precision"], ""), r["batch"], r["context"]))
            row["vs_torch"] = (r["decode_tok_s"] / peer["decode_tok_s"]) if peer else None
        rows.append(row)
    benched = {r["precision"] for r in bench["rows"] if r["engine"] == "gpt2-onnx"}
    for precision, v in verify.items():  # verified but not benchmarked: still one row
        if precision not in benched:
            rows.append({"engine": "gpt2-onnx", "precision": precision, "verify": v["passed"],
                         "verify_failed": v["failed"], "verify_max_abs": v["max_abs"]})
    return {"mode": mode, "device_name": bench.get("device_name"),
            "onnxruntime": bench.get("onnxruntime"), "model": bench.get("model"),
            "steps": steps, "failed_steps": [s["step"] for s in steps if s["rc"] != 0],
            "verify": verify, "rows": rows, "goals": bench.get("goals", [])}


def _num(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(doc: dict[str, Any]) -> str:
    steps = ", ".join(f"{s['step']} {'ok' if s['rc'] == 0 else 'FAILED rc=' + str(s['rc'])} "
                      f"({s['seconds']} s)" for s in doc["steps"]) or "no steps recorded"
    lines = [f"GPU check ({doc['mode']}): {doc['model']} on {doc['device_name']}, onnxruntime "
             f"{doc['onnxruntime']}", f"steps: {steps}", "",
             "| engine | precision | verify | max abs logit diff | batch | context | TTFT ms "
             "| tok/s per row | tok/s all rows | decode vs torch |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in doc["rows"]:
        verdict = "-"
        if r.get("verify") is not None:
            verdict = "pass" if r["verify"] else "FAIL: " + ", ".join(r["verify_failed"])
        elif r["engine"] == "gpt2-onnx":
            verdict = "not run"
        lines.append(
            f"| {r['engine']} | {r['precision']} | {verdict} | "
            f"{_num(r.get('verify_max_abs'), '.2e')} | {_num(r.get('batch'), 'd')} | "
            f"{_num(r.get('context'), 'd')} | {_num(r.get('ttft_ms'), '.1f')} | "
            f"{_num(r.get('decode_tok_s'), '.1f')} | {_num(r.get('throughput_tok_s'), '.1f')} | "
            f"{_num(r.get('vs_torch'), '.2f')}{'x' if r.get('vs_torch') else ''} |")
    goals = "; ".join(f"{g['goal']}: {_num(g['figure'], '.2f')} "
                      f"({'met' if g['passed'] else 'not met'})" for g in doc["goals"])
    if goals:
        lines += ["", f"goals: {goals}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mode", default="full", choices=("full", "dry"))
    args = ap.parse_args(argv)
    doc = summarize(args.out, args.mode)
    text = markdown(doc)
    (args.out / "gpu-check.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
