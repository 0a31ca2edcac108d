-- Routing on the CPU reference: hand-worked cases per method (the expected ids and weights are
-- worked out here with plain Lua math, never by the code under test), ties, DeepSeek groups,
-- NaN/inf policy, replay, preallocated outputs, T = 0 and every validation error.
local moe = require("moe")
local H = require("spec.helper")

local exp = math.exp
local function sig(x) return 1 / (1 + exp(-x)) end
local NAN, INF = 0 / 0, math.huge

local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end

-- logits from a nested table (f32 unless dtype given)
local function L(rows, dtype) return moe.tensor(rows, { dtype = dtype or "f32" }) end

local function route(args)
  local r = moe.route(args)
  return r.ids:totable(), r.weights:totable(), r
end

local function assert_weights(expected, got, rtol)
  assert.equal(#expected, #got)
  for t = 1, #expected do
    assert.equal(#expected[t], #got[t])
    for k = 1, #expected[t] do
      local e, g = expected[t][k], got[t][k]
      if not H.close(g, e, rtol or 1e-6, 1e-30) then
        error(string.format("weight [%d][%d]: expected %.9g, got %.9g", t, k, e, g), 2)
      end
    end
  end
end

describe("moe.route methods (hand-worked)", function()
  it("default: softmax over all E, chosen probabilities, no renormalisation", function()
    local ids, w = route{ logits = L{{1, 3, 2, 0}}, method = "default", top_k = 2 }
    local S = exp(1) + exp(3) + exp(2) + exp(0)
    assert.same({{1, 2}}, ids)
    assert_weights({{exp(3) / S, exp(2) / S}}, w)
  end)

  it("renormalize: top-K of the logits, softmax over the K chosen; ties go to the lower index", function()
    local ids, w = route{ logits = L{{0.5, 0.5, -1, 2}}, method = "renormalize", top_k = 2 }
    assert.same({{3, 0}}, ids) -- 0.5 at experts 0 and 1: expert 0 wins
    local d = 1 + exp(-1.5)
    assert_weights({{1 / d, exp(-1.5) / d}}, w)
  end)

  it("renormalize_naive: same ids and (to rounding) weights as renormalize", function()
    local ids, w = route{ logits = L{{0.5, 0.5, -1, 2}}, method = "renormalize_naive", top_k = 2 }
    assert.same({{3, 0}}, ids)
    local d = 1 + exp(-1.5)
    assert_weights({{1 / d, exp(-1.5) / d}}, w)
  end)

  it("topk: raw logits as weights, negative logits included", function()
    local ids, w = route{ logits = L{{-3, -1, -2, -5}}, method = "topk", top_k = 2 }
    assert.same({{1, 2}}, ids)
    assert.same({{-1, -2}}, w)
  end)

  it("sigmoid_renorm: sigmoid scores, normalised or not", function()
    local ids, w = route{ logits = L{{0, 2, -2, 1}}, method = "sigmoid_renorm", top_k = 2 }
    assert.same({{1, 3}}, ids)
    local d = sig(2) + sig(1)
    assert_weights({{sig(2) / d, sig(1) / d}}, w)
    local ids2, w2 = route{ logits = L{{0, 2, -2, 1}}, method = "sigmoid_renorm", top_k = 2,
                            normalize = false }
    assert.same({{1, 3}}, ids2)
    assert_weights({{sig(2), sig(1)}}, w2)
  end)

  it("deepseekv3 without groups: the bias changes the choice, not the weights", function()
    local ids, w = route{ logits = L{{0, 0, 0, 0}}, bias = moe.tensor({0, 0.3, -0.1, 0.2}),
                          method = "deepseekv3", top_k = 2, scale = 2 }
    assert.same({{1, 3}}, ids)
    -- s = 0.5 for both: 0.5 * 2 / (1 + 1e-20)
    assert_weights({{1, 1}}, w)
  end)

  it("deepseekv3 with groups: the group step overrides the per-expert choice", function()
    -- groups of 2: {4, -4} -> s .982 + .018 = 1.000; {1, 1} -> 1.462; {2, .5} -> 1.503;
    -- {-1, -2} -> .388.  Kept (topk_group 2): groups 2 and 1.  Per expert, expert 0 (s .982)
    -- would be first; with groups it is out.  Among 2,3,4,5: 4 (.881), then 2 and 3 tie
    -- (.731): expert 2.
    local logits = L{{4, -4, 1, 1, 2, 0.5, -1, -2}}
    local ids, w = route{ logits = logits, method = "deepseekv3", top_k = 2, n_group = 4,
                          topk_group = 2, scale = 2.5 }
    assert.same({{4, 2}}, ids)
    local d = sig(2) + sig(1)
    assert_weights({{sig(2) * 2.5 / d, sig(1) * 2.5 / d}}, w)
    local ids1 = route{ logits = logits, method = "deepseekv3", top_k = 2, scale = 2.5 }
    assert.same({{0, 4}}, ids1) -- without groups
  end)

  it("deepseekv3 groups: tied group scores keep the lower group index; the bias counts in the group score", function()
    -- groups of 2, all logits 0 (s = .5); bias lifts group 3 by 0.1 each: group scores
    -- 1, 1, 1, 1.2 -> keep group 3 and (tie) group 0.
    local ids = route{ logits = L{{0, 0, 0, 0, 0, 0, 0, 0}},
                       bias = moe.tensor({0, 0, 0, 0, 0, 0, 0.1, 0.1}), method = "deepseekv3",
                       top_k = 4, n_group = 4, topk_group = 2 }
    assert.same({{6, 7, 0, 1}}, ids)
  end)

  it("deepseekv3 groups: the score is the sum of the TOP-2 of the group, not of all", function()
    -- groups of 4: {3, 3, -9, -9} -> top-2 sum 2*s(3) = 1.905 (sum of all: 1.905 + .0002)
    -- vs {1, 1, 1, 1} -> 2*s(1) = 1.462 (sum of all 2.924).  Keep 1 group: group 0.
    local ids = route{ logits = L{{3, 3, -9, -9, 1, 1, 1, 1}}, method = "deepseekv3", top_k = 2,
                       n_group = 2, topk_group = 1 }
    assert.same({{0, 1}}, ids)
  end)

  it("minimax2: bias for selection, s / (sum s + 1e-20), scale ignored", function()
    -- c = s + b: s(1) .731, s(0) + 1 = 1.5, s(-1) .269, s(2) .881 -> experts 1, 3
    local args = { logits = L{{1, 0, -1, 2}}, bias = moe.tensor({0, 1, 0, 0}), method = "minimax2",
                   top_k = 2 }
    local ids, w = route(args)
    assert.same({{1, 3}}, ids)
    local d = sig(0) + sig(2)
    assert_weights({{sig(0) / d, sig(2) / d}}, w)
    args.scale = 3
    local _, w3 = route(args)
    assert.same(w, w3)
  end)

  it("llama4: top-1 of the logits (tie to the lower index), weight sigmoid(l)", function()
    local ids, w = route{ logits = L{{0.1, 0.7, -2, 0.7}}, method = "llama4", top_k = 1 }
    assert.same({{1}}, ids)
    assert_weights({{sig(0.7)}}, w)
  end)

  it("K = E returns every expert in descending order", function()
    local ids, w = route{ logits = L{{2, 1, 3}}, method = "renormalize", top_k = 3 }
    assert.same({{2, 0, 1}}, ids)
    local d = exp(0) + exp(-1) + exp(-2)
    assert_weights({{1 / d, exp(-1) / d, exp(-2) / d}}, w)
  end)

  it("K = 1 and several tokens: each row routed independently", function()
    local ids, w = route{ logits = L{{1, 2}, {5, -5}, {0, 0}}, method = "default", top_k = 1 }
    assert.same({{1}, {0}, {0}}, ids)
    assert_weights({{exp(2) / (exp(1) + exp(2))}, {1 / (1 + exp(-10))}, {0.5}}, w)
  end)

  it("bf16 and f16 logits give the f32 answer for exactly representable values", function()
    for _, dt in ipairs{ "bf16", "f16" } do
      local ids, w = route{ logits = L({{1, 3, 2, 0}}, dt), method = "default", top_k = 2 }
      local S = exp(1) + exp(3) + exp(2) + exp(0)
      assert.same({{1, 2}}, ids)
      assert_weights({{exp(3) / S, exp(2) / S}}, w)
    end
  end)

  it("a bf16 bias works like the f32 one", function()
    local ids = route{ logits = L{{0, 0, 0, 0}}, bias = moe.tensor({0, 0.25, -0.5, 0.125}, { dtype = "bf16" }),
                       method = "minimax2", top_k = 2 }
    assert.same({{1, 3}}, ids)
  end)

  it("weights_dtype = bf16 returns the f32 weights rounded to bf16", function()
    local r = moe.route{ logits = L{{1, 3, 2, 0}}, method = "default", top_k = 2, weights_dtype = "bf16" }
    assert.equal("bf16", r.weights:dtype())
    local S = exp(1) + exp(3) + exp(2) + exp(0)
    local want = moe.tensor({{exp(3) / S, exp(2) / S}}, { dtype = "bf16" }):totable()
    assert.same(want, r.weights:totable())
  end)

  it("prints a readable summary", function()
    local r = moe.route{ logits = L{{1, 3, 2, 0}}, method = "renormalize", top_k = 2 }
    local s = tostring(r)
    assert.truthy(has(s, "method renormalize"))
    assert.truthy(has(s, "[0] 1:"))
  end)

  it("lists the methods with their parameters", function()
    local list = moe.routing_methods()
    local names = {}
    for i, m in ipairs(list) do
      names[i] = m.name
      assert.is_string(m.description)
      assert.is_table(m.params)
    end
    assert.same({ "default", "renormalize", "renormalize_naive", "topk", "sigmoid_renorm",
                  "deepseekv3", "minimax2", "llama4" }, names)
    assert.same({ "top_k", "bias", "n_group", "topk_group", "scale" }, list[6].params)
  end)
end)

describe("moe.route NaN and infinity policy", function()
  it("reads a NaN logit as -inf: never chosen before a number; ties with -inf go to the lower index", function()
    local ids, w = route{ logits = L{{NAN, 1, -INF, 0}}, method = "renormalize", top_k = 4 }
    assert.same({{1, 3, 0, 2}}, ids)
    local d = 1 + exp(-1)
    assert_weights({{1 / d, exp(-1) / d, 0, 0}}, w)
  end)

  it("topk reports a NaN logit's weight as -inf", function()
    local ids, w = route{ logits = L{{NAN, -1}}, method = "topk", top_k = 2 }
    assert.same({{1, 0}}, ids)
    assert.equal(-1, w[1][1])
    assert.equal(-INF, w[1][2])
  end)

  it("a +inf logit is chosen first; softmax weights of that token are NaN (inf - inf)", function()
    for _, m in ipairs{ "renormalize", "default", "renormalize_naive" } do
      local ids, w = route{ logits = L{{0, INF, 1}}, method = m, top_k = 2 }
      assert.same({{1, 2}}, ids)
      assert.is_true(w[1][1] ~= w[1][1])
    end
  end)

  it("all logits NaN/-inf: ids are still distinct and valid (lowest indices), softmax weights NaN", function()
    local ids, w = route{ logits = L{{-INF, NAN, -INF}}, method = "renormalize", top_k = 2 }
    assert.same({{0, 1}}, ids)
    assert.is_true(w[1][1] ~= w[1][1])
  end)

  it("sigmoid methods stay finite: s(+inf) = 1, s(-inf) = s(NaN) = 0", function()
    local ids, w = route{ logits = L{{NAN, INF, -INF, 0}}, method = "deepseekv3", top_k = 3, scale = 1 }
    assert.same({{1, 3, 0}}, ids) -- c: 0, 1, 0, .5 -> 1, 3, then 0 (tie with 2, lower index)
    assert_weights({{1 / 1.5, 0.5 / 1.5, 0}}, w)
    local il, wl = route{ logits = L{{0, INF}}, method = "llama4", top_k = 1 }
    assert.same({{1}}, il)
    assert.same({{1}}, wl)
  end)

  it("deepseekv3: a NaN logit's expert still competes through its bias (s = 0, c = b)", function()
    local ids = route{ logits = L{{NAN, 0, 0}}, bias = moe.tensor({1, 0, 0}), method = "deepseekv3",
                       top_k = 1 }
    assert.same({{0}}, ids) -- c = 0 + 1 > 0.5
  end)
end)

describe("moe.route replay and outputs", function()
  local logits = moe.randn({5, 16}, { seed = 7 })

  it("replay rows equal the ids as int16; rows >= T keep their -1 sentinel", function()
    local buf = moe.full({9, 3}, -1, { dtype = "i16" })
    local r = moe.route{ logits = logits, method = "renormalize", top_k = 3, replay = buf }
    local ids, rep = r.ids:totable(), buf:totable()
    for t = 1, 5 do assert.same(ids[t], rep[t]) end
    for t = 6, 9 do assert.same({-1, -1, -1}, rep[t]) end
  end)

  it("every method writes replay, and outputs are bit-identical with and without it", function()
    local b = moe.randn({16}, { seed = 8, std = 0.1 })
    for _, m in ipairs(moe.routing_methods()) do
      local args = { logits = logits, method = m.name, top_k = m.name == "llama4" and 1 or 4 }
      if m.name == "deepseekv3" then args.n_group = 4; args.topk_group = 2; args.bias = b end
      if m.name == "minimax2" then args.bias = b end
      local r0 = moe.route(args)
      local buf = moe.full({5, args.top_k}, -1, { dtype = "i16" })
      args.replay = buf
      local r1 = moe.route(args)
      assert.same(r0.ids:totable(), r1.ids:totable())
      assert.same(r0.weights:totable(), r1.weights:totable())
      assert.same(r0.ids:totable(), buf:totable())
    end
  end)

  it("writes into preallocated ids and weights and returns them", function()
    local ids = moe.full({5, 2}, -7, { dtype = "i32" })
    local w = moe.full({5, 2}, -7, { dtype = "bf16" })
    local r = moe.route{ logits = logits, method = "topk", top_k = 2, ids = ids, weights = w }
    assert.is_true(rawequal(ids, r.ids))
    assert.is_true(rawequal(w, r.weights))
    local fresh = moe.route{ logits = logits, method = "topk", top_k = 2 }
    assert.same(fresh.ids:totable(), ids:totable())
    assert.same(fresh.weights:to("bf16"):totable(), w:totable())
  end)

  it("T = 0 is a no-op that returns empty outputs and leaves replay alone", function()
    local buf = moe.full({2, 2}, -1, { dtype = "i16" })
    local r = moe.route{ logits = moe.empty({0, 8}), method = "renormalize", top_k = 2, replay = buf }
    assert.same({0, 2}, r.ids:shape())
    assert.same({0, 2}, r.weights:shape())
    assert.same({{-1, -1}, {-1, -1}}, buf:totable())
  end)

  it("is deterministic: the same call twice gives the same bits", function()
    local x = moe.randn({64, 256}, { seed = 3 })
    local b = moe.randn({256}, { seed = 4, std = 0.01 })
    local a1 = moe.route{ logits = x, bias = b, method = "deepseekv3", top_k = 8, n_group = 8, topk_group = 4, scale = 2.5 }
    local a2 = moe.route{ logits = x, bias = b, method = "deepseekv3", top_k = 8, n_group = 8, topk_group = 4, scale = 2.5 }
    assert.same(a1.ids:totable(), a2.ids:totable())
    assert.same(a1.weights:totable(), a2.weights:totable())
  end)
end)

describe("moe.route validation errors", function()
  local x = moe.randn({4, 8}, { seed = 1 })
  local function err(args)
    local ok, e = pcall(moe.route, args)
    assert.is_false(ok)
    return tostring(e)
  end
  local function with(over)
    local a = { logits = x, method = "renormalize", top_k = 2 }
    for k, v in pairs(over) do a[k] = v end
    return a
  end
  local cases = {
    { with{ method = "nope" }, 'name: expected one of default, renormalize' },
    { with{ top_k = 0 }, "top_k: expected 1..32, got 0" },
    { with{ top_k = 33 }, "top_k: expected 1..32, got 33" },
    { with{ top_k = 9 }, "top_k: expected <= E (8), got 9" },
    { with{ logits = moe.empty({1, 2049}) }, "logits: expected 1..2048 experts (dim 1), got 2049" },
    { with{ logits = moe.empty({4, 8}, { dtype = "i32" }) }, "logits: expected dtype f32, bf16 or f16, got i32" },
    { with{ logits = moe.empty({8}) }, "logits: expected 2 dimensions [T, E], got 1" },
    { with{ logits = moe.randn({8, 4}, { seed = 1 }):transpose(1, 2) }, "logits: expected a contiguous tensor" },
    { with{ method = "llama4" }, "top_k: expected 1 for method llama4, got 2" },
    { with{ n_group = 2, topk_group = 1 }, "n_group: expected 0 or 1 for method renormalize" },
    { with{ method = "deepseekv3", n_group = 3, topk_group = 1 }, "n_group: expected a divisor of E (8), got 3" },
    { with{ method = "deepseekv3", n_group = -1 }, "n_group: expected >= 0, got -1" },
    { with{ method = "deepseekv3", logits = moe.empty({1, 128}), n_group = 64, topk_group = 1 },
      "n_group: expected 2..32, got 64" },
    { with{ method = "deepseekv3", n_group = 4, topk_group = 0 }, "topk_group: expected 1..n_group (4), got 0" },
    { with{ method = "deepseekv3", n_group = 4, topk_group = 5 }, "topk_group: expected 1..n_group (4), got 5" },
    { with{ method = "deepseekv3", n_group = 4, topk_group = 1, top_k = 3 },
      "top_k: expected <= topk_group * E / n_group (2), got 3" },
    { with{ method = "deepseekv3", topk_group = 2 }, "topk_group: expected 0 without groups (n_group 0), got 2" },
    { with{ bias = moe.zeros({8}) }, "bias: expected none for method renormalize" },
    { with{ method = "deepseekv3", bias = moe.zeros({8}, { dtype = "i32" }) }, "bias: expected dtype f32 or bf16, got i32" },
    { with{ method = "deepseekv3", bias = moe.zeros({7}) }, "bias: expected shape [8], got [7]" },
    { with{ method = "deepseekv3", bias = moe.zeros({8, 2}):select(2, 1) }, "bias: expected a contiguous tensor" },
    { with{ scale = 0 / 0, method = "deepseekv3" }, "scale: expected a finite number" },
    { with{ scale = 2 }, "scale: expected 1 for method renormalize" },
    { with{ weights_dtype = "f16" }, "weights_dtype: expected f32 or bf16, got f16" },
    { with{ ids = moe.empty({4, 2}, { dtype = "i64" }) }, "ids: expected dtype i32, got i64" },
    { with{ ids = moe.empty({4, 3}, { dtype = "i32" }) }, "ids: expected shape [4, 2], got [4, 3]" },
    { with{ ids = moe.empty({8}, { dtype = "i32" }) }, "ids: expected 2 dimensions, got 1" },
    { with{ ids = moe.empty({2, 4}, { dtype = "i32" }):transpose(1, 2) }, "ids: expected a contiguous tensor" },
    { with{ weights = moe.empty({4, 2}, { dtype = "f16" }) }, "weights: expected dtype f32 or bf16, got f16" },
    { with{ weights = moe.empty({3, 2}) }, "weights: expected shape [4, 2], got [3, 2]" },
    { with{ replay = moe.empty({4, 2}, { dtype = "i32" }) }, "replay: expected dtype i16, got i32" },
    { with{ replay = moe.empty({8}, { dtype = "i16" }) }, "replay: expected 2 dimensions, got 1" },
    { with{ replay = moe.empty({4, 3}, { dtype = "i16" }) }, "replay: expected dim 1 == top_k (2), got 3" },
    { with{ replay = moe.empty({3, 2}, { dtype = "i16" }) }, "replay: expected dim 0 >= T (4), got 3" },
    { with{ replay = moe.empty({2, 4}, { dtype = "i16" }):transpose(1, 2) }, "replay: expected a contiguous tensor" },
  }
  for i, c in ipairs(cases) do
    it("case " .. i .. ": " .. c[2], function()
      local e = err(c[1])
      if not has(e, c[2]) then error("expected an error containing '" .. c[2] .. "', got: " .. e) end
      assert.truthy(has(e, "moe.route"))
    end)
  end

  it("a bad or freed tensor argument is blamed on the caller's line", function()
    local ok, e = pcall(function() local _ = moe.route{ logits = "x", method = "topk", top_k = 1 } end)
    assert.is_false(ok)
    assert.matches('route_spec%.lua:%d+: moe%.route: logits: expected a tensor, got "x"$', e)
    local lg = moe.zeros({2, 4})
    lg:free()
    ok, e = pcall(function() local _ = moe.route{ logits = lg, method = "topk", top_k = 1 } end)
    assert.is_false(ok)
    assert.matches("route_spec%.lua:%d+: moe%.route: logits: tensor was freed$", e)
    ok, e = pcall(function() local _ = moe.route{ logits = moe.zeros({2, 4}), top_k = 1.5 } end)
    assert.is_false(ok)
    assert.matches("route_spec%.lua:%d+: moe%.route: top_k: expected an integer, got 1.5$", e)
  end)

  it("misuse on the Lua side names the argument", function()
    assert.truthy(has(err{ method = "renormalize", top_k = 2 }, "logits: expected a tensor, got nil"))
    assert.truthy(has(err(with{ top_k = 1.5 }), "top_k: expected an integer, got 1.5"))
    assert.truthy(has(err(with{ normalize = 1 }), "normalize: expected a boolean"))
    assert.truthy(has(err(with{ topk = 2 }), "unknown argument"))
    assert.truthy(has(err(with{ method = 5 }), "method: expected a method name"))
  end)

  it("a failed call leaves preallocated outputs untouched", function()
    local ids = moe.full({4, 2}, -3, { dtype = "i32" })
    err(with{ ids = ids, replay = moe.empty({1, 2}, { dtype = "i16" }) })
    assert.same({{-3, -3}, {-3, -3}, {-3, -3}, {-3, -3}}, ids:totable())
  end)
end)
