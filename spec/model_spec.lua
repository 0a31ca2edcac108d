-- moe.model presets, the synthetic stack and moe.experiment (CPU).
local moe = require("moe")
local json = require("moe.json")

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  os.execute("mkdir -p '" .. p .. "'")
  return p
end

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

describe("moe.model presets", function()
  -- The table of the issue, typed in here (not read from the code under test).
  local want = {
    ["deepseek-v3"]     = {H = 7168, I = 2048, E = 256, shared = 1, K = 8, method = "deepseekv3", n_group = 8, topk_group = 4, scale = 2.5},
    ["kimi-k2"]         = {H = 7168, I = 2048, E = 384, shared = 1, K = 8, method = "deepseekv3", n_group = 1, scale = 2.827},
    ["glm-4.5"]         = {H = 5120, I = 1536, E = 160, shared = 1, K = 8, method = "deepseekv3", n_group = 1, scale = 2.5},
    ["qwen3-30b-a3b"]   = {H = 2048, I = 768, E = 128, shared = 0, K = 8, method = "renormalize"},
    ["qwen3-235b-a22b"] = {H = 4096, I = 1536, E = 128, shared = 0, K = 8, method = "renormalize"},
    ["mixtral-8x7b"]    = {H = 4096, I = 14336, E = 8, shared = 0, K = 2, method = "renormalize"},
    ["mixtral-8x22b"]   = {H = 6144, I = 16384, E = 8, shared = 0, K = 2, method = "renormalize"},
    ["llama4-scout"]    = {H = 5120, I = 8192, E = 16, shared = 1, K = 1, method = "llama4"},
    ["llama4-maverick"] = {H = 5120, I = 8192, E = 128, shared = 1, K = 1, method = "llama4"},
    ["gpt-oss-20b"]     = {H = 2880, I = 2880, E = 32, shared = 0, K = 4, method = "renormalize", activation = "swiglu_oai"},
    ["gpt-oss-120b"]    = {H = 2880, I = 2880, E = 128, shared = 0, K = 4, method = "renormalize", activation = "swiglu_oai"},
    ["minimax-m2"]      = {H = 3072, I = 1536, E = 256, shared = 0, K = 8, method = "minimax2"},
    ["olmoe"]           = {H = 2048, I = 1024, E = 64, shared = 0, K = 8, method = "default"},
  }

  it("lists the 13 presets of the issue", function()
    local names = moe.model.presets()
    assert.are.equal(13, #names)
    for _, n in ipairs(names) do assert.is_truthy(want[n], n) end
  end)

  it("has the real router configuration and dimensions at size full", function()
    for name, w in pairs(want) do
      local c = moe.model.config(name, "full")
      for k, v in pairs(w) do
        assert.are.equal(v, c[k], name .. "." .. k)
      end
    end
  end)

  it("keeps E, K and the method at sizes small and tiny, with scaled H and I", function()
    for name, w in pairs(want) do
      for _, size in ipairs{"small", "tiny"} do
        local c = moe.model.config(name, size)
        assert.are.equal(w.E, c.E)
        assert.are.equal(w.K, c.K)
        assert.are.equal(w.method, c.method)
        assert.is_true(c.H < w.H and c.H % 128 == 0, name .. " " .. size .. " H")
        assert.is_true(c.I % 128 == 0, name .. " " .. size .. " I")
        assert.is_true(c.layers <= 8)
      end
    end
  end)

  it("names the argument on bad input", function()
    assert.has_error(function() moe.model.preset("gpt-5") end)
    local ok, err = pcall(moe.model.preset, "olmoe", {size = "huge"})
    assert.is_false(ok)
    assert.matches("size: expected \"full\", \"small\" or \"tiny\"", err)
    ok, err = pcall(moe.model.preset, "olmoe", {layers = 0})
    assert.is_false(ok)
    assert.matches("layers: expected a positive integer", err)
  end)
end)

describe("the synthetic stack", function()
  it("runs deterministically and records every layer", function()
    local m = moe.model.preset("olmoe", {size = "tiny", layers = 2})
    local a = m:run{tokens = 24, device = "cpu", quiet = true}
    local b = m:run{tokens = 24, device = "cpu", quiet = true}
    assert.are.equal(24, a:tokens())
    assert.are.equal(2, a:layers())
    assert.are.equal(8, a:top_k())
    local cmp = moe.trace.compare(a, b)
    assert.are.equal(0, cmp.router_disagreement)
    -- every position captured, ids distinct per (token, layer) and in range
    for t = 1, 24, 7 do
      for l = 1, 2 do
        local ids = a:get(t, l)
        local seen = {}
        for _, e in ipairs(ids) do
          assert.is_true(e >= 0 and e < 64)
          assert.is_nil(seen[e])
          seen[e] = true
        end
      end
    end
  end)

  it("routes layer 1 exactly as moe.route on the router GEMM of the normalised tokens", function()
    local m = moe.model.preset("qwen3-30b-a3b", {size = "tiny", layers = 1})
    local x = m:tokens(16, {seed = 3, device = "cpu"})
    local tr = m:run{hidden = x, device = "cpu", quiet = true}
    local w = m:layer_weights(1, "cpu")
    local h = moe.rmsnorm(x:to("f32"), nil, {eps = 1e-6}):to("bf16")
    local r = moe.route{logits = moe.matmul_nt(h, w.router), method = "renormalize", top_k = 8}
    local ids = r.ids:totable()
    for t = 1, 16 do assert.are.same(ids[t], tr:get(t, 1)) end
  end)

  it("rejects unknown options and modes", function()
    local m = moe.model.preset("olmoe", {size = "tiny", layers = 1})
    local ok, err = pcall(m.run, m, {tokens = 4, qant = "fp8"})
    assert.is_false(ok)
    assert.matches("unknown option", err)
    ok, err = pcall(m.run, m, {tokens = 4, quant = "int3", quiet = true})
    assert.is_false(ok)
    assert.matches("quant: expected one of bf16, fp8", err)
  end)
end)

describe("moe.experiment", function()
  it("writes a report whose numbers equal a separate comparison of the saved traces", function()
    local dir = tmpdir()
    local s = moe.experiment{model = "qwen3-30b-a3b", size = "tiny", layers = 2, quants = {"fp8_block", "mxfp4"},
                             tokens = 64, device = "cpu", out = dir, quiet = true}
    local summary = json.decode(read(dir .. "/summary.json"))
    assert.are.equal(2, #summary.modes)
    local ref = moe.trace.load(dir .. "/traces/bf16.safetensors")
    for i, mode in ipairs{"fp8_block", "mxfp4"} do
      local row = summary.modes[i]
      assert.are.equal(mode, row.mode)
      local cmp = moe.trace.compare(ref, moe.trace.load(dir .. "/traces/" .. mode .. ".safetensors"))
      assert.are.equal(cmp.router_disagreement, row.router_disagreement)
      assert.are.equal(cmp.token_disagreement, row.token_disagreement)
      assert.are.equal(cmp.jaccard, row.jaccard)
      assert.are.equal(cmp.overlap, row.overlap)
      -- the per-mode report exists and its metrics.json says the same
      local mj = json.decode(read(dir .. "/" .. mode .. "/metrics.json"))
      assert.are.equal(cmp.router_disagreement, mj.router_disagreement)
    end
    local md = read(dir .. "/report.md")
    assert.matches("| fp8_block |", md, 1, true)
    assert.matches("<svg", read(dir .. "/router_disagreement.svg"), 1, true)
    assert.are.equal(s.modes[1].router_disagreement, summary.modes[1].router_disagreement)
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("prints plain progress lines and a timing summary when stderr is not a terminal", function()
    local src = os.getenv("MOE_SOURCE_DIR") or "."
    local cmd = string.format("cd '%s' && luajit scripts/moe run scripts/experiments/quant_drift.lua " ..
                              "--size tiny --layers 1 --tokens 16 --quants fp8 --device cpu --out %s 2>&1", src,
                              os.tmpname() .. "-qd")
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    assert.matches("on cpu: 100%%", out)
    assert.matches("done in [%d.]+s", out)
    assert.matches("report: ", out)
    assert.is_nil(out:find("\r", 1, true))
  end)
end)
