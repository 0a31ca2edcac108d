-- Replay traces from Lua: every comparison metric on hand-built traces (answers worked out
-- by hand in the comments), set semantics, -1 handling, shape errors, recording, save/load
-- round trips, a plain-Lua reader of our safetensors bytes, .npy import, chunked recording
-- that survives an interruption, SVG reports checked by an XML parser, and the CLI.
local moe = require("moe")
local json = require("moe.json")
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")

local error_of = H.error_of
local SRC = H.source_dir
local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end
local function near(a, b, tol)
  tol = tol or 1e-12
  assert(math.abs(a - b) <= tol, string.format("expected %.17g, got %.17g", b, a))
end
local log2 = function(x) return math.log(x) / math.log(2) end

local function sh(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  assert(os.execute("mkdir -p " .. sh(p)) == 0)
  return p
end
local function read_all(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end
local function write_all(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- A trace from a nested table ids[t][l][k] (E experts, optional weights[t][l][k]).
local function mk(ids, E, weights, token_ids)
  local tr = moe.trace.new{ layers = #ids[1], top_k = #ids[1][1], num_experts = E,
                            weights = weights ~= nil }
  tr:append(ids, { weights = weights, token_ids = token_ids })
  return tr
end

-- Case 1: T = 4 tokens, L = 2 layers, K = 2, E = 4.
--            layer 0                 layer 1
--   A  t1   [0,1]                   [2,3]
--      t2   [1,2]                   [3,0]
--      t3   [-1,-1] (not captured)  [0,1]
--      t4   [2,3]                   [1,2]
--   B  t1   [1,0] same set          [2,3] exact
--      t2   [1,3] n{1} u{1,2,3}     [0,3] same set, other order
--      t3   [0,1] skipped (A -1)    [0,2] n{0} u{0,1,2}
--      t4   [0,1] n{} u{0,1,2,3}    [-1,-1] skipped (B -1)
local A1 = { { { 0, 1 }, { 2, 3 } }, { { 1, 2 }, { 3, 0 } }, { { -1, -1 }, { 0, 1 } },
             { { 2, 3 }, { 1, 2 } } }
local B1 = { { { 1, 0 }, { 2, 3 } }, { { 1, 3 }, { 0, 3 } }, { { 0, 1 }, { 0, 2 } },
             { { 0, 1 }, { -1, -1 } } }

describe("moe.trace.compare", function()
  local c = moe.trace.compare(mk(A1, 4), mk(B1, 4))

  it("computes the per-layer metrics as sets", function()
    -- layer 0: compared t1, t2, t4 (3), skipped t3 (1); t2 and t4 differ -> 2/3;
    --   no position is identical in order (t1 is reversed) -> exact 0;
    --   shared 2 + 1 + 0 = 3 -> overlap 3 / (2*3) = 1/2; jaccard (1 + 1/3 + 0)/3 = 4/9.
    local l0 = c.per_layer[1]
    assert.equal(3, l0.compared); assert.equal(1, l0.skipped); assert.equal(2, l0.differing)
    near(l0.router_disagreement, 2 / 3)
    near(l0.exact_agreement, 0)
    near(l0.overlap, 1 / 2)
    near(l0.jaccard, 4 / 9)
    -- layer 1: compared t1, t2, t3, skipped t4; only t3 differs -> 1/3 (t2 is the same set
    --   in another order: agreement); exact t1 -> 1/3; shared 2 + 2 + 1 = 5 -> 5/6;
    --   jaccard (1 + 1 + 1/3)/3 = 7/9.
    local l1 = c.per_layer[2]
    assert.equal(3, l1.compared); assert.equal(1, l1.skipped); assert.equal(1, l1.differing)
    near(l1.router_disagreement, 1 / 3)
    near(l1.exact_agreement, 1 / 3)
    near(l1.overlap, 5 / 6)
    near(l1.jaccard, 7 / 9)
  end)

  it("computes the overall and per-token metrics", function()
    -- overall: 6 compared, 2 skipped, 3 differing -> 1/2; exact 1/6; shared 8 -> 8/12;
    --   jaccard (3*4/9 + 3*7/9)/6 = (11/3)/6 = 11/18.
    assert.equal(8, c.positions); assert.equal(6, c.compared); assert.equal(2, c.skipped)
    near(c.router_disagreement, 1 / 2)
    near(c.exact_agreement, 1 / 6)
    near(c.overlap, 2 / 3)
    near(c.jaccard, 11 / 18)
    -- tokens: t1 none; t2 differs at layer 0; t3 at layer 1; t4 at layer 0 -> 3 of 4,
    --   3 differing layers over 4 tokens -> 0.75; first differing layer histogram [2, 1].
    near(c.token_disagreement, 3 / 4)
    near(c.mean_layers_differing, 3 / 4)
    assert.same({ 2, 1 }, c.first_differing_layer)
    assert.equal(4, c.tokens_compared); assert.equal(0, c.tokens_skipped)
  end)

  it("computes loads, balance and Jensen-Shannon divergence over compared positions", function()
    -- loads: A l0 = t1{0,1} t2{1,2} t4{2,3} -> [1,2,2,1]; B l0 = {1,0} {1,3} {0,1} -> [2,3,0,1]
    --        A l1 = {2,3} {3,0} {0,1} -> [2,1,1,2];     B l1 = {2,3} {0,3} {0,2} -> [2,0,2,2]
    assert.same({ { 1, 2, 2, 1 }, { 2, 1, 1, 2 } }, c.loads.a)
    assert.same({ { 2, 3, 0, 1 }, { 2, 0, 2, 2 } }, c.loads.b)
    local la, lb = c.per_layer[1].load.a, c.per_layer[1].load.b
    -- A l0 [1,2,2,1]: mean 1.5, max/mean 4/3, std 0.5 -> cv 1/3, jain 6^2/(4*10) = 0.9,
    --   entropy (2*(1/6)ln6 + 2*(1/3)ln3)/ln4; hot expert 1 (tie 1/2: lower id).
    near(la.max_over_mean, 4 / 3); near(la.cv, 1 / 3); near(la.jain, 0.9)
    near(la.entropy, ((1 / 3) * math.log(6) + (2 / 3) * math.log(3)) / math.log(4))
    assert.equal(1, la.hot_expert)
    -- B l0 [2,3,0,1]: max/mean 3/1.5 = 2; var (.25+2.25+2.25+.25)/4 = 5/4 -> cv (sqrt5/2)/1.5;
    --   jain 36/(4*14) = 9/14; entropy ((1/3)ln3 + (1/2)ln2 + (1/6)ln6)/ln4.
    near(lb.max_over_mean, 2); near(lb.cv, math.sqrt(5) / 3); near(lb.jain, 9 / 14)
    near(lb.entropy, ((1 / 3) * math.log(3) + 0.5 * math.log(2) + (1 / 6) * math.log(6)) / math.log(4))
    -- B l1 [2,0,2,2]: max/mean 4/3, var (3*.25 + 2.25)/4 = 3/4 -> cv sqrt3/3, jain 36/48.
    local lb1 = c.per_layer[2].load.b
    near(lb1.cv, math.sqrt(3) / 3); near(lb1.jain, 3 / 4); near(lb1.entropy, math.log(3) / math.log(4))
    -- per trace = mean over layers: A (both layers [1,2,2,1]-like): 4/3, 1/3, 0.9;
    --   B: max/mean (2 + 4/3)/2 = 5/3, jain (9/14 + 3/4)/2 = 39/56, cv (sqrt5/3 + sqrt3/3)/2.
    near(c.load.a.max_over_mean, 4 / 3); near(c.load.a.cv, 1 / 3); near(c.load.a.jain, 0.9)
    near(c.load.b.max_over_mean, 5 / 3); near(c.load.b.jain, 39 / 56)
    near(c.load.b.cv, (math.sqrt(5) / 3 + math.sqrt(3) / 3) / 2)
    -- JS l0: P = [1/6,1/3,1/3,1/6], Q = [1/3,1/2,0,1/6], M = [1/4,5/12,1/6,1/6]
    --   KL(P|M) = 1/6 log2(2/3) + 1/3 log2(4/5) + 1/3 log2 2;  KL(Q|M) = 1/3 log2(4/3) + 1/2 log2(6/5)
    local js0 = 0.5 * ((1 / 6) * log2(2 / 3) + (1 / 3) * log2(4 / 5) + 1 / 3) +
                0.5 * ((1 / 3) * log2(4 / 3) + 0.5 * log2(6 / 5))
    -- JS l1: P = [1/3,1/6,1/6,1/3], Q = [1/3,0,1/3,1/3], M = [1/3,1/12,1/4,1/3]
    --   KL(P|M) = 1/6 log2 2 + 1/6 log2(2/3);  KL(Q|M) = 1/3 log2(4/3)
    local js1 = 0.5 * (1 / 6 + (1 / 6) * log2(2 / 3)) + 0.5 * ((1 / 3) * log2(4 / 3))
    near(c.js_divergence[1], js0); near(c.js_divergence[2], js1)
    near(c.js_divergence_mean, (js0 + js1) / 2)
  end)

  it("computes the weight metrics when both traces have weights", function()
    -- t1: A [0,1] w [.6,.4], B [1,2] w [.7,.3]: shared 1: |.4-.7| = .3; A\B {0}: .6,
    --     B\A {2}: .3 -> moved (.6 + .3)/2 = .45
    -- t2: A [2,3] w [.5,.5], B [3,2] w [.25,.75]: |.5-.75| = .25 (2), |.5-.25| = .25 (3); moved 0
    -- mean |dw| = (.3 + .25 + .25)/3 = .8/3; mass moved (.45 + 0)/2 = .225
    local a = mk({ { { 0, 1 } }, { { 2, 3 } } }, 4, { { { 0.6, 0.4 } }, { { 0.5, 0.5 } } })
    local b = mk({ { { 1, 2 } }, { { 3, 2 } } }, 4, { { { 0.7, 0.3 } }, { { 0.25, 0.75 } } })
    local w = moe.trace.compare(a, b)
    assert.is_true(w.has_weights)
    near(w.weights.abs_diff, 0.8 / 3, 1e-7)
    near(w.weights.mass_moved, 0.225, 1e-7)
    assert.equal(3, w.weights.pairs)
    near(w.per_layer[1].weight_mass_moved, 0.225, 1e-7)
    assert.is_nil(moe.trace.compare(a, b, { ignore_weights = true }).weights)
    assert.is_nil(c.weights) -- case 1 has none
  end)

  it("agrees with itself on identical traces and on permuted ids", function()
    local a = mk(A1, 4)
    local perm = {}
    for t = 1, 4 do
      perm[t] = {}
      for l = 1, 2 do perm[t][l] = { A1[t][l][2], A1[t][l][1] } end
    end
    local s = moe.trace.compare(a, mk(perm, 4))
    -- every captured position holds the same set: disagreement 0, jaccard 1, overlap 1;
    -- exact agreement 0: every row is reversed.  Only t3 l0 (-1) is skipped.
    assert.equal(0, s.router_disagreement); assert.equal(1, s.jaccard); assert.equal(1, s.overlap)
    assert.equal(0, s.exact_agreement); assert.equal(1, s.skipped); assert.equal(0, s.token_disagreement)
    assert.equal(0, s.js_divergence_mean)
  end)

  it("counts fully skipped tokens and yields NaN where nothing was compared", function()
    local a = mk({ { { -1, -1 } }, { { 0, 1 } } }, 2)
    local b = mk({ { { 0, 1 } }, { { -1, -1 } } }, 2)
    local s = moe.trace.compare(a, b)
    -- both tokens skipped: 0 compared, 2 skipped; ratios have no denominator.
    assert.equal(0, s.compared); assert.equal(2, s.skipped); assert.equal(2, s.tokens_skipped)
    assert.is_true(s.router_disagreement ~= s.router_disagreement)
    assert.truthy(has(s:json(), '"router_disagreement": null'))
  end)

  it("refuses traces of different shapes or expert counts with clear errors", function()
    local a = mk(A1, 4)
    local fewer = { A1[1], A1[2], A1[3] }
    local err = error_of(moe.trace.compare, a, mk(fewer, 4))
    assert.truthy(has(err, "b: expected 4 tokens (as a), got 3"), err)
    local one_layer = {}
    for t = 1, 4 do one_layer[t] = { A1[t][1] } end
    err = error_of(moe.trace.compare, a, mk(one_layer, 4))
    assert.truthy(has(err, "b: expected 2 layers (as a), got 1"), err)
    local k1 = {}
    for t = 1, 4 do k1[t] = { { 0 }, { 1 } } end
    err = error_of(moe.trace.compare, a, mk(k1, 4))
    assert.truthy(has(err, "b: expected top_k 2 (as a), got 1"), err)
    err = error_of(moe.trace.compare, a, mk(A1, 8))
    assert.truthy(has(err, "b: expected num_experts 4 (as a), got 8"), err)
    err = error_of(moe.trace.compare, a, "x")
    assert.truthy(has(err, "moe.trace.compare: b: expected a trace"), err)
    -- ids out of range are refused when they enter a trace
    err = error_of(mk, { { { 0, 4 } } }, 4)
    assert.truthy(has(err, "expected expert ids < 4, got 4"), err)
  end)

  it("writes JSON with the stable keys in a fixed order", function()
    local text = c:json()
    local keys = { "router_disagreement", "token_disagreement", "mean_layers_differing", "jaccard",
                   "overlap", "exact_agreement", "skipped", "per_layer", "load", "js_divergence" }
    local last = 0
    for _, k in ipairs(keys) do
      local p = text:find('\n  "' .. k .. '":', 1, true) -- top level (indent 2)
      assert.truthy(p, k)
      assert.is_true(p > last, "key order at " .. k)
      last = p
    end
    local v = json.decode(text)
    near(v.jaccard, 11 / 18, 1e-15)
    assert.equal(2, #v.per_layer)
    for _, k in ipairs{ "cv", "jain", "max_over_mean", "entropy" } do
      assert.is_number(v.load.a[k]); assert.is_number(v.load.b[k])
    end
    assert.equal(2, #v.js_divergence)
    assert.equal(c:json(), c:json()) -- deterministic
  end)

  it("prints a compact table", function()
    local s = tostring(c)
    assert.truthy(has(s, "router disagreement"), s)
    assert.truthy(has(s, "50.00%"), s)
    assert.truthy(has(s, "token disagreement"), s)
    assert.truthy(has(s, "75.00%"), s)
  end)
end)

describe("trace options", function()
  it("names an unknown option and lists the known ones", function()
    local ok, err = pcall(function() local _ = moe.trace.new{ layers = 1, top_k = 1, topk = 2 } end)
    assert.is_false(ok)
    assert.matches('trace_spec%.lua:%d+: moe%.trace%.new: opts: unknown option "topk" %(known: capacity, ' ..
                   'chunk_tokens, device, dir, layers, meta, num_experts, parts, top_k, weights%)$', err)
  end)
end)

describe("moe.trace.stats", function()
  it("gives per-layer loads over captured positions, balance and hot experts", function()
    -- A1: layer 0 captured t1, t2, t4 -> [1,2,2,1]; layer 1 all four: {2,3} {3,0} {0,1} {1,2}
    --   -> [2,2,2,2] (perfectly even: cv 0, jain 1, max/mean 1, entropy 1).
    local s = moe.trace.stats(mk(A1, 4))
    assert.equal(7, s.captured); assert.equal(1, s.skipped)
    assert.same({ { 1, 2, 2, 1 }, { 2, 2, 2, 2 } }, s.loads)
    near(s.per_layer[2].cv, 0); near(s.per_layer[2].jain, 1); near(s.per_layer[2].entropy, 1)
    near(s.per_layer[2].max_over_mean, 1)
    -- means over layers: jain (0.9 + 1)/2, max/mean (4/3 + 1)/2
    near(s.balance.jain, 0.95); near(s.balance.max_over_mean, 7 / 6)
    -- summed loads [3,4,4,3]: hottest 1 then 2 (ties by id), share 4/14
    assert.equal(1, s.hot_experts[1].expert); assert.equal(2, s.hot_experts[2].expert)
    near(s.hot_experts[1].share, 4 / 14)
    assert.truthy(has(tostring(s), "hot experts: 1"))
  end)

  it("renders a plain terminal heatmap when colour is off", function()
    local s = moe.trace.stats(mk(A1, 4))
    local text = moe.trace.heatmap(s.loads, { color = false })
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    -- header, 2 layer rows, scale line; layer 1 is all at the maximum (2): full blocks
    assert.equal(4, #lines)
    assert.truthy(has(lines[3], "████"), lines[3])
    assert.is_nil(text:find("\27", 1, true))
    assert.equal(text, mk(A1, 4):heatmap({ color = false }))
    local diff = moe.trace.compare(mk(A1, 4), mk(B1, 4)):heatmap({ which = "diff", color = false })
    assert.truthy(has(diff, "load share B - A"), diff)
    local coloured = moe.trace.heatmap(s.loads, { color = true })
    assert.truthy(has(coloured, "\27[38;5;"))
  end)
end)

describe("recording and files", function()
  it("records batches from replay buffers and round-trips through safetensors", function()
    local dir = tmpdir()
    local tr = moe.trace.new{ layers = 2, top_k = 2, num_experts = 4, capacity = 3, weights = true,
                              meta = { model = "toy", quant = "fp8", seed = 7 } }
    tr:replay(1):copy_(moe.tensor({ { 0, 1 }, { 1, 2 }, { 3, 0 } }, { dtype = "i16" }))
    tr:replay(2):copy_(moe.tensor({ { 2, 3 }, { 0, 3 }, { 1, 2 } }, { dtype = "i16" }))
    tr:record_weights(1, moe.tensor({ { 0.5, 0.5 }, { 0.75, 0.25 }, { 1, 0 } }))
    assert.equal(3, tr:commit(3, { token_ids = { 10, 11, 12 } }))
    -- second batch of 2: layer 2 not routed -> stays -1 (buffers were reset by commit)
    tr:replay(1):narrow(1, 1, 2):copy_(moe.tensor({ { 3, 2 }, { 2, 1 } }, { dtype = "i16" }))
    assert.equal(5, tr:commit(2, { token_ids = { 13, 14 } }))
    assert.equal(5, tr:commit(0)) -- an empty batch is a no-op
    assert.same({ 1, 2 }, tr:get(2, 1))
    assert.same({ -1, -1 }, tr:get(4, 2))
    local path = dir .. "/t.safetensors"
    tr:save(path)
    local back = moe.trace.load(path)
    assert.equal(5, back:tokens()); assert.equal(2, back:layers()); assert.equal(2, back:top_k())
    assert.equal(4, back:num_experts())
    assert.same(tr:ids():totable(), back:ids():totable())
    assert.same(tr:weights():totable(), back:weights():totable())
    assert.same({ 10, 11, 12, 13, 14 }, back:token_ids():totable())
    local m = back:meta()
    assert.equal("toy", m.model); assert.equal("fp8", m.quant); assert.equal("7", m.seed)
    assert.equal(moe.version(), m.engine_version)
    assert.truthy(m.created:match("^%d%d%d%d%-%d%d%-%d%dT"))
    local same = moe.trace.compare(tr, back)
    assert.equal(0, same.router_disagreement); assert.equal(1, same.exact_agreement)
    os.execute("rm -rf " .. sh(dir))
  end)

  it("writes standard safetensors (parsed here with plain Lua)", function()
    local dir = tmpdir()
    local tr = mk({ { { 0, 1 }, { 2, -1 } }, { { 3, 2 }, { 1, 0 } } }, 4, nil, { 5, 6 })
    tr:set_meta("model", "toy")
    tr:save(dir .. "/t.safetensors")
    local bytes = read_all(dir .. "/t.safetensors")
    -- 8-byte little-endian header length, JSON header, raw little-endian data
    local n = 0
    for i = 8, 1, -1 do n = n * 256 + bytes:byte(i) end
    local header = json.decode(bytes:sub(9, 8 + n))
    local base = 8 + n
    local e = header.routed_experts
    assert.equal("I16", e.dtype)
    assert.same({ 2, 2, 2 }, { e.shape[1], e.shape[2], e.shape[3] })
    assert.equal(16, e.data_offsets[2] - e.data_offsets[1])
    local vals = {}
    for i = 0, 7 do
      local p = base + e.data_offsets[1] + 2 * i + 1
      local v = bytes:byte(p) + 256 * bytes:byte(p + 1)
      if v >= 32768 then v = v - 65536 end
      vals[#vals + 1] = v
    end
    assert.same({ 0, 1, 2, -1, 3, 2, 1, 0 }, vals)
    assert.equal("I32", header.token_ids.dtype)
    local md = header.__metadata__
    assert.equal("toy", md.model); assert.equal("4", md.num_experts); assert.equal("2", md.top_k)
    assert.equal("2", md.num_layers)
    for k, v in pairs(md) do assert.is_string(v, k) end
    assert.equal(n % 8, 0) -- the header is padded so the data is aligned
    os.execute("rm -rf " .. sh(dir))
  end)

  -- .npy version 1.0 bytes written by hand: magic, version, header length, dict, data.
  local function npy(descr, shape, values, bytes_per)
    local dict = string.format("{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr,
                               table.concat(shape, ", "))
    local total = 10 + #dict + 1
    local pad = (64 - total % 64) % 64
    dict = dict .. string.rep(" ", pad) .. "\n"
    local out = { "\147NUMPY\1\0", string.char(#dict % 256, math.floor(#dict / 256)), dict }
    for _, v in ipairs(values) do
      if v < 0 then v = v + 2 ^ (8 * bytes_per) end
      local b = {}
      for i = 1, bytes_per do
        b[i] = string.char(v % 256)
        v = math.floor(v / 256)
      end
      out[#out + 1] = table.concat(b)
    end
    return table.concat(out)
  end

  it("imports .npy [T, L, K] arrays of int16 and int32", function()
    local dir = tmpdir()
    local vals = { 0, 1, 2, 3, 1, 2, -1, -1, 3, 0, 2, 1 } -- [2 tokens, 3 layers, 2]
    write_all(dir .. "/a16.npy", npy("<i2", { 2, 3, 2 }, vals, 2))
    write_all(dir .. "/a32.npy", npy("<i4", { 2, 3, 2 }, vals, 4))
    for _, name in ipairs{ "a16.npy", "a32.npy" } do
      local tr = moe.trace.load(dir .. "/" .. name)
      assert.equal(2, tr:tokens()); assert.equal(3, tr:layers()); assert.equal(2, tr:top_k())
      assert.equal(0, tr:num_experts()) -- unknown in a bare array
      assert.same({ 1, 2 }, tr:get(1, 3))
      assert.same({ -1, -1 }, tr:get(2, 1))
      assert.same({ 2, 1 }, tr:get(2, 3))
    end
    local a = moe.trace.load(dir .. "/a16.npy", { num_experts = 4 })
    assert.equal(4, a:num_experts())
    local err = error_of(moe.trace.load, dir .. "/a16.npy", { num_experts = 3 })
    assert.truthy(has(err, "expected > every expert id"), err)
    -- a 2-D array is not a trace
    write_all(dir .. "/bad.npy", npy("<i2", { 2, 2 }, { 0, 1, 2, 3 }, 2))
    err = error_of(moe.trace.load, dir .. "/bad.npy")
    assert.truthy(has(err, "expected routed_experts of 3 dims"), err)
    os.execute("rm -rf " .. sh(dir))
  end)

  it("streams chunks atomically: an interrupted run keeps every completed chunk", function()
    local dir = tmpdir() .. "/chunks"
    local function batch(tr, base)
      tr:replay(1):copy_(moe.tensor({ { base % 8, (base + 1) % 8 }, { (base + 2) % 8, (base + 3) % 8 } },
                                    { dtype = "i16" }))
      tr:commit(2)
    end
    local ok, err = pcall(function()
      local tr = moe.trace.new{ layers = 1, top_k = 2, num_experts = 8, capacity = 2, dir = dir,
                                chunk_tokens = 4, parts = false }
      for i = 1, 6 do batch(tr, i) end -- 12 tokens = 3 chunks of 4
      error("simulated crash before close")
    end)
    assert.is_false(ok); assert.truthy(has(err, "simulated crash"))
    collectgarbage()
    local names = {}
    for x in io.popen("ls " .. sh(dir)):lines() do names[#names + 1] = x end
    assert.same({ "chunk-000001.safetensors", "chunk-000002.safetensors", "chunk-000003.safetensors" }, names)
    local back = moe.trace.load(dir)
    assert.equal(12, back:tokens())
    assert.same({ 1, 2 }, back:get(1, 1))
    assert.same({ 0, 1 }, back:get(12, 1)) -- batch 6, row 2: (6+2)%8, (6+3)%8
    -- a temporary file of a write in flight is ignored
    write_all(dir .. "/chunk-000004.safetensors.tmp", "partial")
    assert.equal(12, moe.trace.load(dir):tokens())
    os.execute("rm -rf " .. sh(dir))
  end)

  it("keeps committed batches of an unfinished chunk as part files", function()
    local dir = tmpdir() .. "/parts"
    local tr = moe.trace.new{ layers = 1, top_k = 1, num_experts = 4, capacity = 2, dir = dir,
                              chunk_tokens = 4 }
    local function batch(a, b)
      tr:replay(1):copy_(moe.tensor({ { a }, { b } }, { dtype = "i16" }))
      tr:commit(2)
    end
    batch(0, 1); batch(2, 3) -- chunk 1 complete (4 tokens): its parts are removed
    batch(1, 1)              -- a part of chunk 2
    -- a "crash" here loses nothing committed: chunk 1 (4 tokens) + the part (2 tokens)
    assert.equal(6, moe.trace.load(dir):tokens())
    batch(2, 2)
    assert.equal(dir, tr:close()) -- flushes chunk 2
    local list = {}
    for x in io.popen("ls " .. sh(dir)):lines() do list[#list + 1] = x end
    assert.same({ "chunk-000001.safetensors", "chunk-000002.safetensors" }, list)
    local back = moe.trace.load(dir)
    assert.equal(8, back:tokens())
    assert.same({ 2 }, back:get(8, 1))
    local err = error_of(moe.trace.new, { layers = 1, top_k = 1, capacity = 1, dir = dir })
    assert.truthy(has(err, "expected a directory without chunk files"), err)
    os.execute("rm -rf " .. sh(dir))
  end)

  it("reports malformed files with a message, not a crash", function()
    local dir = tmpdir()
    write_all(dir .. "/junk.safetensors", "\8\0\0\0\0\0\0\0{}      ")
    local err = error_of(moe.trace.load, dir .. "/junk.safetensors")
    assert.truthy(has(err, "routed_experts"), err)
    err = error_of(moe.trace.load, dir .. "/missing.safetensors")
    assert.truthy(has(err, "missing.safetensors"), err)
    err = error_of(moe.trace.load, dir) -- a directory without chunks
    assert.truthy(has(err, "chunk"), err)
    os.execute("rm -rf " .. sh(dir))
  end)
end)

local function xml_ok(path)
  if os.execute("command -v xmllint >/dev/null 2>&1") == 0 then
    return os.execute("xmllint --noout " .. sh(path) .. " 2>/dev/null") == 0
  end
  return os.execute("python3 -c 'import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])' " ..
                    sh(path) .. " 2>/dev/null") == 0
end

describe("reports", function()
  it("writes report.md and well-formed SVG charts with the expected series", function()
    local dir = tmpdir()
    local a, b = mk(A1, 4), mk(B1, 4)
    a:set_meta("model", "m & <q>") -- needs escaping in XML
    local c = moe.trace.compare(a, b)
    local files = c:report(dir)
    for _, f in ipairs{ "report.md", "disagreement.svg", "load_a.svg", "load_b.svg", "load_diff.svg",
                        "first_diff.svg", "balance.svg", "metrics.json" } do
      local found = false
      for _, g in ipairs(files) do found = found or g == f end
      assert.is_true(found, f)
    end
    for _, f in ipairs{ "disagreement.svg", "load_a.svg", "load_b.svg", "load_diff.svg",
                        "first_diff.svg", "balance.svg" } do
      assert.is_true(xml_ok(dir .. "/" .. f), f .. " is not well-formed XML")
    end
    local svg = read_all(dir .. "/disagreement.svg")
    -- one bar per layer for the router disagreement series, with axis labels and legend
    local bars = 0
    for _ in svg:gmatch('class="series%-router_disagreement"') do bars = bars + 1 end
    assert.equal(2, bars)
    assert.truthy(has(svg, "MoE layer")); assert.truthy(has(svg, "share of tokens (%)"))
    assert.truthy(has(svg, "router disagreement, layer 0: 66.7%")) -- tooltip of layer 0 (2/3)
    local heat = read_all(dir .. "/load_a.svg")
    assert.truthy(has(heat, "layer 1, expert 3: 33.33%")) -- A l1 [2,1,1,2]: 2/6
    assert.truthy(has(heat, "colour scale")); assert.truthy(has(heat, "expert id"))
    assert.truthy(has(heat, "m &amp; &lt;q&gt;"))
    local fd = read_all(dir .. "/first_diff.svg")
    assert.truthy(has(fd, "tokens, first differing layer 0: 2"))
    assert.truthy(has(fd, "tokens, first differing layer 1: 1"))
    assert.truthy(has(fd, "tokens, first differing layer none: 1")) -- t1 never differs
    local md = read_all(dir .. "/report.md")
    assert.truthy(has(md, "| router disagreement | 50.00% |"), md)
    assert.truthy(has(md, "![router disagreement per layer](disagreement.svg)"))
    near(json.decode(read_all(dir .. "/metrics.json")).router_disagreement, 0.5)
    os.execute("rm -rf " .. sh(dir))
  end)
end)

describe("moe trace CLI", function()
  local MOE = "luajit " .. sh(SRC .. "/scripts/moe")
  local function run(args)
    local p = io.popen(MOE .. " trace " .. args .. " 2>&1; echo \"rc=$?\"")
    local out = p:read("*a")
    p:close()
    local rc = tonumber(out:match("rc=(%d+)%s*$"))
    return out:gsub("rc=%d+%s*$", ""), rc
  end

  it("info, compare (--json, --report) and convert", function()
    local dir = tmpdir()
    local a, b = mk(A1, 4), mk(B1, 4)
    a:set_meta("model", "toy")
    a:save(dir .. "/a.safetensors")
    b:save(dir .. "/b.safetensors")
    local out, rc = run("info " .. sh(dir .. "/a.safetensors"))
    assert.equal(0, rc, out)
    assert.truthy(has(out, "4 tokens x 2 layers x top-2 of 4 experts"), out)
    assert.truthy(has(out, "model            toy"), out)
    out, rc = run("compare " .. sh(dir .. "/a.safetensors") .. " " .. sh(dir .. "/b.safetensors"))
    assert.equal(0, rc, out)
    assert.truthy(has(out, "router disagreement") and has(out, "50.00%"), out)
    out, rc = run("compare " .. sh(dir .. "/a.safetensors") .. " " .. sh(dir .. "/b.safetensors") ..
                  " --json --report " .. sh(dir .. "/rep"))
    assert.equal(0, rc, out)
    local v = json.decode(out)
    near(v.router_disagreement, 0.5); near(v.token_disagreement, 0.75)
    assert.truthy(io.open(dir .. "/rep/report.md"))
    out, rc = run("convert " .. sh(dir .. "/a.safetensors") .. " " .. sh(dir .. "/a.npy"))
    assert.equal(0, rc, out)
    local back = moe.trace.load(dir .. "/a.npy")
    assert.same(a:ids():totable(), back:ids():totable())
    out, rc = run("convert " .. sh(dir .. "/a.npy") .. " " .. sh(dir .. "/c.safetensors"))
    assert.equal(0, rc, out)
    assert.same(a:ids():totable(), moe.trace.load(dir .. "/c.safetensors"):ids():totable())
    os.execute("rm -rf " .. sh(dir))
  end)

  it("prints help and fails clearly on bad input", function()
    local out, rc = run("--help")
    assert.equal(0, rc); assert.truthy(has(out, "moe trace COMMAND"))
    for _, sub in ipairs{ "info", "compare", "convert" } do
      out, rc = run(sub .. " --help")
      assert.equal(0, rc); assert.truthy(has(out, "Usage: moe trace " .. sub), out)
    end
    out, rc = run("compare only-one")
    assert.equal(2, rc); assert.truthy(has(out, "expected 2 file argument(s), got 1"), out)
    out, rc = run("info /nonexistent/x.safetensors")
    assert.equal(1, rc); assert.truthy(has(out, "/nonexistent/x.safetensors"), out)
    out, rc = run("frobnicate")
    assert.equal(2, rc); assert.truthy(has(out, "unknown command"), out)
  end)
end)
