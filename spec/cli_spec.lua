-- The `moe` command: help, version, doctor, dispatch, `moe run`, `moe spec`, `moe repl`.
-- Each case runs the command in a child process (io.popen) and checks its output and exit
-- status.
local moe = require("moe")

local function dirname(p) return p:match("^(.*)/[^/]*$") or "." end
local SRC = os.getenv("MOE_SOURCE_DIR")
if not SRC or SRC == "" then
  local here = debug.getinfo(1, "S").source:sub(2)
  SRC = dirname(dirname(here))
  if SRC:sub(1, 1) ~= "/" then SRC = os.getenv("PWD") .. "/" .. SRC end
end
local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
local MOE = "luajit " .. q(SRC .. "/scripts/moe")
local HAS_CUDA = moe.cuda_available()

-- Run a shell command (stdout and stderr together); returns exit status, output.
local function sh(cmd, cwd)
  local p = assert(io.popen("cd " .. q(cwd or "/tmp") .. " && (" .. cmd .. ") 2>&1; echo \"__RC=$?\""))
  local out = p:read("*a")
  p:close()
  local code = tonumber(out:match("__RC=(%d+)%s*$"))
  return code, (out:gsub("__RC=%d+%s*$", ""))
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(os.execute("mkdir -p " .. q(d)) == 0)
  return d
end

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

local function has(out, s) return out:find(s, 1, true) ~= nil end

describe("moe command", function()
  local dirs = {}
  local function newdir() local d = tmpdir() dirs[#dirs + 1] = d return d end
  teardown(function()
    for _, d in ipairs(dirs) do os.execute("rm -rf " .. q(d)) end
  end)

  describe("help and dispatch", function()
    it("moe --help lists the commands and exits 0", function()
      local code, out = sh(MOE .. " --help")
      assert.equal(0, code, out)
      assert.is_true(has(out, "Usage: moe COMMAND"), out)
      for _, c in ipairs({ "run", "repl", "spec", "bench", "doctor", "version", "help" }) do
        assert.matches("\n  " .. c .. "%s", out)
      end
    end)

    it("every built-in answers --help with its usage", function()
      for _, c in ipairs({ "run", "repl", "spec", "bench", "doctor", "version", "help" }) do
        local code, out = sh(MOE .. " " .. c .. " --help")
        assert.equal(0, code, c .. ": " .. out)
        assert.is_true(has(out, "Usage: moe " .. c), c .. ": " .. out)
      end
      local code, out = sh(MOE .. " help spec")
      assert.equal(0, code)
      assert.is_true(has(out, "Usage: moe spec"), out)
    end)

    it("an unknown command exits 2 and lists the commands", function()
      local code, out = sh(MOE .. " frobnicate")
      assert.equal(2, code)
      assert.is_true(has(out, "unknown command 'frobnicate'"), out)
      assert.is_true(has(out, "doctor"), out)
    end)

    it("moe bench --help lists the files of scripts/bench", function()
      local code, out = sh(MOE .. " bench --help")
      assert.equal(0, code, out)
      local p = io.popen("ls " .. q(SRC .. "/scripts/bench"))
      for f in p:lines() do
        local n = f:match("^(.+)%.lua$")
        if n then assert.is_true(has(out, "  " .. n), n .. " missing in:\n" .. out) end
      end
      p:close()
      code, out = sh(MOE .. " bench no_such_bench")
      assert.equal(2, code)
      assert.is_true(has(out, "no benchmark 'no_such_bench'"), out)
    end)

    it("moe bench NAME rejects a bad option value with exit 2, naming the option (before any GPU check)",
       function()
      for _, c in ipairs{ { "fused_quant --reps x", "--reps: expected a positive number, got x" },
                          { "fused --t 1,a", "--t: expected numbers, got a" },
                          { "route --cases nope", "--cases: unknown nope" },
                          { "copy --mib", "--mib: expected a value after it" },
                          { "fused_quant --quant fp9", "--quant: expected fp8, fp8_block, nvfp4, mxfp4 or mxint4, got fp9" } } do
        local code, out = sh(MOE .. " bench " .. c[1])
        assert.equal(2, code, c[1] .. ": " .. out)
        assert.is_true(has(out, c[2]), c[1] .. ": " .. out)
      end
      local code, out = sh(MOE .. " bench fused_quant --help")
      assert.equal(0, code, out)
      assert.is_true(has(out, "usage: moe bench fused_quant"), out)
    end)

    it("runs scripts/cmd/NAME.lua for `moe NAME`, through a symlink too", function()
      local d = newdir()
      os.execute("mkdir -p " .. q(d .. "/tree/scripts/cmd") .. " " .. q(d .. "/bin"))
      os.execute("cp " .. q(SRC .. "/scripts/moe") .. " " .. q(d .. "/tree/scripts/moe"))
      write(d .. "/tree/scripts/cmd/hello.lua",
            "-- moe hello: says hello\nprint('hello', arg[0]:match('[^/]+$'), ...)\nreturn 3\n")
      os.execute("ln -s " .. q(d .. "/tree/scripts/moe") .. " " .. q(d .. "/bin/moe"))
      local code, out = sh("luajit " .. q(d .. "/bin/moe") .. " hello a b")
      assert.equal(3, code, out)
      assert.is_true(has(out, "hello\thello.lua\ta\tb"), out)
      code, out = sh("luajit " .. q(d .. "/bin/moe") .. " --help")
      assert.equal(0, code, out)
      assert.is_true(has(out, "hello     says hello"), out)
    end)

    it("the script runs by its shebang", function()
      local code, out = sh(q(SRC .. "/scripts/moe") .. " version")
      assert.equal(0, code, out)
    end)
  end)

  describe("version and doctor", function()
    it("moe version prints the engine version", function()
      local code, out = sh(MOE .. " version")
      assert.equal(0, code, out)
      assert.is_true(has(out, "moelab " .. moe.version()), out)
    end)

    it("moe doctor reports the library, the cdef and CUDA", function()
      local code, out = sh(MOE .. " doctor")
      assert.equal(0, code, out)
      assert.is_true(has(out, "libmoe:"), out)
      assert.is_true(has(out, moe.lib_path), out)
      assert.is_true(has(out, "cdef:"), out)
      assert.matches("CUDA devices:%s+" .. moe.cuda_device_count(), out)
      assert.is_true(has(out, "LuaJIT"), out)
      assert.is_true(has(out, "busted:"), out)
    end)

    it("moe doctor exits 1 when the engine cannot be loaded", function()
      local code, out = sh("MOE_LIB=/nonexistent/libmoe.so " .. MOE .. " doctor")
      assert.equal(1, code, out)
      assert.is_true(has(out, "NOT LOADED"), out)
    end)
  end)

  describe("moe run", function()
    it("passes arguments and exits 0", function()
      local d = newdir()
      write(d .. "/ok.lua", "local moe = require('moe')\nprint('args', ...)\nprint(arg[0], arg[1])\n" ..
                            "print(moe.zeros({2}):numel())\n")
      local code, out = sh(MOE .. " run ok.lua x y", d)
      assert.equal(0, code, out)
      assert.is_true(has(out, "args\tx\ty"), out)
      assert.is_true(has(out, "ok.lua\tx"), out)
      assert.is_true(has(out, "\n2\n"), out)
    end)

    it("an error prints the message with a traceback and exits 1", function()
      local d = newdir()
      write(d .. "/bad.lua", "local function inner() error('the experiment broke') end\ninner()\n")
      local code, out = sh(MOE .. " run bad.lua", d)
      assert.equal(1, code, out)
      assert.is_true(has(out, "bad.lua:1: the experiment broke"), out)
      assert.is_true(has(out, "stack traceback:"), out)
      assert.is_true(has(out, "in function 'inner'") or has(out, "in local 'inner'"), out)
    end)

    it("the quickstart tour runs", function()
      local code, out = sh(MOE .. " run " .. q(SRC .. "/scripts/experiments/quickstart.lua"))
      assert.equal(0, code, out)
      assert.is_true(has(out, "== routing"), out)
      assert.is_true(has(out, "moelab " .. moe.version()), out)
    end)

    it("a missing script exits 2", function()
      local code, out = sh(MOE .. " run /nonexistent.lua")
      assert.equal(2, code)
      assert.is_true(has(out, "no such file"), out)
    end)
  end)

  describe("moe spec", function()
    it("runs the example specs from outside the source tree", function()
      local code, out = sh(MOE .. " spec " .. q(SRC .. "/scripts/spec-examples") .. " -o plainTerminal")
      assert.equal(0, code, out)
      assert.matches("%d+ successes / 0 failures / 0 errors", out)
      if not HAS_CUDA then
        assert.matches("skipped: no CUDA device %(%d+ #gpu tests excluded%)", out)
      end
    end)

    it("a user spec folder anywhere: moe and moe.assert are there, failures exit 1", function()
      local d = newdir()
      write(d .. "/good_spec.lua", [[
local moe = require("moe")
describe("mine", function()
  it("near", function() assert.tensor_near(moe.ones({2, 2}), 1) end)
  it("pending is not a failure", function() pending("later") end)
end)]])
      local code, out = sh(MOE .. " spec .", d)
      assert.equal(0, code, out)
      assert.is_true(has(out, "1 success / 0 failures / 0 errors / 1 pending"), out)

      write(d .. "/bad_spec.lua", [[
local moe = require("moe")
describe("my experiment", function()
  it("drifts too far", function()
    assert.tensor_near(moe.tensor({1, 2, 3}), {1, 2, 4}, {atol = 0.1})
  end)
end)]])
      code, out = sh(MOE .. " spec . -o plainTerminal", d)
      assert.equal(1, code, out)
      assert.is_true(has(out, "my experiment drifts too far"), out)
      assert.is_true(has(out, "bad_spec.lua:4"), out)
      assert.matches("%[3%]%s+3%s+4", out)
    end)

    it("many failures still exit 1 (not a wrapped 256)", function()
      local d = newdir()
      local lines = {}
      for i = 1, 256 do lines[i] = ("it('f%d', function() assert.equal(1, 2) end)"):format(i) end
      write(d .. "/many_spec.lua", table.concat(lines, "\n"))
      local code, out = sh(MOE .. " spec many_spec.lua", d)
      assert.equal(1, code, out:sub(1, 200))
    end)

    it("an error while loading a spec file exits 1", function()
      local d = newdir()
      write(d .. "/broken_spec.lua", "describe('x', function() this is not lua end)")
      local code = sh(MOE .. " spec broken_spec.lua", d)
      assert.equal(1, code)
    end)

    it("tagged gpu tests, gpu blocks and *_gpu_spec.lua files are skipped without a device", function()
      local d = newdir()
      write(d .. "/mixed_spec.lua", [[
describe("cpu part", function()
  it("runs", function() assert.is_true(true) end)
  it("needs a #gpu", function() error("must not run without a device") end)
end)
describe("#gpu whole block", function()
  error("the body of a #gpu block must not run without a device")
end)]])
      write(d .. "/only_gpu_spec.lua", "it('needs cuda', function() error('ran without a device') end)")
      if HAS_CUDA then return end -- what follows is the no-device behaviour
      local code, out = sh(MOE .. " spec .", d)
      assert.equal(0, code, out)
      assert.is_true(has(out, "1 success / 0 failures / 0 errors"), out)
      assert.is_true(has(out, "skipped: no CUDA device (1 #gpu test, 1 #gpu describe block, " ..
                              "1 *_gpu_spec.lua file excluded)"), out)
      code, out = sh(MOE .. " spec only_gpu_spec.lua", d)
      assert.equal(77, code, out)
      assert.is_true(has(out, "skipped: no CUDA device"), out)
    end)

    it("passes Busted options on (--list, --filter)", function()
      local d = newdir()
      write(d .. "/two_spec.lua", "it('alpha', function() end)\nit('beta', function() error('x') end)")
      local code, out = sh(MOE .. " spec two_spec.lua --filter=alpha", d)
      assert.equal(0, code, out)
      code, out = sh(MOE .. " spec --list two_spec.lua", d)
      assert.equal(0, code, out)
      assert.is_true(has(out, "alpha") and has(out, "beta"), out)
    end)
  end)

  describe("moe repl through a pipe", function()
    it("evaluates, prints and survives an error line", function()
      local code, out = sh("printf '1+1\\nerror(\"boom\")\\nlocal x = 20\\nx + 1\\n" ..
                           "function f(a)\\n  return a * 2\\nend\\nf(4)\\n' | " .. MOE .. " repl")
      assert.equal(0, code, out)
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.equal("2", lines[1], out)
      assert.is_true(has(out, "stdin:1: boom"), out)
      assert.is_true(has(out, "\n21\n"), out)
      assert.equal("8", lines[#lines], out)
    end)

    it("has moe loaded and help() docs", function()
      local code, out = sh("printf 'moe.zeros({2}):numel()\\nhelp(moe.randn)\\n' | " .. MOE .. " repl")
      assert.equal(0, code, out)
      assert.is_true(has(out, "2\n"), out)
      assert.is_true(has(out, "moe.randn(shape"), out)
    end)
  end)
end)
