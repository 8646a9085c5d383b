"""The model directory's manifest (`gpt2-onnx.json`): the one contract between export and runtime.

Export writes it; the runtime reads every dimension, file name and tensor name from it and
hard-codes none. Reading validates the whole document and lists every problem in one error.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt2_onnx.runtime.errors import ModelDirError
from gpt2_onnx.runtime.variants import KV_LAYOUTS

MANIFEST_NAME = "gpt2-onnx.json"
FORMAT_NAME = "gpt2-onnx"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few kB; refuse to parse giant files
MAX_DIM = 1 << 24  # no GPT-2 dimension comes near this; larger values are edits or damage
_SHA256 = re.compile(r"[0-9a-f]{64}")

# KV_LAYOUTS (how a graph takes and returns the KV cache) is defined with the variant registry;
# export writes a variant's layout into its io, and the runtime asks `Variant.shared_kv`.


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
    # Optional output holding only the last position's logits [batch, vocab]: what sampling
    # needs, so prefill brings [batch, vocab] to the host instead of [batch, seq, vocab].
    # "" when the graph has none (older exports).
    logits_last: str = ""
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

    @property
    def shared_kv(self) -> bool:
        """True when the graph keeps its KV cache in preallocated buffers written in place
        (kv_layout "shared": GroupQueryAttention graphs). The runtime's one answer to "is this
        variant shared-KV?" (decoder choice, the engine, CUDA refusal, scoring, the server):
        read from the manifest, which records what the graph was built as."""
        return self.io.kv_layout == "shared"


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
    # What export wrote for onnxruntime-genai: {"variant", "config", "graph"}; None if nothing
    # (the runtime never reads those files; `files` lists and hashes them).
    genai: dict[str, str] | None = None
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
        text = json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())  # the rename must not expose an empty file after a crash
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path


# ---------------------------------------------------------------------------------------------
# Reading and validation


def read_manifest(model_dir: str | os.PathLike[str], *, check_graphs: bool = True) -> Manifest:
    """Read and validate `gpt2-onnx.json` in `model_dir`; raise ModelDirError listing all problems.

    Checks structure, types, the format version, that every referenced file is a plain file inside
    the directory (no `..`, absolute paths or symlinks leaving it) and that its size matches. With
    `check_graphs`, each variant's graph is scanned (weights skipped, nothing handed to
    onnxruntime) to prove it references only the external data files its variant lists. Hashes
    are checked only by `check_files` (they cost a full read of the weights).
    """
    root = Path(model_dir)
    if not root.exists():
        raise ModelDirError(f"{root}: no such directory. Export one with `gpt2-onnx export` or "
                            "check the path.")
    if not root.is_dir():
        raise ModelDirError(f"{root}: not a directory (a file). Give the model directory "
                            "`gpt2-onnx export` wrote.")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelDirError(
            f"{path}: missing. {root} is not a gpt2-onnx model directory; "
            "create one with `gpt2-onnx export`."
        )
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ModelDirError(f"{path}: {path.stat().st_size} bytes, far too large for a "
                                "manifest. Re-export the model.")
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelDirError(f"{path}: cannot be read ({exc.strerror or exc}). Check its "
                            "permissions or copy the model directory again.") from exc
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python's 4300-digit limit.
        raise ModelDirError(f"{path}: not valid JSON ({str(exc)[:200]}). Re-export the model "
                            "(`gpt2-onnx export --force`).") from exc
    manifest = _parse(doc, path)
    _check_paths(root, manifest, path)
    if check_graphs:
        for variant in manifest.variants.values():
            check_graph_data(root, variant, manifest.dims)
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
        raise ModelDirError(f"{path}: expected a JSON object, got {type(doc).__name__}. "
                            "Re-export the model (`gpt2-onnx export --force`).")
    fmt = doc.get("format")
    version = doc.get("format_version")
    if fmt != FORMAT_NAME:
        raise ModelDirError(f"{path}: format is {_short(fmt)}, expected {FORMAT_NAME!r}. "
                            "This is not a gpt2-onnx manifest; re-export the model.")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ModelDirError(
            f"{path}: format_version {_short(version)} is not supported by this runtime "
            f"(supports {FORMAT_VERSION}). Re-export the model or install a matching gpt2-onnx."
        )

    name = need(doc, "name", str, "")
    source = need(doc, "source", dict, "")
    tokenizer = need(doc, "tokenizer", str, "")
    dims = _parse_dims(need(doc, "dims", dict, ""), need, problems)

    variants: dict[str, Variant] = {}
    raw_variants = need(doc, "variants", dict, "")
    if raw_variants is not None and not raw_variants:
        problems.append("variants: empty (no graph to run)")
    for prec, rv in (raw_variants or {}).items():
        variant = _parse_variant(prec, rv, need, problems)
        if variant is not None:
            variants[prec] = variant

    files: dict[str, FileEntry] = {}
    raw_files = need(doc, "files", dict, "")
    for fname, entry in (raw_files or {}).items():
        size = need(entry, "size", int, f"files.{fname}.")
        sha = need(entry, "sha256", str, f"files.{fname}.")
        if size is not None and size < 0:
            problems.append(f"files.{fname}.size: must be >= 0, got {size}")
        elif sha is not None and not _SHA256.fullmatch(sha):
            problems.append(f"files.{fname}.sha256: not 64 lowercase hex digits")
        elif size is not None and sha is not None:
            files[fname] = FileEntry(size, sha)

    versions = doc.get("versions", {})
    if not isinstance(versions, dict):
        problems.append("versions: expected an object")
        versions = {}
    verify = doc.get("verify")
    if verify is not None and not (
        isinstance(verify, dict)
        and isinstance(verify.get("checks", []), list)
        and all(isinstance(c, dict) for c in verify.get("checks", []))
    ):
        problems.append("verify: expected null or an object whose checks are a list of objects")
    genai = doc.get("genai")
    if genai is not None and not (isinstance(genai, dict) and all(
            isinstance(genai.get(k), str) for k in ("variant", "config", "graph"))):
        problems.append("genai: expected null or an object with string variant, config, graph")
    if problems:
        raise ModelDirError(
            f"{path}: invalid manifest ({len(problems)} problem{'s' * (len(problems) > 1)}): "
            + "; ".join(problems)
            + ". Re-export the model (`gpt2-onnx export --force`)."
        )
    assert name is not None and source is not None and dims is not None and tokenizer is not None
    return Manifest(
        name=name, source=source, dims=dims, variants=variants, files=files, tokenizer=tokenizer,
        versions={str(k): str(v) for k, v in versions.items()}, verify=verify,
        genai=dict(genai) if genai is not None else None,
    )


def _short(value: Any) -> str:
    """repr of a (possibly huge, hand-edited) manifest value, cut for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_dims(raw: Any, need: Callable[..., Any], problems: list[str]) -> ModelDims | None:
    if raw is None:
        return None
    vals = {f: need(raw, f, int, "dims.") for f in ModelDims.__dataclass_fields__}
    if any(v is None for v in vals.values()):
        return None
    bad = False
    for f, v in vals.items():
        if v < 0 or (v == 0 and not f.endswith("token_id")) or v > MAX_DIM:
            problems.append(f"dims.{f}: must be in [{0 if f.endswith('token_id') else 1}, "
                            f"{MAX_DIM}], got {_short(v)}")
            bad = True
    if bad:
        return None
    dims = ModelDims(**vals)
    if dims.n_head * dims.head_dim != dims.n_embd:
        problems.append("dims: n_head * head_dim != n_embd")
    for f in ("bos_token_id", "eos_token_id"):
        if getattr(dims, f) >= dims.vocab_size:
            problems.append(f"dims.{f}: {getattr(dims, f)} is not below vocab_size "
                            f"{dims.vocab_size}")
    return dims


def _parse_variant(prec: str, rv: Any, need: Callable[..., Any],
                   problems: list[str]) -> Variant | None:
    w = f"variants.{prec}."
    graph = need(rv, "graph", str, w)
    data = need(rv, "data", list, w)
    dtype = need(rv, "dtype", str, w)
    raw_io = need(rv, "io", dict, w)
    thresholds = rv.get("thresholds", {}) if isinstance(rv, dict) else {}
    if isinstance(rv, dict) and rv.get("precision", prec) != prec:
        problems.append(f"{w}precision: {_short(rv.get('precision'))} differs from its key")
    if data is not None and not all(isinstance(d, str) for d in data):
        problems.append(f"{w}data: expected a list of file names")
        data = None
    if dtype is not None and dtype not in ("float32", "float16"):
        problems.append(f"{w}dtype: {_short(dtype)} is not float32 or float16")
        dtype = None
    io = _parse_io(raw_io, w, problems) if raw_io is not None else None
    if not isinstance(thresholds, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in thresholds.values()):
        problems.append(f"{w}thresholds: expected an object of finite numbers")
        thresholds = None
    if None in (graph, data, dtype, io, thresholds):
        return None
    return Variant(prec, graph, tuple(data), dtype, io, dict(thresholds))


def _parse_io(raw_io: dict[str, Any], w: str, problems: list[str]) -> VariantIO | None:
    known = VariantIO.__dataclass_fields__
    unknown = sorted(set(raw_io) - set(known))
    if unknown:
        problems.append(f"{w}io: unknown keys {unknown}")
    bad = [k for k, v in raw_io.items() if k in known and k != "extra_inputs"
           and not isinstance(v, str)]
    if bad:
        problems.append(f"{w}io: {bad} must be strings")
    extra = raw_io.get("extra_inputs", {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        problems.append(f"{w}io.extra_inputs: expected an object of strings")
        bad.append("extra_inputs")
    if unknown or bad:
        return None
    io = VariantIO(**raw_io)
    if io.kv_layout not in KV_LAYOUTS:
        problems.append(f"{w}io.kv_layout: {_short(io.kv_layout)} not in {KV_LAYOUTS}")
    if io.logits_rows not in ("all", "last"):
        problems.append(f"{w}io.logits_rows: {_short(io.logits_rows)} not all/last")
    for key in ("past_key", "past_value", "present_key", "present_value"):
        pattern = getattr(io, key)
        try:
            ok = "{i}" in pattern and pattern.format(i=0) != pattern.format(i=1)
        except (ValueError, KeyError, IndexError, AttributeError):
            ok = False
        if not ok:
            problems.append(f"{w}io.{key}: {_short(pattern)} must be a name with {{i}} for "
                            "the layer index")
    return io


def package_versions(names: Iterable[str], missing: str | None = None) -> dict[str, str]:
    """Installed versions of `names` (pip distribution names), for the manifest and the bench
    records; a package not installed is left out, or recorded as `missing` when given."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if missing is not None:
                versions[name] = missing
    return versions


def referenced_files(manifest: Manifest) -> list[str]:
    """Every file the runtime will open: the tokenizer and each variant's graph and data."""
    names = [manifest.tokenizer]
    for v in manifest.variants.values():
        names.append(v.graph)
        names.extend(v.data)
    return list(dict.fromkeys(names))


def safe_child(root: Path, name: str) -> Path | None:
    """`root/name` if it is a plain relative name that stays inside `root` (no symlink escape)."""
    if (not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name
            or "\x00" in name or any(p in ("..", "") for p in Path(name).parts)):
        return None
    candidate = root / name
    try:
        resolved = candidate.resolve(strict=False)
        base = root.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # symlink loops, unreadable dirs
        return None
    if resolved != base and base not in resolved.parents:
        return None
    return candidate


def _check_paths(root: Path, manifest: Manifest, path: Path) -> None:
    problems: list[str] = []
    for name in dict.fromkeys([*referenced_files(manifest), *manifest.files]):
        child = safe_child(root, name)
        if child is None:
            problems.append(f"{_short(name)} points outside the model directory")
            continue
        try:
            if not child.exists():
                problems.append(f"{name}: missing")
            elif not child.is_file():  # directories, FIFOs, devices: never opened
                problems.append(f"{name}: not a regular file")
            elif name in manifest.files and child.stat().st_size != manifest.files[name].size:
                problems.append(
                    f"{name}: {child.stat().st_size} bytes, manifest says "
                    f"{manifest.files[name].size} (truncated or replaced)"
                )
        except OSError as exc:
            problems.append(f"{name}: cannot be read ({exc.strerror or exc})")
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
    bad = []
    for name, entry in manifest.files.items():
        try:
            if sha256_file(root / name) != entry.sha256:
                bad.append(name)
        except OSError as exc:
            bad.append(f"{name} (unreadable: {exc.strerror or exc})")
    if bad:
        raise ModelDirError(
            f"{root}: sha256 mismatch for {', '.join(bad)}: the files changed since export. "
            "Copy the directory again or re-export (`gpt2-onnx export --force`)."
        )


# ---------------------------------------------------------------------------------------------
# External data references of an ONNX graph, read without onnx and without onnxruntime.
#
# A graph names its external weight files in TensorProto.external_data ("location" entries).
# onnxruntime 1.32 itself refuses locations that are absolute or resolve outside the graph's
# directory (symlinks included), but it happily reads any other file inside it. This scan runs
# before onnxruntime sees the graph and proves every location is one of the variant's listed data
# files (whose sizes and hashes the manifest covers). It walks the protobuf wire format over a
# memory map, descending only into messages that can hold tensors and skipping weight bytes, so
# a graph with gigabytes of embedded weights costs a few page reads.

# (message, field number) -> message type of that field, for the fields that can lead to a
# TensorProto (field numbers from onnx.proto, checked against onnx in the tests).
_TENSOR_PATHS: dict[tuple[str, int], str] = {
    ("model", 7): "graph",  # ModelProto.graph
    ("model", 20): "training",  # ModelProto.training_info
    ("model", 25): "function",  # ModelProto.functions
    ("training", 1): "graph",  # TrainingInfoProto.initialization
    ("training", 2): "graph",  # TrainingInfoProto.algorithm
    ("function", 7): "node",  # FunctionProto.node
    ("function", 11): "attribute",  # FunctionProto.attribute_proto
    ("graph", 1): "node",  # GraphProto.node
    ("graph", 5): "tensor",  # GraphProto.initializer
    ("graph", 15): "sparse",  # GraphProto.sparse_initializer
    ("node", 5): "attribute",  # NodeProto.attribute
    ("attribute", 5): "tensor",  # AttributeProto.t
    ("attribute", 6): "graph",  # AttributeProto.g
    ("attribute", 10): "tensor",  # AttributeProto.tensors
    ("attribute", 11): "graph",  # AttributeProto.graphs
    ("attribute", 22): "sparse",  # AttributeProto.sparse_tensor
    ("attribute", 23): "sparse",  # AttributeProto.sparse_tensors
    ("sparse", 1): "tensor",  # SparseTensorProto.values
    ("sparse", 2): "tensor",  # SparseTensorProto.indices
    ("tensor", 13): "entry",  # TensorProto.external_data (StringStringEntryProto)
}
_MAX_NESTING = 64  # onnx nests graphs in If/Loop bodies; protobuf itself stops at 100


class _WireError(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _WireError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _scan_message(buf: memoryview, start: int, end: int, kind: str, depth: int,
                  found: list[str], tensors: dict[str, list[int]] | None = None) -> None:
    """Walk one message; append the value of every external_data "location" entry to `found`
    and, when `tensors` is given, record each tensor's name -> dims (TensorProto fields 8, 1)."""
    if depth > _MAX_NESTING:
        raise _WireError("messages nested too deeply")
    pos = start
    key_value: dict[int, bytes] = {}
    dims: list[int] = []
    name = b""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field_no, wire = tag >> 3, tag & 7
        if field_no == 0:
            raise _WireError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == "tensor" and field_no == 1:
                dims.append(value)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _WireError("length runs past the end of its message")
            child = _TENSOR_PATHS.get((kind, field_no))
            if kind == "entry" and field_no in (1, 2):
                key_value[field_no] = bytes(buf[pos:pos + length])
            elif kind == "tensor" and field_no == 8:
                name = bytes(buf[pos:pos + length])
            elif kind == "tensor" and field_no == 1:  # packed dims
                p = pos
                while p < pos + length:
                    value, p = _varint(buf, p, pos + length)
                    dims.append(value)
            elif child is not None:
                _scan_message(buf, pos, pos + length, child, depth + 1, found, tensors)
            pos += length
        else:
            raise _WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise _WireError("field runs past the end of its message")
    if kind == "tensor" and tensors is not None and name:
        tensors[name.decode("utf-8", "replace")] = dims
    if kind == "entry" and key_value.get(1) == b"location":
        try:
            found.append(key_value.get(2, b"").decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _WireError("external data location is not UTF-8") from exc


def graph_external_data(graph: Path) -> list[str]:
    """The external data locations `graph` names, as written (no onnx, no onnxruntime).

    Raises ModelDirError when the file is not a well-formed protobuf message.
    """
    return scan_graph(graph)[0]


def scan_graph(graph: Path) -> tuple[list[str], dict[str, list[int]]]:
    """(external data locations, tensor name -> dims) of `graph`, read as `graph_external_data`
    reads it (weights skipped)."""
    try:
        with open(graph, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelDirError(f"{graph}: empty file, not an ONNX graph. Copy the model "
                                    "directory again or re-export (`gpt2-onnx export --force`).")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                found: list[str] = []
                tensors: dict[str, list[int]] = {}
                view = memoryview(mm)
                try:
                    _scan_message(view, 0, size, "model", 0, found, tensors)
                finally:
                    view.release()
    except _WireError as exc:
        raise ModelDirError(f"{graph}: not a valid ONNX graph ({exc}); the file is damaged or "
                            "not a graph. Copy the model directory again or re-export "
                            "(`gpt2-onnx export --force`).") from exc
    except OSError as exc:
        raise ModelDirError(f"{graph}: cannot be read ({exc.strerror or exc}).") from exc
    return list(dict.fromkeys(found)), tensors


# Names of the position-embedding table [n_positions, n_embd] in the graphs gpt2-onnx writes
# (optimum's export; the fused graphs). A graph without one is not checked for n_positions.
POSITION_TABLES = ("transformer.wpe.weight", "wpe")


def check_graph_data(root: Path, variant: Variant, dims: ModelDims | None = None) -> None:
    """Refuse a graph whose external data is not exactly within its variant's listed files, or
    (with `dims`) whose position table disagrees with n_positions / n_embd: a larger
    n_positions in the manifest would fail only once a sequence grows past the real table."""
    graph = root / variant.graph
    graph_dir = os.path.dirname(variant.graph)
    listed = {os.path.normpath(d) for d in variant.data}
    problems = []
    locations, tensors = scan_graph(graph)
    table = next((tensors[n] for n in POSITION_TABLES if n in tensors), None)
    if dims is not None and table is not None and len(table) == 2 and \
            table != [dims.n_positions, dims.n_embd]:
        raise ModelDirError(
            f"{graph}: graph and manifest disagree (its position table is {table[0]} x "
            f"{table[1]}, the manifest says n_positions {dims.n_positions}, n_embd "
            f"{dims.n_embd}). The manifest was edited or belongs to another export; copy the "
            "model directory again or re-export (`gpt2-onnx export --force`).")
    for location in locations:
        rel = os.path.normpath(os.path.join(graph_dir, location)) if location else ""
        if (not location or os.path.isabs(location) or "\x00" in location
                or safe_child(root, rel) is None):
            problems.append(f"{_short(location)} points outside the model directory")
        elif rel not in listed:
            problems.append(f"{_short(location)} is not among the variant's data files "
                            f"{list(variant.data)}")
    if problems:
        raise ModelDirError(
            f"{graph}: external data {'; '.join(problems)}. Refusing to load it; the graph was "
            "edited or replaced. Copy the model directory again or re-export "
            "(`gpt2-onnx export --force`)."
        )


# ---------------------------------------------------------------------------------------------
# The graph's own inputs and outputs against the manifest (after onnxruntime loaded it)

_ONNX_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}


def check_graph_io(graph: Path, dims: ModelDims, variant: Variant,
                   inputs: Iterable[tuple[str, Sequence[Any], str]],
                   outputs: Iterable[tuple[str, Sequence[Any], str]]) -> None:
    """Refuse a graph whose inputs/outputs disagree with the manifest, before any forward pass.

    inputs/outputs: (name, shape, type) of the session's graph (onnxruntime's NodeArg fields;
    a shape entry is an int when static, a name or None when not). Checks the input names the
    loop feeds (n_layer past pairs, ids, mask, the variant's extra inputs), the outputs it reads,
    the static n_head and head_dim of every KV tensor, the logits width (vocab_size) and the KV
    dtype. One ModelDirError lists every disagreement.
    """
    io = variant.io
    ins = {name: (list(shape or []), typ) for name, shape, typ in inputs}
    outs = {name: (list(shape or []), typ) for name, shape, typ in outputs}
    past, present = io.kv_inputs(dims.n_layer), io.kv_outputs(dims.n_layer)
    fed = [io.input_ids, *past, *io.extra_inputs]
    if not variant.shared_kv:
        fed.append(io.attention_mask)
    optional = {io.position_ids}  # fed when the graph has it
    problems = []
    missing = [n for n in fed if n not in ins]
    if missing:
        problems.append(f"inputs the manifest names are missing from the graph: {_names(missing)}")
    unexpected = [n for n in ins if n not in fed and n not in optional]
    if unexpected:
        problems.append(f"the graph needs inputs the manifest does not name: {_names(unexpected)} "
                        f"(n_layer {dims.n_layer} in the manifest?)")
    lost = [n for n in (io.logits, *present) if n not in outs]
    if lost:
        problems.append(f"outputs the manifest names are missing from the graph: {_names(lost)}")
    want_type = _ONNX_TYPES.get(variant.dtype)
    for name in [n for n in past if n in ins] + [n for n in present if n in outs]:
        shape, typ = ins[name] if name in ins else outs[name]
        heads, width = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
        if len(shape) != 4:
            problems.append(f"{name} has {len(shape)} dimensions, expected 4 "
                            "[batch, n_head, positions, head_dim]")
        elif ((isinstance(heads, int) and heads != dims.n_head)
              or (isinstance(width, int) and width != dims.head_dim)):
            problems.append(f"{name} is [batch, {heads}, ..., {width}] but the manifest says "
                            f"n_head {dims.n_head}, head_dim {dims.head_dim}")
        if want_type and typ != want_type:
            problems.append(f"{name} is {typ}, the manifest says dtype {variant.dtype}")
        if problems and len(problems) > 6:
            break
    if io.logits in outs:
        shape, _ = outs[io.logits]
        vocab = shape[-1] if shape else None
        if isinstance(vocab, int) and vocab != dims.vocab_size:
            problems.append(f"{io.logits} has {vocab} columns but the manifest says vocab_size "
                            f"{dims.vocab_size}")
    if problems:
        raise ModelDirError(
            f"{graph}: graph and manifest disagree ({'; '.join(problems[:6])}). The manifest was "
            "edited or belongs to another export; copy the model directory again or re-export "
            "(`gpt2-onnx export --force`).")


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
