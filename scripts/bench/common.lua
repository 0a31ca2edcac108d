-- bench/common.lua -- the small helpers every `moe bench` script shares: option parsing, comma
-- lists, the selection of named cases, numeric lists, the CUDA check and the median of timings.
local M = {}

-- "a,b,c" -> {"a", "b", "c"}
function M.split(s)
  local r = {}
  for x in s:gmatch("[^,]+") do r[#r + 1] = x end
  return r
end

-- "1,16,64" -> {1, 16, 64}; nil and a message naming the bad entry otherwise.
function M.numbers(s)
  local r = {}
  for _, x in ipairs(M.split(s)) do
    local v = tonumber(x)
    if not v then return nil, "expected numbers, got " .. x end
    r[#r + 1] = v
  end
  return r
end

-- The entries of `list` whose .name is in the comma list `names`, in list order; nil and a
-- message naming the unknown names otherwise.
function M.pick(list, names)
  local want, keep = {}, {}
  for _, n in ipairs(M.split(names)) do want[n] = true end
  for _, e in ipairs(list) do
    if want[e.name] then
      keep[#keep + 1] = e
      want[e.name] = nil
    end
  end
  local unknown = {}
  for n in pairs(want) do unknown[#unknown + 1] = n end
  if #unknown > 0 then
    table.sort(unknown)
    local known = {}
    for _, e in ipairs(list) do known[#known + 1] = e.name end
    return nil, string.format("unknown %s (known: %s)", table.concat(unknown, ", "), table.concat(known, ", "))
  end
  return keep
end

-- Median of a list of numbers (sorts it in place).
function M.median(t)
  table.sort(t)
  local n = #t
  if n % 2 == 1 then return t[(n + 1) / 2] end
  return 0.5 * (t[n / 2] + t[n / 2 + 1])
end

-- Median time in µs of one call, from CUDA-graph replays: call(c) for c = 0 .. calls - 1 captured
-- in one graph, 3 warm-up replays, then `reps` timed ones, each divided by `calls`.
function M.graph_us(moe, calls, reps, call)
  local g = moe.graph.capture(function()
    for c = 0, calls - 1 do call(c) end
  end)
  local times = g:time(3, reps)
  g:free()
  for k = 1, #times do times[k] = times[k] / calls end
  return M.median(times)
end

-- A bench script's options from its arguments, by a table of options { flag, key =, kind =,
-- value =, aliases = } with kind
--   "flag"    opts[key] = value;
--   "string"  the next argument;
--   "number"  the next argument, a positive number;
--   "numbers" the next argument, a non-empty comma list of numbers;
--   "names"   the next argument, a comma list of names picked from the list `value` (common.pick);
--   "env"     the next argument, NAME=VALUE, into opts.env_k and opts.env_v.
-- Starts from a copy of `defaults`.  -h / --help prints `usage` and returns nil, 0; an unknown
-- option, a missing or bad value tells stderr (naming the option, what it expects and what it
-- got) and returns nil, 2.
function M.parse(bench, args, defaults, spec, usage)
  local opts, by = {}, {}
  for k, v in pairs(defaults or {}) do opts[k] = v end
  for _, o in ipairs(spec) do
    by[o[1]] = o
    for _, a in ipairs(o.aliases or {}) do by[a] = o end
  end
  local function fail(msg)
    io.stderr:write("moe bench " .. bench .. ": " .. msg .. "\n")
    return nil, 2
  end
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" or a == "--help" then
      print(usage)
      return nil, 0
    end
    local o = by[a]
    if not o then return fail("unknown option " .. a) end
    if o.kind == "flag" then
      opts[o.key] = o.value
    else
      i = i + 1
      local v = args[i]
      if v == nil then return fail(a .. ": expected a value after it") end
      if o.kind == "string" then
        opts[o.key] = v
      elseif o.kind == "number" then
        local n = tonumber(v)
        if not n or n <= 0 then return fail(a .. ": expected a positive number, got " .. v) end
        opts[o.key] = n
      elseif o.kind == "numbers" then
        local ns, why = M.numbers(v)
        if ns and #ns == 0 then ns, why = nil, "expected a comma list of numbers, got '" .. v .. "'" end
        if not ns then return fail(a .. ": " .. why) end
        opts[o.key] = ns
      elseif o.kind == "names" then
        local keep, why = M.pick(o.value, v)
        if not keep then return fail(a .. ": " .. why) end
        opts[o.key] = keep
      elseif o.kind == "env" then
        local k, ev = v:match("^([%w_]+)=(.*)$")
        if not k then return fail(a .. ": expected NAME=VALUE, got " .. v) end
        opts.env_k, opts.env_v = k, ev
      else
        error("bench.common.parse: option " .. a .. " has unknown kind " .. tostring(o.kind))
      end
    end
    i = i + 1
  end
  return opts
end

-- f()'s result with the environment variable `name` set to `value`, unset afterwards (the
-- engine reads its MOE_FUSED_* switches on every call, so a bench can time both settings).
function M.with_env(name, value, f)
  local ffi = require("ffi")
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  ffi.C.setenv(name, value, 1)
  local ok, r = pcall(f)
  ffi.C.unsetenv(name)
  if not ok then error(r, 0) end
  return r
end

-- false (after telling stderr why) when there is no CUDA device: the bench then returns 77.
function M.have_cuda(moe, name)
  if moe.cuda_available() then return true end
  io.stderr:write("moe bench " .. name .. ": no CUDA device (" .. moe.build_info() .. ")\n")
  return false
end

return M
