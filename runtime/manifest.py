"""The model directory's manifest (`gpt2-onnx.json`): the one contract between export and runtime.

Export writes it; the runtime reads every dimension, file name and tensor name from it and
hard-codes none. Reading validates the whole document and lists every problem in one error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt2_onnx.runtime.errors import ModelDirError

MANIFEST_NAME = "gpt2-onnx.json"
FORMAT_NAME = "gpt2-onnx"
FORMAT_VERSION = 1

# How a variant's graph takes and returns the KV cache.
#   "concat": past_key_values.{i}.key/value [batch, n_head, past_seq, head_dim] in, present.{i}
#             [batch, n_head, past_seq + seq, head_dim] out (optimum's layout).
#   "shared": one preallocated buffer per layer [batch, n_head, n_positions, head_dim], bound as
#             both past and present and written in place (GroupQueryAttention graphs).
KV_LAYOUTS = ("concat", "shared")


@dataclass(frozen=True)
class ModelDims:
    """Architecture figures the runtime needs (all from the checkpoint's config)."""

    n_layer: int  # transformer blocks
    n_head: int  # attention heads per block
    head_dim: int  # n_embd // n_head
    n_embd: int  # hidden width
    n_positions: int  # longest sequence the position table allows
    vocab_size: int  # logits width
    bos_token_id: int
    eos_token_id: int


@dataclass(frozen=True)
class VariantIO:
    """Tensor names of one graph; `{i}` in a KV pattern stands for the layer index."""

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str = "position_ids"
    logits: str = "logits"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"
    kv_layout: str = "concat"
    # "all": logits [batch, seq, vocab]; "last": logits [batch, 1, vocab] (last position only).
    logits_rows: str = "all"
    # Extra inputs some graphs need (e.g. GroupQueryAttention's seqlens_k), name -> role.
    extra_inputs: dict[str, str] = field(default_factory=dict)

    def kv_inputs(self, n_layer: int) -> list[str]:
        """Past names in graph order: key then value, layer by layer."""
        return [n for i in range(n_layer) for n in (self.past_key.format(i=i),
                                                     self.past_value.format(i=i))]

    def kv_outputs(self, n_layer: int) -> list[str]:
        """Present names in the same order as `kv_inputs`."""
        return [n for i in range(n_layer) for n in (self.present_key.format(i=i),
                                                     self.present_value.format(i=i))]


@dataclass(frozen=True)
class Variant:
    """One precision of the model: its graph file, data files and I/O."""

    precision: str  # fp32, int8, int4, fp16
    graph: str  # file name of the .onnx graph inside the directory
    data: tuple[str, ...]  # external data files the graph references
    dtype: str  # dtype of the KV cache and logits: "float32" or "float16"
    io: VariantIO
    # Thresholds verify applies to this precision (filled from measurements; see verify).
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    source: dict[str, Any]  # {"kind": "hub"|"local"|"random-init", ...}
    dims: ModelDims
    variants: dict[str, Variant]  # precision -> variant
    files: dict[str, FileEntry]  # relative file name -> size and sha256
    tokenizer: str = "tokenizer.json"
    versions: dict[str, str] = field(default_factory=dict)
    verify: dict[str, Any] | None = None  # summary written by `verify`
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for v in doc["variants"].values():
            v["data"] = list(v["data"])
        return doc

    def write(self, model_dir: Path) -> Path:
        """Write the manifest atomically (temporary file, then rename)."""
        path = Path(model_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------------------------
# Reading and validation


def read_manifest(model_dir: str | os.PathLike[str]) -> Manifest:
    """Read and validate `gpt2-onnx.json` in `model_dir`; raise ModelDirError listing all problems.

    Checks structure, types, the format version, that every referenced file is a plain file inside
    the directory (no `..`, absolute paths or symlinks leaving it) and that its size matches. Hashes
    are checked only by `check_files` (they cost a full read of the weights).
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"{root}: not a directory. Export one with `gpt2-onnx export`.")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(
            f"{path}: missing. {root} is not a gpt2-onnx model directory; "
            "create one with `gpt2-onnx export`."
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path}: not valid JSON ({exc}). Re-export the model.") from exc
    manifest = _parse(doc, path)
    _check_paths(root, manifest, path)
    return manifest


def _parse(doc: Any, path: Path) -> Manifest:
    problems: list[str] = []

    def need(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            problems.append(f"{where}{key}: missing")
            return None
        val = obj[key]
        if isinstance(val, bool) and typ in (int, (int,)) or not isinstance(val, typ):
            tname = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            problems.append(f"{where}{key}: expected {tname}, got {type(val).__name__}")
            return None
        return val

    if not isinstance(doc, dict):
        raise ModelDirError(f"{path}: expected a JSON object. Re-export the model.")
    fmt = doc.get("format")
    version = doc.get("format_version")
    if fmt != FORMAT_NAME:
        raise ModelDirError(f"{path}: format is {fmt!r}, expected {FORMAT_NAME!r}.")
    if version != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {version!r} is not supported by this runtime "
            f"(supports {FORMAT_VERSION}). Re-export the model or install a matching gpt2-onnx."
        )

    name = need(doc, "name", str, "")
    source = need(doc, "source", dict, "")
    tokenizer = need(doc, "tokenizer", str, "")
    raw_dims = need(doc, "dims", dict, "")
    dims = None
    if raw_dims is not None:
        vals = {f: need(raw_dims, f, int, "dims.") for f in ModelDims.__dataclass_fields__}
        if all(v is not None for v in vals.values()):
            for f, v in vals.items():
                if v < 0 or (v == 0 and not f.endswith("token_id")):
                    problems.append(f"dims.{f}: must be positive, got {v}")
            dims = ModelDims(**vals)
            if dims.n_head * dims.head_dim != dims.n_embd:
                problems.append("dims: n_head * head_dim != n_embd")

    variants: dict[str, Variant] = {}
    raw_variants = need(doc, "variants", dict, "")
    if raw_variants is not None and not raw_variants:
        problems.append("variants: empty (no graph to run)")
    for prec, rv in (raw_variants or {}).items():
        w = f"variants.{prec}."
        graph = need(rv, "graph", str, w)
        data = need(rv, "data", list, w)
        dtype = need(rv, "dtype", str, w)
        raw_io = need(rv, "io", dict, w)
        thresholds = rv.get("thresholds", {}) if isinstance(rv, dict) else {}
        if data is not None and not all(isinstance(d, str) for d in data):
            problems.append(f"{w}data: expected a list of file names")
            data = None
        if dtype is not None and dtype not in ("float32", "float16"):
            problems.append(f"{w}dtype: {dtype!r} is not float32 or float16")
        io = None
        if raw_io is not None:
            known = VariantIO.__dataclass_fields__
            unknown = sorted(set(raw_io) - set(known))
            if unknown:
                problems.append(f"{w}io: unknown keys {unknown}")
            bad = [k for k, v in raw_io.items() if k in known and k != "extra_inputs"
                   and not isinstance(v, str)]
            if bad:
                problems.append(f"{w}io: {bad} must be strings")
            if not unknown and not bad:
                io = VariantIO(**raw_io)
                if io.kv_layout not in KV_LAYOUTS:
                    problems.append(f"{w}io.kv_layout: {io.kv_layout!r} not in {KV_LAYOUTS}")
                if io.logits_rows not in ("all", "last"):
                    problems.append(f"{w}io.logits_rows: {io.logits_rows!r} not all/last")
        if not isinstance(thresholds, dict):
            problems.append(f"{w}thresholds: expected an object")
            thresholds = {}
        if None not in (graph, data, dtype, io):
            variants[prec] = Variant(prec, graph, tuple(data), dtype, io, dict(thresholds))

    files: dict[str, FileEntry] = {}
    raw_files = need(doc, "files", dict, "")
    for fname, entry in (raw_files or {}).items():
        size = need(entry, "size", int, f"files.{fname}.")
        sha = need(entry, "sha256", str, f"files.{fname}.")
        if size is not None and sha is not None:
            files[fname] = FileEntry(size, sha)

    versions = doc.get("versions", {})
    if not isinstance(versions, dict):
        problems.append("versions: expected an object")
    if problems:
        raise ModelDirError(
            f"{path}: invalid manifest ({len(problems)} problem{'s' * (len(problems) > 1)}): "
            + "; ".join(problems)
            + ". Re-export the model (`gpt2-onnx export --force`)."
        )
    assert name is not None and source is not None and dims is not None and tokenizer is not None
    return Manifest(
        name=name, source=source, dims=dims, variants=variants, files=files, tokenizer=tokenizer,
        versions={str(k): str(v) for k, v in versions.items()}, verify=doc.get("verify"),
    )


def referenced_files(manifest: Manifest) -> list[str]:
    """Every file the runtime will open: the tokenizer and each variant's graph and data."""
    names = [manifest.tokenizer]
    for v in manifest.variants.values():
        names.append(v.graph)
        names.extend(v.data)
    return list(dict.fromkeys(names))


def safe_child(root: Path, name: str) -> Path | None:
    """`root/name` if it is a plain relative name that stays inside `root` (no symlink escape)."""
    if not name or os.path.isabs(name) or "\\" in name or any(p in ("..", "") for p in
                                                               Path(name).parts):
        return None
    candidate = root / name
    try:
        resolved = candidate.resolve(strict=False)
        base = root.resolve(strict=True)
    except OSError:
        return None
    if resolved != base and base not in resolved.parents:
        return None
    return candidate


def _check_paths(root: Path, manifest: Manifest, path: Path) -> None:
    problems: list[str] = []
    for name in list(referenced_files(manifest)) + list(manifest.files):
        child = safe_child(root, name)
        if child is None:
            problems.append(f"{name!r} points outside the model directory")
            continue
        if name in manifest.files or name in referenced_files(manifest):
            if not child.exists():
                problems.append(f"{name}: missing")
            elif not child.is_file():
                problems.append(f"{name}: not a regular file")
            elif name in manifest.files and child.stat().st_size != manifest.files[name].size:
                problems.append(
                    f"{name}: {child.stat().st_size} bytes, manifest says "
                    f"{manifest.files[name].size} (truncated or replaced)"
                )
    for name in referenced_files(manifest):
        if name not in manifest.files:
            problems.append(f"{name}: used by the manifest but not listed in its files")
    if problems:
        raise ModelDirError(
            f"{root}: {'; '.join(problems)}. The directory is damaged or was edited by hand; "
            "copy it again or re-export (`gpt2-onnx export --force`)."
        )


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(root: Path, names: Iterable[str]) -> dict[str, FileEntry]:
    """Size and sha256 of each named file in `root` (for writing a manifest)."""
    return {n: FileEntry((root / n).stat().st_size, sha256_file(root / n)) for n in sorted(names)}


def check_files(model_dir: str | os.PathLike[str], manifest: Manifest | None = None) -> None:
    """Verify the sha256 of every file listed in the manifest; raise naming every mismatch."""
    root = Path(model_dir)
    manifest = manifest or read_manifest(root)
    bad = [n for n, e in manifest.files.items() if sha256_file(root / n) != e.sha256]
    if bad:
        raise ModelDirError(
            f"{root}: sha256 mismatch for {', '.join(bad)}: the files changed since export. "
            "Copy the directory again or re-export (`gpt2-onnx export --force`)."
        )
