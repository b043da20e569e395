#!/usr/bin/env bash
# The GPU check (loadtests/gpu_check.py) on a machine with an NVIDIA GPU, with its same-card baseline
# (transformers + SDPA in fp16, and under torch.compile).
#
#   loadtests/gpu_check.sh              everything, with onnxruntime-gpu already installed
#   loadtests/gpu_check.sh prepare      (no registry there) unpack carried wheels, start the export
#   loadtests/gpu_check.sh run          join the carried onnxruntime-gpu parts, serve and measure
#   loadtests/gpu_check.sh dry          the same code here, tiny shapes, CPU provider
#
# Without a registry, onnxruntime-gpu travels as an xz tarball of the installed package cut into
# parts (.ortgpu/p*/part*, ignored by git); other wheels as .whl/*.whl. Everything installs into
# $SITE, first on PYTHONPATH, so it shadows a CPU onnxruntime that may be preinstalled: only one
# onnxruntime is ever importable (docs/gpu.md: onnxruntime-gpu instead of onnxruntime, never both).
#
# Everything runs from a copy of the code in $SRC (outside the checkout), laid out as the installed
# package (service/ -> rmserve/, models/ -> rmserve/models/): a device call re-sends the carried
# folders, and a background export started from them dies when the next call replaces them.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
SRC=${SRC:-/tmp/rmserve-src}
WORK=${WORK:-/tmp/gpucheck}
OUT=${OUT:-/tmp/gpucheck-out}
MODELS=${MODELS:-qwen2-0.5b,qwen2-1.5b,qwen3-1.7b,llama-8b-l8}
PY=${PYTHON:-python3}
export PYTHONPATH="$SITE:$SRC" PYTHONUNBUFFERED=1
mkdir -p "$SITE" "$WORK" "$OUT" /tmp/ortparts

copy_source() {
  # Once per machine: a later call must not replace the files a background export is reading.
  [ -f "$SRC/.complete" ] && return 0
  rm -rf "$SRC" && mkdir -p "$SRC"
  cp -r service "$SRC/rmserve" && cp -r models "$SRC/rmserve/models"
  cp -r loadtests tests pyproject.toml "$SRC/"
  touch "$SRC/.complete"
}

prepare() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  fi
  for part in .ortgpu/p*/part*; do [ -e "$part" ] && cp "$part" /tmp/ortparts/; done
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  copy_source
  # torch-only stage, one process per model (the dynamo exporter traces on one core: about 1 min per
  # 28-layer model); setsid so they outlive this command while the next part travels.
  for model in ${MODELS//,/ }; do
    setsid nohup "$PY" "$SRC/loadtests/gpu_check.py" --stage export --models "$model" --work "$WORK" \
      >"$WORK/export-$model.log" 2>&1 </dev/null &
  done
  echo "exports started (logs: $WORK/export-*.log)"
}

install_ortgpu() {
  for part in .ortgpu/p*/part*; do [ -e "$part" ] && cp "$part" /tmp/ortparts/; done
  if compgen -G "/tmp/ortparts/part*" >/dev/null; then
    cat /tmp/ortparts/part* >/tmp/ortgpu.tar.xz
    if [ -f .ortgpu/SHA256 ]; then
      echo "$(cut -d' ' -f1 .ortgpu/SHA256)  /tmp/ortgpu.tar.xz" | sha256sum -c -
    fi
    tar -xJf /tmp/ortgpu.tar.xz -C "$SITE"
  fi
  "$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
}

serve() {
  local status=0
  copy_source
  # Rows print as they complete and $OUT/gpu_check.{md,json} are rewritten after each one, so a run
  # cut short by the device's time limit still leaves its partial table.
  "$PY" "$SRC/loadtests/gpu_check.py" --stage serve --models "$MODELS" --work "$WORK" --out "$OUT" \
    --deadline-s "${DEADLINE_S:-480}" --wait-s "${WAIT_S:-300}" 2>&1 | tee "$OUT/gpu_check.log" || status=$?
  cat "$WORK"/export*.log 2>/dev/null | grep -v "TracerWarning\|torchvision\|^  " >"$OUT/export.log" || true
  return $status
}

case "${1:-all}" in
  prepare) prepare ;;
  run) install_ortgpu && serve ;;
  dry) copy_source && "$PY" "$SRC/loadtests/gpu_check.py" --cpu-dry-run --work "$WORK-dry" --out "$OUT" ;;
  all)
    copy_source
    "$PY" "$SRC/loadtests/gpu_check.py" --stage export --models "$MODELS" --work "$WORK" 2>&1 | tee "$WORK/export.log"
    serve ;;
  *) echo "usage: $0 [all|prepare|run|dry]" >&2; exit 2 ;;
esac
