-- preset_balance: compare the expert load balance of several model presets (or checkpoints)
local HELP = [[
Usage: moe run scripts/experiments/preset_balance.lua [OPTIONS]

Runs each preset's MoE stack (bf16, the same number of tokens, the same seed), records its
routing trace and compares the expert load balance per preset with moe.trace.stats:
coefficient of variation (cv), Jain's fairness index, max/mean load and normalised entropy
(each the mean over layers), plus the worst layer's max/mean and the hottest expert.

Options:
  --presets A,B,...   presets to run (default: all; `moe models` lists them)
  --checkpoint DIR    also run a Hugging Face checkpoint directory (repeatable; its first
                      --layers MoE layers, loaded with moe.model.load_hf)
  --size S            tiny | small | full (default tiny)
  --layers N          MoE layers per model (default: the size's)
  --tokens T          tokens (default 256)
  --device D          cpu | cuda (default: cuda when available)
  --seed N            weights and tokens seed (default 0)
  --out DIR           output folder (default out/preset_balance)
  --help              this text

Writes DIR/balance.md (table), DIR/balance.json and DIR/traces/<model>.safetensors.
Synthetic presets have random routers: their balance shows what the routing method and
shape (E, K, groups, bias) do to uniform-ish logits, not what a trained router does; load a
checkpoint for that.]]

local moe = require("moe")
local json = require("moe.json")

local args = { ... }
local o = { size = "tiny", tokens = 256, seed = 0, out = "out/preset_balance", checkpoints = {} }
local i = 1
local function value(name)
  local v = args[i + 1]
  if v == nil then error("preset_balance: " .. name .. ": expected a value", 0) end
  i = i + 1
  return v
end
local function int_value(name)
  local v = tonumber(value(name))
  if not v or v < 1 or v % 1 ~= 0 then error("preset_balance: " .. name .. ": expected a positive integer", 0) end
  return v
end
while i <= #args do
  local a = args[i]
  if a == "--help" or a == "-h" then print(HELP) return 0
  elseif a == "--presets" then o.presets = value(a)
  elseif a == "--checkpoint" then o.checkpoints[#o.checkpoints + 1] = value(a)
  elseif a == "--size" then o.size = value(a)
  elseif a == "--layers" then o.layers = int_value(a)
  elseif a == "--tokens" then o.tokens = int_value(a)
  elseif a == "--device" then o.device = value(a)
  elseif a == "--seed" then o.seed = tonumber(value(a))
  elseif a == "--out" then o.out = value(a)
  else io.stderr:write("preset_balance: unknown argument " .. a .. "\n\n" .. HELP .. "\n") return 2 end
  i = i + 1
end
o.device = o.device or (moe.cuda_available() and "cuda" or "cpu")

local models = {}
local names = {}
if o.presets then
  for n in o.presets:gmatch("[^,%s]+") do names[#names + 1] = n end
elseif #o.checkpoints == 0 then
  names = moe.model.presets()
end
for _, n in ipairs(names) do
  models[#models + 1] = moe.model.preset(n, { size = o.size, layers = o.layers, seed = o.seed })
end
for _, d in ipairs(o.checkpoints) do
  models[#models + 1] = moe.model.load_hf(d, { layers = o.layers })
end
if #models == 0 then error("preset_balance: --presets: expected at least one preset", 0) end

os.execute("mkdir -p '" .. o.out:gsub("'", "'\\''") .. "/traces'")
local rows = {}
local t_all = moe.model.now()
for k, m in ipairs(models) do
  local c = m.cfg
  local t0 = moe.model.now()
  local tr = m:run{ tokens = o.tokens, device = o.device, seed = o.seed, quiet = true }
  local secs = moe.model.now() - t0
  local file = o.out .. "/traces/" .. c.name:gsub("[^%w%.%-_]", "_") .. ".safetensors"
  tr:save(file)
  local s = moe.trace.stats(tr)
  local worst, worst_l = 0, 0
  for l, b in ipairs(s.per_layer) do
    if b.max_over_mean > worst then worst, worst_l = b.max_over_mean, l end
  end
  rows[k] = {
    model = c.name, size = c.size, E = c.E, shared = c.shared or 0, K = c.K, method = c.method,
    layers = c.layers, tokens = s.tokens, cv = s.balance.cv, jain = s.balance.jain,
    max_over_mean = s.balance.max_over_mean, entropy = s.balance.entropy,
    worst_layer = worst_l - 1, worst_layer_max_over_mean = worst,
    hot_expert = s.hot_experts[1] and s.hot_experts[1].expert or -1,
    hot_share = s.hot_experts[1] and s.hot_experts[1].share or 0,
    -- cv of multinomial counts when every expert is equally likely: counting noise alone
    cv_uniform = math.sqrt((1 - 1 / c.E) / (s.tokens * c.K / c.E)),
    seconds = secs, trace = file,
  }
  io.stderr:write(string.format("[%d/%d] %s (%s): %.2f s\n", k, #models, c.name, c.size, secs))
end
local total = moe.model.now() - t_all

-- table (stdout and markdown)
local head = string.format("%-16s %6s %3s %-12s %7s %7s %7s %8s %8s %12s %9s %7s", "model", "E", "K",
                           "method", "cv", "cv unif", "Jain", "max/mean", "entropy", "worst layer", "hot exp.", "share")
print(head)
print(string.rep("-", #head))
local md = {
  "# Expert load balance per model",
  "",
  string.format("%d tokens, size %s, seed %d, device %s, bf16. Balance over each layer's expert loads " ..
                "(counts of (token, k) assignments), averaged over layers; worst layer = largest max/mean " ..
                "(layers counted from 0). Jain and entropy: 1 = perfectly even. cv uniform = the cv that counting " ..
                "noise alone gives when all experts are equally likely, sqrt((1 - 1/E) / (T K / E)): a cv near " ..
                "it means no real imbalance.", o.tokens, o.size, o.seed,
                o.device),
  "",
  "| model | E | K | method | layers | cv | cv uniform | Jain | max/mean | entropy | worst layer (max/mean) | hottest expert (share) |",
  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
}
for _, r in ipairs(rows) do
  local E = r.shared > 0 and string.format("%d+%d", r.E, r.shared) or tostring(r.E)
  print(string.format("%-16s %6s %3d %-12s %7.3f %7.3f %7.3f %8.2f %8.3f %5d (%5.2f) %9d %6.1f%%", r.model, E,
                      r.K, r.method, r.cv, r.cv_uniform, r.jain, r.max_over_mean, r.entropy, r.worst_layer,
                      r.worst_layer_max_over_mean, r.hot_expert, 100 * r.hot_share))
  md[#md + 1] = string.format("| %s | %s | %d | %s | %d | %.3f | %.3f | %.3f | %.2f | %.3f | %d (%.2f) | %d (%.1f%%) |",
                              r.model, E, r.K, r.method, r.layers, r.cv, r.cv_uniform, r.jain, r.max_over_mean, r.entropy,
                              r.worst_layer, r.worst_layer_max_over_mean, r.hot_expert, 100 * r.hot_share)
end
md[#md + 1] = ""
md[#md + 1] = "Synthetic presets have random routers; load a checkpoint (--checkpoint DIR) for trained routing. " ..
              "Traces: `traces/<model>.safetensors` (`moe trace info FILE --heatmap`)."
local f = assert(io.open(o.out .. "/balance.md", "w"))
f:write(table.concat(md, "\n"), "\n")
f:close()
f = assert(io.open(o.out .. "/balance.json", "w"))
f:write(json.encode({ tokens = o.tokens, size = o.size, seed = o.seed, device = o.device, seconds = total,
                      models = rows }, { indent = 2 }), "\n")
f:close()
print(string.format("\n%d models in %.1f s. Wrote %s/balance.md, %s/balance.json and %s/traces/", #rows, total,
                    o.out, o.out, o.out))
return 0
