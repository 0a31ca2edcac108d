-- spec_helper -- the Busted helper `moe spec` passes when you give none (--helper=...).
--
-- `moe spec` has already loaded the engine and moe.assert before Busted started; this file
-- makes the same setup available to a plain Busted run under LuaJIT:
--   luajit $(command -v busted) --helper=<moelab>/scripts/spec_helper.lua \
--          --lpath='<moelab>/bindings/?.lua;<moelab>/bindings/?/init.lua' spec/
-- (without the #gpu filtering and the exit-77 skip, which only `moe spec` does).
-- Under `moe spec` the runner already loaded the engine (and reported a failure).
local runner = package.loaded["spec_runner"]
local ok, err = true, nil
if not (type(runner) == "table" and runner.engine_checked) then
  ok, err = pcall(require, "moe")
  if not ok then package.loaded["moe"] = nil end
end
if not ok then
  io.stderr:write("spec_helper: warning: the engine did not load: ",
                  (tostring(err):gsub("\n.*", "")), "\n")
end
require("moe.assert")
