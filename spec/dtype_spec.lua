-- Number formats and conversions.  Every expected value is computed here in plain Lua from the
-- format definitions (sign, exponent bits, mantissa bits, bias), never taken from moe:
--   f16  1.5.10 bias 15   bf16 1.8.7 bias 127   e4m3 1.4.3 bias 7 (OCP FN: no inf, S.1111.111 NaN)
--   e5m2 1.5.2 bias 15 (IEEE-like)   e2m1 1.2.1 bias 1   ue8m0 2^(c-127), 255 = NaN
-- and the engine's rules (fp.h): round to nearest even; saturation; NaN handling.
local ffi = require("ffi")
local bit = require("bit")
local moe = require("moe")
-- spec/helper.lua, found next to this file whatever the working directory
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")

local C = moe.C
local f32 = H.f32

-- ------------------------------------------------------------------ decoders --

local function isnan(x) return x ~= x end

-- Decode a code of a binary floating format with E exponent and M mantissa bits.
-- special(e, m) returns "inf", "nan" or nil for the all-ones exponent conventions.
local function minifloat(code, E, M, bias, special)
  local sign = bit.band(bit.rshift(code, E + M), 1)
  local e = bit.band(bit.rshift(code, M), 2 ^ E - 1)
  local m = bit.band(code, 2 ^ M - 1)
  local sp = special and special(e, m)
  local v
  if sp == "nan" then return 0 / 0 end
  if sp == "inf" then v = math.huge
  elseif e == 0 then v = m / 2 ^ M * 2 ^ (1 - bias)
  else v = (1 + m / 2 ^ M) * 2 ^ (e - bias) end
  if sign == 1 then return -v end
  return v
end

local function ieee(emax)
  return function(e, m)
    if e == emax then return m == 0 and "inf" or "nan" end
  end
end

local FMT = {
  f16 = { id = C.MOE_F16, E = 5, M = 10, bias = 15, special = ieee(31), bits = 16 },
  bf16 = { id = C.MOE_BF16, E = 8, M = 7, bias = 127, special = ieee(255), bits = 16 },
  f8_e4m3 = { id = C.MOE_F8E4M3, E = 4, M = 3, bias = 7, bits = 8,
              special = function(e, m) if e == 15 and m == 7 then return "nan" end end },
  f8_e5m2 = { id = C.MOE_F8E5M2, E = 5, M = 2, bias = 15, special = ieee(31), bits = 8 },
  e2m1 = { id = C.MOE_E2M1, E = 2, M = 1, bias = 1, bits = 4 },
}

local function decode_ref(name, code)
  local f = FMT[name]
  return minifloat(code, f.E, f.M, f.bias, f.special)
end

local function ue8m0_ref(code)
  if code == 255 then return 0 / 0 end
  return 2 ^ (code - 127)
end

-- --------------------------------------------------------------- moe access --

local code_box = ffi.new("uint32_t[1]")
local val_box = ffi.new("double[1]")

local function encode(id, v)
  local st = C.moe_encode(id, v, code_box)
  assert(st == 0, "moe_encode failed: " .. ffi.string(C.moe_last_error()))
  return tonumber(code_box[0])
end

local function decode(id, code)
  local st = C.moe_decode(id, code, val_box)
  assert(st == 0, "moe_decode failed: " .. ffi.string(C.moe_last_error()))
  return val_box[0]
end

-- Same value, same sign of zero, NaN equal to NaN.
local function same_value(a, b)
  if isnan(a) or isnan(b) then return isnan(a) and isnan(b) end
  if a ~= b then return false end
  if a == 0 then return (1 / a > 0) == (1 / b > 0) end
  return true
end

-- Raw bytes of a tensor's storage (CPU).
local function bytes_of(t)
  local n = t:nbytes()
  local p = t:data_ptr("uint8_t*")
  local r = {}
  for i = 0, n - 1 do r[i + 1] = p[i] end
  return r
end

-- Tensor of the given dtype holding raw codes (packed nibbles for 4-bit formats).
local function tensor_of_codes(dtype, codes, bits)
  local t = moe.empty({#codes}, {dtype = dtype})
  if bits == 4 then
    local p = t:data_ptr("uint8_t*")
    for j = 0, #codes / 2 - 1 do p[j] = codes[2 * j + 1] + 16 * codes[2 * j + 2] end
  elseif bits == 8 then
    local p = t:data_ptr("uint8_t*")
    for i = 1, #codes do p[i - 1] = codes[i] end
  else
    local p = t:data_ptr("uint16_t*")
    for i = 1, #codes do p[i - 1] = codes[i] end
  end
  return t
end

-- Next float32 above/below a positive or negative f32 value x (x not a power of two).
local function f32_ulp(x)
  local _, e = math.frexp(math.abs(x))
  return math.max(2 ^ (e - 24), 2 ^ -149)
end

-- ---------------------------------------------------------------- the specs --

describe("dtype table", function()
  it("names, bits and float flags", function()
    local expect = {
      { "f32", 32, 1 }, { "f16", 16, 1 }, { "bf16", 16, 1 }, { "f8_e4m3", 8, 1 },
      { "f8_e5m2", 8, 1 }, { "e2m1", 4, 1 }, { "i4", 4, 0 }, { "ue8m0", 8, 1 }, { "u8", 8, 0 },
      { "i8", 8, 0 }, { "i16", 16, 0 }, { "i32", 32, 0 }, { "i64", 64, 0 }, { "bool", 8, 0 },
    }
    for id, e in ipairs(expect) do
      assert.equal(e[1], ffi.string(C.moe_dtype_name(id - 1)))
      assert.equal(e[2], C.moe_dtype_bits(id - 1))
      assert.equal(e[3], C.moe_dtype_is_float(id - 1))
      assert.equal(id - 1, C.moe_dtype_from_name(e[1]))
    end
    assert.equal(C.MOE_BF16, C.moe_dtype_from_name("bfloat16"))
    assert.equal(C.MOE_F32, C.moe_dtype_from_name("float32"))
    assert.equal(-1, C.moe_dtype_from_name("f64"))
  end)
end)

for _, name in ipairs{ "f8_e4m3", "f8_e5m2", "e2m1" } do
  local f = FMT[name]
  local ncodes = 2 ^ f.bits
  describe(name .. " codes", function()
    it("all " .. ncodes .. " decode to the format's values and re-encode to themselves", function()
      for code = 0, ncodes - 1 do
        local want = decode_ref(name, code)
        local got = decode(f.id, code)
        assert.truthy(same_value(got, want), string.format("%s code 0x%02X: decoded %.17g, expected %.17g",
                                                           name, code, got, want))
        if not isnan(want) then
          assert.equal(code, encode(f.id, want), string.format("%s: re-encode of %.17g", name, want))
        end
      end
    end)

    it("through tensors: f32 -> " .. name .. " gives the codes, " .. name .. " -> f32 the values", function()
      local codes, values = {}, {}
      for code = 0, ncodes - 1 do
        codes[#codes + 1] = code
        values[#values + 1] = decode_ref(name, code)
      end
      local t = moe.tensor(values, {dtype = "f32"}):to(name)
      local raw = bytes_of(t)
      for code = 0, ncodes - 1 do
        local c
        if f.bits == 4 then
          local byte = raw[math.floor(code / 2) + 1]
          c = code % 2 == 0 and byte % 16 or math.floor(byte / 16)
        else
          c = raw[code + 1]
        end
        if isnan(values[code + 1]) then
          assert.equal(0x7F, bit.band(c, 0x7F), string.format("NaN code 0x%02X encodes as a NaN", code))
        else
          assert.equal(code, c, string.format("%s: tensor encode of %.17g", name, values[code + 1]))
        end
      end
      local back = tensor_of_codes(name, codes, f.bits):to("f32"):totable()
      for i = 1, ncodes do
        assert.truthy(same_value(back[i], values[i]),
                      string.format("%s code 0x%02X: tensor decode %.17g, expected %.17g", name, i - 1,
                                    back[i], values[i]))
      end
    end)
  end)
end

describe("e2m1", function()
  it("has the values 0 .5 1 1.5 2 3 4 6 with sign", function()
    local want = { 0, 0.5, 1, 1.5, 2, 3, 4, 6 }
    for code = 0, 7 do
      assert.equal(want[code + 1], decode(C.MOE_E2M1, code))
      assert.equal(-want[code + 1], decode(C.MOE_E2M1, code + 8))
    end
  end)
end)

describe("ue8m0", function()
  it("codes are 2^(c-127); 255 is NaN", function()
    for code = 0, 255 do
      local want = ue8m0_ref(code)
      local got = decode(C.MOE_UE8M0, code)
      assert.truthy(same_value(got, want), string.format("code %d: %.17g vs %.17g", code, got, want))
      if code < 255 then assert.equal(code, encode(C.MOE_UE8M0, want)) end
    end
  end)

  it("rounds to the nearest power of two, ties to the even code; <= 0 -> 0, inf -> 254, NaN -> 255", function()
    -- 1.5 lies halfway between 2^0 (code 127) and 2^1 (code 128): even code 128
    assert.equal(128, encode(C.MOE_UE8M0, 1.5))
    assert.equal(127, encode(C.MOE_UE8M0, 1.5 - 2 ^ -23))
    assert.equal(128, encode(C.MOE_UE8M0, 1.5 + 2 ^ -22))
    -- 3 between 2 (128) and 4 (129): even 128;  6 between 4 (129) and 8 (130): even 130
    assert.equal(128, encode(C.MOE_UE8M0, 3))
    assert.equal(130, encode(C.MOE_UE8M0, 6))
    assert.equal(129, encode(C.MOE_UE8M0, 5))
    assert.equal(0, encode(C.MOE_UE8M0, 0))
    assert.equal(0, encode(C.MOE_UE8M0, -1))
    assert.equal(0, encode(C.MOE_UE8M0, -math.huge))
    assert.equal(254, encode(C.MOE_UE8M0, math.huge))
    assert.equal(255, encode(C.MOE_UE8M0, 0 / 0))
    local t = moe.tensor({0.25, 3, 6, 0 / 0, -2}):to("ue8m0")
    assert.same({125, 128, 130, 255, 0}, bytes_of(t))
  end)
end)

-- Every pair of adjacent finite codes (c, c+1) of both signs: the midpoint goes to the even
-- code, one f32 ulp above to c+1, one below to c.
local function tie_cases(name, maxcode)
  local f = FMT[name]
  local signbit = 2 ^ (f.bits - 1)
  for _, s in ipairs{ 0, signbit } do
    for c = 0, maxcode - 1 do
      local a, b = decode_ref(name, s + c), decode_ref(name, s + c + 1)
      local mid = (a + b) / 2
      assert(f32(mid) == mid, "midpoint must be an f32 value")
      local even = (c % 2 == 0) and c or c + 1
      local got = encode(f.id, mid)
      if got ~= s + even then
        error(string.format("%s: midpoint %.17g of codes 0x%X/0x%X encoded as 0x%X, expected 0x%X",
                            name, mid, s + c, s + c + 1, got, s + even))
      end
      if mid ~= 0 then
        local u = f32_ulp(mid)
        local up, down = math.abs(mid) + u, math.abs(mid) - u
        if s ~= 0 then up, down = -up, -down end
        local gu, gd = encode(f.id, up), encode(f.id, down)
        if gu ~= s + c + 1 or gd ~= s + c then
          error(string.format("%s: around midpoint %.17g of 0x%X/0x%X: above -> 0x%X, below -> 0x%X",
                              name, mid, s + c, s + c + 1, gu, gd))
        end
      end
    end
  end
  return true
end

describe("round to nearest even", function()
  it("f8_e4m3: every midpoint", function() assert.is_true(tie_cases("f8_e4m3", 0x7E)) end)
  it("f8_e5m2: every midpoint", function() assert.is_true(tie_cases("f8_e5m2", 0x7B)) end)
  it("e2m1: every midpoint", function() assert.is_true(tie_cases("e2m1", 7)) end)
  it("f16: every midpoint, subnormals included", function() assert.is_true(tie_cases("f16", 0x7BFF)) end)
  it("bf16: every midpoint, subnormals included", function() assert.is_true(tie_cases("bf16", 0x7F7F)) end)

  it("f32 -> bf16 and f16 through tensors", function()
    -- 1 + 2^-8 is halfway between bf16 1 (0x3F80) and 1 + 2^-7 (0x3F81): even -> 1
    -- 1 + 3*2^-8 is halfway between 0x3F81 and 0x3F82: even -> 1 + 2^-6
    local b = moe.tensor({1 + 2 ^ -8, 1 + 3 * 2 ^ -8, 1 + 2 ^ -8 + 2 ^ -23, 1 + 2 ^ -8 - 2 ^ -23}):to("bf16")
    assert.same({1, 1 + 2 ^ -6, 1 + 2 ^ -7, 1}, b:to("f32"):totable())
    -- f16 spacing at 1 is 2^-10
    local h = moe.tensor({1 + 2 ^ -11, 1 + 3 * 2 ^ -11, 2 ^ -25, 3 * 2 ^ -25}):to("f16")
    assert.same({1, 1 + 2 ^ -9, 0, 2 ^ -23}, h:to("f32"):totable())
  end)

  it("doubles are rounded to f32 (ties to even) when written", function()
    assert.equal(1, moe.tensor(1 + 2 ^ -24):item())
    assert.equal(1 + 2 ^ -22, moe.tensor(1 + 3 * 2 ^ -24):item())
    assert.equal(f32(0.1), moe.tensor(0.1):item())
  end)
end)

describe("saturation and specials", function()
  local inf, nan = math.huge, 0 / 0

  it("e4m3: finite overflow and inf -> +-448; NaN -> S.1111.111", function()
    for _, v in ipairs{ 448, 449, 464, 480, 1e6, 3e38, inf } do
      assert.equal(0x7E, encode(C.MOE_F8E4M3, v), tostring(v))
      assert.equal(0xFE, encode(C.MOE_F8E4M3, -v), tostring(-v))
    end
    assert.equal(448, decode_ref("f8_e4m3", 0x7E))
    assert.equal(0x7F, bit.band(encode(C.MOE_F8E4M3, nan), 0x7F))
    assert.same({448, -448, 448, -448}, moe.tensor({1e4, -1e4, inf, -inf}):to("f8_e4m3"):to("f32"):totable())
  end)

  it("e5m2: finite overflow -> +-57344, inf kept, NaN -> 0x7F|sign", function()
    for _, v in ipairs{ 57344, 61439, 61440, 65536, 1e9 } do
      assert.equal(0x7B, encode(C.MOE_F8E5M2, v), tostring(v))
      assert.equal(0xFB, encode(C.MOE_F8E5M2, -v), tostring(-v))
    end
    assert.equal(57344, decode_ref("f8_e5m2", 0x7B))
    assert.equal(0x7C, encode(C.MOE_F8E5M2, inf))
    assert.equal(0xFC, encode(C.MOE_F8E5M2, -inf))
    assert.equal(0x7F, bit.band(encode(C.MOE_F8E5M2, nan), 0x7F))
    local r = moe.tensor({1e9, -inf, nan}):to("f8_e5m2"):to("f32"):totable()
    assert.equal(57344, r[1])
    assert.equal(-inf, r[2])
    assert.truthy(isnan(r[3]))
  end)

  it("e2m1: saturates to +-6, NaN -> +0", function()
    for _, v in ipairs{ 6, 7, 100, inf } do
      assert.equal(7, encode(C.MOE_E2M1, v), tostring(v))
      assert.equal(15, encode(C.MOE_E2M1, -v), tostring(-v))
    end
    assert.equal(0, encode(C.MOE_E2M1, nan))
    assert.equal(0, encode(C.MOE_E2M1, -nan))
    assert.same({6, -6, 0, 0.5}, moe.tensor({9, -inf, nan, 0.3}):to("e2m1"):to("f32"):totable())
  end)

  it("f16: overflow -> inf (65520 is the tie to inf), NaN stays a quiet NaN", function()
    assert.equal(0x7BFF, encode(C.MOE_F16, 65504))
    assert.equal(0x7BFF, encode(C.MOE_F16, 65519))
    assert.equal(0x7C00, encode(C.MOE_F16, 65520))
    assert.equal(0x7C00, encode(C.MOE_F16, 1e6))
    assert.equal(0xFC00, encode(C.MOE_F16, -1e6))
    assert.equal(0x7C00, encode(C.MOE_F16, inf))
    local q = encode(C.MOE_F16, nan)
    assert.equal(0x7C00, bit.band(q, 0x7C00))
    assert.equal(0x0200, bit.band(q, 0x0200))
    local r = moe.tensor({1e5, nan}):to("f16"):to("f32"):totable()
    assert.equal(inf, r[1])
    assert.truthy(isnan(r[2]))
  end)

  it("bf16: overflow -> inf, NaN stays a quiet NaN", function()
    -- largest f32 rounds past the largest bf16 (0x7F7F) to inf
    assert.equal(0x7F80, encode(C.MOE_BF16, 3.4028234663852886e38))
    assert.equal(0x7F7F, encode(C.MOE_BF16, decode_ref("bf16", 0x7F7F)))
    assert.equal(0xFF80, encode(C.MOE_BF16, -inf))
    local q = encode(C.MOE_BF16, nan)
    assert.equal(0x7F80, bit.band(q, 0x7F80))
    assert.equal(0x0040, bit.band(q, 0x0040))
  end)

  it("negative zero keeps its sign", function()
    for _, name in ipairs{ "f16", "bf16", "f8_e4m3", "f8_e5m2", "e2m1" } do
      local f = FMT[name]
      assert.equal(2 ^ (f.bits - 1), encode(f.id, -0.0), name)
    end
  end)

  it("moe_encode refuses integer dtypes", function()
    assert.equal(C.MOE_ERR_DTYPE, C.moe_encode(C.MOE_I32, 1, code_box))
  end)
end)

describe("integer casts", function()
  local nan = 0 / 0
  local src = { 1.7, -1.7, 2.5, -2.5, 1e10, -1e10, nan, 127.9, -128.9, 300, 0 }

  local expect = {
    i8 = { 1, -1, 2, -2, 127, -128, 0, 127, -128, 127, 0 },
    u8 = { 1, 0, 2, 0, 255, 0, 0, 127, 0, 255, 0 },
    i16 = { 1, -1, 2, -2, 32767, -32768, 0, 127, -128, 300, 0 },
    i32 = { 1, -1, 2, -2, 2147483647, -2147483648, 0, 127, -128, 300, 0 },
    i64 = { 1, -1, 2, -2, 1e10, -1e10, 0, 127, -128, 300, 0 },
  }

  for dtype, want in pairs(expect) do
    it("f32 -> " .. dtype .. ": truncation toward zero, saturation, NaN -> 0", function()
      -- f32 values of the sources (1e10 is exact in f32; 127.9 etc. round but keep their integer part)
      assert.same(want, moe.tensor(src):to(dtype):totable())
    end)
  end

  it("i4 holds -8..7, saturating", function()
    assert.same({1, -1, 7, -8, 0, 7}, moe.tensor({1.9, -1.9, 20, -20, nan, 7}):to("i4"):totable())
  end)

  it("bool is x ~= 0", function()
    assert.same({true, true, false, false, true}, moe.tensor({1.7, -0.1, 0, -0.0, 1e-30}):to("bool"):totable())
  end)

  it("integers to floats round to nearest even", function()
    local i = moe.tensor({16777217, 16777219, -16777217}, {dtype = "i32"})
    assert.same({16777216, 16777220, -16777216}, i:to("f32"):totable())
    assert.same({256, 260}, moe.tensor({257, 259}, {dtype = "i64"}):to("bf16"):to("f32"):totable())
  end)
end)

-- ---------------------------------------------------------------------- RNG --

-- Philox4x32-10 (Salmon et al. 2011) in plain Lua, for the uniform stream's exact values.
local M0, M1 = 0xD2511F53, 0xCD9E8D57
local W0, W1 = 0x9E3779B9, 0xBB67AE85
local function u32(x) return x % 4294967296 end
local function mulhilo(a, b)
  local p = ffi.cast("uint64_t", a) * b
  return tonumber(bit.rshift(p, 32)), tonumber(bit.band(p, 0xFFFFFFFFULL))
end
local function philox(c0, c1, c2, c3, k0, k1)
  for _ = 1, 10 do
    local hi0, lo0 = mulhilo(M0, c0)
    local hi1, lo1 = mulhilo(M1, c2)
    c0, c1, c2, c3 = u32(bit.bxor(bit.bxor(hi1, c1), k0)), lo1, u32(bit.bxor(bit.bxor(hi0, c3), k1)), lo0
    k0, k1 = u32(k0 + W0), u32(k1 + W1)
  end
  return { c0, c1, c2, c3 }
end

describe("RNG", function()
  it("the reference Philox matches the Random123 known-answer vector", function()
    assert.same({ 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8 }, philox(0, 0, 0, 0, 0, 0))
  end)

  it("uniform values are Philox bits: lo + (hi - lo) * (x >> 8) 2^-24, rounded to f32", function()
    local seed, lo, hi = 0x1234567, -1.5, 2.25
    local n = 4099
    local got = moe.rand({n}, {seed = seed, lo = lo, hi = hi}):totable()
    for i = 0, n - 1 do
      local x = philox(u32(math.floor(i / 4)), 0, 0, 0, seed, 0)[i % 4 + 1]
      local want = f32(lo + (hi - lo) * (math.floor(x / 256) * 2 ^ -24))
      if got[i + 1] ~= want then
        error(string.format("element %d: %.9g, expected %.9g", i, got[i + 1], want))
      end
    end
    -- a seed above 2^32 uses the high key word
    local big = 2 ^ 40 + 3
    local g2 = moe.rand({4}, {seed = big}):totable()
    local x = philox(0, 0, 0, 0, 3, 2 ^ 8)
    for l = 1, 4 do assert.equal(f32(math.floor(x[l] / 256) * 2 ^ -24), g2[l]) end
  end)

  it("normal values follow Box-Muller on the Philox pairs", function()
    local seed, n = 99, 64
    local got = moe.randn({n}, {seed = seed, mean = 1, std = 2}):totable()
    for i = 0, n - 1 do
      local x = philox(math.floor(i / 4), 0, 0, 0, seed, 0)
      local pair = math.floor((i % 4) / 2)
      local u1 = (x[2 * pair + 1] + 0.5) * 2 ^ -32
      local u2 = x[2 * pair + 2] * 2 ^ -32
      local r = math.sqrt(-2 * math.log(u1))
      local z = (i % 2 == 1) and r * math.sin(2 * math.pi * u2) or r * math.cos(2 * math.pi * u2)
      local want = 1 + 2 * z
      assert.truthy(H.close(got[i + 1], want, 1e-6, 1e-6),
                    string.format("element %d: %.9g, expected %.9g", i, got[i + 1], want))
    end
  end)

  it("same seed -> same values on any shape and dtype; different seeds differ", function()
    local a = moe.randn({8, 8}, {seed = 3, dtype = "bf16"}):totable()
    assert.same(a, moe.randn({8, 8}, {seed = 3, dtype = "bf16"}):totable())
    assert.are_not.same(a, moe.randn({8, 8}, {seed = 4, dtype = "bf16"}):totable())
    -- the bf16 tensor holds the f32 values rounded to bf16
    local f = moe.randn({64}, {seed = 3}):to("bf16"):totable()
    assert.same(H.flatten(a), f)
  end)

  it("normal: mean and std of 1e5 samples", function()
    local n = 100000
    local v = moe.randn({n}, {seed = 2024, mean = 0.5, std = 3}):totable()
    local s, s2 = 0, 0
    for i = 1, n do s = s + v[i]; s2 = s2 + v[i] * v[i] end
    local mean = s / n
    local std = math.sqrt(s2 / n - mean * mean)
    -- standard error of the mean is 3/sqrt(1e5) ~ 0.0095; of the std ~ 0.0067
    assert.truthy(math.abs(mean - 0.5) < 0.05, "mean " .. mean)
    assert.truthy(math.abs(std - 3) < 0.04, "std " .. std)
  end)

  it("uniform: inside [lo, hi), mean in the middle", function()
    local n = 100000
    local v = moe.rand({n}, {seed = 7, lo = 2, hi = 5}):totable()
    local s, mn, mx = 0, math.huge, -math.huge
    for i = 1, n do
      local x = v[i]
      s = s + x
      if x < mn then mn = x end
      if x > mx then mx = x end
    end
    assert.truthy(mn >= 2 and mx < 5, "range " .. mn .. " .. " .. mx)
    assert.truthy(mn < 2.001 and mx > 4.999, "range not covered: " .. mn .. " .. " .. mx)
    assert.truthy(math.abs(s / n - 3.5) < 0.02, "mean " .. s / n)
  end)

  it("integer dtypes get the value truncated", function()
    local f = moe.rand({256}, {seed = 5, lo = -10, hi = 10}):totable()
    local i = moe.rand({256}, {seed = 5, lo = -10, hi = 10, dtype = "i32"}):totable()
    for k = 1, 256 do
      local want = f[k] >= 0 and math.floor(f[k]) or math.ceil(f[k])
      assert.equal(want, i[k])
    end
  end)
end)
