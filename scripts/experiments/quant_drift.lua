-- quant_drift.lua -- how much does routing drift when the experts run quantised?
--
-- Runs a MoE model stack (synthetic weights of a real preset) in bf16 and in each quantisation
-- mode on the same tokens, records every layer's routing, and compares each mode's routing
-- trace with the bf16 one (router disagreement, token disagreement, Jaccard, load balance).
-- Quantisation changes routing only through the hidden states: routers stay unquantised.
--
-- Default: qwen3-30b-a3b; the full shape (48 layers, 4096 tokens) on a GPU, the `tiny` size
-- (4 layers, 512 tokens) on the CPU.  Writes a report (markdown + SVG + JSON) and the traces.
local moe = require("moe")

local HELP = [[
usage: moe run scripts/experiments/quant_drift.lua [options]

Runs a MoE stack in bf16 and in each quantisation mode on the same tokens and reports how far
each mode's routing drifts from bf16's.

options:
  --model NAME     preset (default qwen3-30b-a3b; `moe models` lists them)
  --size SIZE      full | small | tiny (default: full on a GPU, tiny on the CPU)
  --layers N       number of MoE layers (default: the size's)
  --tokens T       tokens (default: 4096 on a GPU, 512 on the CPU)
  --hidden FILE    token hidden states [T, H] from a .npy or .safetensors file (first tensor)
                   instead of synthetic ones
  --batch B        tokens per batch (default: min(T, 4096))
  --quants LIST    comma-separated modes compared with bf16
                   (default fp8,fp8_block,nvfp4,mxfp4,mxint4)
  --device DEV     cpu | cuda (default: cuda when a GPU is present)
  --seed S         weights and tokens seed (default 0)
  --out DIR        report directory (default results/quant_drift-<model>-<size>-<device>)
  --quiet          no progress output
  -h, --help       this text
]]

local opts = {}
local args = {...}
local i = 1
local function value(name)
  i = i + 1
  local v = args[i]
  if v == nil then
    io.stderr:write("quant_drift: " .. name .. " needs a value\n" .. HELP)
    os.exit(2)
  end
  return v
end
while i <= #args do
  local a = args[i]
  if a == "-h" or a == "--help" then
    io.write(HELP)
    os.exit(0)
  elseif a == "--model" then opts.model = value(a)
  elseif a == "--size" then opts.size = value(a)
  elseif a == "--layers" then opts.layers = tonumber(value(a))
  elseif a == "--tokens" then opts.tokens = tonumber(value(a))
  elseif a == "--hidden" then opts.hidden = value(a)
  elseif a == "--batch" then opts.batch = tonumber(value(a))
  elseif a == "--quants" then
    opts.quants = {}
    for q in value(a):gmatch("[^,]+") do opts.quants[#opts.quants + 1] = q end
  elseif a == "--device" then opts.device = value(a)
  elseif a == "--seed" then opts.seed = tonumber(value(a))
  elseif a == "--out" then opts.out = value(a)
  elseif a == "--quiet" then opts.quiet = true
  else
    io.stderr:write("quant_drift: unknown option " .. a .. "\n" .. HELP)
    os.exit(2)
  end
  i = i + 1
end

local gpu = moe.cuda_available()
local device = opts.device or (gpu and "cuda" or "cpu")
local on_gpu = device:match("^cuda") ~= nil
local size = opts.size or (on_gpu and "full" or "tiny")
local model = opts.model or "qwen3-30b-a3b"
local quants = opts.quants or {"fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4"}
local out = opts.out or string.format("results/quant_drift-%s-%s-%s", model, size, device:gsub(":", ""))

local hidden
if opts.hidden then
  local t = moe.load(opts.hidden)
  if not moe.is_tensor(t) then
    local names = {}
    for k in pairs(t) do names[#names + 1] = k end
    table.sort(names)
    t = t[names[1]]
  end
  hidden = t:to(device):to("bf16")
end

local t0 = moe.model.now()
local s = moe.experiment{model = model, size = size, layers = opts.layers, quants = quants,
                         tokens = opts.tokens or (on_gpu and 4096 or 512), hidden = hidden, batch = opts.batch,
                         device = device, seed = opts.seed or 0, out = out, quiet = opts.quiet}
print(s.text)
print(string.format("report: %s  (total %.1f s)", s.report, moe.model.now() - t0))
