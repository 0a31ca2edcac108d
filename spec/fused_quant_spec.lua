-- spec/fused_quant_spec.lua -- the fused MoE in the quantisation modes on the CPU reference:
-- each mode against an independent plain-Lua model of its numerics (written here: e4m3,
-- e2m1, ue8m0, int4 rounding and the scale choices of docs/quantization.md, f32 arithmetic
-- emulated, float64 dot products), replay and routed mode in every mode, all-zero blocks,
-- qtensor parts, T = 0 and bad input.  (CUDA vs CPU: fused_quant_gpu_spec.lua.)
local H = require("spec.helper")
local moe = H.moe
local bit = require("bit")
local ffi = require("ffi")

local f32 = H.f32
local MODES = { "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" }

-- ------------------------------------------------------------ number formats --

local u32box = ffi.new("union { float f; uint32_t u; }")
local function bf16(x) -- round to bf16 through f32, nearest even
  u32box.f = x
  local u = u32box.u
  local lsb = bit.band(bit.rshift(u, 16), 1)
  u32box.u = bit.tobit(bit.band(u + 0x7fff + lsb, 0xffff0000))
  return u32box.f
end

local function rne(v) -- round half to even, v >= 0
  local f = math.floor(v)
  local d = v - f
  if d > 0.5 or (d == 0.5 and f % 2 == 1) then return f + 1 end
  return f
end

local function e4m3(v) -- nearest e4m3 value (saturating at 448), v finite
  local a = math.abs(v)
  if a == 0 then return 0 * v end
  local step
  if a < 2 ^ -6 then
    step = 2 ^ -9
  else
    local _, e = math.frexp(a) -- a = m * 2^e, 0.5 <= m < 1
    step = 2 ^ (e - 1 - 3)
  end
  local q = rne(a / step) * step
  if q > 448 then q = 448 end
  return v < 0 and -q or q
end

local function e2m1(v) -- nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating
  local a = math.abs(v)
  local step = a < 2 and 0.5 or (a < 4 and 1 or 2)
  local q = rne(a / step) * step
  if q > 6 then q = 6 end
  return v < 0 and -q or q
end

local function amax_of(vals, i0, n)
  local m = 0
  for i = i0, i0 + n - 1 do m = math.max(m, math.abs(vals[i])) end
  return m
end

-- Quantise-dequantise one row-major matrix `v` (1-based flat, rows x cols) of f32 values in
-- `mode`, as activations (fp8: one scale; fp8_block: per row and 128 columns; nvfp4: global
-- and per 16).  Returns a new flat table.
local function qdq_act(mode, v, rows, cols)
  local o = {}
  if mode == "mxfp4" or mode == "mxint4" then
    for i = 1, rows * cols do o[i] = v[i] end
    return o
  end
  if mode == "fp8" or mode == "fp8_block" then
    local B = mode == "fp8" and rows * cols or 128
    for b0 = 1, rows * cols, B do
      local s = f32(amax_of(v, b0, B) / 448)
      for i = b0, b0 + B - 1 do
        o[i] = s == 0 and 0 or f32(e4m3(f32(v[i] / s)) * s)
      end
    end
    return o
  end
  -- nvfp4
  local g = f32(amax_of(v, 1, rows * cols) / 2688)
  for b0 = 1, rows * cols, 16 do
    local sc = g == 0 and 0 or e4m3(f32(amax_of(v, b0, 16) / f32(6 * g)))
    local d = f32(sc * g)
    for i = b0, b0 + 15 do
      o[i] = d == 0 and 0 or f32(f32(e2m1(f32(v[i] / d)) * sc) * g)
    end
  end
  return o
end

-- Quantise-dequantise weights [E][N][K] (nested tables) in `mode`: fp8 one scale per expert,
-- fp8_block 128x128 blocks, nvfp4 global per expert and e4m3 per 16, mxfp4 ue8m0 per 32,
-- mxint4 bf16 per 32.  Returns nested tables of f32 values.
local function qdq_weights(mode, W)
  local out = {}
  for e = 1, #W do
    local M = W[e]
    local N, K = #M, #M[1]
    local R = {}
    for n = 1, N do R[n] = {} end
    if mode == "fp8" then
      local a = 0
      for n = 1, N do for k = 1, K do a = math.max(a, math.abs(M[n][k])) end end
      local s = f32(a / 448)
      for n = 1, N do for k = 1, K do R[n][k] = s == 0 and 0 or f32(e4m3(f32(M[n][k] / s)) * s) end end
    elseif mode == "fp8_block" then
      for n0 = 1, N, 128 do
        for k0 = 1, K, 128 do
          local a = 0
          for n = n0, n0 + 127 do for k = k0, k0 + 127 do a = math.max(a, math.abs(M[n][k])) end end
          local s = f32(a / 448)
          for n = n0, n0 + 127 do
            for k = k0, k0 + 127 do R[n][k] = s == 0 and 0 or f32(e4m3(f32(M[n][k] / s)) * s) end
          end
        end
      end
    elseif mode == "nvfp4" then
      local flat = {}
      for n = 1, N do for k = 1, K do flat[(n - 1) * K + k] = M[n][k] end end
      local g = f32(amax_of(flat, 1, N * K) / 2688)
      for n = 1, N do
        for k0 = 1, K, 16 do
          local a = amax_of(M[n], k0, 16)
          local sc = g == 0 and 0 or e4m3(f32(a / f32(6 * g)))
          local d = f32(sc * g)
          for k = k0, k0 + 15 do
            R[n][k] = d == 0 and 0 or f32(f32(e2m1(f32(M[n][k] / d)) * sc) * g)
          end
        end
      end
    elseif mode == "mxfp4" then
      for n = 1, N do
        for k0 = 1, K, 32 do
          local a = amax_of(M[n], k0, 32)
          local p
          if a == 0 then
            p = 2 ^ -127
          else
            local m, ex = math.frexp(a) -- a = (2m) * 2^(ex-1), 1 <= 2m < 2
            local kk = (2 * m <= 1.5) and (ex - 1 - 2) or (ex - 1 - 1)
            if kk < -127 then kk = -127 end
            p = 2 ^ kk
          end
          for k = k0, k0 + 31 do R[n][k] = e2m1(M[n][k] / p) * p end
        end
      end
    else -- mxint4
      for n = 1, N do
        for k0 = 1, K, 32 do
          local s = bf16(f32(amax_of(M[n], k0, 32) / 7))
          for k = k0, k0 + 31 do
            local q = 0
            if s ~= 0 then
              local v = f32(M[n][k] / s)
              q = v < 0 and -rne(-v) or rne(v)
              q = math.max(-8, math.min(7, q))
            end
            R[n][k] = f32(q * s)
          end
        end
      end
    end
    out[e] = R
  end
  return out
end

local function act_ref(act, g, u)
  if act == "swiglu" then return g / (1 + math.exp(-g)) * u end
  if act == "relu2" then local r = math.max(g, 0) return r * r end
  error("act " .. act)
end

-- The mode's MoE in plain Lua (output rounded to bf16, as the engine's).  p: x [T][H] (bf16 values), ids/w [T][K] (0-based ids), W13,
-- W2 nested, mode, act, b13/b2, llama4, lo/lc.
local function moe_ref(p)
  local mode, x, ids, w = p.mode, p.x, p.ids, p.w
  local T, Hd, I = #x, #x[1], p.I
  local gated = p.act ~= "relu2"
  local N1 = gated and 2 * I or I
  local lo, lc = p.lo or 0, p.lc or 1e9
  local W13, W2 = qdq_weights(mode, p.W13), qdq_weights(mode, p.W2)
  local xf = {}
  for t = 1, T do for h = 1, Hd do xf[(t - 1) * Hd + h] = x[t][h] end end
  local xq = qdq_act(mode, xf, T, Hd)
  -- local pairs in expert-sorted order (stable)
  local rows = {}
  local E = #W13
  for e = 0, E - 1 do
    if e - lo >= 0 and e - lo < lc then
      for t = 1, T do
        for k = 1, #ids[t] do
          if ids[t][k] == e then rows[#rows + 1] = { t = t, k = k, e = e } end
        end
      end
    end
  end
  local G = {}
  for r, pr in ipairs(rows) do
    local Wm = W13[pr.e + 1]
    local hv = {}
    for n = 1, N1 do
      local s = 0
      for h = 1, Hd do s = s + xq[(pr.t - 1) * Hd + h] * Wm[n][h] end
      if p.llama4 then s = s * w[pr.t][pr.k] end
      hv[n] = s + (p.b13 and p.b13[pr.e + 1][n] or 0)
    end
    for i = 1, I do G[(r - 1) * I + i] = bf16(act_ref(p.act, hv[i], gated and hv[I + i] or 0)) end
  end
  local Gq = #rows > 0 and qdq_act(mode, G, #rows, I) or {}
  local ypair = {}
  for r, pr in ipairs(rows) do
    local Wm = W2[pr.e + 1]
    local y = {}
    for h = 1, Hd do
      local s = 0
      for i = 1, I do s = s + Gq[(r - 1) * I + i] * Wm[h][i] end
      s = s + (p.b2 and p.b2[pr.e + 1][h] or 0)
      y[h] = p.llama4 and s or s * w[pr.t][pr.k]
    end
    ypair[pr.t .. ":" .. pr.k] = y
  end
  local out = {}
  for t = 1, T do
    local o = {}
    for h = 1, Hd do
      local acc = 0
      for k = 1, #ids[t] do
        local y = ypair[t .. ":" .. k]
        if y then acc = acc + y[h] end
      end
      o[h] = bf16(acc) -- the output is rounded to bf16 once
    end
    out[t] = o
  end
  return out
end

local function rel_l2(a, b)
  local num, den = 0, 0
  for t = 1, #b do
    for h = 1, #b[t] do
      local d = a[t][h] - b[t][h]
      num = num + d * d
      den = den + b[t][h] * b[t][h]
    end
  end
  if den == 0 then return math.sqrt(num) end
  return math.sqrt(num / den)
end

local function has_nan(t)
  for _, row in ipairs(t) do for _, v in ipairs(row) do if v ~= v then return true end end end
  return false
end

-- ---------------------------------------------------------------- fixtures --

local Hd, I, E, T = 256, 128, 4, 5

local function make(opts)
  opts = opts or {}
  local act = opts.act or "swiglu"
  local N1 = act == "relu2" and I or 2 * I
  local s = opts.seed or 1
  local f = {
    act = act, E = E, I = I,
    w13 = moe.randn({ E, N1, Hd }, { dtype = "bf16", seed = s, std = 0.1 }),
    w2 = moe.randn({ E, Hd, I }, { dtype = "bf16", seed = s + 1, std = 0.1 }),
    x = moe.randn({ opts.T or T, Hd }, { dtype = "bf16", seed = s + 2 }),
    logits = moe.randn({ opts.T or T, E }, { dtype = "f32", seed = s + 3 }),
  }
  if opts.bias then
    f.b13 = moe.randn({ E, N1 }, { seed = s + 4, std = 0.5 })
    f.b2 = moe.randn({ E, Hd }, { seed = s + 5, std = 0.5 })
  end
  return f
end

local function experts(f, mode)
  return moe.experts{ gate_up = f.w13, down = f.w2, activation = f.act, bias_gate_up = f.b13,
                      bias_down = f.b2, quant = mode }
end

local function ref_of(f, mode, r, extra)
  local p = {
    mode = mode, x = f.x:totable(), ids = r.ids:totable(), w = r.weights:totable(), I = f.I,
    act = f.act, W13 = f.w13:totable(), W2 = f.w2:totable(), b13 = f.b13 and f.b13:totable(),
    b2 = f.b2 and f.b2:totable(),
  }
  for k, v in pairs(extra or {}) do p[k] = v end
  return moe_ref(p)
end

-- -------------------------------------------------------------------- specs --

describe("moe.fused_moe quantised (CPU) against a plain-Lua model of each mode", function()
  for mi, mode in ipairs(MODES) do
    it(mode .. ": swiglu, renormalize top-2", function()
      local f = make{ seed = 10 * mi }
      local ex = experts(f, mode)
      assert.equal(mode, ex.quant)
      local y, r = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex, top_k = 2,
                                  return_routing = true }
      assert.same({ T, Hd }, y:shape())
      assert.equal("bf16", y:dtype())
      local yt = y:totable()
      local err = rel_l2(yt, ref_of(f, mode, r))
      print(string.format("  %-9s rel L2 vs the Lua model %.2e", mode, err))
      assert.is_true(err < 1e-3, mode .. ": relative L2 error vs the Lua model " .. err)
      -- the mode's numerics matter: bf16 experts give a clearly different output
      local yb = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = experts(f, "bf16"), top_k = 2 }
      local eb = rel_l2(yt, yb:totable())
      assert.is_true(eb > 5e-3, mode .. ": output indistinguishable from bf16 (" .. eb .. ")")
    end)
  end

  it("fp8_block: relu2 with biases", function()
    local f = make{ seed = 3, act = "relu2", bias = true }
    local y, r = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = experts(f, "fp8_block"),
                                top_k = 2, return_routing = true }
    local err = rel_l2(y:totable(), ref_of(f, "fp8_block", r))
    assert.is_true(err < 1e-3, "relative L2 error " .. err)
  end)

  it("nvfp4: llama4 (the weight scales the GEMM1 output once, combine with 1)", function()
    local f = make{ seed = 4 }
    local y, r = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = experts(f, "nvfp4"),
                                method = "llama4", top_k = 1, return_routing = true }
    local err = rel_l2(y:totable(), ref_of(f, "nvfp4", r, { llama4 = true }))
    assert.is_true(err < 1e-3, "relative L2 error " .. err)
  end)

  for _, mode in ipairs{ "fp8", "nvfp4" } do
    it(mode .. ": expert parallelism (per-tensor scales over the local pairs only)", function()
      local f = make{ seed = 5 }
      local ex = experts(f, mode)
      local y, r = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex, top_k = 2,
                                  local_offset = 1, local_count = 2, return_routing = true }
      local err = rel_l2(y:totable(), ref_of(f, mode, r, { lo = 1, lc = 2 }))
      assert.is_true(err < 1e-3, "relative L2 error " .. err)
    end)
  end
end)

describe("moe.fused_moe quantised: replay and routed mode", function()
  for mi, mode in ipairs(MODES) do
    it(mode .. ": routed reproduces native bit for bit; replay holds the ids", function()
      local f = make{ seed = 100 + mi, T = 9 }
      local ex = experts(f, mode)
      local replay = moe.full({ 12, 2 }, -7, { dtype = "i16" })
      local y, r = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex, top_k = 2,
                                  replay = replay, return_routing = true }
      local rep = replay:totable()
      local ids = r.ids:totable()
      for t = 1, 9 do assert.same(ids[t], rep[t]) end
      for t = 10, 12 do assert.same({ -7, -7 }, rep[t]) end
      local replay2 = moe.full({ 9, 2 }, -1, { dtype = "i16" })
      local y2 = moe.fused_moe{ hidden = f.x, experts = ex, routed = { ids = r.ids, weights = r.weights },
                                replay = replay2 }
      assert.same(y:to("f32"):totable(), y2:to("f32"):totable())
      assert.same(rep, (function() local t = replay2:totable() for i = 10, 12 do t[i] = { -7, -7 } end return t end)())
      -- and the same call again is identical (deterministic)
      local y3 = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex, top_k = 2 }
      assert.same(y:to("f32"):totable(), y3:to("f32"):totable())
    end)
  end
end)

describe("moe.fused_moe quantised: edge cases", function()
  for _, mode in ipairs(MODES) do
    it(mode .. ": all-zero blocks and an all-zero expert give no NaN; zero input gives 0; T = 0", function()
      local f = make{ seed = 7 }
      -- zero the first 128 columns of token 1, all of token 2, and expert 0's weights
      local x = f.x:clone()
      x:narrow(1, 1, 1):narrow(2, 1, 128):fill_(0)
      x:narrow(1, 2, 1):fill_(0)
      local w13, w2 = f.w13:clone(), f.w2:clone()
      w13:narrow(1, 1, 1):fill_(0)
      w2:narrow(1, 1, 1):fill_(0)
      local g = { act = "swiglu", w13 = w13, w2 = w2, x = x, logits = f.logits, I = I }
      local ex = experts(g, mode)
      local y, r = moe.fused_moe{ hidden = x, logits = f.logits, experts = ex, top_k = 2, return_routing = true }
      local yt = y:totable()
      assert.is_false(has_nan(yt))
      for h = 1, Hd do assert.equal(0, yt[2][h]) end -- a zero token: scale 0 blocks, output 0
      local err = rel_l2(yt, ref_of(g, mode, r))
      assert.is_true(err < 1e-3, "relative L2 error " .. err)
      -- an all-zero input: every activation scale is 0
      local z = moe.zeros({ 3, Hd }, { dtype = "bf16" })
      local yz = moe.fused_moe{ hidden = z, logits = f.logits:narrow(1, 1, 3), experts = ex, top_k = 2 }
      for _, row in ipairs(yz:to("f32"):totable()) do
        for _, v in ipairs(row) do assert.equal(0, v) end
      end
      -- T = 0
      local y0 = moe.fused_moe{ hidden = moe.empty({ 0, Hd }, { dtype = "bf16" }),
                                logits = moe.empty({ 0, E }, { dtype = "f32" }), experts = ex, top_k = 2 }
      assert.same({ 0, Hd }, y0:shape())
    end)
  end

  it("qtensor parts (moe.quantize, moe.quant_from_parts) equal quantising in moe.experts", function()
    local f = make{ seed = 8 }
    for _, mode in ipairs(MODES) do
      local a = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = experts(f, mode), top_k = 2 }
      local q13, q2 = moe.quantize(f.w13, mode), moe.quantize(f.w2, mode)
      local ex = moe.experts{ gate_up = q13, down = q2 }
      assert.equal(mode, ex.quant)
      local b = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex, top_k = 2 }
      assert.same(a:to("f32"):totable(), b:to("f32"):totable())
      local p13 = moe.quant_from_parts{ mode = mode, data = q13.data, scales = q13.scales,
                                        global_scale = q13.global_scale }
      local c = moe.fused_moe{ hidden = f.x, logits = f.logits, top_k = 2,
                               experts = moe.experts{ gate_up = p13, down = f.w2, quant = mode } }
      assert.same(a:to("f32"):totable(), c:to("f32"):totable())
    end
  end)
end)

describe("moe.experts quantised: bad input", function()
  local f = make{ seed = 9 }
  local function err(args) return H.error_of(moe.experts, args) end
  local function expect(msg, pat)
    assert.is_not_nil(msg, "expected an error containing " .. pat)
    assert.is_truthy(msg:find(pat, 1, true), "error '" .. tostring(msg) .. "' lacks '" .. pat .. "'")
  end

  it("dimensions not divisible by the block", function()
    -- H = 200: not a multiple of 128 (fp8_block) nor 16 (nvfp4); I = 48: not of 32
    local w13 = moe.randn({ 2, 96, 200 }, { seed = 1 })
    local w2 = moe.randn({ 2, 200, 48 }, { seed = 2 })
    expect(err{ gate_up = w13, down = w2, quant = "fp8_block" }, "divisible by 128")
    expect(err{ gate_up = w13, down = w2, quant = "nvfp4" }, "divisible by 16")
    expect(err{ gate_up = w13, down = w2, quant = "mxint4" }, "divisible by 32")
    -- fp8 has no block: any size works on the CPU
    assert.equal("fp8", moe.experts{ gate_up = w13, down = w2, quant = "fp8" }.quant)
  end)

  it("qtensors of another mode, shape or block; mismatched scale shapes", function()
    expect(err{ gate_up = moe.quantize(f.w13, "fp8"), down = f.w2, quant = "nvfp4" },
           "gate_up: expected a qtensor of mode nvfp4, got mode fp8")
    expect(err{ gate_up = f.w13, down = moe.quantize(f.w2:narrow(1, 1, 2), "mxfp4"), quant = "mxfp4" },
           "gate_up: expected shape [2, 256, 256]")
    expect(err{ gate_up = moe.quantize(f.w13, "fp8_block", { block_rows = 1 }), down = f.w2 },
           "expected fp8_block weight scales per 128x128 block")
    local q = moe.quantize(f.w13, "nvfp4")
    expect(H.error_of(moe.quant_from_parts, { mode = "nvfp4", data = q.data,
                                               scales = q.scales:narrow(3, 1, 8),
                                               global_scale = q.global_scale }),
           "scales: expected shape [4, 256, 16]")
  end)

  it("wrong dtypes and modes", function()
    expect(err{ gate_up = f.w13:to("i32"), down = f.w2, quant = "fp8" }, "gate_up: expected dtype f32 or bf16")
    expect(err{ gate_up = f.w13, down = f.w2:to("f16"), quant = "mxint4" }, "down: expected dtype f32 or bf16")
    expect(err{ gate_up = f.w13, down = f.w2, quant = "int3" }, "expected one of bf16, fp8")
    expect(err{ gate_up = f.w13, down = f.w2, quant = 3 }, "quant: expected a quantisation mode name")
  end)
end)
