#!/usr/bin/env bash
# The prepared GPU check: one `device run` call of under 10 minutes on a lent H200.
#
#   bash bench/gpu_check.sh --stage [OUT]    copy the wheel parts carried in this call to
#                                            /tmp/gpt2-gpu-stage (earlier calls' parts stay)
#   bash bench/gpu_check.sh [OUT]            stage, join + check + install the wheels, then:
#                                            gpu tests, export random-init gpt2-large (fp32,
#                                            fp16, fp16-fused), verify on CUDA, benchmark
#                                            against PyTorch on the same GPU
#   bash bench/gpu_check.sh --dry-run [OUT]  everything but CUDA, here: local packages, tiny
#                                            preset, CPU, a few steps (wheels are joined and
#                                            installed into a throwaway folder when parts are
#                                            present, then unused)
# OUT: the output folder (also --out DIR; default $OUT, else /tmp/gpt2-gpu-out). Options:
# --wheels DIR (default .gpu-wheels). Results in OUT: gpu-check.json (steps, verify verdicts,
# benchmark rows: the one summary), gpu-check.md (its table, also printed at the end),
# gpu-check.log (every step's full output), env.txt, verify.json, gpu-bench.json,
# gpu-bench.md. Only one line per step and the summary table reach stdout.
# bench/GPU.md has the call sequence and carry lists.
set -uo pipefail

mode=full
wheels=".gpu-wheels"
out="${OUT:-/tmp/gpt2-gpu-out}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) mode=dry; shift ;;
    --stage) mode=stage; shift ;;
    --wheels) wheels="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done

mkdir -p "$out" && out="$(cd "$out" && pwd)"  # absolute: the script changes directory
cd "$(dirname "$0")/.." || exit 1
repo="$PWD"
stage=/tmp/gpt2-gpu-stage
work=/tmp/gpt2-gpu-work
mkdir -p "$out" "$stage" "$work"
log="$out/gpu-check.log"
steps_tsv="$out/steps.tsv"  # name, rc, seconds of each step (gpu_summary.py reads it)
: > "$steps_tsv"

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$log"; }
# step NAME SECONDS CMD...: run with a time limit, log its output, remember a failure, go on.
# stdout gets one line per step; a failing step's last lines go there too.
# Safe to run in the background (`step ... &`): results go to steps.tsv, not shell variables.
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc tmp
  tmp="$(mktemp "$out/step.XXXXXX")"
  # bash -c so that the shell functions below (exported with export -f) can be limited too
  timeout --kill-after=10 "$limit" bash -c '"$@"' bash "$@" > "$tmp" 2>&1
  rc=$?
  { echo "[$(date +%H:%M:%S)] == $name (limit ${limit}s)"; cat "$tmp"; } >> "$log"
  say "== $name: rc=$rc in $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || tail -n 15 "$tmp"
  rm -f "$tmp"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$steps_tsv"
  return "$rc"
}

stage_parts() {  # copy every carried part (and the name/sha files) to $stage
  local n=0 f
  for f in "$wheels"/p*/*; do
    [[ -f "$f" ]] || continue
    cp -f "$f" "$stage/" && n=$((n + 1))
  done
  echo "staged $n file(s) from $wheels; $stage now holds: $(ls "$stage" | tr '\n' ' ')"
}

if [[ $mode == stage ]]; then
  stage_parts
  exit 0
fi

# ------------------------------------------------------------------ install (offline)
install_wheels() {  # install_wheels TARGET: join the ORT parts, check, unpack; small wheels; us
  local target="$1" name want got
  stage_parts
  if [[ ! -f "$stage/ort.name" ]]; then
    echo "no onnxruntime-gpu parts staged (ort.name missing): see bench/GPU.md"; return 1
  fi
  name="$(cat "$stage/ort.name")"
  cat "$stage"/ort.part* > "$stage/$name"
  want="$(cat "$stage/ort.sha256")"
  got="$(sha256sum "$stage/$name" | cut -d' ' -f1)"
  if [[ "$want" != "$got" ]]; then
    echo "joined $name: sha256 $got, expected $want (a part is missing: $(ls "$stage"/ort.part* | wc -l) staged)"
    return 1
  fi
  echo "joined $name ($(du -h "$stage/$name" | cut -f1)), sha256 ok"
  rm -rf "$target" && mkdir -p "$target"
  # A wheel is a zip: unpack it (pip would refuse a cp312 wheel on the dry run's Python).
  python3 -m zipfile -e "$stage/$name" "$target" || return 1
  rm -f "$stage/$name"
  if compgen -G "$wheels/small/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$target" \
      "$wheels"/small/*.whl || return 1
  fi
  # gpt2-onnx itself, from this tree (setuptools is on the image; nothing is fetched).
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --target "$target" "$repo" || return 1
  ls "$target"
}

nvidia_libs() {  # the CUDA/cuDNN libraries of the pip packages torch brought (CUDA 13)
  local site
  site="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -
}

gpt2() { python3 -c 'from gpt2_onnx.cli import main; main()' "$@"; }
export -f stage_parts install_wheels gpt2
export wheels stage repo

if [[ $mode == dry ]]; then
  say "dry run: CPU, tiny preset, local packages ($(python3 --version))"
  if compgen -G "$wheels/p*/ort.part*" >/dev/null; then
    step "install wheels (throwaway)" 240 install_wheels "$work/site-dry"
    rm -rf "$work/site-dry"
  else
    say "no wheel parts in $wheels: install step not exercised"
  fi
  device=cpu; preset=tiny; contexts=8,200; batches=1,2; steps=4; vsteps=4
  pytest_args=(-q -p no:cacheprovider tests/test_cuda.py -k "not padded and not fused")
else
  step "install wheels" 90 install_wheels /tmp/site || { say "FAILED: install wheels"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
  LD_LIBRARY_PATH="$(nvidia_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  device=cuda; preset=gpt2-large; contexts=8,900; batches=1,8; steps=64; vsteps=16
  # -o addopts drops pyproject's default "-m 'not gpu ...'" so that -m gpu selects them
  pytest_args=(-q -m gpu -p no:cacheprovider -o "addopts=--strict-markers" tests/test_cuda.py)
fi
export PYTHONUNBUFFERED=1

{
  python3 --version
  nvidia-smi -L 2>&1 || echo "no nvidia-smi"
  python3 - <<'EOF'
import importlib
for name in ("onnxruntime", "torch", "transformers", "optimum", "tokenizers", "numpy"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:  # report, do not stop: the log says what is missing
        print(name, "MISSING", exc)
import onnxruntime as ort
print("providers", ort.get_available_providers())
EOF
} > "$out/env.txt" 2>&1
cat "$out/env.txt" >> "$log"
say "env: $(grep -E '^(onnxruntime|torch) ' "$out/env.txt" | cut -d' ' -f1,2 | paste -sd' ' -); $(grep '^providers' "$out/env.txt")"

# ------------------------------------------------------------------ tests, beside the export
# The gpu tests use the GPU and small models; the export is CPU work: run them together.
step "pytest ${pytest_args[*]}" 240 python3 -m pytest "${pytest_args[@]}" &
tests_pid=$!

# ------------------------------------------------------------------ export fp32 + fp16 + fp16-fused
model="$work/random-$preset"
precisions=fp32,fp16,fp16-fused
step "export $preset $precisions" 270 gpt2 export --random-init "$preset" --out "$model" \
  --precision "$precisions" --force --no-verify
ls -la "$model" >> "$log"
wait "$tests_pid"

# ------------------------------------------------------------------ verify on the device
if python3 -c 'import gpt2_onnx.export.verify' 2>/dev/null; then
  step "verify --device $device" 120 gpt2 verify "$model" --device "$device" --steps "$vsteps" \
    --report "$out/verify.json"
else
  say "SKIPPED verify: gpt2_onnx.export.verify is not in this tree"
  printf 'verify (missing)\t1\t0\n' >> "$steps_tsv"
fi

# ------------------------------------------------------------------ benchmark
bench_args=("$model" --out "$out" --device "$device" --batches "$batches" --contexts "$contexts"
  --steps "$steps" --precisions "$precisions")
[[ $mode == dry ]] && bench_args+=(--threads 2)
step "benchmark" 110 python3 bench/gpu_bench.py "${bench_args[@]}"

rm -rf "$work"
# ------------------------------------------------------------------ the one table
python3 bench/gpu_summary.py "$out" --mode "$mode" | tee -a "$log"
failed="$(awk -F'\t' '$2 != 0 {printf "%s(rc=%s) ", $1, $2}' "$steps_tsv")"
if [[ -n $failed ]]; then
  say "FAILED: $failed"
  exit 1
fi
say "all steps passed; results in $out"
