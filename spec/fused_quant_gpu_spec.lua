-- spec/fused_quant_gpu_spec.lua -- the fused MoE in every quantisation mode on CUDA against
-- the CPU reference (relative L2 <= 1e-3: same numerics, f32 accumulation order only), T in
-- {1, 5, 64, 300} (both tile configurations), deepseekv3 routing, relu2 + biases, llama4,
-- expert parallelism, routed-mode bit-exactness and replay, qtensor parts, T = 0, and CUDA
-- graph capture + replay with new inputs.  Prints each mode's error against the bf16 output.
-- Exits 77 without a CUDA device.
local H = require("spec.helper")
local moe = H.moe

local E, HD, I = 16, 384, 640
local MODES = { "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" }

local function rel_l2(a, b) -- tensors (any device)
  local x, y = a:to("cpu"):to("f32"), b:to("cpu"):to("f32")
  local n = x:numel()
  local xa, ya = x:reshape({ n }):totable(), y:reshape({ n }):totable()
  local num, den = 0, 0
  for i = 1, n do
    local d = xa[i] - ya[i]
    if d ~= d then return math.huge end
    num = num + d * d
    den = den + ya[i] * ya[i]
  end
  return den > 0 and math.sqrt(num / den) or math.sqrt(num)
end

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

describe("#gpu quantised fused MoE under CUDA graphs", function()
  for _, mode in ipairs{ "fp8_block", "nvfp4" } do
    it(mode .. ": captures the whole call and replays with new hidden and logits", function()
      local w = weights("swiglu", false)
      local ex = experts(w, mode, "cuda")
      local T, m = 64, METHODS.deepseekv3
      local x = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
      local L = moe.empty({ T, E }, { device = "cuda" })
      local out = moe.empty({ T, HD }, { dtype = "bf16", device = "cuda" })
      local rep = moe.full({ T, m.top_k }, -1, { dtype = "i16", device = "cuda" })
      local b = rbias:to("cuda")
      local args = { hidden = x, logits = L, bias = b, experts = ex, method = m.method, top_k = m.top_k,
                     n_group = m.n_group, topk_group = m.topk_group, scale = m.scale, out = out, replay = rep }
      ex:reserve(T, m.top_k)
      local g = moe.graph.capture(function() moe.fused_moe(args) end)
      for round = 1, 3 do
        local xh, Lh = inputs(T, 900 + round)
        x:copy_(xh:to("cuda"))
        L:copy_(Lh:to("cuda"))
        g:replay()
        moe.synchronize("cuda")
        local yc, rc = call(experts(w, mode, "cpu"), xh, Lh, m, "cpu")
        local err = rel_l2(out, yc)
        assert.is_true(err <= 1e-3, "round " .. round .. ": relative L2 error " .. err)
        assert.same(rc.ids:totable(), rep:to("cpu"):to("i32"):totable())
      end
      g:free()
    end)
  end
end)
