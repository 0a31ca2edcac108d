-- spec/fused_spec.lua -- fused MoE on the CPU reference backend: against an independent
-- float64 reference written here in plain Lua, routed mode, replay, expert parallelism, edge
-- cases and every bad-input error.  (CUDA vs CPU: fused_gpu_spec.lua.)
local H = require("spec.helper")
local moe = H.moe
local bit = require("bit")
local ffi = require("ffi")

-- ---------------------------------------------------------------- reference --

local u32box = ffi.new("union { float f; uint32_t u; }")
local function bf16(x) -- round a double to bf16 (through f32, RNE), as a double
  u32box.f = x
  local u = u32box.u
  if bit.band(u, 0x7fffffff) > 0x7f800000 then return x end
  local lsb = bit.band(bit.rshift(u, 16), 1)
  local r = bit.band(u + 0x7fff + lsb, 0xffff0000) -- uint32 arithmetic wraps in bit ops
  u32box.u = bit.tobit(r)
  return u32box.f
end

local function erf(x) -- Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)
  local s = x < 0 and -1 or 1
  x = math.abs(x)
  local t = 1 / (1 + 0.3275911 * x)
  local y = 1 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t +
            0.254829592) * t * math.exp(-x * x)
  return s * y
end

local function act_ref(act, g, u, o)
  if act == "swiglu" then return g / (1 + math.exp(-g)) * u end
  if act == "geglu" then return 0.5 * g * (1 + erf(g / math.sqrt(2))) * u end
  if act == "relu2" then local r = math.max(g, 0) return r * r end
  local L = o.limit or 7
  local gg, uu = math.min(g, L), math.max(-L, math.min(u, L))
  return gg / (1 + math.exp(-(o.alpha or 1.702) * gg)) * (uu + (o.beta or 1))
end

-- float64 MoE: x [T][H], ids/w [T][K] (0-based ids), W13 [E][N][H], W2 [E][H][I].
-- times: how many times llama4's weight scales the input (1 is the contract; 2 = the bug).
local function moe_ref(p)
  local x, ids, w = p.x, p.ids, p.w
  local T, Hd, I = #x, #x[1] > 0 and #x[1] or 0, p.I
  local gated = p.act ~= "relu2"
  local lo, lc = p.lo or 0, p.lc or 1e9
  local out = {}
  for t = 1, T do
    local o = {}
    for h = 1, Hd do o[h] = 0 end
    for k = 1, #ids[t] do
      local e = ids[t][k]
      if e - lo >= 0 and e - lo < lc then
        local wt = w[t][k]
        local a = {}
        for h = 1, Hd do a[h] = x[t][h] * (p.llama4 and wt ^ (p.times or 1) or 1) end
        local W1, W2 = p.W13[e + 1], p.W2[e + 1]
        local g = {}
        for i = 1, I do
          local sg, su = 0, 0
          local rg, ru = W1[i], gated and W1[I + i]
          for h = 1, Hd do
            sg = sg + a[h] * rg[h]
            if gated then su = su + a[h] * ru[h] end
          end
          if p.b13 then
            sg = sg + p.b13[e + 1][i]
            if gated then su = su + p.b13[e + 1][I + i] end
          end
          g[i] = bf16(act_ref(p.act, sg, su, p))
        end
        local c = p.llama4 and 1 or wt
        for h = 1, Hd do
          local s = 0
          local r = W2[h]
          for i = 1, I do s = s + g[i] * r[i] end
          if p.b2 then s = s + p.b2[e + 1][h] end
          o[h] = o[h] + c * s
        end
      end
    end
    out[t] = o
  end
  return out
end

local function rel_l2(a, b) -- tables of rows
  local num, den = 0, 0
  for t = 1, #b do
    for h = 1, #b[t] do
      local d = a[t][h] - b[t][h]
      if d ~= d then return math.huge end
      num = num + d * d
      den = den + b[t][h] * b[t][h]
    end
  end
  if den == 0 then return math.sqrt(num) end
  return math.sqrt(num / den)
end

-- ---------------------------------------------------------------- fixtures --

local function make(opts)
  local E, Hd, I, T = opts.E or 8, opts.H or 32, opts.I or 16, opts.T or 7
  local act = opts.act or "swiglu"
  local N1 = act == "relu2" and I or 2 * I
  local s = opts.seed or 1
  local f = {
    E = E, H = Hd, I = I, T = T, act = act,
    w13 = moe.randn({ E, N1, Hd }, { dtype = "bf16", seed = s, std = 0.25 }),
    w2 = moe.randn({ E, Hd, I }, { dtype = "bf16", seed = s + 1, std = 0.25 }),
    x = moe.randn({ T, Hd }, { dtype = "bf16", seed = s + 2 }),
    logits = moe.randn({ T, E }, { dtype = "f32", seed = s + 3 }),
  }
  if opts.bias then
    f.b13 = moe.randn({ E, N1 }, { seed = s + 4, std = 0.5 })
    f.b2 = moe.randn({ E, Hd }, { seed = s + 5, std = 0.5 })
  end
  f.ex = moe.experts{ gate_up = f.w13, down = f.w2, activation = act, bias_gate_up = f.b13,
                      bias_down = f.b2 }
  return f
end

local function ref_of(f, r, extra)
  local p = {
    x = f.x:totable(), ids = r.ids:totable(), w = r.weights:totable(), I = f.I, act = f.act,
    W13 = f.w13:totable(), W2 = f.w2:totable(), b13 = f.b13 and f.b13:totable(),
    b2 = f.b2 and f.b2:totable(),
  }
  for k, v in pairs(extra or {}) do p[k] = v end
  return moe_ref(p)
end

local METHODS = {
  renormalize = { method = "renormalize", top_k = 2 },
  deepseekv3 = { method = "deepseekv3", top_k = 3, n_group = 2, topk_group = 1, scale = 2.5,
                 with_bias = true },
  llama4 = { method = "llama4", top_k = 1 },
}

local function run(f, m, more)
  local args = { hidden = f.x, logits = f.logits, experts = f.ex, method = m.method,
                 top_k = m.top_k, n_group = m.n_group, topk_group = m.topk_group, scale = m.scale,
                 return_routing = true }
  if m.with_bias then
    f.rbias = f.rbias or moe.randn({ f.E }, { seed = 99, std = 0.3 })
    args.bias = f.rbias
  end
  for k, v in pairs(more or {}) do args[k] = v end
  return moe.fused_moe(args)
end

-- -------------------------------------------------------------------- specs --

describe("moe.fused_moe (CPU) against a float64 Lua reference", function()
  for _, act in ipairs{ "swiglu", "geglu", "relu2", "swiglu_oai" } do
    for _, mname in ipairs{ "renormalize", "deepseekv3", "llama4" } do
      it(act .. " / " .. mname, function()
        local f = make{ act = act, bias = act == "swiglu_oai", seed = #act + #mname }
        local m = METHODS[mname]
        local y, r = run(f, m)
        assert.same({ f.T, f.H }, y:shape())
        assert.equal("bf16", y:dtype())
        -- the routing used is moe.route's
        local rr = moe.route{ logits = f.logits, method = m.method, top_k = m.top_k,
                              n_group = m.n_group, topk_group = m.topk_group, scale = m.scale,
                              bias = f.rbias }
        assert.same(rr.ids:totable(), r.ids:totable())
        assert.same(rr.weights:totable(), r.weights:totable())
        local ref = ref_of(f, r, { llama4 = mname == "llama4" })
        local err = rel_l2(y:totable(), ref)
        assert.is_true(err < 5e-3, "relative L2 error " .. err)
        if mname == "llama4" then
          -- the weight is applied once: a reference that applies it twice is far away
          local twice = ref_of(f, r, { llama4 = true, times = 2 })
          assert.is_true(rel_l2(y:totable(), twice) > 5e-2, "llama4 output also matches x*w*w")
        end
      end)
    end
  end

  it("f32 weights are rounded to bf16 when packed (same result as bf16 weights)", function()
    local f = make{ seed = 41 }
    local w13f = moe.randn(f.w13:shape(), { seed = 77, std = 0.25 })
    local w2f = moe.randn(f.w2:shape(), { seed = 78, std = 0.25 })
    local ex1 = moe.experts{ gate_up = w13f, down = w2f }
    local ex2 = moe.experts{ gate_up = w13f:to("bf16"), down = w2f:to("bf16") }
    local y1 = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex1, top_k = 2 }
    local y2 = moe.fused_moe{ hidden = f.x, logits = f.logits, experts = ex2, top_k = 2 }
    assert.same(y2:totable(), y1:totable())
  end)
end)

describe("moe.experts / moe.fused_moe tensor arguments", function()
  it("a missing, bad or freed tensor is named and blamed on the caller's line", function()
    local ok, e = pcall(function() local _ = moe.experts{ down = moe.zeros({1, 4, 4}) } end)
    assert.is_false(ok)
    assert.matches("fused_spec%.lua:%d+: moe%.experts: gate_up: expected a tensor, got nil$", e)
    local ex = moe.experts{ gate_up = moe.zeros({1, 8, 4}), down = moe.zeros({1, 4, 4}) }
    ok, e = pcall(function() local _ = moe.fused_moe{ experts = ex, hidden = 7 } end)
    assert.is_false(ok)
    assert.matches("fused_spec%.lua:%d+: moe%.fused_moe: hidden: expected a tensor, got 7$", e)
    local x = moe.zeros({1, 4}, { dtype = "bf16" })
    x:free()
    ok, e = pcall(function() local _ = moe.fused_moe{ experts = ex, hidden = x } end)
    assert.is_false(ok)
    assert.matches("fused_spec%.lua:%d+: moe%.fused_moe: hidden: tensor was freed$", e)
  end)
end)

describe("moe.fused_moe routed mode and replay", function()
  it("reproduces the native output bit for bit; the replay buffers are identical", function()
    for _, mname in ipairs{ "renormalize", "deepseekv3", "llama4" } do
      local f = make{ seed = 11, act = "swiglu_oai", bias = true }
      local m = METHODS[mname]
      local rep1 = moe.full({ f.T + 3, m.top_k }, -7, { dtype = "i16" })
      local rep2 = moe.full({ f.T + 3, m.top_k }, -7, { dtype = "i16" })
      local y1, r = run(f, m, { replay = rep1 })
      local y2 = moe.fused_moe{ hidden = f.x, experts = f.ex, routed = r, replay = rep2,
                                method = mname == "llama4" and "llama4" or nil }
      assert.same(y1:totable(), y2:totable())
      local a, b = rep1:totable(), rep2:totable()
      assert.same(a, b)
      local ids = r.ids:totable()
      for t = 1, f.T do assert.same(ids[t], a[t]) end
      for t = f.T + 1, f.T + 3 do
        for k = 1, m.top_k do assert.equal(-7, a[t][k]) end
      end
    end
  end)

  it("uses the given weights as given (no routing math)", function()
    local f = make{ seed = 12 }
    local ids = moe.tensor({ { 1, 5 }, { 0, 0 }, { 7, 2 }, { 3, 4 }, { 6, 1 }, { 2, 2 }, { 5, 0 } }, { dtype = "i32" })
    local w = moe.tensor({ { 0.5, -1.5 }, { 2, 0 }, { 1, 1 }, { 0.25, 3 }, { -1, -1 }, { 0.1, 0.2 }, { 4, 0.5 } },
                         { dtype = "f32" })
    local y = moe.fused_moe{ hidden = f.x, experts = f.ex, routed = { ids = ids, weights = w } }
    local ref = ref_of(f, { ids = ids, weights = w })
    local err = rel_l2(y:totable(), ref)
    assert.is_true(err < 5e-3, "relative L2 error " .. err)
  end)
end)

describe("moe.fused_moe expert parallelism", function()
  it("the sum of 4 disjoint shards equals the full output (bf16 rounding of each part)", function()
    local f = make{ seed = 21, E = 8, T = 9 }
    local m = METHODS.renormalize
    local full = run(f, m):totable()
    local parts = {}
    for s = 0, 3 do
      parts[s + 1] = run(f, m, { local_offset = 2 * s, local_count = 2 }):totable()
    end
    local checked = 0
    for t = 1, f.T do
      for h = 1, f.H do
        local sum, mag = 0, math.abs(full[t][h])
        for s = 1, 4 do
          sum = sum + parts[s][t][h]
          mag = mag + math.abs(parts[s][t][h])
        end
        -- each output is rounded to bf16 once (relative error <= 2^-9)
        assert.is_true(math.abs(sum - full[t][h]) <= 2 ^ -8 * mag + 1e-30,
                       string.format("[%d,%d]: shards sum to %g, full %g", t, h, sum, full[t][h]))
        checked = checked + 1
      end
    end
    assert.equal(f.T * f.H, checked)
    -- each shard equals the reference restricted to its experts
    local _, r = run(f, m)
    for s = 0, 3 do
      local ref = ref_of(f, r, { lo = 2 * s, lc = 2 })
      assert.is_true(rel_l2(parts[s + 1], ref) < 5e-3)
    end
  end)

  it("a shard that receives no token gives zeros; local_count 0 gives zeros", function()
    local f = make{ seed = 22, E = 8 }
    -- route everything to experts 0..1
    local L = {}
    for t = 1, f.T do
      L[t] = {}
      for e = 1, f.E do L[t][e] = e <= 2 and 5 + t * 0.1 * e or -5 end
    end
    f.logits = moe.tensor(L, { dtype = "f32" })
    local y = run(f, METHODS.renormalize, { local_offset = 4, local_count = 4 })
    for _, row in ipairs(y:totable()) do for _, v in ipairs(row) do assert.equal(0, v) end end
    local z = run(f, METHODS.renormalize, { local_offset = 3, local_count = 0 })
    for _, row in ipairs(z:totable()) do for _, v in ipairs(row) do assert.equal(0, v) end end
  end)
end)

describe("moe.fused_moe edge cases", function()
  it("T = 0", function()
    local f = make{ seed = 31 }
    local x = moe.empty({ 0, f.H }, { dtype = "bf16" })
    local L = moe.empty({ 0, f.E }, { dtype = "f32" })
    local y, r = moe.fused_moe{ hidden = x, logits = L, experts = f.ex, top_k = 2, return_routing = true }
    assert.same({ 0, f.H }, y:shape())
    assert.same({ 0, 2 }, r.ids:shape())
  end)

  it("experts that receive no token, and all tokens routed to one expert", function()
    local f = make{ seed = 32, T = 12 }
    local L = {}
    for t = 1, f.T do
      L[t] = {}
      for e = 1, f.E do L[t][e] = (e == 4) and 10 or (t * 0.37 + e * 0.11) % 1 end
    end
    f.logits = moe.tensor(L, { dtype = "f32" })
    local y1, r1 = run(f, { method = "renormalize", top_k = 1 })
    for _, row in ipairs(r1.ids:totable()) do assert.equal(3, row[1]) end
    assert.is_true(rel_l2(y1:totable(), ref_of(f, r1)) < 5e-3)
    -- K = 2: expert 3 plus a few others; most experts get nothing
    local y2, r2 = run(f, { method = "renormalize", top_k = 2 })
    assert.is_true(rel_l2(y2:totable(), ref_of(f, r2)) < 5e-3)
  end)

  it("writes a caller-provided out and returns it", function()
    local f = make{ seed = 33 }
    local out = moe.full({ f.T, f.H }, 123, { dtype = "bf16" })
    local y = run(f, METHODS.renormalize, { out = out })
    assert.equal(out, y)
    local ref = ref_of(f, select(2, run(f, METHODS.renormalize)))
    assert.is_true(rel_l2(out:totable(), ref) < 5e-3)
  end)

  it("is deterministic", function()
    local f = make{ seed = 34, T = 20 }
    local a = run(f, METHODS.deepseekv3):totable()
    local b = run(f, METHODS.deepseekv3):totable()
    assert.same(a, b)
  end)
end)

describe("moe.fused_paths (which kernels ran the expert GEMMs)", function()
  it("counts each CPU call with local pairs once, resets, and names every path", function()
    local f = make{ seed = 35 }
    moe.fused_paths_reset()
    assert.same({ cpu = 0, gemv = 0, tile = 0, wreg = 0, wgmma = 0, gemv_route = 0, wgmma_rs = 0, wreg_i4f16 = 0,
                  wgmma_rs_i4f16 = 0, wgmma_rs_xonce = 0, gemv_bulk = 0, gemv_route_bulk = 0 },
                moe.fused_paths())
    run(f, METHODS.renormalize)
    run(f, METHODS.deepseekv3)
    assert.same({ cpu = 2, gemv = 0, tile = 0, wreg = 0, wgmma = 0, gemv_route = 0, wgmma_rs = 0, wreg_i4f16 = 0,
                  wgmma_rs_i4f16 = 0, wgmma_rs_xonce = 0, gemv_bulk = 0, gemv_route_bulk = 0 },
                moe.fused_paths(true))
    assert.equal(0, moe.fused_paths().cpu)
    -- T = 0 and a call without local experts run no GEMM: not counted
    moe.fused_moe{ hidden = moe.empty({ 0, f.H }, { dtype = "bf16" }), logits = moe.empty({ 0, f.E }, { dtype = "f32" }),
                   experts = f.ex, top_k = 2 }
    moe.fused_moe{ hidden = f.x, logits = f.logits, experts = f.ex, top_k = 2, local_offset = 0, local_count = 0 }
    assert.equal(0, moe.fused_paths().cpu)
    assert.has_error(function() moe.fused_paths("yes") end,
                     'moe.fused_paths: reset: expected a boolean or nil, got "yes"')
  end)
end)

describe("moe.fused_moe bad input", function()
  local f = make{ seed = 51 }
  local function err_of(args)
    local base = { hidden = f.x, logits = f.logits, experts = f.ex, top_k = 2 }
    for k, v in pairs(args) do base[k] = v end
    for k, v in pairs(args) do if v == "nil" then base[k] = nil end end
    return H.error_of(moe.fused_moe, base)
  end
  local function expect(msg, pattern)
    assert.is_not_nil(msg, "expected an error matching " .. pattern)
    assert.is_truthy(msg:find(pattern), "error " .. tostring(msg) .. " should match " .. pattern)
  end

  it("H mismatch between hidden and experts", function()
    expect(err_of{ hidden = moe.randn({ f.T, f.H + 8 }, { dtype = "bf16" }) }, "hidden: expected dim 1 == H")
  end)
  it("I mismatch between gate_up and down", function()
    local e = H.error_of(moe.experts, { gate_up = f.w13, down = moe.randn({ f.E, f.H, f.I + 1 }, { dtype = "bf16" }) })
    expect(e, "gate_up: expected shape")
    e = H.error_of(moe.experts, { gate_up = f.w13, down = moe.randn({ f.E, f.H + 1, f.I }, { dtype = "bf16" }) })
    expect(e, "gate_up: expected shape")
  end)
  it("K > E and K out of range", function()
    expect(err_of{ top_k = 9 }, "top_k: expected <= E")
    expect(err_of{ top_k = 0 }, "top_k: expected 1..32")
  end)
  it("logits with another E or T", function()
    expect(err_of{ logits = moe.randn({ f.T, f.E + 1 }) }, "logits: expected shape")
    expect(err_of{ logits = moe.randn({ f.T + 1, f.E }) }, "logits: expected shape")
  end)
  it("routed ids out of range", function()
    local ids = moe.tensor({ { 0, 8 } }, { dtype = "i32" })
    local w = moe.tensor({ { 0.5, 0.5 } }, { dtype = "f32" })
    local x = moe.randn({ 1, f.H }, { dtype = "bf16" })
    local e = H.error_of(moe.fused_moe, { hidden = x, experts = f.ex, routed = { ids = ids, weights = w } })
    expect(e, "routed_ids: expected ids in %[0, 8%), got 8 at %[0, 1%]")
    ids = moe.tensor({ { -1, 2 } }, { dtype = "i32" })
    e = H.error_of(moe.fused_moe, { hidden = x, experts = f.ex, routed = { ids = ids, weights = w } })
    expect(e, "routed_ids: expected ids in")
  end)
  it("wrong dtypes", function()
    expect(err_of{ hidden = moe.randn({ f.T, f.H }) }, "hidden: expected dtype bf16, got f32")
    local ids = moe.zeros({ f.T, 2 }, { dtype = "i64" })
    local w = moe.zeros({ f.T, 2 }, { dtype = "f32" })
    expect(err_of{ logits = "nil", routed = { ids = ids, weights = w } }, "routed_ids: expected dtype i32")
    expect(err_of{ logits = "nil", routed = { ids = moe.zeros({ f.T, 2 }, { dtype = "i32" }),
                                              weights = moe.zeros({ f.T, 2 }, { dtype = "bf16" }) } },
           "routed_weights: expected dtype f32")
    expect(err_of{ out = moe.empty({ f.T, f.H }, { dtype = "f32" }) }, "out: expected dtype bf16")
    expect(H.error_of(moe.experts, { gate_up = f.w13:to("i32"), down = f.w2 }), "gate_up: expected dtype f32 or bf16")
  end)
  it("both logits and routed ids; neither", function()
    local r = select(2, run(f, METHODS.renormalize))
    expect(err_of{ routed = r }, "logits: expected NULL in routed mode")
    expect(err_of{ logits = "nil" }, "logits: expected a tensor")
  end)
  it("replay buffer too small or of the wrong type", function()
    expect(err_of{ replay = moe.empty({ f.T - 1, 2 }, { dtype = "i16" }) }, "replay: expected shape %[>= 7, 2%]")
    expect(err_of{ replay = moe.empty({ f.T, 3 }, { dtype = "i16" }) }, "replay: expected shape")
    expect(err_of{ replay = moe.empty({ f.T, 2 }, { dtype = "i32" }) }, "replay: expected dtype i16")
  end)
  it("expert-parallel range", function()
    expect(err_of{ local_offset = 9 }, "local_offset: expected 0..8")
    expect(err_of{ local_offset = 4, local_count = 5 }, "local_count: expected")
  end)
  it("wrong devices", function()
    if moe.cuda_available() then
      expect(err_of{ hidden = f.x:to("cuda") }, "hidden: expected device cpu")
    else
      local e = H.error_of(moe.experts, { gate_up = f.w13, down = f.w2, device = "cuda" })
      assert.is_not_nil(e)
    end
  end)
  it("quant: modes are accepted by name (numerics: fused_quant_spec.lua), unknown ones refused", function()
    local ex = moe.experts{ gate_up = f.w13, down = f.w2, quant = "bf16" }
    assert.equal("bf16", ex.quant)
    expect(H.error_of(moe.experts, { gate_up = f.w13, down = f.w2, quant = "fp7" }),
           "expected one of bf16, fp8")
  end)
  it("unknown arguments and activations", function()
    expect(err_of{ topk = 2 }, "unknown argument")
    expect(H.error_of(moe.experts, { gate_up = f.w13, down = f.w2, activation = "gelu" }),
           "expected one of swiglu, geglu, relu2, swiglu_oai")
    expect(H.error_of(moe.fused_moe, { hidden = f.x, logits = f.logits, experts = {} }),
           "experts: expected an experts object")
  end)
end)
