#!/usr/bin/env bash
# Run on the GPU machine (the device tool), from the repository root, with .whl/ carried along (made here by
# ../shared/device/wheels.sh). It installs what the machine's image lacks, then runs the GPU tests and the
# benchmarks named on the command line:  scripts/device_check.sh tests bench-dequant bench-qwen ...
# Output: a short summary on stdout; full logs under $OUT (when set).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || { echo "wheel install failed"; exit 1; }
# The working tree first, so the code under test is this checkout's; /tmp/site for dependencies and entry points.
export PYTHONPATH=$PWD:$PWD/plugins/quant_formats:$PWD/plugins/llama_adapter:$PWD/plugins/gpt_adapter:/tmp/site
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'
models=/tmp/models; mkdir -p $models

for step in "$@"; do
  echo "=== $step"
  t0=$(date +%s)
  case $step in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests > "$OUT/gpu-tests.log" 2>&1
      tail -n 25 "$OUT/gpu-tests.log" ;;
    bench-dequant)
      python3 -m orcd.bench.dequant --device cuda --no-gguf 2>&1 | tee "$OUT/bench-dequant.txt" ;;
    synth-*)  # synth-ARCH:PRESET:TYPE
      IFS=: read -r arch preset ftype <<< "${step#synth-}"
      python3 -m orcd.cli synth --arch "$arch" --preset "$preset" --type "$ftype" -o "$models/$arch-$preset-$ftype.gguf" \
        > "$OUT/synth-$arch-$preset.log" 2>&1 || tail -n 5 "$OUT/synth-$arch-$preset.log"
      ls -la "$models/$arch-$preset-$ftype.gguf" ;;
    bench-*)  # bench-ARCH:PRESET:TYPE (after synth-...)
      IFS=: read -r arch preset ftype <<< "${step#bench-}"
      python3 -m orcd.cli bench model --model "$models/$arch-$preset-$ftype.gguf" --device cuda --peer none \
        --prompt-tokens "${PROMPT_TOKENS:-512}" --decode-tokens "${DECODE_TOKENS:-128}" 2>&1 | tee "$OUT/bench-$arch-$preset.txt" | tail -n 6 ;;
    *) eval "$step" ;;
  esac
  echo "--- $step: $(( $(date +%s) - t0 )) s"
done
