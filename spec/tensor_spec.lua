-- Tensors from Lua: constructors, metadata, views, copies, casts, printing, freeing,
-- memory accounting, the GC trigger and the error messages of misuse.
local moe = require("moe")
-- spec/helper.lua, found next to this file whatever the working directory
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")

local error_of = H.error_of

-- plain find (no patterns)
local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end

describe("moe.tensor constructors", function()
  it("infers the shape of nested tables and keeps the values", function()
    local t = moe.tensor({{1, 2, 3}, {4, 5, 6}})
    assert.same({2, 3}, t:shape())
    assert.equal("f32", t:dtype())
    assert.equal("cpu", t:device())
    assert.equal(6, t:numel())
    assert.equal(2, t:ndim())
    assert.is_true(t:is_contiguous())
    assert.same({3, 1}, t:stride())
    assert.equal(24, t:nbytes())
    assert.same({{1, 2, 3}, {4, 5, 6}}, t:totable())
  end)

  it("makes 0-d tensors from scalars and 1-d empty tensors from {}", function()
    local s = moe.tensor(2.5)
    assert.same({}, s:shape())
    assert.equal(0, s:ndim())
    assert.equal(1, s:numel())
    assert.equal(2.5, s:item())
    assert.equal(2.5, s:totable())
    assert.equal(2.5, s:get())
    local e = moe.tensor({})
    assert.same({0}, e:shape())
    assert.same({}, e:totable())
    assert.same({2, 0}, moe.tensor({{}, {}}):shape())
  end)

  it("accepts booleans and the dtype/device options", function()
    local b = moe.tensor({true, false, true}, {dtype = "bool"})
    assert.equal("bool", b:dtype())
    assert.same({true, false, true}, b:totable())
    assert.equal("bf16", moe.tensor({1}, {dtype = "bfloat16"}):dtype())
    assert.equal("i32", moe.tensor({1}, {dtype = moe.C.MOE_I32}):dtype())
    assert.equal("cpu", moe.tensor({1}, {device = "cpu"}):device())
    assert.same({7, -3}, moe.tensor({7.9, -3.9}, {dtype = "i64"}):totable())
  end)

  it("rejects ragged tables, naming the row", function()
    local err = error_of(moe.tensor, {{1, 2}, {3}})
    assert.truthy(has(err, "moe.tensor: data: ragged nested table: row [2] has 1 elements, expected 2"), err)
    err = error_of(moe.tensor, {{{1, 2}, {3, 4}}, {{5, 6}, {7, 8, 9}}})
    assert.truthy(has(err, "row [2][2] has 3 elements, expected 2"), err)
    err = error_of(moe.tensor, {{1, 2}, 3})
    assert.truthy(has(err, "row [2] should be a table of 2 elements, got 3"), err)
    err = error_of(moe.tensor, {1, "x"})
    assert.truthy(has(err, 'element [2] expected a number or boolean, got "x"'), err)
    err = error_of(moe.tensor, "abc")
    assert.truthy(has(err, "moe.tensor: data: expected a number, boolean or nested table"), err)
  end)

  it("empty/zeros/ones/full", function()
    local e = moe.empty({3, 2}, {dtype = "f16"})
    assert.same({3, 2}, e:shape())
    assert.equal("f16", e:dtype())
    assert.same({{0, 0}, {0, 0}}, moe.zeros({2, 2}):totable())
    assert.same({1, 1, 1}, moe.ones({3}, {dtype = "i8"}):totable())
    assert.same({{-2.5, -2.5}}, moe.full({1, 2}, -2.5):totable())
    assert.equal(0, moe.zeros({}):item())
    assert.same({}, moe.zeros({0}):totable())
  end)

  it("arange with one, two and three numbers", function()
    assert.same({0, 1, 2, 3, 4}, moe.arange(5):totable())
    assert.same({2, 5, 8}, moe.arange(2, 10, 3):totable())
    assert.same({5, 3, 1}, moe.arange(5, 0, -2):totable())
    assert.same({0.5, 1.5}, moe.arange(0.5, 2):totable())
    assert.same({}, moe.arange(3, 1):totable())
    assert.equal("i32", moe.arange(4, {dtype = "i32"}):dtype())
    assert.same({0, 1, 2}, moe.arange(3, {dtype = "i32"}):totable())
    local err = error_of(moe.arange, 0, 5, 0)
    assert.truthy(has(err, "moe.arange: step: expected a non-zero number, got 0"), err)
  end)

  it("randn/rand: explicit seeds are reproducible, the global counter advances", function()
    local a = moe.randn({64}, {seed = 11}):totable()
    local b = moe.randn({64}, {seed = 11}):totable()
    local c = moe.randn({64}, {seed = 12}):totable()
    assert.same(a, b)
    assert.are_not.same(a, c)
    moe.manual_seed(5)
    local d1 = moe.rand({16}):totable()
    local d2 = moe.rand({16}):totable()
    moe.manual_seed(5)
    assert.same(d1, moe.rand({16}):totable())
    assert.are_not.same(d1, d2)
    -- the counter value is the seed
    assert.same(moe.rand({16}, {seed = 6}):totable(), d2)
    local u = moe.rand({1000}, {seed = 1, lo = -2, hi = 3}):totable()
    for i = 1, #u do assert.truthy(u[i] >= -2 and u[i] < 3, "uniform value out of range: " .. u[i]) end
    local n = moe.randn({4000}, {seed = 2, mean = 10, std = 0.5}):totable()
    local s = 0
    for i = 1, #n do s = s + n[i] end
    assert.truthy(math.abs(s / #n - 10) < 0.05, "mean " .. s / #n)
  end)
end)

describe("views", function()
  local function base() return moe.arange(12):reshape{3, 4} end

  it("narrow, select, transpose share storage with the base", function()
    local t = base()
    local n = t:narrow(2, 2, 2)
    assert.same({3, 2}, n:shape())
    assert.same({{1, 2}, {5, 6}, {9, 10}}, n:totable())
    assert.is_false(n:is_contiguous())
    assert.same({{8, 9, 10, 11}}, t:narrow(1, 3, 1):totable())
    assert.same({4, 5, 6, 7}, t:select(1, 2):totable())
    assert.same({0, 4, 8}, t:select(2, 1):totable())
    assert.same({3, 7, 11}, t:select(-1, 4):totable())
    local tt = t:transpose(1, 2)
    assert.same({4, 3}, tt:shape())
    assert.same({1, 4}, tt:stride())
    assert.same({{0, 4, 8}, {1, 5, 9}, {2, 6, 10}, {3, 7, 11}}, tt:totable())
    assert.same(tt:totable(), t:transpose():totable())
    n:fill_(-1)
    assert.same({{0, -1, -1, 3}, {4, -1, -1, 7}, {8, -1, -1, 11}}, t:totable())
    tt:set(100, 4, 3)
    assert.equal(100, t:get(3, 4))
  end)

  it("views outlive their base", function()
    local t = base()
    local s = t:select(1, 3)
    t:free()
    collectgarbage("collect")
    assert.same({8, 9, 10, 11}, s:totable())
  end)

  it("reshape of contiguous tensors, with -1 inferred", function()
    local t = base()
    assert.same({2, 6}, t:reshape{2, -1}:shape())
    assert.same({12}, t:reshape(12):shape())
    assert.same({{{0, 1}, {2, 3}, {4, 5}}, {{6, 7}, {8, 9}, {10, 11}}}, t:reshape{2, 3, 2}:totable())
    local err = error_of(t.reshape, t, {5, 3})
    assert.truthy(has(err, "t:reshape") and has(err, "12"), err)
  end)

  it("reshape of a non-contiguous view is an error; contiguous() copies it", function()
    local t = base()
    local tt = t:transpose(1, 2)
    local err = error_of(tt.reshape, tt, {12})
    assert.truthy(has(err, "t:reshape: self: expected a contiguous tensor (call :contiguous() first)"), err)
    local c = tt:contiguous()
    assert.is_true(c:is_contiguous())
    assert.same({3, 1}, c:stride())
    assert.same(tt:totable(), c:totable())
    assert.same({0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}, c:reshape{12}:totable())
    t:fill_(0) -- the copy is independent
    assert.equal(4, c:get(1, 2))
    assert.is_true(rawequal(t, t:contiguous()), "contiguous() of a contiguous tensor returns it")
    local k = t:clone()
    assert.is_false(rawequal(t, k))
    k:fill_(3)
    assert.equal(0, t:get(1, 1))
  end)

  it("get/set are 1-based and check their indices", function()
    local t = base()
    assert.equal(6, t:get(2, 3))
    t:set(42, 1, 1)
    assert.equal(42, t:get(1, 1))
    local err = error_of(t.get, t, 1)
    assert.truthy(has(err, "t:get: indices: expected 2 indices, got 1"), err)
    err = error_of(t.get, t, 4, 1)
    assert.truthy(has(err, "t:get: index 1: expected an integer in 1..3, got 4"), err)
    err = error_of(t.set, t, 1, 1, 0)
    assert.truthy(has(err, "t:set: index 2: expected an integer in 1..4, got 0"), err)
    err = error_of(t.set, t, "x", 1, 1)
    assert.truthy(has(err, 't:set: value: expected a number, got "x"'), err)
  end)

  it("packed e2m1 elements can be read and written one at a time", function()
    local e = moe.tensor({1, 2, 3, 4, 0.5, 6}, {dtype = "e2m1"})
    assert.equal(0.5, e:get(5))
    assert.equal(6, e:get(6))
    e:set(-3, 5)
    assert.same({1, 2, 3, 4, -3, 6}, e:totable())
  end)

  it("checks dims and ranges", function()
    local t = base()
    local err = error_of(t.select, t, 3, 1)
    assert.truthy(has(err, "t:select: dim: expected a dimension in 1..2 or -2..-1, got 3"), err)
    err = error_of(t.select, t, 1, 4)
    assert.truthy(has(err, "t:select: index: expected an integer in 1..3, got 4"), err)
    err = error_of(t.narrow, t, 2, 3, 3)
    assert.truthy(has(err, "t:narrow: length: expected an integer in 0..2, got 3"), err)
    err = error_of(t.narrow, t, 0, 1, 1)
    assert.truthy(has(err, "t:narrow: dim: expected a dimension in 1..2 or -2..-1, got 0"), err)
    err = error_of(t.transpose, t, 1, -3)
    assert.truthy(has(err, "t:transpose: dim1: expected a dimension in 1..2 or -2..-1, got -3"), err)
  end)
end)

describe("copies and casts", function()
  it("copy_ copies values in place, also into views and across dtypes", function()
    local dst = moe.zeros({2, 3})
    local r = dst:copy_(moe.tensor({{1, 2, 3}, {4, 5, 6}}))
    assert.is_true(rawequal(r, dst))
    assert.same({{1, 2, 3}, {4, 5, 6}}, dst:totable())
    dst:narrow(2, 1, 2):copy_(moe.tensor({{-1, -2}, {-3, -4}}))
    assert.same({{-1, -2, 3}, {-3, -4, 6}}, dst:totable())
    -- f32 -> i32 truncates toward zero
    local i = moe.zeros({3}, {dtype = "i32"}):copy_(moe.tensor({1.9, -1.9, 2.5}))
    assert.same({1, -1, 2}, i:totable())
    -- copy from a transposed view
    local src = moe.arange(6):reshape{2, 3}
    assert.same({{0, 3}, {1, 4}, {2, 5}}, moe.empty({3, 2}):copy_(src:transpose()):totable())
  end)

  it("copy_ refuses mismatched shapes and non-tensors", function()
    local dst = moe.zeros({2, 3})
    local err = error_of(dst.copy_, dst, moe.zeros({3, 2}))
    assert.truthy(has(err, "t:copy_: src: expected shape {2, 3}, got {3, 2}"), err)
    err = error_of(dst.copy_, dst, {1, 2})
    assert.truthy(has(err, "t:copy_: src: expected a tensor, got {1, 2}"), err)
  end)

  it("fill_ sets every element and returns the tensor", function()
    local t = moe.empty({2, 2}, {dtype = "bf16"})
    assert.is_true(rawequal(t, t:fill_(1.5)))
    assert.same({{1.5, 1.5}, {1.5, 1.5}}, t:totable())
    local err = error_of(t.fill_, t, {})
    assert.truthy(has(err, "t:fill_: value: expected a number, got {}"), err)
  end)

  it("to(dtype), to(device), to(device, dtype) return new tensors", function()
    local t = moe.tensor({1.25, -7.75, 3})
    local b = t:to("bf16")
    assert.equal("bf16", b:dtype())
    assert.same({1.25, -7.75, 3}, b:totable())
    local c = t:to("cpu")
    assert.is_false(rawequal(c, t))
    c:fill_(0)
    assert.equal(1.25, t:get(1))
    local i = t:to("cpu", "i16")
    assert.equal("i16", i:dtype())
    assert.same({1, -7, 3}, i:totable())
    assert.equal("f8_e4m3", t:to(moe.C.MOE_F8E4M3):dtype())
    -- a cast of a view is contiguous
    local v = moe.arange(6):reshape{2, 3}:transpose():to("f16")
    assert.is_true(v:is_contiguous())
    assert.same({{0, 3}, {1, 4}, {2, 5}}, v:totable())
    local err = error_of(t.to, t, "gpu")
    assert.truthy(has(err, 't:to: target: expected a device ("cpu", "cuda", "cuda:N") or a dtype name') and
                  has(err, 'got "gpu"'), err)
    err = error_of(t.to, t, "cpu", "f64")
    assert.truthy(has(err, 't:to: dtype: expected a dtype name') and has(err, 'got "f64"'), err)
  end)

  it("data_ptr gives the raw storage", function()
    local t = moe.tensor({1, 2, 3}, {dtype = "i32"})
    local p = t:data_ptr("int32_t*")
    assert.equal(2, p[1])
    p[2] = 9
    assert.equal(9, t:get(3))
    assert.equal("cdata", type(t:data_ptr()))
  end)
end)

describe("tostring", function()
  it("prints small tensors whole, with shape, dtype and device", function()
    assert.equal("tensor([[1., 2.],\n        [3., 4.]], shape=[2, 2], dtype=f32, device=cpu)",
                 tostring(moe.tensor({{1, 2}, {3, 4}})))
    assert.equal("tensor(3.5, shape=[], dtype=f32, device=cpu)", tostring(moe.tensor(3.5)))
    assert.equal("tensor([ 1, -2], shape=[2], dtype=i32, device=cpu)",
                 tostring(moe.tensor({1, -2}, {dtype = "i32"})))
    assert.equal("tensor([ true, false], shape=[2], dtype=bool, device=cpu)",
                 tostring(moe.tensor({true, false}, {dtype = "bool"})))
    assert.equal("tensor([], shape=[0], dtype=f32, device=cpu)", tostring(moe.zeros({0})))
    assert.equal("tensor([0.25,  nan, -inf], shape=[3], dtype=f32, device=cpu)",
                 tostring(moe.tensor({0.25, 0 / 0, -1 / 0})))
  end)

  it("clips long dimensions to three elements at each end", function()
    assert.equal("tensor([  0.,   1.,   2., ..., 997., 998., 999.], shape=[1000], dtype=f32, device=cpu)",
                 tostring(moe.arange(1000)))
    local s = tostring(moe.arange(100):reshape{10, 10}:to("bf16"))
    local lines = {}
    for line in s:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(7, #lines)
    assert.equal("tensor([[ 0.,  1.,  2., ...,  7.,  8.,  9.],", lines[1])
    assert.equal("        ...,", lines[4])
    assert.equal("        [90., 91., 92., ..., 97., 98., 99.]], shape=[10, 10], dtype=bf16, device=cpu)",
                 lines[7])
    -- a clipped, transposed 3-d view prints the right corners
    local t = moe.arange(8 * 7 * 2):reshape{8, 7, 2}:transpose(1, 3)
    local u = tostring(t)
    assert.truthy(has(u, "[[  0.,  14.,  28., ...,  70.,  84.,  98.],"), u)
    assert.truthy(has(u, "[ 12.,  26.,  40., ...,  82.,  96., 110.]],"), u)
    assert.truthy(has(u, "shape=[2, 7, 8]"), u)
    -- packed 4-bit tensors: the clipped tail starts in the middle of a byte (7, 8, 9 saturate to 6)
    assert.equal("tensor([0., 1., 2., ..., 6., 6., 6.], shape=[10], dtype=e2m1, device=cpu)",
                 tostring(moe.arange(10):to("e2m1")))
    assert.equal("tensor([[-8, -7, -6, ..., -3, -2, -1],\n        [ 0,  1,  2, ...,  5,  6,  7]], shape=[2, 8], dtype=i4, device=cpu)",
                 tostring(moe.arange(-8, 8):reshape{2, 8}:to("i4")))
    assert.equal("tensor([[-8, -6, -4, ...,  2,  4,  6],\n        [-7, -5, -3, ...,  3,  5,  7]], shape=[2, 8], dtype=i4, device=cpu)",
                 tostring(moe.arange(-8, 8):reshape{8, 2}:to("i4"):transpose()))
  end)
end)

describe("free", function()
  it("is idempotent, and later use says the tensor was freed", function()
    local t = moe.zeros({2})
    t:free()
    t:free()
    assert.is_true(t:is_freed())
    assert.equal("tensor(<freed>)", tostring(t))
    for _, m in ipairs{ "shape", "dtype", "device", "numel", "totable", "clone", "contiguous",
                        "item", "data_ptr", "is_contiguous" } do
      local err = error_of(t[m], t)
      assert.truthy(has(err, "t:" .. m .. ": tensor was freed"), m .. ": " .. tostring(err))
    end
    local err = error_of(t.to, t, "bf16")
    assert.truthy(has(err, "t:to: tensor was freed"), err)
    local d = moe.zeros({2})
    err = error_of(d.copy_, d, t)
    assert.truthy(has(err, "t:copy_: src: tensor was freed"), err)
  end)

  it("names the mistake when a method is called with a dot", function()
    local t = moe.zeros({2})
    local err = error_of(t.shape)
    assert.truthy(has(err, "t:shape: self: expected a tensor (call it as t:shape(...)), got nil"), err)
  end)
end)

describe("memory accounting", function()
  after_each(function() collectgarbage("restart") end)

  it("live tensors and host bytes go up and down", function()
    local live0 = H.live()
    collectgarbage("stop")
    local m0 = moe.mem_stats()
    assert.equal(live0, m0.live_tensors)
    local a = moe.empty({1000})
    local m1 = moe.mem_stats()
    assert.equal(m0.live_tensors + 1, m1.live_tensors)
    assert.equal(m0.live_storages + 1, m1.live_storages)
    assert.truthy(m1.host_bytes - m0.host_bytes >= 4000, "host bytes grew by " .. (m1.host_bytes - m0.host_bytes))
    assert.truthy(m1.peak_host_bytes >= m1.host_bytes)
    local v = a:narrow(1, 1, 10)
    local m2 = moe.mem_stats()
    assert.equal(m1.live_tensors + 1, m2.live_tensors)
    assert.equal(m1.live_storages, m2.live_storages)
    assert.equal(m1.host_bytes, m2.host_bytes)
    a:free()
    local m3 = moe.mem_stats()
    assert.equal(m0.live_tensors + 1, m3.live_tensors)
    assert.equal(m1.host_bytes, m3.host_bytes) -- the view keeps the storage
    v:free()
    local m4 = moe.mem_stats()
    assert.equal(m0.live_tensors, m4.live_tensors)
    assert.equal(m0.live_storages, m4.live_storages)
    assert.equal(m0.host_bytes, m4.host_bytes)
    assert.equal(0, m4.device_bytes - m0.device_bytes)
  end)

  it("the finaliser frees unreachable tensors", function()
    local live0 = H.live()
    do
      for _ = 1, 5 do moe.zeros({4}) end
    end
    assert.equal(live0, H.live())
  end)
end)

describe("GC trigger", function()
  after_each(function()
    moe.set_gc_threshold(nil)
    collectgarbage("restart")
  end)

  it("collects when accounted memory grew past the threshold since the last collection", function()
    local live0 = H.live()
    moe.collect_garbage()
    collectgarbage("stop")
    moe.set_gc_threshold(1e6)
    for _ = 1, 10 do moe.zeros({4}) end -- garbage, under the threshold
    assert.equal(live0 + 10, moe.mem_stats().live_tensors)
    local n0 = moe._gc.collections
    local keep = moe.zeros({1e6}) -- 4 MB: past the threshold
    assert.equal(n0 + 1, moe._gc.collections)
    assert.equal(live0 + 1, moe.mem_stats().live_tensors)
    assert.equal(4e6, keep:nbytes())
  end)

  it("does not collect under the threshold", function()
    local live0 = H.live()
    moe.collect_garbage()
    collectgarbage("stop")
    moe.set_gc_threshold(1e12)
    local n0 = moe._gc.collections
    for _ = 1, 10 do moe.zeros({4}) end
    local keep = moe.zeros({1e6})
    assert.equal(n0, moe._gc.collections)
    assert.equal(live0 + 11, moe.mem_stats().live_tensors)
    keep:free()
  end)

  it("policy: growth over the level after the last collection; default max(1 GiB, 25%)", function()
    moe.set_gc_threshold(100)
    moe._gc.base.device = 1000
    local n0 = moe._gc.collections
    assert.is_false(moe._gc_maybe("device", 1100))
    assert.equal(n0, moe._gc.collections)
    assert.is_true(moe._gc_maybe("device", 1101))
    assert.equal(n0 + 1, moe._gc.collections)
    -- freeing lowers the reference level
    moe._gc.base.device = 1000
    assert.is_false(moe._gc_maybe("device", 500))
    assert.equal(500, moe._gc.base.device)
    assert.is_true(moe._gc_maybe("device", 601))
    moe.set_gc_threshold(nil)
    moe._gc.base.device = 0
    assert.equal(2 ^ 30, moe.gc_threshold("device"))
    moe._gc.base.device = 8 * 2 ^ 30
    assert.equal(2 ^ 31, moe.gc_threshold("device"))
    moe.collect_garbage()
    local err = error_of(moe.set_gc_threshold, -1)
    assert.truthy(has(err, "moe.set_gc_threshold: bytes: expected a non-negative number or nil, got -1"), err)
  end)
end)

describe("devices and module functions", function()
  it("parses device strings", function()
    local d = moe._device("cuda:1")
    assert.equal(moe.C.MOE_DEVICE_CUDA, d.type)
    assert.equal(1, d.index)
    assert.equal(moe.C.MOE_DEVICE_CPU, moe._device("cpu").type)
    assert.equal(0, moe._device("cuda").index)
    assert.equal("cpu", moe._device_str(moe._device(nil)))
    local err = error_of(moe._device, "cuda:x", "f", "dev")
    assert.truthy(has(err, 'f: dev: expected "cpu", "cuda" or "cuda:N", got "cuda:x"'), err)
  end)

  it("reports version, build and CUDA facts", function()
    assert.truthy(moe.version():match("^%d+%.%d+%.%d+$"))
    assert.equal("string", type(moe.build_info()))
    assert.equal("boolean", type(moe.cuda_available()))
    assert.equal(moe.cuda_device_count() > 0, moe.cuda_available())
    local m = moe.mem_stats()
    for _, k in ipairs{ "live_tensors", "live_storages", "host_bytes", "device_bytes",
                        "peak_device_bytes", "peak_host_bytes" } do
      assert.equal("number", type(m[k]), k)
    end
    assert.is_true(moe.is_tensor(moe.zeros({1})))
    assert.is_false(moe.is_tensor({}))
    assert.is_false(moe.is_tensor(nil))
    moe.synchronize("cpu")
  end)

  it("set_default_device(cpu) returns the previous default", function()
    assert.equal("cpu", moe.set_default_device("cpu"))
    assert.equal("cpu", moe.default_device())
  end)
end)

describe("misuse errors", function()
  it("name the function, the argument, the expectation and the value", function()
    local cases = {
      { function() moe.zeros({2}, {dtype = "f33"}) end, 'moe.zeros: opts.dtype: expected a dtype name (f32, f16, bf16' },
      { function() moe.zeros({2}, {dtype = "f33"}) end, 'got "f33"' },
      { function() moe.zeros({2}, {dtype = 99}) end, "got 99" },
      { function() moe.zeros({1, 1, 1, 1, 1, 1, 1, 1, 1}) end, "moe.zeros: shape: expected at most 8 dimensions, got 9" },
      { function() moe.zeros({2, -1}) end, "moe.zeros: shape: expected a table of non-negative integers, got {2, -1}" },
      { function() moe.ones({2.5}) end, "moe.ones: shape: expected a table of non-negative integers, got {2.5}" },
      { function() moe.empty(3) end, "moe.empty: shape: expected a table of non-negative integers, got 3" },
      { function() moe.zeros({2}, {dtpye = "f32"}) end, 'moe.zeros: opts: unknown option "dtpye"' },
      { function() moe.zeros({2}, "f32") end, 'moe.zeros: opts: expected a table or nil, got "f32"' },
      { function() moe.zeros({2}, {device = "gpu"}) end, 'moe.zeros: opts.device: expected "cpu", "cuda" or "cuda:N", got "gpu"' },
      { function() moe.full({2}, "x") end, 'moe.full: value: expected a number, got "x"' },
      { function() moe.zeros({3}, {dtype = "e2m1"}) end, "expected an even size for packed dtype e2m1, got 3" },
      { function() moe.randn({2}, {seed = -1}) end, "moe.randn: opts.seed: expected a non-negative integer, got -1" },
      { function() moe.randn({2}, {std = -1}) end, "moe.randn: moe_tensor_rand_normal: std: expected >= 0, got -1" },
      { function() moe.rand({2}, {lo = 1, hi = 0}) end, "moe.rand: moe_tensor_rand_uniform: hi: expected >= lo" },
      { function() moe.manual_seed("a") end, 'moe.manual_seed: seed: expected a non-negative integer, got "a"' },
      { function() moe.set_default_device("tpu") end, 'moe.set_default_device: device: expected "cpu", "cuda" or "cuda:N", got "tpu"' },
      { function() moe.graph.capture(42) end, "moe.graph.capture: fn: expected a function, got 42" },
      { function() moe.graph.capture(function() end, {device = "cpu"}) end, "moe.graph.capture: opts.device: expected a CUDA device, got cpu" },
      { function() moe.tensor({1}, {dtype = "q7"}) end, 'moe.tensor: opts.dtype: expected a dtype name' },
    }
    for i, c in ipairs(cases) do
      local err = error_of(c[1])
      assert.truthy(has(err, c[2]), "case " .. i .. ": expected " .. c[2] .. "\n  got: " .. tostring(err))
    end
  end)

  it("point at the caller's line", function()
    local err = error_of(function() moe.zeros({-1}) end)
    assert.truthy(err:match("^[^:]*tensor_spec%.lua:%d+: moe%.zeros: shape:"), err)
    err = error_of(function() moe.zeros({2}, {dtype = "nope"}) end)
    assert.truthy(err:match("^[^:]*tensor_spec%.lua:%d+: moe%.zeros: opts%.dtype:"), err)
    local t = moe.zeros({2, 2})
    err = error_of(function() t:select(5, 1) end)
    assert.truthy(err:match("^[^:]*tensor_spec%.lua:%d+: t:select: dim:"), err)
    -- errors from the engine too
    err = error_of(function() moe.zeros({3}, {dtype = "e2m1"}) end)
    assert.truthy(err:match("^[^:]*tensor_spec%.lua:%d+: moe%.zeros: moe_tensor_new: "), err)
    err = error_of(function() moe.randn({2}, {std = -1}) end)
    assert.truthy(err:match("^[^:]*tensor_spec%.lua:%d+: moe%.randn: "), err)
  end)
end)

describe("without CUDA", function()
  local no_cuda = not moe.cuda_available()
  local function maybe(name, fn)
    if no_cuda then it(name, fn) else pending(name .. " (this machine has CUDA)") end
  end

  maybe("a CUDA tensor request fails with a message about CUDA", function()
    local err = error_of(moe.zeros, {2}, {device = "cuda"})
    assert.truthy(has(err, "moe.zeros: ") and has(err, "CUDA"), err)
    err = error_of(moe.randn, {2}, {device = "cuda:1"})
    assert.truthy(has(err, "CUDA"), err)
    local t = moe.zeros({2})
    err = error_of(t.to, t, "cuda")
    assert.truthy(has(err, "t:to: ") and has(err, "CUDA"), err)
  end)

  maybe("set_default_device and graph capture refuse CUDA", function()
    local err = error_of(moe.set_default_device, "cuda")
    assert.truthy(has(err, "moe.set_default_device: device: CUDA requested but"), err)
    assert.equal("cpu", moe.default_device())
    local called = false
    err = error_of(moe.graph.capture, function() called = true end)
    assert.truthy(has(err, "moe.graph.capture: ") and has(err, "CUDA"), err)
    assert.is_false(called)
    assert.is_false(moe.graph.is_capturing())
  end)
end)
