-- quickstart: a tour of what moelab can do today (tensors, casts, RNG, quantisation, files,
-- routing, traces).
--
--   moe run scripts/experiments/quickstart.lua [--device cuda]
--
-- Every section checks that its part of the API exists, so the tour runs on any build;
-- parts still being written are reported as "not available yet".
local moe = require("moe")

local args = { ... }
local device = "cpu"
for i = 1, #args do
  if args[i] == "--device" then device = args[i + 1] or device end
end
if device ~= "cpu" and not moe.cuda_available() then
  print("(no CUDA device: using the CPU)")
  device = "cpu"
end

local function section(title)
  print(("\n== %s %s"):format(title, string.rep("=", math.max(0, 70 - #title))))
end

local function not_yet(what)
  print("  " .. what .. ": not available yet in this build")
end

-- Largest |a - b| over two tensors of the same shape.
local function max_abs_diff(a, b)
  local x, y = a:to("f32"):reshape({ -1 }):totable(), b:to("f32"):reshape({ -1 }):totable()
  local m = 0
  for i = 1, #x do m = math.max(m, math.abs(x[i] - y[i])) end
  return m
end

-- "v1, v2, ..." with 4 significant digits.
local function list(t)
  local p = {}
  for i = 1, #t do p[i] = ("%.4g"):format(t[i]) end
  return table.concat(p, ", ")
end

section("engine")
print("moelab " .. moe.version())
print(moe.build_info())
print(("CUDA devices: %d%s"):format(moe.cuda_device_count(),
      moe.cuda_available() and (" (" .. moe.cuda_device_info(0) .. ")") or ""))
print("device for this tour: " .. device)

section("tensors")
local t = moe.tensor({ { 1, 2, 3 }, { 4, 5, 6 } }, { dtype = "f32", device = device })
print(t)
print("shape", table.concat(t:shape(), "x"), "dtype", t:dtype(), "device", t:device())
print("t:get(2, 3) =", t:get(2, 3), "  (indices are 1-based)")
local col = t:narrow(2, 2, 2)            -- columns 2..3, a view
print("t:narrow(2, 2, 2) ->", table.concat(col:shape(), "x"), "contiguous:", col:is_contiguous())
print("t:transpose(1, 2):totable()[3][2] =", t:transpose(1, 2):totable()[3][2])

section("casts (round to nearest even, saturating fp8)")
local x = moe.randn({ 4, 256 }, { seed = 1, device = device })
for _, dt in ipairs({ "bf16", "f16", "f8_e4m3", "f8_e5m2" }) do
  local ok, y = pcall(function() return x:to(dt) end)
  if ok then
    print(("  f32 -> %-8s max |error| = %.3g"):format(dt, max_abs_diff(x, y)))
  else
    print(("  f32 -> %-8s %s"):format(dt, tostring(y)))
  end
end
print("  448 and 1e6 in f8_e4m3:", table.concat(moe.tensor({ 448, 1e6 }):to("f8_e4m3"):to("f32"):totable(), ", "))

section("random numbers (Philox: same seed, same values, CPU or CUDA)")
local a = moe.randn({ 3 }, { seed = 42 })
local b = moe.randn({ 3 }, { seed = 42 })
print("  seed 42 twice: " .. list(a:totable()), "identical:", max_abs_diff(a, b) == 0)
if moe.cuda_available() then
  local g = moe.randn({ 1000 }, { seed = 42, device = "cuda" })
  print("  CPU vs CUDA, 1000 values, max |diff| =", max_abs_diff(moe.randn({ 1000 }, { seed = 42 }), g:to("cpu")))
end
local u = moe.rand({ 5 }, { seed = 7, lo = -1, hi = 1 })
print("  uniform on [-1, 1): " .. list(u:totable()))

section("quantisation (weights: quantise, dequantise, compare)")
if moe.quantize and moe.quant_modes then
  local w = moe.randn({ 128, 256 }, { seed = 5, device = device })
  for _, mode in ipairs(moe.quant_modes()) do
    local name = type(mode) == "table" and (mode.name or mode[1]) or mode
    local ok, err = pcall(function()
      local q = moe.quantize(w, name)
      print(("  %-10s max |w - dequant(quant(w))| = %.3g"):format(name,
            max_abs_diff(w, q:dequantize("f32"))))
    end)
    if not ok then print(("  %-10s %s"):format(tostring(name), tostring(err))) end
  end
else
  not_yet("moe.quantize")
end

section("files (.npy, .safetensors)")
if moe.save and moe.load then
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p '" .. dir .. "'")
  moe.save(dir .. "/x.npy", x)
  local back = moe.load(dir .. "/x.npy")
  print("  x.npy round trip: max |diff| =", max_abs_diff(x, back))
  moe.save(dir .. "/pair.safetensors", { x = x:to("bf16"), t = t }, { note = "quickstart" })
  local tensors, meta = moe.load(dir .. "/pair.safetensors")
  local names = {}
  for k, v in pairs(tensors) do names[#names + 1] = k .. ":" .. v:dtype() end
  table.sort(names)
  print("  pair.safetensors:", table.concat(names, " "), "metadata note =", meta and meta.note)
  os.execute("rm -rf '" .. dir .. "'")
else
  not_yet("moe.save / moe.load")
end

section("routing")
if moe.route then
  local T, E, K = 6, 16, 2
  local logits = moe.randn({ T, E }, { seed = 3, device = device })
  local replay = moe.zeros({ T, K }, { dtype = "i16", device = device })
  local r = moe.route{ logits = logits, method = "renormalize", top_k = K, replay = replay }
  print(r)
  print("  ids of token 1 (0-based expert ids):", table.concat(r.ids:totable()[1], ", "))
  print("  replay buffer holds the same ids:", max_abs_diff(r.ids, replay) == 0)
  if moe.routing_methods then
    print("  methods:")
    for _, m in ipairs(moe.routing_methods()) do print(("    %-18s %s"):format(m.name, m.description)) end
  end
else
  not_yet("moe.route")
end

section("traces (routing replay over layers, compared across runs)")
if moe.route and moe.trace and moe.trace.new then
  local L, T, E, K = 2, 64, 16, 2
  local function record(noise)
    local tr = moe.trace.new{ layers = L, top_k = K, num_experts = E, capacity = T, device = device }
    for l = 1, L do
      local logits = moe.randn({ T, E }, { seed = 100 + l, device = device })
      if noise > 0 then -- logits + noise, in place (moe.axpby: y = alpha x + beta y)
        local n = moe.randn({ T, E }, { seed = 200 + l, std = noise, device = device })
        if moe.axpby then
          moe.axpby(1, n, 1, logits)
        else
          local lt, nt = logits:totable(), n:totable()
          for i = 1, T do for j = 1, E do lt[i][j] = lt[i][j] + nt[i][j] end end
          logits = moe.tensor(lt, { device = device })
        end
      end
      moe.route{ logits = logits, method = "renormalize", top_k = K, replay = tr:replay(l) }
    end
    tr:commit(T)
    return tr
  end
  local ref, noisy = record(0), record(0.1)
  local c = moe.trace.compare(ref, noisy)
  print(("  router disagreement with logit noise 0.1: %.2f%%"):format(100 * c.router_disagreement))
else
  not_yet("moe.trace")
end

section("models")
if moe.model and moe.model.preset then
  print("  moe.model.preset(\"qwen3-30b-a3b\", {size = \"tiny\"}):run{...} records a trace per")
  print("  quantisation mode; see scripts/experiments/ and docs/ for the full pipeline.")
else
  not_yet("moe.model")
end

print("\nNext: moe repl (help(moe)), moe spec scripts/spec-examples, docs/testing.md.")
