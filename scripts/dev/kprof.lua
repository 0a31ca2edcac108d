-- kprof.lua -- developer driver for Nsight Compute (not part of the tests): two fused_moe calls of
-- one shape / mode / T on CUDA with random weights (renormalize top-k), so that
-- `ncu --metrics gpu__time_duration.sum --csv luajit scripts/moe run scripts/dev/kprof.lua ...`
-- lists every kernel of a call (the second call starts at the last routing kernel).
-- Usage: luajit scripts/moe run scripts/dev/kprof.lua MODE T [qwen3|mixtral|deepseek]
--   MODE: bf16, fp8, fp8_block, nvfp4, mxfp4 or mxint4; T: tokens.
local moe = require("moe")
local case = dofile(arg[0]:gsub("[^/]*$", "") .. "dev_case.lua")
local MODES = { bf16 = true, fp8 = true, fp8_block = true, nvfp4 = true, mxfp4 = true, mxint4 = true }
local mode, T, shape = arg[1], tonumber(arg[2]), arg[3] or "qwen3"
if not MODES[mode] or not T or T < 1 or not case.SHAPES[shape] then
  io.stderr:write("usage: kprof.lua MODE T [qwen3|mixtral|deepseek]; got ", tostring(mode), " ", tostring(arg[2]),
                  " ", tostring(shape), "\n")
  os.exit(2)
end
local c = case.make(moe, "kprof.lua", mode, T, shape)
local ex, x, L, K = c.ex, c.x, c.L, c.K
for _ = 1, 2 do moe.fused_moe{ hidden = x, logits = L, experts = ex, method = "renormalize", top_k = K } end
moe.synchronize("cuda")
