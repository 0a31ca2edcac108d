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

  it("commits without stalling: the next batch reuses the buffers while the copy is in flight", function()
    -- three batches routed into the same replay buffers; each commit only queues the copy
    local T, K, E, L, B = 512, 8, 128, 4, 3
    local tr = moe.trace.new{ layers = L, top_k = K, num_experts = E, capacity = T, weights = true,
                              device = "cuda" }
    local ref = moe.trace.new{ layers = L, top_k = K, num_experts = E, capacity = T, weights = true,
                               device = "cpu" }
    for b = 1, B do
      for l = 1, L do
        local logits = moe.randn({ T, E }, { seed = 1000 * b + l })
        local r = moe.route{ logits = logits:to("cuda"), method = "renormalize", top_k = K,
                             replay = tr:replay(l) }
        tr:record_weights(l, r.weights)
        local rc = moe.route{ logits = logits, method = "renormalize", top_k = K, replay = ref:replay(l) }
        ref:record_weights(l, rc.weights)
      end
      assert.equal(b * T, tr:commit(T))
      assert.is_table(tr._pending) -- the host copy is still owed: it is finished on the next access
      ref:commit(T)
    end
    assert.equal(B * T, tr:tokens()) -- drains the last batch
    assert.is_nil(tr._pending)
    local c = moe.trace.compare(ref, tr)
    assert.equal(0, c.router_disagreement)
    assert.equal(1, c.exact_agreement)
    assert.equal(0, c.skipped)
    assert.is_true(c.weights.abs_diff <= 1e-6)
    -- the device buffers were reset after the last commit
    assert.same({ -1, -1, -1, -1, -1, -1, -1, -1 }, tr:replay(1):narrow(1, 1, 1):to("cpu"):totable()[1])
  end)

  it("copies to pinned host memory asynchronously through the C API", function()
    local ffi = require("ffi")
    local C = moe.C
    local src = moe.arange(1000, { dtype = "f32" }):to("cuda")
    local box = ffi.new("moe_tensor*[1]")
    local shape = ffi.new("int64_t[1]", 1000)
    assert.equal(0, C.moe_tensor_new_pinned(box, C.MOE_F32, 1, shape))
    local dst = moe._wrap(box[0])
    local ev = ffi.new("moe_event*[1]")
    assert.equal(0, C.moe_tensor_copy_to_host_async(dst.h, src.h, ev))
    assert.equal(0, C.moe_event_wait(ev[0]))
    assert.equal(1, C.moe_event_done(ev[0]))
    C.moe_event_free(ev[0])
    assert.same(moe.arange(1000, { dtype = "f32" }):totable(), dst:totable())
    -- a device destination is refused with a message
    assert.equal(C.MOE_ERR_DEVICE, C.moe_tensor_copy_to_host_async(src.h, src.h, ev))
    assert.matches("dst: expected a host tensor", ffi.string(C.moe_last_error()))
  end)
end)
