-- The CUDA backend through the Lua API, compared with the CPU backend bit for bit: round
-- trips, strided copies, every dtype pair cast, RNG, fill/arange, graph capture and replay,
-- memory accounting.  Run alone without a CUDA device, this file exits 77 (skipped).
local ffi = require("ffi")
local moe = require("moe")
local H = require("spec.helper")

local error_of = H.error_of

local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end

-- Raw bytes of a tensor on any device, as a Lua string (through a contiguous CPU copy).
local function bytes(t)
  local c = t:to("cpu"):contiguous()
  return ffi.string(c:data_ptr(), c:nbytes())
end

-- Assert equal bytes; on failure name the first differing element.
local function same_bytes(a, b, what)
  local x, y = bytes(a), bytes(b)
  if x == y then return end
  assert.equal(#x, #y, what .. ": byte sizes differ")
  local bits = ({ f32 = 32, f16 = 16, bf16 = 16, i16 = 16, i32 = 32, i64 = 64, e2m1 = 4, i4 = 4 })[a:dtype()] or 8
  for i = 1, #x do
    if x:byte(i) ~= y:byte(i) then
      error(string.format("%s: first difference at byte %d (element %d of %s): cpu 0x%02x, cuda 0x%02x",
                          what, i - 1, math.floor((i - 1) * 8 / bits), a:dtype(), x:byte(i), y:byte(i)), 2)
    end
  end
end

local DTYPES = { "f32", "f16", "bf16", "f8_e4m3", "f8_e5m2", "e2m1", "i4", "ue8m0", "u8", "i8",
                 "i16", "i32", "i64", "bool" }

local SPECIALS = { 0, -0.0, 1 / 0, -1 / 0, 0 / 0, 0.5, 0.25, 0.75, 2.5, 5, -5, 6, 7, 448, 464,
                   480, 57344, 61440, 65504, 65520, 3e38, -3.4e38, 1e-40, -1e-40, 5.96e-8, 127.5, -128.9,
                   255.9, 256, -8.5, 7.9, 32767.5, -32769, 2147483648, 9.3e18, -9.3e18, 0.1,
                   1e10, -1e300 }

-- A CPU tensor of dtype with ordinary and special values (fresh each call).
local seed = 1
local function adversarial(shape, dtype)
  seed = seed + 1
  local t = moe.randn(shape, { dtype = "f32", seed = seed, std = 300 })
  local n = t:numel()
  local flat = t:reshape({ n })
  for i = 1, n, 3 do flat:set(SPECIALS[(i * 7) % #SPECIALS + 1], i) end
  return t:to(dtype)
end

describe("CUDA tensors (#gpu)", function()
  setup(function()
    assert.is_true(moe.cuda_available(), "this spec needs a CUDA device")
  end)

  it("reports the device", function()
    local info = moe.cuda_device_info(0)
    assert.truthy(has(info, "sm_"))
    assert.truthy(moe.cuda_device_count() >= 1)
  end)

  it("round-trips every dtype host -> device -> device -> host", function()
    for _, dt in ipairs(DTYPES) do
      for _, n in ipairs({ 0, 2, 34, 4098 }) do
        local h = adversarial({ n }, dt)
        local g = h:to("cuda")
        assert.equal("cuda:0", g:device())
        local g2 = g:clone()
        same_bytes(h, g2:to("cpu"), "round trip " .. dt .. " [" .. n .. "]")
      end
    end
  end)

  it("copies transposed and narrowed views on the device", function()
    for _, dt in ipairs({ "f32", "i64", "u8", "e2m1", "i4", "f8_e4m3" }) do
      local h = adversarial({ 34, 66 }, dt)
      local g = h:to("cuda")
      same_bytes(h:t():contiguous(), g:t():contiguous(), "transpose " .. dt)
      same_bytes(h:narrow(1, 2, 30):narrow(2, 2, 62):contiguous(),
                 g:narrow(1, 2, 30):narrow(2, 2, 62):contiguous(), "narrow " .. dt)
      -- into a transposed destination and into a narrowed one (odd offset)
      local hd, gd = moe.zeros({ 66, 34 }, { dtype = dt }), moe.zeros({ 66, 34 }, { dtype = dt, device = "cuda" })
      hd:t():copy_(h)
      gd:t():copy_(g)
      same_bytes(hd, gd, "copy into transposed " .. dt)
      local hn, gn = moe.ones({ 34, 66 }, { dtype = dt }), moe.ones({ 34, 66 }, { dtype = dt, device = "cuda" })
      hn:narrow(2, 2, 64):copy_(h:narrow(2, 3, 64))
      gn:narrow(2, 2, 64):copy_(g:narrow(2, 3, 64))
      same_bytes(hn, gn, "copy into narrowed " .. dt)
    end
  end)

  it("casts every dtype pair exactly as the CPU does", function()
    local bad = {}
    for _, s in ipairs(DTYPES) do
      local h = adversarial({ 2050 }, s)
      local g = h:to("cuda")
      for _, d in ipairs(DTYPES) do
        local ok, err = pcall(same_bytes, h:to(d), g:to(d), "cast " .. s .. " -> " .. d)
        if not ok then bad[#bad + 1] = tostring(err) end
      end
    end
    assert.same({}, bad)
  end)

  it("draws the same random numbers as the CPU", function()
    for _, dt in ipairs({ "f32", "bf16", "f16", "f8_e4m3", "i32" }) do
      for _, n in ipairs({ 1, 3, 4097 }) do
        for _, sd in ipairs({ 0, 42 }) do
          same_bytes(moe.randn({ n }, { dtype = dt, seed = sd }),
                     moe.randn({ n }, { dtype = dt, seed = sd, device = "cuda" }),
                     string.format("randn %s [%d] seed %d", dt, n, sd))
          same_bytes(moe.rand({ n }, { dtype = dt, seed = sd, lo = -2, hi = 3 }),
                     moe.rand({ n }, { dtype = dt, seed = sd, lo = -2, hi = 3, device = "cuda" }),
                     string.format("rand %s [%d] seed %d", dt, n, sd))
        end
      end
    end
    local x = moe.randn({ 4096 }, { device = "cuda", seed = 5 }):totable()
    local s1, s2 = 0, 0
    for i = 1, #x do s1, s2 = s1 + x[i], s2 + x[i] * x[i] end
    assert.truthy(math.abs(s1 / #x) < 0.1 and math.abs(s2 / #x - 1) < 0.1)
  end)

  it("fills and counts like the CPU", function()
    for _, dt in ipairs(DTYPES) do
      for _, v in ipairs({ 1.5, -3.7, 0 / 0, 1e10, -0.0, 300.7 }) do
        same_bytes(moe.full({ 6, 10 }, v, { dtype = dt }),
                   moe.full({ 6, 10 }, v, { dtype = dt, device = "cuda" }),
                   "fill " .. dt .. " " .. tostring(v))
      end
      same_bytes(moe.arange(-20.25, 40.4, 0.37, { dtype = dt }),
                 moe.arange(-20.25, 40.4, 0.37, { dtype = dt, device = "cuda" }), "arange " .. dt)
    end
  end)

  it("captures a copy in a graph and replays it with new input", function()
    local src = moe.randn({ 1024 }, { device = "cuda", seed = 1 })
    local dst = moe.zeros({ 1024 }, { device = "cuda", dtype = "bf16" })
    local g = moe.graph.capture(function() dst:copy_(src) end)
    moe.synchronize("cuda")
    assert.equal(0, dst:to("cpu"):get(1)) -- recorded, not run
    local new = moe.randn({ 1024 }, { seed = 99 })
    src:copy_(new)
    g:replay()
    moe.synchronize("cuda")
    same_bytes(new:to("bf16"), dst, "replayed cast")
    local us = g:time(2, 5)
    assert.equal(5, #us)
    for i = 1, 5 do assert.truthy(us[i] > 0) end
    g:free()
  end)

  it("refuses to allocate inside a capture and recovers", function()
    local err = error_of(moe.graph.capture, function() return moe.zeros({ 4 }, { device = "cuda" }) end)
    assert.truthy(has(err, "allocate outputs before capture"))
    assert.is_false(moe.graph.is_capturing())
    local t = moe.full({ 8 }, 3, { device = "cuda" })
    assert.same({ 3, 3, 3, 3, 3, 3, 3, 3 }, t:totable())
  end)

  it("accounts device memory", function()
    moe.collect_garbage()
    moe.collect_garbage()
    local before = moe.mem_stats().device_bytes
    local t = moe.empty({ 256, 1024 }, { device = "cuda" })
    assert.equal(before + 1024 * 1024, moe.mem_stats().device_bytes)
    t:free()
    assert.equal(before, moe.mem_stats().device_bytes)
  end)
end)
