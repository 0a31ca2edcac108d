-- moe.io -- moe.load / moe.save for .npy and .safetensors files (docs/io.md).
--
--   local x = moe.load("a.npy")                       -- a tensor
--   local ts, meta = moe.load("model.safetensors")    -- {name = tensor, ...}, {key = "value"}
--   moe.save("a.npy", x)
--   moe.save("b.safetensors", {w = w, b = b}, {model = "qwen3", seed = 1})
--   moe.save("c.safetensors", x)                      -- a lone tensor is stored as "tensor"
--
-- Tensors loaded from files are host tensors; safetensors entries (and most .npy arrays) view
-- a private copy-on-write mapping of the file: writing into them never changes the file.
-- Tensors on any device can be saved (they are copied through the host).
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local describe = moe._describe
  local check = moe._check

  local tensor_box = ffi.new("moe_tensor*[1]")
  local file_box = ffi.new("moe_st_file*[1]")
  local cstr_array = ffi.typeof("const char *[?]")
  local tensor_array = ffi.typeof("const moe_tensor *[?]")

  local SINGLE_NAME = "tensor" -- name of a lone tensor saved to .safetensors
  moe.io = moe.io or {}
  moe.io.single_name = SINGLE_NAME

  local function kind_of(path, fn)
    if type(path) ~= "string" then
      error(string.format("%s: path: expected a string, got %s", fn, describe(path)), 3)
    end
    local lower = path:lower()
    if lower:match("%.npy$") then return "npy" end
    if lower:match("%.safetensors$") then return "safetensors" end
    error(string.format("%s: path: expected a name ending in .npy or .safetensors, got %q",
                        fn, path), 3)
  end

  local handle = moe._tensor_arg

  -- Open a safetensors file, read every entry, close it; returns tensors, metadata or
  -- nil, message.
  local function load_safetensors(path)
    file_box[0] = nil
    local st = C.moe_st_open(path, file_box)
    local f = file_box[0]
    file_box[0] = nil
    if st ~= 0 then return nil, ffi.string(C.moe_last_error()) end
    local tensors, meta = {}, {}
    local err
    for i = 0, C.moe_st_count(f) - 1 do
      local name = ffi.string(C.moe_st_name(f, i))
      tensor_box[0] = nil
      st = C.moe_st_get(f, i, tensor_box)
      local h = tensor_box[0]
      tensor_box[0] = nil
      if st ~= 0 then
        err = ffi.string(C.moe_last_error())
        break
      end
      tensors[name] = moe._wrap(h)
    end
    if not err then
      for i = 0, C.moe_st_meta_count(f) - 1 do
        meta[ffi.string(C.moe_st_meta_key(f, i))] = ffi.string(C.moe_st_meta_value(f, i))
      end
    end
    C.moe_st_close(f)
    if err then return nil, err end
    return tensors, meta
  end

  --- moe.load(path) -> tensor (.npy) | tensors, metadata (.safetensors)
  function moe.load(path)
    local kind = kind_of(path, "moe.load")
    if kind == "npy" then
      tensor_box[0] = nil
      local st = C.moe_npy_read(path, tensor_box)
      local h = tensor_box[0]
      tensor_box[0] = nil
      check(st, "moe.load")
      return moe._wrap(h)
    end
    local tensors, meta = load_safetensors(path)
    if not tensors then error("moe.load: " .. meta, 2) end
    return tensors, meta
  end

  local function meta_string(v, key)
    local tv = type(v)
    if tv == "string" then return v end
    if tv == "number" or tv == "boolean" then return tostring(v) end
    error(string.format("moe.save: metadata[%q]: expected a string, number or boolean, got %s",
                        key, describe(v)), 3)
  end

  --- moe.save(path, tensor_or_table, metadata)
  function moe.save(path, x, metadata)
    local kind = kind_of(path, "moe.save")
    if kind == "npy" then
      local h = handle(x, "moe.save", "tensor")
      if metadata ~= nil then
        error("moe.save: metadata: .npy files have no metadata (use .safetensors), got " ..
              describe(metadata), 2)
      end
      check(C.moe_npy_write(path, h), "moe.save")
      return
    end
    -- safetensors: a table name -> tensor, or one tensor
    local entries = {}
    if moe.is_tensor(x) then
      entries[1] = { name = SINGLE_NAME, h = handle(x, "moe.save", "tensor") }
    elseif type(x) == "table" then
      for k, v in pairs(x) do
        if type(k) ~= "string" then
          error(string.format("moe.save: tensors: expected string names, got the key %s",
                              describe(k)), 2)
        end
        entries[#entries + 1] = { name = k, h = handle(v, "moe.save", "tensors[" ..
                                                       string.format("%q", k) .. "]") }
      end
      table.sort(entries, function(a, b) return a.name < b.name end)
    else
      error("moe.save: tensors: expected a tensor or a table of name = tensor, got " ..
            describe(x), 2)
    end
    local keys, values = {}, {}
    if metadata ~= nil then
      if type(metadata) ~= "table" then
        error("moe.save: metadata: expected a table of string = string, got " ..
              describe(metadata), 2)
      end
      for k in pairs(metadata) do
        if type(k) ~= "string" then
          error("moe.save: metadata: expected string keys, got the key " .. describe(k), 2)
        end
        keys[#keys + 1] = k
      end
      table.sort(keys)
      for i, k in ipairs(keys) do values[i] = meta_string(metadata[k], k) end
    end
    local n, nm = #entries, #keys
    local names_c, tensors_c = cstr_array(math.max(n, 1)), tensor_array(math.max(n, 1))
    for i, e in ipairs(entries) do
      names_c[i - 1] = e.name -- the Lua strings stay referenced by `entries`
      tensors_c[i - 1] = e.h
    end
    local keys_c, values_c = cstr_array(math.max(nm, 1)), cstr_array(math.max(nm, 1))
    for i = 1, nm do
      keys_c[i - 1] = keys[i]
      values_c[i - 1] = values[i]
    end
    local st = C.moe_st_write(path, n, names_c, tensors_c, nm, keys_c, values_c)
    -- the C arrays point into the strings held by these tables: touch them after the call so
    -- that they stay alive across it (also under the JIT)
    entries.n, keys.n, values.n = n, nm, nm
    check(st, "moe.save")
  end
end
