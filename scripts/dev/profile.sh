#!/usr/bin/env bash
# profile.sh -- developer profiling session on a GPU machine (not part of the tests): build,
# SASS of the routing kernels, Nsight Compute sections for the routing kernel (deepseekv3,
# T = 16384), the warp-specialised GEMM (Mixtral 8x7B, T = 4096), the Hopper fp8_block GEMMs
# (DeepSeek-V3 T = 4096, exact and FP8 tensor cores) and per-kernel durations of one
# Qwen3-30B-A3B T = 1 fused call.  Logs to $OUT.
# Usage (GPU machine, repo root): scripts/dev/profile.sh [route|fused|qgmma|qgstall|qgcall|midt|qdecode|qvsrc|w4stall|rsstall|wreg|decode ...]
set -o pipefail
OUT=${OUT:-prof-out}
mkdir -p "$OUT"
[ -f .gpu-deps/activate.sh ] && source .gpu-deps/activate.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
cmake -S . -B build-gpu -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null &&
  cmake --build build-gpu -j"$(nproc)" 2>&1 | grep -E "rror|warning" | tee "$OUT/build.log"
export MOE_LIB=$PWD/build-gpu/libmoe.so MOE_CDEF=$PWD/build-gpu/moe_cdef.h
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
what=${*:-route fused decode}
for w in $what; do
  case $w in
  route)
    obj=$(find build-gpu -name 'route.cu.o' | head -1)
    cuobjdump -sass "$obj" | gzip > "$OUT/route_sass.txt.gz"
    cuobjdump -sass "$obj" | awk '/Function :/{f=$3; n[f]=0} /^ +\/\*[0-9a-f]+\*\//{n[f]++} END{for(k in n) print n[k], k}' |
      sort -k2 | tee "$OUT/route_sass_counts.txt"
    timeout 200 "$NCU" -k regex:k_route --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section InstructionStats --section Occupancy --section LaunchStats \
      --section SchedulerStats luajit scripts/moe bench route --cases deepseekv3 --T 16384 --no-torch --reps 3 \
      > "$OUT/ncu_route.txt" 2>&1
    tail -120 "$OUT/ncu_route.txt" ;;
  fused)
    timeout 300 "$NCU" -k regex:gemm_ws --launch-skip 2 --launch-count 2 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
      luajit scripts/moe bench fused --shape mixtral-8x7b --t 4096 --reps 1 --no-torch > "$OUT/ncu_ws.txt" 2>&1
    grep -E "moe__k|Throughput|Duration|Stall|Issue|Eligible|Active Warps|L2|Hit|Bandwidth|Busy" "$OUT/ncu_ws.txt" | tail -60 ;;
  qgmma)
    # the Hopper fp8_block kernels (exact and FP8 tensor cores), DeepSeek-V3 T = 4096
    for v in 0 1; do
      MOE_FUSED_FP8MMA=$v timeout 300 "$NCU" -k "regex:k_qg_(exact|fp8)" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        luajit scripts/moe bench fused_quant --quant fp8_block --shape deepseek-v3 --t 4096 --reps 1 \
        > "$OUT/ncu_qgmma_fp8mma$v.txt" 2>&1
      grep -E "k_qg|Throughput|Duration|Stall|Issue|Eligible|L2|Hit|Bandwidth|Busy|Pipe" "$OUT/ncu_qgmma_fp8mma$v.txt" |
        head -70
    done ;;
  qgstall)
    # warp stall reasons of the Hopper fp8_block GEMM1 (exact and FP8 tensor cores), DeepSeek-V3 T = 4096
    for v in 0 1; do
      MOE_FUSED_FP8MMA=$v timeout 300 "$NCU" -k "regex:k_qg_(exact|fp8)" --launch-skip 2 --launch-count 1 \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*cycles_active.avg.pct_of_peak_sustained_active" \
        luajit scripts/moe bench fused_quant --quant fp8_block --shape deepseek-v3 --t 4096 --reps 1 \
        > "$OUT/ncu_qgstall$v.txt" 2>&1
      grep -E "k_qg|stalled|pipe_tensor" "$OUT/ncu_qgstall$v.txt" | awk '$NF+0 > 0.05 || /k_qg|tensor/' | head -40
    done ;;
  qgcall)
    # per-kernel durations of one fp8_block fused call at DeepSeek-V3 T = 4096 (outside graphs: the
    # bench's warm-up calls)
    timeout 200 "$NCU" --metrics gpu__time_duration.sum --launch-skip 0 --launch-count 160 \
      luajit scripts/moe bench fused_quant --quant fp8_block --shape deepseek-v3 --t 4096 --reps 1 \
      > "$OUT/ncu_qgcall.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|gpu__time_duration" "$OUT/ncu_qgcall.txt" | sed -E 's/\(moe__fq_gemm_args.*//; s/Context.*//' | tail -60 ;;
  midt)
    # the mma.sync tile kernels at 16 pairs per expert (Mixtral 8x7B T = 64), fp8 and nvfp4:
    # GEMM1 and GEMM2 of the second call, speed of light, memory, stalls, occupancy
    for m in fp8 nvfp4; do
      timeout 300 "$NCU" -k "regex:k_gemm" --launch-skip 2 --launch-count 2 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
        luajit scripts/moe bench fused_quant --quant $m --shape mixtral-8x7b --t 64 --reps 1 \
        > "$OUT/ncu_midt_$m.txt" 2>&1
      grep -E "k_gemm|Duration|Throughput|Eligible|Active Warps|Achieved Occ|Theoretical Occ|Busy|Bandwidth|stalled" \
        "$OUT/ncu_midt_$m.txt" | awk '!/stalled/ || $NF+0 > 0.3' | sed -E 's/\(moe__fq_gemm_args.*//' | head -70
    done ;;
  qdecode)
    # per-kernel durations and DRAM throughput of the routing and GEMV kernels of fused calls at
    # Qwen3-30B-A3B T = 1 (fp8, fp8_block), and the whole call's graph replay time for reference
    for m in fp8 fp8_block; do
      timeout 120 "$NCU" -k "regex:k_qv|k_route" --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
        --launch-skip 0 --launch-count 60 \
        luajit scripts/moe bench fused_quant --quant $m --shape qwen3-30b-a3b --t 1 --reps 3 > "$OUT/ncu_qdecode_$m.txt" 2>&1
      echo "== $m"
      grep -E "^  [a-zA-Z_].*\(|gpu__time_duration|dram__|warps_active" "$OUT/ncu_qdecode_$m.txt" | sed -E 's/\(.*//' | tail -24
    done ;;
  qvsrc)
    # where the decode GEMV kernels' warps wait, per SASS line (Qwen3-30B-A3B T = 1 fp8 and
    # fp8_block): boost clocks, cold L2, warp-state samples; summarised by ncu_src_top.py
    for m in fp8 fp8_block; do
      timeout 240 "$NCU" -k "regex:k_qv" --launch-skip 4 --launch-count 2 --clock-control none \
        --section SpeedOfLight --section WarpStateStats --section SourceCounters --section Occupancy \
        --import-source no -o "$OUT/qvsrc_$m" -f \
        luajit scripts/moe bench fused_quant --quant $m --shape qwen3-30b-a3b --t 1 --reps 3 > "$OUT/ncu_qvsrc_$m.txt" 2>&1
      "$NCU" -i "$OUT/qvsrc_$m.ncu-rep" --print-summary none | grep -E "^  [a-zA-Z_].*\(|Duration|DRAM Throughput"
      "$NCU" -i "$OUT/qvsrc_$m.ncu-rep" --page source --print-source sass --csv > "$OUT/qvsrc_$m.csv" 2>&1
      python3 scripts/dev/ncu_src_top.py "$OUT/qvsrc_$m.csv" 12
    done ;;
  w4stall)
    # warp stall reasons and pipes of the Hopper 4-bit GEMM1 (nvfp4, mxint4) and fp8_block's, Qwen3-30B-A3B T = 4096
    for m in nvfp4 mxint4 fp8_block; do
      timeout 300 "$NCU" -k "regex:k_qg_exact" --launch-skip 2 --launch-count 1 --section SpeedOfLight --section SchedulerStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_.*cycles_active.avg.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_.*avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum" \
        luajit scripts/moe bench fused_quant --quant $m --shape qwen3-30b-a3b --t 4096 --reps 1 \
        > "$OUT/ncu_w4stall_$m.txt" 2>&1
      grep -E "k_qg|Duration|Throughput|Eligible|Issued|stalled|pipe|shared" "$OUT/ncu_w4stall_$m.txt" |
        awk '!/stalled|pipe/ || $NF+0 > 0.3' | sed -E 's/\(moe__fq_gemm_args.*//' | head -60
    done ;;
  rsstall)
    # k_qg_rs (nvfp4, mxint4) and fp8_block's k_qg_exact at Qwen3-30B-A3B T = 4096: both GEMMs of the
    # second call: speed of light (L2 / DRAM throughput), stall reasons, pipes; then nvfp4 GEMM1's
    # SASS lines with the most stall samples
    for m in nvfp4 mxint4 fp8_block; do
      timeout 300 "$NCU" -k "regex:k_qg_(rs|exact)" --launch-skip 2 --launch-count 2 --section SpeedOfLight --section SchedulerStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__pipe_tensor.*cycles_active.avg.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_(alu|fma|fmaheavy|lsu|tensor|uniform).*avg.pct_of_peak_sustained_active,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum" \
        luajit scripts/moe run scripts/dev/kprof.lua $m 4096 qwen3 > "$OUT/ncu_rsstall_$m.txt" 2>&1
      grep -E "k_qg|Duration|Throughput|Eligible|Issued|stalled|pipe|sectors|conflicts" "$OUT/ncu_rsstall_$m.txt" |
        awk '!/stalled|pipe_/ || $NF+0 > 0.2' | sed -E 's/\(moe__fq_gemm_args.*//' | head -60
    done
    timeout 300 "$NCU" -k "regex:k_qg_rs" --launch-skip 2 --launch-count 1 --section SourceCounters -o "$OUT/rs_src" \
      luajit scripts/moe run scripts/dev/kprof.lua nvfp4 4096 qwen3 > /dev/null 2>&1
    "$NCU" -i "$OUT/rs_src.ncu-rep" --page source --print-source sass --csv > "$OUT/rs_src.csv" 2>/dev/null
    python3 scripts/dev/ncu_src_top.py "$OUT/rs_src.csv" 40
    rm -f "$OUT/rs_src.ncu-rep"; gzip -f "$OUT/rs_src.csv" ;;
  wreg)
    # the register-operand tile kernel (k_wreg) at 16 pairs per expert (Mixtral 8x7B T = 64): GEMM1 and
    # GEMM2 of mxfp4 and mxint4 (speed of light, stalls, pipes)
    for m in mxfp4 mxint4; do
      timeout 300 "$NCU" -k "regex:k_wreg" --launch-skip 2 --launch-count 2 --section SpeedOfLight --section SchedulerStats \
        --section Occupancy --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,regex:sm__inst_executed_pipe_(alu|fma|lsu|tensor).*avg.pct_of_peak_sustained_active,smsp__inst_executed.sum" \
        luajit scripts/moe bench fused_quant --quant $m --shape mixtral-8x7b --t 64 --reps 1 > "$OUT/ncu_wreg_$m.txt" 2>&1
      grep -E "k_wreg|Duration|DRAM Throughput|Eligible|Issued|stalled|pipe_|inst_executed.sum|Achieved Occ" "$OUT/ncu_wreg_$m.txt" |
        awk '!/stalled|pipe_/ || $NF+0 > 0.3' | sed -E 's/\(moe__fq_gemm_args.*//' | head -50
    done ;;
  decode)
    timeout 120 "$NCU" --metrics gpu__time_duration.sum --launch-skip 40 --launch-count 24 \
      luajit scripts/moe bench fused --shape qwen3-30b-a3b --t 1 --reps 3 --no-torch > "$OUT/ncu_decode.txt" 2>&1
    grep -E "moe__k|gpu__time_duration" "$OUT/ncu_decode.txt" | head -60 ;;
  esac
done
