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

  describe("parse", function()
    local SPEC = {
      { "--shape", key = "shape", kind = "names", value = { { name = "a" }, { name = "b" } } },
      { "--t", key = "t", kind = "numbers", aliases = { "--T" } },
      { "--reps", key = "reps", kind = "number" },
      { "--json", key = "json", kind = "string" },
      { "--no-torch", key = "torch", kind = "flag", value = false },
      { "--compare-env", kind = "env" },
    }
    -- parse with stderr and stdout captured: opts, code, what was written
    local function run(args)
      local err, out = {}, {}
      local saved_stderr, saved_print = io.stderr, _G.print
      io.stderr = { write = function(_, ...) for _, x in ipairs{ ... } do err[#err + 1] = x end end } -- luacheck: ignore 122
      _G.print = function(...) out[#out + 1] = table.concat({ ... }, " ") end
      local ok, opts, code = pcall(common.parse, "x", args, { reps = 5, torch = true }, SPEC, "usage: x")
      io.stderr, _G.print = saved_stderr, saved_print -- luacheck: ignore 122
      assert(ok, opts)
      return opts, code, table.concat(err), table.concat(out)
    end

    it("fills the options over the defaults", function()
      local o = run{ "--shape", "b", "--T", "1,16", "--no-torch", "--json", "p.json", "--compare-env", "K=v=1" }
      assert.equal("b", o.shape[1].name)
      assert.same({ 1, 16 }, o.t)
      assert.equal(5, o.reps)
      assert.is_false(o.torch)
      assert.equal("p.json", o.json)
      assert.equal("K", o.env_k)
      assert.equal("v=1", o.env_v)
      o = run{}
      assert.equal(5, o.reps)
      assert.is_true(o.torch)
    end)

    it("prints the usage for --help and -h (code 0)", function()
      for _, h in ipairs{ "--help", "-h" } do
        local o, code, _, out = run{ "--reps", "3", h }
        assert.is_nil(o)
        assert.equal(0, code)
        assert.equal("usage: x", out)
      end
    end)

    it("names the option, what it expects and what it got (code 2)", function()
      for _, c in ipairs{
        { { "--reps", "0" }, "moe bench x: --reps: expected a positive number, got 0\n" },
        { { "--reps", "many" }, "moe bench x: --reps: expected a positive number, got many\n" },
        { { "--t", "1,b" }, "moe bench x: --t: expected numbers, got b\n" },
        { { "--t", "," }, "moe bench x: --t: expected a comma list of numbers, got ','\n" },
        { { "--shape", "c" }, "moe bench x: --shape: unknown c (known: a, b)\n" },
        { { "--compare-env", "nope" }, "moe bench x: --compare-env: expected NAME=VALUE, got nope\n" },
        { { "--json" }, "moe bench x: --json: expected a value after it\n" },
        { { "--frob" }, "moe bench x: unknown option --frob\n" },
      } do
        local o, code, err = run(c[1])
        assert.is_nil(o)
        assert.equal(2, code)
        assert.equal(c[2], err)
      end
    end)
  end)

  it("reports the CUDA check", function()
    assert.equal(moe.cuda_available(), common.have_cuda(moe, "spec"))
  end)
end)
