#!/usr/bin/env bash
# Download, here, the wheels the GPU check installs on the (offline) H200 machine, and split the
# 256 MB onnxruntime-gpu wheel into parts small enough to carry one per `device run` call.
#
#   bash bench/prepare_gpu_wheels.sh [--dest DIR] [--part-size SIZE] [--ort-spec SPEC]
#                                    [--small-specs "A==1 B==2"] [--no-small]
#
# Result (DEST defaults to .gpu-wheels in the repo root, which must be git-ignored):
#   DEST/p0/ort.part0 ... DEST/pN/ort.partN  the onnxruntime-gpu wheel in parts (one folder per
#                                            carry call; bench/GPU.md gives the call sequence)
#   DEST/pN/ort.name, DEST/pN/ort.sha256     the wheel's file name and sha256, in the last part's
#                                            folder (so joining can be checked there)
#   DEST/small/*.whl                         transformers <4.58 and the other export-side wheels
#   DEST/download/                           the whole wheel as downloaded (kept, so a rerun
#                                            never downloads it again; never carried)
# Nothing is downloaded twice: an existing wheel in DEST/download is reused.
set -euo pipefail

dest=".gpu-wheels"
part_size="55M"          # 64 MiB per call holds one part + the working tree (~2 MB)
ort_spec="onnxruntime-gpu==1.31.1"
# The export extra's versions known to work together (docs/facts.md), for Python 3.12 there:
# the H200 image has transformers 5.x (no ONNX exporter) and huggingface_hub 1.x (transformers
# 4.57 refuses it at import), so these travel too. torch, onnx, numpy, typer, rich are there.
small_specs="transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 optimum==2.1.0 optimum-onnx==0.1.0"
want_small=1

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dest) dest="$2"; shift 2 ;;
    --part-size) part_size="$2"; shift 2 ;;
    --ort-spec) ort_spec="$2"; shift 2 ;;
    --small-specs) small_specs="$2"; shift 2 ;;
    --no-small) want_small=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "prepare_gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

repo_root="$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
case "$dest" in /*) ;; *) dest="$repo_root/$dest" ;; esac
# Inside the repo the folder must be ignored, or every later `device run` would carry all of it.
if [[ "$dest" == "$repo_root"/* ]] && ! git -C "$repo_root" check-ignore -q "$dest/x.whl"; then
  rel="${dest#"$repo_root"/}"
  echo "prepare_gpu_wheels.sh: $rel is not git-ignored; add '/$rel/' to .gitignore (or" \
       ".git/info/exclude) first, or pass --dest outside the repo." >&2
  exit 1
fi

# The H200 machine: CPython 3.12, x86-64, glibc manylinux.
platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux1_x86_64 --platform any)

fetch() {  # fetch DIR SPEC: pip download one wheel unless a wheel of that name is already there
  local dir="$1" spec="$2" name
  name="$(echo "${spec%%[=<>]*}" | tr '-' '_' | tr '[:upper:]' '[:lower:]')"
  mkdir -p "$dir"
  if compgen -G "$dir/${name}-*.whl" >/dev/null \
     || compgen -G "$dir/$(echo "$name" | tr '_' '-')-*.whl" >/dev/null; then
    echo "have $(basename "$(ls "$dir"/"${name}"-*.whl 2>/dev/null | head -1)") (not downloaded again)"
    return
  fi
  python3 -m pip download -q --no-deps "${platform_args[@]}" -d "$dir" "$spec"
}

fetch "$dest/download" "$ort_spec"
ort_name="$(echo "${ort_spec%%[=<>]*}" | tr '-' '_')"
wheel="$(ls "$dest"/download/"${ort_name}"-*.whl | head -1)"

# Split into parts p0..pN (one folder each, so each carry call names one path).
rm -rf "$dest"/p[0-9]*
tmp="$(mktemp -d)"
split -b "$part_size" -d -a 2 "$wheel" "$tmp/ort.part"
i=0
for part in "$tmp"/ort.part*; do
  mkdir -p "$dest/p$i"
  mv "$part" "$dest/p$i/ort.part$(printf '%02d' "$i")"
  i=$((i + 1))
done
rmdir "$tmp"
last="$dest/p$((i - 1))"
basename "$wheel" > "$last/ort.name"
sha256sum "$wheel" | cut -d' ' -f1 > "$last/ort.sha256"

if [[ $want_small -eq 1 ]]; then
  for spec in $small_specs; do
    fetch "$dest/small" "$spec"
  done
fi

echo
echo "wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1)), $i parts of <= $part_size in $dest/p0..p$((i - 1))"
[[ $want_small -eq 1 ]] && echo "small wheels: $(du -sh "$dest/small" | cut -f1) in $dest/small"
rel="${dest#"$repo_root"/}"
echo "carry plan (bench/GPU.md): calls 1..$((i - 1)) carry [\"$rel/pK\"] and run" \
     "'bash bench/gpu_check.sh --stage'; the last call carries [\"$rel/p$((i - 1))\", \"$rel/small\"]" \
     "and runs 'bash bench/gpu_check.sh'."
