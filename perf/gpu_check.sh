#!/usr/bin/env bash
# One device call: GPU tests and/or benchmarks. Logs and JSON land in $OUT (packed into results.tgz when
# there are more than the 8 files the device tool brings back).
# First, here: bash perf/fetch_wheels.sh (wheels the device lacks; the call carries ".whl", and ".whl-bnb" for
# bitsandbytes). Compile caches: SAVE_COMPILE_CACHE=1 sends them back, `bash perf/compile_cache.sh FILES_DIR` keeps
# them here, and a call that carries ".compile_cache.tgz" starts warm (see COMPILE_CACHE below).
# Usage (on the lent GPU, from the repo root): bash perf/gpu_check.sh STAGE...
#   card    the card: nvidia-smi's name, memory, clocks, driver; a plain streaming read's GB/s (kernel_bench's), the
#           ceiling nano's bandwidth floor is worked out from (perf/RESULTS.md, "Where the time goes on nano")
#   tests   pytest -m gpu (attention kernels, the GPU engine, the fused sampler, the GEMV, the q/k norm kernel)
#   nano    Qwen3-0.6B, nano workload (nano-sync: without async scheduling; nano-nc: graphs without torch.compile;
#           nano-silu: with the SwiGLU activation left to torch.compile, then as it is;
#           nano-fp8: with an fp8 KV cache)
#   llama1  Llama-3.1-8B, batch 1, 128 in / 512 out
#           (llama1-sync: without async scheduling; llama1-parts: then again with 512-position decode partitions,
#           as before small batches got smaller ones)
#   llama1-minpart llama1 with decode partitions down to 128 positions (default) and 64, alternating twice, profiled
#   pdl-ab  programmatic dependent launch (ENGINE_PDL=1): GEMV + GPU-engine tests with it, llama1 without / with, twice
#   tp-pdl-ab (2 GPUs) the greedy TP test with ENGINE_PDL=1, then batch 1 at TP=2 and TP=1, each without / with it
#   inductor-ab llama1 with inductor's defaults, then each option set of INDUCTOR_AB (ENGINE_INDUCTOR_OPTIONS), profiled
#   llama   Llama-3.1-8B, fixed 1000 x 256 in x 256 out (llama-fp8: with an fp8 KV cache)
#   window-nano nano with an fp8 cache profiled at step 200 (full batch) and step 900 (its tail)
#   nano-large-parts (#3) 4,096-position decode partitions at 256 sequences (LARGE_GRID_PARTITION_SIZE): nano, fixed 8B, A/B
#   nano-host (#3) nano (bf16), the timed generate under cProfile (perf/throughput.py --host-profile)
#   nano-mixed8192 (#3) nano (bf16) with prefill / mixed-step graphs up to 8,192 tokens: profiled by phase, then timed without / with
#   merge-ab (#3) decode partitions merged in the decode kernel (default) or by the reduce kernel: attention GPU tests,
#           kernel_bench --nano both ways, nano alternating twice (profiled at step 200)
#   merge-parts (#3) kernel_bench --nano: the decode step (partitions merged in the kernel) at 512-4,096-position partitions
#   nano-depth-ab (#3) nano (bf16) with one and two launched steps in flight (ENGINE_ASYNC_DEPTH), alternating, then profiled
#   decode-pipe (#3) kernel_bench --nano: the decode kernel's K/V double-buffered (5+ stages; 32 / 16 positions a loop step);
#           the best one's decode GPU tests, then nano against the defaults, alternating twice (profiled at step 200)
#   fp8-stages (#3) fp8 GPU attention tests; kernel_bench --nano --write-kv and --nano-prefill; nano fp8 at 2 / 5 decode stages
#   prefill-tiles (#3) kernel_bench --nano-prefill; the best variant's prefill GPU tests; nano against it, profiled steps 1-18
#   depth-tests the GPU-engine tests with ENGINE_ASYNC_DEPTH=2
#   engine-tests the GPU-engine tests (greedy tokens against transformers and eager) with the q/k norm and fused-norm kernels
#   nano-p4096-ab (#3) nano (bf16), 1,024- and 4,096-position decode partitions at full batch, alternating twice, profiled
#   nano-run-profile (#3) nano (bf16) profiled over the whole run: GPU busy against wall, the 60 largest kernels
#   qk-norm-ab (#3) ENGINE_QK_NORM_KERNEL=1 (Qwen3's q/k norm + rotation as one kernel): its GPU tests, nano off / on twice, profiled
#   small-kernels-ab (#3) nano (bf16) as it is and with ENGINE_FUSED_NORM=1 ENGINE_QK_NORM_KERNEL=1 ENGINE_TOKEN_DIM=backed, twice, profiled
#   blas-lt-ab (#3) nano (bf16), torch's default BLAS path against preferred_blas_library("cublaslt"), twice, profiled
#   nano-order-ab (#3) nano (bf16), decode steps in admission order and longest context first (ENGINE_DECODE_ORDER), twice, profiled
#   nano-backed-ab (#3) nano (bf16), the token dimension unbacked (default) and backed, alternating twice, timed only
#   fusion-probe the Triton kernels inductor makes of add + RMSNorm + linear, token dimension unbacked / backed / static
#   token-dim-ab nano and llama1 with the token dimension unbacked, then backed (ENGINE_TOKEN_DIM), profiled
#   gluon   the Gluon 256-row W4A16 GEMM: its GPU tests, quant_bench 70B shapes at 256 rows against the tl kernel and bf16
#   swapab  the swap-AB Gluon GEMM: GPU tests (its own, the engine op's), quant_bench 70B shapes at 1-256 rows
#   swapab-sk the stream-K swap-AB kernel: the swap-AB GPU tests, quant_bench 70B shapes at 128-256 rows with / without it
#   swapab-sk-ncu Nsight Compute on the split / stream-K epilogues (70B qkv stream-K, o split and whole, 256 rows)
#   swapab-auto ENGINE_SWAPAB_GEMM=auto (the default): the dual op's GPU test, 8B AWQ batch 1 and fixed
#   swapab-large engine::swapab_matmul at 256-8,192 rows (70B shapes), the kernel against dequantize_swapab + cuBLAS
#   swapab-8b Llama-3.1-8B AWQ batch 1 and fixed without / with ENGINE_SWAPAB_GEMM=1
#   swapab-ncu Nsight Compute on the swap-AB GEMM (70B gate_up, 256 rows)
#   swapab-op engine::swapab_matmul's GPU test (the op ENGINE_SWAPAB_GEMM=1 routes 4-bit layers through)
#   gluon-ncu Nsight Compute on the Gluon GEMM (70B gate_up and down, 256 rows): stall reasons, per-SASS-instruction samples
#   dequant-gemm ENGINE_DEQUANT_GEMM_ROWS's GPU test, quant_bench 70B shapes at 256-8,192 rows without / with it from 1,024
#   fused-norm-ab ENGINE_FUSED_NORM=1 (TP=1 add + RMSNorm in one kernel): GPU tests with it, llama1 and nano without / with, profiled
#   nano-decode (#3) the decode kernel on nano's steps as its graphs run them (perf/kernel_bench.py --nano: grid order,
#           partition size, tiles, the reduce kernel's heads a program), and a plain streaming read for the ceiling
#   nano-hf-ab (#3) nano (bf16), the decode grid (seq, head) and heads first, alternating twice; then a traced run
#   nano-hf-pdl (#3) nano (bf16) with the decode grid (seq, head), heads first (_DECODE_HEADS_FIRST), then that with PDL
#           wherever it can be (TORCHINDUCTOR_ENABLE_PDL=1: inductor's kernels; ENGINE_PDL=1: ours), each timed then
#           profiled at step 200; then the GPU-engine tests under PDL (greedy tokens against transformers)
#   nano-profile nano (bf16) profiled at step 200 (full batch) and 700 (~100 sequences), every GPU op listed
#   nano-parts-ab nano with 512- and 1,024-position decode partitions, alternating twice (fp8 cache, then bf16)
#   nano-parts nano (bf16, fp8 caches) with 1,024- and 2,048-position decode partitions (run `nano` / `nano-fp8` beside it)
#   nofuse  llama1 and nano with the KV write as its own kernel in decode steps (run `llama1 nano` beside it)
#   nano-ab nano four times in one call: as it is, with the KV write as its own kernel (FUSE_DECODE_KV_WRITE = False),
#           with the torch sampler (engine.sampler.FUSED_SAMPLING_DEVICES = ()), and as it is again (the first run
#           of a call pays for Triton compiles an empty cache makes, see "Triton compiles in the timed run")
#   serve-offline the server / offline ratio on one workload: LLM.generate (throughput.py, fixed 256 x 550 x 520, greedy),
#           then the same requests against `python -m engine.serve --engine-process` (serve_bench --dataset fixed)
#   serve-spread serve-offline twice, alternating (offline, server, offline, server): the ratio's spread on one machine
#   serve-pin serve-offline, then the server again with its engine process, its front and the client pinned to
#           physical cores of their own (lscpu's topology in lscpu.txt)
#   nano-gc nano with empty compile caches (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR fresh), as it is, then with
#           gc.freeze() after the engine starts, then warm (the second run's caches) as it is: is the slow first run
#           of a call the garbage collector walking what a cold compile left behind? (the "GC:" line)
#   hf      nano (first 64 requests) through the engine and transformers, same run
#   prefix  Qwen3-0.6B, 256 requests sharing a 2,000-token prefix, caching off then on (prefix8: 8 output tokens, not 32)
#   latency Qwen3-0.6B per-phase decode step times at batch 1/64/256, context 1024 (perf/latency.py)
#   window  each of nano, llama1, llama run twice: timed, then under the profiler over a window of steps
#           (perf/step_profile.py: GPU busy time a step, top GPU ops and host CUDA calls)
#   profile torch-profiler tables (top kernels) of a Qwen3-0.6B prefill of 1024 and decode at 256 x 1024,
#           and a Llama-3.1-8B batch-1 decode step, in $OUT/trace/*.txt
#   serve   the server's cost on nano-like traffic (perf/latency.py --server: engine vs async front vs HTTP,
#           256 requests, with its prefill and decode-step sweeps; then the same requests against `python -m engine.serve
#           --engine-process`, to set against latency.py's engine figure), then a Llama-3.1-8B server (python -m
#           engine.serve, dummy weights) under perf/serve_bench.py: concurrency 1 at 128 in / 256 out, random 1024 / 128
#           at rates 1, 4, 16, inf and at concurrency 4, 16, 64 (then here: python3 perf/plot.py *.json)
#   serve-c1 the same without the request-rate sweep
#   serve-ratio the server / offline part of serve alone (Qwen3-0.6B, 256 requests: engine, async front, HTTP, engine process)
#   serve-spy py-spy (carried as a wheel) samples the Qwen3-0.6B server's threads, in-process and with
#           --engine-process, during the 256-request run above; raw stacks in $OUT/spy_*.txt
#   quant   Triton quantized-matmul GPU tests (tests/test_triton_quant.py), then perf/quant_bench.py
#   quant-ncu Nsight Compute on the planar 4-bit kernel at 1 and 2 rows (gate_up; 5 launches each): $OUT/planar.ncu-rep
#           and a text summary (why two rows cost what they do)
#   mixed   prefill / mixed-step CUDA graphs (on by default; --mixed-cuda-graph-sizes 0: none): Llama-3.1-8B prefill time
#           at 16 / 128 / 512 / 2,048 tokens without and with them (perf/latency.py)
#   gemv    the Triton GEMV's GPU tests (tests/test_triton_gemv.py), then perf/gemv_bench.py --sweep --int8 (every tile
#           of a grid against cuBLAS on Llama-3.1-8B's shapes at 1 and 2 rows)
#   gemv-tp2 perf/gemv_bench.py's tile grid at TP=2's shapes (and TP=1's qkv, o, down), one row, at 4 / 8 / 16 programs an SM
#   nogemv  llama1 with cuBLAS for every dense matmul (ENGINE_GEMV=0: no GEMV), to set against `llama1` in the same call
#   c1-first the 8B server at debug level, 3 requests one at a time: the log lines from the first request's arrival on
#   c1      the 8B server at concurrency 1 as it is (128 / 256, 24 prompts, no warm-up request: the first one's TTFT)
#   c1-gemv the 8B server at concurrency 1 as c1-pair (default graphs), without (ENGINE_GEMV=0) then with the GEMV
#   sampler the fused sampling kernel's GPU tests, then perf/sampler_bench.py (torch path vs fused, 1 / 64 / 256 rows)
#   c1-pair the 8B server at concurrency 1 (128 / 256, 24 prompts, no warm-up request: the first one's TTFT is printed)
#           without (--mixed-cuda-graph-sizes 0) then with mixed-step graphs
#   gemm-ncu Nsight Compute on the 4-bit GEMM path (the packed W-as-B tiles) at 128 and 256 rows (gate_up; the
#           first launches of each): $OUT/gemm.ncu-rep and a text summary (why 256 rows cost 1.6x 128)
#   tp70    (2 GPUs) Llama-3.1-70B-shaped with 20 of its 80 layers at TP=2: batch-1 decode, fixed 256 x 1024 x 256
#           (issue 8's stand-in while no 4-GPU machine is lent)
#   tp4-70b (4 GPUs) Llama-3.1-70B (all 80 layers, bf16, random weights made shard by shard) at TP=4: batch-1
#           decode 128 / 512, then fixed 256 x 1024 x 256; each run ends with 8 fixed prompts greedy, compared
#   tp      (2 GPUs) tensor-parallel GPU tests, then Llama-3.1-8B batch-1 decode (async, sync) and fixed 1000 x 256 x 256 at TP=2
#   awq1    Llama-3.1-8B AWQ batch 1 (128 / 512) alone
#   awq-mem awq1 with its memory log lines, then the compiled Triton kernels by stack a thread (perf/lmem_scan.py);
#           on failure awq1 again without prefill / mixed-step graphs
#   quant1  the int8 quant GPU tests (one and two rows now go through the GEMV), then Llama-3.1-8B batch 1 (128 / 512) AWQ
#           and int8
#   tp-diag (2 GPUs) the TP GPU tests, then TP=2 batch 1 with host-work / wait figures of every rank and a profiled window
#           on each rank
#   tp-ratio (2 GPUs) Llama-3.1-8B batch 1 at TP=2 then TP=1, each timed, then profiled (steps 100-119, every GPU op)
#   tp-profile (2 GPUs) tp-diag without its tests: TP=2 batch 1, host work / wait of every rank, each rank's profiled window
#   tp-tests (2 GPUs) the TP GPU tests alone, in three pytest processes (one engine a process gets the custom all-reduce;
#           the worker-failure one dumps its threads' stacks if it runs past 150 s)
#   tp-fused (2 GPUs) the all-reduce fused with the residual add and RMSNorm (ops.triton_allreduce): allreduce_bench, its
#           GPU test, Llama-3.1-8B batch 1 (128 / 512) at TP=2 with it, without it (ENGINE_FUSED_ALLREDUCE=0), at TP=1
#   fused-check (2 GPUs) perf/fused_allreduce_check.py (both fused kernels: one call at a time, bursts, a CUDA graph, each
#           checked against NCCL with diagnostics at the first wrong row), then the fused GPU test with the barrier-based kernel
#   tp-verify (2 GPUs) the fused all-reduce's GPU test, greedy TP=2 == TP=1 (compiled-async), Llama-3.1-8B batch 1
#           (128 / 512) at TP=2 and TP=1, allreduce_bench
#   tp-failure (2 GPUs) the worker-failure test alone
#   tp-greedy (2 GPUs) tp-verify's two tests alone (the fused all-reduce's GPU test; greedy TP=2 == TP=1, compiled-async)
#   tp-ab   (2 GPUs) Llama-3.1-8B batch 1 (128 / 512) at TP=2 with NCCL only, then with the custom all-reduce (tp-ar's order
#           reversed)
#   tp-ar   (2 GPUs) the custom all-reduce (#7): its latency in CUDA graphs against NCCL's (perf/allreduce_bench.py), its
#           GPU test, then Llama-3.1-8B batch 1 (128 / 512) at TP=2 with it, at TP=2 with NCCL only
#           (--disable-custom-all-reduce), and at TP=1 (GPU 0), same call; the worker-failure test last
#   actorder the GPTQ act-order kernels sorted at load (f1b8430): their GPU test and quant_bench against GPTQ without act-order
#   actorder8b Llama-3.1-8B GPTQ batch 1 (128 / 512) without, then with act-order (shuffled groups, sorted at load)
#   tp-quick (2 GPUs) Llama-3.1-8B batch 1 (128 / 512) at TP=2, then TP=1 (GPU 0), same call; then the TP GPU tests
#   quant8b Llama-3.1-8B batch 1 (128 / 512) AWQ, int8; fixed 1000 x 256 x 256 AWQ, int8, bitsandbytes (bf16: llama)
#   awq-wide the planar kernel's GPU tests, quant_bench of the default tiles against session 6's (session6) at
#           1 and 2 rows, and Llama-3.1-8B AWQ batch 1 (128 / 512) with each table
#   planar-sweep awq-sweep's quant_bench alone
#   awq-sweep quant_bench of the one-row planar tiles around the default (--planar-sweep: columns and warps, stages,
#           programs an SM, K ranges), then Llama-3.1-8B AWQ batch 1 (128 / 512) timed and profiled over steps 100-119
#           (where a step's 3.4 ms go besides the 4-bit matmuls' ~2.1)
#   quant70b Llama-3.1-70B AWQ (random 4-bit weights, 37 GiB), one GPU: batch 1 (128 / 256), then fixed 1000 x 128 x 512
#           (a call of its own: each start takes ~130 s); quant70b-fixed: the fixed run alone, at most 128
#           sequences a step (one 128-row tile of the 4-bit GEMM); quant70b-fixed-fp8: with an fp8 KV cache
#           (room for ~314 sequences) and up to 256 a step
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Compile caches kept from call to call: a fresh machine spends ~25-60 s a model start compiling (torch.compile's
# graphs, Triton's kernels) what an earlier call compiled. A carried .compile_cache.tgz (perf/compile_cache.sh keeps
# one here) is unpacked first; with SAVE_COMPILE_CACHE=1 both caches go back packed, in parts of 15 MiB at most
# ($OUT/compile_cache.tgz.partNN, at most 3: the device tool returns 16 MiB a file, 64 MiB in all, so not beside
# Nsight reports). Stages that time a cold start (nano-gc) set fresh directories of their own. A call carries 64 MiB:
# .whl (13 MB) and the cache fit; .whl-bnb (43 MB) leaves room for a cache of ~8 MiB only.
COMPILE_CACHE=/tmp/compile_cache
mkdir -p "$COMPILE_CACHE"
if [ -f .compile_cache.tgz ]; then
  tar xzf .compile_cache.tgz -C "$COMPILE_CACHE" && echo "compile cache: unpacked $(du -sh "$COMPILE_CACHE" | cut -f1)"
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$COMPILE_CACHE/inductor} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$COMPILE_CACHE/triton}
save_compile_cache() {
  [ "${SAVE_COMPILE_CACHE:-0}" = 1 ] || return 0
  tar czf /tmp/compile_cache.tgz -C "$COMPILE_CACHE" . || return 0
  local size; size=$(stat -c %s /tmp/compile_cache.tgz)
  echo "compile cache: $(du -sh "$COMPILE_CACHE" | cut -f1) unpacked, $((size >> 20)) MiB packed"
  if [ "$size" -gt $((45 << 20)) ]; then echo "compile cache: over 45 MiB packed, not returned"; return 0; fi
  split -b 15m -d /tmp/compile_cache.tgz "$OUT/compile_cache.tgz.part"
}
# The device tool brings back at most 8 files from $OUT: at exit, more than that are packed into
# $OUT/results.tgz (Nsight reports and the compile cache's parts stay beside it; unpack with `tar xzf results.tgz`).
pack_results() {
  save_compile_cache
  local n kept; n=$(find "$OUT" -mindepth 1 ! -name '*.ncu-rep' ! -name 'compile_cache.tgz.part*' | wc -l)
  kept=$(find "$OUT" -mindepth 1 -maxdepth 1 \( -name '*.ncu-rep' -o -name 'compile_cache.tgz.part*' \) | wc -l)
  if [ $((n + kept)) -gt 8 ]; then
    tar czf /tmp/results.tgz -C "$OUT" --exclude='*.ncu-rep' --exclude='compile_cache.tgz.part*' . \
      && find "$OUT" -mindepth 1 -maxdepth 1 ! -name '*.ncu-rep' ! -name 'compile_cache.tgz.part*' -exec rm -rf {} + \
      && mv /tmp/results.tgz "$OUT/"
  fi
}
trap pack_results EXIT
# Wheels the device lacks (perf/fetch_wheels.sh): .whl always, .whl-bnb (bitsandbytes, 43 MB) for the stages that need it.
wheels=$(ls .whl/*.whl .whl-bnb/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
bench() { local name=$1; shift; timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" | grep -vE "^\{|Capturing" | tail -12; }
# The fixed 256 x 550 x 520 requests against `python -m engine.serve --engine-process` on Qwen3-0.6B (dummy weights);
# PIN_FRONT / PIN_ENGINE / PIN_CLIENT: CPU lists (taskset -c) for the server's front, its engine process, the client.
serve_fixed256() {
  local name=$1 qdir=$2 epserver engine_pid
  ${PIN_FRONT:+taskset -c $PIN_FRONT} python3 -m engine.serve --model "$qdir" --load-format dummy --max-model-len 4096 \
    --port 8013 --engine-process > "$OUT/$name.log" 2>&1 & epserver=$!
  for _ in $(seq 240); do curl -sf localhost:8013/health >/dev/null && break; sleep 1; done
  if [ -n "${PIN_ENGINE:-}" ]; then
    engine_pid=$(grep -oP "engine process \K[0-9]+(?= serves)" "$OUT/$name.log" | head -1)
    taskset -a -c -p "$PIN_ENGINE" "$engine_pid" | tail -1
  fi
  timeout 200 ${PIN_CLIENT:+taskset -c $PIN_CLIENT} python3 perf/serve_bench.py --base-url http://127.0.0.1:8013 \
    --dataset fixed --num-prompts 256 --input-len 550 --output-len 520 --temperature 0 --ignore-eos --disable-tqdm \
    --result-json "$OUT/$name.json" 2>&1 | grep -E "duration|Output token|Client|Median T"
  kill $epserver; wait $epserver
  grep -h "engine process:" "$OUT/$name.log"
}
# profiled_ab VAR "name;value;workload"...: each run with VAR=value, timed then profiled (GPU ops a step); workload nano
# (Qwen3-0.6B, profiled at step 200) or llama1 (Llama-3.1-8B batch 1, 128 / 512, steps 100-119)
profiled_ab() {
  local var=$1 spec name value workload wl; shift
  for spec in "$@"; do
    IFS=";" read -r name value workload <<< "$spec"
    if [ "$workload" = nano ]; then wl=(--model qwen3-0.6b --workload nano --profile-steps 200 10)
    else wl=(--model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --profile-steps 100 20); fi
    env "$var=$value" timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" \
      "${wl[@]}" 2>&1 | tee "$OUT/$name.log" | grep -E "engine:|profiled steps|recompile|Error" | sed "s/^/[$name] /"
  done
}
# nano_setup_ab "PYTHON" "name;value"...: nano (bf16) run with PYTHON executed first (VALUE in it replaced by each spec's
# value; e.g. a module constant set), timed then profiled at step 200 (NANO_PROFILE_STEPS="FIRST COUNT" for others)
nano_setup_ab() {
  local code=$1 spec name value; shift
  for spec in "$@"; do
    IFS=";" read -r name value <<< "$spec"
    timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys; ${code//VALUE/$value}; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
      perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano \
      --profile-steps ${NANO_PROFILE_STEPS:-200 10} \
      2>&1 | tee "$OUT/$name.log" | grep -E "^ +engine:|profiled steps|recompile|Error" | sed "s/^/[$name] /"
  done
}
# best_variant FILE KEY: of a kernel_bench JSON's rows under KEY, the variant with the least time summed over them
# ("as is" and "before" aside; bf16-cache rows only, where rows name a cache)
best_variant() {
  python3 -c "import collections, json, sys; t = collections.Counter()
for r in json.load(open(sys.argv[1]))[sys.argv[2]]:
    if r['variant'] not in ('as is', 'before') and r.get('cache', 'torch.bfloat16') == 'torch.bfloat16':
        t[r['variant']] += r['time_us']
print(min(t, key=t.get))" "$1" "$2"
}
for stage in "$@"; do
  echo "=== $stage"
  case $stage in
    card) nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/card.txt"
          python3 -c "import sys; sys.path.insert(0, 'perf'); from kernel_bench import read_bandwidth
print(f'streaming read: {read_bandwidth():.0f} GB/s')" 2>&1 | tee -a "$OUT/card.txt" ;;
    tests) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_attention_kernels.py tests/test_gpu_engine.py tests/test_triton_sampling.py tests/test_triton_gemv.py tests/test_qk_norm.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    quant) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_quant.py 2>&1 | tee "$OUT/quant_tests.log" | tail -15
           timeout "${STAGE_TIMEOUT:-300}" python3 perf/quant_bench.py --out "$OUT/quant_bench.json" 2>&1 | tee "$OUT/quant_bench.log" | tail -80 ;;
    nano) TORCH_LOGS=recompiles bench nano_qwen3 --model qwen3-0.6b --workload nano ;;
    nano-silu) # nano with the SwiGLU activation left to torch.compile (ENGINE_SILU_IN_GEMV=0), then as it is (session 16's
               # activation inside the down projection's op), same machine
               ENGINE_SILU_IN_GEMV=0 bench nano_qwen3_silu_torch --model qwen3-0.6b --workload nano
               bench nano_qwen3 --model qwen3-0.6b --workload nano ;;
    nano-sync) bench nano_qwen3_sync --model qwen3-0.6b --workload nano --no-async-scheduling ;;
    nano-fp8) TORCH_LOGS=recompiles bench nano_qwen3_fp8 --model qwen3-0.6b --workload nano --kv-cache-dtype fp8 ;;
    nano-nc) bench nano_qwen3_nocompile --model qwen3-0.6b --workload nano --no-compile ;;
    llama1) bench llama8b_bs1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 ;;
    llama1-minpart) # Llama-3.1-8B batch 1 (128 / 512) with small-batch decode partitions down to 128 positions (the default)
          # and to 64 (ops.triton_attention.MIN_PARTITION_SIZE: one 64-position step a program), alternating twice, each
          # timed and then profiled over steps 100-119 (the decode kernel's time a call: ~7 us of a ~3-6 ms step on H200s)
          for spec in "llama8b_bs1_min128;128" "llama8b_bs1_min64;64" "llama8b_bs1_min128b;128" "llama8b_bs1_min64b;64"; do
            name=${spec%%;*}; size=${spec#*;}
            timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.MIN_PARTITION_SIZE = $size; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
              perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model llama-3.1-8b --workload fixed --num-requests 1 \
              --input-len 128 --output-len 512 --profile-steps 100 20 2>&1 | tee "$OUT/$name.log" \
              | grep -E "engine:|steps:|a step:|profiled steps|_decode|_gemv_kernel" | sed "s/^/[$name] /"
          done ;;
    pdl-ab) # programmatic dependent launch (ops.pdl, ENGINE_PDL=1: GEMVs load their first weight tile while the kernel
          # before them finishes): the GEMV and GPU-engine tests with it, then Llama-3.1-8B batch 1 (128 / 512) without
          # and with it, alternating twice, each timed and then profiled over steps 100-119
          ENGINE_PDL=1 timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_gemv.py tests/test_gpu_engine.py \
            2>&1 | tee "$OUT/pdl_tests.log" | tail -3
          for spec in "llama8b_bs1_pdl0;0" "llama8b_bs1_pdl1;1" "llama8b_bs1_pdl0b;0" "llama8b_bs1_pdl1b;1"; do
            name=${spec%%;*}
            ENGINE_PDL=${spec#*;} timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" \
              --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --profile-steps 100 20 2>&1 \
              | tee "$OUT/$name.log" | grep -E "engine:|a step:|profiled steps|_gemv_kernel|_decode" | sed "s/^/[$name] /"
          done ;;
    tp-pdl-ab) # (2 GPUs) pdl-ab at TP=2 (the Lamport kernel lets the next GEMV start too): TP=2 without and with
          # ENGINE_PDL=1, TP=1 (GPU 0) without and with, same call; the greedy TP=2 == TP=1 test with it first
          ENGINE_PDL=1 timeout 200 python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "two_ranks and compiled-async" 2>&1 \
            | tee "$OUT/tp_pdl_tests.log" | tail -3
          for spec in "llama8b_bs1_tp2_pdl0;0;2" "llama8b_bs1_tp2_pdl1;1;2" "llama8b_bs1_tp1_pdl0;0;1" "llama8b_bs1_tp1_pdl1;1;1"; do
            IFS=";" read -r name flag tp <<< "$spec"
            CUDA_VISIBLE_DEVICES=$([ "$tp" = 1 ] && echo 0 || echo 0,1) ENGINE_PDL=$flag timeout "${STAGE_TIMEOUT:-300}" \
              python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model llama-3.1-8b --workload fixed \
              --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size $tp 2>&1 | tee "$OUT/$name.log" \
              | grep -E "engine:|a step:|rank 0: a step" | sed "s/^/[$name] /"
          done ;;
    inductor-ab) # Llama-3.1-8B batch 1 (128 / 512) with inductor's defaults, then with each option set of INDUCTOR_AB
          # ('|'-separated JSON objects, ENGINE_INDUCTOR_OPTIONS; default: combo kernels, which may put the two rope
          # kernels a layer in one launch), each timed then profiled over steps 100-119 (GPU ops a step)
          IFS="|" read -ra option_sets <<< "${INDUCTOR_AB:-{\"combo_kernels\": true\}}"
          i=0
          for options in "" "${option_sets[@]}"; do
            name=llama8b_bs1_inductor$i; i=$((i + 1))
            echo "[$name] ENGINE_INDUCTOR_OPTIONS=${options:-(defaults)}"
            ENGINE_INDUCTOR_OPTIONS=$options timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm \
              --json-out "$OUT/$name.json" --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 \
              --output-len 512 --profile-steps 100 20 2>&1 | tee "$OUT/$name.log" \
              | grep -E "engine:|a step:|profiled steps|Error" | sed "s/^/[$name] /"
          done ;;
    llama1-parts) bench llama8b_bs1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512
          # the same without small-batch decode partitions (ops.triton_attention.SMALL_GRID_PROGRAMS = 0: 512 positions each)
          timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.SMALL_GRID_PROGRAMS = 0; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
            perf/throughput.py --no-tqdm --json-out "$OUT/llama8b_bs1_parts512.json" --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 2>&1 \
            | tee "$OUT/llama8b_bs1_parts512.log" | grep -vE "^\{|Capturing" | tail -5 ;;
    llama1-sync) bench llama8b_bs1_sync --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --no-async-scheduling ;;
    llama) bench llama8b_fixed --model llama-3.1-8b --workload fixed --num-requests 1000 --input-len 256 --output-len 256 ;;
    llama-fp8) bench llama8b_fixed_fp8 --model llama-3.1-8b --workload fixed --num-requests 1000 --input-len 256 --output-len 256 --kv-cache-dtype fp8 ;;
    prefix) bench prefix_qwen3 --model qwen3-0.6b --workload prefix --num-requests 256 --prefix-len 2000 --suffix-len 32 --output-len 32 ;;
    prefix8) bench prefix8_qwen3 --model qwen3-0.6b --workload prefix --num-requests 256 --prefix-len 2000 --suffix-len 32 --output-len 8 ;;
    window) for spec in "nano_qwen3_window --model qwen3-0.6b --workload nano --profile-steps 200 10" \
                        "llama8b_bs1_window --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --profile-steps 100 20" \
                        "llama8b_fixed_window --model llama-3.1-8b --workload fixed --num-requests 1000 --input-len 256 --output-len 256 --profile-steps 300 10"; do
              set -- $spec; name=$1; shift
              timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" "$@" 2>&1 \
                | grep -vE "^\{|Capturing" | grep -A40 "requests$"
            done ;;
    window-nano) # nano with an fp8 cache, profiled at full batch (step 200) and in its tail (step 900, a few dozen
           # sequences left): is the tail host-bound?
           for steps in "200 10" "900 10"; do
             timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --model qwen3-0.6b --workload nano \
               --kv-cache-dtype fp8 --profile-steps $steps 2>&1 | grep -vE "^\{|Capturing" | grep -A40 "requests$"
           done ;;
    fusion-probe) # how many Triton kernels inductor makes of an add + RMSNorm feeding a linear (hidden 1,024, 4,096), with the
           # token dimension unbacked (as graphs.compile marks it), backed, static (perf/fusion_probe.py)
           timeout 240 python3 perf/fusion_probe.py 2>&1 | tee "$OUT/fusion_probe.log" | grep -E "Triton kernels|Error" | cut -c1-400 ;;
    token-dim-ab) # the token dimension unbacked (default) against backed (ENGINE_TOKEN_DIM=backed: a second graph for one token):
           # nano (bf16) and Llama-3.1-8B batch 1, each timed then profiled (GPU ops a step: does a backed size fuse
           # each RMSNorm into one kernel?); the first backed start of each model compiles afresh
           profiled_ab ENGINE_TOKEN_DIM "nano_unbacked;unbacked;nano" "nano_backed;backed;nano" \
             "llama1_unbacked;unbacked;llama1" "llama1_backed;backed;llama1" ;;
    nano-large-parts) # (#3) decode partitions of 4,096 positions from 2,048 (sequence, KV head) programs on
           # (ops.triton_attention.LARGE_GRID_PARTITION_SIZE; 1,024 as shipped): nano (bf16) then `fixed` 8B, each
           # without / with it, alternating
           for spec in "nano_p1024;1024;nano" "nano_p4096;4096;nano" "nano_p1024b;1024;nano" "nano_p4096b;4096;nano" \
                       "llama8b_fixed_p1024;1024;llama" "llama8b_fixed_p4096;4096;llama"; do
             IFS=";" read -r name size wl <<< "$spec"
             if [ "$wl" = nano ]; then wl=(--model qwen3-0.6b --workload nano)
             else wl=(--model llama-3.1-8b --workload fixed --num-requests 1000 --input-len 256 --output-len 256); fi
             timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.LARGE_GRID_PARTITION_SIZE = $size; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" "${wl[@]}" 2>&1 | tee "$OUT/$name.log" \
               | grep -E "engine:|recompile|Error" | sed "s/^/[$name] /"
           done ;;
    nano-p4096-ab) # (#3) nano (bf16) with 1,024-position decode partitions (as shipped) and 4,096 from 2,048 (sequence, KV head)
           # programs on (LARGE_GRID_PARTITION_SIZE: one partition a sequence at max_model_len 4,096, so no reduce kernel at
           # full batch; kernel_bench --nano: 221 against 226 us a layer at step 50), alternating twice, profiled at step 200
           nano_setup_ab "import ops.triton_attention as t; t.LARGE_GRID_PARTITION_SIZE = VALUE" \
             "nano_p1024;1024" "nano_p4096;4096" "nano_p1024b;1024" "nano_p4096b;4096" ;;
    nano-run-profile) # (#3) nano (bf16) profiled over its whole run (steps 1-1,100: prefill included): the GPU's busy time
           # against the wall, and the 60 largest kernels (the profiler slows the host; the GPU's sums are what count)
           STEP_PROFILE_TOP=60 timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/nano_run_profile.json" \
             --model qwen3-0.6b --workload nano --profile-steps 1 1100 2>&1 | tee "$OUT/nano_run_profile.log" | grep -vE "^\{|Capturing" | tail -75 ;;
    nano-mixed8192) # (#3) nano (bf16) with prefill / mixed-step CUDA graphs up to 8,192 tokens (default: 2,048), where nano's 18
           # prefill steps of 8,192 tokens each ran kernel by kernel and left the GPU idle ~0.77 s of a profiled run (session 25):
           # the whole run profiled with them (phases), then timed as shipped and with them
           mixed=(--mixed-cuda-graph-sizes 16 32 64 128 256 512 1024 2048 4096 8192)
           STEP_PROFILE_TOP=8 timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/nano_m8192_profile.json" \
             --model qwen3-0.6b --workload nano --profile-steps 1 1100 "${mixed[@]}" 2>&1 | tee "$OUT/nano_m8192_profile.log" \
             | grep -E "engine:|profiled steps|seqs:|waiting:|recompile|Error|captured"
           for spec in "nano_m2048;" "nano_m8192;1"; do
             IFS=";" read -r name on <<< "$spec"
             timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b \
               --workload nano ${on:+"${mixed[@]}"} 2>&1 | tee "$OUT/$name.log" | grep -E "engine:|recompile|Error" | sed "s/^/[$name] /"
           done ;;
    nano-depth-ab) # (#3) nano (bf16) with one launched step in flight (default) and two (ENGINE_ASYNC_DEPTH=2: the host builds
           # step N+2 while N and N+1 run, so one slow host step no longer idles the GPU; 0.34 s of idle between decode
           # steps in session 25's profile), alternating twice, timed; then each once more profiled over the whole run
           for spec in "nano_depth1;1" "nano_depth2;2" "nano_depth1b;1" "nano_depth2b;2"; do
             IFS=";" read -r name depth <<< "$spec"
             ENGINE_ASYNC_DEPTH=$depth timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" \
               --model qwen3-0.6b --workload nano 2>&1 | tee "$OUT/$name.log" | grep -E "engine:|recompile|Error" | sed "s/^/[$name] /"
           done
           for depth in 1 2; do
             ENGINE_ASYNC_DEPTH=$depth STEP_PROFILE_TOP=8 timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm \
               --json-out "$OUT/nano_depth${depth}_profile.json" --model qwen3-0.6b --workload nano --profile-steps 1 1100 2>&1 \
               | tee "$OUT/nano_depth${depth}_profile.log" | grep -E "engine:|profiled steps|seqs:|waiting:|idle|  step |Error" \
               | sed "s/^/[depth $depth] /"
           done ;;
    merge-ab) # (#3) a (sequence, KV head)'s decode partitions merged by the decode kernel's last program to finish one
           # (ENGINE_DECODE_MERGE=in-kernel, the default since session 26) or by the reduce kernel (reduce-kernel): 28
           # launches a nano decode step fewer. The attention kernels' GPU tests, the decode step alone both ways
           # (kernel_bench --nano), then nano alternating twice, each profiled at step 200
           timeout 240 python3 -m pytest -m gpu -q tests/test_attention_kernels.py 2>&1 | tee "$OUT/attention_tests.log" | tail -3
           timeout 150 python3 perf/kernel_bench.py --nano --variants "as is,reduce kernel" --out "$OUT/merge_kernel_bench.json" \
             2>&1 | tee "$OUT/merge_kernel_bench.log" | tail -6
           profiled_ab ENGINE_DECODE_MERGE "nano_merge;in-kernel;nano" "nano_reduce;reduce-kernel;nano" \
             "nano_mergeb;in-kernel;nano" "nano_reduceb;reduce-kernel;nano" ;;
    merge-parts) # (#3) with the partitions merged in the decode kernel (no second kernel), are other partition sizes better?
           timeout 150 python3 perf/kernel_bench.py --nano --variants "as is,hf p512,hf p2048,hf p4096" \
             --out "$OUT/merge_parts_bench.json" 2>&1 | tee "$OUT/merge_parts_bench.log" | tail -6 ;;
    decode-pipe) # (#3) the decode kernel's K/V loads double-buffered (perf/kernel_bench.py NANO_VARIANTS "hf s5"...:
           # 5+ pipeline stages, where Triton 3.6 keeps two K/V buffers): kernel_bench --nano, then the variant with the
           # least time over the three steps gets the decode-kernel GPU tests and nano against the defaults, alternating
           timeout 200 python3 perf/kernel_bench.py --nano --variants "as is,hf s5,hf w8 s5,hf n32 s5,hf n32 s7,hf n16 s5" \
             --out "$OUT/pipe_bench.json" 2>&1 | tee "$OUT/pipe_bench.log" | tail -8
           best=$(best_variant "$OUT/pipe_bench.json" nano)
           echo "best variant: $best"
           set_variant="import perf.kernel_bench as kb, ops.triton_attention as t; [setattr(t, k, v) for k, v in kb.NANO_VARIANTS['VALUE'].items()]"
           timeout 200 python3 -c "${set_variant//VALUE/$best}; import pytest; pytest.main(['-m', 'gpu', '-q', '-k', 'decode', 'tests/test_attention_kernels.py'])" \
             2>&1 | tee "$OUT/pipe_tests.log" | tail -3
           nano_setup_ab "$set_variant" "nano_pipe_asis;as is" "nano_pipe_best;$best" "nano_pipe_asisb;as is" "nano_pipe_bestb;$best" ;;
    fp8-stages) # (#3) the decode loop double-buffered over an fp8 cache (ENGINE_DECODE_FP8_STAGES, default 5 since session 28):
           # the attention kernels' fp8 GPU tests, kernel_bench --nano as the engine launches it (--write-kv), the prefill
           # variants (--nano-prefill), then nano with an fp8 cache at 2 and 5 stages, alternating (profiled at step 200)
           timeout 200 python3 -m pytest -m gpu -q -k fp8 tests/test_attention_kernels.py 2>&1 | tee "$OUT/fp8_tests.log" | tail -3
           timeout 150 python3 perf/kernel_bench.py --nano --write-kv --variants "as is,fp8 s2,hf s5,hf n32 s5,hf n32 s7" \
             --out "$OUT/writekv_bench.json" 2>&1 | tee "$OUT/writekv_bench.log" | tail -6
           timeout 100 python3 perf/kernel_bench.py --nano-prefill --out "$OUT/prefill_bench.json" 2>&1 \
             | tee "$OUT/prefill_bench.log" | tail -3
           for spec in "nano_fp8_s2;2" "nano_fp8_s5;5" "nano_fp8_s2b;2" "nano_fp8_s5b;5"; do
             IFS=";" read -r name value <<< "$spec"
             ENGINE_DECODE_FP8_STAGES=$value timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm \
               --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano --kv-cache-dtype fp8 --profile-steps 200 10 \
               2>&1 | tee "$OUT/$name.log" | grep -E "^ +engine:|profiled steps|recompile|Error" | sed "s/^/[$name] /"
           done ;;
    prefill-tiles) # (#3) the prefill kernel's tiles (kernel_bench --nano-prefill: nano's first and a later prefill step, the
           # 8B's fixed 256-token prompts); the variant with the least time over the three gets the prefill GPU tests and
           # nano (bf16) against the defaults, alternating, each profiled over its prefill steps (1-18)
           timeout 150 python3 perf/kernel_bench.py --nano-prefill --out "$OUT/prefill_bench.json" 2>&1 \
             | tee "$OUT/prefill_bench.log" | grep -v "^{" | tail -4
           best=$(best_variant "$OUT/prefill_bench.json" nano_prefill)
           echo "best prefill variant: $best"
           set_variant="import perf.kernel_bench as kb, ops.triton_attention as t; [setattr(t, k, v) for k, v in kb.NANO_PREFILL_VARIANTS['VALUE'].items()]"
           timeout 200 python3 -c "${set_variant//VALUE/$best}; import pytest; pytest.main(['-m', 'gpu', '-q', '-k', 'prefill or mixed', 'tests/test_attention_kernels.py'])" \
             2>&1 | tee "$OUT/prefill_tests.log" | tail -2
           NANO_PROFILE_STEPS="1 18" nano_setup_ab "$set_variant" "nano_pf_asis;as is" "nano_pf_best;$best" \
             "nano_pf_asisb;as is" "nano_pf_bestb;$best" ;;
    depth-tests) # ENGINE_ASYNC_DEPTH=2 under the GPU-engine tests (greedy tokens against transformers, async launches)
           ENGINE_ASYNC_DEPTH=2 timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_gpu_engine.py 2>&1 \
             | tee "$OUT/depth2_gpu_tests.log" | tail -5 ;;
    engine-tests) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_gpu_engine.py tests/test_qk_norm.py \
           tests/test_triton_allreduce.py 2>&1 | tee "$OUT/engine_tests.log" | tail -5 ;;
    nano-host) # (#3) nano (bf16) with the timed generate under cProfile: where the host's ~6-8 ms a full-batch step go
           # ($OUT/nano_host.prof; the run's own throughput is slowed by the profiler)
           timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/nano_host.json" --model qwen3-0.6b \
             --workload nano --host-profile "$OUT/nano_host.prof" 2>&1 | tee "$OUT/nano_host.log" | grep -vE "^\{" | grep -A45 "function calls" ;;
    qk-norm-ab) # (#3) Qwen3's q/k RMSNorm + rotation as one Triton kernel (ENGINE_QK_NORM_KERNEL=1, ops/triton_qk_norm.py; three
           # inductor kernels a layer without): its GPU tests, then nano (bf16) without / with it, alternating twice, each
           # timed then profiled at step 200 (GPU busy a step is the steadier figure: throughput's spread is ~1.5%)
           timeout 240 python3 -m pytest -m gpu -q tests/test_qk_norm.py 2>&1 | tee "$OUT/qk_norm_tests.log" | tail -3
           profiled_ab ENGINE_QK_NORM_KERNEL "nano_qk0;0;nano" "nano_qk1;1;nano" "nano_qk0b;0;nano" "nano_qk1b;1;nano" ;;
    small-kernels-ab) # (#3) nano (bf16) as it is, then with every small-kernel cut that is off by default: one kernel an add + RMSNorm
           # (ENGINE_FUSED_NORM=1), the q/k norm + rotation as one (ENGINE_QK_NORM_KERNEL=1), the token dimension backed
           # (ENGINE_TOKEN_DIM=backed: a second compile for one token); alternating twice, each timed then profiled at step 200
           for spec in "nano_default;0;0;unbacked" "nano_cuts;1;1;backed" "nano_default2;0;0;unbacked" "nano_cuts2;1;1;backed"; do
             IFS=";" read -r name fused qk mark <<< "$spec"
             ENGINE_FUSED_NORM=$fused ENGINE_QK_NORM_KERNEL=$qk ENGINE_TOKEN_DIM=$mark timeout "${STAGE_TIMEOUT:-300}" \
               python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano \
               --profile-steps 200 10 2>&1 | tee "$OUT/$name.log" | grep -E "engine:|profiled steps|recompile|Error" | sed "s/^/[$name] /"
           done ;;
    blas-lt-ab) # (#3) nano (bf16) with torch's default BLAS path (cuBLAS: nvjet kernels, 29 us a layer's four GEMMs at 256 rows,
           # their bandwidth floor ~10) and with torch.backends.cuda.preferred_blas_library("cublaslt") (cuBLASLt's own
           # heuristic pick), alternating, each timed then profiled at step 200; first Qwen3-0.6B's four GEMMs alone through each
           timeout 120 python3 perf/quant_bench.py --shapes qwen3-0.6b --kernels bf16 bf16-lt --batches 8 64 128 256 \
             --out "$OUT/blas_lt_gemms.json" 2>&1 | tee "$OUT/blas_lt_gemms.log" | tail -20
           nano_setup_ab "import torch; torch.backends.cuda.preferred_blas_library('VALUE')" \
             "nano_cublas;default" "nano_cublaslt;cublaslt" "nano_cublas2;default" "nano_cublaslt2;cublaslt" ;;
    nano-order-ab) # (#3) nano (bf16) with decode steps in admission order (default) and longest context first
           # (ENGINE_DECODE_ORDER=longest-first: the decode kernel's longest programs launch first), alternating twice, profiled
           profiled_ab ENGINE_DECODE_ORDER "nano_arrival;arrival;nano" "nano_longest;longest-first;nano" \
             "nano_arrival2;arrival;nano" "nano_longest2;longest-first;nano" ;;
    nano-backed-ab) # (#3) nano (bf16) with the token dimension unbacked (default) and backed (ENGINE_TOKEN_DIM=backed: a fifth
           # fewer kernels a step, session 21), alternating twice, timed only (the first backed start compiles afresh)
           for spec in "nano_unbacked;unbacked" "nano_backed;backed" "nano_unbacked2;unbacked" "nano_backed2;backed"; do
             IFS=";" read -r name mark <<< "$spec"
             ENGINE_TOKEN_DIM=$mark timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" \
               --model qwen3-0.6b --workload nano 2>&1 | tee "$OUT/$name.log" | grep -E "engine:|recompile|Error" | sed "s/^/[$name] /"
           done ;;
    gluon) # (#9) the Gluon 256-row W4A16 GEMM (ops/gluon_quant.py, Triton 3.6, sm_90; never run before session 21): its
           # GPU tests, then quant_bench on 70B's shapes at 256 rows against the tl kernel and bf16 cuBLAS (-s1: no split-K)
           timeout 240 python3 -m pytest -m gpu -q -x tests/test_gluon_quant.py 2>&1 | tee "$OUT/gluon_tests.log" | tail -15
           timeout 300 python3 perf/quant_bench.py --shapes 70b --kernels bf16 awq-gptq-g128 gluon-gptq-g128 gluon-gptq-g128-s1 \
             --batches 256 --out "$OUT/gluon_bench.json" 2>&1 | tee "$OUT/gluon_bench.log" | tail -25 ;;
    swapab) # (#9) the swap-AB Gluon GEMM (ops/gluon_swapab.py: W^T dequantized into wgmma's register A operand, x by TMA):
           # its GPU tests and engine::swapab_matmul's, then quant_bench on 70B's shapes at 1 to 256 rows against the tl
           # kernel and bf16 cuBLAS, with its split-K / row tile chosen (and with split-K off: -s1)
           timeout 240 python3 -m pytest -m gpu -q -x tests/test_gluon_swapab.py 2>&1 | tee "$OUT/swapab_tests.log" | tail -4
           timeout 200 python3 -m pytest -m gpu -q tests/test_triton_quant.py -k swapab 2>&1 | tee "$OUT/swapab_op_tests.log" | tail -2
           timeout 300 python3 perf/quant_bench.py --shapes 70b --kernels bf16 awq-gptq-g128 gluon-swapab-gptq-g128 \
             gluon-swapab-gptq-g128-s1 --batches 1 16 64 128 256 --out "$OUT/swapab_bench.json" 2>&1 \
             | tee "$OUT/swapab_bench.log" | tail -81 | grep -v "^ *[a-z_]* .* bf16 " ;;
    swapab-sk) # (#9) the persistent stream-K swap-AB kernel (ops/gluon_swapab.py `_swapab_streamk_kernel`): every swap-AB GPU test
           # (its own and the engine op's), then quant_bench on 70B's shapes at 128-256 rows: automatic (stream-K on gate_up /
           # qkv above 128 rows) against the same without stream-K (-dp) and bf16
           # a hang (an mbarrier phase never completed) shows in the first, small test: stop there
           timeout 120 python3 -m pytest -m gpu -q -x tests/test_gluon_swapab.py -k cut_in_three 2>&1 | tail -3 \
             | tee "$OUT/swapab_sk_smoke.log"; grep -q " passed" "$OUT/swapab_sk_smoke.log" || continue
           timeout 300 python3 -m pytest -m gpu -q -x tests/test_gluon_swapab.py 2>&1 | tee "$OUT/swapab_tests.log" | tail -4
           timeout 200 python3 -m pytest -m gpu -q tests/test_triton_quant.py -k swapab 2>&1 | tee "$OUT/swapab_op_tests.log" | tail -2
           timeout 300 python3 perf/quant_bench.py --shapes 70b --kernels bf16 gluon-swapab-gptq-g128 gluon-swapab-gptq-g128-dp \
             --batches 128 200 256 --out "$OUT/swapab_sk_bench.json" 2>&1 | tee "$OUT/swapab_sk_bench.log" | tail -40 ;;
    swapab-auto) # (#9) ENGINE_SWAPAB_GEMM=auto (the default): engine::dual_4bit_matmul's GPU test, then Llama-3.1-8B AWQ batch 1
           # (128 / 512: the planar GEMV must keep it) and fixed 1000 x 256 x 256 (swap-AB from 3 rows)
           timeout 120 python3 -m pytest -m gpu -q tests/test_triton_quant.py -k swapab 2>&1 | tee "$OUT/swapab_op_tests.log" | tail -2
           bench llama8b_awq_bs1_auto --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 \
             --input-len 128 --output-len 512
           bench llama8b_awq_fixed_auto --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1000 \
             --input-len 256 --output-len 256 ;;
    swapab-large) # (#9) prefill-sized steps with ENGINE_SWAPAB_GEMM=1's layers: engine::swapab_matmul on 70B's shapes at 256 to
           # 8,192 rows, as the swap-AB kernel (ENGINE_DEQUANT_GEMM_ROWS=0) and from 1,024 rows dequantize_swapab + cuBLAS
           for rows in 0 1024; do
             ENGINE_DEQUANT_GEMM_ROWS=$rows timeout 240 python3 perf/quant_bench.py --shapes 70b --kernels bf16 swapab-op-g128 \
               --batches 256 1024 2048 8192 --out "$OUT/swapab_large_$rows.json" 2>&1 | tee "$OUT/swapab_large_$rows.log" \
               | tail -16 | sed "s/^/[ENGINE_DEQUANT_GEMM_ROWS=$rows] /"
           done ;;
    swapab-8b) # (#9) what ENGINE_SWAPAB_GEMM=1 does to Llama-3.1-8B AWQ: batch 1 (128 / 512; the planar GEMV is 2.7x faster
           # at one row on 70B's shapes) and fixed 1000 x 256 x 256, without then with it
           for sw in 0 1; do
             ENGINE_SWAPAB_GEMM=$sw bench llama8b_awq_bs1_swapab$sw --model llama-3.1-8b --quantization awq --workload fixed \
               --num-requests 1 --input-len 128 --output-len 512
             ENGINE_SWAPAB_GEMM=$sw bench llama8b_awq_fixed_swapab$sw --model llama-3.1-8b --quantization awq --workload fixed \
               --num-requests 1000 --input-len 256 --output-len 256
           done ;;
    swapab-ncu) # Nsight Compute's stall reasons on the swap-AB GEMM, 70B gate_up at 256 rows
           timeout 150 ncu --set full --import-source yes -k regex:_swapab_kernel -c 1 -f -o "$OUT/swapab_gate_up" \
             python3 perf/quant_bench.py --shapes 70b --kernels gluon-swapab-gptq-g128 --batches 256 --layers gate_up \
             --iters 1 --repeats 1 --eager > "$OUT/swapab_ncu.log" 2>&1
           ncu --import "$OUT/swapab_gate_up.ncu-rep" --page details > "$OUT/swapab_ncu.txt" 2>&1
           grep -E "Duration|Compute \(SM\)|L1/TEX Cache|Issue Slots|Registers Per" "$OUT/swapab_ncu.txt" | head
           ncu --import "$OUT/swapab_gate_up.ncu-rep" --page source --csv --print-source sass > "$OUT/swapab_sass.csv" 2>&1 ;;
    swapab-sk-ncu) # (#9) Nsight Compute on the swap-AB kernels' K-range epilogues at 256 rows: where does a split / stream-K
           # piece's time go? qkv stream-K, o split in 2, o whole tiles (s1): details and per-SASS samples of each
           for case in "qkv gluon-swapab-gptq-g128" "o gluon-swapab-gptq-g128" "o gluon-swapab-gptq-g128-s1"; do
             read -r layer kernel <<< "$case"; name="ncu_${layer}_${kernel##*-}"
             timeout 150 ncu --set full --import-source yes -k regex:_swapab -c 1 -f -o "/tmp/$name" \
               python3 perf/quant_bench.py --shapes 70b --kernels "$kernel" --batches 256 --layers "$layer" --iters 1 --repeats 1 \
               --eager > "$OUT/$name.log" 2>&1
             ncu --import "/tmp/$name.ncu-rep" --page details > "$OUT/$name.txt" 2>&1
             echo "== $name"; grep -E "^  _swapab|Duration|Compute \(SM\)|SM Active Cycles|Elapsed Cycles|Issue Slots|Registers Per" "$OUT/$name.txt" | head -8
             ncu --import "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.sass.csv" 2>&1
           done ;;
    swapab-op) # (#9) engine::swapab_matmul (ENGINE_SWAPAB_GEMM=1's op) on CUDA against the reference, in a CUDA graph
           timeout 200 python3 -m pytest -m gpu -q tests/test_triton_quant.py -k swapab 2>&1 | tee "$OUT/swapab_op_tests.log" | tail -3 ;;
    gluon-ncu) # (#9) Nsight Compute on the Gluon GEMM at 256 rows, 70B gate_up (no split) and down (split-K 2): stall
           # reasons, and the warp-stall samples of every SASS instruction (is the fence after W's ld.global the stall?)
           for layer in gate_up down; do
             timeout 150 ncu --set full --import-source yes -k regex:_gluon_gptq_kernel -c 1 -f -o "$OUT/gluon_$layer" \
               python3 perf/quant_bench.py --shapes 70b --kernels gluon-gptq-g128 --batches 256 --layers $layer \
               --iters 1 --repeats 1 --eager > "$OUT/gluon_ncu_$layer.log" 2>&1
             ncu --import "$OUT/gluon_$layer.ncu-rep" --page details > "$OUT/gluon_ncu_$layer.txt" 2>&1
             grep -E "Duration|Throughput|Registers|Warp Cycles|Stall|Executed Ipc|Shared Memory|Issue Slot" \
               "$OUT/gluon_ncu_$layer.txt" | head -40 | sed "s/^/[$layer] /"
             ncu --import "$OUT/gluon_$layer.ncu-rep" --page source --csv --print-source sass \
               > "$OUT/gluon_sass_$layer.csv" 2>&1
             wc -l "$OUT/gluon_sass_$layer.csv"
           done ;;
    dequant-gemm) # (#9) ENGINE_DEQUANT_GEMM_ROWS: its GPU test, then quant_bench on 70B's shapes at 256 to 8,192 rows with the
           # 4-bit tiles (the default) and with the dequantize-then-cuBLAS path from 1,024 rows
           timeout 240 python3 -m pytest -m gpu -q tests/test_triton_quant.py -k dequantize_then 2>&1 | tee "$OUT/dequant_tests.log" | tail -3
           for rows in 0 1024; do
             ENGINE_DEQUANT_GEMM_ROWS=$rows timeout 240 python3 perf/quant_bench.py --shapes 70b --kernels bf16 awq-gptq-g128 \
               --batches 256 1024 2048 8192 --out "$OUT/dequant_bench_$rows.json" 2>&1 | tee "$OUT/dequant_bench_$rows.log" | tail -22 \
               | sed "s/^/[ENGINE_DEQUANT_GEMM_ROWS=$rows] /"
           done ;;
    fused-norm-ab) # ENGINE_FUSED_NORM=1 (TP=1: each residual add + RMSNorm one opaque kernel, not inductor's two): its
           # GPU test and the GPU-engine tests with it, then Llama-3.1-8B batch 1 and nano (bf16) without / with it, each
           # timed then profiled (GPU ops a step)
           timeout 120 python3 -m pytest -m gpu -q tests/test_triton_allreduce.py -k add_rms_norm 2>&1 | tail -2
           ENGINE_FUSED_NORM=1 timeout 200 python3 -m pytest -m gpu -q tests/test_gpu_engine.py 2>&1 | tee "$OUT/fused_norm_tests.log" | tail -3
           profiled_ab ENGINE_FUSED_NORM "llama1_norm0;0;llama1" "llama1_norm1;1;llama1" "nano_norm0;0;nano" "nano_norm1;1;nano" ;;
    nano-decode) timeout "${STAGE_TIMEOUT:-300}" python3 perf/kernel_bench.py --nano --out "$OUT/nano_decode.json" 2>&1 \
             | tee "$OUT/nano_decode.log" | tail -25 ;;
    nano-hf-pdl) python3 -c "import torch._inductor.config as c; print('inductor enable_pdl:', getattr(c.triton, 'enable_pdl', 'absent'))"
           for spec in "nano_base;t._DECODE_HEADS_FIRST = False;" "nano_hf;t._DECODE_HEADS_FIRST = True;" "nano_hf_pdl;t._DECODE_HEADS_FIRST = True;pdl"; do
             IFS=";" read -r name code pdl <<< "$spec"
             env ${pdl:+TORCHINDUCTOR_ENABLE_PDL=1 ENGINE_PDL=1} timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; $code; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano --profile-steps 200 10 \
               2>&1 | tee "$OUT/$name.log" | grep -E "engine:|profiled steps|recompile|Error" | sed "s/^/[$name] /"
           done
           TORCHINDUCTOR_ENABLE_PDL=1 ENGINE_PDL=1 timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_gpu_engine.py \
             2>&1 | tee "$OUT/pdl_engine_tests.log" | tail -3 ;;
    nano-hf-ab) # nano (bf16) with the decode grid (seq, head) then heads first (the default), alternating twice; then one run
           # profiled over 3 full-batch steps with a chrome trace ($OUT/nano_trace.json: is the idle inside the graphs or between them?)
           for spec in "nano_seqfirst;False" "nano_headsfirst;True" "nano_seqfirst2;False" "nano_headsfirst2;True"; do
             IFS=";" read -r name first <<< "$spec"
             timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t._DECODE_HEADS_FIRST = $first; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano \
               2>&1 | tee "$OUT/$name.log" | grep -E "engine:|recompile|Error" | sed "s/^/[$name] /"
           done
           timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --json-out "$OUT/nano_traced.json" --model qwen3-0.6b \
             --workload nano --profile-steps 200 3 --trace-out "$OUT/nano_trace.json" 2>&1 | grep -E "engine:|profiled steps|Error" ;;
    nano-profile) # nano (bf16 cache) profiled over 10 steps at full batch (step 200) and at ~100 sequences (step 700),
           # every GPU op of a step listed (STEP_PROFILE_TOP=30): where a step's time goes besides the KV reads
           for steps in "200 10" "700 10"; do
             STEP_PROFILE_TOP=30 timeout "${STAGE_TIMEOUT:-300}" python3 perf/throughput.py --no-tqdm --model qwen3-0.6b --workload nano \
               --profile-steps $steps --json-out "$OUT/nano_profile_${steps%% *}.json" 2>&1 | grep -vE "^\{|Capturing" | grep -A60 " requests ("
           done ;;
    nano-parts-ab) # nano with decode partitions of 512 positions (the default) and 1,024, alternating twice, fp8 cache
           # then bf16 (session 20's nano-parts: fp8 20,541 at 1,024 against 19,270 at 512 in the call before)
           for kv in fp8 auto; do for size in 512 1024 512 1024; do
             timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.PARTITION_SIZE = $size; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --model qwen3-0.6b --workload nano --kv-cache-dtype $kv 2>&1 \
               | grep -E "engine:" | sed "s/^/[$kv, partitions of $size] /"
           done; done ;;
    nano-parts) # nano (bf16 and fp8 caches) with decode partitions of 1,024 and 2,048 positions at full batch
           # instead of 512: fewer partials to write and merge (contexts reach ~2,000), fewer programs
           for kv in auto fp8; do for size in 1024 2048; do
             timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.PARTITION_SIZE = $size; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --json-out "$OUT/nano_${kv}_parts$size.json" --model qwen3-0.6b --workload nano --kv-cache-dtype $kv 2>&1 \
               | grep -E "engine:|steps:|Triton compiles|GC:" | sed "s/^/[$kv, partitions of $size] /"
           done; done ;;
    nofuse) # llama1 and nano with the separate KV-write kernel in decode steps (FUSE_DECODE_KV_WRITE = False), to set
           # against `llama1` / `nano` in the same call
           for spec in "llama8b_bs1_nofuse --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512" \
                       "nano_qwen3_nofuse --model qwen3-0.6b --workload nano"; do
             set -- $spec; name=$1; shift
             timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys, ops.triton_attention as t; t.FUSE_DECODE_KV_WRITE = False; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
               perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" "$@" 2>&1 | grep -E "engine:|steps:|Triton compiles|GC:" | sed "s/^/[$name] /"
           done ;;
    nano-ab) for spec in "nano_default;pass" "nano_nofuse;import ops.triton_attention as t; t.FUSE_DECODE_KV_WRITE = False" \
                      "nano_torch_sampler;import engine.sampler as t; t.FUSED_SAMPLING_DEVICES = ()" "nano_default_again;pass"; do
               name=${spec%%;*}; setup=${spec#*;}
               timeout "${STAGE_TIMEOUT:-300}" python3 -c "import runpy, sys; $setup; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
                 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano 2>&1 \
                 | tee "$OUT/$name.log" | grep -E "engine:|steps:|Triton compiles|GC:" | sed "s/^/[$name] /"
             done ;;
    serve-offline|serve-pin) # the server / offline ratio on the same 256 requests (fixed workload: 550 random ids in, 520
              # out, greedy): LLM.generate (perf/throughput.py), then `python -m engine.serve --engine-process` under
              # serve_bench; serve-pin: then again with the engine process, the front and the client each on physical
              # cores of its own (is the engine process's host work slower for sharing a core with them?)
              bench fixed256_offline --model qwen3-0.6b --workload fixed --num-requests 256 --input-len 550 --output-len 520 \
                --temperature 0 --max-model-len 4096
              qdir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('qwen3-0.6b'))")
              serve_fixed256 fixed256_server "$qdir"
              if [ "$stage" = serve-pin ]; then
                lscpu | grep -E "^(CPU\(s\)|Thread|Core|Socket|Model name|NUMA node)" | tee "$OUT/lscpu.txt"
                # Physical cores by (package, core id); 0: the engine process, 1-2: the front, 3: the client
                read -r pin_engine pin_front pin_client < <(python3 perf/cpu_sets.py 1 2 1)
                echo "pinned: engine process $pin_engine, front $pin_front, client $pin_client"
                PIN_FRONT=$pin_front PIN_ENGINE=$pin_engine PIN_CLIENT=$pin_client serve_fixed256 fixed256_server_pinned "$qdir"
              fi ;;
    serve-spread) # serve-offline twice in one call, alternating (offline, server, offline, server): the ratio's spread on one machine
              qdir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('qwen3-0.6b'))")
              for run in 1 2; do
                bench fixed256_offline_$run --model qwen3-0.6b --workload fixed --num-requests 256 --input-len 550 --output-len 520 \
                  --temperature 0 --max-model-len 4096
                serve_fixed256 fixed256_server_$run "$qdir"
              done ;;
    nano-gc) freeze="import gc, engine.llm as m; init = m.LLM.__init__; m.LLM.__init__ = lambda self, *a, **k: (init(self, *a, **k), gc.collect(), gc.freeze()) and None"
             for spec in "nano_cold|pass|cold" "nano_cold_freeze|$freeze|cold" "nano_warm|pass|warm"; do
               IFS='|' read -r name setup caches <<< "$spec"
               if [ "$caches" = cold ]; then cache=$(mktemp -d); fi
               TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton timeout "${STAGE_TIMEOUT:-300}" \
                 python3 -c "import runpy, sys; $setup; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" \
                 perf/throughput.py --no-tqdm --json-out "$OUT/$name.json" --model qwen3-0.6b --workload nano 2>&1 \
                 | tee "$OUT/$name.log" | grep -E "engine:|steps:|Triton compiles|GC:" | sed "s/^/[$name] /"
             done ;;
    hf) bench nano64_vs_hf --model qwen3-0.6b --workload nano --limit 64 --compare-hf ;;
    latency) timeout "${STAGE_TIMEOUT:-300}" python3 perf/latency.py --model qwen3-0.6b --prefill-lens 1024 --batch-sizes 1 64 256 \
               --context-lens 1024 --out "$OUT/latency_qwen3.json" 2>&1 | tee "$OUT/latency_qwen3.log" | tail -25 ;;
    profile) for args in "qwen3-0.6b --prefill-lens 1024 --batch-sizes 256 --context-lens 1024" \
                         "llama-3.1-8b --prefill-lens 128 --batch-sizes 1 --context-lens 128"; do
               timeout "${STAGE_TIMEOUT:-300}" python3 perf/latency.py --max-model-len 4096 --decode-steps 5 --iters 2 \
                 --trace "$OUT/trace" --trace-steps 2 --model $args 2>&1 | tail -8
             done
             for f in "$OUT"/trace/*.txt; do echo "--- $f"; head -30 "$f"; done ;;
    serve|serve-c1|serve-ratio) sweeps=--skip-sweeps  # serve: also prefill / decode-step sweeps (the plots' step time against batch size)
           [ "$stage" = serve ] && sweeps="--prefill-lens 128 512 2048 --batch-sizes 1 8 32 64 128 256 --context-lens 1024"
           timeout "${STAGE_TIMEOUT:-300}" python3 perf/latency.py --model qwen3-0.6b --max-model-len 4096 --server $sweeps \
             --server-requests 256 --input-len 550 --output-len 520 --label qwen3-0.6b --out "$OUT/serve_overhead_qwen3.json" 2>&1 | tail -24
           qdir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('qwen3-0.6b'))")
           vocab=$(python3 -c "from transformers import AutoConfig, AutoTokenizer as T; import sys; d=sys.argv[1]; print(min(AutoConfig.from_pretrained(d).vocab_size, len(T.from_pretrained(d))))" "$qdir")
           python3 -m engine.serve --model "$qdir" --load-format dummy --max-model-len 4096 --port 8012 --engine-process \
             > "$OUT/serve_ep_server.log" 2>&1 & epserver=$!
           for _ in $(seq 240); do curl -sf localhost:8012/health >/dev/null && break; sleep 1; done
           echo "--- the same 256 requests, server with --engine-process (compare with the engine line above)"
           timeout 200 python3 perf/serve_bench.py --base-url http://127.0.0.1:8012 --dataset random --num-prompts 256 \
             --input-len 550 --output-len 520 --vocab-size "$vocab" --seed 0 --ignore-eos --disable-tqdm \
             --result-json "$OUT/serve_ep_qwen3.json" 2>&1 | tail -22
           kill $epserver; wait $epserver
           [ "$stage" = serve-ratio ] && continue  # the server / offline ratio alone
           dir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('llama-3.1-8b'))")
           python3 -m engine.serve --model "$dir" --load-format dummy --max-model-len 4096 --port 8011 \
             --served-model-name llama8b > "$OUT/serve8b_server.log" 2>&1 & server=$!
           for _ in $(seq 240); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
           sb() { timeout 200 python3 perf/serve_bench.py --base-url http://127.0.0.1:8011 --model llama8b --ignore-eos --disable-tqdm "$@" 2>&1 | tail -22; }
           sb --dataset fixed --input-len 128 --output-len 256 --num-prompts 24 --max-concurrency 1 --label "llama8b 128/256" --result-json "$OUT/serve8b_c1.json"
           if [ "$stage" = serve ]; then  # one label for each sweep: one line in each plot
             for rate in 1 4 16 inf; do n=$([ $rate = 1 ] && echo 30 || ([ $rate = 4 ] && echo 80 || echo 200))
               sb --dataset random --input-len 1024 --output-len 128 --num-prompts $n --request-rate $rate --label "llama8b 1024/128" --result-json "$OUT/serve8b_rate$rate.json"
             done
             for c in 4 16 64; do
               sb --dataset random --input-len 1024 --output-len 128 --num-prompts $((c * 4)) --max-concurrency $c --label "llama8b 1024/128" --result-json "$OUT/serve8b_conc$c.json"
             done
           fi
           kill $server; wait $server ;;
    serve-spy) qdir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('qwen3-0.6b'))")
           vocab=$(python3 -c "from transformers import AutoConfig, AutoTokenizer as T; import sys; d=sys.argv[1]; print(min(AutoConfig.from_pretrained(d).vocab_size, len(T.from_pretrained(d))))" "$qdir")
           for shape in inproc ep; do
             flag=$([ $shape = ep ] && echo --engine-process)
             python3 -m engine.serve --model "$qdir" --load-format dummy --max-model-len 4096 --port 8013 $flag \
               > "$OUT/spy_${shape}_server.log" 2>&1 & spserver=$!
             for _ in $(seq 240); do curl -sf localhost:8013/health >/dev/null && break; sleep 1; done
             echo "--- $shape: 256 requests under py-spy (sampling 8 s from 4 s in)"
             (sleep 4; /tmp/site/bin/py-spy record --pid $spserver --subprocesses --nonblocking --threads --format raw --rate 250 \
                --duration 8 -o "$OUT/spy_${shape}.txt" > "$OUT/spy_${shape}_pyspy.log" 2>&1) & spy=$!
             timeout 200 python3 perf/serve_bench.py --base-url http://127.0.0.1:8013 --dataset random --num-prompts 256 \
               --input-len 550 --output-len 520 --vocab-size "$vocab" --seed 0 --ignore-eos --disable-tqdm \
               --result-json "$OUT/spy_${shape}_bench.json" 2>&1 | grep -E "throughput|TPOT|TTFT" | head -8
             wait $spy; kill $spserver; wait $spserver
           done ;;
    quant-ncu) timeout "${STAGE_TIMEOUT:-300}" ncu --set full -k regex:_planar_kernel -c 10 -f -o "$OUT/planar" \
                 python3 perf/quant_bench.py --kernels awq-gptq-g128 --batches 1 2 --layers gate_up --iters 1 --repeats 1 --eager \
                 > "$OUT/planar_ncu.log" 2>&1
               ncu --import "$OUT/planar.ncu-rep" --page details 2>&1 | tee "$OUT/planar_ncu.txt" | grep -E "Duration|Throughput|Registers|Occupancy|Warp Cycles|Stall|Executed Ipc" | head -40 ;;
    mixed) # prefill / mixed-step CUDA graphs (on by default) against none: Llama-3.1-8B prefill wall time by prompt length
           for flags in "--mixed-cuda-graph-sizes 0" ""; do
             timeout "${STAGE_TIMEOUT:-300}" python3 perf/latency.py --model llama-3.1-8b --max-model-len 4096 --prefill-lens 16 128 512 2048 \
               --batch-sizes 1 --context-lens 128 --iters 5 $flags --out "$OUT/latency8b_mixed_$([ -n "$flags" ] && echo off || echo on).json" 2>&1 | tail -14
           done ;;
    gemv) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_gemv.py 2>&1 | tee "$OUT/gemv_tests.log" | tail -3
          timeout "${STAGE_TIMEOUT:-300}" python3 perf/gemv_bench.py --sweep --int8 --out "$OUT/gemv_bench.json" 2>&1 \
            | tee "$OUT/gemv_bench.log" | tail -60 ;;
    gemv-tp2) # the GEMV's tile grid at TP=2's halved Llama-3.1-8B shapes (and TP=1's three smallest), one row, each tile at
              # 4, 8 and 16 programs an SM (how far small shapes split K); JSON written after each shape
              timeout "${STAGE_TIMEOUT:-300}" python3 perf/gemv_bench.py --sweep --programs-per-sm 4 8 16 --rows 1 \
                --shapes tp2-qkv tp2-o tp2-down tp2-gate_up qkv o down --out "$OUT/gemv_tp2.json" 2>&1 | tee "$OUT/gemv_tp2.log" | tail -40 ;;
    nogemv) ENGINE_GEMV=0 bench llama8b_bs1_nogemv --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 ;;
    sampler) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_sampling.py 2>&1 | tail -3
             timeout "${STAGE_TIMEOUT:-300}" python3 perf/sampler_bench.py 2>&1 | tee "$OUT/sampler_bench.txt" ;;
    c1-first) # why the first request after a start waits ~90 ms for its first token (the rest ~12 ms): the 8B server
           # at debug level (per-step lines, request accepted / first output), 3 requests one at a time
           dir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('llama-3.1-8b'))")
           python3 -m engine.serve --model "$dir" --load-format dummy --max-model-len 4096 --port 8015 --served-model-name llama8b \
             --log-level debug > "$OUT/serve8b_first.log" 2>&1 & server=$!
           for _ in $(seq 240); do curl -sf localhost:8015/health >/dev/null && break; sleep 1; done
           timeout 100 python3 perf/serve_bench.py --base-url http://127.0.0.1:8015 --model llama8b --ignore-eos --disable-tqdm \
             --dataset fixed --input-len 128 --output-len 16 --num-prompts 3 --max-concurrency 1 --num-warmups 0 \
             --result-json "$OUT/serve8b_first.json" 2>&1 | grep -E "TTFT"
           python3 -c "import json; print('TTFTs ms:', [round(1e3 * t, 2) for t in json.load(open('$OUT/serve8b_first.json'))['ttfts']])"
           kill $server; wait $server
           n=$(grep -n -m 1 "accepted by the engine" "$OUT/serve8b_first.log" | cut -d: -f1)
           [ -n "$n" ] && sed -n "$((n > 5 ? n - 5 : 1)),$((n + 40))p" "$OUT/serve8b_first.log" | cut -c1-200 ;;
    c1|c1-pair|c1-gemv) # the 8B server at concurrency 1 (128 in / 256 out): c1 as it is, c1-pair without then with
           # prefill / mixed-step graphs, c1-gemv without then with the GEMV; same call
           dir=$(python3 -c "from perf.throughput import synthetic_model_dir as d; print(d('llama-3.1-8b'))")
           case $stage in c1) runs=("c1;;1") ;; c1-pair) runs=("c1-nomixed;--mixed-cuda-graph-sizes 0;1" "c1;;1") ;; *) runs=("c1-nogemv;;0" "c1;;1") ;; esac
           for run in "${runs[@]}"; do
             IFS=';' read -r label flags gemv <<< "$run"
             ENGINE_GEMV=$gemv python3 -m engine.serve --model "$dir" --load-format dummy --max-model-len 4096 --port 8014 --served-model-name llama8b \
               $flags > "$OUT/serve8b_$label.log" 2>&1 & server=$!
             for _ in $(seq 240); do curl -sf localhost:8014/health >/dev/null && break; sleep 1; done
             timeout 200 python3 perf/serve_bench.py --base-url http://127.0.0.1:8014 --model llama8b --ignore-eos --disable-tqdm \
               --dataset fixed --input-len 128 --output-len 256 --num-prompts 24 --max-concurrency 1 --label $label \
               --num-warmups 0 --result-json "$OUT/serve8b_$label.json" 2>&1 | grep -E "TTFT|TPOT|throughput"
             python3 -c "import json; print('$label first-request TTFT ms:', round(1e3 * json.load(open('$OUT/serve8b_$label.json'))['ttfts'][0], 2))"
             kill $server; wait $server
           done ;;
    gemm-ncu) timeout "${STAGE_TIMEOUT:-300}" ncu --set full -k regex:_quant_matmul_kernel -c 12 -f -o "$OUT/gemm" \
                python3 perf/quant_bench.py --kernels awq-gptq-g128 --batches 128 256 --layers gate_up --iters 1 --repeats 1 --eager \
                > "$OUT/gemm_ncu.log" 2>&1
              ncu --import "$OUT/gemm.ncu-rep" --page details 2>&1 | tee "$OUT/gemm_ncu.txt" | grep -E "Duration|Throughput|Registers|Occupancy|Warp Cycles|Stall|Executed Ipc|Block Size|Shared Memory" | head -60 ;;
    tp70) bench llama70b20l_bs1_tp2 --model llama-3.1-70b --num-layers 20 --workload fixed --num-requests 1 --input-len 128 --output-len 256 --tensor-parallel-size 2
          bench llama70b20l_fixed_tp2 --model llama-3.1-70b --num-layers 20 --workload fixed --num-requests 256 --input-len 1024 --output-len 256 --tensor-parallel-size 2 ;;
    tp4-70b) nvidia-smi topo -m | tee "$OUT/topo.txt"
          bench llama70b_bs1_tp4 --model llama-3.1-70b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 4 --greedy-check 8
          bench llama70b_fixed_tp4 --model llama-3.1-70b --workload fixed --num-requests 256 --input-len 1024 --output-len 256 --tensor-parallel-size 4 --greedy-check 8
          python3 -c "import json, sys; g = [json.load(open(f))['results'][0]['greedy_token_ids'] for f in sys.argv[1:]]; print('greedy tokens of the two runs equal:', g[0] == g[1], [len(x) for x in g[0]])" \
            "$OUT/llama70b_bs1_tp4.json" "$OUT/llama70b_fixed_tp4.json" ;;
    tp) # the worker-failure test first, in a pytest of its own (it must come last in a process, and the
        # greedy ones took the whole stage's time in session 6)
        timeout 240 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=150 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | tail -12
        timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "not worker_exception" 2>&1 | tee "$OUT/tp_tests.log" | tail -15
        bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
        bench llama8b_bs1_tp2_sync --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2 --no-async-scheduling
        bench llama8b_fixed_tp2 --model llama-3.1-8b --workload fixed --num-requests 1000 --input-len 256 --output-len 256 --tensor-parallel-size 2 ;;
    awq-mem) # awq1 with its memory lines (the KV sizing's, the one before the first capture), then the compiled Triton
             # kernels by stack a thread (perf/lmem_scan.py: the driver reserves that for every resident thread); if the
             # run failed, again without the prefill / mixed-step graphs (--mixed-cuda-graph-sizes 0)
             bench llama8b_awq_bs1 --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512
             grep -hE "memory|CUDA graphs:|Error" "$OUT/llama8b_awq_bs1.log" | cut -c1-400 | head -12
             python3 perf/lmem_scan.py "$COMPILE_CACHE" --top 25 2>&1 | tee "$OUT/lmem_scan.txt" | cut -c1-220
             if [ ! -s "$OUT/llama8b_awq_bs1.json" ]; then
               bench llama8b_awq_bs1_nomixed --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512 --mixed-cuda-graph-sizes 0
               grep -hE "memory|CUDA graphs:|Error" "$OUT/llama8b_awq_bs1_nomixed.log" | cut -c1-400 | head -12
             fi ;;
    awq1) bench llama8b_awq_bs1 --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512 ;;
    quant1) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_quant.py -k "int8 or cuda_graph" 2>&1 \
              | tee "$OUT/quant_int8_tests.log" | tail -3
            for q in awq int8; do bench llama8b_${q}_bs1 --model llama-3.1-8b --quantization $q --workload fixed --num-requests 1 --input-len 128 --output-len 512; done ;;
    tp-diag) # (2 GPUs) the TP GPU tests (worker failure alone first, with its logs), then Llama-3.1-8B batch 1 (128 / 512) at
             # TP=2 with rank 0's host work / device wait a step, each worker's host work / wait for rank 0 (at its stop),
             # and 20 steps profiled on rank 0 and on the worker (GPU busy a step, top ops: the worker's in the log)
             timeout 240 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=150 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | tail -12
             timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "not worker_exception" 2>&1 | tee "$OUT/tp_tests.log" | tail -15
             bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2 --profile-steps 100 20
             grep -hE "tensor-parallel (worker )?rank" "$OUT/llama8b_bs1_tp2.log" | cut -c1-700
             grep -h -A 20 "its window" "$OUT/llama8b_bs1_tp2.log" | cut -c1-160 ;;
    tp-ratio) # (2 GPUs) Llama-3.1-8B batch 1 (128 / 512) at TP=2, then TP=1 (GPU 0), same call, each timed and then profiled
              # over steps 100-119 with every GPU op listed (STEP_PROFILE_TOP=40): the ratio, and which kernels a step TP=2 adds
              export STEP_PROFILE_TOP=40
              bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2 --profile-steps 100 20
              grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/llama8b_bs1_tp2.log" | cut -c1-400
              CUDA_VISIBLE_DEVICES=0 bench llama8b_bs1_tp1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --profile-steps 100 20
              unset STEP_PROFILE_TOP ;;
    tp-profile) # (2 GPUs) tp-diag's TP=2 batch-1 run alone: host work / wait of every rank, 20 steps profiled on each
             bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2 --profile-steps 100 20
             grep -hE "tensor-parallel (worker )?rank" "$OUT/llama8b_bs1_tp2.log" | cut -c1-700
             grep -h -A 20 "its window" "$OUT/llama8b_bs1_tp2.log" | cut -c1-160 ;;
    tp-tests) # (2 GPUs) the TP GPU tests alone: the greedy ones, then the worker-failure one (its threads' stacks are
              # dumped if it still runs after 150 s)
              # one engine a process gets the custom all-reduce: compiled-async alone; then compiled with it and
              # graphs-of-eager after it in the same process (on NCCL: the second engine of a process)
              for k in "step_times or custom_all_reduce" "two_ranks and compiled-async" "two_ranks and (compiled] or graphs-of-eager)"; do
                timeout 150 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=120 tests/test_tensor_parallel.py -k "$k" 2>&1 \
                  | tee -a "$OUT/tp_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|all-reduce:" | cut -c1-300
              done
              timeout 240 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=150 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | tail -60 ;;
    tp-ar) timeout 150 python3 perf/allreduce_bench.py --out "$OUT/allreduce.json" 2>&1 | tee "$OUT/allreduce.log" | tail -12
           timeout 150 python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k custom_all_reduce 2>&1 | tail -3
           for spec in "llama8b_bs1_tp2 --tensor-parallel-size 2" "llama8b_bs1_tp2_nccl --tensor-parallel-size 2 --disable-custom-all-reduce" \
                       "llama8b_bs1_tp1"; do
             set -- $spec
             bench "$@" --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512
             grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/$1.log" | cut -c1-600
           done
           timeout 200 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=150 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | tail -12 ;;
    tp-fused) # the all-reduce fused with the residual add and RMSNorm (ops.triton_allreduce): its latency against the
              # all-reduce and a compiled add + norm (allreduce_bench), its GPU test, then Llama-3.1-8B batch 1 (128 / 512) at
              # TP=2 with it, without it (ENGINE_FUSED_ALLREDUCE=0: the one-shot all-reduce, then the compiled add + norm),
              # and at TP=1 (GPU 0)
              timeout 200 python3 perf/allreduce_bench.py --rows 1 2 8 32 128 256 --out "$OUT/allreduce.json" 2>&1 | tee "$OUT/allreduce.log" | tail -8
              timeout 150 python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "custom_all_reduce or fused_all_reduce" 2>&1 | tee "$OUT/custom_ar_test.log" | tail -15
              ENGINE_FUSED_ALLREDUCE=lamport bench llama8b_bs1_tp2_fused --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
              grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/llama8b_bs1_tp2_fused.log" | cut -c1-600
              ENGINE_FUSED_ALLREDUCE=0 bench llama8b_bs1_tp2_unfused --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
              grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/llama8b_bs1_tp2_unfused.log" | cut -c1-600
              CUDA_VISIBLE_DEVICES=0 bench llama8b_bs1_tp1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 ;;
    fused-check) # (2 GPUs) the fused all-reduce kernels under perf/fused_allreduce_check.py (one call at a time, bursts, a
                 # CUDA graph; diagnostics at the first wrong row), then the fused kernels' GPU test with the barrier-based one
                 # (FUSED_CHECK_STOPS=1: a failed check ends the script, sparing the device time of the stages after it)
                 timeout 240 python3 perf/fused_allreduce_check.py --out "$OUT/fused_check.json" 2>&1 | tee "$OUT/fused_check.log" \
                   | grep --line-buffered -vE "^\{\"way\": \"(burst|graph)[0-9]+\".*\"first_bad\": null" | cut -c1-1500
                 if [ "${PIPESTATUS[0]}" != 0 ] && [ "${FUSED_CHECK_STOPS:-0}" = 1 ]; then echo "fused check failed: stopping"; exit 1; fi
                 ENGINE_FUSED_ALLREDUCE=flags timeout 200 python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k fused_all_reduce 2>&1 \
                   | tee "$OUT/fused_test_flags.log" | grep --line-buffered -E "passed|failed|Error" | cut -c1-300 ;;
    tp-verify) # the fused all-reduce's GPU test (both kernels, a late peer), greedy TP=2 == TP=1 with it, Llama-3.1-8B
               # batch 1 (128 / 512) at TP=2 with it and at TP=1 (GPU 0), allreduce_bench (the worker-failure test: tp-failure); with
               # ENGINE_FUSED_ALLREDUCE=lamport unless the environment names the kernel
               export ENGINE_FUSED_ALLREDUCE=${ENGINE_FUSED_ALLREDUCE:-lamport} ENGINE_TEST_TRACE=1
               timeout 200 python3 -m pytest -m gpu -q -s tests/test_tensor_parallel.py -k "custom_all_reduce or fused_all_reduce" 2>&1 | tee "$OUT/custom_ar_test.log" \
                 | grep --line-buffered -E "passed|failed|Error|rank [01]: .* graph" | cut -c1-200
               timeout 200 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO tests/test_tensor_parallel.py -k "two_ranks and compiled-async" 2>&1 \
                 | tee "$OUT/tp_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed|all-reduce:" | cut -c1-300
               bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
               grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/llama8b_bs1_tp2.log" | cut -c1-400
               CUDA_VISIBLE_DEVICES=0 bench llama8b_bs1_tp1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512
               timeout 200 python3 perf/allreduce_bench.py --rows 1 2 8 64 256 --out "$OUT/allreduce.json" 2>&1 | tee "$OUT/allreduce.log" | tail -6
               unset ENGINE_FUSED_ALLREDUCE ENGINE_TEST_TRACE ;;
    tp-greedy) # (2 GPUs) tp-verify's tests alone: the fused all-reduce's GPU test, greedy TP=2 == TP=1 (compiled-async)
               export ENGINE_FUSED_ALLREDUCE=${ENGINE_FUSED_ALLREDUCE:-lamport}
               timeout 200 python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "custom_all_reduce or fused_all_reduce" 2>&1 \
                 | tee "$OUT/custom_ar_test.log" | grep --line-buffered -E "passed|failed|Error" | cut -c1-200
               timeout 200 python3 -m pytest -m gpu -v tests/test_tensor_parallel.py -k "two_ranks and compiled-async" 2>&1 \
                 | tee "$OUT/tp_tests.log" | grep -E "PASSED|FAILED|ERROR|passed|failed" | cut -c1-300
               unset ENGINE_FUSED_ALLREDUCE ;;
    tp-failure) timeout 150 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=120 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | grep -E "PASSED|FAILED|Error|assert" | cut -c1-300 ;;
    tp-ab) for spec in "llama8b_bs1_tp2_nccl --disable-custom-all-reduce" "llama8b_bs1_tp2"; do
             set -- $spec
             bench "$@" --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
             grep -hE "tensor-parallel (worker )?rank|all-reduce:" "$OUT/$1.log" | cut -c1-600
           done ;;
    actorder) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_quant.py -k sorted_by_group 2>&1 | tee "$OUT/actorder_tests.log" | tail -3
              timeout "${STAGE_TIMEOUT:-300}" python3 perf/quant_bench.py --kernels gptq-g128 gptq-act-g128 gptq-act-sorted-g128 2>&1 | tee "$OUT/actorder_bench.log" | tail -30 ;;
    actorder8b) # what act-order costs the engine (not quant_bench's eager calls: in the compiled model the x gather may fuse
                # into the norm or activation before it): Llama-3.1-8B GPTQ batch 1 (128 / 512) without act-order, then
                # with it (--act-order: groups shuffled, sorted at load, x gathered each call), same call
                for spec in "llama8b_gptq_bs1" "llama8b_gptq_act_bs1 --act-order"; do
                  set -- $spec
                  bench "$@" --model llama-3.1-8b --quantization gptq --workload fixed --num-requests 1 --input-len 128 --output-len 512
                done ;;
    tp-quick) bench llama8b_bs1_tp2 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512 --tensor-parallel-size 2
              bench llama8b_bs1_tp1 --model llama-3.1-8b --workload fixed --num-requests 1 --input-len 128 --output-len 512
              timeout 240 python3 -m pytest -m gpu -v -o log_cli=true --log-cli-level=INFO -o faulthandler_timeout=150 tests/test_tensor_parallel.py -k worker_exception 2>&1 | tee "$OUT/tp_failure_test.log" | tail -12
              timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_tensor_parallel.py -k "not worker_exception" 2>&1 | tee "$OUT/tp_tests.log" | tail -15 ;;
    quant8b) for q in awq int8; do bench llama8b_${q}_bs1 --model llama-3.1-8b --quantization $q --workload fixed --num-requests 1 --input-len 128 --output-len 512; done
             for q in awq int8; do bench llama8b_${q}_fixed --model llama-3.1-8b --quantization $q --workload fixed --num-requests 1000 --input-len 256 --output-len 256; done
             # bitsandbytes runs compiled without CUDA graphs (its outlier search reads the device on the host)
             bench llama8b_bnb_fixed --model llama-3.1-8b --quantization bitsandbytes --workload fixed --num-requests 1000 --input-len 256 --output-len 256 ;;
    awq-wide) timeout "${STAGE_TIMEOUT:-300}" python3 -m pytest -m gpu -q tests/test_triton_quant.py \
                -k "gptq-v2 or gptq-v1-g128 or awq-g128 or per-channel or cuda_graph" 2>&1 | tee "$OUT/quant_wide_tests.log" | tail -4
              timeout "${STAGE_TIMEOUT:-300}" python3 perf/quant_bench.py --tiles default session6 --kernels bf16 awq-gptq-g128 \
                --batches 1 2 --out "$OUT/quant_bench_wide.json" 2>&1 | tee "$OUT/quant_bench_wide.log" | tail -30
              bench llama8b_awq_bs1 --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512
              ENGINE_QUANT_TILES=session6 bench llama8b_awq_bs1_session6 --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512 ;;
    planar-sweep) timeout "${STAGE_TIMEOUT:-300}" python3 perf/quant_bench.py --planar-sweep --kernels awq-gptq-g128 --batches 1 \
                    --out "$OUT/quant_bench_planar_sweep.json" 2>&1 | tee "$OUT/quant_bench_planar_sweep.log" | tail -3 ;;
    awq-sweep) timeout "${STAGE_TIMEOUT:-300}" python3 perf/quant_bench.py --planar-sweep --kernels bf16 awq-gptq-g128 \
                 --batches 1 --out "$OUT/quant_bench_sweep.json" 2>&1 | tee "$OUT/quant_bench_sweep.log" | tail -4
               bench llama8b_awq_bs1 --model llama-3.1-8b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 512 --profile-steps 100 20
               grep -h -A 40 "requests$" "$OUT/llama8b_awq_bs1.log" | grep -vE "^\{|Capturing" | cut -c1-200 ;;
    quant70b-fixed) STAGE_TIMEOUT=${STAGE_TIMEOUT:-580} bench llama70b_awq_fixed --model llama-3.1-70b --quantization awq --workload fixed --num-requests 1000 --input-len 128 --output-len 512 --max-model-len 1024 --max-num-seqs 128 ;;
    quant70b-fixed-fp8) STAGE_TIMEOUT=${STAGE_TIMEOUT:-580} bench llama70b_awq_fixed_fp8 --model llama-3.1-70b --quantization awq --workload fixed --num-requests 1000 --input-len 128 --output-len 512 --max-model-len 1024 --max-num-seqs 256 --kv-cache-dtype fp8 ;;
    quant70b) bench llama70b_awq_bs1 --model llama-3.1-70b --quantization awq --workload fixed --num-requests 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
              STAGE_TIMEOUT=${STAGE_TIMEOUT:-540} bench llama70b_awq_fixed --model llama-3.1-70b --quantization awq --workload fixed --num-requests 1000 --input-len 128 --output-len 512 --max-model-len 1024 ;;
  esac
done
