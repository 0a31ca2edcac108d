-- CUDA quantisers and dequantiser against the CPU reference, bit for bit, for every mode on
-- random inputs with outliers, zeros, f32 subnormals, all-zero blocks and experts, NaN/inf,
-- odd numbers of blocks, bf16/f16 inputs and strided views.  (Runs only with a CUDA device.)
local ffi = require("ffi")
local moe = require("moe")

local C = moe.C

-- Raw bytes of a tensor (any device) as a Lua string.
local function raw(t)
  local n = t:nbytes()
  local buf = ffi.new("uint8_t[?]", math.max(n, 1))
  assert(C.moe_tensor_copy_to_host(t.h, buf, n) == 0, ffi.string(C.moe_last_error()))
  return ffi.string(buf, n)
end

local function first_diff(a, b)
  if #a ~= #b then return string.format("sizes %d vs %d", #a, #b) end
  for i = 1, #a do
    if a:byte(i) ~= b:byte(i) then
      local n = 0
      for j = i, #a do if a:byte(j) ~= b:byte(j) then n = n + 1 end end
      return string.format("%d bytes differ, first at byte %d: cpu 0x%02X, cuda 0x%02X", n, i - 1,
                           a:byte(i), b:byte(i))
    end
  end
  return nil
end

local function same_bytes(what, a, b)
  local d = first_diff(raw(a), raw(b))
  assert(d == nil, what .. ": " .. tostring(d))
end

-- Random normal values with outliers (x300), zeros, f32 subnormals (x1e-39) and an all-zero
-- stretch of 256 elements at the start of row 1 (whole blocks of every size).  kind:
-- "special" adds NaN, +inf, -inf, -0; "tiny" scales everything by 1e-36 (subnormal scales);
-- "zero_expert" zeroes matrix 1 of a 3-D stack.
local function make(shape, seed, kind, dtype)
  local t = moe.randn(shape, { seed = seed })
  local n = t:numel()
  local K = shape[#shape]
  local buf = ffi.new("double[?]", n)
  assert(C.moe_tensor_read_f64(t.h, buf, n) == 0)
  for i = 0, n - 1, 97 do buf[i] = buf[i] * 300 end
  for i = 3, n - 1, 211 do buf[i] = 0 end
  for i = 5, n - 1, 389 do buf[i] = buf[i] * 1e-39 end
  for i = K, math.min(n, K + 256) - 1 do buf[i] = 0 end
  if kind == "special" then
    buf[1] = 0 / 0
    buf[math.min(n - 1, 2 * K + 3)] = math.huge
    buf[n - 1] = -math.huge
    buf[math.min(n - 1, 40)] = -0.0
  elseif kind == "tiny" then
    for i = 0, n - 1 do buf[i] = buf[i] * 1e-36 end
  elseif kind == "zero_expert" then
    local per = n / shape[1]
    for i = per, 2 * per - 1 do buf[i] = 0 end
  end
  assert(C.moe_tensor_write_f64(t.h, buf, n) == 0)
  if dtype then t = t:to(dtype) end
  return t
end

local function rel_l2(a, b)
  local n = a:numel()
  local x, y = ffi.new("double[?]", n), ffi.new("double[?]", n)
  C.moe_tensor_read_f64(a.h, x, n)
  C.moe_tensor_read_f64(b.h, y, n)
  local num, den = 0, 0
  for i = 0, n - 1 do
    local d = x[i] - y[i]
    num = num + d * d
    den = den + x[i] * x[i]
  end
  return math.sqrt(num / den)
end

local function check(mode, t_cpu, opts, label)
  local t_gpu = t_cpu:to("cuda")
  local qc = moe.quantize(t_cpu, mode, opts)
  local qg = moe.quantize(t_gpu, mode, opts)
  assert.are.equal("cuda:0", qg:device())
  local tag = mode .. " " .. label
  same_bytes(tag .. ": data", qc.data, qg.data)
  if qc.scales then same_bytes(tag .. ": scales", qc.scales, qg.scales) end
  if qc.global_scale then same_bytes(tag .. ": global_scale", qc.global_scale, qg.global_scale) end
  for _, dt in ipairs{ "f32", "bf16", "f16" } do
    same_bytes(tag .. ": dequantize " .. dt, qc:dequantize(dt), qg:dequantize(dt))
  end
  -- CPU parts moved to the GPU (moe_qtensor_from_parts on CUDA) dequantise the same way
  local moved = qc:to("cuda")
  same_bytes(tag .. ": dequantize of parts moved to CUDA", qc:dequantize(), moved:dequantize())
  return qc
end

local SHAPES = {
  bf16 = { { 7, 33 }, { 3, 5, 40 } },
  fp8 = { { 7, 33 }, { 3, 5, 96 }, { 8, 512, 2048 } },
  fp8_block = { { 3, 256, 384 }, { 2, 128, 128 }, { 8, 512, 2048 } },
  nvfp4 = { { 7, 80 }, { 3, 9, 112 }, { 8, 512, 2048 } },
  mxfp4 = { { 7, 96 }, { 3, 9, 160 }, { 8, 512, 2048 } },
  mxint4 = { { 7, 96 }, { 3, 9, 160 }, { 8, 512, 2048 } },
}

local function shape_str(s)
  local p = {}
  for i, v in ipairs(s) do p[i] = tostring(v) end
  return "[" .. table.concat(p, ",") .. "]"
end

describe("CUDA quantisers equal the CPU reference bit for bit #gpu", function()
  for mi, mode in ipairs(moe.quant_modes()) do
    describe(mode, function()
      for si, shape in ipairs(SHAPES[mode]) do
        it("random " .. shape_str(shape), function()
          local t = make(shape, 100 * mi + si, "mixed")
          local q = check(mode, t, nil, shape_str(shape))
          if shape[1] == 8 then
            io.write(string.format("\n  [quant] %-9s %s rel L2 error of dequantize(quantize(x)) vs x: %.4g\n",
                                   mode, shape_str(shape), rel_l2(t, q:dequantize())))
          end
        end)
      end
      local small = SHAPES[mode][2]
      for _, kind in ipairs{ "special", "tiny", "zero_expert" } do
        it(kind .. " " .. shape_str(small), function()
          check(mode, make(small, 7 + mi, kind), nil, kind)
        end)
      end
      for _, dt in ipairs{ "bf16", "f16" } do
        it(dt .. " input " .. shape_str(small), function()
          check(mode, make(small, 17 + mi, "mixed", dt), nil, dt)
        end)
      end
      -- one matrix from bf16 (an activation's case: nvfp4's k_nvfp4_bf16 takes its global scale once)
      local flat = SHAPES[mode][1]
      it("bf16 input " .. shape_str(flat), function()
        check(mode, make(flat, 27 + mi, "mixed", "bf16"), nil, "bf16 one matrix")
      end)
      it("strided input", function()
        local s = small
        local K, N = s[#s], s[#s - 1]
        local base = make({ K, N }, 31 + mi, "mixed")
        local view = base:transpose(1, 2)                 -- [N, K] view
        local qc = moe.quantize(view, mode)
        local qg = moe.quantize(base:to("cuda"):transpose(1, 2), mode)
        same_bytes(mode .. " strided: data", qc.data, qg.data)
        if qc.scales then same_bytes(mode .. " strided: scales", qc.scales, qg.scales) end
      end)
    end)
  end

  it("fp8_block activations (block_rows 1), odd row counts", function()
    for _, shape in ipairs{ { 7, 384 }, { 1, 128 }, { 33, 1024 } } do
      check("fp8_block", make(shape, 5, "mixed"), { block_rows = 1 }, "act " .. shape_str(shape))
      check("fp8_block", make(shape, 6, "special"), { block_rows = 1 }, "act special " .. shape_str(shape))
    end
  end)

  it("a bf16 source that starts one element into its storage (the per-row kernel's unaligned loads)", function()
    -- kernels/quant_rows.cuh loads a lane's elements as one 8-byte vector only when the source is
    -- 8-byte aligned; this view is 2 bytes off, so the element-wise fallback runs
    local N, K = 7, 384
    for _, c in ipairs{ { "fp8_block", { block_rows = 1 } }, { "nvfp4" }, { "mxfp4" }, { "mxint4" } } do
      local base = make({ N * K + 1 }, 41, "mixed", "bf16")
      local view = base:narrow(1, 2, N * K):reshape({ N, K })
      local gview = base:to("cuda"):narrow(1, 2, N * K):reshape({ N, K })
      local qc, qg = moe.quantize(view, c[1], c[2]), moe.quantize(gview, c[1], c[2])
      same_bytes(c[1] .. " offset view: data", qc.data, qg.data)
      same_bytes(c[1] .. " offset view: scales", qc.scales, qg.scales)
      -- and the aligned copy gives the same bits
      same_bytes(c[1] .. " offset view vs aligned copy", qg.data, moe.quantize(gview:clone(), c[1], c[2]).data)
    end
  end)

  it("parts on different devices are refused", function()
    local q = moe.quantize(moe.randn({ 4, 64 }, { seed = 1 }), "nvfp4")
    local ok, err = pcall(moe.quant_from_parts, { mode = "nvfp4", data = q.data:to("cuda"), scales = q.scales,
                                                  global_scale = q.global_scale:to("cuda") })
    assert.is_false(ok)
    assert.matches("moe_qtensor_from_parts: scales: expected device cuda:0 %(as data%), got cpu", err)
  end)

  it("throughput (informational)", function()
    -- clock_gettime may already be declared by another module with its own timespec type:
    -- declare it with void * when it is not, and always pass a void * (converts to any pointer)
    pcall(ffi.cdef, "int clock_gettime(int clk, void *ts);")
    local ts = ffi.new("int64_t[2]")                  -- struct timespec on 64-bit Linux
    local tsp = ffi.cast("void *", ts)
    local function now() ffi.C.clock_gettime(1, tsp) return tonumber(ts[0]) + tonumber(ts[1]) * 1e-9 end
    local w = moe.randn({ 32, 2048, 7168 }, { dtype = "bf16", device = "cuda", seed = 3 })
    for _, mode in ipairs{ "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4" } do
      local q = moe.quantize(w, mode)          -- warm-up
      q:free()
      moe.synchronize("cuda")
      local t0 = now()
      for _ = 1, 3 do moe.quantize(w, mode):free() end
      moe.synchronize("cuda")
      local dt = (now() - t0) / 3
      io.write(string.format("\n  [quant] cuda quantize %-9s bf16 [32,2048,7168]: %.3f ms (%.0f GB/s of bf16 read)\n",
                             mode, dt * 1e3, w:nbytes() / dt / 1e9))
    end
  end)

  it("empty inputs", function()
    for _, mode in ipairs{ "fp8", "nvfp4", "mxfp4" } do
      local q = moe.quantize(moe.zeros({ 2, 0, 32 }, { device = "cuda" }), mode)
      assert.are.same({ 2, 0, 32 }, q:dequantize():shape())
    end
  end)
end)
