-- Dense math ops on the CPU backend, with answers worked out by hand.
local moe = require("moe")

describe("moe.matmul_nt", function()
  it("computes a . b^T with hand-checked values", function()
    local a = moe.tensor({{1, 2, 3}, {4, 5, 6}})          -- [2, 3]
    local b = moe.tensor({{1, 0, 0}, {0, 1, 0}, {1, 1, 1}, {2, -1, 0.5}}) -- [4, 3]
    local c = moe.matmul_nt(a, b)
    -- row 1: [1, 2, 6, 2-2+1.5=1.5]; row 2: [4, 5, 15, 8-5+3=6]
    assert.are.same({{1, 2, 6, 1.5}, {4, 5, 15, 6}}, c:totable())
    assert.are.equal("f32", c:dtype())
  end)

  it("accepts bf16 inputs, strided views and a bf16 output", function()
    local a = moe.tensor({{1, 2}, {3, 4}}, {dtype = "bf16"})
    local bt = moe.tensor({{1, 3}, {2, 4}}):transpose(1, 2)   -- b = [[1,2],[3,4]] as a view
    local out = moe.empty({2, 2}, {dtype = "bf16"})
    moe.matmul_nt(a, bt, {out = out})
    -- a . b^T = [[1+4, 3+8], [3+8, 9+16]]
    assert.are.same({{5, 11}, {11, 25}}, out:totable())
  end)

  it("names the argument on bad input", function()
    local a = moe.zeros({2, 3})
    assert.has_error(function() moe.matmul_nt(a, moe.zeros({4, 2})) end,
      "moe.matmul_nt: moe_matmul_nt: b: expected [N, 3] (K of a), got [4, 2]")
    local ok, err = pcall(moe.matmul_nt, a, moe.zeros({4, 3}, {dtype = "i32"}))
    assert.is_false(ok)
    assert.matches("b: expected dtype f32, bf16 or f16, got i32", err)
    ok, err = pcall(moe.matmul_nt, a, moe.zeros({4, 3}), {out = moe.zeros({2, 5})})
    assert.is_false(ok)
    assert.matches("out: expected %[2, 4%], got %[2, 5%]", err)
    ok, err = pcall(moe.matmul_nt, a, "x")
    assert.is_false(ok)
    assert.matches("b: expected a tensor", err)
  end)
end)

describe("moe.rmsnorm", function()
  it("normalises rows by their root mean square", function()
    -- row [3, 4]: mean square 12.5, rms 3.5355; [3,4]/3.5355 = [0.84853, 1.13137]
    local x = moe.tensor({{3, 4}, {0, 0}})
    local y = moe.rmsnorm(x, moe.tensor({1, 2}), {eps = 0})
    local t = y:totable()
    assert.is_near(3 / math.sqrt(12.5), t[1][1], 1e-6)
    assert.is_near(2 * 4 / math.sqrt(12.5), t[1][2], 1e-6)
    -- the zero row with eps = 0 divides 0 by 0: NaN, documented
    assert.is_true(t[2][1] ~= t[2][1])
    local z = moe.rmsnorm(moe.tensor({{0, 0}}), nil, {eps = 1e-6})
    assert.are.same({{0, 0}}, z:totable())
  end)

  it("rejects a weight of the wrong length", function()
    local ok, err = pcall(moe.rmsnorm, moe.zeros({2, 4}), moe.zeros({3}))
    assert.is_false(ok)
    assert.matches("weight: expected %[4%]", err)
  end)
end)

describe("moe.axpby", function()
  it("computes alpha x + beta y in place", function()
    local x, y = moe.tensor({1, 2, 3}), moe.tensor({10, 20, 30})
    moe.axpby(2, x, 0.5, y)
    assert.are.same({7, 14, 21}, y:totable())
  end)
  it("overwrites y when beta is 0, even if y holds NaN", function()
    local y = moe.tensor({0 / 0, 1})
    moe.axpby(1, moe.tensor({5, 6}), 0, y)
    assert.are.same({5, 6}, y:totable())
  end)
  it("checks shapes", function()
    local ok, err = pcall(moe.axpby, 1, moe.zeros({3}), 1, moe.zeros({4}))
    assert.is_false(ok)
    assert.matches("y: expected shape %[3%] %(as x%), got %[4%]", err)
  end)
end)
