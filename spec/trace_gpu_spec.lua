-- Recording traces from CUDA replay buffers: the rows copied to the host equal those recorded
-- from the CPU reference routing of the same logits (routing is bit-exact across devices), and
-- tensors on the GPU append like host tensors.  Without a CUDA device this file exits 77.
local moe = require("moe")

local function record(device, logits_list, T, K, E, method)
  local L = #logits_list
  local tr = moe.trace.new{ layers = L, top_k = K, num_experts = E, capacity = T, weights = true,
                            device = device, meta = { method = method, device = device } }
  for l = 1, L do
    local r = moe.route{ logits = logits_list[l]:to(device), method = method, top_k = K,
                         replay = tr:replay(l) }
    tr:record_weights(l, r.weights)
  end
  tr:commit(T)
  return tr
end

describe("#gpu trace recording on CUDA", function()
  it("records the same ids and weights as the CPU reference", function()
    local T, K, E, L = 300, 8, 64, 3
    local logits = {}
    for l = 1, L do logits[l] = moe.randn({ T, E }, { seed = 100 + l }) end
    for _, method in ipairs{ "renormalize", "sigmoid_renorm" } do
      local cpu = record("cpu", logits, T, K, E, method)
      local gpu = record("cuda", logits, T, K, E, method)
      assert.equal(T, gpu:tokens())
      local c = moe.trace.compare(cpu, gpu)
      assert.equal(0, c.router_disagreement)
      assert.equal(1, c.exact_agreement)
      assert.equal(0, c.skipped)
      assert.is_true(c.weights.abs_diff <= 1e-6, tostring(c.weights.abs_diff))
      assert.same(cpu:ids():totable(), gpu:ids():totable())
    end
  end)

  it("resets the device rows after a commit and appends device tensors", function()
    local tr = moe.trace.new{ layers = 2, top_k = 2, num_experts = 4, capacity = 4, device = "cuda" }
    tr:replay(1):copy_(moe.tensor({ { 0, 1 }, { 1, 2 }, { 2, 3 }, { 3, 0 } }, { dtype = "i16" }))
    tr:commit(4) -- layer 2 never routed: -1
    assert.same({ -1, -1 }, tr:get(1, 2))
    assert.same({ 2, 3 }, tr:get(3, 1))
    assert.same({ { -1, -1 }, { -1, -1 } }, tr:replay(1):narrow(1, 1, 2):to("cpu"):totable())
    local ids = moe.tensor({ { { 3, 2 }, { 1, 0 } } }, { dtype = "i32" }):to("cuda")
    tr:append(ids)
    assert.equal(5, tr:tokens())
    assert.same({ 1, 0 }, tr:get(5, 2))
  end)
end)
