"""llama.cpp as a benchmark peer: fetch, build (once, cached), convert and quantize.

    python bench/llama_setup.py build [--jobs N]                 # prints the build record
    python bench/llama_setup.py convert CHECKPOINT OUT_DIR       # F32, Q8_0, Q4_0, Q4_K_M GGUFs

The source is the `llama-cpp-python` sdist from the package registry (pip download): it vendors
llama.cpp (its CMake project, `convert_hf_to_gguf.py` and gguf-py) and the ctypes bindings the
benchmark's worker drives it through (bench/peers.py). One CMake build, CPU only, native flags,
shared libraries, gives both the tools (llama-server for the server benchmark, llama-quantize,
llama-bench, llama-batched-bench) and the libllama.so the bindings load (LLAMA_CPP_LIB_PATH), so
the Python package is never pip-installed or compiled a second time.

Everything lives under ~/.cache/gpt2-onnx/llama.cpp/<version>/ (sdist, source, build/, and
build-info.json: version, llama.cpp commit, compiler, CMake flags). Each step is skipped when its
output exists, so a second benchmark run reuses the build and the GGUF files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp measured
CACHE = Path.home() / ".cache" / "gpt2-onnx" / "llama.cpp"
# benchmark system -> GGUF weight type (the file type llama.cpp names it by)
SYSTEMS: dict[str, str] = {
    "llama-f32": "F32", "llama-q8_0": "Q8_0", "llama-q4_0": "Q4_0", "llama-q4_k_m": "Q4_K_M",
}
CONVERTED = {"F32": "f32", "Q8_0": "q8_0"}  # written by convert_hf_to_gguf.py (--outtype)
QUANTIZED_FROM_F32 = ("Q4_0", "Q4_K_M")  # written by llama-quantize from the F32 file
TARGETS = ("llama-server", "llama-quantize", "llama-bench", "llama-batched-bench", "llama-cli")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # -march=native: this machine's AVX-512/VNNI, as a user's own build
    "-DBUILD_SHARED_LIBS=ON",  # libllama.so for the ctypes bindings, shared with the tools
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",  # no downloads from the tools
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class LlamaCpp:
    """Paths of one llama.cpp version's source and build under `root`."""

    root: Path
    version: str = VERSION

    @property
    def sdist_dir(self) -> Path:
        """The unpacked sdist: holds the `llama_cpp` Python package (add it to sys.path)."""
        return self.root / f"llama_cpp_python-{self.version}"

    @property
    def source(self) -> Path:
        return self.sdist_dir / "vendor" / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def lib_dir(self) -> Path:
        """libllama.so and the ggml libraries (LLAMA_CPP_LIB_PATH), beside the tools."""
        return self.build_dir / "bin"

    @property
    def gguf_py(self) -> Path:
        return self.source / "gguf-py"

    @property
    def info_file(self) -> Path:
        return self.root / "build-info.json"

    def binary(self, name: str) -> Path:
        return self.lib_dir / name

    def is_built(self) -> bool:
        """Built by ensure_built: every target, the library and the build record present."""
        return self.info_file.is_file() and (self.lib_dir / "libllama.so").is_file() \
            and all(self.binary(t).is_file() for t in TARGETS)

    def info(self) -> dict[str, Any]:
        """The build record (build-info.json); {} before the first build."""
        return json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}

    def worker_paths(self) -> dict[str, str]:
        """What bench/peers.py needs to import the bindings against this build."""
        return {"python_dir": str(self.sdist_dir), "lib_dir": str(self.lib_dir)}


def default() -> LlamaCpp:
    return LlamaCpp(CACHE / VERSION)


def _run(cmd: Sequence[str], log: Log, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run `cmd`; its stdout. RuntimeError with the tail of its output when it fails."""
    log("  $ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {proc.returncode}):\n"
                           + "\n".join(tail))
    return proc.stdout


def ensure_source(lc: LlamaCpp, log: Log = _quiet) -> None:
    """Download the sdist with pip (the registry's own client) and unpack it, unless present."""
    if (lc.source / "CMakeLists.txt").is_file():
        return
    lc.root.mkdir(parents=True, exist_ok=True)
    sdist = lc.root / f"llama_cpp_python-{lc.version}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {lc.version} sdist (~76 MB)")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={lc.version}", "-d", str(lc.root)], log)
    tmp = lc.root / "unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    os.replace(tmp / lc.sdist_dir.name, lc.sdist_dir)
    shutil.rmtree(tmp, ignore_errors=True)


def _compiler(lc: LlamaCpp) -> str:
    """The C++ compiler CMake chose, with its version line."""
    cache = lc.build_dir / "CMakeCache.txt"
    cxx = "c++"
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.startswith("CMAKE_CXX_COMPILER:"):
                cxx = line.split("=", 1)[1]
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return cxx
    return f"{cxx}: {out.splitlines()[0] if out else 'unknown version'}"


def _commit(lc: LlamaCpp) -> str:
    """llama.cpp's commit: the sdist ships vendor/llama.cpp with its git metadata."""
    try:
        proc = subprocess.run(["git", "-C", str(lc.source), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
    except OSError:
        return "unknown (git not installed)"
    out = proc.stdout.strip()
    return out if proc.returncode == 0 and out else "unknown"


def ensure_built(lc: LlamaCpp | None = None, jobs: int | None = None, log: Log = _quiet
                 ) -> LlamaCpp:
    """Source, configure and build the targets (CPU only, native), unless already built; the
    build record goes to build-info.json. ~7 min on 2 cores the first time, seconds after."""
    lc = lc or default()
    if lc.is_built():
        return lc
    ensure_source(lc, log)
    log(f"building llama.cpp ({', '.join(TARGETS)}) in {lc.build_dir}; minutes the first time")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", lc.source, "-B", lc.build_dir, *generator, *CMAKE_FLAGS], log)
    _run(["cmake", "--build", lc.build_dir, "-j", str(jobs or os.cpu_count() or 2),
          "--target", *TARGETS], log)
    record = {
        "llama_cpp_python": lc.version, "llama_cpp_commit": _commit(lc),
        "compiler": _compiler(lc), "cmake_flags": list(CMAKE_FLAGS), "targets": list(TARGETS),
        "source": str(lc.source), "build_dir": str(lc.build_dir),
    }
    lc.info_file.write_text(json.dumps(record, indent=1) + "\n")
    return lc


# --------------------------------------------------------------------------- models


def gguf_path(out_dir: Path, system: str) -> Path:
    """Where the GGUF file of `system` (llama-f32, ...) lives in `out_dir`."""
    return out_dir / f"model-{SYSTEMS[system].lower()}.gguf"


def _staged_checkpoint(checkpoint: Path, stage: Path) -> Path:
    """The checkpoint as the GPT-2 converter reads it: links to its files and a config.json
    with `n_ctx` (the converter reads it; transformers no longer writes it)."""
    config = json.loads((checkpoint / "config.json").read_text())
    if "n_ctx" in config:
        return checkpoint
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    config["n_ctx"] = config["n_positions"]
    (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return stage


def convert(lc: LlamaCpp, checkpoint: Path, out_dir: Path, systems: Sequence[str] = tuple(SYSTEMS),
            log: Log = _quiet) -> dict[str, Path]:
    """GGUF files of `systems` from the transformers `checkpoint` (each made once): F32 and Q8_0
    by convert_hf_to_gguf.py (needs torch, transformers: the export extra), Q4_0 and Q4_K_M by
    llama-quantize from the F32 file. system -> path."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"llama.cpp systems {unknown}: choose from {', '.join(SYSTEMS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {SYSTEMS[s] for s in systems}
    if wanted & set(QUANTIZED_FROM_F32):
        wanted.add("F32")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(lc.gguf_py), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    source = None
    for ftype, outtype in CONVERTED.items():
        target = out_dir / f"model-{outtype}.gguf"
        if ftype not in wanted or target.is_file():
            continue
        source = source or _staged_checkpoint(checkpoint, out_dir / "hf-stage")
        tmp = target.with_suffix(".gguf.tmp")
        log(f"converting {checkpoint} to {ftype} GGUF")
        _run([sys.executable, lc.source / "convert_hf_to_gguf.py", source, "--outtype", outtype,
              "--outfile", tmp], log, env=env)
        os.replace(tmp, target)
    for ftype in QUANTIZED_FROM_F32:
        target = out_dir / f"model-{ftype.lower()}.gguf"
        if ftype not in wanted or target.is_file():
            continue
        tmp = target.with_suffix(".gguf.tmp")
        log(f"quantizing to {ftype} with llama-quantize")
        _run([lc.binary("llama-quantize"), out_dir / "model-f32.gguf", tmp, ftype,
              "2"], log)  # 2 threads: the file is made once, the speed does not matter
        os.replace(tmp, target)
    shutil.rmtree(out_dir / "hf-stage", ignore_errors=True)
    return {s: gguf_path(out_dir, s) for s in systems}


def gguf_bytes_read(lc: LlamaCpp, path: Path) -> int:
    """Bytes of tensors one decode step reads from a GGUF file: all but the position table, and
    the token table only when a separate output matrix exists (GPT-2 ties them: llama.cpp's
    output then is token_embd, read whole each step)."""
    if str(lc.gguf_py) not in sys.path:
        sys.path.insert(0, str(lc.gguf_py))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    skip = {"position_embd.weight"}
    if "output.weight" in tensors:
        skip.add("token_embd.weight")
    return sum(n for name, n in tensors.items() if name not in skip)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and build (cached); prints the build record")
    b.add_argument("--jobs", type=int, help="parallel compile jobs [all cores]")
    c = sub.add_parser("convert", help="GGUF files of a transformers GPT-2 checkpoint")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("out_dir", type=Path)
    c.add_argument("--systems", default=",".join(SYSTEMS))
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    lc = ensure_built(jobs=getattr(a, "jobs", None), log=log)
    if a.command == "build":
        sys.stdout.write(json.dumps(lc.info(), indent=1) + "\n")
    else:
        paths = convert(lc, a.checkpoint, a.out_dir, a.systems.split(","), log)
        for system, path in paths.items():
            sys.stdout.write(f"{system}\t{path}\t{gguf_bytes_read(lc, path)} bytes/step\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
