-- inspect, compare and convert routing replay traces (info, compare, convert)
local HELP = {
  main = [[
Usage: moe trace COMMAND [ARGS]

Routing replay traces (safetensors files, .npy [T, L, K] arrays, or directories of
chunk files written by a streaming recorder).

Commands:
  info FILE                 shape, metadata, load balance and hot experts of a trace
  compare A B               router/token disagreement, Jaccard, overlap, loads, JS divergence
  convert IN OUT            .npy <-> safetensors, directory of chunks -> one file

`moe trace COMMAND --help` describes a command.  Metrics: docs/traces.md.]],
  info = [[
Usage: moe trace info FILE [--json] [--heatmap] [--num-experts E]

Prints the shape (tokens x layers x top-K, experts), the arrays present, the metadata,
per-trace load balance (max/mean, cv, Jain, normalised entropy; means over layers) and the
hottest experts.  FILE is a safetensors trace, a .npy [T, L, K] array or a directory of
chunk files.

Options:
  --json             print the statistics as JSON instead
  --heatmap          add a terminal heatmap of the expert loads (layers x experts)
  --num-experts E    number of experts when the file does not say (.npy)]],
  compare = [[
Usage: moe trace compare A B [--json] [--report DIR] [--threads N] [--num-experts E]
                             [--ignore-weights] [--ignore-token-ids]

Compares two traces of the same tokens: router disagreement (share of (token, layer)
whose top-K sets differ), token disagreement, mean differing layers per token, Jaccard,
overlap@K, exact positional agreement, skipped positions (-1 in either), first differing
layer, per-layer expert loads, balance and Jensen-Shannon divergence, and weight metrics
when both traces carry weights.

Options:
  --json             print the metrics as JSON (stable keys) instead of the table
  --report DIR       also write DIR/report.md, SVG charts and metrics.json
  --threads N        worker threads (default: one per core)
  --num-experts E    number of experts for traces that do not say (.npy)
  --ignore-weights   skip the weight metrics
  --ignore-token-ids compare even when the token ids differ]],
  convert = [[
Usage: moe trace convert IN OUT [--num-experts E]

Converts a trace: IN is a safetensors trace, a .npy [T, L, K] array (int16/int32) or a
directory of chunk files; OUT ending in .npy gets the routed_experts array only (int16
[T, L, K]); any other OUT is written as one safetensors trace (atomically).

Options:
  --num-experts E    record the number of experts (checked against the ids)]],
}

local args = { ... }
local sub = args[1]

local function out(s) io.stdout:write(s, "\n") end
local function fail(msg, code)
  io.stderr:write("moe trace: ", msg, "\n")
  return code or 2
end

if sub == nil or sub == "--help" or sub == "-h" or sub == "help" then
  out(HELP.main)
  return sub == nil and 2 or 0
end
if not HELP[sub] then
  return fail("unknown command " .. string.format("%q", sub) .. "\n" .. HELP.main)
end

-- Parse the remaining arguments: positionals and --flags (some with a value).
local WITH_VALUE = { ["--report"] = true, ["--threads"] = true, ["--num-experts"] = true }
local pos, flags = {}, {}
local i = 2
while i <= #args do
  local a = args[i]
  if a == "--help" or a == "-h" then
    out(HELP[sub])
    return 0
  elseif a:sub(1, 2) == "--" then
    if WITH_VALUE[a] then
      if args[i + 1] == nil then return fail(a .. ": expected a value\n" .. HELP[sub]) end
      flags[a] = args[i + 1]
      i = i + 1
    else
      flags[a] = true
    end
  else
    pos[#pos + 1] = a
  end
  i = i + 1
end

local KNOWN = {
  info = { ["--json"] = true, ["--heatmap"] = true, ["--num-experts"] = true },
  compare = { ["--json"] = true, ["--report"] = true, ["--threads"] = true,
              ["--num-experts"] = true, ["--ignore-weights"] = true, ["--ignore-token-ids"] = true },
  convert = { ["--num-experts"] = true },
}
for f in pairs(flags) do
  if not KNOWN[sub][f] then return fail("unknown option " .. f .. "\n" .. HELP[sub]) end
end
local NPOS = { info = 1, compare = 2, convert = 2 }
if #pos ~= NPOS[sub] then
  return fail(string.format("%s: expected %d file argument(s), got %d\n%s", sub, NPOS[sub], #pos,
                            HELP[sub]))
end

local function int_flag(name)
  local v = flags[name]
  if v == nil then return nil end
  local n = tonumber(v)
  if not n or n % 1 ~= 0 or n < 0 then error(name .. ": expected a non-negative integer, got " .. v, 0) end
  return n
end

local moe = require("moe")

local ok, res = pcall(function()
  local E = int_flag("--num-experts")
  local function load(path)
    local tr = moe.trace.load(path)
    if E and tr:num_experts() == 0 then tr:set_num_experts(E) end
    return tr
  end

  local function name_of(tr, path)
    local l = tr:label()
    if l == path or l == "trace" then return path end
    return l .. " (" .. path .. ")"
  end

  if sub == "info" then
    local tr = load(pos[1])
    local st = moe.trace.stats(tr)
    if flags["--json"] then
      out(st:json())
      return 0
    end
    out(tr:info())
    out(tostring(st))
    if flags["--heatmap"] then out(moe.trace.heatmap(st.loads)) end
    return 0
  elseif sub == "compare" then
    local a, b = load(pos[1]), load(pos[2])
    local c = moe.trace.compare(a, b, {
      threads = int_flag("--threads"),
      ignore_weights = flags["--ignore-weights"] or nil,
      ignore_token_ids = flags["--ignore-token-ids"] or nil,
      names = { name_of(a, pos[1]), name_of(b, pos[2]) },
    })
    if flags["--json"] then out(c:json()) else out(tostring(c)) end
    if flags["--report"] then
      c:report(flags["--report"])
      if not flags["--json"] then out("report: " .. flags["--report"] .. "/report.md") end
    end
    return 0
  else -- convert
    local tr = load(pos[1])
    local dst = pos[2]
    if dst:match("%.npy$") then
      local ids = tr:ids()
      moe._check(moe.C.moe_npy_write(dst, ids.h), "moe trace convert")
      if tr:has_weights() or tr:has_token_ids() then
        io.stderr:write("moe trace convert: note: .npy holds routed_experts only " ..
                        "(weights, token ids and metadata dropped)\n")
      end
    else
      tr:save(dst)
    end
    out(string.format("%s -> %s: %d tokens x %d layers x top-%d", pos[1], dst, tr:tokens(),
                      tr:layers(), tr:top_k()))
    return 0
  end
end)
if not ok then
  -- drop the "file:line:" prefix the Lua error carries: the message names the function
  return fail((tostring(res):gsub("^[^:\n]*%.lua:%d+: ", "")), 1)
end
return res
