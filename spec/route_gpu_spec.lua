-- Routing on CUDA against the CPU reference: every method, T in {1, 7, 128, 4097}, f32 / bf16 /
-- f16 logits, every size class of E; ids must be EQUAL, weights within 1e-6 relative (they are
-- computed with the same float formulas, see engine/src/route_math.h).  Also: replay on the
-- GPU, T = 262144, NaN/inf rows, device errors and CUDA-graph capture with new logits copied
-- into the captured input before every replay.
local ffi = require("ffi")
local moe = require("moe")
local H = require("spec.helper")

local C = moe.C

local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end

-- All values of a tensor (any device) as a double[n].
local function vals(t)
  local n = t:numel()
  local buf = ffi.new("double[?]", math.max(n, 1))
  if n > 0 then moe._check(C.moe_tensor_read_f64(t.h, buf, n), "vals") end
  return buf, n
end

-- Compare two routing results; returns nil or a message naming the first difference.
local function diff(ref, got, rtol, what)
  local ri, n = vals(ref.ids)
  local gi, n2 = vals(got.ids)
  if n ~= n2 then return what .. ": ids numel " .. n .. " vs " .. n2 end
  local K = ref.ids:shape()[2]
  for i = 0, n - 1 do
    if ri[i] ~= gi[i] then
      return string.format("%s: ids differ at token %d slot %d: cpu %d, cuda %d", what, math.floor(i / K), i % K,
                           ri[i], gi[i])
    end
  end
  local rw = vals(ref.weights)
  local gw = vals(got.weights)
  for i = 0, n - 1 do
    if not H.close(gw[i], rw[i], rtol, 1e-30) then
      return string.format("%s: weights differ at token %d slot %d: cpu %.9g, cuda %.9g", what,
                           math.floor(i / K), i % K, rw[i], gw[i])
    end
  end
  return nil
end

local function check(ref, got, rtol, what)
  local d = diff(ref, got, rtol, what)
  if d then error(d, 2) end
end

-- Route the same arguments on the CPU and on CUDA (logits/bias copied to the GPU).
local function both(args)
  local ref = moe.route(args)
  local g = {}
  for k, v in pairs(args) do g[k] = v end
  g.logits = args.logits:to("cuda")
  if args.bias then g.bias = args.bias:to("cuda") end
  local got = moe.route(g)
  assert.equal("cuda:0", got.ids:device())
  return ref, got, g
end

-- Per method: (E, K, extra args) configurations covering the size classes.
local function configs(method)
  if method == "llama4" then return { { 16, 1 }, { 128, 1 }, { 2048, 1 } } end
  if method == "deepseekv3" then
    return {
      { 256, 8, { n_group = 8, topk_group = 4, scale = 2.5, bias = true } },
      { 384, 8, { scale = 2.827, bias = true } },
      { 64, 6, { n_group = 8, topk_group = 3, bias = true } },
      { 160, 8, { n_group = 5, topk_group = 2, bias = true } },   -- G = 32, E not a power of 2
      { 72, 4, { n_group = 24, topk_group = 5 } },                -- G = 3: element path
      { 2048, 32, { n_group = 32, topk_group = 8, bias = true } },
    }
  end
  local bias = method == "minimax2" or nil
  return { { 128, 8, { bias = bias } }, { 256, 8, { bias = bias } }, { 60, 4, { bias = bias } },
           { 1000, 32, { bias = bias } }, { 7, 7, { bias = bias } } }
end

describe("moe.route on CUDA matches the CPU reference #gpu", function()
  local seed = 100
  for _, m in ipairs(moe.routing_methods()) do
    it(m.name .. ": T in {1, 7, 128, 4097}, f32 / bf16 / f16 logits, several E", function()
      for ci, cfg in ipairs(configs(m.name)) do
        local E, K, extra = cfg[1], cfg[2], cfg[3] or {}
        for _, T in ipairs{ 1, 7, 128, 4097 } do
          for _, dt in ipairs{ "f32", "bf16", "f16" } do
            -- the big T only for the first configuration and f32/bf16, to keep the CPU side quick
            if T < 4097 or (ci == 1 and dt ~= "f16") then
              seed = seed + 1
              local args = { logits = moe.randn({ T, E }, { seed = seed, dtype = dt }), method = m.name, top_k = K }
              for k, v in pairs(extra) do args[k] = v end
              if extra.bias then args.bias = moe.randn({ E }, { seed = seed + 5000, std = 0.05 }) end
              local ref, got = both(args)
              check(ref, got, 1e-6, string.format("%s E=%d K=%d T=%d %s", m.name, E, K, T, dt))
            end
          end
        end
      end
    end)
  end

  it("every E from 1 to 2048 class boundaries, vector and scalar load paths", function()
    for _, E in ipairs{ 1, 2, 5, 8, 31, 33, 64, 127, 128, 129, 250, 256, 257, 383, 384, 385, 511,
                        512, 513, 999, 1024, 1025, 2047, 2048 } do
      for _, dt in ipairs{ "f32", "bf16" } do
        local K = math.min(E, E % 32 + 1)
        local x = moe.randn({ 33, E }, { seed = E, dtype = dt })
        local ref, got = both{ logits = x, method = "renormalize", top_k = K }
        check(ref, got, 1e-6, "renormalize E=" .. E .. " " .. dt)
        ref, got = both{ logits = x, method = "default", top_k = K }
        check(ref, got, 1e-6, "default E=" .. E .. " " .. dt)
      end
    end
  end)

  it("heavy ties (integer logits) break to the lower index on both", function()
    local rows = {}
    local r = 12345
    for t = 1, 300 do
      local row = {}
      for e = 1, 256 do
        r = (r * 1103515245 + 12345) % 2147483648
        row[e] = math.floor(r / 65536) % 5 - 2
      end
      rows[t] = row
    end
    local x = moe.tensor(rows)
    for _, m in ipairs{ "renormalize", "default", "topk", "sigmoid_renorm", "deepseekv3", "minimax2" } do
      local args = { logits = x, method = m, top_k = 8 }
      if m == "deepseekv3" then args.n_group = 8; args.topk_group = 4 end
      local ref, got = both(args)
      check(ref, got, 1e-6, "ties " .. m)
    end
  end)

  it("NaN and infinities give the same ids and weights (NaN where the CPU has NaN)", function()
    local nan, inf = 0 / 0, math.huge
    local rows = {}
    for t = 1, 64 do
      local row = {}
      for e = 1, 64 do row[e] = ((t * 7 + e * 13) % 17) / 4 - 2 end
      if t % 4 == 1 then row[(t % 64) + 1] = nan end
      if t % 4 == 2 then row[(t % 64) + 1] = inf end
      if t % 4 == 3 then for e = 1, 64 do row[e] = (e % 2 == 0) and nan or -inf end end
      rows[t] = row
    end
    local x = moe.tensor(rows)
    for _, m in ipairs(moe.routing_methods()) do
      local args = { logits = x, method = m.name, top_k = m.name == "llama4" and 1 or 8 }
      if m.name == "deepseekv3" then args.n_group = 4; args.topk_group = 2 end
      local ref, got = both(args)
      check(ref, got, 1e-6, "nan/inf " .. m.name)
    end
  end)

  it("bf16 weights on CUDA equal the CPU's", function()
    local x = moe.randn({ 257, 256 }, { seed = 9 })
    local ref, got = both{ logits = x, method = "deepseekv3", top_k = 8, n_group = 8, topk_group = 4,
                           scale = 2.5, weights_dtype = "bf16" }
    assert.equal("bf16", got.weights:dtype())
    check(ref, got, 0, "bf16 weights")
  end)
end)

-- The sigmoid + bias kernel for E = 256 / 384 (kernels/route.cu, moe__k_route_sb) selects on
-- approximate sigmoids and redoes a token exactly when a decision was closer than its error
-- bound.  These rows are built to hit both branches: logits on a coarse grid (exact ties), the
-- same plus perturbations from 1e-7 (below the bound: must fall back) to 1e-3 (above: the fast
-- decision stands), random rows, NaN / +-inf logits, and NaN / +-inf entries in the bias.  Every
-- variant must equal the CPU (ids equal, weights within 1e-6) with the kernel on and off
-- (MOE_ROUTE_FAST=0 sends the call to the general kernel).
describe("moe.route sigmoid+bias filter-and-verify kernel #gpu", function()
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  local nan, inf = 0 / 0, math.huge
  local function rows_for(E, T, seed)
    local r = seed
    local function rnd()
      r = (r * 1103515245 + 12345) % 2147483648
      return r / 2147483648
    end
    local deltas = { 0, 1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 1e-4, 1e-3 }
    local rows = {}
    for t = 1, T do
      local row, kind = {}, t % 4
      for e = 1, E do
        if kind == 0 then
          row[e] = math.floor(rnd() * 17) / 4 - 2                      -- grid: exact ties
        elseif kind == 1 then
          row[e] = math.floor(rnd() * 17) / 4 - 2 + deltas[math.floor(rnd() * #deltas) + 1] * (rnd() < 0.5 and -1 or 1)
        elseif kind == 2 then
          row[e] = (rnd() + rnd() + rnd() - 1.5) * 2                   -- random
        else
          row[e] = (rnd() - 0.5) * 4
          if e % 37 == t % 37 then row[e] = nan end
          if e % 41 == t % 41 then row[e] = inf end
          if e % 43 == t % 43 then row[e] = -inf end
        end
      end
      rows[t] = row
    end
    return moe.tensor(rows)
  end
  local cases = {
    { E = 256, method = "deepseekv3", n_group = 8, topk_group = 4, scale = 2.5 },
    { E = 256, method = "deepseekv3", n_group = 4, topk_group = 2 },
    { E = 384, method = "deepseekv3", scale = 2.827 },
    { E = 256, method = "minimax2" },
    { E = 256, method = "deepseekv3", n_group = 8, topk_group = 4, top_k = 6 },
    { E = 384, method = "minimax2", top_k = 3 },
  }
  for ci, c in ipairs(cases) do
    it(string.format("%s E=%d groups %s: near ties, NaN/inf logits and bias, kernel on and off", c.method, c.E,
                     tostring(c.n_group or 1)), function()
      local x = rows_for(c.E, 256, 1000 + ci)
      local bias_plain = moe.randn({ c.E }, { seed = 77 + ci, std = 0.05 })
      local bt = bias_plain:totable()
      bt[4] = nan; bt[11] = inf; bt[21] = -inf; bt[30] = bt[31]
      local bias_odd = moe.tensor(bt)
      -- wide: many biases below -2 and above +2 (the kernel's offset keys need b >= -2, the
      -- rest must take the exact path) and large magnitudes for the relative tolerances
      local bias_wide = moe.randn({ c.E }, { seed = 91 + ci, std = 3 })
      for _, bias in ipairs{ bias_plain, bias_odd, bias_wide, false } do
        for _, dt in ipairs{ "f32", "bf16" } do
          local args = { logits = x:to(dt == "f32" and "f32" or "bf16"), method = c.method, top_k = c.top_k or 8,
                         n_group = c.n_group, topk_group = c.topk_group, scale = c.scale, bias = bias or nil }
          for _, fast in ipairs{ "1", "0" } do
            ffi.C.setenv("MOE_ROUTE_FAST", fast, 1)
            local ok, err = pcall(function()
              local ref, got = both(args)
              check(ref, got, 1e-6, string.format("%s E=%d %s bias=%s fast=%s", c.method, c.E, dt,
                                                   bias == bias_odd and "nan/inf" or bias == bias_wide and "wide"
                                                   or tostring(bias ~= false), fast))
            end)
            ffi.C.unsetenv("MOE_ROUTE_FAST")
            if not ok then error(err, 0) end
          end
        end
      end
    end)
  end
end)

describe("moe.route replay on CUDA #gpu", function()
  it("replay equals the ids row by row; rows >= T keep -1; outputs identical without replay", function()
    local x = moe.randn({ 100, 256 }, { seed = 21 }):to("cuda")
    local b = moe.randn({ 256 }, { seed = 22, std = 0.05 }):to("cuda")
    for _, m in ipairs(moe.routing_methods()) do
      local args = { logits = x, method = m.name, top_k = m.name == "llama4" and 1 or 8 }
      if m.name == "deepseekv3" then args.n_group = 8; args.topk_group = 4; args.bias = b end
      if m.name == "minimax2" then args.bias = b end
      local r0 = moe.route(args)
      local buf = moe.full({ 130, args.top_k }, -1, { dtype = "i16", device = "cuda" })
      args.replay = buf
      local r1 = moe.route(args)
      check(r0, r1, 0, "with/without replay " .. m.name)
      local ids, rep = r1.ids:totable(), buf:totable()
      for t = 1, 100 do assert.same(ids[t], rep[t]) end
      for t = 101, 130 do
        for k = 1, args.top_k do assert.equal(-1, rep[t][k]) end
      end
    end
  end)

  it("T = 262144 works (one launch) and matches the CPU", function()
    local x = moe.randn({ 262144, 256 }, { seed = 31, dtype = "bf16", device = "cuda" }):to("cpu")
    local b = moe.randn({ 256 }, { seed = 32, std = 0.05 })
    local args = { logits = x, bias = b, method = "deepseekv3", top_k = 8, n_group = 8, topk_group = 4, scale = 2.5 }
    local ref, got, g = both(args)
    check(ref, got, 1e-6, "T=262144")
    local buf = moe.full({ 262144, 8 }, -1, { dtype = "i16", device = "cuda" })
    g.replay = buf
    moe.route(g)
    local a, n = vals(buf)
    local r = vals(ref.ids)
    for i = 0, n - 1 do
      if a[i] ~= r[i] then error("replay differs at " .. i) end
    end
  end)

  it("device mismatches are errors naming the argument", function()
    local x = moe.randn({ 4, 8 }, { seed = 1 }):to("cuda")
    local function err(args)
      local ok, e = pcall(moe.route, args)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.truthy(has(err{ logits = x, top_k = 2, replay = moe.empty({ 4, 2 }, { dtype = "i16" }) },
                      "replay: expected device cuda:0 (the logits' device), got cpu"))
    assert.truthy(has(err{ logits = x, top_k = 2, ids = moe.empty({ 4, 2 }, { dtype = "i32" }) },
                      "ids: expected device cuda:0 (the logits' device), got cpu"))
    assert.truthy(has(err{ logits = x, top_k = 2, weights = moe.empty({ 4, 2 }) },
                      "weights: expected device cuda:0 (the logits' device), got cpu"))
    assert.truthy(has(err{ logits = x, top_k = 2, method = "minimax2", bias = moe.zeros({ 8 }) },
                      "bias: expected device cuda:0 (the logits' device), got cpu"))
  end)
end)

describe("moe.route in a CUDA graph #gpu", function()
  it("replays see new logits copied into the captured input: replay buffer follows every time", function()
    local Tmax, T, E, K = 256, 200, 256, 8
    local x = moe.randn({ T, E }, { seed = 41 }):to("cuda")
    local b = moe.randn({ E }, { seed = 42, std = 0.05 }):to("cuda")
    local ids = moe.empty({ T, K }, { dtype = "i32", device = "cuda" })
    local w = moe.empty({ T, K }, { device = "cuda" })
    local buf = moe.full({ Tmax, K }, -1, { dtype = "i16", device = "cuda" })
    local args = { logits = x, bias = b, method = "deepseekv3", top_k = K, n_group = 8, topk_group = 4,
                   scale = 2.5, ids = ids, weights = w, replay = buf }
    moe.synchronize("cuda")
    local g = moe.graph.capture(function() moe.route(args) end)
    local bcpu = b:to("cpu")
    local prev
    for rep = 1, 4 do
      local new = moe.randn({ T, E }, { seed = 1000 + rep })
      x:copy_(new)
      g:replay()
      moe.synchronize("cuda")
      local ref = moe.route{ logits = new, bias = bcpu, method = "deepseekv3", top_k = K, n_group = 8,
                             topk_group = 4, scale = 2.5 }
      check(ref, { ids = ids, weights = w }, 1e-6, "graph replay " .. rep)
      local rb, ri = buf:totable(), ref.ids:totable()
      for t = 1, T do assert.same(ri[t], rb[t]) end
      for t = T + 1, Tmax do
        for k = 1, K do assert.equal(-1, rb[t][k]) end
      end
      local now = buf:totable()
      if prev then assert.are_not.same(prev, now) end -- new logits, new routing
      prev = now
    end
    g:free()
  end)

  it("every method can be captured and replayed", function()
    local x = moe.randn({ 64, 128 }, { seed = 51 }):to("cuda")
    for _, m in ipairs(moe.routing_methods()) do
      local K = m.name == "llama4" and 1 or 4
      local ids = moe.empty({ 64, K }, { dtype = "i32", device = "cuda" })
      local w = moe.empty({ 64, K }, { device = "cuda" })
      local buf = moe.full({ 64, K }, -1, { dtype = "i16", device = "cuda" })
      local g = moe.graph.capture(function()
        moe.route{ logits = x, method = m.name, top_k = K, ids = ids, weights = w, replay = buf }
      end)
      local new = moe.randn({ 64, 128 }, { seed = 60 })
      x:copy_(new)
      g:replay()
      moe.synchronize("cuda")
      local ref = moe.route{ logits = new, method = m.name, top_k = K }
      check(ref, { ids = ids, weights = w }, 1e-6, "graph " .. m.name)
      assert.same(ref.ids:totable(), buf:totable())
      g:free()
    end
  end)
end)
