-- moe bench copy [--mib N] [--reps N]
--
-- Element-wise CUDA kernels of the engine core (copy, cast, transpose, fill, RNG): median time
-- per call from CUDA-graph replays (one op per graph; inputs far larger than L2), bytes moved
-- (each input read once, each output written once), achieved bandwidth and its share of the
-- 3.35 TB/s HBM datasheet rate (an SM copy reaches about 3.0 TB/s on our H100s).
local moe = require("moe")
local common = require("bench.common")
local median = common.median

local HBM = 3.35e12
local opts, code = common.parse("copy", { ... }, { mib = 256, reps = 20 }, {
  { "--mib", key = "mib", kind = "number" },
  { "--reps", key = "reps", kind = "number" },
}, "usage: moe bench copy [--mib N] [--reps N]   (N MiB of f32 input per case)")
if not opts then return code end

if not common.have_cuda(moe, "copy") then return 77 end

local n = math.floor(opts.mib * 1024 * 1024 / 4)
local side = math.floor(math.sqrt(n) / 64) * 64
local dev = "cuda"

local BYTES = { f32 = 4, bf16 = 2, f16 = 2, f8_e4m3 = 1, e2m1 = 0.5, u8 = 1, i32 = 4 }

local cases = {}
local function case(name, bytes, prep)
  cases[#cases + 1] = { name = name, bytes = bytes, prep = prep }
end

local function src_of(dtype, shape)
  return moe.randn(shape, { dtype = dtype, device = dev, seed = 1 })
end

case("copy f32 contiguous", 2 * 4 * n, function()
  local a, b = src_of("f32", { n }), moe.empty({ n }, { device = dev })
  return function() b:copy_(a) end, { a, b }
end)
for _, p in ipairs({ { "f32", "bf16" }, { "bf16", "f32" }, { "f32", "f8_e4m3" }, { "f32", "e2m1" },
                     { "bf16", "f16" } }) do
  local s, d = p[1], p[2]
  case("cast " .. s .. " -> " .. d, (BYTES[s] + BYTES[d]) * n, function()
    local a, b = src_of(s, { n }), moe.empty({ n }, { dtype = d, device = dev })
    return function() b:copy_(a) end, { a, b }
  end)
end
case(string.format("transpose bf16 %dx%d", side, side), 2 * 2 * side * side, function()
  local a = src_of("bf16", { side, side })
  local b = moe.empty({ side, side }, { dtype = "bf16", device = dev })
  local at = a:t()
  return function() b:copy_(at) end, { a, b, at }
end)
case("fill bf16", 2 * n, function()
  local b = moe.empty({ n }, { dtype = "bf16", device = dev })
  return function() b:fill_(0.5) end, { b }
end)
case("randn f32", 4 * n, function()
  local b = moe.empty({ n }, { device = dev })
  return function() moe.C.moe_tensor_rand_normal(b.h, 7, 0, 1) end, { b }
end)
case("rand f32 (uniform)", 4 * n, function()
  local b = moe.empty({ n }, { device = dev })
  return function() moe.C.moe_tensor_rand_uniform(b.h, 7, 0, 1) end, { b }
end)

print(string.format("moe bench copy: %s; %d elements per case (%d MiB of f32); median of %d graph replays",
                    moe.cuda_device_info(0), n, opts.mib, opts.reps))
print(string.format("%-28s %10s %10s %10s %8s", "case", "MB moved", "us", "GB/s", "% HBM"))
for _, c in ipairs(cases) do
  local fn, keep = c.prep()
  local g = moe.graph.capture(fn)
  local us = median(g:time(3, opts.reps))
  g:free()
  local gbs = c.bytes / (us * 1e-6) / 1e9
  print(string.format("%-28s %10.1f %10.1f %10.1f %7.1f%%", c.name, c.bytes / 1e6, us, gbs,
                      100 * c.bytes / (us * 1e-6) / HBM))
  for _, t in ipairs(keep) do t:free() end
end
