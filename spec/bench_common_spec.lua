-- The shared helpers of the `moe bench` scripts (scripts/bench/common.lua).
local moe = require("moe")
local common = require("bench.common")

describe("bench.common", function()
  it("splits comma lists and parses numbers", function()
    assert.same({ "a", "b", "c" }, common.split("a,b,,c"))
    assert.same({ 1, 16, 4096 }, common.numbers("1,16,4096"))
    local r, why = common.numbers("1,x")
    assert.is_nil(r)
    assert.equal("expected numbers, got x", why)
  end)

  it("picks named entries in list order and names unknown ones", function()
    local list = { { name = "a" }, { name = "b" }, { name = "c" } }
    local keep = common.pick(list, "c,a")
    assert.equal(2, #keep)
    assert.equal("a", keep[1].name)
    assert.equal("c", keep[2].name)
    local none, why = common.pick(list, "a,zz,yy")
    assert.is_nil(none)
    assert.equal("unknown yy, zz (known: a, b, c)", why)
  end)

  it("takes the median of odd and even lists", function()
    assert.equal(2, common.median({ 3, 1, 2 }))
    assert.equal(2.5, common.median({ 4, 1, 3, 2 }))
  end)

  it("reports the CUDA check", function()
    assert.equal(moe.cuda_available(), common.have_cuda(moe, "spec"))
  end)
end)
