-- moe.quant -- quantisation modes (bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4): quantise
-- weights or activations, look at the codes and scales, dequantise, save and load.
--
--   local q = moe.quantize(w, "nvfp4")          -- w: f32/bf16/f16 [N, K] or [E, N, K]
--   q.data          -- e2m1 [E, N, K] codes (two per byte), a tensor
--   q.scales        -- f8_e4m3 [E, N, K/16] block scales (nil for bf16)
--   q.global_scale  -- f32 [E] (nvfp4 only; nil otherwise)
--   q.mode, q.shape, q.block_rows, q.block_cols
--   local w2 = q:dequantize("f32")             -- or moe.dequantize(q, "bf16")
--   q:save("w.safetensors"); local q2 = moe.quant_load("w.safetensors")
--   moe.quantize(x, "fp8_block", {block_rows = 1})   -- activations: one scale per row and 128 columns
--   moe.quant_from_parts{mode = "mxfp4", data = blocks_u8, scales = scales_u8}  -- from a checkpoint
--
-- Layouts and exact numerics: docs/quantization.md.  The C engine validates every argument and
-- names it in its error messages.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local describe = moe._describe

  local q_box = ffi.new("moe_qtensor*[1]")
  local out_box = ffi.new("moe_tensor*[1]")
  local opts_box = ffi.new("moe_quant_opts[1]")
  local shape_buf = ffi.new("int64_t[8]")
  local st_box = ffi.new("moe_st_file*[1]")

  local COUNT = tonumber(C.MOE_QUANT_MODE_COUNT)
  local MODES = {}
  for i = 0, COUNT - 1 do MODES[i + 1] = ffi.string(C.moe_quant_mode_name(i)) end

  -- The mode names, in id order (a fresh table).
  function moe.quant_modes()
    local out = {}
    for i, m in ipairs(MODES) do out[i] = m end
    return out
  end

  local function mode_arg(x, fn, arg)
    if type(x) == "string" then
      local id = C.moe_quant_mode_from_name(x)
      C.moe_clear_error()
      if id >= 0 then return tonumber(id) end
    elseif type(x) == "number" and x % 1 == 0 and x >= 0 and x < COUNT then
      return x
    end
    error(string.format("%s: %s: expected a quantisation mode (%s), got %s", fn, arg or "mode",
                        table.concat(MODES, ", "), describe(x)), 3)
  end

  local handle = moe._tensor_arg

  local function fill_opts(opts, fn, allowed)
    opts = moe._check_opts(opts, fn, allowed, 4)
    local br = opts.block_rows
    if br ~= nil and not (type(br) == "number" and br % 1 == 0) then
      error(fn .. ": opts.block_rows: expected an integer (128, 1 or 0), got " .. describe(br), 3)
    end
    opts_box[0] = C.moe_quant_opts_default()
    opts_box[0].block_rows = br or 0
    return opts_box
  end

  -- An owned view of a borrowed part (NULL -> nil).
  local function view(t, fn)
    if t == nil then return nil end
    local nd = C.moe_tensor_ndim(t)
    for i = 0, nd - 1 do shape_buf[i] = C.moe_tensor_dim(t, i) end
    local st = C.moe_tensor_reshape(out_box, t, nd, shape_buf)
    local h = out_box[0]
    out_box[0] = nil
    moe._check(st, fn, 4)
    return moe._wrap(h)
  end

  local Q = {}
  Q.__index = Q
  moe.QTensor = Q

  local function wrap_q(h, fn)
    h = ffi.gc(h, C.moe_qtensor_free)
    local nd = C.moe_qtensor_ndim(h)
    local shape = {}
    for i = 0, nd - 1 do shape[i + 1] = tonumber(C.moe_qtensor_dim(h, i)) end
    return setmetatable({
      _h = h,
      mode = MODES[tonumber(C.moe_qtensor_mode(h)) + 1],
      shape = shape,
      block_rows = tonumber(C.moe_qtensor_block_rows(h)),
      block_cols = tonumber(C.moe_qtensor_block_cols(h)),
      data = view(C.moe_qtensor_data(h), fn),
      scales = view(C.moe_qtensor_scales(h), fn),
      global_scale = view(C.moe_qtensor_global_scale(h), fn),
    }, Q)
  end

  function moe.is_qtensor(x) return getmetatable(x) == Q end

  local function qh(self, fn)
    if getmetatable(self) ~= Q then
      error(string.format("%s: q: expected a quantised tensor (from moe.quantize), got %s", fn,
                          describe(self)), 3)
    end
    if self._h == nil then error(fn .. ": q: quantised tensor was freed", 3) end
    return self._h
  end

  -- moe.quantize(t, mode [, opts]): opts.block_rows (fp8_block: 128 weights, 1 activations).
  local QOPTS = { block_rows = true }
  function moe.quantize(t, mode, opts)
    local fn = "moe.quantize"
    local h = handle(t, fn, "t")
    local m = mode_arg(mode, fn, "mode")
    local o = fill_opts(opts, fn, QOPTS)
    local st = C.moe_quantize(h, m, o, q_box)
    local qhd = q_box[0]
    q_box[0] = nil
    moe._check(st, fn)
    return wrap_q(qhd, fn)
  end

  -- Values of q as a new tensor of dtype (default f32; bf16, f16), on q's device.
  function Q.dequantize(self, dtype)
    local fn = "q:dequantize"
    local h = qh(self, fn)
    local dt = dtype == nil and C.MOE_F32 or moe._dtype(dtype, fn, "dtype")
    local st = C.moe_dequantize(h, dt, out_box)
    local o = out_box[0]
    out_box[0] = nil
    moe._check(st, fn)
    return moe._wrap(o)
  end

  function moe.dequantize(q, dtype)
    qh(q, "moe.dequantize")
    return Q.dequantize(q, dtype)
  end

  function Q.device(self)
    return moe._device_str(C.moe_qtensor_device(qh(self, "q:device")))
  end

  -- Release the handle and the part views now (idempotent).
  function Q.free(self)
    if getmetatable(self) ~= Q then error("q:free: q: expected a quantised tensor, got " .. describe(self), 2) end
    local h = rawget(self, "_h")
    if h == nil then return end
    self._h = nil
    ffi.gc(h, nil)
    C.moe_qtensor_free(h)
    for _, k in ipairs{ "data", "scales", "global_scale" } do
      local t = rawget(self, k)
      if t ~= nil then t:free() self[k] = nil end
    end
  end

  local shape_str = moe._shape_str

  local function part_str(t)
    return t:dtype() .. " " .. shape_str(t:shape())
  end

  function Q.__tostring(self)
    if self._h == nil then return "moe qtensor (freed)" end
    local parts = { "data " .. part_str(self.data) }
    if self.scales then parts[#parts + 1] = "scales " .. part_str(self.scales) end
    if self.global_scale then parts[#parts + 1] = "global_scale " .. part_str(self.global_scale) end
    local block = ""
    if self.block_cols > 0 then
      block = string.format(", block %dx%d", self.block_rows, self.block_cols)
    end
    return string.format("moe qtensor %s %s on %s%s: %s", self.mode, shape_str(self.shape),
                         self:device(), block, table.concat(parts, ", "))
  end

  -- ---------------------------------------------------------- files / parts --

  -- Save as safetensors: entries "data", "scales", "global_scale" (those present) with
  -- metadata moe_quant.mode / .block_rows / .block_cols and format "moelab-qtensor/1", plus
  -- the string pairs of `metadata` (optional table).
  function Q.save(self, path, metadata)
    local fn = "q:save"
    qh(self, fn)
    if type(path) ~= "string" then error(fn .. ": path: expected a string, got " .. describe(path), 2) end
    local names, ts = {}, {}
    for _, k in ipairs{ "data", "scales", "global_scale" } do
      if self[k] ~= nil then names[#names + 1] = k ts[#ts + 1] = self[k] end
    end
    local meta = {
      ["format"] = "moelab-qtensor/1",
      ["moe_quant.mode"] = self.mode,
      ["moe_quant.block_rows"] = tostring(self.block_rows),
      ["moe_quant.block_cols"] = tostring(self.block_cols),
    }
    if metadata ~= nil then
      if type(metadata) ~= "table" then
        error(fn .. ": metadata: expected a table of strings or nil, got " .. describe(metadata), 2)
      end
      for k, v in pairs(metadata) do
        if type(k) ~= "string" or type(v) ~= "string" then
          error(fn .. ": metadata: expected string keys and values, got " .. describe(k) .. " = " ..
                describe(v), 2)
        end
        meta[k] = v
      end
    end
    local keys = {}
    for k in pairs(meta) do keys[#keys + 1] = k end
    table.sort(keys)
    local n, nm = #names, #keys
    local cnames = ffi.new("const char*[?]", n)
    local cts = ffi.new("const moe_tensor*[?]", n)
    for i = 1, n do cnames[i - 1] = names[i] cts[i - 1] = ts[i].h end
    local ck = ffi.new("const char*[?]", nm)
    local cv = ffi.new("const char*[?]", nm)
    local vals = {}
    for i = 1, nm do vals[i] = meta[keys[i]] ck[i - 1] = keys[i] cv[i - 1] = vals[i] end
    moe._check(C.moe_st_write(path, n, cnames, cts, nm, ck, cv), fn)
    return self
  end

  -- moe.quant_from_parts{mode =, data =, scales =, global_scale =, block_rows =}: a quantised
  -- tensor over existing parts (sharing their storage), every shape and dtype checked.
  local PARTS = { mode = true, data = true, scales = true, global_scale = true, block_rows = true }
  function moe.quant_from_parts(args)
    local fn = "moe.quant_from_parts"
    if type(args) ~= "table" then error(fn .. ": args: expected a table, got " .. describe(args), 2) end
    for k in pairs(args) do
      if not PARTS[k] then
        error(fn .. ": args: unknown key " .. describe(k) ..
              " (known: block_rows, data, global_scale, mode, scales)", 2)
      end
    end
    local m = mode_arg(args.mode, fn, "mode")
    local d = handle(args.data, fn, "data")
    local s = args.scales ~= nil and handle(args.scales, fn, "scales") or nil
    local g = args.global_scale ~= nil and handle(args.global_scale, fn, "global_scale") or nil
    local o = fill_opts({ block_rows = args.block_rows }, fn, QOPTS)
    local st = C.moe_qtensor_from_parts(q_box, m, d, s, g, o)
    local h = q_box[0]
    q_box[0] = nil
    moe._check(st, fn)
    return wrap_q(h, fn)
  end

  -- Load what q:save wrote (or any safetensors file with those entry names and a
  -- moe_quant.mode metadata key, or opts.mode).
  function moe.quant_load(path, opts)
    local fn = "moe.quant_load"
    if type(path) ~= "string" then error(fn .. ": path: expected a string, got " .. describe(path), 2) end
    if opts ~= nil and type(opts) ~= "table" then
      error(fn .. ": opts: expected a table or nil, got " .. describe(opts), 2)
    end
    opts = opts or {}
    moe._check(C.moe_st_open(path, st_box), fn)
    local f = ffi.gc(st_box[0], C.moe_st_close)
    st_box[0] = nil
    local meta = {}
    for i = 0, C.moe_st_meta_count(f) - 1 do
      meta[ffi.string(C.moe_st_meta_key(f, i))] = ffi.string(C.moe_st_meta_value(f, i))
    end
    local mode = opts.mode or meta["moe_quant.mode"]
    if mode == nil then
      error(fn .. ": " .. path .. ": expected a moe_quant.mode metadata entry (or opts.mode), got none", 2)
    end
    local parts = { mode = mode }
    for _, k in ipairs{ "data", "scales", "global_scale" } do
      local idx = C.moe_st_find(f, k)
      if idx >= 0 then
        moe._check(C.moe_st_get(f, idx, out_box), fn)
        parts[k] = moe._wrap(out_box[0])
        out_box[0] = nil
      end
    end
    if parts.data == nil then error(fn .. ": " .. path .. ": expected an entry named \"data\", got none", 2) end
    local br = opts.block_rows or tonumber(meta["moe_quant.block_rows"] or "")
    if parts.mode ~= "fp8_block" then br = nil end
    parts.block_rows = br
    ffi.gc(f, nil)
    C.moe_st_close(f)
    local ok, q = pcall(moe.quant_from_parts, parts)
    if not ok then error((tostring(q):gsub("moe%.quant_from_parts", fn)), 2) end
    if opts.device ~= nil then q = q:to(opts.device) end
    return q
  end

  -- Copy to another device ("cpu", "cuda", "cuda:N").
  function Q.to(self, device)
    local fn = "q:to"
    qh(self, fn)
    return moe.quant_from_parts{
      mode = self.mode,
      data = self.data:to(device),
      scales = self.scales and self.scales:to(device) or nil,
      global_scale = self.global_scale and self.global_scale:to(device) or nil,
      block_rows = self.mode == "fp8_block" and self.block_rows or nil,
    }
  end
end
