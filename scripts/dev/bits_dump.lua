-- bits_dump.lua -- developer check (not part of the tests): run the quantised fused MoE on CUDA
-- over k_qg_rs in every mode and setting (fp8_block ping-pong and in step, mxint4 with and without
-- the f16 fold) for a few cases, and over the decode GEMV path at T = 1 and 4, and save each
-- output to DIR/NAME.safetensors, so that two libraries' outputs can be compared byte for byte
-- (`cmp`): a refactor meant to keep the bits.
-- The weights hold blocks of zeros and of tiny values (zero and subnormal scale codes).
-- Usage: luajit scripts/moe run scripts/dev/bits_dump.lua DIR [cuda|cpu]
local moe = require("moe")
local ffi = require("ffi")
ffi.cdef("int setenv(const char*, const char*, int); int unsetenv(const char*);")
local dir = assert(arg[1], "usage: bits_dump.lua DIR [cuda|cpu]")
local dev = arg[2] or "cuda"
os.execute("mkdir -p " .. dir)
local E, HD, I = 16, 384, 640

local function env(vars, f)
  for k, v in pairs(vars) do ffi.C.setenv(k, v, 1) end
  local r = f()
  for k in pairs(vars) do ffi.C.unsetenv(k) end
  return r
end

-- w [E, N, K]: experts 3 and 7 scaled down (tiny values: subnormal / zero block scales), some
-- 32-column blocks of expert 5 zero
local function weight(N, K, seed)
  local w = moe.randn({ E, N, K }, { seed = seed, std = 0.05 }):totable()
  for n = 1, N do
    for k = 1, K do
      w[4][n][k] = w[4][n][k] * 2 ^ -18
      w[8][n][k] = w[8][n][k] * 2 ^ -9
      if (k - 1) % 96 < 32 then w[6][n][k] = 0 end
    end
  end
  return moe.tensor(w):to("bf16")
end

local n = 0
for ci, c in ipairs{ { act = "swiglu", T = 800, route = { method = "renormalize", top_k = 2 } },
                     { act = "relu2", bias = true, T = 800, route = { method = "renormalize", top_k = 2 } },
                     { act = "swiglu", T = 1600, route = { method = "llama4", top_k = 1 } },
                     { act = "swiglu", T = 1600, route = { method = "renormalize", top_k = 2 },
                       more = { local_offset = 4, local_count = 8 } },
                     -- decode (the GEMV path): T = 1 (the kernels route the token themselves), T = 4
                     { act = "swiglu", T = 1, route = { method = "renormalize", top_k = 2 } },
                     { act = "relu2", bias = true, T = 4, route = { method = "renormalize", top_k = 2 } } } do
  local N1 = c.act == "relu2" and I or 2 * I
  local w13, w2 = weight(N1, HD, 10 * ci + 1), weight(HD, I, 10 * ci + 2)
  local b13 = c.bias and moe.randn({ E, N1 }, { seed = 5, std = 0.2 }) or nil
  local b2 = c.bias and moe.randn({ E, HD }, { seed = 6, std = 0.2 }) or nil
  local x = moe.randn({ c.T, HD }, { dtype = "bf16", seed = 100 + ci, device = dev })
  local L = moe.randn({ c.T, E }, { seed = 200 + ci, device = dev })
  for _, m in ipairs{ { "fp8" }, { "fp8_block", { MOE_FUSED_QRS = "1" } },
                      { "fp8_block", { MOE_FUSED_QRS = "1", MOE_FUSED_FBPP = "0" }, "instep" },
                      { "nvfp4" }, { "mxfp4" }, { "mxint4" }, { "mxint4", { MOE_FUSED_I4F16 = "0" }, "promo" } } do
    local y = env(m[2] or {}, function()
      local ex = moe.experts{ gate_up = w13, down = w2, bias_gate_up = b13, bias_down = b2, activation = c.act,
                              quant = m[1], device = dev }
      local a = { hidden = x, logits = L, experts = ex, method = c.route.method, top_k = c.route.top_k }
      for k, v in pairs(c.more or {}) do a[k] = v end
      return moe.fused_moe(a)
    end)
    local name = string.format("%s/c%d_%s%s.safetensors", dir, ci, m[1], m[3] and "_" .. m[3] or "")
    moe.save(name, { y = y:to("cpu") })
    n = n + 1
  end
end
print(string.format("bits_dump: %d outputs in %s", n, dir))
