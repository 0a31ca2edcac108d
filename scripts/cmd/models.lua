-- list the model presets (dimensions, router, layers, small/tiny sizes)
local HELP = [[
Usage: moe models [--json] [NAME]

Lists the model presets of moe.model.preset(): hidden size H, expert FFN size I,
experts E (+ shared experts), experts per token K, routing method, groups / routed
scaling factor, activation, the number of MoE layers of the real model (full) and the
H / I / layers of the scaled sizes `small` and `tiny` (same E, K and router), which run
on a CPU in seconds.

With NAME, prints only that preset (its full, small and tiny sizes).

Options:
  --json    print the table as JSON (one object per preset, sizes nested)

A Hugging Face checkpoint directory loads with moe.model.load_hf(dir) (docs/guide.md).]]

local args = { ... }
local want_json, name = false, nil
for _, a in ipairs(args) do
  if a == "--help" or a == "-h" then print(HELP) return 0 end
  if a == "--json" then
    want_json = true
  elseif a:sub(1, 1) == "-" then
    io.stderr:write("moe models: unknown option " .. a .. "\n" .. HELP .. "\n")
    return 2
  elseif name then
    io.stderr:write("moe models: expected at most one NAME, got " .. name .. " and " .. a .. "\n")
    return 2
  else
    name = a
  end
end

local moe = require("moe")
local json = require("moe.json")
local presets = moe.model.presets()

if name then
  local known = false
  for _, n in ipairs(presets) do known = known or n == name end
  if not known then
    io.stderr:write("moe models: NAME: no preset '" .. name .. "' (known: " .. table.concat(presets, ", ") .. ")\n")
    return 2
  end
  presets = { name }
end

local function groups(c)
  if c.method ~= "deepseekv3" then return "-" end
  local g = (c.n_group and c.n_group > 1) and string.format("%d/%d", c.n_group, c.topk_group) or "1"
  return string.format("%s, %g", g, c.scale or 1)
end

local function experts(c)
  return c.shared and c.shared > 0 and string.format("%d+%d", c.E, c.shared) or tostring(c.E)
end

local rows = {}
for i, n in ipairs(presets) do
  local full = moe.model.config(n, "full")
  local small = moe.model.config(n, "small")
  local tiny = moe.model.config(n, "tiny")
  rows[i] = { name = n, full = full, small = small, tiny = tiny }
end

if want_json then
  local out = {}
  for i, r in ipairs(rows) do
    local c = r.full
    local sizes = {}
    for _, s in ipairs{ "full", "small", "tiny" } do
      local cs = r[s]
      sizes[s] = json.ordered({ H = cs.H, I = cs.I, layers = cs.layers }, { "H", "I", "layers" })
    end
    out[i] = json.ordered({
      name = r.name, H = c.H, I = c.I, E = c.E, shared = c.shared or 0, shared_I = c.shared_I, K = c.K,
      method = c.method, n_group = c.n_group, topk_group = c.topk_group, scale = c.scale,
      activation = c.activation, routing_bias = c.bias == true, expert_bias = c.expert_bias == true,
      layers = c.layers, note = c.note, sizes = json.ordered(sizes, { "full", "small", "tiny" }),
    }, { "name", "H", "I", "E", "shared", "shared_I", "K", "method", "n_group", "topk_group", "scale",
         "activation", "routing_bias", "expert_bias", "layers", "note", "sizes" })
  end
  print(json.encode(json.array(out), { indent = 2 }))
  return 0
end

local header = { "preset", "H", "I", "E(+sh)", "K", "method", "groups, scale", "act", "layers",
                 "small H/I/L", "tiny H/I/L" }
local lines = {}
for _, r in ipairs(rows) do
  local c = r.full
  lines[#lines + 1] = {
    r.name, tostring(c.H), tostring(c.I), experts(c), tostring(c.K), c.method, groups(c), c.activation,
    tostring(c.layers),
    string.format("%d/%d/%d", r.small.H, r.small.I, r.small.layers),
    string.format("%d/%d/%d", r.tiny.H, r.tiny.I, r.tiny.layers),
  }
end
local width = {}
for j, h in ipairs(header) do width[j] = #h end
for _, l in ipairs(lines) do
  for j, v in ipairs(l) do width[j] = math.max(width[j], #v) end
end
local function fmt(cells)
  local p = {}
  for j, v in ipairs(cells) do
    local right = j >= 2 and j <= 5 or j == 9
    p[j] = right and string.rep(" ", width[j] - #v) .. v or v .. string.rep(" ", width[j] - #v)
  end
  return (table.concat(p, "  "):gsub("%s+$", ""))
end
print(fmt(header))
local rule = {}
for j = 1, #header do rule[j] = string.rep("-", width[j]) end
print(fmt(rule))
for _, l in ipairs(lines) do print(fmt(l)) end
local notes = {}
for _, r in ipairs(rows) do
  if r.full.note then notes[#notes + 1] = string.format("  %s: %s", r.name, r.full.note) end
end
print("")
print("layers = MoE layers of the real model (dense layers are not modelled); E+sh = routed + shared experts.")
if #notes > 0 then
  print("Notes:")
  for _, n in ipairs(notes) do print(n) end
end
print("Run one: moe.model.preset(name, {size = \"tiny\"}):run{tokens = 256}   (moe models --json for JSON)")
return 0
