-- moe bench fused_quant [--quant MODE[,MODE]] [--shape NAME[,NAME]] [--t LIST] [--reps N] [--json PATH]
--                       [--compare-env NAME=VALUE]
--
-- --compare-env NAME=VALUE times every case again with that environment variable set, then
-- once more without it (the spread between the two default timings is the noise), e.g.
-- MOE_FUSED_QGEMV=0: decode (T <= 4) on the tile kernels instead of the GEMV path;
-- MOE_FUSED_QWGMMA=0: prefill on the tile kernels instead of the Hopper wgmma ones (every mode);
-- MOE_FUSED_QWREG=0: a few to 48 (4-bit: 64) pairs per expert on the tile kernels instead of the
--   register-operand kernel;
-- MOE_FUSED_FP8MMA=1: those on the FP8 tensor cores (not the reference numerics, see docs/quantization.md);
-- MOE_FUSED_QVLOC=0: decode (Qwen3-30B-A3B T = 1 and similar sizes) with the activations quantised in
--   shared grid-wide steps instead of by every block;
-- MOE_FUSED_QVPDL=0: those block-local decode kernels launched plainly, not as programmatic
--   dependents of the routing kernel;
-- MOE_FUSED_I4F16=0: mxint4 with per-32 promotions of bf16-MMA partial sums instead of its scales folded
--   into f16 weights (docs/quantization.md, "mxint4 on f16 MMAs");
-- MOE_FUSED_NVX=0: nvfp4 on the Hopper register-operand kernel with x through the quantiser and its
--   codes widened once a pair instead of quantised once a token and scattered (docs/quantization.md,
--   "nvfp4's x once a token");
-- MOE_FUSED_FBX=0 / MOE_FUSED_MXX=0: fp8_block / mxfp4 and mxint4 on that kernel with x quantised
--   (fp8_block) or converted once a pair instead of once a token (docs/quantization.md, "fp8_block's
--   and the mx modes' x once a token");
-- MOE_FUSED_QSW=0: the 4-bit weight codes copied into shared memory without the 32-byte swizzle;
-- MOE_FUSED_MXS=0: mxfp4 on that kernel with two bf16 multiplies a code pair instead of its scale folded
--   into one (docs/quantization.md, "Fewer instructions a stage");
-- MOE_FUSED_FBPP=0: fp8_block on that kernel with its two consumer warpgroups issuing in step instead
--   of taking turns (docs/quantization.md, "fp8_block's ping-pong turns");
-- MOE_FUSED_QVRT=0: fp8 / fp8_block / nvfp4 at T = 1 with the routing kernel and k_qv_up reading its ids
--   instead of the decode kernels routing the token themselves (=1: the routing kernel, k_qv_up still
--   routing its own pair);
-- MOE_FUSED_QVBK=0: every mode at T = 1 with k_qv_down's W2 rows loaded into registers instead of
--   bulk-copied into shared memory (docs/quantization.md, "Decode at T = 1: W2 by bulk copies");
-- MOE_FUSED_QVUPPDL=0: fp8 / fp8_block at T = 1 with k_qv_up launched plainly instead of as a
--   programmatic dependent of the kernel before the call (waiting for it first).
--
-- Fused MoE in the quantisation modes on CUDA: per model shape, mode and T, the median time of
-- one moe.fused_moe call (routing, activation quantisation and both GEMMs included) from
-- CUDA-graph replays, uniform random routing (renormalize over random normal logits), next to
-- each mode's own floor on the H100 datasheet:
--   bytes = distinct experts hit x (the mode's weight bytes of 3*H*I values, scales included)
--           + x and out (T*H*2 each) + logits (T*E*4), at 3.35 TB/s;
--   FLOPs = 2*T*K*3*H*I at the mode's tensor-core peak: 1979 TFLOP/s for the modes with
--           8/4-bit activations (fp8, fp8_block, nvfp4: an fp8 path exists), 989 for the
--           W4A16 modes (mxfp4, mxint4: bf16 MMAs) and bf16;
--   floor = the larger of the two times.
-- bf16 (moe.experts without quant) is timed in the same run as the baseline, and again right before
-- every quantised case: its "vs bf16" is against that adjacent time (same clocks).  Where fp8_block
-- is among the modes, each 4-bit case (nvfp4, mxfp4, mxint4) is also timed alternately with
-- fp8_block, five rounds each, and its bar against fp8_block compares those two medians (the
-- separately timed ratio is printed beside it): the board's clocks drift by a few percent over a
-- run, more than these modes differ.  Likewise fp8_block at T = 4096 alternately with bf16 for its
-- DeepSeek-V3 bar.  Bars of issue 5:
-- T <= 64: fp8 and fp8_block <= 2x the fp8 floor; nvfp4, mxfp4, mxint4 <= the fp8_block time
-- (same shape and T); T = 4096: fp8_block >= 1.3x faster than bf16 for DeepSeek-V3.
local moe = require("moe")
local common = require("bench.common")
local split = common.split

local HBM = 3.35e12
local PEAK = { bf16 = 989e12, fp8 = 1979e12, fp8_block = 1979e12, nvfp4 = 1979e12, mxfp4 = 989e12,
               mxint4 = 989e12 }
-- bytes per weight value, scales included (fp8: one f32 per matrix, negligible)
local WBYTES = { bf16 = 2, fp8 = 1, fp8_block = 1 + 4 / (128 * 128), nvfp4 = 0.5 + 1 / 16,
                 mxfp4 = 0.5 + 1 / 32, mxint4 = 0.5 + 2 / 32 }

local SHAPES = {
  { name = "deepseek-v3", H = 7168, I = 2048, E = 256, K = 8 },
  { name = "qwen3-30b-a3b", H = 2048, I = 768, E = 128, K = 8 },
  { name = "mixtral-8x7b", H = 4096, I = 14336, E = 8, K = 2 },
}
local TS = { 1, 16, 64, 256, 1024, 4096 }
local QUANTS = { "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" }
local FOURBIT = { nvfp4 = true, mxfp4 = true, mxint4 = true }
local ALT = 5 -- rounds of a 4-bit mode timed alternately with fp8_block (and fp8_block with bf16)

local opts, code = common.parse("fused_quant", { ... }, { reps = 20 }, {
  { "--shape", key = "shape", kind = "names", value = SHAPES },
  { "--quant", key = "quant", kind = "string" },
  { "--t", key = "t", kind = "numbers", aliases = { "--T" } },
  { "--reps", key = "reps", kind = "number" },
  { "--json", key = "json", kind = "string" },
  { "--compare-env", kind = "env" },
}, "usage: moe bench fused_quant [--quant fp8,fp8_block,nvfp4,mxfp4,mxint4] [--shape NAME[,NAME]] " ..
   "[--t 1,16,...] [--reps N] [--json PATH] [--compare-env NAME=VALUE]\n" ..
   "shapes: deepseek-v3, qwen3-30b-a3b, mixtral-8x7b; bf16 is always timed as the baseline")
if not opts then return code end
SHAPES = opts.shape or SHAPES
TS = opts.t or TS
if opts.quant then
  QUANTS = split(opts.quant)
  for _, q in ipairs(QUANTS) do
    if not PEAK[q] or q == "bf16" then
      io.stderr:write("moe bench fused_quant: --quant: expected fp8, fp8_block, nvfp4, mxfp4 or mxint4, got " .. q .. "\n")
      return 2
    end
  end
end
-- in the canonical order whatever the order asked: fp8_block before the 4-bit modes (their alternated
-- timings need its experts)
local MODES, asked = { "bf16" }, {}
for _, q in ipairs(QUANTS) do asked[q] = true end
for _, q in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" } do
  if asked[q] then MODES[#MODES + 1] = q end
end

if not common.have_cuda(moe, "fused_quant") then return 77 end

local rows = {}
for _, s in ipairs(SHAPES) do
  local Hd, I, E, K = s.H, s.I, s.E, s.K
  -- source weights: a block of B random experts copied to all E (values do not change the
  -- timing; generating 22 GB of normals would)
  local B = math.min(E, 8)
  local w13 = moe.empty({ E, 2 * I, Hd }, { dtype = "bf16", device = "cuda" })
  local w2 = moe.empty({ E, Hd, I }, { dtype = "bf16", device = "cuda" })
  do
    local b13 = moe.randn({ B, 2 * I, Hd }, { dtype = "bf16", device = "cuda", seed = 1, std = 0.02 })
    local b2 = moe.randn({ B, Hd, I }, { dtype = "bf16", device = "cuda", seed = 2, std = 0.02 })
    for e0 = 1, E, B do
      w13:narrow(1, e0, B):copy_(b13)
      w2:narrow(1, e0, B):copy_(b2)
    end
    b13:free(); b2:free()
  end
  -- inputs and the experts hit, per T (shared by every mode)
  local inp = {}
  for _, T in ipairs(TS) do
    local xs, ls = {}, {}
    for k = 1, 4 do
      xs[k] = moe.randn({ T, Hd }, { dtype = "bf16", device = "cuda", seed = 100 * T + k })
      ls[k] = moe.randn({ T, E }, { device = "cuda", seed = 100 * T + k + 50 })
    end
    local hit = 0
    for k = 1, 4 do
      local r = moe.route{ logits = ls[k], method = "renormalize", top_k = K }
      local seen, n = {}, 0
      for _, row in ipairs(r.ids:to("cpu"):totable()) do
        for _, id in ipairs(row) do if not seen[id] then seen[id] = true; n = n + 1 end end
      end
      hit = hit + n / 4
    end
    inp[T] = { xs = xs, ls = ls, hit = hit }
  end
  -- the bf16 experts stay for the whole shape: every quantised case is timed right after bf16 at
  -- the same T, so "vs bf16" compares the two under the same clocks (a long run reaches the
  -- board's power cap: H100, 2026-11-27, SM clock 1980 MHz at the start, 1590-1830 MHz under the
  -- 700 W cap in its later cases; the first bf16 rows ran at full clocks)
  local exb = moe.experts{ gate_up = w13, down = w2, device = "cuda" }
  local exfb -- fp8_block's experts, kept for the 4-bit modes' alternated timings
  for _, mode in ipairs(MODES) do
    local ex = mode == "bf16" and exb or moe.experts{ gate_up = w13, down = w2, device = "cuda", quant = mode }
    moe.synchronize("cuda")
    for _, T in ipairs(TS) do
      local xs, ls = inp[T].xs, inp[T].ls
      local out = moe.empty({ T, Hd }, { dtype = "bf16", device = "cuda" })
      local function time_with(e)
        e:reserve(T, K)
        moe.fused_moe{ hidden = xs[1], logits = ls[1], experts = e, method = "renormalize", top_k = K, out = out }
        local calls = T <= 256 and 8 or 2
        return common.graph_us(moe, calls, opts.reps, function(c)
          local k = c % 4 + 1
          moe.fused_moe{ hidden = xs[k], logits = ls[k], experts = e, method = "renormalize", top_k = K, out = out }
        end)
      end
      local function time_it() return time_with(ex) end
      local us_b = mode ~= "bf16" and time_with(exb) or nil -- bf16 just before, same clocks
      local us = time_it()
      -- medians of ALT rounds timed alternately with the reference (4-bit: fp8_block; fp8_block at
      -- T = 4096: bf16)
      local us_alt, us_ref_alt
      local ref = (mode == "fp8_block" and T == 4096) and exb or (FOURBIT[mode] and exfb) or nil
      if ref then
        local tq, tr = {}, {}
        for k = 1, ALT do
          tr[k] = time_with(ref)
          tq[k] = time_it()
        end
        us_alt, us_ref_alt = common.median(tq), common.median(tr)
      end
      local us_env, us_again
      if opts.env_k then
        us_env = common.with_env(opts.env_k, opts.env_v, time_it)
        us_again = time_it() -- the default again, after: the spread between the two is the noise
      end
      local hit = inp[T].hit
      local bytes = hit * 3 * Hd * I * WBYTES[mode] + T * Hd * 4 + T * E * 4
      local flops = 2 * T * K * 3 * Hd * I
      local floor = math.max(bytes / HBM, flops / PEAK[mode]) * 1e6
      rows[#rows + 1] = { shape = s.name, mode = mode, T = T, us = us, floor = floor, pct_floor = 100 * floor / us,
                          tflops = flops / us / 1e6, gbs = bytes / us / 1e3, hit = hit,
                          bound = bytes / HBM > flops / PEAK[mode] and "mem" or "flop",
                          us_env = us_env, us_again = us_again, us_b = us_b, us_alt = us_alt,
                          us_ref_alt = us_ref_alt }
      out = nil
      collectgarbage("collect")
    end
    if mode == "fp8_block" then exfb = ex
    elseif mode ~= "bf16" then ex:free() end
    collectgarbage("collect")
  end
  exb:free()
  if exfb then exfb:free() end
  w13:free(); w2:free()
  for _, v in pairs(inp) do
    for k = 1, 4 do v.xs[k]:free(); v.ls[k]:free() end
  end
  collectgarbage("collect")
end

-- ----------------------------------------------------------------- output --
local gpu = moe.cuda_device_info(0)
print(string.format("moe bench fused_quant -- %s, %s UTC, median of %d CUDA-graph replays, uniform routing; " ..
                    "vs bf16: against bf16 timed just before the case", gpu, os.date("!%Y-%m-%d %H:%M"), opts.reps))
local function find(shape, mode, T)
  for _, r in ipairs(rows) do
    if r.shape == shape and r.mode == mode and r.T == T then return r end
  end
end
print(string.format("%-14s %-10s %5s %6s %10s %10s %7s %5s %8s %8s %8s", "shape", "mode", "T", "hit", "us", "floor",
                    "%floor", "bound", "TFLOP/s", "GB/s", "vs bf16"))
for _, r in ipairs(rows) do
  local b = r.us_b or r.us
  print(string.format("%-14s %-10s %5d %6.1f %10.1f %10.1f %6.1f%% %5s %8.1f %8.0f %8s", r.shape, r.mode, r.T, r.hit,
                      r.us, r.floor, r.pct_floor, r.bound, r.tflops, r.gbs, string.format("%.2fx", b / r.us)))
end
for _, r in ipairs(rows) do
  if r.us_env then
    print(string.format("  %s %s T=%d: with %s=%s %.1f us (default %.1f us, again after %.1f us)", r.shape, r.mode,
                        r.T, opts.env_k, opts.env_v, r.us_env, r.us, r.us_again))
  end
end
local function bar(ok) return ok and "met" or "MISSED" end
for _, s in ipairs(SHAPES) do
  for _, q in ipairs{ "fp8", "fp8_block" } do
    local worst
    for _, T in ipairs(TS) do
      local r, f8 = find(s.name, q, T), find(s.name, "fp8", T)
      if r and f8 and T <= 64 then
        local x = r.us / f8.floor
        if not worst or x > worst then worst = x end
      end
    end
    if worst then
      print(string.format("bar %-14s %-9s T <= 64 within 2x of the fp8 floor: worst %.2fx -> %s", s.name, q, worst,
                          bar(worst <= 2)))
    end
  end
  for _, q in ipairs{ "nvfp4", "mxfp4", "mxint4" } do
    local worst, wT, sep, sT
    for _, T in ipairs(TS) do
      local r, fb = find(s.name, q, T), find(s.name, "fp8_block", T)
      if r and fb then
        local x, y = r.us_alt / r.us_ref_alt, r.us / fb.us
        if not worst or x > worst then worst, wT = x, T end
        if not sep or y > sep then sep, sT = y, T end
      end
    end
    if worst then
      print(string.format("bar %-14s %-9s <= the fp8_block time (%d rounds alternated with it): worst %.2fx (T=%d) " ..
                          "-> %s (timed separately: worst %.2fx, T=%d)", s.name, q, ALT, worst, wT, bar(worst <= 1),
                          sep, sT))
    end
  end
  local fb, b = find(s.name, "fp8_block", 4096), find(s.name, "bf16", 4096)
  if fb and b and s.name == "deepseek-v3" then
    local x = fb.us_ref_alt / fb.us_alt
    print(string.format("bar %-14s fp8_block T = 4096 >= 1.3x faster than bf16 (%d rounds alternated with it): " ..
                        "%.2fx -> %s (against bf16 timed just before: %.2fx; against the first bf16 row: %.2fx)", s.name,
                        ALT, x, bar(x >= 1.3), fb.us_b / fb.us, b.us / fb.us))
  end
end
if opts.json then
  local f = io.open(opts.json, "w")
  if f then
    local parts = {}
    for _, r in ipairs(rows) do
      local kv = {}
      for _, k in ipairs{ "shape", "mode", "T", "us", "floor", "pct_floor", "tflops", "gbs", "hit", "bound", "us_env",
                          "us_again", "us_b", "us_alt", "us_ref_alt" } do
        local v = r[k]
        if v ~= nil then
          kv[#kv + 1] = string.format('"%s": %s', k,
                                      type(v) == "string" and string.format("%q", v) or string.format("%.5g", v))
        end
      end
      parts[#parts + 1] = "  {" .. table.concat(kv, ", ") .. "}"
    end
    f:write(string.format('{"gpu": %q, "rows": [\n%s\n]}\n', gpu, table.concat(parts, ",\n")))
    f:close()
  end
end
return 0
