-- spec/fused_quant_gpu_spec.lua -- the fused MoE in every quantisation mode on CUDA against
-- the CPU reference (relative L2 <= 1e-3: same numerics, f32 accumulation order only), T in
-- {1, 5, 64, 300} (both tile configurations), deepseekv3 routing, relu2 + biases, llama4,
-- expert parallelism, routed-mode bit-exactness and replay, qtensor parts, T = 0, and CUDA
-- graph capture + replay with new inputs; the decode GEMV path of fp8 and fp8_block (T <= 4;
-- MOE_FUSED_QGEMV) on and off against the CPU and each other; prefill with >= 96 pairs per local
-- expert (past the Hopper wgmma kernels' default bounds of 32 and 64 (mxint4): T = 800..1600, skewed routing,
-- llama4, expert parallelism, biases, routed mode, graphs), every mode, with the wgmma kernels
-- on (default) and off (MOE_FUSED_QWGMMA=0) against the CPU and each other; the default GEMV
-- rule (MOE_FUSED_QGEMV unset) at T = 7 and 16 (T*K < E, = 2E); the register-operand tile kernel
-- below 48 (fp8 modes) / 64 (4-bit) pairs per expert, every mode (MOE_FUSED_QWREG on and off,
-- T = 60..240); the decode path's block-local activations (fp8, fp8_block, nvfp4; MOE_FUSED_QVLOC)
-- against the shared steps bit for bit; mxint4 on f16 MMAs (its scales folded into the weights;
-- MOE_FUSED_I4F16=0 off): the fold's range rule at its boundary, rows past f16's range, graphs.
-- Prints each mode's error against the bf16 output, and the wgmma kernels' difference from
-- the mma.sync ones.
-- Exits 77 without a CUDA device.
local H = require("spec.helper")
local moe = H.moe

local E, HD, I = 16, 384, 640
local MODES = { "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" }

local rel_l2 = H.rel_l2

local W = {}
local function weights(act, bias)
  local key = act .. tostring(bias)
  if W[key] then return W[key] end
  local N1 = act == "relu2" and I or 2 * I
  local w = {
    w13 = moe.randn({ E, N1, HD }, { dtype = "bf16", seed = #act * 7 + 1, std = 0.05 }),
    w2 = moe.randn({ E, HD, I }, { dtype = "bf16", seed = #act * 7 + 2, std = 0.05 }),
    b13 = bias and moe.randn({ E, N1 }, { seed = 5, std = 0.2 }) or nil,
    b2 = bias and moe.randn({ E, HD }, { seed = 6, std = 0.2 }) or nil,
    act = act, ex = {},
  }
  W[key] = w
  return w
end

local function experts(w, mode, dev)
  local k = mode .. dev
  if not w.ex[k] then
    w.ex[k] = moe.experts{ gate_up = w.w13, down = w.w2, bias_gate_up = w.b13, bias_down = w.b2,
                           activation = w.act, quant = mode, device = dev }
  end
  return w.ex[k]
end

local rbias = moe.randn({ E }, { seed = 9, std = 0.3 })
local METHODS = {
  renormalize = { method = "renormalize", top_k = 2 },
  deepseekv3 = { method = "deepseekv3", top_k = 4, n_group = 4, topk_group = 2, scale = 2.5 },
  llama4 = { method = "llama4", top_k = 1 },
}

-- mode / activation pairs with biases on both GEMMs: relu2 for fp8_block, nvfp4, mxint4, swiglu_oai for
-- fp8, mxfp4
local BIAS_CASES = { { "fp8_block", "relu2" }, { "fp8", "swiglu_oai" }, { "nvfp4", "relu2" },
                     { "mxfp4", "swiglu_oai" }, { "mxint4", "relu2" } }

local function inputs(T, seed)
  return moe.randn({ T, HD }, { dtype = "bf16", seed = seed }), moe.randn({ T, E }, { seed = seed + 1 })
end

local function call(ex, x, L, m, dev, more)
  local a = { hidden = x:to(dev), logits = L:to(dev), experts = ex, method = m.method, top_k = m.top_k,
              n_group = m.n_group, topk_group = m.topk_group, scale = m.scale,
              bias = m.method == "deepseekv3" and rbias:to(dev) or nil, return_routing = true }
  for k, v in pairs(more or {}) do a[k] = v end
  return moe.fused_moe(a)
end

local function bits(y) return y:to("cpu"):to("f32"):totable() end
local function qgemv(v, f) return H.with_env("MOE_FUSED_QGEMV", v, f) end

-- relative L2 of a against b at most 1e-3
local function near(a, b, what)
  local err = rel_l2(a, b)
  assert.is_true(err <= 1e-3, string.format("%s: relative L2 %.3g", what, err))
  return err
end

-- the kernel path (moe.fused_paths) that the one fused call made by f() took, and f's results
local function path_of(f)
  moe.fused_paths_reset()
  local r = { f() }
  local hit
  for name, n in pairs(moe.fused_paths(true)) do
    if n > 0 then
      assert.is_nil(hit, "more than one path counted: " .. tostring(hit) .. ", " .. name)
      assert.equal(1, n, name .. " counted " .. n .. " times for one call")
      hit = name
    end
  end
  return hit, unpack(r)
end
local HOPPER = moe.cuda_available() and moe.cuda_device_info(0):find("sm_90", 1, true) ~= nil
-- sm_90 and later: programmatic launches (the decode kernels' PDL and self-routing paths)
local SM90UP = moe.cuda_available() and (tonumber(moe.cuda_device_info(0):match("sm_(%d+)")) or 0) >= 90

-- w / mode on x, L (method m, call options more): the CPU once, CUDA with the variable env
-- unset (expecting path `default`) and "0" (expecting the tile kernels); each CUDA output and
-- routing against the CPU's, and the two against each other.  Returns the default's output, the
-- "0" one's, their relative L2 and the CPU routing.
local function env_on_off(env, default, w, mode, x, L, m, more, what)
  local yc, rc = call(experts(w, mode, "cpu"), x, L, m, "cpu", more)
  local ys = {}
  for i, v in ipairs{ false, "0" } do
    local path, y, r = path_of(function()
      return H.with_env(env, v or nil, function() return call(experts(w, mode, "cuda"), x, L, m, "cuda", more) end)
    end)
    assert.equal(v and "tile" or default, path, what .. ", " .. env .. " " .. (v or "unset") .. ": the path taken")
    assert.same(rc.ids:totable(), r.ids:to("cpu"):totable())
    near(y, yc, string.format("%s, %s %s: CUDA vs CPU", what, env, v or "unset"))
    ys[i] = y
  end
  local err = near(ys[1], ys[2], what .. ": default vs " .. env .. "=0")
  return ys[1], ys[2], err, rc
end

local report = {}

describe("#gpu quantised fused MoE: CUDA vs the CPU reference", function()
  for _, mode in ipairs(MODES) do
    for _, T in ipairs{ 1, 5, 64, 300 } do
      local mname = T == 300 and "deepseekv3" or "renormalize"
      it(mode .. " / swiglu / " .. mname .. " / T=" .. T, function()
        local w = weights("swiglu", false)
        local m = METHODS[mname]
        local x, L = inputs(T, 100 + T + #mode)
        local yc, rc = call(experts(w, mode, "cpu"), x, L, m, "cpu")
        local yg, rg = call(experts(w, mode, "cuda"), x, L, m, "cuda")
        assert.same(rc.ids:totable(), rg.ids:to("cpu"):totable())
        local err = rel_l2(yg, yc)
        assert.is_true(err <= 1e-3, mode .. " T=" .. T .. ": relative L2 CUDA vs CPU " .. err)
        if T == 300 then
          local yb = call(experts(w, "bf16", "cuda"), x, L, m, "cuda")
          report[#report + 1] = { mode, err, rel_l2(yg, yb) }
        end
      end)
    end
  end

  it("prints each mode's error (CUDA, T=300, deepseekv3 top-4)", function()
    assert.equal(#MODES, #report)
    print("\n  mode        rel L2 CUDA vs CPU   rel L2 vs bf16 output")
    for _, r in ipairs(report) do
      print(string.format("  %-10s  %18.2e   %21.3e", r[1], r[2], r[3]))
      assert.is_true(r[3] > 1e-3 and r[3] < 0.5, r[1] .. ": implausible error against bf16 " .. r[3])
    end
  end)

  it("H 512, I 256 (multiples of 256: every K-step size divides them), every mode, T=1 and 64", function()
    local w = {
      w13 = moe.randn({ 8, 512, 512 }, { dtype = "bf16", seed = 41, std = 0.05 }),
      w2 = moe.randn({ 8, 512, 256 }, { dtype = "bf16", seed = 42, std = 0.05 }),
      act = "swiglu", ex = {},
    }
    for _, mode in ipairs(MODES) do
      for _, T in ipairs{ 1, 64 } do
        local x = moe.randn({ T, 512 }, { dtype = "bf16", seed = 43 + T })
        local L = moe.randn({ T, 8 }, { seed = 44 + T })
        local yc = moe.fused_moe{ hidden = x, logits = L, experts = experts(w, mode, "cpu"), top_k = 2 }
        local yg = moe.fused_moe{ hidden = x:to("cuda"), logits = L:to("cuda"), experts = experts(w, mode, "cuda"),
                                  top_k = 2 }
        local err = rel_l2(yg, yc)
        assert.is_true(err <= 1e-3, mode .. " T=" .. T .. ": " .. err)
      end
    end
  end)

  it("fp8_block / relu2 with biases and nvfp4 / swiglu_oai with biases (T=300)", function()
    for _, c in ipairs{ { "fp8_block", "relu2" }, { "nvfp4", "swiglu_oai" } } do
      local w = weights(c[2], true)
      local x, L = inputs(300, 77)
      local yc = call(experts(w, c[1], "cpu"), x, L, METHODS.renormalize, "cpu")
      local yg = call(experts(w, c[1], "cuda"), x, L, METHODS.renormalize, "cuda")
      local err = rel_l2(yg, yc)
      assert.is_true(err <= 1e-3, c[1] .. "/" .. c[2] .. ": " .. err)
    end
  end)

  it("mxint4 / llama4 and fp8 / llama4 (T=64, T=600)", function()
    local w = weights("swiglu", false)
    for _, c in ipairs{ { "mxint4", 64 }, { "fp8", 600 } } do
      local x, L = inputs(c[2], 55)
      local yc = call(experts(w, c[1], "cpu"), x, L, METHODS.llama4, "cpu")
      local yg = call(experts(w, c[1], "cuda"), x, L, METHODS.llama4, "cuda")
      local err = rel_l2(yg, yc)
      assert.is_true(err <= 1e-3, c[1] .. " llama4: " .. err)
    end
  end)

  for _, mode in ipairs{ "fp8", "nvfp4", "fp8_block" } do
    it(mode .. ": expert parallelism (experts 4..11), T=64 and T=300", function()
      local w = weights("swiglu", false)
      for _, T in ipairs{ 64, 300 } do
        local x, L = inputs(T, 31 + T)
        local more = { local_offset = 4, local_count = 8 }
        local yc = call(experts(w, mode, "cpu"), x, L, METHODS.renormalize, "cpu", more)
        local yg = call(experts(w, mode, "cuda"), x, L, METHODS.renormalize, "cuda", more)
        local err = rel_l2(yg, yc)
        assert.is_true(err <= 1e-3, mode .. " EP T=" .. T .. ": " .. err)
      end
    end)
  end
end)

describe("#gpu quantised fused MoE: routed mode, replay, parts, T = 0", function()
  for _, mode in ipairs(MODES) do
    it(mode .. ": routed reproduces native bit for bit; replay holds the ids", function()
      local w = weights("swiglu", false)
      local ex = experts(w, mode, "cuda")
      local x, L = inputs(64, 7)
      local rep = moe.full({ 70, 2 }, -5, { dtype = "i16", device = "cuda" })
      local y, r = call(ex, x, L, METHODS.renormalize, "cuda", { replay = rep })
      local rep2 = moe.full({ 64, 2 }, -5, { dtype = "i16", device = "cuda" })
      local y2 = moe.fused_moe{ hidden = x:to("cuda"), experts = ex, replay = rep2,
                                routed = { ids = r.ids, weights = r.weights } }
      assert.same(y:to("cpu"):to("f32"):totable(), y2:to("cpu"):to("f32"):totable())
      local rt = rep:to("cpu"):totable()
      local ids = r.ids:to("cpu"):totable()
      for t = 1, 64 do assert.same(ids[t], rt[t]) end
      for t = 65, 70 do assert.same({ -5, -5 }, rt[t]) end
      assert.same(ids, rep2:to("cpu"):to("i32"):totable())
      -- a qtensor quantised on the device gives the same experts
      local exq = moe.experts{ gate_up = moe.quantize(w.w13:to("cuda"), mode),
                               down = moe.quantize(w.w2:to("cuda"), mode) }
      local y3 = call(exq, x, L, METHODS.renormalize, "cuda")
      assert.same(y:to("cpu"):to("f32"):totable(), y3:to("cpu"):to("f32"):totable())
      -- T = 0
      local y0 = moe.fused_moe{ hidden = moe.empty({ 0, HD }, { dtype = "bf16", device = "cuda" }),
                                logits = moe.empty({ 0, E }, { device = "cuda" }), experts = ex, top_k = 2 }
      assert.same({ 0, HD }, y0:shape())
    end)
  end

  -- CUDA's quantised path checks the routing arguments before leaving the routing to its own kernels
  -- (moe_fused_moe's route_pending): the errors of the CPU reference, which routes through moe_route,
  -- word for word, for T = 1 (the decode kernels route) and T = 3; no replay row is written.
  it("bad routing arguments: the CPU's errors at T = 1 and 3, replay untouched", function()
    local w = weights("swiglu", false)
    local bad = {
      { method = "deepseekv3", top_k = 2, n_group = 3, topk_group = 1 },
      { method = "renormalize", top_k = 2, bias = rbias },
      { method = "renormalize", top_k = 2, scale = 2.0 },
    }
    for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxint4" } do
      for _, T in ipairs{ 1, 3 } do
        local x, L = inputs(T, 9700 + T)
        for i, b in ipairs(bad) do
          local function go(dev)
            local rep = moe.full({ T, 2 }, -5, { dtype = "i16", device = dev })
            local a = { hidden = x:to(dev), logits = L:to(dev), experts = experts(w, mode, dev), replay = rep }
            for k, v in pairs(b) do a[k] = v end
            if b.bias then a.bias = b.bias:to(dev) end
            local ok, err = pcall(moe.fused_moe, a)
            return ok, err, rep:to("cpu"):totable()
          end
          local okc, errc = go("cpu")
          local okg, errg, repg = go("cuda")
          local what = mode .. " T=" .. T .. " case " .. i
          assert.is_false(okc, what .. ": the CPU accepted it")
          assert.is_false(okg, what .. ": CUDA accepted it")
          assert.truthy(tostring(errg):find("moe_route: ", 1, true), what .. ": " .. tostring(errg))
          assert.equal(tostring(errc):match("moe_route: .*$"), tostring(errg):match("moe_route: .*$"), what)
          for _, row in ipairs(repg) do assert.same({ -5, -5 }, row, what .. ": replay written") end
        end
      end
    end
  end)

  it("an all-zero input gives 0 (no NaN) in every mode", function()
    local w = weights("swiglu", false)
    local z = moe.zeros({ 5, HD }, { dtype = "bf16", device = "cuda" })
    local L = moe.randn({ 5, E }, { seed = 3, device = "cuda" })
    for _, mode in ipairs(MODES) do
      local y = moe.fused_moe{ hidden = z, logits = L, experts = experts(w, mode, "cuda"), top_k = 2 }
      for _, row in ipairs(y:to("cpu"):to("f32"):totable()) do
        for _, v in ipairs(row) do assert.equal(0, v) end
      end
    end
  end)
end)

-- Capture one call of experts w / mode at T (whichever path the settings choose at capture),
-- replay it with 3 new hidden and logits (seeds seed + round), each output checked against the
-- CPU (relative L2 <= 1e-3) and the replay buffer against the CPU's ids, then between(round);
-- at the end the first inputs once more.  Returns the bits of round 1 and of that last replay.
local function graph_rounds(w, mode, T, m, seed, between)
  local ex = experts(w, mode, "cuda")
  local x = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
  local L = moe.empty({ T, E }, { device = "cuda" })
  local out = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
  local rep = moe.full({ T, m.top_k }, -1, { dtype = "i16", device = "cuda" })
  local args = { hidden = x, logits = L, bias = rbias:to("cuda"), experts = ex, method = m.method, top_k = m.top_k,
                 n_group = m.n_group, topk_group = m.topk_group, scale = m.scale, out = out, replay = rep }
  ex:reserve(math.max(T, 64), m.top_k) -- between() may call it at T = 64: no regrowth under the graph
  local g = moe.graph.capture(function() moe.fused_moe(args) end)
  local function run(xh, Lh)
    x:copy_(xh:to("cuda"))
    L:copy_(Lh:to("cuda"))
    g:replay()
    moe.synchronize("cuda")
    return out:to("cpu"):to("f32"):totable()
  end
  local x1, L1 = inputs(T, seed + 1)
  local y1
  for round = 1, 3 do
    local xh, Lh = inputs(T, seed + round)
    local y = run(xh, Lh)
    y1 = y1 or y
    local yc, rc = call(experts(w, mode, "cpu"), xh, Lh, m, "cpu")
    local err = rel_l2(out, yc)
    assert.is_true(err <= 1e-3, "T=" .. T .. " round " .. round .. ": relative L2 error " .. err)
    assert.same(rc.ids:totable(), rep:to("cpu"):to("i32"):totable())
    if between then between(round) end
  end
  local again = run(x1, L1)
  g:free()
  return y1, again
end

describe("#gpu quantised fused MoE under CUDA graphs", function()
  for _, mode in ipairs{ "fp8_block", "nvfp4" } do
    it(mode .. ": captures the whole call and replays with new hidden and logits", function()
      graph_rounds(weights("swiglu", false), mode, 64, METHODS.deepseekv3, 900)
    end)
  end
end)

-- logits L (on the CPU) with offsets[e] added to the column of expert e (0-based)
local function skew(L, offsets)
  local t = L:totable()
  for _, row in ipairs(t) do
    for e, v in pairs(offsets) do row[e + 1] = row[e + 1] + v end
  end
  return moe.tensor(t)
end

-- pairs per expert (0-based) in the ids of a routing result
local function per_expert(r)
  local c = {}
  for e = 0, E - 1 do c[e] = 0 end
  for _, row in ipairs(r.ids:to("cpu"):totable()) do
    for _, e in ipairs(row) do c[e] = c[e] + 1 end
  end
  return c
end

describe("#gpu quantised fused MoE: prefill on Hopper wgmma, every mode (MOE_FUSED_QWGMMA; 0 = the mma.sync tile kernels)",
         function()
  -- The large tile configuration: P = T*K >= 96 pairs per local expert (E = 16: P >= 1536).
  -- MOE_FUSED_QWGMMA unset, every mode takes the wgmma kernels there on sm_90a (from 48 pairs
  -- per local expert, 64 for the 4-bit modes; =N: from N); "0" keeps the mma.sync tile kernels (the only path on other
  -- GPUs, where both settings must pass as well).
  local QMODES = MODES
  -- the default kernel there widens the weights in registers (path wgmma_rs) for fp8 and the 4-bit
  -- modes, and for fp8_block from H = 4096 (here H = 384: widened in shared memory, path wgmma);
  -- mxint4 on f16 MMAs (its scales folded into the weights: path wgmma_rs_i4f16), nvfp4 with x
  -- quantised once a token (wgmma_rs_xonce)
  local WGMMA_PATH = { fp8 = "wgmma_rs", fp8_block = "wgmma", nvfp4 = "wgmma_rs_xonce", mxfp4 = "wgmma_rs_xonce",
                       mxint4 = "wgmma_rs_i4f16" }
  local function qwgmma(v, f) return H.with_env("MOE_FUSED_QWGMMA", v, f) end
  -- env_on_off with MOE_FUSED_QWGMMA: the wgmma kernels by default on sm_90a
  local function both(w, mode, x, L, m, more, what)
    return env_on_off("MOE_FUSED_QWGMMA", HOPPER and WGMMA_PATH[mode] or "tile", w, mode, x, L, m, more, what)
  end
  -- T = 800 top-2 (P = 1600, 100 rows per expert on average) with experts 3 and 9 favoured
  -- (~200 and ~150 rows: two 128-row tiles)
  local function inputs800(seed)
    local x, L = inputs(800, seed)
    return x, skew(L, { [3] = 0.5, [9] = 0.25 })
  end

  for _, mode in ipairs(QMODES) do
    it(mode .. " / swiglu / renormalize / T=800 (experts spanning two row tiles): default and MOE_FUSED_QWGMMA=0 " ..
       "agree with the CPU and each other; same bits again", function()
      local w, m = weights("swiglu", false), METHODS.renormalize
      local x, L = inputs800(9200)
      local yd, _, err, rc = both(w, mode, x, L, m, nil, mode .. " T=800")
      local c, most = per_expert(rc), 0
      for e = 0, E - 1 do most = math.max(most, c[e]) end
      assert.is_true(most > 128, "no expert has more than one 128-row tile of pairs: " .. most)
      local again = qwgmma(nil, function() return call(experts(w, mode, "cuda"), x, L, m, "cuda") end)
      assert.same(bits(yd), bits(again))
      local dev = moe.cuda_available() and moe.cuda_device_info(0) or "no CUDA device"
      print(string.format("\n  %s T=800 on %s: default vs MOE_FUSED_QWGMMA=0 relative L2 %.3g%s", mode, dev, err,
                          err == 0 and " (the same bits)" or ""))
    end)
  end

  it("relu2 with biases (fp8_block, nvfp4, mxint4) and swiglu_oai with biases (fp8, mxfp4) (T=800)", function()
    for _, c in ipairs(BIAS_CASES) do
      local x, L = inputs(800, 9300)
      both(weights(c[2], true), c[1], x, L, METHODS.renormalize, nil, c[1] .. "/" .. c[2] .. " T=800")
    end
  end)

  for _, mode in ipairs(QMODES) do
    it(mode .. " / llama4 (top-1) / T=1600", function()
      local x, L = inputs(1600, 9400 + #mode)
      both(weights("swiglu", false), mode, x, L, METHODS.llama4, nil, mode .. " llama4 T=1600")
    end)

    it(mode .. ": expert parallelism (experts 4..11), T=1600", function()
      local x, L = inputs(1600, 9450 + #mode)
      both(weights("swiglu", false), mode, x, L, METHODS.renormalize, { local_offset = 4, local_count = 8 },
           mode .. " EP T=1600")
    end)

    it(mode .. ": skewed routing, T=900 (experts 0 and 1 +4 / +6 on the logits: ~T pairs each, the others " ..
       "a few / none)", function()
      for _, off in ipairs{ 4, 6 } do
        local x, L = inputs(900, 9500 + off)
        local _, _, _, rc = both(weights("swiglu", false), mode, x, skew(L, { [0] = off, [1] = off }),
                                 METHODS.renormalize, nil, mode .. " skewed +" .. off)
        local c = per_expert(rc)
        assert.is_true(c[0] > 6 * 128 and c[1] > 6 * 128, "experts 0 and 1: " .. c[0] .. ", " .. c[1] .. " pairs")
      end
    end)

    it(mode .. ": routed reproduces native bit for bit at T=800 (default and MOE_FUSED_QWGMMA=0)", function()
      local ex = experts(weights("swiglu", false), mode, "cuda")
      local x, L = inputs800(9600)
      for _, v in ipairs{ false, "0" } do
        qwgmma(v or nil, function()
          local y, r = call(ex, x, L, METHODS.renormalize, "cuda")
          local y2 = moe.fused_moe{ hidden = x:to("cuda"), experts = ex, routed = { ids = r.ids, weights = r.weights } }
          assert.same(bits(y), bits(y2))
        end)
      end
    end)
  end

  -- MOE_FUSED_FP8MMA=1: e4m3 straight into the FP8 tensor cores, whose summation keeps about 14
  -- bits (docs/quantization.md): not the reference's numerics, so a wider bound, and it must
  -- differ from the exact kernels on a Hopper GPU (a silent fallback to them would pass 1e-2 too)
  it("fp8 and fp8_block with MOE_FUSED_FP8MMA=1 (FP8 tensor cores): within 1e-2 of the CPU, not the exact bits",
     function()
    for _, mode in ipairs{ "fp8", "fp8_block" } do
      local w, m = weights("swiglu", false), METHODS.renormalize
      local x, L = inputs800(9800)
      local yc = call(experts(w, mode, "cpu"), x, L, m, "cpu")
      local ye = qwgmma(nil, function() return call(experts(w, mode, "cuda"), x, L, m, "cuda") end)
      local yf = H.with_env("MOE_FUSED_FP8MMA", "1", function()
        return qwgmma(nil, function() return call(experts(w, mode, "cuda"), x, L, m, "cuda") end)
      end)
      local ef, ee = rel_l2(yf, yc), rel_l2(ye, yc)
      print(string.format("\n  %s T=800: relative L2 vs CPU, exact %.2e, FP8 tensor cores %.2e", mode, ee, ef))
      assert.is_true(ef <= 1e-2, mode .. ": FP8 tensor cores vs CPU " .. ef)
      if moe.cuda_device_info():find("sm_90", 1, true) then
        assert.is_true(ef > ee, mode .. ": FP8 tensor-core path gave the exact kernels' error " .. ef)
      end
    end
  end)

  -- The Hopper kernels of every mode: k_qg_rs (MOE_FUSED_QRS=1; the 4-bit modes' default: the
  -- weights widened in registers as wgmma's A operand, the tokens in RS / RS8 order) and
  -- k_qg_exact (MOE_FUSED_QRS=0: widened in shared memory). Both within the CPU tolerance on gated,
  -- relu2 + biases, swiglu_oai + biases with llama4 routing, and expert-parallel calls (their bits
  -- may agree: the two feed the same products to the MMAs in the same k16 steps);
  -- moe.fused_paths tells which ran.
  -- {activation, biases, method, call options, T}: gated, relu2 + biases, swiglu_oai + biases with
  -- llama4 routing, expert parallelism
  local RS_CASES = {
    { "swiglu", false, METHODS.renormalize, nil, 800 },
    { "relu2", true, METHODS.renormalize, nil, 800 },
    { "swiglu_oai", true, METHODS.llama4, nil, 1600 },
    { "swiglu", false, METHODS.renormalize, { local_offset = 4, local_count = 8 }, 1600 },
  }
  for _, mode in ipairs(MODES) do
    it(mode .. ": k_qg_rs (MOE_FUSED_QRS=1) and k_qg_exact (=0) agree with the CPU (swiglu, relu2 + biases, " ..
       "swiglu_oai + biases / llama4, EP)", function()
      for i, c in ipairs(RS_CASES) do
        local what = string.format("%s %s%s T=%d%s", mode, c[1], c[2] and "+bias" or "", c[5], c[4] and " EP" or "")
        local w = weights(c[1], c[2])
        local x, L = inputs(c[5], 9900 + 10 * i + #mode)
        local yc = call(experts(w, mode, "cpu"), x, L, c[3], "cpu", c[4])
        local ys = {}
        -- mxint4 also on k_qg_rs without the f16 fold (MOE_FUSED_I4F16=0: per-32 promotions)
        local settings = mode == "mxint4" and { { "1" }, { "0" }, { "1", "0" } } or { { "1" }, { "0" } }
        for j, v in ipairs(settings) do
          local path, y = path_of(function()
            return H.with_env("MOE_FUSED_QRS", v[1], function()
              return H.with_env("MOE_FUSED_I4F16", v[2], function()
                return qwgmma(nil, function() return call(experts(w, mode, "cuda"), x, L, c[3], "cuda", c[4]) end)
              end)
            end)
          end)
          local want = v[1] == "0" and "wgmma" or (mode == "mxint4" and not v[2]) and "wgmma_rs_i4f16"
                       or mode == "fp8" and "wgmma_rs" or "wgmma_rs_xonce"
          assert.equal(HOPPER and want or "tile", path, what .. ": the path taken")
          near(y, yc, what .. ", MOE_FUSED_QRS " .. v[1] .. (v[2] and ", MOE_FUSED_I4F16 0" or "") .. ": CUDA vs CPU")
          ys[j] = y
        end
        local d = near(ys[1], ys[2], what .. ": k_qg_rs vs k_qg_exact")
        print(string.format("\n  %s: k_qg_rs vs k_qg_exact relative L2 %.3g", what, d))
        if ys[3] then
          print(string.format("  %s: k_qg_rs f16 fold vs per-32 promotions relative L2 %.3g", what,
                              near(ys[1], ys[3], what .. ": f16 fold vs per-32")))
        end
      end
    end)
  end

  -- nvfp4 and fp8_block on k_qg_rs quantise x once a token after the align and write the widened
  -- rows to each of the token's local pairs (k_qr_nvfp4_x / k_qr_fb_x, path wgmma_rs_xonce);
  -- MOE_FUSED_NVX=0 / MOE_FUSED_FBX=0 quantise x first and widen it once a pair (path wgmma_rs).
  -- The same codes, so the same bits; both near the CPU.  Gated, relu2 + biases, llama4 top-1,
  -- expert parallelism (pairs of other ranks skipped), a call after one whose x was 1000x larger
  -- (nvfp4: x's amax taken afresh: a stale amax would coarsen every code), and an x made of the
  -- format's ties (ties_x).  fp8_block runs k_qg_rs at this H with MOE_FUSED_QRS=1.
  -- ties_x nvfp4: |x| <= 2688 with 2688 in every row, so the global scale is 1 exactly; in each row
  -- a 16-column block of amax 6 x 2^j (block scale 2^j) holding every e2m1 tie and the saturation
  -- point, both signs, times 2^j; a block of tiny values (its scale code 0: every code +0, the
  -- negative values too); a block of zeros and negative zeros; the rest random.
  -- ties_x fp8_block: a 128-column block of amax 448 x 2^j (scale 2^j) holding e4m3 ties (normal
  -- and subnormal, both signs) times 2^j, a block of zeros and negative zeros, a random block.
  local function ties_x(mode, T, seed)
    local t = moe.randn({ T, HD }, { seed = seed }):totable()
    local ties = mode == "nvfp4" and { 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6 }
                 or { 1.0625, 1.1875, 2.125, 3.875, 0.0029296875, 0.0048828125, 27, 304 }
    for r = 1, T do
      local row, j = t[r], (r - 1) % 4
      if mode == "nvfp4" then
        row[1] = r % 2 == 0 and 2688 or -2688
        for c = 1, 16 do
          row[16 + c] = ties[(c - 1) % 8 + 1] * 2 ^ j * (c > 8 and -1 or 1)
          row[32 + c] = row[32 + c] * 2 ^ -14
          row[48 + c] = c % 2 == 0 and -0.0 or 0.0
        end
      else
        row[1] = (r % 2 == 0 and 448 or -448) * 2 ^ j
        for c = 2, 128 do
          row[c] = ties[(c - 1) % 8 + 1] * 2 ^ j * (c % 3 == 0 and -1 or 1)
          row[128 + c] = c % 2 == 0 and -0.0 or 0.0
        end
        row[129] = 0.0
      end
    end
    return moe.tensor(t, { dtype = "bf16" })
  end
  -- mxfp4 and mxint4 (f16 fold, and per-32 promotions) likewise make x's RS-order rows once a token
  -- (k_qr_xonce; MOE_FUSED_MXX=0: once a pair, k_qr_permute).  Each entry: mode, variable, ties
  -- label (none: no ties case), MOE_FUSED_QRS, MOE_FUSED_I4F16, the paths taken (default, "0").
  local XONCE = { { "nvfp4", "MOE_FUSED_NVX", "e2m1 ties" }, { "fp8_block", "MOE_FUSED_FBX", "e4m3 ties", "1" },
                  { "mxfp4", "MOE_FUSED_MXX" },
                  { "mxint4", "MOE_FUSED_MXX", nil, nil, nil, { "wgmma_rs_i4f16", "wgmma_rs_i4f16" } },
                  { "mxint4", "MOE_FUSED_MXX", nil, nil, "0" } }
  for _, m in ipairs(XONCE) do
    local mode, var = m[1], m[2]
    local paths = m[6] or { "wgmma_rs_xonce", "wgmma_rs" }
    it(mode .. (m[5] and " (MOE_FUSED_I4F16=0)" or "") .. " on k_qg_rs: x made once a token (default) and once a " ..
       "pair (" .. var .. "=0) give the same bits (swiglu, relu2 + biases, llama4, EP, after a larger x" ..
       (m[3] and ", " .. m[3] or "") .. ")", function()
      local cases = { unpack(RS_CASES) }
      cases[#cases + 1] = { "swiglu", false, METHODS.deepseekv3, nil, 800, 1000 } -- after a 1000x larger x
      if m[3] then cases[#cases + 1] = { "swiglu", false, METHODS.renormalize, nil, 800, nil, true } end -- ties
      for i, c in ipairs(cases) do
        local what = string.format("%s %s%s T=%d%s%s%s", mode, c[1], c[2] and "+bias" or "", c[5], c[4] and " EP" or "",
                                   c[6] and " after a 1000x x" or "", c[7] and " x of " .. m[3] or "")
        local w = weights(c[1], c[2])
        local x, L = inputs(c[5], 10100 + 10 * i)
        if c[7] then x = ties_x(mode, c[5], 10105 + 10 * i) end
        local yc = call(experts(w, mode, "cpu"), x, L, c[3], "cpu", c[4])
        local ys = {}
        for j, v in ipairs{ false, "0" } do
          local path, y = path_of(function()
            return H.with_env(var, v or nil, function()
              return H.with_env("MOE_FUSED_QRS", m[4], function()
                return H.with_env("MOE_FUSED_I4F16", m[5], function()
                  return qwgmma(nil, function()
                    local ex = experts(w, mode, "cuda")
                    if c[6] then -- the larger x first, on the same path and workspace
                      call(ex, moe.axpby(c[6], x, 0, moe.zeros({ c[5], HD }, { dtype = "bf16" })), L, c[3], "cuda",
                           c[4])
                      moe.fused_paths_reset()
                    end
                    return call(ex, x, L, c[3], "cuda", c[4])
                  end)
                end)
              end)
            end)
          end)
          assert.equal(HOPPER and paths[j] or "tile", path,
                       what .. ", " .. var .. " " .. (v or "unset") .. ": the path taken")
          near(y, yc, what .. ", " .. var .. " " .. (v or "unset") .. ": CUDA vs CPU")
          ys[j] = y
        end
        assert.same(bits(ys[2]), bits(ys[1]), what .. ": once a token vs once a pair")
      end
    end)
  end

  -- fp8_block on k_qg_rs (MOE_FUSED_QRS=1 at this H): the two consumer warpgroups take turns
  -- issuing each 128-column block's MMAs (ping-pong); MOE_FUSED_FBPP=0 lets them issue in step.
  -- The same products and promotions in the same order, so the same bits: swiglu, relu2 + biases,
  -- llama4, EP (an expert's last tile holding 1-127 rows), an x of e4m3 ties; near the CPU.
  it("fp8_block on k_qg_rs: ping-pong turns (default) and MMAs in step (MOE_FUSED_FBPP=0) give the same " ..
     "bits (swiglu, relu2 + biases, llama4, EP, e4m3 ties)", function()
    local cases = { unpack(RS_CASES) }
    cases[#cases + 1] = { "swiglu", false, METHODS.renormalize, nil, 800, nil, true }
    for i, c in ipairs(cases) do
      local what = string.format("fp8_block %s%s T=%d%s%s", c[1], c[2] and "+bias" or "", c[5], c[4] and " EP" or "",
                                 c[7] and " x of e4m3 ties" or "")
      local w = weights(c[1], c[2])
      local x, L = inputs(c[5], 10500 + 10 * i)
      if c[7] then x = ties_x("fp8_block", c[5], 10505 + 10 * i) end
      local yc = call(experts(w, "fp8_block", "cpu"), x, L, c[3], "cpu", c[4])
      local ys = {}
      for j, v in ipairs{ false, "0" } do
        local path, y = path_of(function()
          return H.with_env("MOE_FUSED_FBPP", v or nil, function()
            return H.with_env("MOE_FUSED_QRS", "1", function()
              return qwgmma(nil, function() return call(experts(w, "fp8_block", "cuda"), x, L, c[3], "cuda", c[4]) end)
            end)
          end)
        end)
        assert.equal(HOPPER and "wgmma_rs_xonce" or "tile", path, what .. ": the path taken")
        near(y, yc, what .. ", MOE_FUSED_FBPP " .. (v or "unset") .. ": CUDA vs CPU")
        ys[j] = y
      end
      assert.same(bits(ys[2]), bits(ys[1]), what .. ": ping-pong vs in step")
    end
  end)

  -- qtensor parts may start anywhere: gate/up scales one element off any word alignment (nvfp4,
  -- mxfp4: 1 byte, mxint4: 2) are copied aligned when the experts are made (k_qg_rs loads a row's
  -- scales of a stage as one word), so they run on k_qg_rs with the same bits as aligned ones
  for _, mode in ipairs{ "nvfp4", "mxfp4", "mxint4" } do
    it(mode .. " with its gate/up scales one element off 4-byte alignment (qtensor parts): the same bits as " ..
       "aligned ones, near the CPU", function()
      local w = weights("swiglu", false)
      local q13 = moe.quantize(w.w13:to("cuda"), mode)
      local n = q13.scales:numel()
      local buf = moe.empty({ n + 1 }, { dtype = q13.scales:dtype(), device = "cuda" })
      local sc = buf:narrow(1, 2, n):reshape(q13.scales:shape())
      sc:copy_(q13.scales)
      local ex = moe.experts{ gate_up = moe.quant_from_parts{ mode = mode, data = q13.data, scales = sc,
                                                              global_scale = q13.global_scale },
                              down = moe.quantize(w.w2:to("cuda"), mode) }
      local x, L = inputs800(10300)
      local path, y = path_of(function()
        return qwgmma(nil, function() return call(ex, x, L, METHODS.renormalize, "cuda") end)
      end)
      local want = mode == "mxint4" and "wgmma_rs_i4f16" or "wgmma_rs_xonce"
      assert.equal(HOPPER and want or "tile", path, "the path taken")
      local ya = qwgmma(nil, function() return call(experts(w, mode, "cuda"), x, L, METHODS.renormalize, "cuda") end)
      assert.same(bits(ya), bits(y))
      near(y, call(experts(w, mode, "cpu"), x, L, METHODS.renormalize, "cpu"), mode .. ", scales one element off: " ..
           "CUDA vs CPU")
    end)
  end

  -- mxfp4 on k_qg_rs folds its ue8m0 scale into the widening (one bf16 multiply a pair) where every
  -- scale of the experts is at most 2 (codes <= 128); MOE_FUSED_MXS=0 keeps the two multiplies.  The
  -- same bits; experts with larger scales (weights x 1024) run the two multiplies, near the CPU (the
  -- folded widening would overflow their scales)
  it("mxfp4 on k_qg_rs: the scale folded into the widening (default) and not (MOE_FUSED_MXS=0) give the same bits; " ..
     "scales above 2 unfolded, near the CPU", function()
    local w = weights("relu2", true)
    local x, L = inputs800(10600)
    local yc = call(experts(w, "mxfp4", "cpu"), x, L, METHODS.renormalize, "cpu")
    local ys = {}
    for j, v in ipairs{ false, "0" } do
      local path, y = path_of(function()
        return H.with_env("MOE_FUSED_MXS", v or nil, function()
          return qwgmma(nil, function() return call(experts(w, "mxfp4", "cuda"), x, L, METHODS.renormalize, "cuda") end)
        end)
      end)
      assert.equal(HOPPER and "wgmma_rs_xonce" or "tile", path, "MOE_FUSED_MXS " .. (v or "unset") .. ": the path taken")
      near(y, yc, "mxfp4, MOE_FUSED_MXS " .. (v or "unset") .. ": CUDA vs CPU")
      ys[j] = y
    end
    assert.same(bits(ys[2]), bits(ys[1]), "mxfp4: folded vs two multiplies")
    local w13b = moe.randn({ E, I, HD }, { dtype = "bf16", seed = 10601, std = 50 })
    local big = {}
    for _, dev in ipairs{ "cpu", "cuda" } do
      big[dev] = moe.experts{ gate_up = w13b, down = w.w2, bias_gate_up = w.b13, bias_down = w.b2, activation = "relu2",
                              quant = "mxfp4", device = dev }
    end
    local top = 0
    for _, e in ipairs(moe.quantize(w13b, "mxfp4").scales:totable()) do
      for _, r in ipairs(e) do for _, v in ipairs(r) do top = math.max(top, v) end end
    end
    assert.is_true(top > 2, "the large experts' largest scale: " .. top)
    local yb = qwgmma(nil, function() return call(big.cuda, x, L, METHODS.renormalize, "cuda") end)
    near(yb, call(big.cpu, x, L, METHODS.renormalize, "cpu"), "mxfp4, scales above 2: CUDA vs CPU")
  end)

  -- k_qg_rs's 4-bit weight codes come by tensor copy with the 32-byte swizzle (conflict-free
  -- shared loads); MOE_FUSED_QSW=0 copies them unswizzled.  Only the shared-memory layout differs:
  -- the same bits, gated (gate / up rows interleaved in a tile) and relu2 + biases, each near the CPU
  for _, c in ipairs{ { "nvfp4", "swiglu" }, { "mxfp4", "relu2" }, { "mxint4", "swiglu" },
                      { "mxint4", "swiglu", "per-32 promotions (MOE_FUSED_I4F16=0)" } } do
    it(c[1] .. " " .. c[2] .. (c[3] and ", " .. c[3] or "") .. " on k_qg_rs: the 32-byte swizzled weight codes " ..
       "(default) and unswizzled ones (MOE_FUSED_QSW=0) give the same bits, near the CPU", function()
      local w = weights(c[2], c[2] == "relu2")
      local x, L = inputs800(10400 + #c)
      local yc = call(experts(w, c[1], "cpu"), x, L, METHODS.renormalize, "cpu")
      local ys = {}
      for j, v in ipairs{ false, "0" } do
        local path, y = path_of(function()
          return H.with_env("MOE_FUSED_I4F16", c[3] and "0" or nil, function()
            return H.with_env("MOE_FUSED_QSW", v or nil, function()
              return qwgmma(nil, function() return call(experts(w, c[1], "cuda"), x, L, METHODS.renormalize, "cuda") end)
            end)
          end)
        end)
        local want = c[1] == "mxint4" and not c[3] and "wgmma_rs_i4f16" or "wgmma_rs_xonce"
        assert.equal(HOPPER and want or "tile", path, "MOE_FUSED_QSW " .. (v or "unset") .. ": the path taken")
        near(y, yc, c[1] .. ", MOE_FUSED_QSW " .. (v or "unset") .. ": CUDA vs CPU")
        ys[j] = y
      end
      assert.same(bits(ys[2]), bits(ys[1]), c[1] .. ": swizzled vs unswizzled codes")
    end)
  end

  -- fp8_block's default kernel follows H: k_qg_rs from H = 4096 (measured faster there), k_qg_exact
  -- below (the H = 384 cases above); both against the CPU at H = 4096
  it("fp8_block at H = 4096: k_qg_rs by default, k_qg_exact with MOE_FUSED_QRS=0, both near the CPU", function()
    local e4, h4, i4 = 8, 4096, 128
    local ex = {}
    for _, dev in ipairs{ "cpu", "cuda" } do
      ex[dev] = moe.experts{ gate_up = moe.randn({ e4, 2 * i4, h4 }, { dtype = "bf16", seed = 41, std = 0.02 }),
                             down = moe.randn({ e4, h4, i4 }, { dtype = "bf16", seed = 42, std = 0.02 }),
                             activation = "swiglu", quant = "fp8_block", device = dev }
    end
    local x = moe.randn({ 256, h4 }, { dtype = "bf16", seed = 43 })
    local L = moe.randn({ 256, e4 }, { seed = 44 })
    local function run(dev)
      return moe.fused_moe{ hidden = x:to(dev), logits = L:to(dev), experts = ex[dev], method = "renormalize",
                            top_k = 2 }
    end
    local yc = run("cpu")
    for _, v in ipairs{ false, "0" } do
      local path, y = path_of(function()
        return H.with_env("MOE_FUSED_QRS", v or nil, function() return qwgmma(nil, function() return run("cuda") end) end)
      end)
      assert.equal(HOPPER and (v and "wgmma" or "wgmma_rs_xonce") or "tile", path, "MOE_FUSED_QRS " .. (v or "unset"))
      near(y, yc, "fp8_block H=4096, MOE_FUSED_QRS " .. (v or "unset") .. ": CUDA vs CPU")
    end
  end)

  for _, c in ipairs{ { "fp8_block" }, { "fp8_block", "1" }, { "fp8", "1" }, { "nvfp4" }, { "mxint4" } } do
    local mode, qrs = c[1], c[2]
    it(mode .. (qrs and " (MOE_FUSED_QRS=" .. qrs .. ")" or "") .. ": captured at T=800 (deepseekv3 top-4, " ..
       "P = 3200), replayed with new hidden and logits; the first inputs again give the same bits", function()
      local y1, again = H.with_env("MOE_FUSED_QRS", qrs, function()
        return qwgmma(nil, function()
          return graph_rounds(weights("swiglu", false), mode, 800, METHODS.deepseekv3, 9700)
        end)
      end)
      assert.same(y1, again)
    end)
  end
end)

describe("#gpu quantised fused MoE: register-operand tile kernel at a few rows per expert (MOE_FUSED_QWREG; " ..
         "0 = the shared-memory tile kernels)", function()
  -- Every mode below 48 pairs per local expert (4-bit: 64; past the GEMV path's T): the weights
  -- widened in registers (k_wreg, 32-row tiles) by default, k_gemm's tiles with
  -- MOE_FUSED_QWREG=0; both against the CPU and each other.
  local RMODES = MODES
  -- env_on_off with MOE_FUSED_QWREG: k_wreg by default (mxint4 on f16 MMAs); its output and the CPU routing
  local function both(w, mode, x, L, m, more, what)
    local y, _, _, rc = env_on_off("MOE_FUSED_QWREG", mode == "mxint4" and "wreg_i4f16" or "wreg", w, mode, x, L, m,
                                   more, what)
    return y, rc
  end

  for _, mode in ipairs(RMODES) do
    it(mode .. " / swiglu / T=100 top-2 (12 pairs per expert; expert 5 favoured past one 32-row tile), " ..
       "same bits again, routed mode bit for bit", function()
      local w, m = weights("swiglu", false), METHODS.renormalize
      local x, L = inputs(100, 9700 + #mode)
      L = skew(L, { [5] = 1.5 })
      local y, rc = both(w, mode, x, L, m, nil, mode .. " T=100")
      assert.is_true(per_expert(rc)[5] > 32, "expert 5: " .. per_expert(rc)[5] .. " pairs")
      local ex = experts(w, mode, "cuda")
      local again, r = call(ex, x, L, m, "cuda")
      assert.same(bits(y), bits(again))
      local y2 = moe.fused_moe{ hidden = x:to("cuda"), experts = ex, routed = { ids = r.ids, weights = r.weights } }
      assert.same(bits(y), bits(y2))
    end)

    it(mode .. ": llama4 (top-1, T=150), expert parallelism (experts 4..11, T=64), deepseekv3 top-4 (T=60), " ..
       "renormalize T=240 (30 pairs per expert)", function()
      local w = weights("swiglu", false)
      local x0, L0 = inputs(240, 9740 + #mode)
      both(w, mode, x0, L0, METHODS.renormalize, nil, mode .. " T=240")
      local x, L = inputs(150, 9750 + #mode)
      both(w, mode, x, L, METHODS.llama4, nil, mode .. " llama4 T=150")
      x, L = inputs(64, 9760 + #mode)
      both(w, mode, x, L, METHODS.renormalize, { local_offset = 4, local_count = 8 }, mode .. " EP T=64")
      x, L = inputs(60, 9770 + #mode)
      both(w, mode, x, L, METHODS.deepseekv3, nil, mode .. " deepseekv3 T=60")
    end)
  end

  it("relu2 with biases (fp8_block, nvfp4, mxint4) and swiglu_oai with biases (fp8, mxfp4) (T=90)", function()
    for _, c in ipairs(BIAS_CASES) do
      local x, L = inputs(90, 9800)
      both(weights(c[2], true), c[1], x, L, METHODS.renormalize, nil, c[1] .. "/" .. c[2] .. " T=90")
    end
  end)

  it("qtensor parts whose codes start 1 byte off 16-byte alignment are refused (the kernels load vectors); " ..
     "an aligned copy works", function()
    local w = weights("swiglu", false)
    for _, mode in ipairs{ "fp8", "fp8_block" } do
      local q13 = moe.quantize(w.w13:to("cuda"), mode)
      local n = q13.data:numel()
      local buf = moe.empty({ n + 1 }, { dtype = q13.data:dtype(), device = "cuda" })
      local codes = buf:narrow(1, 2, n):reshape(q13.data:shape())
      codes:copy_(q13.data)
      local down = moe.quantize(w.w2:to("cuda"), mode)
      local ok, err = pcall(moe.experts, { gate_up = moe.quant_from_parts{ mode = mode, data = codes, scales = q13.scales },
                                           down = down })
      assert.is_false(ok)
      assert.matches("gate_up: expected CUDA codes 16%-byte aligned .* got codes at offset 1 mod 16", tostring(err))
      local ex = moe.experts{ gate_up = moe.quant_from_parts{ mode = mode, data = codes:clone(), scales = q13.scales },
                              down = down }
      local x, L = inputs(64, 9900)
      near(call(ex, x, L, METHODS.renormalize, "cuda"), call(experts(w, mode, "cpu"), x, L, METHODS.renormalize, "cpu"),
           mode .. " parts copied to aligned storage: CUDA vs CPU")
    end
  end)

  it("fp8, mxfp4 and mxint4 under a CUDA graph (T=64, deepseekv3 top-4: 16 pairs per expert)", function()
    for _, mode in ipairs{ "fp8", "mxfp4", "mxint4" } do graph_rounds(weights("swiglu", false), mode, 64, METHODS.deepseekv3, 990) end
  end)
end)

describe("#gpu quantised fused MoE: decode GEMV path (every mode; T <= 4; MOE_FUSED_QGEMV=0 off, =N for T <= N)",
         function()
  -- path on (default) and off against the CPU and each other: the quantised activations are the
  -- same codes, only the f32 summation order differs
  local function check(yv, yt, yc, what)
    for _, c in ipairs{ { yv, yc, "GEMV vs CPU" }, { yt, yc, "tile kernels vs CPU" }, { yv, yt, "GEMV vs tiles" } } do
      local err = rel_l2(c[1], c[2])
      assert.is_true(err <= 1e-3, string.format("%s: %s, relative L2 %.3g", what, c[3], err))
    end
  end
  local function on_off(ex, x, L, m, more, what)
    local yv, rv = qgemv(nil, function() return call(experts(ex, ex.mode, "cuda"), x, L, m, "cuda", more) end)
    local yt = qgemv("0", function() return call(experts(ex, ex.mode, "cuda"), x, L, m, "cuda", more) end)
    local yc, rc = call(experts(ex, ex.mode, "cpu"), x, L, m, "cpu", more)
    assert.same(rc.ids:totable(), rv.ids:to("cpu"):totable())
    check(yv, yt, yc, what)
    return yv, rv
  end
  local function mw(act, bias, mode) -- weights() with the mode to run, for on_off
    local w = weights(act, bias)
    return setmetatable({ mode = mode }, { __index = w })
  end

  for _, mode in ipairs(MODES) do
    for _, T in ipairs{ 1, 2, 3, 4 } do
      it(mode .. " / swiglu / renormalize / T=" .. T .. ": on and off agree with the CPU; same bits again", function()
        local w = mw("swiglu", false, mode)
        local x, L = inputs(T, 7100 + 13 * T + #mode)
        local yv = on_off(w, x, L, METHODS.renormalize, nil, mode .. " T=" .. T)
        local ya = qgemv("4", function() return call(experts(w, mode, "cuda"), x, L, METHODS.renormalize, "cuda") end)
        assert.same(bits(yv), bits(ya))
      end)
    end
  end

  for _, mode in ipairs(MODES) do
    for _, c in ipairs{ { "relu2", true, "deepseekv3" }, { "swiglu_oai", true, "renormalize" },
                        { "geglu", false, "llama4" }, { "swiglu", true, "deepseekv3" } } do
      for _, T in ipairs{ 1, 3 } do
        it(string.format("%s / %s%s / %s / T=%d", mode, c[1], c[2] and " + biases" or "", c[3], T), function()
          local x, L = inputs(T, 7300 + 7 * T + #c[1] + #c[3])
          on_off(mw(c[1], c[2], mode), x, L, METHODS[c[3]], nil, mode .. "/" .. c[1] .. "/" .. c[3])
        end)
      end
    end

    it(mode .. ": forced up to T = 64 (experts with more than 8 pairs: several passes)", function()
      for _, c in ipairs{ { 5, "renormalize" }, { 16, "deepseekv3" }, { 64, "deepseekv3" }, { 40, "llama4" } } do
        local T, mname = c[1], c[2]
        local w = mw("swiglu", false, mode)
        local x, L = inputs(T, 7500 + T)
        local m = METHODS[mname]
        local yv = qgemv("64", function() return call(experts(w, mode, "cuda"), x, L, m, "cuda") end)
        local yt = qgemv("0", function() return call(experts(w, mode, "cuda"), x, L, m, "cuda") end)
        check(yv, yt, call(experts(w, mode, "cpu"), x, L, m, "cpu"), mname .. " T=" .. T)
      end
    end)

    it(mode .. ": routed bit for bit with native, replay; repeated experts; ids out of range counted", function()
      local w = mw("swiglu", false, mode)
      local ex = experts(w, mode, "cuda")
      local x, L = inputs(3, 7600)
      local rep = moe.full({ 5, 4 }, -5, { dtype = "i16", device = "cuda" })
      local y1, r = qgemv(nil, function() return call(ex, x, L, METHODS.deepseekv3, "cuda", { replay = rep }) end)
      local y2 = qgemv(nil, function()
        return moe.fused_moe{ hidden = x:to("cuda"), experts = ex, routed = { ids = r.ids, weights = r.weights } }
      end)
      assert.same(bits(y1), bits(y2))
      local rt, ids = rep:to("cpu"):totable(), r.ids:to("cpu"):totable()
      for t = 1, 3 do assert.same(ids[t], rt[t]) end
      for t = 4, 5 do assert.same({ -5, -5, -5, -5 }, rt[t]) end
      -- routed calls with ids and weights given as tables: path on, off and the CPU
      local function routed(xt, tids, twts, dev, qv)
        local rr = { ids = moe.tensor(tids, { dtype = "i32", device = dev }), weights = moe.tensor(twts, { device = dev }) }
        local function go() return moe.fused_moe{ hidden = xt:to(dev), experts = experts(w, mode, dev), routed = rr } end
        return dev == "cpu" and go() or qgemv(qv, go)
      end
      -- expert 2 three times (twice in token 0), expert 7 twice at T = 1, expert 1 in all 16
      -- pairs at T = 4 (two passes of 8)
      local all1, wr = {}, {}
      for t = 1, 4 do all1[t], wr[t] = { 1, 1, 1, 1 }, { 0.1 * t, 0.2, 0.3, 0.4 } end
      local cases = { { { { 2, 2 }, { 5, 2 } }, { { 0.25, 0.5 }, { 0.7, 0.3 } } }, { { { 7, 7 } }, { { 0.6, 0.4 } } },
                      { all1, wr } }
      for n, c in ipairs(cases) do
        local xt = inputs(#c[1], 7700 + n)
        check(routed(xt, c[1], c[2], "cuda"), routed(xt, c[1], c[2], "cuda", "0"), routed(xt, c[1], c[2], "cpu"),
              "repeated experts, case " .. n)
      end
      -- ids out of range: skipped (as weight 0 on the CPU), counted once
      ex:check()
      local xt = inputs(2, 7800)
      local y = routed(xt, { { 0, 99 }, { -1, 3 } }, { { 0.5, 0.5 }, { 0.5, 0.5 } }, "cuda")
      local msg = H.error_of(function() ex:check() end)
      assert.is_truthy(msg and msg:find("2 routed ids out of range"), tostring(msg))
      assert.equal(0, ex:check())
      local yc = routed(xt, { { 0, 0 }, { 3, 3 } }, { { 0.5, 0 }, { 0, 0.5 } }, "cpu")
      assert.is_true(rel_l2(y, yc) <= 1e-3)
    end)

    it(mode .. ": expert shards at T = 4 (tokens without a local pair get zeros), qtensor parts, zeros in", function()
      local w = mw("relu2", true, mode)
      local T, m = 4, METHODS.renormalize
      local x, L = inputs(T, 7900)
      local zero_rows = 0
      for s = 0, 7 do
        local more = { local_offset = 2 * s, local_count = 2 }
        local yv = on_off(w, x, L, m, more, "shard " .. s)
        -- a token whose CPU row is all zeros had no local pair: the GEMV path writes zeros too
        local tc, tv = call(experts(w, mode, "cpu"), x, L, m, "cpu", more):to("f32"):totable(), bits(yv)
        local zrow = {}
        for j = 1, HD do zrow[j] = 0 end
        for t = 1, T do
          if math.max(unpack(tc[t])) == 0 and math.min(unpack(tc[t])) == 0 then
            zero_rows = zero_rows + 1
            assert.same(zrow, tv[t])
          end
        end
      end
      assert.is_true(zero_rows > 0, "every token had a local pair in every shard: the zero case is not covered")
      -- experts from qtensor parts quantised on the device: the same bits
      local ws = weights("swiglu", false)
      local exq = moe.experts{ gate_up = moe.quantize(ws.w13:to("cuda"), mode), down = moe.quantize(ws.w2:to("cuda"), mode) }
      local x2, L2 = inputs(2, 7950)
      local y1 = qgemv(nil, function() return call(experts(ws, mode, "cuda"), x2, L2, m, "cuda") end)
      local y2 = qgemv(nil, function() return call(exq, x2, L2, m, "cuda") end)
      assert.same(bits(y1), bits(y2))
      -- an all-zero input: scale 0, codes 0, output 0 (no NaN)
      for _, Tz in ipairs{ 1, 4 } do
        local z = moe.zeros({ Tz, HD }, { dtype = "bf16", device = "cuda" })
        local _, Lz = inputs(Tz, 7960)
        local yz = qgemv(nil, function() return call(experts(ws, mode, "cuda"), z, Lz, m, "cuda") end)
        for _, row in ipairs(bits(yz)) do
          for _, v in ipairs(row) do assert.equal(0, v) end
        end
      end
    end)

    it(mode .. ": captured at T = 1 and 3, replayed with new inputs; tile-path calls in between change nothing",
       function()
      local w = mw("swiglu_oai", true, mode)
      local m = METHODS.deepseekv3
      for _, T in ipairs{ 1, 3 } do
        local y1, again = qgemv(nil, function()
          return graph_rounds(w, mode, T, m, 8000 + 10 * T, function(round) -- T = 64: the tile kernels
            local xb, Lb = inputs(64, 8100 + round)
            call(experts(w, mode, "cuda"), xb, Lb, m, "cuda")
          end)
        end)
        assert.same(y1, again)
      end
    end)
  end
end)

describe("#gpu quantised fused MoE: block-local activations of the decode GEMV path (fp8, fp8_block, " ..
         "nvfp4; MOE_FUSED_QVLOC=0 off)", function()
  -- Where x has at most 2048 values and a token's intermediate rows at most 8192 (here T <= 5),
  -- fp8, fp8_block and nvfp4 quantise their activations in every block instead of in shared steps:
  -- the same codes and scales.  GEMM2 then runs 16 warps instead of 8 (another f32 order), so they
  -- are held to the CPU's tolerance against the shared steps.  With logits, both kernels are
  -- programmatic dependents of the routing kernel (k_qv_up quantises x while it runs): the same bits
  -- as plain launches (MOE_FUSED_QVPDL=0, and routed mode).  MOE_FUSED_QGEMV=5: T = 5 on the GEMV path.
  local function qvloc(v, f) return H.with_env("MOE_FUSED_QVLOC", v, f) end
  local function same(w, mode, x, L, m, more, what)
    local function go(v)
      return qgemv("5", function()
        return qvloc(v, function() return call(experts(w, mode, "cuda"), x, L, m, "cuda", more) end)
      end)
    end
    local path, yl, rl = path_of(function() return go(nil) end)
    -- T = 1 with logits (not llama4) on sm_90+: k_qv_up routes its own pair
    local self = x:size(1) == 1 and m.method ~= "llama4" and SM90UP
    -- (on Hopper, T = 1 self-routing takes k_qv_down's W2 by bulk copies: gemv_route_bulk)
    assert.equal(self and (HOPPER and "gemv_route_bulk" or "gemv_route") or "gemv", path, what .. ": the path taken")
    local ys = go("0")
    near(yl, ys, what .. ": block-local vs shared steps")
    -- plain launches (MOE_FUSED_QVPDL=0; by default both kernels are programmatic dependents of the
    -- routing kernel): the same bits
    local y0 = H.with_env("MOE_FUSED_QVPDL", "0", function() return go(nil) end)
    assert.same(bits(yl), bits(y0), what .. ": programmatic vs plain launches")
    assert.same(bits(yl), bits(go(nil)), what .. ": block-local, again")
    local yc, rc = call(experts(w, mode, "cpu"), x, L, m, "cpu", more)
    assert.same(rc.ids:totable(), rl.ids:to("cpu"):totable())
    near(yl, yc, what .. ": CUDA vs CPU")
    return yl
  end
  for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4" } do
    it(mode .. ": T = 1..5, relu2 / swiglu_oai / geglu with biases, deepseekv3 / llama4, expert shards", function()
      for T = 1, 5 do
        local x, L = inputs(T, 9100 + T)
        same(weights("swiglu", false), mode, x, L, METHODS.renormalize, nil, mode .. " T=" .. T)
      end
      for _, c in ipairs{ { "relu2", "deepseekv3" }, { "swiglu_oai", "renormalize" }, { "geglu", "llama4" } } do
        for _, T in ipairs{ 1, 3 } do
          local x, L = inputs(T, 9200 + T + #c[1])
          same(weights(c[1], true), mode, x, L, METHODS[c[2]], nil, mode .. " " .. c[1] .. "/" .. c[2] .. " T=" .. T)
        end
      end
      -- shards of 2 experts: some tokens (blocks of k_qv_down) have no local pair
      local x, L = inputs(4, 9300)
      for s = 0, 7 do
        same(weights("swiglu", false), mode, x, L, METHODS.renormalize, { local_offset = 2 * s, local_count = 2 },
             mode .. " shard " .. s)
      end
    end)

    it(mode .. ": the intermediate's amax is per call (a large call, then a small one, alternating with the " ..
       "shared steps; all-zero input)", function()
      local w, m = weights("swiglu", false), METHODS.renormalize
      local x, L = inputs(1, 9400)
      local big = moe.randn({ 1, HD }, { dtype = "bf16", seed = 9401, std = 64 })
      local y1 = same(w, mode, x, L, m, nil, mode .. " first")
      same(w, mode, big, L, m, nil, mode .. " std 64")
      assert.same(bits(y1), bits(same(w, mode, x, L, m, nil, mode .. " again")))
      qvloc("0", function() call(experts(w, mode, "cuda"), big, L, m, "cuda") end)
      assert.same(bits(y1), bits(same(w, mode, x, L, m, nil, mode .. " after the shared steps")))
      local z = moe.zeros({ 2, HD }, { dtype = "bf16" })
      local _, Lz = inputs(2, 9410)
      for _, row in ipairs(bits(same(w, mode, z, Lz, m, nil, mode .. " zeros"))) do
        for _, v in ipairs(row) do assert.equal(0, v) end
      end
    end)

    -- fp8 / fp8_block / nvfp4 at T = 1 (sm_90+, path gemv_route): no routing kernel; each block of
    -- k_qv_up routes its own pair with route.cu's code and issues its weight loads at once, block
    -- (0, 0) also writes ids, weights and replay and releases a flag that k_qv_down's blocks acquire
    -- before reading them.  A block that picked another expert than ids[p] would change out.
    -- MOE_FUSED_QVRT=0 (the routing kernel, then k_qv_up reading ids[p]) and =1 (the routing kernel,
    -- k_qv_up routing its pair all the same), MOE_FUSED_QVBK=0 (k_qv_down's W2 into registers, not
    -- bulk-copied into shared memory) and MOE_FUSED_QVUPPDL=0 (k_qv_up launched plainly, not as a
    -- programmatic dependent that waits first): the same bits in out, ids, weights and replay (its
    -- other rows untouched); ids equal to the CPU's.  top_k 10: past the 8 ids packed in one word.
    do
      local it_sm90 = SM90UP and it or function() end -- before sm_90: no programmatic launches
      it_sm90(mode .. ": T = 1, k_qv_up routing its own pair: the bits of MOE_FUSED_QVRT=0 / 1 for " ..
         "every method, logits f32 / bf16 / f16, expert shards", function()
        local w = weights("swiglu", false)
        local cases = {
          { { method = "renormalize", top_k = 8 }, "f32" }, { { method = "renormalize", top_k = 8 }, "bf16" },
          { { method = "renormalize", top_k = 8 }, "f16" }, { METHODS.deepseekv3, "f32" },
          { METHODS.deepseekv3, "bf16" }, { { method = "default", top_k = 4 }, "f32" },
          { { method = "renormalize_naive", top_k = 3 }, "bf16" }, { { method = "topk", top_k = 2 }, "f16" },
          { { method = "sigmoid_renorm", top_k = 4 }, "f32" },
          { { method = "minimax2", top_k = 4, scale = 1.5 }, "bf16", { bias = rbias:to("cuda") } },
          { { method = "renormalize", top_k = 8 }, "f32", { local_offset = 4, local_count = 6 } },
          -- top_k > 8: k_qv_down reads ids after a flag (up to 8 it takes them packed in one word)
          { { method = "renormalize", top_k = 10 }, "f32" }, { { method = "renormalize", top_k = 10 }, "bf16",
                                                               { local_offset = 2, local_count = 9 } },
          { { method = "renormalize", top_k = 8 }, "bf16", { local_offset = 12, local_count = 4 } },
        }
        for i, c in ipairs(cases) do
          local m, dt = c[1], c[2]
          local what = string.format("%s %s %s logits (case %d)", mode, m.method, dt, i)
          local x, L = inputs(1, 9500 + i)
          L = L:to(dt)
          local function go(v, env)
            local rep = moe.full({ 3, m.top_k }, -5, { dtype = "i16", device = "cuda" })
            local more = { replay = rep }
            for k, val in pairs(c[3] or {}) do more[k] = val end
            local y, r = H.with_env(env or "MOE_FUSED_QVRT", v, function()
              return call(experts(w, mode, "cuda"), x, L, m, "cuda", more)
            end)
            return y, r, rep:to("cpu"):totable()
          end
          local path, y1, r1, rep1 = path_of(function() return go(nil) end)
          assert.equal(HOPPER and "gemv_route_bulk" or "gemv_route", path, what .. ": the path taken")
          local ids = r1.ids:to("cpu"):totable()
          local wts = r1.weights:to("cpu"):totable()
          assert.same(ids[1], rep1[1], what .. ": replay row 0")
          for t = 2, 3 do
            for k = 1, m.top_k do assert.equal(-5, rep1[t][k], what .. ": replay row " .. (t - 1) .. " untouched") end
          end
          -- also MOE_FUSED_QVBK=0 (W2 into registers) and MOE_FUSED_QVUPPDL=0 (k_qv_up a plain launch)
          local bulk = HOPPER and "gemv_route_bulk" or "gemv_route"
          for _, ev in ipairs{ { "MOE_FUSED_QVRT", "0", "gemv" }, { "MOE_FUSED_QVRT", "1", bulk },
                               { "MOE_FUSED_QVBK", "0", "gemv_route" }, { "MOE_FUSED_QVUPPDL", "0", bulk } } do
            local p2, y2, r2, rep2 = path_of(function() return go(ev[2], ev[1]) end)
            local w2 = what .. ", " .. ev[1] .. "=" .. ev[2]
            assert.equal(ev[3], p2, w2 .. ": the path taken")
            assert.same(bits(y2), bits(y1), w2 .. ": out")
            assert.same(r2.ids:to("cpu"):totable(), ids, w2 .. ": ids")
            assert.same(r2.weights:to("cpu"):totable(), wts, w2 .. ": weights")
            assert.same(rep2, rep1, w2 .. ": replay")
          end
          local more = {}
          for k, val in pairs(c[3] or {}) do more[k] = k == "bias" and val:to("cpu") or val end
          local yc, rc = call(experts(w, mode, "cpu"), x, L, m, "cpu", more)
          assert.same(rc.ids:totable(), ids, what .. ": ids vs the CPU")
          near(y1, yc, what .. ": CUDA vs CPU")
        end
      end)
    end
  end
end)

describe("#gpu quantised fused MoE: mxfp4 / mxint4 decode with k_qv_down's W2 by bulk copies (T = 1, " ..
         "sm_90a; MOE_FUSED_QVBK=0 off)", function()
  -- At T = 1 on Hopper each k_qv_down block copies its experts' 16 W2 rows into shared memory with
  -- one bulk copy an expert (path gemv_bulk) instead of loading them into registers: the same MMAs
  -- in the same order, so the same bits as MOE_FUSED_QVBK=0 (path gemv), and near the CPU.
  for _, mode in ipairs{ "mxfp4", "mxint4" } do
    it(mode .. ": swiglu top-8, " .. (mode == "mxfp4" and "swiglu_oai" or "relu2") .. " with biases top-4, " ..
       "an expert shard: the bits of MOE_FUSED_QVBK=0", function()
      local cases = {
        { weights("swiglu", false), { method = "renormalize", top_k = 8 } },
        { weights(mode == "mxfp4" and "swiglu_oai" or "relu2", true), { method = "renormalize", top_k = 4 } },
        { weights("swiglu", false), { method = "renormalize", top_k = 8 }, { local_offset = 4, local_count = 6 } },
      }
      for i, c in ipairs(cases) do
        local w, m = c[1], c[2]
        local what = string.format("%s case %d", mode, i)
        local x, L = inputs(1, 9700 + i)
        local p1, y1 = path_of(function() return call(experts(w, mode, "cuda"), x, L, m, "cuda", c[3]) end)
        assert.equal(HOPPER and "gemv_bulk" or "gemv", p1, what .. ": the path taken")
        local p0, y0 = path_of(function()
          return H.with_env("MOE_FUSED_QVBK", "0", function()
            return call(experts(w, mode, "cuda"), x, L, m, "cuda", c[3])
          end)
        end)
        assert.equal("gemv", p0, what .. ", MOE_FUSED_QVBK=0: the path taken")
        assert.same(bits(y0), bits(y1), what .. ": out, bulk copies vs registers")
        local yc = call(experts(w, mode, "cpu"), x, L, m, "cpu", c[3])
        near(y1, yc, what .. ": CUDA vs CPU")
      end
    end)

    -- The K experts' 16 W2 rows (K * 16 * I / 2 bytes) must fit 200 KB of shared memory: at I = 12800,
    -- K = 2 they take exactly 200 KB (bulk copies), at I = 12928 200 KB + 2 KB (register loads, path gemv).
    it(mode .. ": W2 rows at the shared-memory limit and past it (I = 12800 / 12928, top-2): bulk copies, " ..
       "then register loads; the bits of MOE_FUSED_QVBK=0", function()
      for _, c in ipairs{ { 12800, HOPPER and "gemv_bulk" or "gemv" }, { 12928, "gemv" } } do
        local Ib, Hb, Eb = c[1], 128, 4
        local w = {
          w13 = moe.randn({ Eb, 2 * Ib, Hb }, { dtype = "bf16", seed = 9790, std = 0.05 }),
          w2 = moe.randn({ Eb, Hb, Ib }, { dtype = "bf16", seed = 9791, std = 0.05 }),
        }
        local function ex(dev)
          return moe.experts{ gate_up = w.w13, down = w.w2, activation = "swiglu", quant = mode, device = dev }
        end
        local exg = ex("cuda")
        local x = moe.randn({ 1, Hb }, { dtype = "bf16", seed = 9792 })
        local L = moe.randn({ 1, Eb }, { seed = 9793 })
        local function go(e, dev)
          return moe.fused_moe{ hidden = x:to(dev), logits = L:to(dev), experts = e, method = "renormalize",
                                top_k = 2 }
        end
        local what = string.format("%s I=%d", mode, Ib)
        local p1, y1 = path_of(function() return go(exg, "cuda") end)
        assert.equal(c[2], p1, what .. ": the path taken")
        local p0, y0 = path_of(function()
          return H.with_env("MOE_FUSED_QVBK", "0", function() return go(exg, "cuda") end)
        end)
        assert.equal("gemv", p0, what .. ", MOE_FUSED_QVBK=0: the path taken")
        assert.same(bits(y0), bits(y1), what .. ": out, default vs registers")
        near(y1, go(ex("cpu"), "cpu"), what .. ": CUDA vs CPU")
        exg:free()
      end
    end)
  end
end)

describe("#gpu quantised fused MoE: default decode GEMV rule (no MOE_FUSED_QGEMV set)", function()
  -- Unset: fp8 / fp8_block take the GEMV path for T <= 4 only; past that, up to T = 64, nvfp4,
  -- mxfp4 and mxint4 on f16 MMAs while T*K < E (below one pair per expert), mxint4 with per-32
  -- promotions (MOE_FUSED_I4F16=0) while T*K <= 2E.  Top-2 over E = 16: T = 7 (T*K = 14 < E) and
  -- T = 16 (T*K = 32 = 2E).
  for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4", "mxint4/I4F16=0" } do
    for _, T in ipairs{ 7, 16 } do
      local gemv = mode ~= "fp8" and mode ~= "fp8_block" and T * 2 < E or mode == "mxint4/I4F16=0"
      local i4env = mode == "mxint4/I4F16=0" and "0" or nil
      local wreg = mode == "mxint4" and "wreg_i4f16" or "wreg"
      it(mode .. " / swiglu / renormalize / T=" .. T .. ": " ..
         (gemv and "the GEMV path (the bits of MOE_FUSED_QGEMV=16), near the tile kernels (=0)"
               or "the tile kernels (the bits of MOE_FUSED_QGEMV=0)") .. "; agrees with the CPU", function()
        local w, m = weights("swiglu", false), METHODS.renormalize
        local x, L = inputs(T, 8300 + #mode + T)
        local qm = mode:match("^[%w_]+")
        local function go(v)
          return H.with_env("MOE_FUSED_I4F16", i4env, function()
            return qgemv(v, function() return call(experts(w, qm, "cuda"), x, L, m, "cuda") end)
          end)
        end
        local path, yd, rd = path_of(function() return go(nil) end)
        assert.equal(gemv and "gemv" or wreg, path, mode .. " T=" .. T .. ": the path taken")
        local yc, rc = call(experts(w, qm, "cpu"), x, L, m, "cpu")
        assert.same(rc.ids:totable(), rd.ids:to("cpu"):totable())
        near(yd, yc, mode .. " T=" .. T .. ", MOE_FUSED_QGEMV unset: CUDA vs CPU")
        local yt = go("0")
        if gemv then
          near(yd, yt, mode .. " T=" .. T .. ": default (GEMV) vs MOE_FUSED_QGEMV=0 (tile kernels)")
          assert.same(bits(go("16")), bits(yd))
        else
          assert.same(bits(yt), bits(yd))
        end
      end)
    end
  end
end)

describe("#gpu mxint4 on f16 MMAs (the scales folded into the weights; MOE_FUSED_I4F16=0 off)", function()
  -- k_wreg (T = 256, all pairs on one expert: 16 a local expert on average) and k_qg_rs (T = 1200:
  -- 75) run mxint4 on f16 MMAs where every int4 x bf16 scale x 2^b is exact in f16 (one b a matrix,
  -- chosen when the experts are made), with each activation row times its own power of two.
  local SIZES = { { 256, "wreg" }, { 1200, "wgmma_rs" } }
  local w = weights("swiglu", false)

  -- routed mode: every token to expert `e` (0-based), weight 1
  local function to_expert(T, e, dev)
    local ids, wts = {}, {}
    for t = 1, T do
      ids[t] = { e }
      wts[t] = { 1 }
    end
    return { ids = moe.tensor(ids, { dtype = "i32", device = dev }), weights = moe.tensor(wts, { device = dev }) }
  end
  -- experts whose gate_up scales are those of moe.quantize but expert 0's all `hi` and expert 1's
  -- all `lo`; down as quantised; CUDA and CPU copies of the same parts
  local function crafted(hi, lo)
    local q = moe.quantize(w.w13:to("cuda"), "mxint4")
    local sc = q.scales:clone()
    sc:select(1, 1):fill_(hi)
    sc:select(1, 2):fill_(lo)
    local down = moe.quantize(w.w2:to("cuda"), "mxint4")
    local ex = {}
    for _, dev in ipairs{ "cuda", "cpu" } do
      ex[dev] = moe.experts{ gate_up = moe.quant_from_parts{ mode = "mxint4", data = q.data:to(dev), scales = sc:to(dev) },
                             down = moe.quant_from_parts{ mode = "mxint4", data = down.data:to(dev),
                                                          scales = down.scales:to(dev) },
                             activation = "swiglu", device = dev }
    end
    return ex
  end
  for _, sz in ipairs(SIZES) do
    local T, kern = sz[1], sz[2]
    local fold, plain = HOPPER and kern .. "_i4f16" or (kern == "wreg" and "wreg_i4f16" or "tile"),
                        HOPPER and (kern == "wgmma_rs" and "wgmma_rs_xonce" or kern) or (kern == "wreg" and "wreg" or "tile")
    it(string.format("T=%d (%s): scales 2^0 and 2^-36 (lowest bit 2^-24 after the fold: f16 subnormal " ..
                     "weights) fold, and all of expert 1's outputs match the CPU; 1.5 x 2^-36 (lowest bit " ..
                     "2^-37) does not fold and runs the per-32 promotions", T, kern), function()
      local x = moe.randn({ T, HD }, { dtype = "bf16", seed = 7100 + T })
      for _, c in ipairs{ { 2 ^ -36, fold }, { 1.5 * 2 ^ -36, plain } } do
        local ex = crafted(1.0, c[1])
        local yc = moe.fused_moe{ hidden = x, experts = ex.cpu, routed = to_expert(T, 1, "cpu") }
        local path, y = path_of(function()
          return moe.fused_moe{ hidden = x:to("cuda"), experts = ex.cuda, routed = to_expert(T, 1, "cuda") }
        end)
        assert.equal(c[2], path, string.format("expert 1's scales %.4g x 2^-36: the path taken", c[1] * 2 ^ 36))
        near(y, yc, string.format("T=%d expert 1 (scales %.4g x 2^-36, %s): CUDA vs CPU", T, c[1] * 2 ^ 36, path))
        local y0c = moe.fused_moe{ hidden = x, experts = ex.cpu, routed = to_expert(T, 0, "cpu") }
        local y0 = moe.fused_moe{ hidden = x:to("cuda"), experts = ex.cuda, routed = to_expert(T, 0, "cuda") }
        near(y0, y0c, string.format("T=%d expert 0 (scales 1): CUDA vs CPU", T))
      end
    end)

    it(string.format("T=%d (%s): rows scaled by 2^-30 and 2^20 (past f16's range unscaled), a row with " ..
                     "entries at 2^-45 of its largest, each row near the CPU; MOE_FUSED_I4F16=0 too", T, kern),
       function()
      local t = moe.randn({ T, HD }, { seed = 7200 + T }):totable()
      for j = 1, HD do
        t[1][j] = t[1][j] * 2 ^ -30
        t[2][j] = t[2][j] * 2 ^ 20
        if j % 3 == 0 then t[3][j] = t[3][j] * 2 ^ -45 end
      end
      local x = moe.tensor(t, { dtype = "bf16" })
      local L = moe.randn({ T, E }, { seed = 7300 + T })
      local m = METHODS.renormalize
      local yc = call(experts(w, "mxint4", "cpu"), x, L, m, "cpu")
      local rows_c = yc:to("f32"):totable()
      for _, env in ipairs{ false, "0" } do
        local path, y = path_of(function()
          return H.with_env("MOE_FUSED_I4F16", env or nil, function()
            return call(experts(w, "mxint4", "cuda"), x, L, m, "cuda")
          end)
        end)
        assert.equal(env and plain or fold, path, "MOE_FUSED_I4F16 " .. (env or "unset") .. ": the path taken")
        -- the whole output within 1e-3; each row within 1e-2 (a bf16 output element off by one
        -- rounding step is 2^-8 relative: a few per row reach 1e-3; a row out of f16's range
        -- would be off by O(1) or inf)
        near(y, yc, string.format("T=%d, MOE_FUSED_I4F16 %s", T, env or "unset"))
        local rows = y:to("cpu"):to("f32"):totable()
        for r = 1, T do
          local err = rel_l2(moe.tensor({ rows[r] }), moe.tensor({ rows_c[r] }))
          assert.is_true(err <= 1e-2, string.format("T=%d row %d, MOE_FUSED_I4F16 %s: relative L2 %.3g", T, r,
                                                    env or "unset", err))
        end
      end
    end)
  end

  it("under a CUDA graph, deepseekv3 top-4 at T=200 (k_wreg) and 1200 (k_qg_rs): the per-row powers of two " ..
     "recomputed each replay", function()
    for _, T in ipairs{ 200, 1200 } do
      local y1, again = graph_rounds(w, "mxint4", T, METHODS.deepseekv3, 7400 + T)
      assert.same(y1, again)
    end
  end)
end)
