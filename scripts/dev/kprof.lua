-- kprof.lua -- developer driver for Nsight Compute (not part of the tests): two fused_moe calls of
-- one shape / mode / T on CUDA with random weights (renormalize top-k), so that
-- `ncu --metrics gpu__time_duration.sum --csv luajit scripts/moe run scripts/dev/kprof.lua ...`
-- lists every kernel of a call (the second call starts at the last routing kernel).
-- Usage: luajit scripts/moe run scripts/dev/kprof.lua MODE T [qwen3|mixtral|deepseek]
--   MODE: bf16, fp8, fp8_block, nvfp4, mxfp4 or mxint4; T: tokens.
local moe = require("moe")
local SHAPES = { qwen3 = { 2048, 768, 128, 8 }, mixtral = { 4096, 14336, 8, 2 }, deepseek = { 7168, 2048, 256, 8 } }
local MODES = { bf16 = true, fp8 = true, fp8_block = true, nvfp4 = true, mxfp4 = true, mxint4 = true }
local mode, T, shape = arg[1], tonumber(arg[2]), arg[3] or "qwen3"
if not MODES[mode] or not T or T < 1 or not SHAPES[shape] then
  io.stderr:write("usage: kprof.lua MODE T [qwen3|mixtral|deepseek]; got ", tostring(mode), " ", tostring(arg[2]),
                  " ", tostring(shape), "\n")
  os.exit(2)
end
if not moe.cuda_available() then
  io.stderr:write("kprof.lua: needs a CUDA device\n")
  os.exit(77)
end
local Hd, I, E, K = unpack(SHAPES[shape])
local w13 = moe.randn({ E, 2 * I, Hd }, { dtype = "bf16", device = "cuda", seed = 1, std = 0.02 })
local w2 = moe.randn({ E, Hd, I }, { dtype = "bf16", device = "cuda", seed = 2, std = 0.02 })
local ex = moe.experts{ gate_up = w13, down = w2, device = "cuda", quant = mode ~= "bf16" and mode or nil }
local x = moe.randn({ T, Hd }, { dtype = "bf16", device = "cuda", seed = 3 })
local L = moe.randn({ T, E }, { device = "cuda", seed = 4 })
ex:reserve(T, K)
for _ = 1, 2 do moe.fused_moe{ hidden = x, logits = L, experts = ex, method = "renormalize", top_k = K } end
moe.synchronize("cuda")
