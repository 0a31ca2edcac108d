-- moe bench route [--json] [--no-torch] [--cases a,b] [--T 1,16,...] [--reps N]
--
-- Routing kernels on CUDA: per case and T, the median time per call from CUDA-graph replays
-- (CALLS calls per graph, rotating over several input sets so that large inputs come from HBM,
-- not L2), with the replay buffer off and on, interleaved five times (the medians are
-- compared; the largest max - min of the five runs of either setting is the run-to-run
-- spread), the byte floor (logits read once + ids/weights written, at 3.35 TB/s),
-- and the same method written with torch.topk (scripts/bench/torch_route.py), timed the same
-- way in the same run when python3 can import torch.
local moe = require("moe")
local common = require("bench.common")
local median = common.median

local CALLS = 20
local ROUNDS = 5 -- off/on timings per row, interleaved
local HBM = 3.35e12 -- bytes/s, H100 SXM datasheet

local CASES = {
  { name = "deepseekv3", method = "deepseekv3", E = 256, K = 8, n_group = 8, topk_group = 4, scale = 2.5, bias = true },
  { name = "renormalize", method = "renormalize", E = 128, K = 8 },
  { name = "minimax2", method = "minimax2", E = 256, K = 8, bias = true },
  { name = "llama4", method = "llama4", E = 128, K = 1 },
  { name = "kimi-k2", method = "deepseekv3", E = 384, K = 8, scale = 2.827, bias = true },
}
local TS = { 1, 16, 128, 1024, 4096, 16384 }

-- ------------------------------------------------------------------ options --
local opts, code = common.parse("route", { ... }, { json = false, torch = true, reps = 200 }, {
  { "--json", key = "json", kind = "flag", value = true },
  { "--no-torch", key = "torch", kind = "flag", value = false },
  { "--cases", key = "cases", kind = "names", value = CASES },
  { "--T", key = "T", kind = "numbers" },
  { "--reps", key = "reps", kind = "number" },
}, "usage: moe bench route [--json] [--no-torch] [--cases a,b] [--T 1,16,...] [--reps N]")
if not opts then return code end
CASES = opts.cases or CASES
TS = opts.T or TS

if not common.have_cuda(moe, "route") then return 77 end

-- ------------------------------------------------------------------- timing --

-- Median microseconds per routing call for one case, T and replay setting.
local function time_case(c, T, sets, bias, replay)
  local ids = moe.empty({ T, c.K }, { dtype = "i32", device = "cuda" })
  local w = moe.empty({ T, c.K }, { device = "cuda" })
  local buf = replay and moe.full({ T, c.K }, -1, { dtype = "i16", device = "cuda" }) or nil
  local argsets = {}
  for s = 1, #sets do
    argsets[s] = { logits = sets[s], bias = bias, method = c.method, top_k = c.K, n_group = c.n_group,
                   topk_group = c.topk_group, scale = c.scale, ids = ids, weights = w, replay = buf }
  end
  moe.route(argsets[1]) -- warm (module load, first launch) outside the capture
  moe.synchronize("cuda")
  local g = moe.graph.capture(function()
    for k = 0, CALLS - 1 do moe.route(argsets[k % #sets + 1]) end
  end)
  local times = g:time(10, opts.reps)
  g:free()
  for k = 1, #times do times[k] = times[k] / CALLS end
  return median(times)
end

-- ------------------------------------------------------------------ PyTorch --
local torch = {}
local torch_note
if opts.torch then
  local names = {}
  for _, c in ipairs(CASES) do names[#names + 1] = c.name end
  local here = (debug.getinfo(1, "S").source:sub(2):match("^(.*)/[^/]*$")) or "scripts/bench"
  local Tl = {}
  for _, T in ipairs(TS) do Tl[#Tl + 1] = tostring(T) end
  local cmd = string.format("python3 %s/torch_route.py --cases %s --T %s --calls %d 2>&1", here,
                            table.concat(names, ","), table.concat(Tl, ","), CALLS)
  local p = io.popen(cmd)
  local n = 0
  if p then
    for line in p:lines() do
      local name, T, us = line:match('"case": "([^"]+)", "T": (%d+), "us": ([%d%.eE+-]+)')
      if name then
        torch[name .. "/" .. T] = tonumber(us)
        n = n + 1
      elseif line:match('"error"') then
        torch_note = line
      end
    end
    p:close()
  end
  if n == 0 then torch_note = torch_note or "PyTorch baseline unavailable" end
end

-- -------------------------------------------------------------------- run --
local rows = {}
for _, c in ipairs(CASES) do
  for _, T in ipairs(TS) do
    local bytes_in = T * c.E * 4
    local nsets = math.max(4, math.min(20, math.ceil(100e6 / bytes_in)))
    local sets = {}
    for s = 1, nsets do sets[s] = moe.randn({ T, c.E }, { device = "cuda", seed = 1000 * T + s }) end
    local bias = c.bias and moe.randn({ c.E }, { device = "cuda", seed = 7, std = 0.05 }) or nil
    -- replay off and on, interleaved ROUNDS times: the medians compare, and the largest
    -- max - min among the off runs and among the on runs is the run-to-run spread
    local offs, ons = {}, {}
    for r = 1, ROUNDS do
      offs[r] = time_case(c, T, sets, bias, false)
      ons[r] = time_case(c, T, sets, bias, true)
    end
    local function range(v) return math.max(unpack(v)) - math.min(unpack(v)) end
    local out_bytes = T * c.K * (4 + 4)
    local floor = (bytes_in + out_bytes) / HBM * 1e6
    local off, on = median(offs), median(ons)
    local tr = torch[c.name .. "/" .. T]
    rows[#rows + 1] = {
      case = c.name, method = c.method, E = c.E, K = c.K, T = T,
      us = off, us_min = math.min(unpack(offs)), us_max = math.max(unpack(offs)),
      spread = math.max(range(offs), range(ons)),
      us_replay = on, replay_overhead = on - off,
      floor = floor, ratio_floor = off / floor,
      torch = tr, speedup_torch = tr and tr / off or nil,
    }
    for s = 1, #sets do sets[s]:free() end
    collectgarbage("collect")
  end
end

-- ----------------------------------------------------------------- output --
local gpu = moe.cuda_device_info(0)
if opts.json then
  local parts = {}
  for _, r in ipairs(rows) do
    local f = {}
    for _, k in ipairs{ "case", "method", "E", "K", "T", "us", "us_min", "us_max", "spread", "us_replay",
                        "replay_overhead", "floor", "ratio_floor", "torch", "speedup_torch" } do
      local v = r[k]
      if v ~= nil then
        f[#f + 1] = string.format('"%s": %s', k, type(v) == "string" and string.format("%q", v) or string.format("%.4g", v))
      end
    end
    parts[#parts + 1] = "  {" .. table.concat(f, ", ") .. "}"
  end
  print(string.format('{"gpu": %q, "date": %q, "calls_per_graph": %d, "rows": [\n%s\n]}', gpu,
                      os.date("!%Y-%m-%d"), CALLS, table.concat(parts, ",\n")))
  return 0
end

print(string.format("moe bench route -- %s, %s UTC, median of %d graph replays x %d calls, f32 logits",
                    gpu, os.date("!%Y-%m-%d %H:%M"), opts.reps, CALLS))
if torch_note then print("  (" .. torch_note .. ")") end
print(string.format("%-12s %6s %5s %3s %9s %9s %9s %9s %7s %7s %9s %7s %9s %8s", "case", "T", "E", "K", "us", "min",
                    "max", "+replay", "ovh", "spread", "floor", "/floor", "torch", "speedup"))
for _, r in ipairs(rows) do
  print(string.format("%-12s %6d %5d %3d %9.2f %9.2f %9.2f %9.2f %+7.2f %7.2f %9.2f %7.1f %9s %8s", r.case, r.T, r.E,
                      r.K, r.us, r.us_min, r.us_max, r.us_replay, r.replay_overhead, r.spread, r.floor, r.ratio_floor,
                      r.torch and string.format("%.2f", r.torch) or "-",
                      r.speedup_torch and string.format("%.1fx", r.speedup_torch) or "-"))
end
-- bars of the routing issue
local function bar(ok) return ok and "met" or "MISSED" end
local ds_small, ds_big, worst_torch, worst_case = 0, nil, math.huge, nil
local rep_ok = true
for _, r in ipairs(rows) do
  if r.case == "deepseekv3" and r.T <= 1024 then ds_small = math.max(ds_small, r.us) end
  if r.case == "deepseekv3" and r.T == 16384 then ds_big = r.us end
  if r.speedup_torch and r.speedup_torch < worst_torch then
    worst_torch = r.speedup_torch
    worst_case = r.case .. " T=" .. r.T
  end
  if math.abs(r.replay_overhead) > r.spread then rep_ok = false end
end
print(string.format("bar deepseekv3 <= 6 us for T <= 1024: worst %.2f us -> %s", ds_small, bar(ds_small <= 6)))
if ds_big then print(string.format("bar deepseekv3 <= 15 us at T = 16384: %.2f us -> %s", ds_big, bar(ds_big <= 15))) end
if worst_case then
  print(string.format("bar >= 3x faster than PyTorch: worst %.1fx (%s) -> %s", worst_torch, worst_case,
                      bar(worst_torch >= 3)))
end
print(string.format("bar replay overhead (median on - median off) within the run-to-run spread: %s", bar(rep_ok)))
return 0
