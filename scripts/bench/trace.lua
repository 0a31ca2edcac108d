-- compare two DeepSeek-V3-scale routing traces on the CPU (wall time and peak memory)
--
--   moe bench trace [--tokens N] [--layers L] [--top-k K] [--experts E] [--threads N]
--
-- Builds two traces of N tokens x L layers x K ids (default 1 000 000 x 61 x 8, E = 256) in
-- place in the engine's host arrays (no intermediate copies): A with distinct ids per row
-- drawn around a skewed per-layer popularity, B = A with ~10% of the (token, layer) rows
-- given one different expert and another ~10% reordered (same set: must count as agreement).
-- Then times moe.trace.compare and prints the peak resident memory (VmHWM).
-- Bar (issue 6): <= 5 s and <= 2.5 GB on a 2-core machine.
local ffi = require("ffi")
local bit = require("bit")
local moe = require("moe")
local C = moe.C

local args = { ... }
local opt = { tokens = 1000000, layers = 61, ["top-k"] = 8, experts = 256, threads = 0 }
local i = 1
while i <= #args do
  local k = args[i]:match("^%-%-(.+)$")
  if k == "help" then
    print("Usage: moe bench trace [--tokens N] [--layers L] [--top-k K] [--experts E] [--threads N]")
    return 0
  end
  if not k or opt[k] == nil or not tonumber(args[i + 1]) then
    io.stderr:write("moe bench trace: bad argument " .. tostring(args[i]) .. "\n")
    return 2
  end
  opt[k] = tonumber(args[i + 1])
  i = i + 2
end
local T, L, K, E = opt.tokens, opt.layers, opt["top-k"], opt.experts
assert(E >= 2 * K and bit.band(E, E - 1) == 0, "--experts must be a power of two >= 2*K")

pcall(ffi.cdef, "int clock_gettime(int clk, void *ts);")
local function now()
  local t = ffi.new("struct { long s; long ns; }")
  ffi.C.clock_gettime(1, ffi.cast("void *", t))
  return tonumber(t.s) + tonumber(t.ns) * 1e-9
end

local function vm(key)
  local f = io.open("/proc/self/status")
  if not f then return nil end
  for line in f:lines() do
    local v = line:match("^" .. key .. ":%s+(%d+) kB")
    if v then f:close() return tonumber(v) * 1024 end
  end
  f:close()
end

local function new_trace(name)
  local tr = moe.trace.new{ layers = L, top_k = K, num_experts = E, meta = { model = "synthetic", quant = name } }
  moe._check(C.moe_trace_resize(tr._h, T), "moe_trace_resize")
  return tr
end

print(string.format("moe bench trace: %d tokens x %d layers x top-%d of %d experts (%.0f MB of ids per trace)",
                    T, L, K, E, T * L * K * 2 / 1e6))
local t0 = now()
local a, b = new_trace("a"), new_trace("b")
local pa, pb = C.moe_trace_ids_mut(a._h), C.moe_trace_ids_mut(b._h)
assert(pa ~= nil and pb ~= nil, "trace arrays")

-- xorshift32 (plain Lua numbers through the bit library: fast in LuaJIT)
local s = 2463534242
local band, bxor, lshift, rshift = bit.band, bit.bxor, bit.lshift, bit.rshift
local mask = E - 1
local rows = T * L
for p = 0, rows - 1 do
  s = bxor(s, lshift(s, 13)); s = bxor(s, rshift(s, 17)); s = bxor(s, lshift(s, 5))
  local u = band(s, 0xffff) / 65536
  local l = p % L
  -- skewed start (popular low ids, shifted per layer) and an odd step: K distinct ids
  local r0 = band(math.floor(E * u * u) + l * 7, mask)
  local step = band(rshift(s, 16), mask)
  step = step - step % 2 + 1
  local base = p * K
  for k = 0, K - 1 do
    local v = band(r0 + k * step, mask)
    pa[base + k] = v
    pb[base + k] = v
  end
  local r = band(rshift(s, 24), 0xff)
  if r < 26 then          -- ~10%: one expert replaced by one not in the row
    pb[base + band(r, K - 1)] = band(r0 + K * step, mask)
  elseif r < 52 then      -- ~10%: same set, other order
    pb[base], pb[base + K - 1] = pb[base + K - 1], pb[base]
  end
end
local t_gen = now() - t0
print(string.format("  generated both traces in %.2f s; VmRSS %.2f GB", t_gen, (vm("VmRSS") or 0) / 1e9))

local results = {}
local nthreads = opt.threads > 0 and { opt.threads } or { 0, 1 }
local c
for _, th in ipairs(nthreads) do
  local t1 = now()
  c = moe.trace.compare(a, b, { threads = th })
  local dt = now() - t1
  results[#results + 1] = { th, dt }
  print(string.format("  compare (%s): %.3f s  (%.1f M positions/s)",
                      th == 0 and "threads = cores" or ("threads = " .. th), dt, rows / dt / 1e6))
end
local hwm = vm("VmHWM")
print(string.format("  router disagreement %.4f  token disagreement %.4f  jaccard %.4f  exact %.4f",
                    c.router_disagreement, c.token_disagreement, c.jaccard, c.exact_agreement))
print(string.format("  peak memory (VmHWM) %.2f GB", (hwm or 0) / 1e9))
local nproc = io.popen("nproc"):read("*l")
print(string.format("  cores %s; bar: compare <= 5 s and peak <= 2.5 GB on 2 cores -> %s", nproc,
                    (results[1][2] <= 5 and (hwm or 0) <= 2.5e9) and "PASS" or "FAIL"))
return 0
