"""Resolve an export SOURCE (hub id, local directory, random-init preset) into a loaded model.

Each resolved source also carries the record the manifest keeps, so that `verify` can load the very
same reference later (`load_reference`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2_onnx.export.presets import build_random_model, preset_config_kwargs
from gpt2_onnx.export.tokenizer import save_tokenizer_files
from gpt2_onnx.runtime.errors import Gpt2OnnxError

HUB_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class SourceError(Gpt2OnnxError):
    """The export source cannot be used (unreachable hub, not GPT-2, missing files)."""


@dataclass
class ResolvedSource:
    model: Any  # transformers GPT2LMHeadModel, eval mode, float32
    record: dict[str, Any]  # what the manifest stores as "source"
    default_name: str  # models/<default_name>
    tokenizer_from: Path | None  # directory holding the source's tokenizer; None -> vendored BPE


def default_name(source: str | None, random_init: str | None, seed: int) -> str:
    if random_init:
        return f"random-{random_init}-seed{seed}"
    assert source is not None
    if Path(source).exists():
        # resolve(): "." or "ckpt/" must give the folder's own name, never "" (-> models/)
        return Path(source).resolve().name or "model"
    return source.split("/")[-1] or "model"


def resolve_source(source: str | None, random_init: str | None, seed: int) -> ResolvedSource:
    """Load the model the user asked for; raise SourceError / ValueError with the fix."""
    if random_init:
        preset_config_kwargs(random_init)  # ValueError listing presets if unknown
        model = build_random_model(random_init, seed)
        return ResolvedSource(model, {"kind": "random-init", "preset": random_init, "seed": seed},
                              default_name(None, random_init, seed), None)
    assert source is not None
    path = Path(source)
    if path.exists():
        return _resolve_local(path)
    if not _HUB_ID.match(source):
        raise SourceError(
            f"{source}: no such local directory, and not a valid Hugging Face hub id. "
            "Pass a directory holding config.json + weights + tokenizer, a hub id like "
            "gpt2-large, or --random-init PRESET."
        )
    return _resolve_hub(source)


def _check_gpt2_config(config: Any, where: str) -> None:
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "gpt2":
        raise SourceError(
            f"{where}: model_type is {model_type!r}, not 'gpt2'. gpt2-onnx exports GPT-2 "
            "checkpoints only (any size or shape of the GPT-2 architecture)."
        )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


def _resolve_local(path: Path) -> ResolvedSource:
    if not path.is_dir():
        raise SourceError(f"{path}: not a directory. Pass a transformers GPT-2 checkpoint folder.")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(
            f"{path}: no config.json. A local source is a transformers GPT-2 checkpoint folder "
            "(config.json, model.safetensors or pytorch_model.bin, tokenizer files)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SourceError(f"{config_path}: not readable JSON ({str(exc)[:200]}). Save the "
                          "checkpoint again with model.save_pretrained(...).") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{config_path}: expected a JSON object, got {type(config).__name__}. "
                          "Save the checkpoint again with model.save_pretrained(...).")
    _check_gpt2_config(config, str(config_path))
    if not _has_tokenizer(path):
        raise SourceError(
            f"{path}: no tokenizer (tokenizer.json, or vocab.json + merges.txt). "
            "Save it beside the weights with tokenizer.save_pretrained(...)."
        )
    from safetensors import SafetensorError
    from transformers import GPT2LMHeadModel

    try:
        model = GPT2LMHeadModel.from_pretrained(str(path), dtype="float32")
    # What a damaged or incomplete checkpoint raises: missing/unreadable files (OSError),
    # truncated safetensors, shape mismatches (RuntimeError), bad pickles/JSON (ValueError,
    # KeyError). MemoryError and bugs propagate as themselves.
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise SourceError(
            f"{path}: cannot load the weights ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}). The checkpoint is damaged "
            "or incomplete; save it again with model.save_pretrained(...)."
        ) from exc
    record = {"kind": "local", "path": str(path.resolve())}
    return ResolvedSource(model.eval(), record, path.resolve().name, path)


def _resolve_hub(repo_id: str) -> ResolvedSource:
    """Download from the hub; fail within seconds when it is unreachable."""
    import huggingface_hub

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    revision = None
    if not offline:
        try:
            info = huggingface_hub.HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
            revision = info.sha
        except huggingface_hub.errors.RepositoryNotFoundError as exc:
            raise SourceError(f"{repo_id}: no such model on the Hugging Face Hub.") from exc
        except (OSError, huggingface_hub.errors.HfHubHTTPError) as exc:
            if not _in_local_cache(repo_id):
                raise SourceError(
                    f"cannot reach the Hugging Face Hub for {repo_id!r} "
                    f"({type(exc).__name__}). Offline, export a local checkpoint directory "
                    "(gpt2-onnx export PATH) or seeded random weights "
                    "(gpt2-onnx export --random-init gpt2-large)."
                ) from exc
            offline = True
    from transformers import GPT2LMHeadModel  # after the reachability check: it takes seconds

    try:
        config_file = huggingface_hub.hf_hub_download(
            repo_id, "config.json", revision=revision, local_files_only=offline)
        _check_gpt2_config(json.loads(Path(config_file).read_text()), f"{repo_id}/config.json")
        model = GPT2LMHeadModel.from_pretrained(
            repo_id, revision=revision, local_files_only=offline, dtype="float32")
        snapshot = Path(config_file).parent
    except OSError as exc:
        raise SourceError(f"{repo_id}: cannot download or load the checkpoint ({exc}).") from exc
    record = {"kind": "hub", "id": repo_id, "revision": revision or _cached_revision(snapshot)}
    return ResolvedSource(model.eval(), record, repo_id.split("/")[-1], snapshot)


def _in_local_cache(repo_id: str) -> bool:
    import huggingface_hub

    try:
        huggingface_hub.hf_hub_download(repo_id, "config.json", local_files_only=True)
        return True
    # Not in the cache (LocalEntryNotFoundError is an OSError), or not a valid repo id.
    except (OSError, huggingface_hub.errors.HFValidationError):
        return False


def _cached_revision(snapshot: Path) -> str | None:
    return snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None


def write_tokenizer(resolved: ResolvedSource, out_dir: Path) -> None:
    """Put tokenizer.json (+ transformers side files) of the source into `out_dir`."""
    src = resolved.tokenizer_from
    if src is None:
        save_tokenizer_files(out_dir, resolved.model.config.n_positions)
        return
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out_dir / "tokenizer.json")
    else:
        from transformers import GPT2TokenizerFast

        GPT2TokenizerFast.from_pretrained(str(src)).backend_tokenizer.save(
            str(out_dir / "tokenizer.json"))
    for side in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / side).is_file():
            shutil.copyfile(src / side, out_dir / side)


def load_reference(record: dict[str, Any]) -> Any:
    """Rebuild the transformers model a manifest's source record names (for verify)."""
    kind = record.get("kind")
    need = {"random-init": {"preset": str, "seed": int}, "local": {"path": str},
            "hub": {"id": str}}.get(kind, {})
    bad = [k for k, t in need.items()
           if not isinstance(record.get(k), t) or isinstance(record.get(k), bool)]
    if bad:
        raise SourceError(f"the manifest's source record {record!r} lacks a valid "
                          f"{', '.join(bad)}; pass --reference SOURCE.")
    if kind == "random-init":
        return build_random_model(record["preset"], int(record["seed"]))
    if kind == "local":
        return _resolve_local(Path(record["path"])).model
    if kind == "hub":
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(
            record["id"], revision=record.get("revision"), dtype="float32").eval()
    raise SourceError(f"unknown source kind {kind!r} in the manifest; pass --reference SOURCE.")
