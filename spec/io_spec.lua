-- moe.load / moe.save: .npy and safetensors round trips, a plain-Lua reader that proves our
-- safetensors files follow the format (no engine code involved), malformed files -> errors
-- with the right words, and misuse of the Lua API.
local ffi = require("ffi")
local moe = require("moe")
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")
local error_of = H.error_of

local function has(s, sub) return s ~= nil and s:find(sub, 1, true) ~= nil end

local base = os.tmpname() -- a fresh file name; ours are base .. suffix
local made = { base }
local function tmp(suffix)
  local p = base .. suffix
  made[#made + 1] = p
  return p
end

local function write_bytes(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function raw(t) return ffi.string(t:data_ptr(), t:nbytes()) end

local function u64le(n)
  local b = {}
  for i = 1, 8 do
    b[i] = string.char(n % 256)
    n = math.floor(n / 256)
  end
  return table.concat(b)
end

local function st_file(header, data) return u64le(#header) .. header .. (data or "") end

teardown(function()
  for _, p in ipairs(made) do os.remove(p) end
end)

-- ------------------------------------------------------------ plain-Lua JSON --
-- Just enough JSON for a safetensors header: objects (key order kept), arrays, strings with
-- the escapes a writer may use, integers.  Written here so that the check does not depend on
-- the engine's reader.
local function json_decode(s)
  local pos = 1
  local function ws() pos = s:find("[^ \t\r\n]", pos) or #s + 1 end
  local value
  local function str()
    assert(s:sub(pos, pos) == '"', "string expected at " .. pos)
    pos = pos + 1
    local out = {}
    while true do
      local c = s:sub(pos, pos)
      assert(c ~= "", "unterminated string")
      if c == '"' then pos = pos + 1 break end
      if c == "\\" then
        local e = s:sub(pos + 1, pos + 1)
        local simple = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", n = "\n", r = "\r", t = "\t",
                         b = "\b", f = "\f" }
        if simple[e] then
          out[#out + 1] = simple[e]
          pos = pos + 2
        else
          assert(e == "u", "bad escape")
          local cp = tonumber(s:sub(pos + 2, pos + 5), 16)
          assert(cp and cp < 0x80, "test reader: only ASCII \\u escapes expected")
          out[#out + 1] = string.char(cp)
          pos = pos + 6
        end
      else
        out[#out + 1] = c
        pos = pos + 1
      end
    end
    return table.concat(out)
  end
  function value()
    ws()
    local c = s:sub(pos, pos)
    if c == "{" then
      pos = pos + 1
      local obj, keys = {}, {}
      ws()
      if s:sub(pos, pos) == "}" then pos = pos + 1 return { obj = obj, keys = keys } end
      while true do
        ws()
        local k = str()
        ws()
        assert(s:sub(pos, pos) == ":")
        pos = pos + 1
        assert(obj[k] == nil, "duplicate key " .. k)
        obj[k] = value()
        keys[#keys + 1] = k
        ws()
        local d = s:sub(pos, pos)
        pos = pos + 1
        if d == "}" then break end
        assert(d == ",", "expected , or }")
      end
      return { obj = obj, keys = keys }
    elseif c == "[" then
      pos = pos + 1
      local arr = {}
      ws()
      if s:sub(pos, pos) == "]" then pos = pos + 1 return arr end
      while true do
        arr[#arr + 1] = value()
        ws()
        local d = s:sub(pos, pos)
        pos = pos + 1
        if d == "]" then break end
        assert(d == ",", "expected , or ]")
      end
      return arr
    elseif c == '"' then
      return str()
    else
      local num = s:match("^-?%d+", pos)
      assert(num, "number expected at " .. pos)
      pos = pos + #num
      return tonumber(num)
    end
  end
  local v = value()
  ws()
  assert(pos == #s + 1, "trailing bytes in header")
  return v
end

-- bits per element of each safetensors dtype name (from the format's documentation)
local ST_BITS = { BOOL = 8, U8 = 8, I8 = 8, I16 = 16, U16 = 16, I32 = 32, U32 = 32, I64 = 64,
                  U64 = 64, F16 = 16, BF16 = 16, F32 = 32, F64 = 64, F8_E4M3 = 8,
                  F8_E5M2 = 8, F8_E8M0 = 8, F4 = 4 }

-- Read a safetensors file with plain Lua: returns entries (name -> {dtype, shape, bytes}),
-- metadata, header length, header text, entry order.
local function plain_read(path)
  local s = read_bytes(path)
  assert(#s >= 8, "file shorter than 8 bytes")
  local n = 0
  for i = 8, 1, -1 do n = n * 256 + s:byte(i) end
  assert(8 + n <= #s, "header longer than the file")
  local header = s:sub(9, 8 + n)
  local root = json_decode(header)
  local data = s:sub(9 + n)
  local entries, spans = {}, {}
  local meta
  for _, name in ipairs(root.keys) do
    local e = root.obj[name]
    if name == "__metadata__" then
      meta = {}
      for _, k in ipairs(e.keys) do
        assert(type(e.obj[k]) == "string", "metadata values are strings")
        meta[k] = e.obj[k]
      end
    else
      local dt, shape, off = e.obj.dtype, e.obj.shape, e.obj.data_offsets
      assert(ST_BITS[dt], "known dtype " .. tostring(dt))
      assert(#off == 2 and off[1] <= off[2], "2 ordered offsets")
      local numel = 1
      for _, d in ipairs(shape) do numel = numel * d end
      assert(off[2] - off[1] == numel * ST_BITS[dt] / 8, "byte count of " .. name)
      entries[name] = { dtype = dt, shape = shape, bytes = data:sub(off[1] + 1, off[2]),
                        begin = off[1] }
      spans[#spans + 1] = off
    end
  end
  -- the reference implementation requires the entries to cover the data section exactly
  table.sort(spans, function(a, b) return a[1] < b[1] end)
  local at = 0
  for _, sp in ipairs(spans) do
    assert(sp[1] == at, "entries must be contiguous (no gap, no overlap)")
    at = sp[2]
  end
  assert(at == #data, "entries must cover the whole data section")
  return entries, meta, n, header, root.keys
end

-- -------------------------------------------------------------------- specs --

local function sample(dtype)
  if dtype == "bool" then return moe.tensor({ { 1, 0, 1 }, { 0, 0, 1 } }, { dtype = dtype }) end
  if dtype == "u8" then return moe.tensor({ { 0, 7, 255 }, { 1, 2, 3 } }, { dtype = dtype }) end
  return moe.tensor({ { 1, -2, 3 }, { 4.5, -0.25, 96 } }, { dtype = dtype })
end

describe("moe.save / moe.load of .npy", function()
  for _, dt in ipairs{ "f32", "f16", "bf16", "i8", "i16", "i32", "i64", "u8", "bool" } do
    it("round-trips " .. dt, function()
      local t = sample(dt)
      local p = tmp("_" .. dt .. ".npy")
      moe.save(p, t)
      local r = moe.load(p)
      assert.equal(dt, r:dtype())
      assert.same(t:shape(), r:shape())
      assert.equal("cpu", r:device())
      assert.same(t:totable(), r:totable())
      assert.equal(raw(t), raw(r))
    end)
  end

  it("writes a standard header (numpy's layout) and the raw bytes", function()
    local t = moe.randn({ 5, 7 }, { seed = 3 })
    local p = tmp("_hdr.npy")
    moe.save(p, t)
    local s = read_bytes(p)
    assert.equal("\147NUMPY\1\0", s:sub(1, 8))
    local hl = s:byte(9) + 256 * s:byte(10)
    assert.equal(0, (10 + hl) % 64)
    local hdr = s:sub(11, 10 + hl)
    assert.truthy(has(hdr, "'descr': '<f4'"))
    assert.truthy(has(hdr, "'fortran_order': False"))
    assert.truthy(has(hdr, "'shape': (5, 7)"))
    assert.equal("\n", hdr:sub(-1))
    assert.equal(raw(t), s:sub(11 + hl))
  end)

  it("saves views and reads back their values", function()
    local t = moe.arange(12, { dtype = "i32" }):reshape({ 3, 4 }):transpose(1, 2)
    local p = tmp("_view.npy")
    moe.save(p, t)
    assert.same(t:totable(), moe.load(p):totable())
  end)

  it("keeps the file unchanged when a loaded tensor is written", function()
    local p = tmp("_cow.npy")
    moe.save(p, moe.full({ 4 }, 2))
    local a = moe.load(p)
    a:fill_(9)
    assert.same({ 2, 2, 2, 2 }, moe.load(p):totable())
  end)
end)

describe("moe.save / moe.load of safetensors", function()
  it("round-trips every dtype with metadata", function()
    local tensors = {}
    for _, dt in ipairs{ "f32", "f16", "bf16", "f8_e4m3", "f8_e5m2", "ue8m0", "u8", "i8", "i16",
                         "i32", "i64", "bool" } do
      tensors["t_" .. dt] = sample(dt)
    end
    tensors.t_e2m1 = moe.tensor({ { 0.5, -1, 6, 0 }, { 1.5, 2, -3, 4 } }, { dtype = "e2m1" })
    tensors.t_i4 = moe.tensor({ { -8, 7, 0, 1 }, { 2, -3, 4, -5 } }, { dtype = "i4" })
    local p = tmp("_all.safetensors")
    moe.save(p, tensors, { model = "qwen3-30b-a3b", seed = 7, ok = true, ["quote\"s"] = "a\nb" })
    local r, meta = moe.load(p)
    assert.same({ model = "qwen3-30b-a3b", seed = "7", ok = "true", ["quote\"s"] = "a\nb" }, meta)
    local n = 0
    for name, t in pairs(tensors) do
      n = n + 1
      local g = r[name]
      assert.is_not_nil(g, name)
      assert.equal(t:dtype(), g:dtype())
      assert.same(t:shape(), g:shape())
      assert.equal(raw(t), raw(g))
      assert.same(t:totable(), g:totable())
    end
    local m = 0
    for _ in pairs(r) do m = m + 1 end
    assert.equal(n, m)
  end)

  it("writes a standard file that plain Lua can read (no engine code)", function()
    local w = moe.randn({ 3, 5 }, { seed = 1 })
    local ids = moe.tensor({ { 1, 2 }, { 3, 4 }, { 5, 6 } }, { dtype = "i16" })
    local b = moe.tensor({ 1, 0, 1 }, { dtype = "bool" })
    local big = moe.tensor({ 1, -1 }, { dtype = "i64" })
    local q = moe.tensor({ { -1, 2, 3, 4 } }, { dtype = "i4" })
    local fp4 = moe.tensor({ { 0.5, 1, 1.5, 2, 3, 4 } }, { dtype = "e2m1" })
    local p = tmp("_plain.safetensors")
    moe.save(p, { w = w, ids = ids, b = b, big = big, q = q, fp4 = fp4 }, { note = "hello" })
    local e, meta, hlen, header = plain_read(p)
    assert.equal(0, hlen % 8)
    assert.truthy(header:match("^{.-} *$"))
    assert.equal("hello", meta.note)
    assert.equal("i4", meta["moe_dtype.q"]) -- the marker the reader honours
    assert.same({ dtype = "F32", shape = { 3, 5 } }, { dtype = e.w.dtype, shape = e.w.shape })
    assert.equal(raw(w), e.w.bytes)
    assert.same({ "I16", { 3, 2 } }, { e.ids.dtype, e.ids.shape })
    assert.equal(raw(ids), e.ids.bytes)
    assert.same({ "BOOL", { 3 } }, { e.b.dtype, e.b.shape })
    assert.equal("\1\0\1", e.b.bytes)
    assert.same({ "I64", { 2 } }, { e.big.dtype, e.big.shape })
    assert.equal("\1\0\0\0\0\0\0\0\255\255\255\255\255\255\255\255", e.big.bytes)
    -- i4: U8 bytes, last dimension halved; nibbles low first: -1 -> 0xF, 2; 3, 4
    assert.same({ "U8", { 1, 2 } }, { e.q.dtype, e.q.shape })
    assert.equal(string.char(0x2F, 0x43), e.q.bytes)
    -- F4 keeps the element shape; e2m1 codes 0.5=1 1=2 1.5=3 2=4 3=5 4=6
    assert.same({ "F4", { 1, 6 } }, { e.fp4.dtype, e.fp4.shape })
    assert.equal(string.char(0x21, 0x43, 0x65), e.fp4.bytes)
    -- every tensor starts on a multiple of its element size
    for _, x in pairs(e) do
      local size = math.max(1, ST_BITS[x.dtype] / 8)
      assert.equal(0, (8 + hlen + x.begin) % size)
    end
  end)

  it("stores a lone tensor as \"tensor\"", function()
    local p = tmp("_one.safetensors")
    local t = moe.arange(6, { dtype = "i32" })
    moe.save(p, t)
    local r, meta = moe.load(p)
    assert.same(t:totable(), r.tensor:totable())
    assert.same({}, meta)
    assert.equal(moe.io.single_name, "tensor")
  end)

  it("reads files written by others: header order, unaligned data, widened dtypes", function()
    -- U16 at 0 (2 bytes) then F32 at 2 (unaligned) then F64 at 6
    local data = string.char(0xFF, 0xFF) .. string.char(0, 0, 0x20, 0x40) -- 65535; 2.5f
      .. string.char(0, 0, 0, 0, 0, 0, 0xF0, 0x3F) -- 1.0 as double
    local hdr = '{"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]},' ..
      '"a":{"dtype":"U16","shape":[1],"data_offsets":[0,2]},' ..
      '"c":{"dtype":"F64","shape":[],"data_offsets":[6,14]}}'
    local p = tmp("_other.safetensors")
    write_bytes(p, st_file(hdr, data))
    local r = moe.load(p)
    assert.equal("i32", r.a:dtype())
    assert.same({ 65535 }, r.a:totable())
    assert.same({ 2.5 }, r.b:totable())
    assert.equal("f32", r.c:dtype())
    assert.equal(1, r.c:item())
  end)
end)

describe("malformed files", function()
  local function load_err(suffix, bytes)
    local p = tmp(suffix)
    write_bytes(p, bytes)
    local err = error_of(moe.load, p)
    assert.is_not_nil(err, "expected an error for " .. suffix)
    assert.truthy(has(err, "moe.load: "), err)
    assert.truthy(has(err, p), err)
    return err
  end
  local E = function(name, dt, shape, b, e)
    return string.format('"%s":{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}', name, dt,
                         shape, b, e)
  end

  it("safetensors: truncated, header too long, bad JSON, offsets, dtype, byte counts", function()
    local z = string.rep("\0", 16)
    assert.truthy(has(load_err("_t1.safetensors", "\3\0\0"), "shorter than the 8-byte"))
    assert.truthy(has(load_err("_t2.safetensors", u64le(1000) .. "{}"),
                      "header length 1000 exceeds file size 10"))
    assert.truthy(has(load_err("_t3.safetensors", st_file('{"a":', z)), "not valid JSON"))
    assert.truthy(has(load_err("_t4.safetensors", st_file("[1]", z)), "not a JSON object"))
    assert.truthy(has(load_err("_t5.safetensors",
      st_file("{" .. E("a", "F32", "[2]", 0, 8) .. "," .. E("b", "F32", "[1]", 4, 8) .. "}", z)),
      "overlap"))
    assert.truthy(has(load_err("_t6.safetensors",
      st_file("{" .. E("a", "F32", "[8]", 0, 32) .. "}", z)), "beyond the data size"))
    assert.truthy(has(load_err("_t7.safetensors",
      st_file("{" .. E("a", "X9", "[1]", 0, 4) .. "}", z)), "unknown dtype 'X9'"))
    assert.truthy(has(load_err("_t8.safetensors",
      st_file("{" .. E("a", "F32", "[3]", 0, 8) .. "}", z)), "byte count mismatch"))
    assert.truthy(has(load_err("_t9.safetensors",
      st_file('{"a":{"dtype":"F32","shape":[1]}}', z)), 'missing "data_offsets"'))
    assert.truthy(has(load_err("_t10.safetensors",
      st_file('{"__metadata__":{"k":5}}', z)), "must be a string"))
  end)

  it("npy: bad magic, header too long, fortran order, big-endian, unknown dtype", function()
    local function npy(dict, data)
      local hl = #dict + 1
      hl = hl + (64 - (10 + hl) % 64) % 64
      return "\147NUMPY\1\0" .. string.char(hl % 256, math.floor(hl / 256)) .. dict ..
        string.rep(" ", hl - #dict - 1) .. "\n" .. (data or "")
    end
    assert.truthy(has(load_err("_n1.npy", "\147NUMPZ\1\0\0\0"), "magic"))
    assert.truthy(has(load_err("_n2.npy", "\147NUMPY\1\0\232\3" .. string.rep(" ", 70)),
                      "header length 1000 exceeds file size 80"))
    assert.truthy(has(load_err("_n3.npy",
      npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", string.rep("\0", 8))),
      "fortran_order"))
    assert.truthy(has(load_err("_n4.npy",
      npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", string.rep("\0", 8))),
      "big-endian"))
    assert.truthy(has(load_err("_n5.npy",
      npy("{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }", string.rep("\0", 16))),
      "unsupported dtype"))
    assert.truthy(has(load_err("_n6.npy",
      npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", string.rep("\0", 8))),
      "too short"))
  end)

  it("missing files", function()
    local err = error_of(moe.load, tmp("_missing.npy"))
    assert.truthy(has(err, "No such file"), err)
  end)
end)

describe("misuse of moe.load / moe.save", function()
  local t = moe.zeros({ 2 })
  local this_file = "io_spec.lua:"

  it("names the argument and points at the caller", function()
    local err = error_of(moe.load, 42)
    assert.truthy(has(err, "moe.load: path: expected a string, got 42"), err)
    err = error_of(function() moe.load("x.txt") end)
    assert.truthy(has(err, this_file), err)
    assert.truthy(has(err, ".npy or .safetensors"), err)
    err = error_of(function() moe.save(tmp("_m.npy"), { t }) end)
    assert.truthy(has(err, this_file) and has(err, "moe.save: tensor: expected a tensor"), err)
    err = error_of(function() moe.save(tmp("_m.npy"), t, { a = "b" }) end)
    assert.truthy(has(err, "no metadata"), err)
    err = error_of(function() moe.save(tmp("_m.safetensors"), { t }) end)
    assert.truthy(has(err, this_file) and has(err, "string names"), err)
    err = error_of(function() moe.save(tmp("_m.safetensors"), { a = 1 }) end)
    assert.truthy(has(err, 'tensors["a"]: expected a tensor'), err)
    err = error_of(function() moe.save(tmp("_m.safetensors"), { a = t }, { k = {} }) end)
    assert.truthy(has(err, this_file) and has(err, 'metadata["k"]'), err)
    err = error_of(function() moe.save(tmp("_m.safetensors"), { a = t }, "meta") end)
    assert.truthy(has(err, "metadata: expected a table"), err)
  end)

  it("carries the C message for refused writes", function()
    local err = error_of(function()
      moe.save(tmp("_m2.npy"), moe.zeros({ 2 }, { dtype = "e2m1" }))
    end)
    assert.truthy(has(err, this_file) and has(err, "moe.save: moe_npy_write"), err)
    assert.truthy(has(err, "safetensors"), err)
    err = error_of(function() moe.save(tmp("_m3.safetensors"), { a = t }, { ["moe_dtype.a"] = "i4" }) end)
    assert.truthy(has(err, "reserved"), err)
    err = error_of(function() moe.save("/nonexistent-dir/x.npy", t) end)
    assert.truthy(has(err, "cannot create"), err)
    local f = t:clone()
    f:free()
    err = error_of(function() moe.save(tmp("_m4.npy"), f) end)
    assert.truthy(has(err, "freed"), err)
  end)
end)
