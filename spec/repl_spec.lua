-- The REPL's pure parts: input compilation (expression first, unfinished input, `local`),
-- completion candidates and printing.  The interactive side is covered by cli_spec (pipe).
local moe = require("moe")
local repl = require("repl")

describe("repl", function()
  describe("compile", function()
    it("takes an expression first, a statement otherwise", function()
      local f = assert(repl.compile("1 + 1", "=stdin"))
      assert.equal(2, f())
      local g = assert(repl.compile("x_repl_spec = 5", "=stdin"))
      assert.is_nil(g())
      assert.equal(5, rawget(_G, "x_repl_spec"))
      _G.x_repl_spec = nil
    end)

    it("keeps every value of an expression", function()
      local f = assert(repl.compile("1, nil, 3", "=stdin"))
      assert.equal(3, select("#", f()))
    end)

    it("reports unfinished input as incomplete, like luajit.c ('<eof>')", function()
      for _, src in ipairs({ "function f()", "for i = 1, 2 do", "x = ", "t = {1,", "s = [[abc" }) do
        local f, why = repl.compile(src, "=stdin")
        assert.is_nil(f, src)
        assert.equal("incomplete", why, src)
      end
    end)

    it("returns other syntax errors as messages", function()
      local f, why = repl.compile("x = = 1", "=stdin")
      assert.is_nil(f)
      assert.matches("stdin:1:", why)
      assert.is_not.equal("incomplete", why)
    end)

    it("keeps the position of error() in an expression (no tail call)", function()
      local f = assert(repl.compile('error("boom")', "=stdin"))
      local ok, err = pcall(f)
      assert.is_false(ok)
      assert.equal("stdin:1: boom", err)
    end)

    it("makes a top-level local global", function()
      assert.equal("a, b = 1, 2", repl.globalize("local a, b = 1, 2"))
      assert.equal("function f() end", repl.globalize("local function f() end"))
      assert.equal("if x then local y = 1 end", repl.globalize("if x then local y = 1 end"))
      assert.equal("local x", repl.globalize("local x"))
    end)
  end)

  describe("complete", function()
    local env = { moe = moe, t = moe.zeros({ 2 }), print = print, pairs = pairs,
                  obj = setmetatable({}, { __index = { go = function() end, _hidden = 1 } }) }

    it("completes fields of moe", function()
      local c = repl.complete("moe.ran", env, moe)
      assert.same({ "moe.rand", "moe.randn" }, c)
    end)

    it("completes tensor methods after ':'", function()
      local c = repl.complete("t:sh", env, moe)
      assert.same({ "t:shape" }, c)
      assert.is_true(#repl.complete("t:", env, moe) > 10)
    end)

    it("completes methods from a metatable's __index, hiding _names unless asked", function()
      assert.same({ "obj:go" }, repl.complete("obj:", env, moe))
      assert.same({ "obj._hidden" }, repl.complete("obj._", env, moe))
    end)

    it("completes globals and keywords", function()
      assert.same({ "pairs", "print" }, repl.complete("p", env, moe))
      assert.same({ "function" }, repl.complete("func", env, moe))
      assert.same({}, repl.complete("nosuch.x", env, moe))
    end)
  end)

  describe("pretty", function()
    it("prints plain tables two levels deep and tensors with tostring", function()
      assert.equal('{1, 2, a = {b = "x"}}', repl.pretty({ 1, 2, a = { b = "x" } }))
      assert.equal(tostring(moe.zeros({ 1 })), repl.pretty(moe.zeros({ 1 })))
      assert.matches("^{{table: 0x%x+}}$", repl.pretty({ { {} } }))
    end)
  end)

  describe("heatmap_of", function()
    it("draws the load heatmap under traces and the load-share difference under comparisons", function()
      local a = moe.trace.new{ layers = 2, top_k = 1, num_experts = 4 }
      a:append({ { { 0 }, { 1 } }, { { 0 }, { 2 } } })
      local b = moe.trace.new{ layers = 2, top_k = 1, num_experts = 4 }
      b:append({ { { 3 }, { 1 } }, { { 3 }, { 2 } } })
      local hm = repl.heatmap_of(moe, a)
      assert.is_string(hm)
      assert.matches("layers 0..1 %(rows%) x experts 0..3", hm)
      local d = repl.heatmap_of(moe, moe.trace.compare(a, b))
      assert.matches("load share B %- A", d)
      assert.is_string(repl.heatmap_of(moe, moe.trace.stats(a)))
      -- anything else gets no heatmap
      assert.is_nil(repl.heatmap_of(moe, { 1, 2 }))
      assert.is_nil(repl.heatmap_of(moe, moe.zeros({ 2 })))
    end)
  end)
end)

