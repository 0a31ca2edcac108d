-- The Lua binding on a CUDA device: constructors and methods on CUDA tensors, transfers, device
-- memory accounting, the GC trigger on device bytes, the default device, graph capture from
-- Lua (replay, timing, abort on error).  Without a CUDA device `moe spec` skips this file (77).
local moe = require("moe")
-- spec/helper.lua, found next to this file whatever the working directory
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")

local error_of = H.error_of
local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end
local MiB = 1024 * 1024

describe("CUDA tensors from Lua #gpu", function()
  it("constructors, metadata and printing", function()
    local t = moe.tensor({{1, 2}, {3, 4}}, {device = "cuda"})
    assert.equal("cuda:0", t:device())
    assert.is_true(t:is_cuda())
    assert.same({{1, 2}, {3, 4}}, t:totable())
    assert.equal("tensor([[1., 2.],\n        [3., 4.]], shape=[2, 2], dtype=f32, device=cuda:0)", tostring(t))
    assert.same({0, 0, 0}, moe.zeros({3}, {device = "cuda:0", dtype = "bf16"}):totable())
    assert.same({0, 1, 2, 3}, moe.arange(4, {device = "cuda", dtype = "i32"}):totable())
    assert.same({-1.5, -1.5}, moe.full({2}, -1.5, {device = "cuda"}):totable())
    local big = tostring(moe.arange(1000, {device = "cuda"}))
    assert.equal("tensor([  0.,   1.,   2., ..., 997., 998., 999.], shape=[1000], dtype=f32, device=cuda:0)", big)
  end)

  it("random tensors are the same on CUDA and on the CPU", function()
    for _, dt in ipairs{ "f32", "bf16", "f8_e4m3" } do
      local c = moe.randn({33, 17}, {seed = 9, dtype = dt}):totable()
      local g = moe.randn({33, 17}, {seed = 9, dtype = dt, device = "cuda"}):totable()
      assert.same(c, g, dt)
    end
    assert.same(moe.rand({100}, {seed = 4, lo = -1, hi = 1}):totable(),
                moe.rand({100}, {seed = 4, lo = -1, hi = 1, device = "cuda"}):totable())
  end)

  it("to() and copy_() across devices and dtypes", function()
    local c = moe.randn({64, 33}, {seed = 3})
    local g = c:to("cuda")
    assert.equal("cuda:0", g:device())
    assert.same(c:totable(), g:totable())
    assert.same(c:to("bf16"):totable(), g:to("cpu", "bf16"):totable())
    assert.same(c:to("bf16"):totable(), c:to("cuda", "bf16"):totable())
    local dst = moe.zeros({64, 33}, {device = "cuda", dtype = "f16"})
    dst:copy_(c) -- cpu f32 -> cuda f16
    assert.same(c:to("f16"):totable(), dst:totable())
    local back = moe.zeros({33, 64})
    back:copy_(g:transpose()) -- strided cuda -> cpu
    assert.same(c:transpose():totable(), back:totable())
  end)

  it("views, contiguous copies and element access", function()
    local g = moe.arange(12, {device = "cuda"}):reshape{3, 4}
    assert.same({{1, 2}, {5, 6}, {9, 10}}, g:narrow(2, 2, 2):totable())
    local tt = g:transpose()
    assert.is_false(tt:is_contiguous())
    assert.same({{0, 4, 8}, {1, 5, 9}, {2, 6, 10}, {3, 7, 11}}, tt:contiguous():totable())
    assert.equal(6, g:get(2, 3))
    g:set(-7, 2, 3)
    assert.equal(-7, g:to("cpu"):get(2, 3))
    g:select(1, 1):fill_(9)
    assert.same({9, 9, 9, 9}, g:select(1, 1):totable())
  end)
end)

describe("device memory #gpu", function()
  after_each(function()
    moe.set_gc_threshold(nil)
    collectgarbage("restart")
  end)

  it("is accounted and given back", function()
    H.live()
    local m0 = moe.mem_stats()
    local t = moe.empty({1024, 1024}, {device = "cuda"})
    local m1 = moe.mem_stats()
    assert.equal(4 * MiB, m1.device_bytes - m0.device_bytes)
    assert.truthy(m1.peak_device_bytes >= m1.device_bytes)
    assert.equal(m0.host_bytes, m1.host_bytes)
    t:free()
    assert.equal(m0.device_bytes, moe.mem_stats().device_bytes)
  end)

  it("the GC trigger collects unreachable CUDA tensors past the threshold", function()
    H.live()
    moe.collect_garbage()
    collectgarbage("stop")
    moe.set_gc_threshold(16 * MiB)
    local base = moe.mem_stats().device_bytes
    local n0 = moe._gc.collections
    for _ = 1, 3 do moe.empty({MiB}, {device = "cuda"}) end -- 3 x 4 MiB of garbage
    assert.equal(base + 12 * MiB, moe.mem_stats().device_bytes)
    assert.equal(n0, moe._gc.collections)
    local keep = moe.empty({2 * MiB}, {device = "cuda"}) -- +8 MiB: 20 MiB > 16 MiB
    assert.equal(n0 + 1, moe._gc.collections)
    assert.equal(base + 8 * MiB, moe.mem_stats().device_bytes)
    keep:free()
  end)

  it("many unreachable CUDA tensors do not pile up", function()
    H.live()
    moe.collect_garbage()
    moe.set_gc_threshold(64 * MiB)
    local base = moe.mem_stats().device_bytes
    local peak = 0
    for _ = 1, 200 do
      moe.empty({4 * MiB}, {device = "cuda"}) -- 16 MiB each, 3.2 GB in all
      local d = moe.mem_stats().device_bytes - base
      if d > peak then peak = d end
    end
    assert.truthy(peak <= 96 * MiB, "device bytes above the base reached " .. peak / MiB .. " MiB")
  end)
end)

describe("default device #gpu", function()
  after_each(function() moe.set_default_device("cpu") end)

  it("set_default_device('cuda') makes constructors allocate on the GPU", function()
    assert.equal("cpu", moe.set_default_device("cuda"))
    assert.equal("cuda:0", moe.default_device())
    assert.equal("cuda:0", moe.zeros({2}):device())
    assert.equal("cuda:0", moe.tensor({1, 2}):device())
    assert.equal("cpu", moe.zeros({2}, {device = "cpu"}):device())
    local n = moe.cuda_device_count()
    local err = error_of(moe.set_default_device, "cuda:" .. n)
    assert.truthy(has(err, "moe.set_default_device: device: expected cuda:0..cuda:" .. (n - 1) .. ", got cuda:" .. n), err)
  end)
end)

describe("graphs from Lua #gpu", function()
  it("capture records instead of running; replay runs it", function()
    local t = moe.zeros({1000}, {device = "cuda"})
    moe.synchronize("cuda")
    local g = moe.graph.capture(function() t:fill_(5) end)
    assert.is_false(moe.graph.is_capturing())
    moe.synchronize("cuda")
    assert.equal(0, t:get(1))
    g:replay()
    moe.synchronize("cuda")
    assert.equal(5, t:get(1000))
    t:fill_(1)
    g:replay()
    moe.synchronize()
    assert.equal(5, t:get(7))
    local times = g:time(2, 5)
    assert.equal(5, #times)
    for i = 1, 5 do assert.truthy(times[i] > 0, "time " .. times[i]) end
    g:free()
    g:free()
    local err = error_of(g.replay, g)
    assert.truthy(has(err, "g:replay: graph was freed"), err)
  end)

  it("an error inside the captured function aborts the capture and is re-raised", function()
    local err = error_of(moe.graph.capture, function() error("boom in capture") end)
    assert.truthy(has(err, "boom in capture"), err)
    assert.is_false(moe.graph.is_capturing())
    -- allocations are refused while capturing: the error comes out and the capture is gone
    err = error_of(moe.graph.capture, function() moe.empty({10}, {device = "cuda"}) end)
    assert.truthy(err ~= nil and has(err, "moe.empty"), err)
    assert.is_false(moe.graph.is_capturing())
    -- the device still works
    assert.same({3, 3}, moe.full({2}, 3, {device = "cuda"}):totable())
  end)
end)
