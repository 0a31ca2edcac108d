-- moe bench fused [--shape NAME[,NAME]] [--t LIST] [--reps N] [--no-torch] [--json PATH] [--compare-mma]
--
-- --compare-mma also times the large-tile mma.sync path (MOE_FUSED_WGMMA=0) where the wgmma one runs;
-- --compare-pdl times T <= 256 with programmatic dependent launch (MOE_FUSED_PDL=1; off by default);
-- --compare-env NAME=VALUE times every case again with that environment variable set (e.g.
-- MOE_FUSED_FOLD=0: decode without the align/finalize folds; MOE_FUSED_WGMMA=1: the cp.async wgmma
-- kernel instead of the warp-specialised one).
--
-- Fused MoE (bf16) on CUDA: per model shape and T, the median time of one moe.fused_moe call
-- (routing included) from CUDA-graph replays, uniform random routing (renormalize over random
-- normal logits), next to the roofline floor of the H100 datasheet:
--   bytes = distinct experts hit x 3*H*I x 2 + x and out (T*H*2 each) + logits (T*E*4), at 3.35 TB/s
--   FLOPs = 2*T*K*3*H*I, at 989 TFLOP/s;      floor = the larger of the two times,
-- the achieved TFLOP/s and GB/s, and in the same run the PyTorch baseline
-- (scripts/bench/torch_fused.py: torch.topk, gather, torch._grouped_mm x 2, silu*mul, weighted
-- scatter-add) when python3 can import torch.  Bars of issue 4: T <= 64 within 2x of the floor,
-- T = 4096 at least as fast as PyTorch, for every shape.
local moe = require("moe")
local common = require("bench.common")

local HBM, PEAK = 3.35e12, 989e12

local SHAPES = {
  { name = "deepseek-v3", H = 7168, I = 2048, E = 256, K = 8 },
  { name = "qwen3-30b-a3b", H = 2048, I = 768, E = 128, K = 8 },
  { name = "mixtral-8x7b", H = 4096, I = 14336, E = 8, K = 2 },
}
local TS = { 1, 16, 64, 256, 1024, 4096 }

local opts, code = common.parse("fused", { ... }, { torch = true, reps = 30 }, {
  { "--shape", key = "shape", kind = "names", value = SHAPES },
  { "--t", key = "t", kind = "numbers", aliases = { "--T" } },
  { "--reps", key = "reps", kind = "number" },
  { "--no-torch", key = "torch", kind = "flag", value = false },
  { "--json", key = "json", kind = "string" },
  { "--compare-mma", key = "compare", kind = "flag", value = true },
  { "--compare-pdl", key = "compare_pdl", kind = "flag", value = true },
  { "--compare-env", kind = "env" },
}, "usage: moe bench fused [--shape NAME[,NAME]] [--t 1,16,...] [--reps N] [--no-torch] [--json PATH] " ..
   "[--compare-mma] [--compare-pdl] [--compare-env NAME=VALUE]\nshapes: deepseek-v3, qwen3-30b-a3b, mixtral-8x7b")
if not opts then return code end
SHAPES = opts.shape or SHAPES
TS = opts.t or TS

if not common.have_cuda(moe, "fused") then return 77 end

-- ------------------------------------------------------- PyTorch (first: frees on exit) --
local torch, torch_note = {}, nil
if opts.torch then
  local names, Tl = {}, {}
  for _, s in ipairs(SHAPES) do names[#names + 1] = s.name end
  for _, T in ipairs(TS) do Tl[#Tl + 1] = tostring(T) end
  local here = (debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$")) or "scripts/bench"
  local cmd = string.format("python3 %s/torch_fused.py --shapes %s --T %s --reps %d 2>&1", here,
                            table.concat(names, ","), table.concat(Tl, ","), opts.reps)
  local p = io.popen(cmd)
  local n = 0
  if p then
    for line in p:lines() do
      local name, T, us = line:match('"shape": "([^"]+)", "T": (%d+), "us": ([%d%.eE+-]+)')
      if name then
        torch[name .. "/" .. T] = { us = tonumber(us), graph = line:match('"graph": true') ~= nil }
        n = n + 1
      elseif line:match('"error"') then
        torch_note = (torch_note and torch_note .. "; " or "") .. line
      end
    end
    p:close()
  end
  if n == 0 then torch_note = torch_note or "PyTorch baseline unavailable" end
end

-- ------------------------------------------------------------------- ours --
local rows = {}
for _, s in ipairs(SHAPES) do
  local Hd, I, E, K = s.H, s.I, s.E, s.K
  -- weights: a block of B random experts copied to all E (values do not change the timing;
  -- generating 22 GB of normals would)
  local B = math.min(E, 8)
  local ex
  do
    local w13 = moe.empty({ E, 2 * I, Hd }, { dtype = "bf16", device = "cuda" })
    local w2 = moe.empty({ E, Hd, I }, { dtype = "bf16", device = "cuda" })
    local b13 = moe.randn({ B, 2 * I, Hd }, { dtype = "bf16", device = "cuda", seed = 1, std = 0.02 })
    local b2 = moe.randn({ B, Hd, I }, { dtype = "bf16", device = "cuda", seed = 2, std = 0.02 })
    for e0 = 1, E, B do
      w13:narrow(1, e0, B):copy_(b13)
      w2:narrow(1, e0, B):copy_(b2)
    end
    b13:free(); b2:free()
    ex = moe.experts{ gate_up = w13, down = w2, device = "cuda" }
    w13:free(); w2:free()
  end
  for _, T in ipairs(TS) do
    local nsets = 4
    local xs, ls = {}, {}
    for k = 1, nsets do
      xs[k] = moe.randn({ T, Hd }, { dtype = "bf16", device = "cuda", seed = 100 * T + k })
      ls[k] = moe.randn({ T, E }, { device = "cuda", seed = 100 * T + k + 50 })
    end
    local out = moe.empty({ T, Hd }, { dtype = "bf16", device = "cuda" })
    ex:reserve(T, K)
    -- distinct experts hit, averaged over the input sets
    local hit = 0
    for k = 1, nsets do
      local _, r = moe.fused_moe{ hidden = xs[k], logits = ls[k], experts = ex, method = "renormalize",
                                  top_k = K, out = out, return_routing = true }
      local seen, n = {}, 0
      for _, row in ipairs(r.ids:to("cpu"):totable()) do
        for _, id in ipairs(row) do if not seen[id] then seen[id] = true; n = n + 1 end end
      end
      hit = hit + n / nsets
    end
    local calls = T <= 256 and 8 or 2
    local function time_it()
      return common.graph_us(moe, calls, opts.reps, function(c)
        local k = c % nsets + 1
        moe.fused_moe{ hidden = xs[k], logits = ls[k], experts = ex, method = "renormalize", top_k = K, out = out }
      end)
    end
    local us = time_it()
    local us_mma
    if opts.compare and T * K >= 48 * E then us_mma = common.with_env("MOE_FUSED_WGMMA", "0", time_it) end
    local us_pdl
    if opts.compare_pdl and T <= 256 then us_pdl = common.with_env("MOE_FUSED_PDL", "1", time_it) end
    local us_env, us_again
    if opts.env_k then
      us_env = common.with_env(opts.env_k, opts.env_v, time_it)
      us_again = time_it() -- the default again, after: the spread between the two is the noise
    end
    local bytes = hit * 3 * Hd * I * 2 + T * Hd * 4 + T * E * 4
    local flops = 2 * T * K * 3 * Hd * I
    local floor = math.max(bytes / HBM, flops / PEAK) * 1e6
    local tr = torch[s.name .. "/" .. T]
    rows[#rows + 1] = {
      shape = s.name, T = T, us = us, floor = floor, pct_floor = 100 * floor / us,
      tflops = flops / us / 1e6, gbs = bytes / us / 1e3, hit = hit,
      bound = bytes / HBM > flops / PEAK and "mem" or "flop",
      us_mma = us_mma, us_pdl = us_pdl, us_env = us_env, us_again = us_again,
      torch = tr and tr.us, torch_graph = tr and tr.graph, vs_torch = tr and tr.us / us,
    }
    xs, ls, out = nil, nil, nil
    collectgarbage("collect")
  end
  ex:free()
  collectgarbage("collect")
end

-- ----------------------------------------------------------------- output --
local gpu = moe.cuda_device_info(0)
print(string.format("moe bench fused -- %s, %s UTC, bf16, median of %d CUDA-graph replays, uniform routing",
                    gpu, os.date("!%Y-%m-%d %H:%M"), opts.reps))
if torch_note then print("  (" .. torch_note .. ")") end
print(string.format("%-14s %5s %6s %10s %10s %7s %5s %8s %8s %10s %8s", "shape", "T", "hit", "us", "floor",
                    "%floor", "bound", "TFLOP/s", "GB/s", "torch us", "vs torch"))
for _, r in ipairs(rows) do
  print(string.format("%-14s %5d %6.1f %10.1f %10.1f %6.1f%% %5s %8.1f %8.0f %10s %8s", r.shape, r.T, r.hit, r.us,
                      r.floor, r.pct_floor, r.bound, r.tflops, r.gbs,
                      r.torch and string.format("%.1f%s", r.torch, r.torch_graph and "" or "*") or "-",
                      r.vs_torch and string.format("%.2fx", r.vs_torch) or "-"))
end
for _, r in ipairs(rows) do
  if r.us_mma then
    print(string.format("  %s T=%d: large-tile mma.sync path %.1f us (default path %.1f us)", r.shape, r.T, r.us_mma, r.us))
  end
  if r.us_pdl then
    print(string.format("  %s T=%d: with PDL %.1f us (without PDL %.1f us)", r.shape, r.T, r.us_pdl, r.us))
  end
  if r.us_env then
    print(string.format("  %s T=%d: with %s=%s %.1f us (default %.1f us, again after %.1f us)", r.shape, r.T,
                        opts.env_k, opts.env_v, r.us_env, r.us, r.us_again))
  end
end
local eager = false
for _, r in ipairs(rows) do if r.torch and not r.torch_graph then eager = true end end
if eager then print("  (* PyTorch timed eagerly: its pipeline could not be captured)") end
local function bar(ok) return ok and "met" or "MISSED" end
for _, s in ipairs(SHAPES) do
  local worst, big
  for _, r in ipairs(rows) do
    if r.shape == s.name and r.T <= 64 then
      local q = r.us / r.floor
      if not worst or q > worst then worst = q end
    end
    if r.shape == s.name and r.T == 4096 then big = r end
  end
  if worst then
    print(string.format("bar %-14s T <= 64 within 2x of the bf16 floor: worst %.2fx -> %s", s.name, worst,
                        bar(worst <= 2)))
  end
  if big and big.vs_torch then
    print(string.format("bar %-14s T = 4096 at least as fast as PyTorch: %.2fx -> %s", s.name, big.vs_torch,
                        bar(big.vs_torch >= 1)))
  end
end
if opts.json then
  local f = io.open(opts.json, "w")
  if f then
    local parts = {}
    for _, r in ipairs(rows) do
      local kv = {}
      for _, k in ipairs{ "shape", "T", "us", "floor", "pct_floor", "tflops", "gbs", "hit", "bound", "us_mma", "us_pdl",
                          "us_env", "us_again", "torch", "vs_torch" } do
        local v = r[k]
        if v ~= nil then
          kv[#kv + 1] = string.format('"%s": %s', k, type(v) == "string" and string.format("%q", v) or string.format("%.5g", v))
        end
      end
      parts[#parts + 1] = "  {" .. table.concat(kv, ", ") .. "}"
    end
    f:write(string.format('{"gpu": %q, "rows": [\n%s\n]}\n', gpu, table.concat(parts, ",\n")))
    f:close()
  end
end
return 0
