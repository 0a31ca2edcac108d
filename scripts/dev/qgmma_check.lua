-- qgmma_check.lua -- developer check of the Hopper prefill kernels (kernels/fused_qgmma.cu) in
-- every mode on a GPU machine, not part of the tests (spec/fused_quant_gpu_spec.lua is):
-- relative L2 of the default (exact) kernels, the FP8-tensor-core kernels (MOE_FUSED_FP8MMA=1,
-- fp8 / fp8_block) and the mma.sync tile kernels (MOE_FUSED_QWGMMA=0) against the CPU
-- reference, and of the exact kernels against the tile kernels (0 = the same bits).
-- Usage: luajit scripts/moe run scripts/dev/qgmma_check.lua
local moe = require("moe")
local ffi = require("ffi")
ffi.cdef("int setenv(const char*, const char*, int); int unsetenv(const char*);")

local function rel(a, b)
  local x, y = a:to("cpu"):totable(), b:to("cpu"):totable()
  local n, d = 0, 0
  for i = 1, #x do
    for j = 1, #x[i] do
      local u, v = x[i][j], y[i][j]
      n = n + (u - v) ^ 2
      d = d + v * v
    end
  end
  return math.sqrt(n / d)
end

local function with(name, value, f)
  ffi.C.setenv(name, value, 1)
  local r = f()
  ffi.C.unsetenv(name)
  return r
end

for _, cfg in ipairs{ { E = 16, HD = 384, I = 640, T = 800, K = 2, act = "swiglu" },
                      { E = 8, HD = 512, I = 256, T = 900, K = 2, act = "relu2" } } do
  local N1 = cfg.act == "relu2" and cfg.I or 2 * cfg.I
  local w13 = moe.randn({ cfg.E, N1, cfg.HD }, { dtype = "bf16", seed = 1, std = 0.05 })
  local w2 = moe.randn({ cfg.E, cfg.HD, cfg.I }, { dtype = "bf16", seed = 2, std = 0.05 })
  local b13 = moe.randn({ cfg.E, N1 }, { seed = 5, std = 0.2 })
  local x = moe.randn({ cfg.T, cfg.HD }, { dtype = "bf16", seed = 3 })
  local L = moe.randn({ cfg.T, cfg.E }, { seed = 4 })
  for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" } do
    local function run(dev)
      local ex = moe.experts{ gate_up = w13, down = w2, bias_gate_up = b13, activation = cfg.act, quant = mode,
                              device = dev }
      return moe.fused_moe{ hidden = x:to(dev), logits = L:to(dev), experts = ex, top_k = cfg.K }
    end
    local yc, ye = run("cpu"), run("cuda")
    local yt = with("MOE_FUSED_QWGMMA", "0", function() return run("cuda") end)
    local fp8 = mode == "fp8" or mode == "fp8_block"
    local function col(f) return fp8 and string.format("%.3e", f()) or "-" end
    print(string.format("%-9s %-6s T=%d  exact/cpu %.3e  fp8-tc/cpu %s  tile/cpu %.3e  exact/tile %.3e",
      mode, cfg.act, cfg.T, rel(ye, yc),
      col(function() return rel(with("MOE_FUSED_FP8MMA", "1", function() return run("cuda") end), yc) end),
      rel(yt, yc), rel(ye, yt)))
  end
end
