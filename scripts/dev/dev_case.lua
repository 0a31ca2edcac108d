-- dev_case.lua -- shared setup of the developer drivers kprof.lua and qv_timeline.lua (not a test):
-- one shape's random bf16 weights as CUDA experts in one mode, and T tokens of x and logits.
--   local case = dofile(arg[0]:gsub("[^/]*$", "") .. "dev_case.lua")
--   case.SHAPES[name] = { H, I, E, top_k }
--   local c = case.make(moe, "kprof.lua", mode, T, shape)   -- exits 77 without a CUDA device
--   c.ex, c.x, c.L, c.K, c.Hd
local SHAPES = { qwen3 = { 2048, 768, 128, 8 }, mixtral = { 4096, 14336, 8, 2 }, deepseek = { 7168, 2048, 256, 8 } }

local M = { SHAPES = SHAPES }

function M.make(moe, who, mode, T, shape)
  if not SHAPES[shape] then
    io.stderr:write(who, ": unknown shape ", tostring(shape), " (qwen3, mixtral or deepseek)\n")
    os.exit(2)
  end
  if not moe.cuda_available() then
    io.stderr:write(who, ": needs a CUDA device\n")
    os.exit(77)
  end
  local Hd, I, E, K = unpack(SHAPES[shape])
  local w13 = moe.randn({ E, 2 * I, Hd }, { dtype = "bf16", device = "cuda", seed = 1, std = 0.02 })
  local w2 = moe.randn({ E, Hd, I }, { dtype = "bf16", device = "cuda", seed = 2, std = 0.02 })
  local ex = moe.experts{ gate_up = w13, down = w2, device = "cuda", quant = mode ~= "bf16" and mode or nil }
  local x = moe.randn({ T, Hd }, { dtype = "bf16", device = "cuda", seed = 3 })
  local L = moe.randn({ T, E }, { device = "cuda", seed = 4 })
  ex:reserve(T, K)
  return { ex = ex, x = x, L = L, K = K, Hd = Hd }
end

return M
