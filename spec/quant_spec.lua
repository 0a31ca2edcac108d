-- Quantisation modes on the CPU reference: formats, scale choice, hand-worked one-block examples
-- with their bytes, all-zero blocks, an independent Lua model of every mode, and every error.
-- Expected values are worked out by hand (in the comments) or by the Lua model below, which
-- shares no code with the engine (its only engine use is f32 rounding through the FFI, which
-- is C's own float conversion).
local ffi = require("ffi")
local moe = require("moe")
local H = require("spec.helper")

local C = moe.C
local f32 = H.f32

-- ---------------------------------------------------------------- helpers --

-- A tensor of `shape` holding the flat row-major values (rounded to dtype by the cast rules).
local function mk(shape, vals, dtype)
  local t = moe.empty(shape, { dtype = dtype or "f32" })
  local n = #vals
  local buf = ffi.new("double[?]", math.max(n, 1))
  for i = 1, n do buf[i - 1] = vals[i] end
  assert(C.moe_tensor_write_f64(t.h, buf, n) == 0, ffi.string(C.moe_last_error()))
  return t
end

-- Raw bytes of a contiguous tensor (1-based Lua table).
local function bytes(t)
  local n = t:nbytes()
  local buf = ffi.new("uint8_t[?]", math.max(n, 1))
  assert(C.moe_tensor_copy_to_host(t.h, buf, n) == 0, ffi.string(C.moe_last_error()))
  local out = {}
  for i = 1, n do out[i] = buf[i - 1] end
  return out
end

-- Codes of a packed 4-bit tensor, element order (element 2j low nibble of byte j).
local function nibbles(t)
  local b, out = bytes(t), {}
  for j = 1, #b do
    out[2 * j - 1] = b[j] % 16
    out[2 * j] = math.floor(b[j] / 16)
  end
  return out
end

local function flat(t) return H.flatten(t:totable()) end

local function zeros(n) local z = {} for i = 1, n do z[i] = 0 end return z end

local function err_of(fn, ...) return H.error_of(fn, ...) end

-- ------------------------------------------------- independent Lua model --
-- Positive value tables, code = index - 1.

local E4M3 = {}            -- codes 0..126 (127 is NaN)
for c = 0, 126 do
  local e, m = math.floor(c / 8), c % 8
  E4M3[c + 1] = e == 0 and m * 2 ^ -9 or (1 + m / 8) * 2 ^ (e - 7)
end
local E2M1 = { 0, 0.5, 1, 1.5, 2, 3, 4, 6 }

-- nearest code of |x| in a value table, ties to the even code; saturates at the last entry.
local function nearest(tab, a)
  if a >= tab[#tab] then return #tab - 1 end
  for c = 1, #tab - 1 do
    local lo, hi = tab[c], tab[c + 1]
    if a <= hi then
      local mid = (lo + hi) / 2
      if a < mid then return c - 1 end
      if a > mid then return c end
      return ((c - 1) % 2 == 0) and (c - 1) or c
    end
  end
end

local function sign_of(x) return (x < 0 or (x == 0 and 1 / x < 0)) end

local function ref_e4m3(x)
  if x ~= x then return 0x7F end
  local c = nearest(E4M3, math.abs(x))
  return sign_of(x) and c + 0x80 or c
end

local function ref_e2m1(x)
  if x ~= x then return 0 end
  local c = nearest(E2M1, math.abs(x))
  return sign_of(x) and c + 8 or c
end

local function e4m3_val(c)
  local v = E4M3[c % 128 + 1]
  return c >= 128 and -v or v
end
local function e2m1_val(c)
  local v = E2M1[c % 8 + 1]
  return c >= 8 and -v or v
end

-- round a double to bf16 (8 significant bits), nearest even; returns the value
local function ref_bf16(x)
  if x == 0 then return x end
  local m, e = math.frexp(math.abs(x))    -- m in [0.5, 1)
  local s = m * 256
  local r = math.floor(s)
  local frac = s - r
  if frac > 0.5 or (frac == 0.5 and r % 2 == 1) then r = r + 1 end
  local v = r / 256 * 2 ^ e
  return x < 0 and -v or v
end

local function rne(x)
  local r = math.floor(x)
  local frac = x - r
  if frac > 0.5 or (frac == 0.5 and r % 2 == 1) then r = r + 1 end
  return r
end

local function amax_of(v, i0, n, stride, rows)
  local m = 0
  for r = 0, (rows or 1) - 1 do
    for j = 0, n - 1 do
      local a = math.abs(v[i0 + r * (stride or 0) + j])
      if a > m then m = a end
    end
  end
  return m
end

-- Model of each mode over flat f32 values v of a [M, N, K] stack; returns codes (element
-- order), scales (values; mxfp4: ue8m0 codes; mxint4: bf16 values) and globals.
local MODEL = {}
function MODEL.fp8(v, M, N, K)
  local codes, scales = {}, {}
  for m = 0, M - 1 do
    local s = f32(amax_of(v, m * N * K + 1, N * K) / 448)
    scales[m + 1] = s
    for i = m * N * K + 1, (m + 1) * N * K do codes[i] = s == 0 and 0 or ref_e4m3(f32(v[i] / s)) end
  end
  return codes, scales
end
function MODEL.fp8_block(v, M, N, K, br)
  local codes, scales = {}, {}
  for m = 0, M - 1 do
    for rb = 0, N / br - 1 do
      for cb = 0, K / 128 - 1 do
        local i0 = m * N * K + rb * br * K + cb * 128 + 1
        local s = f32(amax_of(v, i0, 128, K, br) / 448)
        scales[#scales + 1] = s
        for r = 0, br - 1 do
          for j = 0, 127 do
            local i = i0 + r * K + j
            codes[i] = s == 0 and 0 or ref_e4m3(f32(v[i] / s))
          end
        end
      end
    end
  end
  return codes, scales
end
function MODEL.nvfp4(v, M, N, K)
  local codes, scales, globals = {}, {}, {}
  for m = 0, M - 1 do
    local g = f32(amax_of(v, m * N * K + 1, N * K) / 2688)
    globals[m + 1] = g
    for r = 0, N - 1 do
      for b = 0, K / 16 - 1 do
        local i0 = m * N * K + r * K + b * 16 + 1
        local sc = g == 0 and 0 or ref_e4m3(f32(amax_of(v, i0, 16) / f32(6 * g)))
        scales[#scales + 1] = sc
        local d = f32(e4m3_val(sc) * g)
        for j = 0, 15 do codes[i0 + j] = d == 0 and 0 or ref_e2m1(f32(v[i0 + j] / d)) end
      end
    end
  end
  return codes, scales, globals
end
function MODEL.mxfp4(v, M, N, K)
  local codes, scales = {}, {}
  for r = 0, M * N - 1 do
    for b = 0, K / 32 - 1 do
      local i0 = r * K + b * 32 + 1
      local a = amax_of(v, i0, 32)
      local code = 0
      if a > 0 then
        local k = math.floor(math.log(a) / math.log(2)) - 4
        while a / 2 ^ k > 6 do k = k + 1 end   -- smallest k with a / 2^k <= 6
        code = math.max(k + 127, 0)
      end
      scales[#scales + 1] = code
      for j = 0, 31 do codes[i0 + j] = ref_e2m1(v[i0 + j] / 2 ^ (code - 127)) end
    end
  end
  return codes, scales
end
function MODEL.mxint4(v, M, N, K)
  local codes, scales = {}, {}
  for r = 0, M * N - 1 do
    for b = 0, K / 32 - 1 do
      local i0 = r * K + b * 32 + 1
      local s = ref_bf16(f32(amax_of(v, i0, 32) / 7))
      scales[#scales + 1] = s
      for j = 0, 31 do
        local q = 0
        if s ~= 0 then q = math.max(-8, math.min(7, rne(f32(v[i0 + j] / s)))) end
        codes[i0 + j] = q % 16
      end
    end
  end
  return codes, scales
end

-- ==================================================================== specs --

describe("quantisation formats", function()
  it("lists the modes in id order and parses their names", function()
    assert.are.same({ "bf16", "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" }, moe.quant_modes())
    for i, m in ipairs(moe.quant_modes()) do
      assert.are.equal(i - 1, C.moe_quant_mode_from_name(m))
      assert.are.equal(m, ffi.string(C.moe_quant_mode_name(i - 1)))
    end
    assert.are.equal(-1, C.moe_quant_mode_from_name("fp4"))
    assert.matches("expected one of bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4, got \"fp4\"",
                   ffi.string(C.moe_last_error()))
    assert.are.equal("?", ffi.string(C.moe_quant_mode_name(6)))
  end)

  local code_box = ffi.new("uint32_t[1]")
  local val_box = ffi.new("double[1]")
  local function enc(dt, v) assert(C.moe_encode(dt, v, code_box) == 0) return tonumber(code_box[0]) end
  local function dec(dt, c) assert(C.moe_decode(dt, c, val_box) == 0) return val_box[0] end

  it("round-trips every e4m3, e5m2, e2m1 and ue8m0 code (values from the bit layouts)", function()
    for c = 0, 255 do
      local e, m = math.floor(c / 8) % 16, c % 8
      if not (e == 15 and m == 7) then                 -- S.1111.111 is NaN
        local v = e == 0 and m * 2 ^ -9 or (1 + m / 8) * 2 ^ (e - 7)
        if c >= 128 then v = -v end
        assert.are.equal(v, dec(C.MOE_F8E4M3, c))
        assert.are.equal(c, enc(C.MOE_F8E4M3, v))
      end
    end
    for c = 0, 255 do
      local e, m = math.floor(c / 4) % 32, c % 4
      if e ~= 31 then
        local v = e == 0 and m * 2 ^ -16 or (1 + m / 4) * 2 ^ (e - 15)
        if c >= 128 then v = -v end
        assert.are.equal(v, dec(C.MOE_F8E5M2, c))
        assert.are.equal(c, enc(C.MOE_F8E5M2, v))
      end
    end
    for c = 0, 15 do
      local v = E2M1[c % 8 + 1]
      if c >= 8 then v = -v end
      assert.are.equal(v, dec(C.MOE_E2M1, c))
      assert.are.equal(c, enc(C.MOE_E2M1, v))
    end
    for c = 0, 254 do
      assert.are.equal(2 ^ (c - 127), dec(C.MOE_UE8M0, c))
      assert.are.equal(c, enc(C.MOE_UE8M0, 2 ^ (c - 127)))
    end
  end)

  it("rounds ties to even and saturates", function()
    -- e4m3 between 1 (0x38) and 1.125 (0x39): 1.0625 -> 0x38; 1.1875 between 0x39 and 0x3A -> 0x3A
    assert.are.equal(0x38, enc(C.MOE_F8E4M3, 1.0625))
    assert.are.equal(0x3A, enc(C.MOE_F8E4M3, 1.1875))
    -- e4m3 saturates finite overflow and inf at 448 (0x7E), never NaN
    assert.are.equal(0x7E, enc(C.MOE_F8E4M3, 464))      -- midpoint of 448 and (absent) 480
    assert.are.equal(0x7E, enc(C.MOE_F8E4M3, 1e9))
    assert.are.equal(0xFE, enc(C.MOE_F8E4M3, -math.huge))
    -- e2m1 ties: 0.25 -> 0, 0.75 -> 1 (code 2), 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    local ties = { [0.25] = 0, [0.75] = 2, [1.25] = 2, [1.75] = 4, [2.5] = 4, [3.5] = 6, [5] = 6 }
    for v, c in pairs(ties) do assert.are.equal(c, enc(C.MOE_E2M1, v)) end
    assert.are.equal(7, enc(C.MOE_E2M1, 100))            -- saturates at 6
    assert.are.equal(15, enc(C.MOE_E2M1, -math.huge))
    -- e5m2 finite overflow saturates at 57344 (0x7B)
    assert.are.equal(0x7B, enc(C.MOE_F8E5M2, 70000))
    -- ue8m0: 3 = 1.5 * 2^1 is the midpoint of 2^1 (128) and 2^2 (129) -> even code 128
    assert.are.equal(128, enc(C.MOE_UE8M0, 3))
    assert.are.equal(0, enc(C.MOE_UE8M0, 0))
  end)

  it("e4m3 codes survive fp8 quantisation unchanged when the scale is 1", function()
    -- amax 448 -> scale 448/448 = 1 exactly, so data = e4m3(x): every finite code in order
    local vals = {}
    for c = 0, 255 do
      if c % 128 ~= 127 then vals[#vals + 1] = e4m3_val(c) end
    end
    local q = moe.quantize(mk({ 2, 127 }, vals), "fp8")
    assert.are.same({ 1 }, { q.scales:item() })
    local expect = {}
    for c = 0, 255 do if c % 128 ~= 127 then expect[#expect + 1] = c end end
    assert.are.same(expect, bytes(q.data))
    assert.are.same(vals, flat(q:dequantize()))
  end)

  it("e2m1 codes survive mxfp4 quantisation unchanged when the scale is 2^0", function()
    -- amax 6 = 1.5 * 2^2: m = 1.5 is not above 1.5, so k = 2 - 2 = 0, code 127
    local vals = {}
    for c = 0, 15 do vals[c + 1] = e2m1_val(c) end
    for c = 0, 15 do vals[16 + c + 1] = e2m1_val(15 - c) end
    local q = moe.quantize(mk({ 1, 32 }, vals), "mxfp4")
    assert.are.same({ 127 }, bytes(q.scales))
    local expect = {}
    for c = 0, 15 do expect[c + 1] = c end
    for c = 0, 15 do expect[16 + c + 1] = 15 - c end
    assert.are.same(expect, nibbles(q.data))
    -- the bytes: element 2j in the low nibble: 0x10, 0x32, 0x54, 0x76, 0x98, ..., then 0xEF, ...
    assert.are.same({ 0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE,
                      0xEF, 0xCD, 0xAB, 0x89, 0x67, 0x45, 0x23, 0x01 }, bytes(q.data))
  end)
end)

describe("scale choice", function()
  it("fp8: amax/448 per matrix (one per expert for 3-D)", function()
    -- expert 0 amax 3.5 -> 3.5/448 = 2^-7; expert 1 amax 896 -> 2; expert 2 all zero -> 0
    local q = moe.quantize(mk({ 3, 1, 4 }, { 3.5, -1, 0, 0.5,   -896, 1, 2, 3,   0, 0, 0, 0 }), "fp8")
    assert.are.same({ 2 ^ -7, 2, 0 }, q.scales:totable())
    assert.are.same({ 3 }, q.scales:shape())
    -- a 2-D matrix has a 0-d scale
    local q2 = moe.quantize(mk({ 1, 2 }, { 1, -9 }), "fp8")
    assert.are.same({}, q2.scales:shape())
    -- 9/448 rounded to f32 (double quotient rounded once == the f32 quotient)
    assert.are.equal(f32(9 / 448), q2.scales:item())
    -- 9/448 = (9/7)/64, 9/7 = 1.010 010 010...b: the f32 scale is rounded down (by 0.22 ulp),
    -- so -9/scale is -448 * (1 + 2.6e-8), which rounds to -448 in f32: 0xFE, never NaN
    assert.are.same({ 0xFE }, { bytes(q2.data)[2] })
  end)

  it("fp8_block: amax/448 per 128x128 block (weights) and per row x 128 (activations)", function()
    -- [256, 256]: four blocks; put amax 448*2^k in block (rb, cb)
    local N, K = 256, 256
    local v = zeros(N * K)
    local amax = { { 448, 224 }, { 7, 0 } }               -- scales 1, 0.5, 2^-6, 0
    for rb = 0, 1 do
      for cb = 0, 1 do
        local a = amax[rb + 1][cb + 1]
        -- the amax element at block-local (rb*5+3, cb*7+11) and a smaller one nearby
        v[(rb * 128 + rb * 5 + 3) * K + cb * 128 + cb * 7 + 11 + 1] = -a
        v[(rb * 128 + 100) * K + cb * 128 + 1] = a / 2
      end
    end
    local q = moe.quantize(mk({ N, K }, v), "fp8_block")
    assert.are.same({ { 1, 0.5 }, { 2 ^ -6, 0 } }, q.scales:totable())
    assert.are.equal(128, q.block_rows)
    assert.are.equal(128, q.block_cols)
    -- the amax elements quantise to -448 (0xFE), the halves to 224 (0x76); block (1,1) is 0
    local b = bytes(q.data)
    assert.are.equal(0xFE, b[(0 * 128 + 3) * K + 11 + 1])
    assert.are.equal(0x76, b[100 * K + 1])
    assert.are.equal(0xFE, b[(128 + 8) * K + 11 + 1])          -- block (1, 0): -7 / 2^-6
    assert.are.equal(0xFE, b[3 * K + 128 + 7 + 11 + 1])        -- block (0, 1): -224 / 0.5
    assert.are.equal(0x00, b[(128 + 8) * K + 128 + 7 + 11 + 1]) -- block (1, 1): zero
    -- activations: one scale per (row, 128 columns)
    local x = zeros(2 * 256)
    x[1] = 7; x[129] = -448; x[256 + 5] = 0.4375            -- row 0: 2^-6, 1; row 1: 2^-10, 0
    local qa = moe.quantize(mk({ 2, 256 }, x), "fp8_block", { block_rows = 1 })
    assert.are.same({ { 2 ^ -6, 1 }, { 0.4375 / 448, 0 } }, qa.scales:totable())
    assert.are.equal(1, qa.block_rows)
  end)

  it("mxfp4: the smallest power of two with amax / 2^k <= 6", function()
    -- one row per block: amax -> expected code (k + 127)
    local cases = {
      { 6, 127 },                  -- 1.5*2^2: k = 0
      { f32(6 + 2 ^ -21), 128 },   -- just above 6: k = 1 (6.0000005/2 = 3)
      { 7, 128 },                  -- 1.75*2^2 > 1.5: k = 1 (OCP's floor(log2)-2 would clip to 6)
      { 3, 126 },                  -- 1.5*2^1: k = -1, 3/0.5 = 6 exactly
      { 12, 128 },                 -- 1.5*2^3: k = 1
      { 1, 125 },                  -- 2^0: k = -2, 1/0.25 = 4
      { 0, 0 },                    -- all-zero block: the smallest code (2^-127)
      { 2 ^ -140, 0 },             -- tiny (f32 subnormal): clamps to code 0
      { 6 * 2 ^ -126, 1 },         -- 1.5*2^-124: k = -126
      { 6 * 2 ^ 125, 252 },        -- the largest 1.5*2^e below FLT_MAX
      { 3.4028234663852886e38, 253 }, -- FLT_MAX = 1.99..*2^127: k = 126
    }
    local v = {}
    for i, c in ipairs(cases) do
      for j = 1, 32 do v[(i - 1) * 32 + j] = 0 end
      v[(i - 1) * 32 + 1 + (i % 32)] = -c[1]
    end
    local q = moe.quantize(mk({ #cases, 32 }, v), "mxfp4")
    local sc = bytes(q.scales)
    for i, c in ipairs(cases) do
      assert.are.equal(c[2], sc[i], "amax " .. c[1])
    end
    -- no element overflowed: each amax element is within 6 * 2^k and codes as the model says
    -- (e.g. 7/2 = 3.5 -> tie 3|4 -> 4, code 0xE with the sign; 6.0000005/2 -> 3, code 0xD)
    local codes = nibbles(q.data)
    for i, c in ipairs(cases) do
      local k = c[2] - 127
      assert.is_true(c[1] / 2 ^ k <= 6)
      assert.are.equal(ref_e2m1(-c[1] / 2 ^ k), codes[(i - 1) * 32 + 1 + (i % 32)], "amax " .. c[1])
    end
    assert.are.equal(0xF, codes[2])
    assert.are.equal(0xD, codes[32 + 3])
    assert.are.equal(0xE, codes[64 + 4])
  end)

  it("nvfp4: global = amax/2688, block scale = e4m3(block_amax / (6 global))", function()
    -- amax 2.625 = 2688 * 2^-10 -> global 2^-10 exactly, 6*global = 6/1024
    -- block 0 amax 2.625: 2.625 / (6/1024) = 448 -> e4m3 0x7E
    -- block 1 amax 0.75: 0.75 / (6/1024) = 128 = 2^7 -> e4m3 exponent field 7+7 = 14: 0x70
    local v = zeros(32)
    v[1] = 2.625; v[2] = -1.3125
    v[17] = 0.75; v[18] = 0.3; v[19] = -0.1; v[20] = 0.03
    local q = moe.quantize(mk({ 1, 32 }, v), "nvfp4")
    assert.are.same({}, q.global_scale:shape())
    assert.are.equal(2 ^ -10, q.global_scale:item())
    assert.are.same({ 0x7E, 0x70 }, bytes(q.scales))
    -- block 0: d = 448 * 2^-10 = 0.4375: 2.625/0.4375 = 6 (code 7); -1.3125/0.4375 = -3 (0xD)
    -- block 1: d = 128 * 2^-10 = 0.125: 0.75 -> 6 (7); 0.3 -> 2.4 -> 2 (4);
    --          -0.1 -> -0.8 -> -1 (0xA; 0.8 is above the 0.75 midpoint); 0.03 -> 0.24 -> 0
    local codes = nibbles(q.data)
    assert.are.same({ 7, 0xD, 0, 0 }, { codes[1], codes[2], codes[3], codes[4] })
    assert.are.same({ 7, 4, 0xA, 0 }, { codes[17], codes[18], codes[19], codes[20] })
    -- bytes: (7 | 0xD << 4) = 0xD7, then zeros; block 1: (7 | 4 << 4) = 0x47, (0xA | 0) = 0x0A
    local b = bytes(q.data)
    assert.are.same({ 0xD7, 0x00 }, { b[1], b[2] })
    assert.are.same({ 0x47, 0x0A }, { b[9], b[10] })
    -- dequantised: (code * block scale) * global
    local d = flat(q:dequantize())
    assert.are.same({ 2.625, -1.3125, 0, 0 }, { d[1], d[2], d[3], d[4] })
    assert.are.same({ 0.75, 0.25, -0.125, 0 }, { d[17], d[18], d[19], d[20] })
  end)
end)

describe("one-block examples", function()
  it("fp8 [1, 4]", function()
    -- amax 3.5 -> scale 2^-7; x * 128: 448 -> 0x7E; -224 -> 0xF6 (1.75*2^7: field 14, m 6);
    -- f32(0.3)*128 = 38.4000015 -> 40 (1.25*2^5: field 12, m 2: 0x62); 0 -> 0x00
    local q = moe.quantize(mk({ 1, 4 }, { 3.5, -1.75, 0.3, 0 }), "fp8")
    assert.are.equal(2 ^ -7, q.scales:item())
    assert.are.same({ 0x7E, 0xF6, 0x62, 0x00 }, bytes(q.data))
    assert.are.same({ 3.5, -1.75, 0.3125, 0 }, flat(q:dequantize()))
  end)

  it("fp8_block activations [1, 128]", function()
    -- amax 7 -> scale 7/448 = 2^-6; -3 * 64 = -192 = -1.5*2^7 -> 0xF4;
    -- f32(0.01) * 64 = 0.63999999 -> 0.625 = 1.25*2^-1 (field 6, m 2) -> 0x32
    local v = zeros(128)
    v[1] = 7; v[2] = -3; v[3] = 0.01
    local q = moe.quantize(mk({ 1, 128 }, v), "fp8_block", { block_rows = 1 })
    assert.are.same({ { 2 ^ -6 } }, q.scales:totable())
    local b = bytes(q.data)
    assert.are.same({ 0x7E, 0xF4, 0x32, 0x00 }, { b[1], b[2], b[3], b[4] })
    local d = flat(q:dequantize())
    assert.are.same({ 7, -3, 0.625 / 64, 0 }, { d[1], d[2], d[3], d[4] })
  end)

  it("nvfp4 [1, 16] with an inexact block scale", function()
    -- two blocks: block 0 holds the matrix amax 2688 -> global 2688/2688 = 1 and block scale
    -- e4m3(2688/6 = 448) = 0x7E; block 1 has amax 10: e4m3(10/6 = 1.667) = 1.625 (nearer
    -- than 1.75; exponent field 7, mantissa 5: 0x3D)
    local v = zeros(32)
    v[1] = 2688
    v[17] = 10; v[18] = 4; v[19] = -3; v[20] = 0.5
    local q = moe.quantize(mk({ 1, 32 }, v), "nvfp4")
    assert.are.equal(1, q.global_scale:item())
    assert.are.same({ 0x7E, 0x3D }, bytes(q.scales))
    -- d = 1.625: 10/1.625 = 6.15 -> saturates at 6 (7); 4/1.625 = 2.46 -> 2 (4);
    -- -3/1.625 = -1.846 -> -2 (0xC; above the 1.75 midpoint); 0.5/1.625 = 0.308 -> 0.5 (1)
    local b = bytes(q.data)
    assert.are.same({ 0x47, 0x1C }, { b[9], b[10] })
    local d = flat(q:dequantize())
    assert.are.same({ 9.75, 3.25, -3.25, 0.8125 }, { d[17], d[18], d[19], d[20] })
  end)

  it("mxfp4 [1, 32]", function()
    -- amax 7 -> 2^1 (code 128); 7/2 = 3.5 -> tie 3|4 -> 4 (6); -0.7/2 = -0.35 -> -0.5 (9);
    -- 2.9/2 = 1.45 -> 1.5 (3); -5/2 = -2.5 -> tie 2|3 -> 2 (0xC)
    local v = zeros(32)
    v[1] = 7; v[2] = -0.7; v[3] = 2.9; v[4] = -5
    local q = moe.quantize(mk({ 1, 32 }, v), "mxfp4")
    assert.are.same({ 128 }, bytes(q.scales))
    local b = bytes(q.data)
    assert.are.same({ 0x96, 0xC3, 0x00 }, { b[1], b[2], b[3] })
    local d = flat(q:dequantize())
    assert.are.same({ 8, -1, 3, -4, 0 }, { d[1], d[2], d[3], d[4], d[5] })
  end)

  it("mxint4 [1, 32]: nibble order and sign", function()
    -- amax 7 -> scale bf16(1) = 1 (0x3F80): data = rne(x): 7 -> 7; -7 -> -7 (0x9);
    -- 2.5 -> 2; -1.5 -> -2 (0xE); 0.49 -> 0; -0.5 -> -0 -> 0; 3.6 -> 4
    local v = zeros(32)
    v[1] = 7; v[2] = -7; v[3] = 2.5; v[4] = -1.5; v[5] = 0.49; v[6] = -0.5; v[7] = 3.6
    local q = moe.quantize(mk({ 1, 32 }, v), "mxint4")
    assert.are.same({ 0x80, 0x3F }, bytes(q.scales))            -- little-endian 0x3F80
    local b = bytes(q.data)
    assert.are.same({ 0x97, 0xE2, 0x00, 0x04 }, { b[1], b[2], b[3], b[4] })
    local f = flat(q.data)
    assert.are.same({ 7, -7, 2, -2, 0, 0, 4 }, { f[1], f[2], f[3], f[4], f[5], f[6], f[7] })
  end)

  it("mxint4 with an inexact bf16 scale", function()
    -- amax 1: 1/7 = 2^-3 * 1.001001001...b -> bf16 keeps 7 bits 0010010 (next bit 0: down)
    -- = 1.140625 * 2^-3 = 0.142578125 (0x3E12); 1/s = 7.0137 -> 7; 0.5/s = 3.507 -> 4;
    -- 0.2/s = 1.403 -> 1; -1 -> -7 (0x9)
    local v = zeros(32)
    v[1] = 1; v[2] = 0.5; v[3] = 0.2; v[4] = -1
    local q = moe.quantize(mk({ 1, 32 }, v), "mxint4")
    assert.are.same({ 0x12, 0x3E }, bytes(q.scales))
    local b = bytes(q.data)
    assert.are.same({ 0x47, 0x91 }, { b[1], b[2] })
    local d = flat(q:dequantize())
    assert.are.same({ 7 * 0.142578125, 4 * 0.142578125, 0.142578125, -7 * 0.142578125 },
                    { d[1], d[2], d[3], d[4] })
  end)

  it("mxint4 -8 (nibble 0x8) dequantises to -8 * scale", function()
    -- quantisation never produces -8 (|x/s| <= 7 * (1 + 2^-8) < 7.5) but checkpoints may
    local vals = zeros(32)
    vals[1] = -8; vals[2] = 7; vals[3] = -1
    local data = mk({ 1, 32 }, vals, "i4")
    assert.are.same({ 0x78, 0x0F }, { bytes(data)[1], bytes(data)[2] })
    local s = mk({ 1, 1 }, { 0.5 }, "bf16")
    local q = moe.quant_from_parts{ mode = "mxint4", data = data, scales = s }
    local d = flat(q:dequantize())
    assert.are.same({ -4, 3.5, -0.5, 0 }, { d[1], d[2], d[3], d[4] })
  end)

  it("bf16 rounds to nearest even", function()
    -- 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7 -> 1; 1 + 3*2^-8 -> 1 + 2^-6 (even mantissa)
    local q = moe.quantize(mk({ 1, 2 }, { 1 + 2 ^ -8, 1 + 3 * 2 ^ -8 }), "bf16")
    assert.is_nil(q.scales)
    assert.are.same({ 0x80, 0x3F, 0x82, 0x3F }, bytes(q.data))
    assert.are.same({ { 1, 1 + 2 ^ -6 } }, q:dequantize():totable())
  end)
end)

describe("all-zero blocks", function()
  for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" } do
    it(mode .. ": scale 0 (smallest code), data 0, dequantised 0, no NaN", function()
      local q = moe.quantize(moe.zeros({ 2, 128, 128 }), mode)
      for _, b in ipairs(bytes(q.data)) do assert.are.equal(0, b) end
      for _, b in ipairs(bytes(q.scales)) do assert.are.equal(0, b) end
      if q.global_scale then assert.are.same({ 0, 0 }, q.global_scale:totable()) end
      for _, x in ipairs(flat(q:dequantize())) do assert.are.equal(0, x) end
    end)
  end

  it("a zero block inside a non-zero nvfp4 matrix gets scale code 0", function()
    local v = zeros(48)
    v[1] = 1; v[40] = -2
    local q = moe.quantize(mk({ 1, 48 }, v), "nvfp4")
    local sc = bytes(q.scales)
    assert.are.equal(0, sc[2])
    assert.is_true(sc[1] > 0 and sc[3] > 0)
    for _, x in ipairs(flat(q:dequantize())) do assert.is_true(x == x) end
  end)

  it("empty tensors quantise to empty parts with zero per-matrix scales", function()
    local q = moe.quantize(moe.zeros({ 3, 0, 16 }), "nvfp4")
    assert.are.same({ 3, 0, 16 }, q.shape)
    assert.are.same({ 0, 0, 0 }, q.global_scale:totable())
    assert.are.same({ 3, 0, 16 }, q:dequantize():shape())
  end)
end)

describe("every mode against an independent Lua model", function()
  -- random normal values with outliers, zeros, tiny values and an all-zero region
  local function input(M, N, K, seed)
    local t = moe.randn({ M, N, K }, { seed = seed })
    local v = flat(t)
    for i = 1, #v, 97 do v[i] = v[i] * 300 end
    for i = 5, #v, 211 do v[i] = 0 end
    for i = 7, #v, 389 do v[i] = v[i] * 1e-30 end
    for i = 1, math.min(64, #v) do v[i] = 0 end
    return mk({ M, N, K }, v), flat(mk({ M, N, K }, v))
  end

  local shapes = {
    fp8 = { 3, 5, 96 }, fp8_block = { 2, 256, 384 }, nvfp4 = { 3, 5, 80 },
    mxfp4 = { 3, 5, 96 }, mxint4 = { 3, 5, 96 },
  }
  for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" } do
    it(mode, function()
      local s = shapes[mode]
      local M, N, K = s[1], s[2], s[3]
      local t, v = input(M, N, K, 7)
      local q = moe.quantize(t, mode)
      local codes, scales, globals = MODEL[mode](v, M, N, K, 128)
      local got
      if mode == "fp8" or mode == "fp8_block" then got = bytes(q.data) else got = nibbles(q.data) end
      local bad = 0
      for i = 1, #codes do if got[i] ~= codes[i] then bad = bad + 1 end end
      assert.are.equal(0, bad, mode .. ": codes differing from the model")
      local gs
      if mode == "nvfp4" or mode == "mxfp4" then gs = bytes(q.scales) else gs = flat(q.scales) end
      assert.are.same(scales, gs)
      if globals then assert.are.same(globals, flat(q.global_scale)) end
      -- dequantised = model value: code * scale (nvfp4: (code * block) * global), in f32
      local d = flat(q:dequantize())
      local bad_d = 0
      for i = 1, #codes do
        local r = (i - 1) % K
        local row = math.floor((i - 1) / K)
        local m = math.floor((i - 1) / (N * K))
        local e
        if mode == "fp8" then e = f32(e4m3_val(codes[i]) * scales[m + 1])
        elseif mode == "fp8_block" then
          local rb = math.floor((row % N) / 128)
          e = f32(e4m3_val(codes[i]) * scales[(m * (N / 128) + rb) * (K / 128) + math.floor(r / 128) + 1])
        elseif mode == "nvfp4" then
          e = f32(e2m1_val(codes[i]) * e4m3_val(scales[row * (K / 16) + math.floor(r / 16) + 1]) * globals[m + 1])
        elseif mode == "mxfp4" then
          e = e2m1_val(codes[i]) * 2 ^ (scales[row * (K / 32) + math.floor(r / 32) + 1] - 127)
        else
          local c = codes[i] >= 8 and codes[i] - 16 or codes[i]
          e = f32(c * scales[row * (K / 32) + math.floor(r / 32) + 1])
        end
        if d[i] ~= e then bad_d = bad_d + 1 end
      end
      assert.are.equal(0, bad_d, mode .. ": dequantised values differing from the model")
    end)
  end

  it("fp8_block activations (block_rows 1) and bf16/f16 inputs", function()
    local _, v = input(1, 6, 256, 3)
    local q = moe.quantize(mk({ 6, 256 }, v), "fp8_block", { block_rows = 1 })
    local codes, scales = MODEL.fp8_block(v, 1, 6, 256, 1)
    assert.are.same(codes, bytes(q.data))
    assert.are.same(scales, flat(q.scales))
    for _, dt in ipairs{ "bf16", "f16" } do
      local t = mk({ 6, 256 }, v, dt)
      local qb = moe.quantize(t, "mxint4")
      local c2, s2 = MODEL.mxint4(flat(t), 1, 6, 256)
      assert.are.same(c2, nibbles(qb.data))
      assert.are.same(s2, flat(qb.scales))
    end
  end)

  it("strided inputs quantise like their contiguous copies", function()
    local t = moe.randn({ 64, 5 }, { seed = 11 }):transpose(1, 2)   -- [5, 64] view
    local a = moe.quantize(t, "nvfp4")
    local b = moe.quantize(t:contiguous(), "nvfp4")
    assert.are.same(bytes(b.data), bytes(a.data))
    assert.are.same(bytes(b.scales), bytes(a.scales))
    assert.are.same(bytes(b.global_scale), bytes(a.global_scale))
  end)

  it("dequantises into bf16 and f16 by rounding the f32 values", function()
    local t = moe.randn({ 4, 64 }, { seed = 5 })
    local q = moe.quantize(t, "nvfp4")
    local d32 = q:dequantize("f32")
    assert.are.same(bytes(d32:to("bf16")), bytes(moe.dequantize(q, "bf16")))
    assert.are.same(bytes(d32:to("f16")), bytes(q:dequantize("f16")))
  end)
end)

describe("parts, files and objects", function()
  it("rebuilds a qtensor from its parts (u8 packed data, u8 ue8m0, [1] globals)", function()
    local t = moe.randn({ 2, 4, 64 }, { seed = 9 })
    local q = moe.quantize(t, "mxfp4")
    local want = bytes(q:dequantize())
    -- as a checkpoint stores them: blocks u8 [2, 4, 32], scales u8 [2, 4, 2]
    local du8 = mk({ 2, 4, 32 }, bytes(q.data), "u8")
    local su8 = mk({ 2, 4, 2 }, bytes(q.scales), "u8")
    local q2 = moe.quant_from_parts{ mode = "mxfp4", data = du8, scales = su8 }
    assert.are.equal("e2m1", q2.data:dtype())
    assert.are.same({ 2, 4, 64 }, q2.shape)
    assert.are.same(want, bytes(q2:dequantize()))
    local t2 = moe.randn({ 4, 32 }, { seed = 2 })
    local n = moe.quantize(t2, "nvfp4")
    local n2 = moe.quant_from_parts{ mode = "nvfp4", data = n.data, scales = n.scales,
                                     global_scale = mk({ 1 }, { n.global_scale:item() }) }
    assert.are.same(bytes(n:dequantize()), bytes(n2:dequantize()))
    assert.are.same({}, n2.global_scale:shape())
  end)

  it("saves and loads every mode", function()
    local t = moe.randn({ 2, 128, 128 }, { seed = 4 })
    for _, mode in ipairs(moe.quant_modes()) do
      local q = moe.quantize(t, mode)
      local path = os.tmpname()
      q:save(path, { note = "hi" })
      local q2 = moe.quant_load(path)
      os.remove(path)
      assert.are.equal(mode, q2.mode)
      assert.are.same(bytes(q.data), bytes(q2.data))
      assert.are.same(bytes(q:dequantize()), bytes(q2:dequantize()))
    end
  end)

  it("prints, frees idempotently and names a freed handle", function()
    local q = moe.quantize(moe.randn({ 2, 32 }, { seed = 1 }), "mxint4")
    assert.are.equal("moe qtensor mxint4 [2, 32] on cpu, block 1x32: data i4 [2, 32], scales bf16 [2, 1]",
                     tostring(q))
    q:free()
    q:free()
    assert.are.equal("moe qtensor (freed)", tostring(q))
    assert.matches("q:dequantize: q: quantised tensor was freed", err_of(q.dequantize, q))
  end)
end)

describe("errors", function()
  local w = moe.zeros({ 4, 64 })

  it("moe.quantize names the argument", function()
    assert.matches("moe.quantize: t: expected a tensor, got 3", err_of(moe.quantize, 3, "fp8"))
    assert.matches("moe.quantize: mode: expected a quantisation mode " ..
                   "%(bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4%), got \"fp4\"",
                   err_of(moe.quantize, w, "fp4"))
    assert.matches("t: expected dtype f32, bf16 or f16, got i32",
                   err_of(moe.quantize, moe.zeros({ 4, 64 }, { dtype = "i32" }), "fp8"))
    assert.matches("t: expected 2 dimensions %[N, K%] or 3 %[E, N, K%], got 1",
                   err_of(moe.quantize, moe.zeros({ 64 }), "fp8"))
    assert.matches("t: expected 2 dimensions %[N, K%] or 3 %[E, N, K%], got 4",
                   err_of(moe.quantize, moe.zeros({ 1, 1, 4, 64 }), "fp8"))
    assert.matches("t: expected the last dimension K divisible by 16 %(the nvfp4 block%), got 24",
                   err_of(moe.quantize, moe.zeros({ 2, 24 }), "nvfp4"))
    assert.matches("t: expected the last dimension K divisible by 32 %(the mxfp4 block%), got 48",
                   err_of(moe.quantize, moe.zeros({ 2, 48 }), "mxfp4"))
    assert.matches("t: expected the last dimension K divisible by 32 %(the mxint4 block%), got 16",
                   err_of(moe.quantize, moe.zeros({ 2, 16 }), "mxint4"))
    assert.matches("t: expected the last dimension K divisible by 128 %(the fp8_block block%), got 64",
                   err_of(moe.quantize, w, "fp8_block", { block_rows = 1 }))
    assert.matches("t: expected dimension N %(2 of 3%) divisible by 128 .*got 100",
                   err_of(moe.quantize, moe.zeros({ 2, 100, 128 }), "fp8_block"))
    assert.matches("opts.block_rows: expected 128 %(weights%), 1 %(activations%) or 0 for fp8_block, got 64",
                   err_of(moe.quantize, moe.zeros({ 128, 128 }), "fp8_block", { block_rows = 64 }))
    assert.matches("opts.block_rows: expected 0 for fp8, got 1",
                   err_of(moe.quantize, w, "fp8", { block_rows = 1 }))
    assert.matches("opts: unknown option \"group\" %(known: block_rows%)",
                   err_of(moe.quantize, w, "fp8", { group = 1 }))
    assert.matches("opts.block_rows: expected an integer", err_of(moe.quantize, w, "fp8", { block_rows = "x" }))
  end)

  it("moe.dequantize checks q and dtype", function()
    local q = moe.quantize(w, "fp8")
    assert.matches("dtype: expected f32, bf16 or f16, got i32", err_of(q.dequantize, q, "i32"))
    assert.matches("moe.dequantize: q: expected a quantised tensor", err_of(moe.dequantize, w))
  end)

  it("moe.quant_from_parts checks every part's dtype, shape and presence", function()
    local e4 = function(shape) return moe.zeros(shape, { dtype = "f8_e4m3" }) end
    local fp = function(args) return err_of(moe.quant_from_parts, args) end
    assert.matches("data: expected dtype f8_e4m3 for mode fp8, got f32",
                   fp{ mode = "fp8", data = moe.zeros({ 2, 4 }), scales = moe.zeros({}) })
    assert.matches("data: expected dtype e2m1 %(or u8 holding two codes per byte%) for mode nvfp4, got f8_e4m3",
                   fp{ mode = "nvfp4", data = e4({ 2, 16 }) })
    assert.matches("data: expected 2 dimensions %[N, K%] or 3 %[E, N, K%], got 1",
                   fp{ mode = "fp8", data = e4({ 4 }), scales = moe.zeros({}) })
    assert.matches("data: expected the last dimension K divisible by 32 %(the mxfp4 block%), got 48",
                   fp{ mode = "mxfp4", data = moe.zeros({ 2, 48 }, { dtype = "e2m1" }),
                       scales = moe.zeros({ 2, 1 }, { dtype = "ue8m0" }) })
    assert.matches("scales: expected a f32 tensor %[%] for mode fp8, got NULL",
                   fp{ mode = "fp8", data = e4({ 2, 4 }) })
    assert.matches("scales: expected dtype f32 for mode fp8, got bf16",
                   fp{ mode = "fp8", data = e4({ 2, 4 }), scales = moe.zeros({}, { dtype = "bf16" }) })
    assert.matches("scales: expected shape %[3%] %(fp8: %[E%] or %[%] %(one f32 per matrix%)%), got %[2%]",
                   fp{ mode = "fp8", data = e4({ 3, 2, 4 }), scales = moe.zeros({ 2 }) })
    assert.matches("scales: expected shape %[2, 1, 2%] " ..
                   "%(fp8_block, block_rows 128: %[E, N/block_rows, K/128%]%), got %[2, 2, 2%]",
                   fp{ mode = "fp8_block", data = e4({ 2, 128, 256 }), scales = moe.zeros({ 2, 2, 2 }) })
    assert.matches("scales: expected shape %[4, 1%] %(nvfp4: %[E, N, K/16%]%), got %[4, 2%]",
                   fp{ mode = "nvfp4", data = moe.zeros({ 4, 16 }, { dtype = "e2m1" }),
                       scales = e4({ 4, 2 }), global_scale = moe.zeros({}) })
    assert.matches("scales: expected dtype f8_e4m3 for mode nvfp4, got f32",
                   fp{ mode = "nvfp4", data = moe.zeros({ 4, 16 }, { dtype = "e2m1" }),
                       scales = moe.zeros({ 4, 1 }), global_scale = moe.zeros({}) })
    assert.matches("global_scale: expected an f32 tensor %[%] for mode nvfp4, got NULL",
                   fp{ mode = "nvfp4", data = moe.zeros({ 4, 16 }, { dtype = "e2m1" }), scales = e4({ 4, 1 }) })
    assert.matches("global_scale: expected shape %[2%] %(one f32 per matrix%), got %[%]",
                   fp{ mode = "nvfp4", data = moe.zeros({ 2, 4, 16 }, { dtype = "e2m1" }), scales = e4({ 2, 4, 1 }),
                       global_scale = moe.zeros({}) })
    assert.matches("global_scale: expected dtype f32, got bf16",
                   fp{ mode = "nvfp4", data = moe.zeros({ 4, 16 }, { dtype = "e2m1" }), scales = e4({ 4, 1 }),
                       global_scale = moe.zeros({}, { dtype = "bf16" }) })
    assert.matches("global_scale: expected NULL for mode mxfp4 %(only nvfp4 has one%), got a tensor",
                   fp{ mode = "mxfp4", data = moe.zeros({ 4, 32 }, { dtype = "e2m1" }),
                       scales = moe.zeros({ 4, 1 }, { dtype = "ue8m0" }), global_scale = moe.zeros({}) })
    assert.matches("scales: expected NULL for mode bf16 %(it has no scales%), got a tensor",
                   fp{ mode = "bf16", data = moe.zeros({ 4, 32 }, { dtype = "bf16" }), scales = moe.zeros({}) })
    assert.matches("scales: expected dtype bf16 for mode mxint4, got f32",
                   fp{ mode = "mxint4", data = moe.zeros({ 4, 32 }, { dtype = "i4" }), scales = moe.zeros({ 4, 1 }) })
    assert.matches("data: expected dimension N %(1 of 2%) divisible by 128",
                   fp{ mode = "fp8_block", data = e4({ 100, 128 }), scales = moe.zeros({ 1, 1 }), block_rows = 128 })
    assert.matches("moe.quant_from_parts: args: unknown key \"scale\"",
                   fp{ mode = "fp8", data = e4({ 2, 4 }), scale = moe.zeros({}) })
    assert.matches("mode: expected a quantisation mode", fp{ mode = "int8", data = e4({ 2, 4 }) })
    -- fp8_block activations read block_rows off the scales' shape
    local qa = moe.quant_from_parts{ mode = "fp8_block", data = e4({ 3, 128 }), scales = moe.zeros({ 3, 1 }) }
    assert.are.equal(1, qa.block_rows)
  end)

  it("the C API refuses NULL and bad ids", function()
    local box = ffi.new("moe_qtensor*[1]")
    assert.are.equal(C.MOE_ERR_ARG, C.moe_quantize(w.h, 9, nil, box))
    assert.matches("moe_quantize: mode: expected a quantisation mode id 0..5", ffi.string(C.moe_last_error()))
    assert.are.equal(C.MOE_ERR_ARG, C.moe_quantize(nil, 1, nil, box))
    assert.matches("moe_quantize: t: expected a tensor, got NULL", ffi.string(C.moe_last_error()))
    assert.are.equal(C.MOE_ERR_ARG, C.moe_quantize(w.h, 1, nil, nil))
    local obox = ffi.new("moe_tensor*[1]")
    assert.are.equal(C.MOE_ERR_ARG, C.moe_dequantize(nil, C.MOE_F32, obox))
    assert.matches("moe_dequantize: q: expected a qtensor, got NULL", ffi.string(C.moe_last_error()))
    assert.are.equal(C.MOE_ERR_ARG, C.moe_qtensor_from_parts(box, 1, nil, nil, nil, nil))
    assert.matches("moe_qtensor_from_parts: data: expected a tensor, got NULL", ffi.string(C.moe_last_error()))
    C.moe_qtensor_free(nil)
    assert.are.equal(-1, C.moe_qtensor_mode(nil))
  end)
end)
