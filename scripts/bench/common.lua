-- bench/common.lua -- the small helpers every `moe bench` script shares: comma lists, the
-- selection of named cases, numeric lists, the CUDA check and the median of timings.
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

-- The argument of --compare-env, "NAME=VALUE" -> NAME, VALUE; nil (after telling stderr) when
-- it is not of that form.
function M.env_arg(bench, s)
  local k, v = (s or ""):match("^([%w_]+)=(.*)$")
  if not k then io.stderr:write("moe bench " .. bench .. ": --compare-env: expected NAME=VALUE\n") end
  return k, v
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
