-- moe.tensor -- tensors: constructors, metadata, views, copies, element access, printing.
--
-- A tensor is a cdata `moe_lua_tensor` (struct { moe_tensor *h; }); t.h is the C handle, freed
-- by the finaliser or by t:free().  Dimensions and indices are 1-based (Lua style); a negative
-- dimension counts from the end (-1 is the last).  See docs/tensors.md.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local M = moe.Tensor -- method table (the metatype's __index forwards here)
  local describe = moe._describe
  local check = moe._check
  local MAX_DIMS = 8
  local CUDA = C.MOE_DEVICE_CUDA

  local out_box = ffi.new("moe_tensor*[1]")
  local shape_buf = ffi.new("int64_t[8]")
  local double_ct = ffi.typeof("double[?]")

  -- Run a C function that returns a new handle through out_box; wrap it.
  local function take(st, fn)
    local h = out_box[0]
    out_box[0] = nil
    if st ~= 0 then check(st, fn, 4) end
    return moe._wrap(h)
  end

  -- --------------------------------------------------------- argument checks --

  local function H(self, fn)
    if not moe.is_tensor(self) then
      error(string.format("%s: self: expected a tensor (call it as t:%s(...)), got %s",
                          fn, fn:match("[:.](.*)$") or fn, describe(self)), 3)
    end
    local h = self.h
    if h == nil then error(fn .. ": tensor was freed", 3) end
    return h
  end
  moe._handle = H

  local function is_int(x) return type(x) == "number" and x % 1 == 0 and x == x end

  local SHAPE_MSG = "%s: %s: expected a table of non-negative integers, got %s"

  -- Validate a shape table; fills shape_buf, returns ndim and a copy as a Lua table.
  local function parse_shape(shape, fn, arg, allow_infer, level)
    arg = arg or "shape"
    level = level or 3
    if type(shape) ~= "table" then
      error(string.format(SHAPE_MSG, fn, arg, describe(shape)), level)
    end
    local n = #shape
    for k in pairs(shape) do
      if not (is_int(k) and k >= 1 and k <= n) then
        error(string.format(SHAPE_MSG, fn, arg, describe(shape)), level)
      end
    end
    if n > MAX_DIMS then
      error(string.format("%s: %s: expected at most %d dimensions, got %d", fn, arg, MAX_DIMS, n), level)
    end
    local copy, inferred = {}, false
    for i = 1, n do
      local d = shape[i]
      local ok = is_int(d) and d >= 0
      if not ok and allow_infer and d == -1 and not inferred then ok, inferred = true, true end
      if not ok then
        error(string.format(SHAPE_MSG .. " (dimension %d is %s)", fn, arg, describe(shape), i,
                            describe(d)), level)
      end
      shape_buf[i - 1] = d
      copy[i] = d
    end
    return n, copy
  end

  local check_opts = moe._check_opts

  local function check_number(v, fn, arg)
    if type(v) == "boolean" then return v and 1 or 0 end
    if type(v) ~= "number" then
      error(string.format("%s: %s: expected a number, got %s", fn, arg, describe(v)), 3)
    end
    return v
  end

  -- 1-based dimension (negative counts from the end) -> 0-based.
  local function dim_arg(d, ndim, fn, arg)
    if is_int(d) then
      if d >= 1 and d <= ndim then return d - 1 end
      if d < 0 and d >= -ndim then return ndim + d end
    end
    error(string.format("%s: %s: expected a dimension in 1..%d or -%d..-1, got %s", fn, arg,
                        ndim, ndim, describe(d)), 3)
  end

  -- --------------------------------------------------------------- allocation --

  -- moe_tensor_new with one retry after a full collection when memory runs out.
  local function new_handle(fn, dtype, ndim, dev)
    local st = C.moe_tensor_new(out_box, dtype, ndim, shape_buf, dev)
    if st == C.MOE_ERR_NOMEM then
      out_box[0] = nil
      moe.collect_garbage()
      moe.collect_garbage()
      st = C.moe_tensor_new(out_box, dtype, ndim, shape_buf, dev)
    end
    return take(st, fn)
  end

  local function alloc(fn, shape, opts, allowed)
    opts = check_opts(opts, fn, allowed, 4)
    local ndim = parse_shape(shape, fn, "shape", false, 4)
    local dtype = opts.dtype == nil and C.MOE_F32 or moe._dtype(opts.dtype, fn, "opts.dtype", 4)
    local dev = moe._device(opts.device, fn, "opts.device", 4)
    return new_handle(fn, dtype, ndim, dev), opts
  end

  local BASIC = { dtype = true, device = true }

  function moe.empty(shape, opts)
    return (alloc("moe.empty", shape, opts, BASIC))
  end

  function moe.zeros(shape, opts)
    local t = alloc("moe.zeros", shape, opts, BASIC)
    check(C.moe_tensor_fill(t.h, 0), "moe.zeros")
    return t
  end

  function moe.ones(shape, opts)
    local t = alloc("moe.ones", shape, opts, BASIC)
    check(C.moe_tensor_fill(t.h, 1), "moe.ones")
    return t
  end

  function moe.full(shape, value, opts)
    value = check_number(value, "moe.full", "value")
    local t = alloc("moe.full", shape, opts, BASIC)
    check(C.moe_tensor_fill(t.h, value), "moe.full")
    return t
  end

  -- Seeds: explicit, or the next value of a global counter set by moe.manual_seed.
  local st = moe._state
  st.seed_counter = st.seed_counter or 0

  function moe.manual_seed(s)
    if not (is_int(s) and s >= 0) then
      error("moe.manual_seed: seed: expected a non-negative integer, got " .. describe(s), 2)
    end
    st.seed_counter = s
  end

  local function seed_arg(s, fn)
    if s == nil then
      local v = st.seed_counter
      st.seed_counter = v + 1
      return v
    end
    if is_int(s) and s >= 0 and s < 2 ^ 64 then return s end
    if type(s) == "cdata" and (ffi.istype("uint64_t", s) or ffi.istype("int64_t", s)) then
      return s
    end
    error(fn .. ": opts.seed: expected a non-negative integer, got " .. describe(s), 3)
  end

  local RAND_OPTS = { dtype = true, device = true, seed = true, mean = true, std = true }
  function moe.randn(shape, opts)
    local t
    t, opts = alloc("moe.randn", shape, opts, RAND_OPTS)
    local mean = opts.mean == nil and 0 or check_number(opts.mean, "moe.randn", "opts.mean")
    local std = opts.std == nil and 1 or check_number(opts.std, "moe.randn", "opts.std")
    check(C.moe_tensor_rand_normal(t.h, seed_arg(opts.seed, "moe.randn"), mean, std), "moe.randn")
    return t
  end

  local UNIF_OPTS = { dtype = true, device = true, seed = true, lo = true, hi = true }
  function moe.rand(shape, opts)
    local t
    t, opts = alloc("moe.rand", shape, opts, UNIF_OPTS)
    local lo = opts.lo == nil and 0 or check_number(opts.lo, "moe.rand", "opts.lo")
    local hi = opts.hi == nil and 1 or check_number(opts.hi, "moe.rand", "opts.hi")
    check(C.moe_tensor_rand_uniform(t.h, seed_arg(opts.seed, "moe.rand"), lo, hi), "moe.rand")
    return t
  end

  -- moe.arange(n [, opts]) or moe.arange(start, stop [, step] [, opts]): start, start+step, ...
  -- while < stop (> stop for a negative step).
  function moe.arange(a, b, c, d)
    local fn = "moe.arange"
    local start, stop, step, opts
    if type(b) ~= "number" then
      start, stop, step, opts = 0, a, 1, b
    elseif type(c) ~= "number" then
      start, stop, step, opts = a, b, 1, c
    else
      start, stop, step, opts = a, b, c, d
    end
    check_number(start, fn, "start")
    check_number(stop, fn, "stop")
    check_number(step, fn, "step")
    if step == 0 or step ~= step then
      error(fn .. ": step: expected a non-zero number, got " .. describe(step), 2)
    end
    local n = math.ceil((stop - start) / step)
    if n < 0 or n ~= n then n = 0 end
    if n == math.huge then error(fn .. ": stop: expected a finite number, got " .. describe(stop), 2) end
    local t = alloc(fn, { n }, opts, BASIC)
    check(C.moe_tensor_arange(t.h, start, step), fn)
    return t
  end

  -- moe.tensor(data, opts): data is a number/boolean (0-d) or a nested table (shape inferred).
  function moe.tensor(data, opts)
    local fn = "moe.tensor"
    opts = check_opts(opts, fn, BASIC)
    local shape, values = {}, {}
    if type(data) == "number" or type(data) == "boolean" then
      values[1] = data
    elseif type(data) == "table" then
      -- infer the shape from the first element at each depth
      local x = data
      while type(x) == "table" do
        shape[#shape + 1] = #x
        if #shape > MAX_DIMS then
          error(string.format("%s: data: expected at most %d levels of nesting, got more",
                              fn, MAX_DIMS), 2)
        end
        x = x[1]
      end
      -- walk and validate every row
      local path = {}
      local function walk(node, depth)
        local n = shape[depth]
        if type(node) ~= "table" then
          error(string.format("%s: data: row [%s] should be a table of %d elements, got %s",
                              fn, table.concat(path, "]["), n, describe(node)), 2 + depth)
        end
        if #node ~= n then
          error(string.format("%s: data: ragged nested table: row [%s] has %d elements, expected %d",
                              fn, table.concat(path, "]["), #node, n), 2 + depth)
        end
        for i = 1, n do
          path[depth] = i
          local v = node[i]
          if depth == #shape then
            local tv = type(v)
            if tv ~= "number" and tv ~= "boolean" then
              error(string.format("%s: data: element [%s] expected a number or boolean, got %s",
                                  fn, table.concat(path, "]["), describe(v)), 2 + depth)
            end
            values[#values + 1] = v
          else
            walk(v, depth + 1)
          end
        end
        path[depth] = nil
      end
      if shape[1] > 0 then walk(data, 1) end
    else
      error(fn .. ": data: expected a number, boolean or nested table of numbers, got " ..
            describe(data), 2)
    end
    local t = alloc(fn, shape, opts, BASIC)
    local n = #values
    if n > 0 then
      local buf = double_ct(n)
      for i = 1, n do
        local v = values[i]
        if v == true then v = 1 elseif v == false then v = 0 end
        buf[i - 1] = v
      end
      check(C.moe_tensor_write_f64(t.h, buf, n), fn)
    end
    return t
  end

  -- ---------------------------------------------------------------- metadata --

  function M.shape(self)
    local h = H(self, "t:shape")
    local s = {}
    for i = 0, C.moe_tensor_ndim(h) - 1 do s[i + 1] = tonumber(C.moe_tensor_dim(h, i)) end
    return s
  end

  function M.size(self, d)
    local h = H(self, "t:size")
    if d == nil then return M.shape(self) end
    local nd = C.moe_tensor_ndim(h)
    return tonumber(C.moe_tensor_dim(h, dim_arg(d, nd, "t:size", "dim")))
  end

  function M.stride(self)
    local h = H(self, "t:stride")
    local s = {}
    for i = 0, C.moe_tensor_ndim(h) - 1 do s[i + 1] = tonumber(C.moe_tensor_stride(h, i)) end
    return s
  end

  function M.dtype(self)
    return moe._dtype_name(C.moe_tensor_dtype(H(self, "t:dtype")))
  end

  function M.device(self)
    return moe._device_str(C.moe_tensor_device(H(self, "t:device")))
  end

  function M.numel(self) return tonumber(C.moe_tensor_numel(H(self, "t:numel"))) end
  function M.ndim(self) return tonumber(C.moe_tensor_ndim(H(self, "t:ndim"))) end
  function M.nbytes(self) return tonumber(C.moe_tensor_nbytes(H(self, "t:nbytes"))) end
  function M.is_contiguous(self) return C.moe_tensor_is_contiguous(H(self, "t:is_contiguous")) ~= 0 end
  function M.is_cuda(self) return C.moe_tensor_device(H(self, "t:is_cuda")).type == CUDA end

  -- Raw address of element [1, ..., 1]; cast to ctype when given ("float*", "uint8_t*", ...).
  function M.data_ptr(self, ctype)
    local p = C.moe_tensor_data(H(self, "t:data_ptr"))
    if ctype ~= nil then return ffi.cast(ctype, p) end
    return p
  end

  -- Release the handle now (idempotent); the finaliser then does nothing.
  function M.free(self)
    if not moe.is_tensor(self) then
      error("t:free: self: expected a tensor (call it as t:free()), got " .. describe(self), 2)
    end
    local h = self.h
    if h ~= nil then
      self.h = nil
      C.moe_tensor_free(h)
    end
  end

  function M.is_freed(self) return self.h == nil end

  -- ------------------------------------------------------------------- views --

  function M.narrow(self, d, start, len)
    local fn = "t:narrow"
    local h = H(self, fn)
    local nd = C.moe_tensor_ndim(h)
    local d0 = dim_arg(d, nd, fn, "dim")
    local size = tonumber(C.moe_tensor_dim(h, d0))
    if not (is_int(start) and start >= 1 and start <= size + 1) then
      error(string.format("%s: start: expected an integer in 1..%d, got %s", fn, size + 1,
                          describe(start)), 2)
    end
    if not (is_int(len) and len >= 0 and start - 1 + len <= size) then
      error(string.format("%s: length: expected an integer in 0..%d, got %s", fn,
                          size - start + 1, describe(len)), 2)
    end
    return take(C.moe_tensor_narrow(out_box, h, d0, start - 1, len), fn)
  end

  function M.select(self, d, i)
    local fn = "t:select"
    local h = H(self, fn)
    local nd = C.moe_tensor_ndim(h)
    local d0 = dim_arg(d, nd, fn, "dim")
    local size = tonumber(C.moe_tensor_dim(h, d0))
    if not (is_int(i) and i >= 1 and i <= size) then
      error(string.format("%s: index: expected an integer in 1..%d, got %s", fn, size,
                          describe(i)), 2)
    end
    return take(C.moe_tensor_select(out_box, h, d0, i - 1), fn)
  end

  function M.transpose(self, a, b)
    local fn = "t:transpose"
    local h = H(self, fn)
    local nd = C.moe_tensor_ndim(h)
    if a == nil and b == nil and nd == 2 then a, b = 1, 2 end
    local d0 = dim_arg(a, nd, fn, "dim0")
    local d1 = dim_arg(b, nd, fn, "dim1")
    return take(C.moe_tensor_transpose(out_box, h, d0, d1), fn)
  end
  M.t = M.transpose

  function M.reshape(self, shape, ...)
    local fn = "t:reshape"
    local h = H(self, fn)
    if type(shape) == "number" then shape = { shape, ... } end
    local nd = parse_shape(shape, fn, "shape", true)
    if C.moe_tensor_is_contiguous(h) == 0 then
      error(fn .. ": self: expected a contiguous tensor (call :contiguous() first), got one with " ..
            "strides " .. describe(M.stride(self)), 2)
    end
    return take(C.moe_tensor_reshape(out_box, h, nd, shape_buf), fn)
  end
  M.view = M.reshape

  -- ------------------------------------------------------------------ copies --

  function M.clone(self)
    return take(C.moe_tensor_contiguous(out_box, H(self, "t:clone")), "t:clone")
  end

  -- Returns self when already contiguous, else a contiguous copy.
  function M.contiguous(self)
    local h = H(self, "t:contiguous")
    if C.moe_tensor_is_contiguous(h) ~= 0 then return self end
    return take(C.moe_tensor_contiguous(out_box, h), "t:contiguous")
  end

  local function is_device_string(x)
    return x == "cpu" or x == "cuda" or (type(x) == "string" and x:match("^cuda:%d+$") ~= nil)
  end

  -- t:to(device), t:to(dtype), t:to(device, dtype): always a new tensor.
  function M.to(self, a, b)
    local fn = "t:to"
    local h = H(self, fn)
    local dev, dtype
    if b ~= nil then
      dev = moe._device(a, fn, "device")
      dtype = moe._dtype(b, fn, "dtype")
    elseif type(a) == "cdata" or is_device_string(a) then
      dev = moe._device(a, fn, "device")
    elseif type(a) == "string" and C.moe_dtype_from_name(a) >= 0 then
      dtype = moe._dtype(a, fn, "dtype")
    elseif type(a) == "number" then
      dtype = moe._dtype(a, fn, "dtype")
    else
      C.moe_clear_error()
      error(string.format('%s: target: expected a device ("cpu", "cuda", "cuda:N") or a dtype ' ..
                          "name (%s), got %s", fn, table.concat(moe.dtypes, ", "), describe(a)), 2)
    end
    local cur = h
    local tmp
    if dev ~= nil then
      local cd = C.moe_tensor_device(h)
      if cd.type ~= dev.type or cd.index ~= dev.index or dtype == nil then
        tmp = take(C.moe_tensor_to_device(out_box, h, dev), fn)
        cur = tmp.h
      end
    end
    if dtype ~= nil then
      local r = take(C.moe_tensor_cast(out_box, cur, dtype), fn)
      if tmp then tmp:free() end
      return r
    end
    return tmp
  end

  -- Copy src's values into self (in place; self may be a view).  Shapes must match; dtypes
  -- and devices may differ (values are converted with the cast rules).
  function M.copy_(self, src)
    local fn = "t:copy_"
    local h = H(self, fn)
    if not moe.is_tensor(src) then
      error(fn .. ": src: expected a tensor, got " .. describe(src), 2)
    end
    local sh = src.h
    if sh == nil then error(fn .. ": src: tensor was freed", 2) end
    local same = C.moe_tensor_ndim(h) == C.moe_tensor_ndim(sh)
    if same then
      for i = 0, C.moe_tensor_ndim(h) - 1 do
        if C.moe_tensor_dim(h, i) ~= C.moe_tensor_dim(sh, i) then same = false break end
      end
    end
    if not same then
      error(string.format("%s: src: expected shape %s, got %s", fn, describe(M.shape(self)),
                          describe(M.shape(src))), 2)
    end
    if C.moe_tensor_dtype(h) == C.moe_tensor_dtype(sh) then
      check(C.moe_tensor_copy(h, sh), fn, 3)
    else
      local dd, sd = C.moe_tensor_device(h), C.moe_tensor_device(sh)
      if dd.type == sd.type and dd.index == sd.index then
        check(C.moe_tensor_cast_into(h, sh), fn, 3)
      else
        local tmp = take(C.moe_tensor_to_device(out_box, sh, dd), fn)
        local s2 = C.moe_tensor_cast_into(h, tmp.h)
        tmp:free()
        check(s2, fn, 3)
      end
    end
    return self
  end

  function M.fill_(self, v)
    local h = H(self, "t:fill_")
    v = check_number(v, "t:fill_", "value")
    check(C.moe_tensor_fill(h, v), "t:fill_")
    return self
  end

  -- --------------------------------------------------------------- element I/O --

  -- All values in row-major order as a double[n] (n = numel).
  local function read_all(h, fn)
    local n = tonumber(C.moe_tensor_numel(h))
    local buf = double_ct(math.max(n, 1))
    if n > 0 then check(C.moe_tensor_read_f64(h, buf, n), fn, 4) end
    return buf, n
  end

  local function is_bool(h) return C.moe_tensor_dtype(h) == C.MOE_BOOL end

  function M.totable(self)
    local fn = "t:totable"
    local h = H(self, fn)
    local buf, n = read_all(h, fn)
    local shape = M.shape(self)
    local boolean = is_bool(h)
    local function val(i)
      local v = buf[i]
      if boolean then return v ~= 0 end
      return v
    end
    if #shape == 0 then return val(0) end
    local pos = 0
    local function build(d)
      local r = {}
      if d == #shape then
        for i = 1, shape[d] do r[i] = val(pos); pos = pos + 1 end
      else
        for i = 1, shape[d] do r[i] = build(d + 1) end
      end
      return r
    end
    local _ = n
    return build(1)
  end

  function M.item(self)
    local fn = "t:item"
    local h = H(self, fn)
    local n = tonumber(C.moe_tensor_numel(h))
    if n ~= 1 then
      error(fn .. ": self: expected a tensor with one element, got " .. n .. " elements", 2)
    end
    local buf = read_all(h, fn)
    if is_bool(h) then return buf[0] ~= 0 end
    return buf[0]
  end

  -- Handle of the 0-d view at 1-based indices (caller frees it).
  local function element_handle(h, fn, ...)
    local nd = C.moe_tensor_ndim(h)
    local nidx = select("#", ...)
    if nidx ~= nd then
      error(string.format("%s: indices: expected %d indices, got %d", fn, nd, nidx), 3)
    end
    local cur = h
    -- packed 4-bit dtypes cannot select a single nibble: the last index narrows instead
    local packed = C.moe_dtype_bits(C.moe_tensor_dtype(h)) == 4
    for k = 1, nd do
      local i = select(k, ...)
      local size = tonumber(C.moe_tensor_dim(cur, 0))
      if not (is_int(i) and i >= 1 and i <= size) then
        if cur ~= h then C.moe_tensor_free(cur) end
        error(string.format("%s: index %d: expected an integer in 1..%d, got %s", fn, k, size,
                            describe(i)), 3)
      end
      local st2
      if packed and k == nd then
        st2 = C.moe_tensor_narrow(out_box, cur, 0, i - 1, 1)
      else
        st2 = C.moe_tensor_select(out_box, cur, 0, i - 1)
      end
      local nh = out_box[0]
      out_box[0] = nil
      if cur ~= h then C.moe_tensor_free(cur) end
      if st2 ~= 0 then check(st2, fn, 4) end
      cur = nh
    end
    if cur == h then
      -- 0-d tensor: a fresh handle so the caller can always free it
      C.moe_tensor_reshape(out_box, h, 0, shape_buf)
      cur = out_box[0]
      out_box[0] = nil
    end
    return cur
  end

  local one = double_ct(1)
  function M.get(self, ...)
    local fn = "t:get"
    local e = element_handle(H(self, fn), fn, ...)
    local st2 = C.moe_tensor_read_f64(e, one, 1)
    C.moe_tensor_free(e)
    check(st2, fn)
    if is_bool(self.h) then return one[0] ~= 0 end
    return one[0]
  end

  function M.set(self, v, ...)
    local fn = "t:set"
    local h = H(self, fn)
    v = check_number(v, fn, "value")
    local e = element_handle(h, fn, ...)
    local st2 = C.moe_tensor_fill(e, v)
    C.moe_tensor_free(e)
    check(st2, fn)
    return self
  end

  -- ---------------------------------------------------------------- printing --

  local EDGE = 3   -- elements shown at each end of a clipped dimension
  local CLIP = 6   -- dimensions longer than this are clipped

  local function fmt_value(v, float, boolean)
    if boolean then return v ~= 0 and "true" or "false" end
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    if not float then return string.format("%d", v) end
    if v % 1 == 0 and math.abs(v) < 1e8 then
      if v == 0 and 1 / v < 0 then return "-0." end
      return string.format("%d.", v)
    end
    local s = string.format("%.4g", v)
    return s
  end

  -- The values shown in a preview, read block by block so that a huge (or CUDA) tensor is
  -- never copied whole.  Returns a flat table indexed by preview position and the per-dim
  -- lists of shown indices (0-based, with false for "...").
  local function preview(h, fn)
    local nd = C.moe_tensor_ndim(h)
    local shown, clipped = {}, {}
    for d = 0, nd - 1 do
      local n = tonumber(C.moe_tensor_dim(h, d))
      local list = {}
      if n > CLIP then
        clipped[#clipped + 1] = d
        for i = 0, EDGE - 1 do list[#list + 1] = i end
        for i = n - EDGE, n - 1 do list[#list + 1] = i end
      else
        for i = 0, n - 1 do list[#list + 1] = i end
      end
      shown[d + 1] = list
    end
    local values = {}
    local nc = #clipped
    local is_clipped = {}
    for _, d in ipairs(clipped) do is_clipped[d] = true end
    for mask = 0, 2 ^ nc - 1 do
      -- narrow each clipped dim to its first or last EDGE elements
      local cur, owned = h, false
      local half = {}
      local m = mask
      for k = 1, nc do
        local d = clipped[k]
        local hb = m % 2
        m = (m - hb) / 2
        half[d] = hb
        local n = tonumber(C.moe_tensor_dim(cur, d))
        local st2 = C.moe_tensor_narrow(out_box, cur, d, hb == 0 and 0 or n - EDGE, EDGE)
        local nh = out_box[0]
        out_box[0] = nil
        if owned then C.moe_tensor_free(cur) end
        if st2 ~= 0 then check(st2, fn, 4) end
        cur, owned = nh, true
      end
      local cnt = tonumber(C.moe_tensor_numel(cur))
      local buf = double_ct(math.max(cnt, 1))
      local st2 = cnt > 0 and C.moe_tensor_read_f64(cur, buf, cnt) or 0
      if owned then C.moe_tensor_free(cur) end
      if st2 ~= 0 then check(st2, fn, 4) end
      -- scatter into preview positions (row-major over the block)
      local bdims = {}
      for d = 0, nd - 1 do bdims[d] = is_clipped[d] and EDGE or #shown[d + 1] end
      local idx = {}
      for d = 0, nd - 1 do idx[d] = 0 end
      for i = 0, cnt - 1 do
        local key = 0
        for d = 0, nd - 1 do
          local p = idx[d]
          if is_clipped[d] then p = half[d] * EDGE + p end
          key = key * #shown[d + 1] + p
        end
        values[key] = buf[i]
        for d = nd - 1, 0, -1 do
          idx[d] = idx[d] + 1
          if idx[d] < bdims[d] then break end
          idx[d] = 0
        end
      end
    end
    return values, shown, is_clipped
  end

  local shape_str = moe._shape_str

  function M.__tostring(self)
    if not moe.is_tensor(self) then return tostring(self) end
    local h = self.h
    if h == nil then return "tensor(<freed>)" end
    local nd = tonumber(C.moe_tensor_ndim(h))
    local dtype = C.moe_tensor_dtype(h)
    local float = C.moe_dtype_is_float(dtype) ~= 0
    local boolean = dtype == C.MOE_BOOL
    local shape = M.shape(self)
    local tail = string.format("shape=%s, dtype=%s, device=%s", shape_str(shape),
                               moe._dtype_name(dtype), M.device(self))
    local ok, values, shown, is_clipped = pcall(preview, h, "tostring")
    if not ok then return "tensor(<unreadable: " .. tostring(values) .. ">, " .. tail .. ")" end
    local strs, width = {}, 0
    for k, v in pairs(values) do
      local s = fmt_value(v, float, boolean)
      strs[k] = s
      if #s > width then width = #s end
    end
    local prefix = "tensor("
    if nd == 0 then return prefix .. (strs[0] or "?") .. ", " .. tail .. ")" end
    local function render(d, key, indent)
      local list = shown[d + 1]
      local n = #list
      if n == 0 then return "[]" end
      local parts = {}
      for j = 1, n do
        if is_clipped[d] and j == EDGE + 1 then parts[#parts + 1] = "..." end
        local k = key * n + (j - 1)
        if d == nd - 1 then
          local s = strs[k] or "?"
          parts[#parts + 1] = string.rep(" ", width - #s) .. s
        else
          parts[#parts + 1] = render(d + 1, k, indent .. " ")
        end
      end
      if d == nd - 1 then return "[" .. table.concat(parts, ", ") .. "]" end
      local sep = "," .. string.rep("\n", nd - d - 1) .. indent .. " "
      return "[" .. table.concat(parts, sep) .. "]"
    end
    local body = render(0, 0, string.rep(" ", #prefix))
    return prefix .. body .. ", " .. tail .. ")"
  end
end
