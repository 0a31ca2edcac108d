-- replay_output: replay a recorded routing trace (routed mode) and measure the output change
local HELP = [[
Usage: moe run scripts/experiments/replay_output.lua [OPTIONS]

1. Runs a model natively in bf16 (router GEMM -> routing -> fused MoE per layer, as
   m:run does) and records every layer's routing: ids and weights, saved as a trace
   with weights (DIR/routing_bf16.safetensors).
2. Loads that file back and replays it: the same stack with moe.fused_moe{routed =
   {ids, weights}}, no router.  In the same mode the output must equal the native one
   bit for bit (checked, and printed).
3. For each further quantisation mode: the native run in that mode (its own routing)
   and the replay of the bf16 routing under that mode.  The replay isolates the expert
   numerics; the native run adds the routing drift (as in routing replay for RL, where
   the trainer replays the inference engine's routing).

Output change is the relative L2 distance of the final residual streams,
||a - b|| / ||b||, over all tokens.

Options:
  --preset NAME       preset (default qwen3-30b-a3b; `moe models` lists them)
  --checkpoint DIR    a Hugging Face checkpoint directory instead of a preset
  --size S            tiny | small | full (default tiny)
  --layers N          MoE layers (default: the size's)
  --tokens T          tokens (default 256)
  --quants A,B,...    modes besides bf16 (default fp8,fp8_block,nvfp4,mxfp4,mxint4; those
                      moe.experts cannot build yet are reported and skipped)
  --device D          cpu | cuda (default: cuda when available)
  --seed N            seed of weights and tokens (default 0)
  --out DIR           output folder (default out/replay_output)
  --help              this text

Writes DIR/report.md, DIR/summary.json and the routing traces DIR/routing_<mode>.safetensors.]]

local ffi = require("ffi")
local moe = require("moe")
local json = require("moe.json")

local args = { ... }
local o = { preset = "qwen3-30b-a3b", size = "tiny", tokens = 256, seed = 0, out = "out/replay_output",
            quants = "fp8,fp8_block,nvfp4,mxfp4,mxint4" }
local i = 1
local function value(name)
  local v = args[i + 1]
  if v == nil then error("replay_output: " .. name .. ": expected a value", 0) end
  i = i + 1
  return v
end
local function int_value(name)
  local v = tonumber(value(name))
  if not v or v < 1 or v % 1 ~= 0 then error("replay_output: " .. name .. ": expected a positive integer", 0) end
  return v
end
while i <= #args do
  local a = args[i]
  if a == "--help" or a == "-h" then print(HELP) return 0
  elseif a == "--preset" then o.preset = value(a)
  elseif a == "--checkpoint" then o.checkpoint = value(a)
  elseif a == "--size" then o.size = value(a)
  elseif a == "--layers" then o.layers = int_value(a)
  elseif a == "--tokens" then o.tokens = int_value(a)
  elseif a == "--quants" then o.quants = value(a)
  elseif a == "--device" then o.device = value(a)
  elseif a == "--seed" then o.seed = tonumber(value(a))
  elseif a == "--out" then o.out = value(a)
  else io.stderr:write("replay_output: unknown argument " .. a .. "\n\n" .. HELP .. "\n") return 2 end
  i = i + 1
end
local dev = o.device or (moe.cuda_available() and "cuda" or "cpu")

local m
if o.checkpoint then
  m = moe.model.load_hf(o.checkpoint, { layers = o.layers })
else
  m = moe.model.preset(o.preset, { size = o.size, layers = o.layers, seed = o.seed })
end
local c = m.cfg
local T = o.tokens

-- Which modes moe.experts can build now (a probe on a tiny expert set).
local function mode_available(q)
  if q == "bf16" then return true end
  local ok, err = pcall(moe.experts, { gate_up = moe.zeros({ 1, 256, 128 }, { dtype = "bf16" }),
                                       down = moe.zeros({ 1, 128, 128 }, { dtype = "bf16" }), quant = q })
  return ok, not ok and tostring(err):gsub("^.-moe%.experts: ", "moe.experts: ") or nil
end
local modes, missing = { "bf16" }, {}
local known = {}
for _, q in ipairs(moe.quant_modes()) do known[q] = true end
for q in o.quants:gmatch("[^,%s]+") do
  if not known[q] then
    error("replay_output: --quants: unknown mode " .. q .. " (known: " .. table.concat(moe.quant_modes(), ", ") .. ")", 0)
  end
  if q ~= "bf16" then
    local ok, why = mode_available(q)
    if ok then modes[#modes + 1] = q else missing[#missing + 1] = { mode = q, why = why } end
  end
end

-- ------------------------------------------------------------ the stack --
-- Mirrors Model:run's layer (RMSNorm -> f32 router GEMM -> routing -> fused MoE + shared
-- expert -> residual add).  Several passes go through the stack together, layer by layer, so
-- that each layer's weights are made once and packed once per mode.  A pass is {quant =,
-- replay = per-layer {ids, weights} or nil}; it gets .x (final residual stream, f32) and, when
-- native, .rec (per-layer routing {ids, weights}).
local function run_passes(passes, x0)
  for _, p in ipairs(passes) do p.x, p.rec = x0:to("f32"), {} end
  for l = 1, c.layers do
    local w = m:layer_weights(l, dev)
    local packed = {}
    for _, p in ipairs(passes) do
      local q = p.quant
      if not packed[q] then
        local eargs = { gate_up = w.gate_up, down = w.down, activation = c.activation, device = dev,
                        bias_gate_up = w.bias_gate_up, bias_down = w.bias_down }
        if q ~= "bf16" then eargs.quant = q end
        packed[q] = { ex = moe.experts(eargs) }
        if w.shared_gate_up then
          packed[q].shared = moe.experts{ gate_up = w.shared_gate_up, down = w.shared_down, activation = "swiglu",
                                          device = dev, quant = q ~= "bf16" and q or nil }
        end
      end
      local ex = packed[q]
      local h = moe.rmsnorm(p.x, nil, { eps = 1e-6, out = moe.empty({ T, c.H }, { dtype = "bf16", device = dev }) })
      local y
      if p.replay then
        y = moe.fused_moe{ hidden = h, experts = ex.ex, routed = p.replay[l] }
      else
        local logits = moe.matmul_nt(h, w.router)
        if w.router_bias then moe.model.add_logits_bias(logits, w.router_bias) end
        local r
        y, r = moe.fused_moe{ hidden = h, logits = logits, bias = w.bias, experts = ex.ex, method = c.method,
                              top_k = c.K, n_group = c.n_group, topk_group = c.topk_group, scale = c.scale,
                              return_routing = true }
        p.rec[l] = r
      end
      if ex.shared then
        local ys = moe.fused_moe{ hidden = h, experts = ex.shared, routed = {
          ids = moe.zeros({ T, 1 }, { dtype = "i32", device = dev }),
          weights = moe.full({ T, 1 }, 1, { dtype = "f32", device = dev }) } }
        moe.axpby(1, ys, 1, y)
      end
      moe.axpby(1, y, 1, p.x)
    end
    for _, e in pairs(packed) do
      e.ex:free()
      if e.shared then e.shared:free() end
    end
    for _, t in pairs(w) do t:free() end
  end
  moe.synchronize(dev)
  return passes
end

-- A trace with weights from the per-layer routing {ids i32 [T, K], weights f32 [T, K]}.
local function to_trace(rec, quant)
  local ids = moe.empty({ T, c.layers, c.K }, { dtype = "i32", device = "cpu" })
  local wts = moe.empty({ T, c.layers, c.K }, { dtype = "f32", device = "cpu" })
  for l = 1, c.layers do
    ids:select(2, l):copy_(rec[l].ids:to("cpu"))
    wts:select(2, l):copy_(rec[l].weights:to("cpu"))
  end
  local tr = moe.trace.new{ layers = c.layers, top_k = c.K, num_experts = c.E, weights = true,
                            meta = { model = c.name, size = c.size, method = c.method, quant = quant,
                                     seed = tostring(o.seed), source = m.source } }
  tr:append(ids, { weights = wts })
  return tr
end

-- Per-layer routed inputs read back from a trace (ids i16 -> i32, weights f32), on dev.
local function from_trace(tr)
  local ids, wts = tr:ids(), tr:weights()
  assert(wts, "the trace has no weights")
  local r = {}
  for l = 1, c.layers do
    r[l] = { ids = ids:select(2, l):to(dev, "i32"), weights = wts:select(2, l):to(dev, "f32") }
  end
  return r
end

local function diff(a, b)
  local ta, tb = a:to("cpu"):to("f32"), b:to("cpu"):to("f32")
  local n = ta:numel()
  local pa, pb = ffi.cast("const float*", ta:data_ptr()), ffi.cast("const float*", tb:data_ptr())
  local num, den, maxd, same = 0, 0, 0, true
  for k = 0, n - 1 do
    local d = pa[k] - pb[k]
    if pa[k] ~= pb[k] and not (pa[k] ~= pa[k] and pb[k] ~= pb[k]) then same = false end
    num = num + d * d
    den = den + pb[k] * pb[k]
    if math.abs(d) > maxd then maxd = math.abs(d) end
  end
  return { rel_l2 = den > 0 and math.sqrt(num / den) or 0, max_abs = maxd, bit_identical = same }
end

-- ------------------------------------------------------------------ run --
os.execute("mkdir -p '" .. o.out:gsub("'", "'\\''") .. "'")
local t0 = moe.model.now()
local x0 = m:tokens(T, { seed = o.seed, device = dev })
io.stderr:write(string.format("%s (%s) on %s: %d tokens x %d layers, modes %s\n", c.name, c.size, dev, T,
                              c.layers, table.concat(modes, ",")))

local native, traces = {}, {}
local natives = {}
for k, q in ipairs(modes) do natives[k] = { quant = q } end
run_passes(natives, x0)
for _, p in ipairs(natives) do
  native[p.quant] = p.x
  traces[p.quant] = to_trace(p.rec, p.quant)
  traces[p.quant]:save(o.out .. "/routing_" .. p.quant .. ".safetensors")
end
io.stderr:write(string.format("  native runs done (%.1f s)\n", moe.model.now() - t0))

-- the native loop must route exactly as m:run does (same tokens, same weights)
local run_tr = m:run{ hidden = x0, device = dev, quiet = true }
local vs_run = moe.trace.compare(run_tr, traces.bf16, { ignore_weights = true })

-- replays, from the files just written
local bf16_routing = from_trace(moe.trace.load(o.out .. "/routing_bf16.safetensors"))
local replays = {}
for _, q in ipairs(modes) do
  local own = q == "bf16" and bf16_routing or from_trace(moe.trace.load(o.out .. "/routing_" .. q .. ".safetensors"))
  replays[#replays + 1] = { quant = q, replay = own, kind = "own" }
  if q ~= "bf16" then replays[#replays + 1] = { quant = q, replay = bf16_routing, kind = "bf16" } end
end
run_passes(replays, x0)
local rep = {}
for _, p in ipairs(replays) do
  rep[p.quant] = rep[p.quant] or {}
  rep[p.quant][p.kind] = p.x
end
io.stderr:write(string.format("  replays done (%.1f s)\n", moe.model.now() - t0))

local rows = {}
for _, q in ipairs(modes) do
  local row = { mode = q,
                replay_same_mode = diff(rep[q].own, native[q]),
                replay_bf16_routing_vs_bf16 = diff(rep[q].bf16 or rep[q].own, native.bf16),
                native_vs_bf16 = diff(native[q], native.bf16) }
  if q ~= "bf16" then
    local cmp = moe.trace.compare(traces.bf16, traces[q])
    row.router_disagreement = cmp.router_disagreement
    row.token_disagreement = cmp.token_disagreement
  else
    row.router_disagreement, row.token_disagreement = 0, 0
  end
  rows[#rows + 1] = row
end
local secs = moe.model.now() - t0

-- --------------------------------------------------------------- report --
local lines = {
  string.format("%s (%s): %d tokens x %d layers, E %d, K %d, %s on %s, %.1f s", c.name, c.size, T, c.layers, c.E,
                c.K, c.method, dev, secs),
  string.format("native bf16 loop vs m:run trace: router disagreement %.2f%% (must be 0)",
                100 * vs_run.router_disagreement),
  "",
  string.format("  %-10s %-22s %12s %16s %14s", "mode", "replay of own routing", "router dis.",
                "replay bf16 rt.", "native"),
  string.format("  %-10s %-22s %12s %16s %14s", "", "vs native (same mode)", "vs bf16", "vs bf16 (L2)",
                "vs bf16 (L2)"),
}
for _, r in ipairs(rows) do
  local s = r.replay_same_mode
  lines[#lines + 1] = string.format("  %-10s %-22s %11.2f%% %16.3e %14.3e", r.mode,
    s.bit_identical and "bit-identical" or string.format("DIFFERS %.2e", s.rel_l2), 100 * r.router_disagreement,
    r.replay_bf16_routing_vs_bf16.rel_l2, r.native_vs_bf16.rel_l2)
end
for _, x in ipairs(missing) do
  lines[#lines + 1] = string.format("  %-10s not available yet: %s", x.mode, x.why)
end
local text = table.concat(lines, "\n")
print(text)

local md = {
  string.format("# Routing replay and output change: %s (%s)\n", c.name, c.size),
  string.format("%d tokens, %d MoE layers, H %d, I %d, E %d, K %d, method %s, device %s, seed %d, %.1f s.\n", T,
                c.layers, c.H, c.I, c.E, c.K, c.method, dev, o.seed, secs),
  "Each mode's native run records its routing (ids and weights, `routing_<mode>.safetensors`); the replay " ..
  "loads the file and runs the same stack in routed mode (`moe.fused_moe{routed = {ids, weights}}`, no " ..
  "router). Output change = relative L2 of the final residual streams.\n",
  "| mode | replay of own routing vs native (same mode) | router disagreement vs bf16 | replay of bf16 routing " ..
  "vs bf16 native (rel. L2) | native vs bf16 native (rel. L2) |",
  "|---|---|---:|---:|---:|",
}
for _, r in ipairs(rows) do
  local s = r.replay_same_mode
  md[#md + 1] = string.format("| %s | %s | %.2f%% | %.3e | %.3e |", r.mode,
    s.bit_identical and "bit-identical" or string.format("differs: rel. L2 %.3e, max |d| %.3e", s.rel_l2, s.max_abs),
    100 * r.router_disagreement, r.replay_bf16_routing_vs_bf16.rel_l2, r.native_vs_bf16.rel_l2)
end
if #missing > 0 then
  md[#md + 1] = "\nModes not run (moe.experts cannot build them yet):\n"
  for _, x in ipairs(missing) do md[#md + 1] = string.format("- %s: %s", x.mode, x.why) end
end
md[#md + 1] = string.format("\nCheck: the native bf16 loop routes as `m:run` does (router disagreement %.2f%%).",
                            100 * vs_run.router_disagreement)
local f = assert(io.open(o.out .. "/report.md", "w"))
f:write(table.concat(md, "\n"), "\n")
f:close()
local js = { model = c.name, size = c.size, tokens = T, layers = c.layers, device = dev, seed = o.seed,
             seconds = secs, modes = rows, not_available = missing,
             native_vs_model_run_router_disagreement = vs_run.router_disagreement }
f = assert(io.open(o.out .. "/summary.json", "w"))
f:write(json.encode(js, { indent = 2 }), "\n")
f:close()
print(string.format("\nWrote %s/report.md, %s/summary.json and %s/routing_<mode>.safetensors", o.out, o.out, o.out))
local ok = vs_run.router_disagreement == 0
for _, r in ipairs(rows) do ok = ok and r.replay_same_mode.bit_identical end
if not ok then
  io.stderr:write("replay_output: a replay in its own mode did not reproduce the native output bit for bit\n")
  return 1
end
return 0
