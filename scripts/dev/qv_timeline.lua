-- qv_timeline.lua -- developer driver (not part of the tests): the decode GEMV path's timeline.
-- Needs a library built with -DMOE_QV_TL (CMAKE_CUDA_FLAGS): thread 0 of every k_qv_up / k_qv_down
-- block stamps %globaltimer at fixed points (kernels/fused_qgemv.cu, QV_TL).  Prints, per stamp,
-- the spread over blocks in µs from the first k_qv_up block's start, for a plain call and for the
-- last call of a CUDA graph of 8 (as `moe bench fused_quant` times them).
-- Usage: luajit scripts/moe run scripts/dev/qv_timeline.lua MODE [T] [qwen3|mixtral|deepseek]
local moe = require("moe")
local ffi = require("ffi")
ffi.cdef [[
int moe_dev_qv_tl(unsigned long long *dst);
int moe_dev_qv_tl_reset(void);
]]
local lib = ffi.load(assert(os.getenv("MOE_LIB"), "qv_timeline.lua: set MOE_LIB"))
local mode, T, shape = arg[1] or "fp8_block", tonumber(arg[2] or "1"), arg[3] or "qwen3"
local cs = dofile(arg[0]:gsub("[^/]*$", "") .. "dev_case.lua").make(moe, "qv_timeline.lua", mode, T, shape)
local ex, x, L, K, Hd = cs.ex, cs.x, cs.L, cs.K, cs.Hd
local out = moe.empty({ T, Hd }, { dtype = "bf16", device = "cuda" })
local function call() return moe.fused_moe{ hidden = x, logits = L, experts = ex, method = "renormalize", top_k = K, out = out } end

local buf = ffi.new("unsigned long long[?]", 2 * 1024 * 8)
local function pct(t, f)
  if #t == 0 then return 0 / 0 end
  return t[math.max(1, math.min(#t, math.floor(f * (#t - 1) + 1.5)))]
end
local UP = { "start", "routed", "w issued", "x quant", "loop end", "all warps", "exit" }
local DN = { "start", "ids read", "w issued", "pdl wait", "i quant", "loop end", "exit" }
local function analyse(title)
  moe.synchronize("cuda")
  assert(lib.moe_dev_qv_tl(buf) == 0)
  local function at(k, b, s) return tonumber(buf[(k * 1024 + b) * 8 + s]) end
  local t0 = math.huge
  for b = 0, 1023 do
    local v = at(0, b, 0)
    if v > 0 and v < t0 then t0 = v end
  end
  print(string.format("== %s: %s T=%d %s (µs from the first k_qv_up block's start; min p10 p50 p90 max, n)", title,
                      mode, T, shape))
  for k = 0, 1 do
    local names = k == 0 and UP or DN
    for _, grp in ipairs(k == 0 and { "working", "exiting" } or { "all" }) do
      for s = 0, 6 do
        local v = {}
        for b = 0, 1023 do
          if at(k, b, 0) > 0 then
            local working = at(k, b, 5) > 0
            if grp == "all" or (grp == "working") == working then
              local st = at(k, b, s)
              if st > 0 then v[#v + 1] = (st - t0) / 1000 end
            end
          end
        end
        table.sort(v)
        if #v > 0 then
          print(string.format("%-8s %-8s %-10s %7.2f %7.2f %7.2f %7.2f %7.2f  %4d", k == 0 and "k_qv_up" or "k_qv_dn",
                              grp, names[s + 1], v[1], pct(v, 0.1), pct(v, 0.5), pct(v, 0.9), v[#v], #v))
        end
      end
    end
  end
  -- working k_qv_up blocks per SM
  local per = {}
  for b = 0, 1023 do
    if at(0, b, 0) > 0 and at(0, b, 5) > 0 then
      local sm = at(0, b, 7)
      per[sm] = (per[sm] or 0) + 1
    end
  end
  local hist = {}
  for _, c in pairs(per) do hist[c] = (hist[c] or 0) + 1 end
  local hs = {}
  for c, n in pairs(hist) do hs[#hs + 1] = string.format("%d blocks: %d SMs", c, n) end
  table.sort(hs)
  print("working k_qv_up blocks per SM: " .. table.concat(hs, ", "))
end

for _ = 1, 20 do call() end
for r = 1, 2 do
  lib.moe_dev_qv_tl_reset()
  moe.synchronize("cuda")
  call()
  analyse("plain call " .. r)
end
local g = moe.graph.capture(function() for _ = 1, 8 do call() end end)
for _ = 1, 5 do g:replay() end
for r = 1, 2 do
  moe.synchronize("cuda")
  lib.moe_dev_qv_tl_reset()
  moe.synchronize("cuda")
  g:replay()
  analyse("graph of 8, last call, replay " .. r)
end
local ts = g:time(3, 20)
table.sort(ts)
print(string.format("graph: median %.2f µs a call", ts[10] / 8))
g:free()
