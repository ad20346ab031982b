#!/usr/bin/env bash
# Run on the GPU machine (the device tool), from the repository root, with .whl/ carried along (made here by
# ../shared/device/wheels.sh). It installs what the machine's image lacks, then runs the GPU tests and the
# benchmarks named on the command line:  scripts/device_check.sh tests-fast synth-... bench-... (see docs/benchmarking.md)
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
# Triton compiles each kernel variant on first use (seconds each; minutes for a model's set). A cache from an earlier
# call (.peer/triton-cache.tgz, or its parts .peer/triton-cache.txz.NN, copied from that call's $OUT) starts this one
# warm; this call's cache goes to $OUT, xz-compressed and cut into parts under the 16 MiB a returned file may have
# (a cold run of the whole GPU suite made a gzip archive over that, 2026-12-08). At most 3 parts: a file beyond the
# 8 that come back is lost.
export TRITON_CACHE_DIR=/tmp/triton-cache; mkdir -p "$TRITON_CACHE_DIR"
if ls .peer/triton-cache.txz.* >/dev/null 2>&1; then cat .peer/triton-cache.txz.* | tar xJf - -C "$TRITON_CACHE_DIR"
elif [ -f .peer/triton-cache.tgz ]; then tar xzf .peer/triton-cache.tgz -C "$TRITON_CACHE_DIR"; fi
save_cache() { tar cJf - -C "$TRITON_CACHE_DIR" . 2>/dev/null | split -b 15000000 -d -a 2 - "$OUT/triton-cache.txz."
  [ ! -e "$OUT/triton-cache.txz.03" ] || rm -f "$OUT"/triton-cache.txz.*; }
trap save_cache EXIT
trap "exit 143" TERM INT  # the device tool's time limit: exit through the EXIT trap

for step in "$@"; do
  echo "=== $step"
  t0=$(date +%s)
  case $step in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests > "$OUT/gpu-tests.log" 2>&1
      tail -n 25 "$OUT/gpu-tests.log" ;;
    tests-fast)  # the model-level GPU tests and the kernels that have not run on a GPU yet, bounded in time
      timeout "${STEP_TIMEOUT:-420}" python3 -m pytest -q -m gpu -p no:cacheprovider -rf tests/test_moe_kernels.py tests/test_prefill_attention.py \
        tests/test_cuda_graphs.py tests/test_gpt_oss_gpu.py tests/test_device.py tests/test_engine.py tests/test_fusion.py \
        tests/test_server_gpu.py "tests/test_kernels.py::test_fitted_dot_launches_compile_within_h100_shared_memory" \
        > "$OUT/gpu-tests-fast.log" 2>&1
      tail -n 25 "$OUT/gpu-tests-fast.log" ;;
    tests-par)  # the GPU tests in several processes at once, so cold Triton compiles (one process compiles one
      # kernel at a time) overlap; they share the cache. One group per process (TEST_GROUPS, ';'-separated), each
      # bounded by STEP_TIMEOUT, with its own -v log: a group that a limit stops still names what passed.
      # (the 2026-12-08 run's six groups took up to 410 s from a cold cache, but test_engine.py's did not finish in
      # 420: its one GPU test, six cases, is now two groups, qwen2 and phi3, compiling side by side)
      groups=${TEST_GROUPS:-"tests/test_engine.py -k qwen2;tests/test_engine.py -k phi3;tests/test_gpt_oss_gpu.py tests/test_quant_linear.py;tests/test_cuda_graphs.py tests/test_decode_attention.py tests/test_fusion.py;tests/test_device.py tests/test_server_gpu.py tests/test_prefill_attention.py tests/test_moe_kernels.py;tests/test_kernels.py tests/test_norm_kernels.py tests/test_rotary_kernels.py;tests/test_reference_transformers.py"}
      [ -d /tmp/llama-site ] && export PYTHONPATH=$PYTHONPATH:/tmp/llama-site
      IFS=';' read -ra parts <<< "$groups"; pids=()
      for i in "${!parts[@]}"; do
        timeout "${STEP_TIMEOUT:-420}" python3 -m pytest -v -m gpu -p no:cacheprovider -rf ${parts[$i]} \
          > "$OUT/gpu-par-$i.log" 2>&1 & pids+=($!)
      done
      for i in "${!parts[@]}"; do
        wait "${pids[$i]}"; rc=$?
        echo "group $i (${parts[$i]}): exit $rc, $(grep -c ' PASSED' "$OUT/gpu-par-$i.log") passed," \
          "$(grep -c ' FAILED' "$OUT/gpu-par-$i.log") failed, $(grep -c ' SKIPPED' "$OUT/gpu-par-$i.log") skipped"
        grep -E '^(FAILED|ERROR) ' "$OUT/gpu-par-$i.log" | head -n 10
      done ;;
    bench-dequant)
      python3 -m orcd.bench.dequant --device cuda --no-gguf 2>&1 | tee "$OUT/bench-dequant.txt" ;;
    synth-*)  # synth-ARCH:PRESET:TYPE
      IFS=: read -r arch preset ftype <<< "${step#synth-}"
      python3 -m orcd.cli synth --arch "$arch" --preset "$preset" --type "$ftype" -o "$models/$arch-$preset-$ftype.gguf" \
        > "$OUT/synth-$arch-$preset.log" 2>&1 || tail -n 5 "$OUT/synth-$arch-$preset.log"
      ls -la "$models/$arch-$preset-$ftype.gguf" ;;
    build-llama)  # llama.cpp with CUDA as the peer (.peer/ holds the trimmed llama-cpp-python sdist; ~5 min)
      repo=$PWD
      (cd /tmp && tar xzf "$repo/.peer/llama-cpp-python-trim.tar.gz" && cd llama_cpp_python-* && \
        python3 -m pip install -q --no-index --no-deps --target /tmp/site "$repo"/.peer/diskcache-*.whl && \
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-build-isolation --no-deps --no-index --target /tmp/site . \
        > "$OUT/llama-build.log" 2>&1) || tail -n 20 "$OUT/llama-build.log"
      python3 -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)' ;;
    build-llama-bg)  # the same build in the background on cores BUILD_CPUS (default 2-15; run this script under
      # taskset -c on the others), so the steps after it measure while it compiles; wait-llama waits for it and
      # puts it on PYTHONPATH
      repo=$PWD
      setsid nohup taskset -c "${BUILD_CPUS:-2-15}" bash -c "cd /tmp && tar xzf '$repo/.peer/llama-cpp-python-trim.tar.gz' && \
        cd llama_cpp_python-* && python3 -m pip install -q --no-index --no-deps --target /tmp/llama-site \
        '$repo'/.peer/diskcache-*.whl && CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF' CMAKE_BUILD_PARALLEL_LEVEL=14 python3 -m pip install \
        --no-build-isolation --no-deps --no-index --target /tmp/llama-site . > /tmp/llama-build.log 2>&1; \
        echo rc=\$? >> /tmp/llama-build.log" > /dev/null 2>&1 < /dev/null &
      echo "llama.cpp build started in the background" ;;
    wait-llama)
      for _ in $(seq 120); do grep -q '^rc=' /tmp/llama-build.log 2>/dev/null && break; sleep 5; done
      tail -n 3 /tmp/llama-build.log; cp /tmp/llama-build.log "$OUT/" 2>/dev/null
      export PYTHONPATH=$PYTHONPATH:/tmp/llama-site
      python3 -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)' ;;
    bench-*)  # bench-ARCH:PRESET:TYPE (after synth-...); BENCH_ARGS adds e.g. --streams 1,8,32 --peer llama.cpp
      IFS=: read -r arch preset ftype <<< "${step#bench-}"
      timeout "${STEP_TIMEOUT:-540}" python3 -m orcd.cli bench model --model "$models/$arch-$preset-$ftype.gguf" --device cuda \
        --prompt-tokens "${PROMPT_TOKENS:-512}" --decode-tokens "${DECODE_TOKENS:-128}" ${BENCH_ARGS:---peer none} \
        2>&1 | tee -a "$OUT/bench-$arch-$preset.txt" | tail -n 24 ;;
    profile-*)  # profile-ARCH:PRESET:TYPE: where a batch-1 decode step's time goes (PROFILE_ARGS adds e.g. --streams 8)
      IFS=: read -r arch preset ftype <<< "${step#profile-}"
      timeout "${STEP_TIMEOUT:-300}" python3 -m orcd.cli bench profile --model "$models/$arch-$preset-$ftype.gguf" \
        --steps 32 --top 25 ${PROFILE_ARGS:-} > "$OUT/profile-$arch-$preset.txt" 2>&1
      tail -n 30 "$OUT/profile-$arch-$preset.txt" ;;
    sweep-*)  # sweep-ARCH:PRESET:TYPE: the decode launch grid on that model's projections (SWEEP_M rows of x,
      # default 1); the table goes to $OUT
      IFS=: read -r arch preset ftype <<< "${step#sweep-}"
      timeout "${STEP_TIMEOUT:-300}" python3 -m orcd.cli bench kernels --m "${SWEEP_M:-1}" --dtype float32 --sweep \
        --repeat 10 --model "$models/$arch-$preset-$ftype.gguf" --tuning-out "$OUT/tuned-$arch-$preset-m${SWEEP_M:-1}.json" \
        > "$OUT/sweep-$arch-$preset-m${SWEEP_M:-1}.txt" 2>&1
      tail -n 15 "$OUT/sweep-$arch-$preset-m${SWEEP_M:-1}.txt" ;;
    merge-tuning)  # the packaged table of this GPU plus every table this call's sweeps wrote (later sweeps win), as
      # $OUT/tuned-merged.json, which the later steps of this call use (ORCD_KERNEL_TUNING): sweep, then bench the
      # winners in one call
      python3 - "$OUT" <<'PY'
import glob, json, sys
import torch
from orcd_quant_formats.kernels import tuning
out, name = sys.argv[1], torch.cuda.get_device_name()
merged = dict(tuning.table(name))
for path in sorted(glob.glob(f"{out}/tuned-*-m*.json")):
    merged.update(json.load(open(path))["configs"])
tuning.write(f"{out}/tuned-merged.json", name, merged)
print(len(merged), "entries;", sum(1 for c in merged.values() if c.get("codes")), "code-dot")
PY
      export ORCD_KERNEL_TUNING="$OUT/tuned-merged.json" ;;
    *) eval "$step" ;;
  esac
  echo "--- $step: $(( $(date +%s) - t0 )) s"
done
