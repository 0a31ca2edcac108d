-- spec/fused_gpu_spec.lua -- fused MoE on CUDA against the CPU reference (relative L2 <= 1e-2):
-- every activation x deepseekv3/renormalize/llama4 x T in {1, 5, 64, 1000} with H = 384 and
-- I = 640 (multiples of 128, not powers of two), both GEMM tile configurations, routed-mode
-- bit-exactness and replay, expert parallelism, T = 0, graph capture + replay with new inputs,
-- out-of-range routed ids counted on the device; the env switches of the kernel paths, the
-- decode GEMV path (T <= 4; MOE_FUSED_GEMV) against the tile kernels and the CPU.  On an
-- sm_90a device every case with T * top_k >= 48 * local experts (T = 1000 and up here, the
-- expert shards of the last block) runs the warp-specialised kernel.  Exits 77 without a CUDA device.
local H = require("spec.helper")
local moe = H.moe

local E, HD, I = 16, 384, 640

local rel_l2 = H.rel_l2

local weights = {}
local function experts(act, bias)
  local key = act .. tostring(bias)
  if weights[key] then return weights[key] end
  local N1 = act == "relu2" and I or 2 * I
  local w13 = moe.randn({ E, N1, HD }, { dtype = "bf16", seed = #act * 7 + 1, std = 0.05 })
  local w2 = moe.randn({ E, HD, I }, { dtype = "bf16", seed = #act * 7 + 2, std = 0.05 })
  local b13 = bias and moe.randn({ E, N1 }, { seed = 5, std = 0.2 }) or nil
  local b2 = bias and moe.randn({ E, HD }, { seed = 6, std = 0.2 }) or nil
  local r = {
    cpu = moe.experts{ gate_up = w13, down = w2, bias_gate_up = b13, bias_down = b2, activation = act,
                       device = "cpu" },
    cuda = moe.experts{ gate_up = w13, down = w2, bias_gate_up = b13, bias_down = b2, activation = act,
                        device = "cuda" },
  }
  weights[key] = r
  return r
end

local METHODS = {
  renormalize = { method = "renormalize", top_k = 2 },
  deepseekv3 = { method = "deepseekv3", top_k = 4, n_group = 4, topk_group = 2, scale = 2.5 },
  llama4 = { method = "llama4", top_k = 1 },
}
local rbias = moe.randn({ E }, { seed = 9, std = 0.3 })

local function inputs(T, seed)
  return moe.randn({ T, HD }, { dtype = "bf16", seed = seed }), moe.randn({ T, E }, { seed = seed + 1 })
end

local function call(ex, x, L, m, dev, more)
  local a = { hidden = x:to(dev), logits = L:to(dev), experts = ex[dev], method = m.method, top_k = m.top_k,
              n_group = m.n_group, topk_group = m.topk_group, scale = m.scale,
              bias = m.method == "deepseekv3" and rbias:to(dev) or nil, return_routing = true }
  for k, v in pairs(more or {}) do a[k] = v end
  return moe.fused_moe(a)
end

describe("#gpu moe.fused_moe CUDA vs CPU", function()
  for _, act in ipairs{ "swiglu", "geglu", "relu2", "swiglu_oai" } do
    for _, mname in ipairs{ "renormalize", "deepseekv3", "llama4" } do
      for _, T in ipairs{ 1, 5, 64, 1000 } do
        it(string.format("%s / %s / T=%d", act, mname, T), function()
          local ex = experts(act, act == "swiglu_oai")
          local x, L = inputs(T, T * 13 + #act + #mname)
          local m = METHODS[mname]
          local yc, rc = call(ex, x, L, m, "cpu")
          local yg, rg = call(ex, x, L, m, "cuda")
          assert.equal("cuda:0", yg:device())
          assert.same(rc.ids:totable(), rg.ids:to("cpu"):totable())
          local err = rel_l2(yg, yc)
          assert.is_true(err <= 1e-2, "relative L2 error " .. err)
          local ref_norm = rel_l2(moe.zeros({ T, HD }, { dtype = "bf16" }), yc)
          assert.is_true(ref_norm > 0.5, "reference output is (nearly) zero")
        end)
      end
    end
  end
end)

describe("#gpu moe.fused_moe routed mode, EP, edge cases", function()
  it("routed mode reproduces the native output bit for bit; replay identical", function()
    for _, T in ipairs{ 5, 1000 } do
      local ex = experts("swiglu", false)
      local x, L = inputs(T, 77 + T)
      local m = METHODS.deepseekv3
      local r1 = moe.full({ T + 2, m.top_k }, -3, { dtype = "i16", device = "cuda" })
      local r2 = moe.full({ T + 2, m.top_k }, -3, { dtype = "i16", device = "cuda" })
      local y1, r = call(ex, x, L, m, "cuda", { replay = r1 })
      local y2 = moe.fused_moe{ hidden = x:to("cuda"), experts = ex.cuda, routed = r, replay = r2 }
      assert.same(y1:to("cpu"):totable(), y2:to("cpu"):totable())
      assert.same(r1:to("cpu"):totable(), r2:to("cpu"):totable())
      local rows = r1:to("cpu"):totable()
      assert.same(r.ids:to("cpu"):totable()[T], rows[T])
      assert.same({ -3, -3, -3, -3 }, rows[T + 1])
    end
  end)

  it("4 expert shards sum to the full output; each shard matches the CPU shard", function()
    local ex = experts("geglu", false)
    local T = 64
    local x, L = inputs(T, 501)
    local m = METHODS.renormalize
    local full = call(ex, x, L, m, "cuda"):to("cpu"):to("f32")
    local fa = full:reshape({ T * HD }):totable()
    local acc, am = {}, {}
    for i = 1, T * HD do acc[i], am[i] = 0, math.abs(fa[i]) end
    for s = 0, 3 do
      local more = { local_offset = 4 * s, local_count = 4 }
      local yg = call(ex, x, L, m, "cuda", more)
      local yc = call(ex, x, L, m, "cpu", more)
      assert.is_true(rel_l2(yg, yc) <= 1e-2)
      local p = yg:to("cpu"):to("f32"):reshape({ T * HD }):totable()
      for i = 1, T * HD do acc[i], am[i] = acc[i] + p[i], am[i] + math.abs(p[i]) end
    end
    for i = 1, T * HD do
      assert.is_true(math.abs(acc[i] - fa[i]) <= 2 ^ -8 * am[i] + 1e-30,
                     string.format("element %d: shards %g, full %g", i, acc[i], fa[i]))
    end
  end)

  it("T = 0 and all tokens to one expert", function()
    local ex = experts("swiglu", false)
    local y = moe.fused_moe{ hidden = moe.empty({ 0, HD }, { dtype = "bf16", device = "cuda" }),
                             logits = moe.empty({ 0, E }, { device = "cuda" }), experts = ex.cuda, top_k = 2 }
    assert.same({ 0, HD }, y:shape())
    local T = 300
    local x = inputs(T, 601)
    local Lt = {}
    for t = 1, T do
      Lt[t] = {}
      for e = 1, E do Lt[t][e] = e == 6 and 8 or ((t * 0.31 + e * 0.17) % 1) end
    end
    local L = moe.tensor(Lt)
    local m = { method = "renormalize", top_k = 1 }
    local yc = call(ex, x, L, m, "cpu")
    local yg, rg = call(ex, x, L, m, "cuda")
    for _, row in ipairs(rg.ids:to("cpu"):totable()) do assert.equal(5, row[1]) end
    assert.is_true(rel_l2(yg, yc) <= 1e-2)
  end)

  it("routed ids out of range are skipped and counted on the device", function()
    local ex = experts("swiglu", false)
    local x = inputs(3, 700)
    local ids = moe.tensor({ { 0, 99 }, { -1, 3 }, { 2, 4 } }, { dtype = "i32", device = "cuda" })
    local w = moe.tensor({ { 0.5, 0.5 }, { 0.5, 0.5 }, { 0.5, 0.5 } }, { device = "cuda" })
    ex.cuda:check()
    local y = moe.fused_moe{ hidden = x:to("cuda"), experts = ex.cuda, routed = { ids = ids, weights = w } }
    local msg = H.error_of(function() ex.cuda:check() end)
    assert.is_truthy(msg and msg:find("2 routed ids out of range"), tostring(msg))
    assert.equal(0, ex.cuda:check())
    -- the valid pairs were computed: compare with the CPU on the valid ids only
    local ids_ok = moe.tensor({ { 0, 0 }, { 3, 3 }, { 2, 4 } }, { dtype = "i32" })
    local w_ok = moe.tensor({ { 0.5, 0 }, { 0, 0.5 }, { 0.5, 0.5 } })
    local yc = moe.fused_moe{ hidden = x, experts = ex.cpu, routed = { ids = ids_ok, weights = w_ok } }
    assert.is_true(rel_l2(y, yc) <= 1e-2)
  end)

  it("hidden or out one element off 16-byte alignment is refused on CUDA, bf16 and quantised; a copy works", function()
    local ex = experts("swiglu", false)
    local exq = moe.experts{ gate_up = moe.randn({ E, 2 * I, HD }, { dtype = "bf16", seed = 61, std = 0.05 }),
                             down = moe.randn({ E, HD, I }, { dtype = "bf16", seed = 62, std = 0.05 }),
                             quant = "mxfp4", device = "cuda" }
    local T = 200
    local x, L = inputs(T, 6100)
    local function off(t) -- a contiguous view of t's values one element into its storage
      local n = t:numel()
      local buf = moe.empty({ n + 1 }, { dtype = t:dtype(), device = "cuda" })
      local v = buf:narrow(1, 2, n):reshape(t:shape())
      v:copy_(t:to("cuda"))
      return v
    end
    local xo, Lg = off(x), L:to("cuda")
    for _, e in ipairs{ ex.cuda, exq } do
      local msg = H.error_of(moe.fused_moe, { hidden = xo, logits = Lg, experts = e, top_k = 2 })
      assert.is_truthy(msg and msg:find("hidden: expected CUDA data 16%-byte aligned .* offset 2 mod 16"), tostring(msg))
      msg = H.error_of(moe.fused_moe, { hidden = x:to("cuda"), logits = Lg, experts = e, top_k = 2,
                                         out = off(moe.zeros({ T, HD }, { dtype = "bf16" })) })
      assert.is_truthy(msg and msg:find("out: expected CUDA data 16%-byte aligned .* offset 2 mod 16"), tostring(msg))
      local y1 = moe.fused_moe{ hidden = xo:clone(), logits = Lg, experts = e, top_k = 2 }
      local y2 = moe.fused_moe{ hidden = x:to("cuda"), logits = Lg, experts = e, top_k = 2 }
      assert.same(y2:to("cpu"):to("f32"):totable(), y1:to("cpu"):to("f32"):totable())
    end
  end)

  it("H or I not a multiple of 128 is refused on CUDA", function()
    local e = H.error_of(moe.experts, { gate_up = moe.zeros({ 2, 128, 96 }, { dtype = "bf16" }),
                                        down = moe.zeros({ 2, 96, 64 }, { dtype = "bf16" }), device = "cuda" })
    assert.is_truthy(e and e:find("multiples of 128"), tostring(e))
  end)
end)

describe("#gpu moe.fused_moe under CUDA graphs", function()
  it("captures the whole call (routing included) and replays with new hidden and logits", function()
    local ex = experts("swiglu_oai", true)
    local T = 64
    local m = METHODS.deepseekv3
    local x = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
    local L = moe.empty({ T, E }, { device = "cuda" })
    local out = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
    local rep = moe.full({ T, m.top_k }, -1, { dtype = "i16", device = "cuda" })
    local b = rbias:to("cuda")
    local args = { hidden = x, logits = L, bias = b, experts = ex.cuda, method = m.method, top_k = m.top_k,
                   n_group = m.n_group, topk_group = m.topk_group, scale = m.scale, out = out, replay = rep }
    ex.cuda:reserve(T, m.top_k)
    -- a workspace too small cannot grow during capture: the error says so
    local small = moe.experts{ gate_up = moe.randn({ 2, 256, 128 }, { dtype = "bf16", device = "cuda", seed = 3 }),
                               down = moe.randn({ 2, 128, 128 }, { dtype = "bf16", device = "cuda", seed = 4 }) }
    local sx = moe.randn({ 1, 128 }, { dtype = "bf16", device = "cuda", seed = 5 })
    local sl = moe.randn({ 1, 2 }, { device = "cuda", seed = 6 })
    local so = moe.empty({ 1, 128 }, { dtype = "bf16", device = "cuda" })
    local e = H.error_of(moe.graph.capture, function()
      moe.fused_moe{ hidden = sx, logits = sl, experts = small, top_k = 2, out = so }
    end)
    assert.is_truthy(e and e:find("cannot grow during CUDA graph capture"), tostring(e))
    local g = moe.graph.capture(function() moe.fused_moe(args) end)
    for round = 1, 3 do
      local xh, Lh = inputs(T, 900 + round)
      x:copy_(xh:to("cuda"))
      L:copy_(Lh:to("cuda"))
      g:replay()
      moe.synchronize("cuda")
      local yc, rc = call(ex, xh, Lh, m, "cpu")
      local err = rel_l2(out, yc)
      assert.is_true(err <= 1e-2, "round " .. round .. ": relative L2 error " .. err)
      assert.same(rc.ids:totable(), rep:to("cpu"):totable())
    end
    g:free()
  end)
end)

describe("#gpu moe.fused_moe large-tile mma.sync path (MOE_FUSED_WGMMA=0)", function()
  local ffi = require("ffi")
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  for _, act in ipairs{ "swiglu", "relu2", "swiglu_oai" } do
    it(act .. " / renormalize / T=1000 agrees with the CPU and with the default path", function()
      local ex = experts(act, act == "swiglu_oai")
      local x, L = inputs(1000, 4242 + #act)
      local m = METHODS.renormalize
      local yc = call(ex, x, L, m, "cpu")
      local y1 = call(ex, x, L, m, "cuda")
      ffi.C.setenv("MOE_FUSED_WGMMA", "0", 1)
      local ok, y0 = pcall(call, ex, x, L, m, "cuda")
      ffi.C.unsetenv("MOE_FUSED_WGMMA")
      assert.is_true(ok, tostring(y0))
      assert.is_true(rel_l2(y0, yc) <= 1e-2, "mma.sync path: " .. rel_l2(y0, yc))
      assert.is_true(rel_l2(y1, yc) <= 1e-2, "default path: " .. rel_l2(y1, yc))
      assert.is_true(rel_l2(y0, y1) <= 1e-2)
    end)
  end
end)

describe("#gpu moe.fused_moe with programmatic dependent launch (MOE_FUSED_PDL=1; off by default)", function()
  local ffi = require("ffi")
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  for _, T in ipairs{ 1, 64, 1000 } do
    it("swiglu / deepseekv3 / T=" .. T .. " gives the same output as without PDL", function()
      local ex = experts("swiglu", false)
      local x, L = inputs(T, 5151 + T)
      local m = METHODS.deepseekv3
      local y1 = call(ex, x, L, m, "cuda")
      ffi.C.setenv("MOE_FUSED_PDL", "1", 1)
      local ok, y0 = pcall(call, ex, x, L, m, "cuda")
      ffi.C.unsetenv("MOE_FUSED_PDL")
      assert.is_true(ok, tostring(y0))
      assert.same(y1:to("cpu"):totable(), y0:to("cpu"):totable())
      local yc = call(ex, x, L, m, "cpu")
      assert.is_true(rel_l2(y0, yc) <= 1e-2)
    end)
  end
end)

describe("#gpu moe.fused_moe decode folds (forced on with MOE_FUSED_FOLD=2, off with 0)", function()
  local ffi = require("ffi")
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  -- the tile kernels' folds: the decode GEMV path (T <= 4 by default) is off here
  local gemv_prev
  before_each(function()
    gemv_prev = os.getenv("MOE_FUSED_GEMV")
    ffi.C.setenv("MOE_FUSED_GEMV", "0", 1)
  end)
  after_each(function()
    if gemv_prev then ffi.C.setenv("MOE_FUSED_GEMV", gemv_prev, 1) else ffi.C.unsetenv("MOE_FUSED_GEMV") end
  end)
  local function both(f)
    ffi.C.setenv("MOE_FUSED_FOLD", "2", 1)
    local ok1, y1 = pcall(f)
    ffi.C.unsetenv("MOE_FUSED_FOLD")
    assert.is_true(ok1, tostring(y1))
    ffi.C.setenv("MOE_FUSED_FOLD", "0", 1)
    local ok, y0 = pcall(f)
    ffi.C.unsetenv("MOE_FUSED_FOLD")
    assert.is_true(ok, tostring(y0))
    return y1, y0
  end
  for _, c in ipairs{ { 1, "deepseekv3" }, { 5, "renormalize" }, { 64, "deepseekv3" }, { 300, "llama4" },
                      { 180, "deepseekv3" } } do
    local T, mname = c[1], c[2]
    it(string.format("swiglu / %s / T=%d: same bits with and without the folds, twice in a row", mname, T), function()
      local ex = experts("swiglu", false)
      local x, L = inputs(T, 6161 + T)
      local m = METHODS[mname]
      local y1, y0 = both(function() return call(ex, x, L, m, "cuda") end)
      local t1 = y1:to("cpu"):totable()
      assert.same(t1, y0:to("cpu"):totable())
      ffi.C.setenv("MOE_FUSED_FOLD", "2", 1)
      local ok, y2 = pcall(call, ex, x, L, m, "cuda")
      ffi.C.unsetenv("MOE_FUSED_FOLD")
      assert.is_true(ok, tostring(y2))
      assert.same(t1, y2:to("cpu"):totable()) -- counters back at zero
      assert.same(t1, call(ex, x, L, m, "cuda"):to("cpu"):totable()) -- the default policy
      assert.is_true(rel_l2(y1, call(ex, x, L, m, "cpu")) <= 1e-2)
    end)
  end
  it("an expert shard with tokens that have no local pair: zeros there, same bits without the folds", function()
    local ex = experts("relu2", false)
    local T = 40
    local x, L = inputs(T, 7171)
    local m = METHODS.renormalize
    local more = { local_offset = 3, local_count = 2 }
    local y1, y0 = both(function() return call(ex, x, L, m, "cuda", more) end)
    assert.same(y1:to("cpu"):totable(), y0:to("cpu"):totable())
    assert.is_true(rel_l2(y1, call(ex, x, L, m, "cpu", more)) <= 1e-2)
  end)
end)

describe("#gpu moe.fused_moe warp-specialised wgmma kernel (default on sm_90a)", function()
  local ffi = require("ffi")
  local with_env = H.with_env -- f() with name=v, the previous value restored
  local function with(v, f) return with_env("MOE_FUSED_WGMMA", v, f) end
  for _, c in ipairs{ { "swiglu", 4000, "renormalize" }, { "relu2", 3000, "deepseekv3" }, { "geglu", 2500, "llama4" } } do
    local act, T, mname = c[1], c[2], c[3]
    it(string.format("%s / %s / T=%d (many tiles per CTA) agrees with the cp.async wgmma and mma.sync paths", act,
                     mname, T), function()
      local ex = experts(act, act == "geglu")
      local x, L = inputs(T, 8181 + T)
      local m = METHODS[mname]
      local y2 = call(ex, x, L, m, "cuda")
      local y1 = with("1", function() return call(ex, x, L, m, "cuda") end)
      local y0 = with("0", function() return call(ex, x, L, m, "cuda") end)
      local prev = os.getenv("MOE_FUSED_CLUSTER") -- both settings explicitly, then restored
      for _, v in ipairs{ "0", "1" } do
        ffi.C.setenv("MOE_FUSED_CLUSTER", v, 1)
        local okc, yc = pcall(call, ex, x, L, m, "cuda")
        if prev then ffi.C.setenv("MOE_FUSED_CLUSTER", prev, 1) else ffi.C.unsetenv("MOE_FUSED_CLUSTER") end
        assert.is_true(okc, tostring(yc))
        local e = rel_l2(y2, yc)
        assert.is_true(e <= 1e-5, "MOE_FUSED_CLUSTER=" .. v .. ": relative L2 " .. e)
      end
      -- A by cp.async gather instead of bulk tensor copy: the same shared tiles, the same bits
      local ya = with_env("MOE_FUSED_TMA_A", "0", function() return call(ex, x, L, m, "cuda") end)
      assert.same(y2:to("cpu"):totable(), ya:to("cpu"):totable())
      local e21, e20 = rel_l2(y2, y1), rel_l2(y2, y0)
      assert.is_true(e21 <= 1e-5, "vs cp.async wgmma: relative L2 " .. e21)
      assert.is_true(e20 <= 1e-2, "vs mma.sync: relative L2 " .. e20)
      assert.same(y2:to("cpu"):totable(), call(ex, x, L, m, "cuda"):to("cpu"):totable())
    end)
  end
  -- expert shards on the large path (P >= 48 * local_count): most pairs are not local, so
  -- sorted[] holds stale ids past the valid rows (the bigger calls above ran first); with one
  -- local expert and P = 80 the A box (128 rows) is taller than the whole [P, H] tensor
  for _, c in ipairs{ { 1000, 4, 4, "renormalize" }, { 40, 3, 1, "renormalize" }, { 700, 9, 2, "deepseekv3" } } do
    local T, lo, lc, mname = c[1], c[2], c[3], c[4]
    it(string.format("expert shard %d..%d / %s / T=%d on the large path, A by tensor copy and by cp.async", lo,
                     lo + lc - 1, mname, T), function()
      local ex = experts("swiglu", false)
      local x, L = inputs(T, 9191 + T)
      local m = METHODS[mname]
      local more = { local_offset = lo, local_count = lc }
      local yt = with_env("MOE_FUSED_TMA_A", "1", function() return call(ex, x, L, m, "cuda", more) end)
      local ya = with_env("MOE_FUSED_TMA_A", "0", function() return call(ex, x, L, m, "cuda", more) end)
      assert.same(yt:to("cpu"):totable(), ya:to("cpu"):totable())
      local e = rel_l2(yt, call(ex, x, L, m, "cpu", more))
      assert.is_true(e <= 1e-2, "relative L2 " .. e)
    end)
  end
end)

describe("#gpu moe.fused_moe decode GEMV path (T <= 4 by default; MOE_FUSED_GEMV=0 off, =N for T <= N)", function()
  local with = H.with_env -- f()'s results with the variable set to v (nil: unset), then restored
  local function gemv(v, f) return with("MOE_FUSED_GEMV", v, f) end
  local function check(yv, yt, yc, what)
    local ev, et, evt = rel_l2(yv, yc), rel_l2(yt, yc), rel_l2(yv, yt)
    assert.is_true(ev <= 1e-2, what .. ": GEMV vs CPU relative L2 " .. ev)
    assert.is_true(et <= 1e-2, what .. ": tile kernels vs CPU relative L2 " .. et)
    assert.is_true(evt <= 1e-2, what .. ": GEMV vs tile kernels relative L2 " .. evt)
  end

  for _, act in ipairs{ "swiglu", "geglu", "relu2", "swiglu_oai" } do
    for _, mname in ipairs{ "renormalize", "deepseekv3", "llama4" } do
      for _, T in ipairs{ 1, 2, 3, 4 } do
        it(string.format("%s / %s / T=%d: on (default) and off agree with the CPU; same bits again, with PDL",
                         act, mname, T), function()
          local ex = experts(act, act == "swiglu_oai")
          local x, L = inputs(T, 9100 + 17 * T + #act + #mname)
          local m = METHODS[mname]
          local yv = gemv(nil, function() return call(ex, x, L, m, "cuda") end)
          local yt = gemv("0", function() return call(ex, x, L, m, "cuda") end)
          check(yv, yt, call(ex, x, L, m, "cpu"), act .. "/" .. mname)
          local tv = yv:to("cpu"):totable()
          assert.same(tv, gemv("4", function() return call(ex, x, L, m, "cuda") end):to("cpu"):totable())
          local yp = gemv(nil, function()
            return with("MOE_FUSED_PDL", "1", function() return call(ex, x, L, m, "cuda") end)
          end)
          assert.same(tv, yp:to("cpu"):totable())
        end)
      end
    end
  end

  it("forced up to T = 64 (experts with many rows: several passes over their weights)", function()
    for _, c in ipairs{ { 5, "renormalize" }, { 16, "deepseekv3" }, { 64, "deepseekv3" }, { 40, "llama4" } } do
      local T, mname = c[1], c[2]
      local ex = experts("swiglu", false)
      local x, L = inputs(T, 9300 + T)
      local m = METHODS[mname]
      local yv = gemv("64", function() return call(ex, x, L, m, "cuda") end)
      local yt = gemv("0", function() return call(ex, x, L, m, "cuda") end)
      check(yv, yt, call(ex, x, L, m, "cpu"), mname .. " T=" .. T)
    end
  end)

  it("routed mode: bit for bit with the native call; repeated experts in a token; ids out of range counted", function()
    local ex = experts("geglu", false)
    local x, L = inputs(3, 9400)
    local m = METHODS.deepseekv3
    local y1, r = gemv(nil, function() return call(ex, x, L, m, "cuda") end)
    local y2 = gemv(nil, function() return moe.fused_moe{ hidden = x:to("cuda"), experts = ex.cuda, routed = r } end)
    assert.same(y1:to("cpu"):totable(), y2:to("cpu"):totable())
    -- expert 2 three times (twice in token 0; T = 2: passes of 2 rows), expert 7 twice at T = 1,
    -- expert 1 four times in 3 tokens at T = 4
    for _, c in ipairs{ { { { 2, 2 }, { 5, 2 } }, { { 0.25, 0.5 }, { 0.7, 0.3 } } },
                        { { { 7, 7 } }, { { 0.6, 0.4 } } },
                        { { { 1, 2 }, { 2, 3 }, { 3, 1 }, { 1, 1 } },
                          { { 0.5, 0.5 }, { 1, 2 }, { 0.1, 0.9 }, { 0.5, 0.5 } } } } do
      local T = #c[1]
      local xt = inputs(T, 9500 + T)
      local ids, w = moe.tensor(c[1], { dtype = "i32" }), moe.tensor(c[2])
      local yc = moe.fused_moe{ hidden = xt, experts = ex.cpu, routed = { ids = ids, weights = w } }
      local function run()
        return moe.fused_moe{ hidden = xt:to("cuda"), experts = ex.cuda,
                              routed = { ids = ids:to("cuda"), weights = w:to("cuda") } }
      end
      check(gemv(nil, run), gemv("0", run), yc, "repeated experts T=" .. T)
    end
    -- out of range: skipped, counted once
    local ids = moe.tensor({ { 0, 99 }, { -1, 3 } }, { dtype = "i32", device = "cuda" })
    local w = moe.tensor({ { 0.5, 0.5 }, { 0.5, 0.5 } }, { device = "cuda" })
    ex.cuda:check()
    local xt = inputs(2, 9600)
    local y = gemv(nil, function()
      return moe.fused_moe{ hidden = xt:to("cuda"), experts = ex.cuda, routed = { ids = ids, weights = w } }
    end)
    local msg = H.error_of(function() ex.cuda:check() end)
    assert.is_truthy(msg and msg:find("2 routed ids out of range"), tostring(msg))
    assert.equal(0, ex.cuda:check())
    local yc = moe.fused_moe{ hidden = xt, experts = ex.cpu,
                              routed = { ids = moe.tensor({ { 0, 0 }, { 3, 3 } }, { dtype = "i32" }),
                                         weights = moe.tensor({ { 0.5, 0 }, { 0, 0.5 } }) } }
    assert.is_true(rel_l2(y, yc) <= 1e-2)
  end)

  it("expert shards: tokens without a local pair get zeros; the shards sum to the full output", function()
    local ex = experts("relu2", false)
    local T = 4
    local x, L = inputs(T, 9700)
    local m = METHODS.renormalize
    local full = gemv(nil, function() return call(ex, x, L, m, "cuda") end):to("cpu"):to("f32")
    local fa = full:reshape({ T * HD }):totable()
    local acc, am = {}, {}
    for i = 1, T * HD do acc[i], am[i] = 0, math.abs(fa[i]) end
    local zero_rows = 0
    for s = 0, 7 do
      local more = { local_offset = 2 * s, local_count = 2 }
      local yg = gemv(nil, function() return call(ex, x, L, m, "cuda", more) end)
      local yt = gemv("0", function() return call(ex, x, L, m, "cuda", more) end)
      local yc = call(ex, x, L, m, "cpu", more)
      local tc = yc:to("f32"):totable()
      local tg = yg:to("cpu"):to("f32"):totable()
      local any = false
      for t = 1, T do
        local z = true
        for j = 1, HD do z = z and tc[t][j] == 0 end
        if z then
          zero_rows = zero_rows + 1
          for j = 1, HD do assert.equal(0, tg[t][j]) end
        else
          any = true
        end
      end
      if any then check(yg, yt, yc, "shard " .. s) end
      local p = yg:to("cpu"):to("f32"):reshape({ T * HD }):totable()
      for i = 1, T * HD do acc[i], am[i] = acc[i] + p[i], am[i] + math.abs(p[i]) end
    end
    assert.is_true(zero_rows > 0, "every token had a local pair in every shard: the zero case is not covered")
    for i = 1, T * HD do
      assert.is_true(math.abs(acc[i] - fa[i]) <= 2 ^ -8 * am[i] + 1e-30,
                     string.format("element %d: shards %g, full %g", i, acc[i], fa[i]))
    end
  end)

  it("captured in a CUDA graph at T = 1 and 3, replayed with new hidden and logits", function()
    local ex = experts("swiglu_oai", true)
    local m = METHODS.deepseekv3
    for _, T in ipairs{ 1, 3 } do
      local x = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
      local L = moe.empty({ T, E }, { device = "cuda" })
      local out = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
      local args = { hidden = x, logits = L, bias = rbias:to("cuda"), experts = ex.cuda, method = m.method,
                     top_k = m.top_k, n_group = m.n_group, topk_group = m.topk_group, scale = m.scale, out = out }
      ex.cuda:reserve(T, m.top_k)
      local g = gemv(nil, function() return moe.graph.capture(function() moe.fused_moe(args) end) end)
      for round = 1, 3 do
        local xh, Lh = inputs(T, 9800 + 10 * T + round)
        x:copy_(xh:to("cuda"))
        L:copy_(Lh:to("cuda"))
        g:replay()
        moe.synchronize("cuda")
        local err = rel_l2(out, call(ex, xh, Lh, m, "cpu"))
        assert.is_true(err <= 1e-2, "T=" .. T .. " round " .. round .. ": relative L2 error " .. err)
      end
      g:free()
    end
  end)
end)
