-- import_engine_trace: compare an inference engine's .npy routing trace with a local run
local HELP = [[
Usage: moe run scripts/experiments/import_engine_trace.lua [FILE.npy] [OPTIONS]

Loads a routing trace as an inference engine's Python API returns it -- an integer array
[T, L, K] (int16 or int32) of the global expert ids each token was routed to in each MoE
layer, -1 where nothing was captured (for example prefix-cached prompt positions) -- and
compares it with a local run of the matching model on the same number of tokens:
router disagreement (top-K sets, not positions), token disagreement, Jaccard, overlap@K,
loads and JS divergence (moe.trace.compare).

Without FILE a demo trace is made: the local run's ids, each top-K list reversed (engines
order the K experts differently; sets are compared, so this changes nothing), one expert
swapped in --flip of the (token, layer) rows, and the first --prefix tokens marked -1; it
is written as int32 .npy with plain Lua bytes.  The expected router disagreement is then
known by construction and printed next to the measured one.

Saving such a file from Python:  np.save("engine.npy", routed_experts.astype(np.int16))
(shape [tokens, moe_layers, top_k]).  For a meaningful comparison the local run must see
the same tokens and weights: pass --checkpoint DIR (the engine's model) and --hidden
H.npy (the [T, H] hidden states entering the first MoE layer); a preset with synthetic
tokens only checks the plumbing.

Options:
  --preset NAME      local model preset (default qwen3-30b-a3b)
  --checkpoint DIR   local model from a Hugging Face checkpoint instead
  --size S           tiny | small | full (default tiny; presets only)
  --layers N         MoE layers of the local model (default: the trace's L)
  --hidden FILE.npy  hidden states [T, H] for the local run (default: synthetic tokens)
  --tokens T         demo only: tokens (default 256)
  --flip P           demo only: share of (token, layer) rows with one expert swapped (0.1)
  --prefix N         demo only: leading tokens not captured (-1) (default 16)
  --device D         cpu | cuda (default: cuda when available)
  --seed N           seed (default 0)
  --out DIR          output folder (default out/import_engine_trace)
  --help             this text

Writes DIR/summary.md, DIR/comparison.json, DIR/report/ (full comparison report with SVG
charts), DIR/local.safetensors and, for the demo, DIR/engine_demo.npy.]]

local moe = require("moe")

local args = { ... }
local o = { preset = "qwen3-30b-a3b", size = "tiny", tokens = 256, flip = 0.1, prefix = 16, seed = 0,
            out = "out/import_engine_trace" }
local i = 1
local function value(name)
  local v = args[i + 1]
  if v == nil then error("import_engine_trace: " .. name .. ": expected a value", 0) end
  i = i + 1
  return v
end
local function num_value(name, lo, hi, int)
  local s = value(name)
  local v = tonumber(s)
  if not v or v < lo or (hi and v > hi) or (int and v % 1 ~= 0) then
    error(string.format("import_engine_trace: %s: expected a%s number in [%s, %s], got %s", name,
                        int and "n integer" or "", lo, hi or "inf", s), 0)
  end
  return v
end
while i <= #args do
  local a = args[i]
  if a == "--help" or a == "-h" then print(HELP) return 0
  elseif a == "--preset" then o.preset = value(a)
  elseif a == "--checkpoint" then o.checkpoint = value(a)
  elseif a == "--size" then o.size = value(a)
  elseif a == "--layers" then o.layers = num_value(a, 1, nil, true)
  elseif a == "--hidden" then o.hidden = value(a)
  elseif a == "--tokens" then o.tokens = num_value(a, 1, nil, true)
  elseif a == "--flip" then o.flip = num_value(a, 0, 1)
  elseif a == "--prefix" then o.prefix = num_value(a, 0, nil, true)
  elseif a == "--device" then o.device = value(a)
  elseif a == "--seed" then o.seed = num_value(a, 0, nil, true)
  elseif a == "--out" then o.out = value(a)
  elseif a:sub(1, 1) == "-" then
    io.stderr:write("import_engine_trace: unknown option " .. a .. "\n\n" .. HELP .. "\n")
    return 2
  elseif o.file then
    io.stderr:write("import_engine_trace: expected one FILE, got " .. o.file .. " and " .. a .. "\n")
    return 2
  else
    o.file = a
  end
  i = i + 1
end
local dev = o.device or (moe.cuda_available() and "cuda" or "cpu")
os.execute("mkdir -p '" .. o.out:gsub("'", "'\\''") .. "'")

-- ------------------------------------------------------------ .npy bytes --
-- A little-endian int32 .npy file written byte by byte (format 1.0: magic, version, u16
-- header length, a Python dict literal padded with spaces to a multiple of 64, then data).
local function write_npy_i32(path, T, L, K, get)
  local header = string.format("{'descr': '<i4', 'fortran_order': False, 'shape': (%d, %d, %d), }", T, L, K)
  local pad = 64 - (10 + #header + 1) % 64
  if pad == 64 then pad = 0 end
  header = header .. string.rep(" ", pad) .. "\n"
  local f = assert(io.open(path, "wb"))
  f:write("\147NUMPY\1\0", string.char(#header % 256, math.floor(#header / 256)), header)
  local buf = {}
  for t = 1, T do
    for l = 1, L do
      for k = 1, K do
        local v = get(t, l, k)
        if v < 0 then v = v + 4294967296 end
        buf[#buf + 1] = string.char(v % 256, math.floor(v / 256) % 256, math.floor(v / 65536) % 256,
                                    math.floor(v / 16777216) % 256)
      end
    end
    if #buf > 4096 then f:write(table.concat(buf)); buf = {} end
  end
  f:write(table.concat(buf))
  f:close()
end

-- -------------------------------------------------------------- the model --
local m
if o.checkpoint then
  m = moe.model.load_hf(o.checkpoint, { layers = o.layers })
else
  m = moe.model.preset(o.preset, { size = o.size, layers = o.layers, seed = o.seed })
end
local c = m.cfg

local function local_run(T)
  if o.hidden then
    local x = moe.load(o.hidden)
    local s = x:shape()
    if #s ~= 2 or s[1] ~= T or s[2] ~= c.H then
      error(string.format("import_engine_trace: --hidden: expected [%d, %d] (tokens of the trace, H of %s), got [%s]",
                          T, c.H, c.name, table.concat(s, ", ")), 0)
    end
    return m:run{ hidden = x:to("bf16"), device = dev, seed = o.seed, quiet = true }
  end
  return m:run{ tokens = T, device = dev, seed = o.seed, quiet = true }
end

local file, expected, demo = o.file, nil, false
local local_tr
if not file then
  -- demo: an "engine" trace derived from a local run, with known differences
  demo = true
  local_tr = local_run(o.tokens)
  local T, L, K, E = local_tr:tokens(), local_tr:layers(), local_tr:top_k(), c.E
  local state = (o.seed * 2654435761 + 12345) % 2147483648
  local function rand() -- deterministic LCG in [0, 1)
    state = (state * 1103515245 + 12345) % 2147483648
    return state / 2147483648
  end
  local rows, flipped, captured = {}, 0, 0
  for t = 1, T do
    rows[t] = {}
    for l = 1, L do
      local ids = local_tr:get(t, l)
      local r = {}
      for k = 1, K do r[k] = ids[K - k + 1] end -- reversed order: same set
      if t <= o.prefix then
        for k = 1, K do r[k] = -1 end
      else
        captured = captured + 1
        if E > K and rand() < o.flip then
          local inset = {}
          for k = 1, K do inset[r[k]] = true end
          local e = math.floor(rand() * E)
          while inset[e] do e = (e + 1) % E end
          r[1 + math.floor(rand() * K)] = e
          flipped = flipped + 1
        end
      end
      rows[t][l] = r
    end
  end
  file = o.out .. "/engine_demo.npy"
  write_npy_i32(file, T, L, K, function(t, l, k) return rows[t][l][k] end)
  expected = { router_disagreement = captured > 0 and flipped / captured or 0, flipped = flipped,
               captured = captured, skipped = T * L - captured }
end

local engine = moe.trace.load(file, { num_experts = c.E })
engine:set_meta("model", "engine (" .. file:match("([^/]*)$") .. ")")
if engine:top_k() ~= c.K then
  error(string.format("import_engine_trace: %s: top-K %d does not match %s (K = %d)", file, engine:top_k(), c.name,
                      c.K), 0)
end
if not demo then
  if o.layers == nil and engine:layers() ~= c.layers then
    -- take the trace's layer count when the model has at least that many MoE layers
    if o.checkpoint then
      m = moe.model.load_hf(o.checkpoint, { layers = engine:layers() })
    else
      m = moe.model.preset(o.preset, { size = o.size, layers = engine:layers(), seed = o.seed })
    end
    c = m.cfg
  end
  if engine:layers() ~= c.layers then
    error(string.format("import_engine_trace: %s: %d MoE layers, the local model has %d (--layers)", file,
                        engine:layers(), c.layers), 0)
  end
  local_tr = local_run(engine:tokens())
end
local_tr:save(o.out .. "/local.safetensors")

local cmp = moe.trace.compare(engine, local_tr, { names = { "engine", "local " .. c.name } })
print(string.format("engine trace %s: %d tokens x %d layers x top-%d (%s); local %s (%s) on %s", file,
                    engine:tokens(), engine:layers(), engine:top_k(), demo and "demo" or "file", c.name, c.size, dev))
print(tostring(cmp))
if expected then
  print(string.format("\ndemo, by construction: router disagreement %.4f (%d of %d captured rows changed), %d rows " ..
                      "skipped; measured %.4f, %d skipped", expected.router_disagreement, expected.flipped,
                      expected.captured, expected.skipped, cmp.router_disagreement, cmp.skipped))
end
cmp:report(o.out .. "/report")
local f = assert(io.open(o.out .. "/comparison.json", "w"))
f:write(cmp:json(), "\n")
f:close()
local md = {
  "# Engine trace vs local run\n",
  string.format("Engine trace: `%s` (%d tokens x %d MoE layers x top-%d%s). Local: %s (%s), %s, device %s.\n", file,
                engine:tokens(), engine:layers(), engine:top_k(), demo and ", demo made from the local run" or "",
                c.name, c.size, o.hidden and ("hidden states from " .. o.hidden) or "synthetic tokens", dev),
  "| metric | value |",
  "|---|---:|",
  string.format("| router disagreement (top-K sets differ) | %.2f%% |", 100 * cmp.router_disagreement),
  string.format("| token disagreement (any layer differs) | %.2f%% |", 100 * cmp.token_disagreement),
  string.format("| mean differing layers per token | %.3f |", cmp.mean_layers_differing),
  string.format("| Jaccard | %.4f |", cmp.jaccard),
  string.format("| overlap@K | %.4f |", cmp.overlap),
  string.format("| exact positional agreement | %.4f |", cmp.exact_agreement),
  string.format("| skipped (token, layer) rows (-1) | %d |", cmp.skipped),
}
if expected then
  md[#md + 1] = string.format("\nDemo check: %d of %d captured rows were changed on purpose, so the expected router " ..
                              "disagreement is %.2f%%; the positional agreement is low because every row was " ..
                              "reversed (sets are compared, not positions).", expected.flipped, expected.captured,
                              100 * expected.router_disagreement)
end
md[#md + 1] = "\nFull report: [report/report.md](report/report.md); metrics as JSON: `comparison.json`; " ..
              "the local trace: `local.safetensors`."
f = assert(io.open(o.out .. "/summary.md", "w"))
f:write(table.concat(md, "\n"), "\n")
f:close()
print(string.format("\nWrote %s/summary.md, %s/comparison.json, %s/report/ and %s/local.safetensors%s", o.out, o.out,
                    o.out, o.out, demo and (" (demo trace: " .. file .. ")") or ""))
if expected and (math.abs(cmp.router_disagreement - expected.router_disagreement) > 1e-12
                 or cmp.skipped ~= expected.skipped) then
  io.stderr:write("import_engine_trace: the demo comparison does not match its construction\n")
  return 1
end
return 0
