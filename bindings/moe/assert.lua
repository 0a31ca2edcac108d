-- moe.assert -- tensor and routing assertions for specs (luassert extensions).
--
--   require("moe.assert")     -- registers them with luassert (`moe spec` does this for you)
--   assert.tensor_near(actual, expected, {rtol = 1e-3, atol = 1e-5})
--   assert.tensor_equal(a, b)                  -- shape, dtype and bits (NaN equals NaN)
--   assert.same_routing(r1, r2)                -- ids per token compared as sets
--   assert.routing_disagreement_below(tr1, tr2, 0.01)
--   assert.is_not.tensor_near(a, b)            -- every assertion has its negation
--
-- Outside Busted the same checks raise plain errors: `moe.assert.tensor_near(a, b, opts)`
-- (this module is also a moe submodule: `require("moe.assert")(moe)` sets moe.assert), and
-- `moe.assert.check.tensor_near(a, b, opts)` returns ok, message without raising.
--
-- Values are read through moe_tensor_read_f64 (any dtype, any device).  Indices in
-- messages are 1-based, like the Lua tensor API.  A Lua number or nested table of numbers
-- is accepted wherever an "expected" tensor is (a number broadcasts in tensor_near).
local ffi = require("ffi")

local M = { check = {} }

local MAX_SHOW = 5

-- ---------------------------------------------------------------- helpers --

local function get_moe()
  local ok, moe = pcall(require, "moe")
  if ok then return moe end
  return nil
end

local function is_tensor(x)
  if type(x) ~= "cdata" then return false end
  local moe = get_moe()
  return moe ~= nil and moe.is_tensor(x)
end

local function describe(v)
  local moe = get_moe()
  if moe and moe._describe then return moe._describe(v) end
  return type(v) == "string" and string.format("%q", v) or tostring(v)
end

local function fmt_num(x)
  if x ~= x then return "nan" end
  if x == math.huge then return "inf" end
  if x == -math.huge then return "-inf" end
  if x == math.floor(x) and math.abs(x) < 1e15 then return string.format("%d", x) end
  return string.format("%.7g", x)
end

local function fmt_shape(shape)
  local p = {}
  for i = 1, #shape do p[i] = tostring(shape[i]) end
  return "[" .. table.concat(p, ", ") .. "]"
end

-- Row-major flat index (0-based) -> "[i, j, ...]" (1-based).
local function fmt_index(flat, shape)
  local n = #shape
  if n == 0 then return "[]" end
  local idx = {}
  for d = n, 1, -1 do
    local s = shape[d]
    idx[d] = (s > 0 and flat % s or 0) + 1
    flat = s > 0 and math.floor(flat / s) or 0
  end
  return "[" .. table.concat(idx, ", ") .. "]"
end

-- Shape of a nested table of numbers (rectangular), or nil, why.
local function table_shape(t, shape, depth)
  depth = depth or 1
  shape = shape or {}
  if type(t) == "number" then
    if shape[depth] ~= nil then return nil, "ragged nesting" end
    return shape
  end
  if type(t) ~= "table" then return nil, "expected numbers, found " .. type(t) end
  local n = #t
  if shape[depth] == nil then shape[depth] = n elseif shape[depth] ~= n then
    return nil, "ragged table (rows of different lengths)"
  end
  for i = 1, n do
    local ok, why = table_shape(t[i], shape, depth + 1)
    if not ok then return nil, why end
  end
  if n == 0 then shape.leaf_depth = depth end
  return shape
end

local function flatten(t, out)
  if type(t) == "number" then
    out[#out + 1] = t
  else
    for i = 1, #t do flatten(t[i], out) end
  end
  return out
end

-- Values of a tensor / number / nested table: { shape = {...}, n = N, v = double[N] (0-based),
-- dtype = "f32" or nil, tensor = t or nil }.  Misuse raises an error naming the argument.
local function values(x, fn, argname, level)
  level = (level or 1) + 1
  if is_tensor(x) then
    local moe = get_moe()
    local C = moe.C
    local h = x.h
    if h == nil then error(string.format("%s: %s: tensor was freed", fn, argname), level) end
    local nd = tonumber(C.moe_tensor_ndim(h))
    local shape = {}
    for d = 0, nd - 1 do shape[d + 1] = tonumber(C.moe_tensor_dim(h, d)) end
    local n = tonumber(C.moe_tensor_numel(h))
    local buf = ffi.new("double[?]", math.max(n, 1))
    local st = C.moe_tensor_read_f64(h, buf, n)
    if st ~= 0 then
      error(string.format("%s: %s: cannot read the tensor: %s", fn, argname,
                          ffi.string(C.moe_last_error())), level)
    end
    return { shape = shape, n = n, v = buf,
             dtype = ffi.string(C.moe_dtype_name(C.moe_tensor_dtype(h))), tensor = x }
  end
  if type(x) == "number" or type(x) == "table" then
    local shape, why = table_shape(x)
    if not shape then
      error(string.format("%s: %s: expected a tensor, a number or a nested table of numbers (%s), got %s",
                          fn, argname, why, describe(x)), level)
    end
    local depth = shape.leaf_depth
    shape.leaf_depth = nil
    if depth then -- an empty table at some level: trailing dims are unknown, take 0
      for d = #shape + 1, depth do shape[d] = 0 end
    end
    local flat = flatten(x, {})
    local buf = ffi.new("double[?]", math.max(#flat, 1))
    for i = 1, #flat do buf[i - 1] = flat[i] end
    return { shape = shape, n = #flat, v = buf, scalar = type(x) == "number" }
  end
  error(string.format("%s: %s: expected a tensor, a number or a nested table of numbers, got %s",
                      fn, argname, describe(x)), level)
end

local function same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

local function dtype_str(v) return v.dtype or "lua" end

local function check_opts(opts, fn, known, level)
  level = (level or 1) + 1
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(string.format("%s: opts: expected a table such as {rtol = 1e-5, atol = 1e-8}, got %s",
                        fn, describe(opts)), level)
  end
  for k, v in pairs(opts) do
    local want = known[k]
    if not want then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      table.sort(names)
      error(string.format("%s: opts.%s: unknown option (known: %s)", fn, tostring(k),
                          table.concat(names, ", ")), level)
    end
    if want == "number" and not (type(v) == "number" and v >= 0 and v == v) then
      error(string.format("%s: opts.%s: expected a non-negative number, got %s", fn, k,
                          describe(v)), level)
    elseif want == "boolean" and type(v) ~= "boolean" then
      error(string.format("%s: opts.%s: expected a boolean, got %s", fn, k, describe(v)), level)
    elseif want == "count" and not (type(v) == "number" and v >= 1 and v % 1 == 0) then
      error(string.format("%s: opts.%s: expected a positive integer, got %s", fn, k,
                          describe(v)), level)
    end
  end
  return opts
end

-- ------------------------------------------------------------ tensor_near --

local NEAR_OPTS = { rtol = "number", atol = "number", equal_nan = "boolean", show = "count" }

-- |actual - expected| <= atol + rtol * |expected| element-wise (numpy.allclose).  Defaults
-- rtol = 1e-5, atol = 1e-8, equal_nan = false.  Returns ok, detail.
function M.check.tensor_near(actual, expected, opts, level)
  local fn = "tensor_near"
  level = (level or 1) + 1
  opts = check_opts(opts, fn, NEAR_OPTS, level)
  local rtol, atol = opts.rtol or 1e-5, opts.atol or 1e-8
  local equal_nan, show = opts.equal_nan or false, opts.show or MAX_SHOW
  local a = values(actual, fn, "actual", level)
  local e = values(expected, fn, "expected", level)
  local tolstr = string.format("rtol=%s, atol=%s", fmt_num(rtol), fmt_num(atol))
  local broadcast = e.scalar and e.n == 1
  if not broadcast and not same_shape(a.shape, e.shape) then
    return false, string.format("shape mismatch: actual %s (%s) vs expected %s (%s)",
                                fmt_shape(a.shape), dtype_str(a), fmt_shape(e.shape), dtype_str(e))
  end
  local n = a.n
  local worst = {} -- up to `show` entries {i, score}, sorted by score descending
  local nbad, nnan, max_abs, max_rel = 0, 0, 0, 0
  local na2, ne2, nd2 = 0, 0, 0
  local av, ev = a.v, e.v
  for i = 0, n - 1 do
    local x = av[i]
    local y = broadcast and ev[0] or ev[i]
    local bad, score
    if x ~= x or y ~= y then
      bad = not (equal_nan and x ~= x and y ~= y)
      if bad then nnan = nnan + 1 end
      score = math.huge
    elseif x == y then
      bad = false
    else
      local d = math.abs(x - y)
      local tol = atol + rtol * math.abs(y)
      bad = not (d <= tol)
      if d > max_abs then max_abs = d end
      local r = y ~= 0 and d / math.abs(y) or math.huge
      if r > max_rel then max_rel = r end
      score = tol > 0 and d / tol or math.huge
      if d ~= math.huge then nd2 = nd2 + d * d end
    end
    if x == x and math.abs(x) ~= math.huge then na2 = na2 + x * x end
    if y == y and math.abs(y) ~= math.huge then ne2 = ne2 + y * y end
    if bad then
      nbad = nbad + 1
      if #worst < show or score > worst[#worst][2] then
        local pos = #worst < show and #worst + 1 or #worst
        worst[pos] = { i, score }
        while pos > 1 and worst[pos][2] > worst[pos - 1][2] do
          worst[pos], worst[pos - 1] = worst[pos - 1], worst[pos]
          pos = pos - 1
        end
      end
    end
  end
  local na, ne, nd = math.sqrt(na2), math.sqrt(ne2), math.sqrt(nd2)
  local norms = string.format("norms: |actual| = %s, |expected| = %s, |actual - expected| = %s (relative %s)",
                              fmt_num(na), fmt_num(ne), fmt_num(nd),
                              ne > 0 and fmt_num(nd / ne) or "n/a")
  local head = string.format("shape %s, dtype %s vs %s (%s%s)", fmt_shape(a.shape), dtype_str(a),
                             broadcast and "scalar" or dtype_str(e), tolstr,
                             equal_nan and ", equal_nan" or "")
  if nbad == 0 then
    return true, string.format("%s\nall %d elements within tolerance (max abs err %s, max rel err %s)\n%s",
                               head, n, fmt_num(max_abs), fmt_num(max_rel), norms)
  end
  local lines = { head,
                  string.format("%d of %d elements over tolerance; worst:", nbad, n) }
  lines[#lines + 1] = string.format("  %-16s %14s %14s %12s %12s", "index", "actual", "expected",
                                    "abs err", "rel err")
  for _, w in ipairs(worst) do
    local i = w[1]
    local x, y = av[i], broadcast and ev[0] or ev[i]
    local d = math.abs(x - y)
    lines[#lines + 1] = string.format("  %-16s %14s %14s %12s %12s", fmt_index(i, a.shape),
                                      fmt_num(x), fmt_num(y), fmt_num(d),
                                      y ~= 0 and fmt_num(d / math.abs(y)) or "inf")
  end
  lines[#lines + 1] = string.format("max abs err %s, max rel err %s%s", fmt_num(max_abs),
                                    fmt_num(max_rel), nnan > 0 and
                                    string.format(" (over non-NaN pairs; %d NaN mismatch%s)",
                                                  nnan, nnan == 1 and "" or "es") or "")
  lines[#lines + 1] = norms
  return false, table.concat(lines, "\n")
end

-- ----------------------------------------------------------- tensor_equal --

local function bits_equal(x, y)
  if x ~= x then return y ~= y end -- NaN equals NaN
  if x ~= y then return false end
  if x == 0 then return 1 / x == 1 / y end -- -0 and +0 differ in their bits
  return true
end

-- Raw bytes of a tensor (contiguous host copy) as a Lua string.
local function raw_bytes(t)
  local moe = get_moe()
  local C = moe.C
  local box = ffi.new("moe_tensor*[1]")
  local st = C.moe_tensor_contiguous(box, t.h)
  if st ~= 0 then return nil end
  local c = box[0]
  local nb = tonumber(C.moe_tensor_nbytes(c))
  local buf = ffi.new("uint8_t[?]", math.max(nb, 1))
  st = C.moe_tensor_copy_to_host(c, buf, nb)
  C.moe_tensor_free(c)
  if st ~= 0 then return nil end
  return ffi.string(buf, nb)
end

-- Same shape, same dtype (when both are tensors) and bit-equal values, except that any
-- NaN equals any NaN.  Returns ok, detail.
function M.check.tensor_equal(a, b, level)
  local fn = "tensor_equal"
  level = (level or 1) + 1
  local va = values(a, fn, "a", level)
  local vb = values(b, fn, "b", level)
  if not same_shape(va.shape, vb.shape) then
    return false, string.format("shape mismatch: %s (%s) vs %s (%s)", fmt_shape(va.shape),
                                dtype_str(va), fmt_shape(vb.shape), dtype_str(vb))
  end
  if va.dtype and vb.dtype and va.dtype ~= vb.dtype then
    return false, string.format("dtype mismatch: %s vs %s (shape %s)", va.dtype, vb.dtype,
                                fmt_shape(va.shape))
  end
  local head = string.format("shape %s, dtype %s vs %s", fmt_shape(va.shape), dtype_str(va),
                             dtype_str(vb))
  local diffs, ndiff = {}, 0
  for i = 0, va.n - 1 do
    if not bits_equal(va.v[i], vb.v[i]) then
      ndiff = ndiff + 1
      if #diffs < MAX_SHOW then diffs[#diffs + 1] = i end
    end
  end
  -- 64-bit integers above 2^53 are not exact as doubles: compare their bytes too.
  if ndiff == 0 and va.tensor and vb.tensor and va.dtype == "i64" then
    local ra, rb = raw_bytes(va.tensor), raw_bytes(vb.tensor)
    if ra and rb and ra ~= rb then
      return false, head .. "\nvalues differ beyond double precision (64-bit integers above 2^53)"
    end
  end
  if ndiff == 0 then
    return true, string.format("%s\nall %d elements equal", head, va.n)
  end
  local lines = { head, string.format("%d of %d elements differ; first:", ndiff, va.n) }
  for _, i in ipairs(diffs) do
    lines[#lines + 1] = string.format("  %-16s %16s vs %-16s", fmt_index(i, va.shape),
                                      fmt_num(va.v[i]) .. (va.v[i] == 0 and 1 / va.v[i] < 0 and " (-0)" or ""),
                                      fmt_num(vb.v[i]) .. (vb.v[i] == 0 and 1 / vb.v[i] < 0 and " (-0)" or ""))
  end
  return false, table.concat(lines, "\n")
end

-- ----------------------------------------------------------- same_routing --

-- ids [T, K] of a routing result {ids = ...}, a tensor or a nested table.
local function routing_ids(x, fn, argname, level)
  level = (level or 1) + 1
  local src = x
  if type(x) == "table" and x.ids ~= nil then src = x.ids end
  if type(src) == "number" then
    error(string.format("%s: %s: expected ids [T, K] (a tensor, a nested table or a routing result {ids = ...}), got %s",
                        fn, argname, describe(x)), level)
  end
  local v = values(src, fn, argname, level)
  if #v.shape ~= 2 then
    error(string.format("%s: %s: expected ids of shape [T, K], got shape %s", fn, argname,
                        fmt_shape(v.shape)), level)
  end
  return v
end

local function row_set(v, t, k)
  local s = {}
  for j = 0, k - 1 do s[j + 1] = v.v[t * k + j] end
  table.sort(s)
  return s
end

local function fmt_set(s)
  local p = {}
  for i = 1, #s do p[i] = fmt_num(s[i]) end
  return "{" .. table.concat(p, ", ") .. "}"
end

-- Multiset difference a - b of two sorted lists.
local function minus(a, b)
  local out, j = {}, 1
  for i = 1, #a do
    while j <= #b and b[j] < a[i] do j = j + 1 end
    if j <= #b and b[j] == a[i] then j = j + 1 else out[#out + 1] = a[i] end
  end
  return out
end

-- Same expert ids per token, in any order within the token.  Returns ok, detail.
function M.check.same_routing(a, b, level)
  local fn = "same_routing"
  level = (level or 1) + 1
  local va = routing_ids(a, fn, "a", level)
  local vb = routing_ids(b, fn, "b", level)
  if not same_shape(va.shape, vb.shape) then
    return false, string.format("shape mismatch: ids %s vs %s ([T, K])", fmt_shape(va.shape),
                                fmt_shape(vb.shape))
  end
  local T, K = va.shape[1], va.shape[2]
  local ndiff, lines = 0, {}
  for t = 0, T - 1 do
    local sa, sb = row_set(va, t, K), row_set(vb, t, K)
    local same = true
    for j = 1, K do if sa[j] ~= sb[j] then same = false break end end
    if not same then
      ndiff = ndiff + 1
      if #lines < MAX_SHOW then
        lines[#lines + 1] = string.format("  token %d: %s vs %s (only in a: %s; only in b: %s)",
                                          t + 1, fmt_set(sa), fmt_set(sb),
                                          fmt_set(minus(sa, sb)), fmt_set(minus(sb, sa)))
      end
    end
  end
  if ndiff == 0 then
    return true, string.format("all %d tokens route to the same %d experts", T, K)
  end
  table.insert(lines, 1, string.format("%d of %d tokens route differently (K = %d); first:",
                                       ndiff, T, K))
  return false, table.concat(lines, "\n")
end

-- ---------------------------------------------- routing_disagreement_below --

-- moe.trace.compare(a, b).router_disagreement < x.  A per-layer table is reduced to its
-- maximum.  Returns ok, detail.
function M.check.routing_disagreement_below(a, b, x, level)
  local fn = "routing_disagreement_below"
  level = (level or 1) + 1
  if type(x) ~= "number" or x ~= x then
    error(string.format("%s: x: expected a number (the bound), got %s", fn, describe(x)), level)
  end
  local moe = get_moe()
  local trace = moe and moe.trace
  if type(trace) ~= "table" or type(trace.compare) ~= "function" then
    error(fn .. ": moe.trace is not available (it provides moe.trace.compare)", level)
  end
  local cmp = trace.compare(a, b)
  local d = cmp and cmp.router_disagreement
  local value, where = nil, ""
  if type(d) == "number" then
    value = d
  elseif type(d) == "cdata" then
    value = tonumber(d)
  elseif type(d) == "table" then
    for k, v in pairs(d) do
      if type(v) == "number" and (value == nil or v > value) then
        value, where = v, string.format(" (largest, at layer %s)", tostring(k))
      end
    end
  end
  if value == nil then
    error(string.format("%s: moe.trace.compare(a, b).router_disagreement: expected a number, got %s",
                        fn, describe(d)), level)
  end
  local ok = value < x
  return ok, string.format("router disagreement %s%s %s %s", fmt_num(value), where,
                           ok and "is below" or "is not below", fmt_num(x))
end

-- ------------------------------------------------------- plain-error API --

-- moe.assert.tensor_near(a, b, opts [, message]) etc.: raise an error on failure.
local function raising(name, nargs)
  return function(...)
    local args = { n = select("#", ...), ... }
    local ok, detail
    if nargs == 2 then
      ok, detail = M.check[name](args[1], args[2], 3)
    else
      ok, detail = M.check[name](args[1], args[2], args[3], 3)
    end
    if not ok then
      local msg = args[nargs + 1]
      error((msg and (tostring(msg) .. "\n") or "") .. name .. " failed:\n" .. detail, 2)
    end
    return true
  end
end
M.tensor_near = raising("tensor_near", 3)
M.tensor_equal = raising("tensor_equal", 2)
M.same_routing = raising("same_routing", 2)
M.routing_disagreement_below = raising("routing_disagreement_below", 3)

-- -------------------------------------------------------- luassert glue --

local MESSAGES = {
  tensor_near = { "Expected tensors to be near.", "Expected tensors not to be near." },
  tensor_equal = { "Expected tensors to be equal.", "Expected tensors not to be equal." },
  same_routing = { "Expected the same routing.", "Expected different routing." },
  routing_disagreement_below = { "Expected the router disagreement to be below the bound.",
                                 "Expected the router disagreement not to be below the bound." },
}
local NARGS = { tensor_near = 3, tensor_equal = 2, same_routing = 2, routing_disagreement_below = 3 }

-- Register the assertions with luassert (idempotent).  Returns luassert's assert.
function M.register()
  local ok, luassert = pcall(require, "luassert")
  if not ok then return nil, "luassert is not installed" end
  local say = require("say")
  for name, msgs in pairs(MESSAGES) do
    local pos, neg = "assertion." .. name .. ".positive", "assertion." .. name .. ".negative"
    say:set(pos, msgs[1] .. "\n%s")
    say:set(neg, msgs[2] .. "\n%s")
    local nargs = NARGS[name]
    luassert:register("assertion", name, function(state, arguments, level)
      level = (level or 1) + 1
      local ok2, detail
      if nargs == 2 then
        ok2, detail = M.check[name](arguments[1], arguments[2], level)
      else
        ok2, detail = M.check[name](arguments[1], arguments[2], arguments[3], level)
      end
      local user_msg = arguments[nargs + 1]
      if user_msg ~= nil then state.failure_message = user_msg end
      for i = 1, arguments.n or nargs + 1 do arguments[i] = nil end
      arguments[1] = detail
      arguments.n = 1
      arguments.nofmt = { true }
      return ok2
    end, pos, neg)
  end
  return luassert
end

M.register()

-- As a moe submodule: require("moe.assert")(moe) installs moe.assert.
return setmetatable(M, {
  __call = function(self, moe)
    moe.assert = self
    return self
  end,
})
