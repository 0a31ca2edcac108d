-- spec_runner -- `moe spec`: Busted in-process under LuaJIT, with the engine preloaded.
--
-- Why in-process: Debian's busted script runs under `lua` (no FFI), and Busted unloads
-- modules between spec files, which can unload an ffi.load'ed library while cdata still
-- point into it.  Here `moe` (and moe.assert) are required before Busted starts, so they
-- are part of the snapshot Busted restores after each file and stay loaded.
--
-- Without a CUDA device: a spec file named *_gpu_spec.lua given alone exits 77 (ctest's
-- SKIP_RETURN_CODE); in a folder run such files, tests tagged #gpu and describe blocks
-- tagged #gpu are excluded and counted in a "skipped: no CUDA device" line.
local M = {}

local SKIP = 77

-- Busted options that take a value in the next argument (unless written --opt=value).
local VALUE_OPTS = {}
for o in ([[-p --pattern --exclude-pattern -e -o --output -C --directory -f --config-file
  --coverage-config-file -t --tags --exclude-tags --filter --filter-out -m --lpath --cpath
  -r --run --repeat --seed --lang --loaders --helper --lua -Xoutput -Xhelper]]):gmatch("%S+") do
  VALUE_OPTS[o] = true
end

function M.help()
  return [[
Usage: moe spec [PATHS...] [BUSTED OPTIONS]

Runs Busted specs under LuaJIT with moelab set up:
  - `moe` is loaded before Busted starts and stays loaded across spec files
    (specs just `local moe = require("moe")`);
  - the module path includes moelab's bindings/ and scripts/, so a folder of
    your own specs anywhere on disk works: `moe spec ~/my-experiments/spec`;
  - moe.assert is registered: assert.tensor_near, assert.tensor_equal,
    assert.same_routing, assert.routing_disagreement_below (and their
    negations, assert.is_not.tensor_near, ...);
  - without a CUDA device, tests and describe blocks tagged #gpu and files
    named *_gpu_spec.lua are excluded, with a line
    "skipped: no CUDA device (N #gpu tests excluded)"; a *_gpu_spec.lua file
    given alone exits 77 (what ctest's SKIP_RETURN_CODE expects);
  - the exit status is 0 when every test passed (pending tests do not fail),
    1 when a test failed or errored, 77 as above.

PATHS are spec files or folders (default: ./spec); folders are searched for
files matching --pattern (default _spec).  Unless you pass --helper (or have a
.busted file), moelab's scripts/spec_helper.lua is the helper.

Common Busted options:
  -t, --tags=TAGS          only tests with these #tags      --exclude-tags=TAGS
  --filter=PATTERN         only tests whose name matches    -v, --verbose
  -o, --output=NAME        plainTerminal, utfTerminal, TAP, json, junit
  -p, --pattern=PATTERN    file name pattern in folders     -l, --list
  --busted-help            every Busted option

Examples:
  moe spec                                   # ./spec
  moe spec scripts/spec-examples             # the example specs
  moe spec spec/assert_spec.lua --filter=near
  moe spec ~/exp/spec -t quant -o TAP

See docs/testing.md.]]
end

-- Split the command line into paths and options (keeps the order for Busted).
function M.parse(args)
  local r = { paths = {}, has_helper = false, directory = nil, busted_help = false }
  local i, only_paths = 1, false
  while i <= #args do
    local a = args[i]
    if only_paths or a == "-" or a:sub(1, 1) ~= "-" then
      r.paths[#r.paths + 1] = a
    elseif a == "--" then
      only_paths = true
    elseif a == "--busted-help" then
      r.busted_help = true
    else
      local name = a:match("^(%-%-?[%w-]+)=") or a
      if name == "--helper" then r.has_helper = true end
      if VALUE_OPTS[a] then
        if args[i + 1] == nil then
          return nil, "option " .. a .. " expects a value"
        end
        if a == "-C" or a == "--directory" then r.directory = args[i + 1] end
        i = i + 1
      elseif name == "--directory" then
        r.directory = a:match("=(.*)$")
      end
    end
    i = i + 1
  end
  return r
end

local function is_gpu_spec_file(p)
  return p:match("_gpu_spec%.lua$") ~= nil
end

local function file_exists(p)
  local f = io.open(p, "rb")
  if f then f:close() return true end
  return false
end

-- "#gpu" as a whole tag (not "#gpus", "#gpu_fast").
local function has_gpu_tag(name)
  return type(name) == "string" and name:find("#gpu%f[^%w_%-]") ~= nil
end
M.has_gpu_tag = has_gpu_tag

-- Install the #gpu exclusion on a Busted core object; returns the counters.
local function install_gpu_filter(busted)
  local counts = { tests = 0, blocks = 0, files = 0 }
  local function tagged_context()
    local ctx = busted.context.get()
    while ctx and ctx.descriptor ~= "file" and ctx.descriptor ~= "suite" do
      if has_gpu_tag(ctx.name) then return true end
      ctx = busted.context.parent(ctx)
    end
    return false
  end
  local function sub(descriptors, fn)
    for _, d in ipairs(descriptors) do
      busted.subscribe({ "register", d }, fn, { priority = 1 })
    end
  end
  sub({ "file" }, function(name)
    if is_gpu_spec_file(tostring(name)) then
      counts.files = counts.files + 1
      return nil, false
    end
    return nil, true
  end)
  sub({ "it", "pending" }, function(name)
    if has_gpu_tag(name) or tagged_context() then
      counts.tests = counts.tests + 1
      return nil, false
    end
    return nil, true
  end)
  -- A #gpu describe block is dropped without running its body (the body may touch CUDA),
  -- so the tests inside it cannot be counted: it is counted as a block.
  sub({ "describe" }, function(name)
    if has_gpu_tag(name) then
      counts.blocks = counts.blocks + 1
      return nil, false
    end
    return nil, true
  end)
  return counts
end

local function skip_line(counts)
  local parts = { string.format("%d #gpu test%s", counts.tests, counts.tests == 1 and "" or "s") }
  if counts.blocks > 0 then
    parts[#parts + 1] = string.format("%d #gpu describe block%s", counts.blocks,
                                      counts.blocks == 1 and "" or "s")
  end
  if counts.files > 0 then
    parts[#parts + 1] = string.format("%d *_gpu_spec.lua file%s", counts.files,
                                      counts.files == 1 and "" or "s")
  end
  return "skipped: no CUDA device (" .. table.concat(parts, ", ") .. " excluded)"
end
M.skip_line = skip_line

-- Run Busted's runner with argv; returns the exit status it asked for (0 when it returned).
-- busted.runner ends with busted.compatibility.exit: os.exit(code, true) when the runner was
-- called from a chunk without a file name, else (Lua 5.1 / LuaJIT, code ~= 0) error() with
-- a nil message.  We call it from a chunk named "@moe spec" (so its messages say
-- "moe spec: ...") and intercept os.exit, so the status comes back here either way.
local function call_busted(argv, on_core)
  local make_core = require("busted.core")
  package.loaded["busted.core"] = function(...)
    local b = make_core(...)
    if on_core then on_core(b) end
    return b
  end
  -- (not a tail call: the runner looks at its caller's frame)
  local caller = assert(load("local runner, opts = ... runner(opts)", "@moe spec"))
  local real_exit = os.exit
  local EXIT = {}
  os.exit = function(code) --luacheck: ignore
    error({ [EXIT] = true, code = code }, 0)
  end
  local saved_arg = _G.arg
  _G.arg = argv
  local ok, err = pcall(caller, require("busted.runner"), { standalone = false })
  _G.arg = saved_arg
  os.exit = real_exit --luacheck: ignore
  package.loaded["busted.core"] = make_core
  if ok then return 0 end
  if type(err) == "table" and err[EXIT] then
    local c = err.code
    if c == true or c == nil then return 0 end
    if c == false then return 1 end
    return tonumber(c) or 1
  end
  if err == nil then return 1 end -- busted.compatibility.exit(code ~= 0) under Lua 5.1
  io.stderr:write("moe spec: error: ", tostring(err), "\n")
  return 1
end

-- opts: { source = <moelab source dir> }.  Returns the exit status.
function M.main(args, opts)
  opts = opts or {}
  local r, perr = M.parse(args)
  if not r then
    io.stderr:write("moe spec: ", perr, "\n")
    return 2
  end
  if r.busted_help then
    print(M.help())
    print("\nBusted options (`moe spec` passes them on):")
    call_busted({ [0] = "moe spec", "--help" })
    return 0
  end

  -- The engine first: loaded once, before Busted snapshots package.loaded.
  local mok, moe = pcall(require, "moe")
  local cuda = false
  M.engine_checked = true
  if not mok then
    -- a failed require leaves a sentinel: specs that require moe should see the real error
    package.loaded["moe"] = nil
  end
  if mok then
    local cok, avail = pcall(function() return moe.cuda_available() end)
    cuda = cok and avail or false
  else
    io.stderr:write("moe spec: warning: the engine did not load; #gpu tests are excluded:\n  ",
                    (tostring(moe):gsub("\n.*", "")), "\n")
  end
  local aok, aerr = pcall(require, "moe.assert")
  if not aok then
    io.stderr:write("moe spec: warning: moe.assert did not load: ", tostring(aerr), "\n")
  end

  -- A GPU spec file alone, without a device: skip (ctest SKIP_RETURN_CODE 77).
  if not cuda and #r.paths > 0 then
    local all_gpu = true
    for _, p in ipairs(r.paths) do
      if not (is_gpu_spec_file(p) and file_exists(p)) then all_gpu = false break end
    end
    if all_gpu then
      print("skipped: no CUDA device")
      return SKIP
    end
  end

  local argv = { [0] = "moe spec" }
  for i = 1, #args do
    if args[i] ~= "--busted-help" then argv[#argv + 1] = args[i] end
  end
  if not r.has_helper and opts.source then
    local dir = r.directory or "."
    if not file_exists(dir .. "/.busted") then
      argv[#argv + 1] = "--helper=" .. opts.source .. "/scripts/spec_helper.lua"
    end
  end

  local counts
  local code = call_busted(argv, function(busted)
    if not cuda then counts = install_gpu_filter(busted) end
  end)
  if counts and (counts.tests + counts.blocks + counts.files) > 0 then
    print(skip_line(counts))
  end
  if code ~= 0 and code ~= SKIP then code = 1 end
  return code
end

return M
