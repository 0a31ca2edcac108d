-- moe -- the Lua face of moelab: loads libmoe through the FFI and installs the submodules.
--
--   local moe = require("moe")
--   local x = moe.randn({4, 16}, {dtype = "bf16", seed = 1})
--   print(x)
--
-- Where things are looked for (first hit wins):
--   library: $MOE_LIB; <source>/build/libmoe.so; <source>/build-*/libmoe.so (newest first);
--            <prefix>/lib*/libmoe.so of an install tree (this file in <prefix>/share/lua/5.1/moe);
--            ffi.load("moe") (the system search path).
--   cdef:    $MOE_CDEF; moe_cdef.h next to the library; <prefix>/share/moelab/moe_cdef.h.
-- The cdef is generated from engine/include/moe.h by the build (cc -E -P -DMOE_CDEF); nothing
-- is retyped here.
local ffi = require("ffi")

local moe = {}

-- State that must survive a reload of this module (Busted unloads modules between spec
-- files, but ffi.cdef and ffi.metatype are once-per-process): kept in the Lua registry.
local REG_KEY = "moelab.state"
local registry = debug.getregistry()
local state = registry[REG_KEY]
if not state then
  state = { methods = {} }
  registry[REG_KEY] = state
end
moe._state = state

-- ----------------------------------------------------------------- locating --

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

-- Lexical clean-up of a path ("a/b/../c" -> "a/c"), so that messages show readable paths.
local function normalize(p)
  local abs = p:sub(1, 1) == "/"
  local parts = {}
  for seg in p:gmatch("[^/]+") do
    if seg == ".." and #parts > 0 and parts[#parts] ~= ".." then
      parts[#parts] = nil
    elseif seg ~= "." then
      parts[#parts + 1] = seg
    end
  end
  local r = table.concat(parts, "/")
  if abs then return "/" .. r end
  return r == "" and "." or r
end

-- Directory of this file (bindings/moe in a source tree, share/lua/5.1/moe when installed).
local function this_dir()
  local src = debug.getinfo(1, "S").source
  if src:sub(1, 1) == "@" then src = src:sub(2) else return nil end
  local dir = dirname(src)
  if dir:sub(1, 1) ~= "/" then
    local pwd = os.getenv("PWD")
    if pwd then dir = pwd .. "/" .. dir end
  end
  return normalize(dir)
end

local function shell_quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- build-*/libmoe.so under root, newest first (ls -t; no lfs needed).
local function build_star_libs(root)
  local list = {}
  local p = io.popen("ls -1t " .. shell_quote(root) .. "/build-*/libmoe.so 2>/dev/null")
  if p then
    for line in p:lines() do list[#list + 1] = line end
    p:close()
  end
  return list
end

local function find_library(tried)
  local env = os.getenv("MOE_LIB")
  if env and env ~= "" then
    tried[#tried + 1] = env .. " (MOE_LIB)"
    if not file_exists(env) then
      error("moe: MOE_LIB points to a missing file: " .. env, 0)
    end
    return env
  end
  local dir = this_dir()
  if dir then
    local source = normalize(dir .. "/../..") -- bindings/moe -> source root
    local cand = source .. "/build/libmoe.so"
    tried[#tried + 1] = cand
    if file_exists(cand) then return cand end
    tried[#tried + 1] = source .. "/build-*/libmoe.so"
    local stars = build_star_libs(source)
    if stars[1] then return stars[1] end
    local prefix = normalize(dir .. "/../../../..") -- share/lua/5.1/moe -> prefix
    for _, libdir in ipairs{ "lib", "lib64", "lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu" } do
      cand = prefix .. "/" .. libdir .. "/libmoe.so"
      tried[#tried + 1] = cand
      if file_exists(cand) then return cand end
    end
  end
  tried[#tried + 1] = 'ffi.load("moe") (system library path)'
  return nil
end

local function find_cdef(libpath, tried)
  local env = os.getenv("MOE_CDEF")
  if env and env ~= "" then
    tried[#tried + 1] = env .. " (MOE_CDEF)"
    if not file_exists(env) then
      error("moe: MOE_CDEF points to a missing file: " .. env, 0)
    end
    return env
  end
  local cands = {}
  if libpath then cands[#cands + 1] = dirname(libpath) .. "/moe_cdef.h" end
  local dir = this_dir()
  if dir then cands[#cands + 1] = normalize(dir .. "/../../../moelab/moe_cdef.h") end -- share/moelab
  cands[#cands + 1] = "/usr/local/share/moelab/moe_cdef.h"
  cands[#cands + 1] = "/usr/share/moelab/moe_cdef.h"
  for _, c in ipairs(cands) do
    tried[#tried + 1] = c
    if file_exists(c) then return c end
  end
  return nil
end

-- ------------------------------------------------------------------ loading --

if not state.C then
  local tried_lib, tried_cdef = {}, {}
  local libpath = find_library(tried_lib)
  local ok, lib = pcall(ffi.load, libpath or "moe")
  if not ok then
    error("moe: cannot load libmoe (" .. tostring(lib) .. "); looked for:\n  " ..
          table.concat(tried_lib, "\n  ") ..
          "\nBuild it (cmake -S . -B build && cmake --build build) or set MOE_LIB.", 0)
  end
  local cdef_path = find_cdef(libpath, tried_cdef)
  if not cdef_path then
    error("moe: cannot find the generated cdef moe_cdef.h; looked for:\n  " ..
          table.concat(tried_cdef, "\n  ") ..
          "\nIt is made by the build next to libmoe.so; or set MOE_CDEF.", 0)
  end
  -- The declarations may already exist when another copy of this module ran before
  -- (ffi.cdef is process-wide and refuses redefinitions).
  if not pcall(ffi.typeof, "moe_mem_info") then
    local f = assert(io.open(cdef_path, "rb"))
    local text = f:read("*a")
    f:close()
    local cok, cerr = pcall(ffi.cdef, text)
    if not cok then
      error("moe: ffi.cdef of " .. cdef_path .. " failed: " .. tostring(cerr), 0)
    end
  end
  if not pcall(ffi.typeof, "moe_lua_tensor") then
    ffi.cdef("typedef struct { moe_tensor *h; } moe_lua_tensor;")
  end
  state.C = lib
  state.lib_path = libpath or "moe"
  state.cdef_path = cdef_path
end

local C = state.C
moe.C = C
moe.lib_path = state.lib_path
moe.cdef_path = state.cdef_path

-- ---------------------------------------------------------------- helpers --

-- Short printable description of any Lua value, for error messages.
local function describe(v, depth)
  depth = depth or 0
  local tv = type(v)
  if tv == "string" then
    return string.format("%q", v)
  elseif tv == "table" then
    if depth > 1 then return "{...}" end
    local parts, n = {}, #v
    for i = 1, math.min(n, 8) do parts[#parts + 1] = describe(v[i], depth + 1) end
    if n > 8 then parts[#parts + 1] = "..." end
    for k, val in pairs(v) do
      if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then
        if #parts >= 10 then parts[#parts + 1] = "..." break end
        parts[#parts + 1] = tostring(k) .. "=" .. describe(val, depth + 1)
      end
    end
    return "{" .. table.concat(parts, ", ") .. "}"
  elseif tv == "cdata" then
    if state.lua_tensor_ct and ffi.istype(state.lua_tensor_ct, v) then return "a tensor" end
    return "cdata<" .. tostring(ffi.typeof(v)):match("^ctype<(.*)>$") .. ">"
  elseif tv == "nil" then
    return "nil"
  end
  return tv == "number" and tostring(v) or (tv .. " " .. tostring(v))
end
moe._describe = describe

-- Shared argument checks of the submodules (level: as error() counts it from the function
-- that calls these, 3 = its caller's caller, i.e. the user's line for a public function).
-- opts must be nil or a table whose keys are all in `allowed` (a set); returns opts or {}.
function moe._check_opts(opts, fn, allowed, level)
  level = level or 3
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(string.format("%s: opts: expected a table or nil, got %s", fn, describe(opts)), level)
  end
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for name in pairs(allowed) do names[#names + 1] = name end
      table.sort(names)
      error(string.format("%s: opts: unknown option %s (known: %s)", fn, describe(k),
                          table.concat(names, ", ")), level)
    end
  end
  return opts
end

-- "[2, 3]" for a shape table {2, 3}.
function moe._shape_str(s)
  local p = {}
  for i = 1, #s do p[i] = tostring(s[i]) end
  return "[" .. table.concat(p, ", ") .. "]"
end

-- The C handle of tensor argument x (named arg of fn); raises for a non-tensor or a freed one.
function moe._tensor_arg(x, fn, arg, level)
  level = level or 3
  if not moe.is_tensor(x) then
    error(string.format("%s: %s: expected a tensor, got %s", fn, arg, describe(x)), level)
  end
  if x.h == nil then error(string.format("%s: %s: tensor was freed", fn, arg), level) end
  return x.h
end

-- Level (as error() counts it from the function that calls user_level's caller) of the
-- first stack frame outside moe's own Lua files: errors point at the user's line however
-- deep inside the bindings they are raised.
local function is_binding_source(src)
  return src:find("[/@]moe/[%w_]+%.lua$") ~= nil
end
function moe._user_level()
  for l = 3, 40 do
    local info = debug.getinfo(l, "S")
    if not info then break end
    if info.what ~= "C" and not is_binding_source(info.source) then return l - 1 end
  end
  return 1
end

-- Raise the C library's last error for a failed call, at the user's line (the level
-- argument is accepted for compatibility; the first frame outside the bindings is used).
function moe._check(status, fn, level)
  if status ~= 0 then
    local msg = ffi.string(C.moe_last_error())
    if msg == "" then msg = ffi.string(C.moe_status_str(status)) end
    local _ = level
    error(fn .. ": " .. msg, moe._user_level())
  end
  return status
end

-- Metatype of the binding struct.  __index forwards to state.methods so that submodules
-- (and a reloaded copy of this module) can add methods after ffi.metatype has frozen the
-- metatable.
if not state.lua_tensor_ct then
  local methods = state.methods
  state.mt = {
    __index = function(_, k) return methods[k] end,
    __gc = function(self)
      local h = self.h
      if h ~= nil then
        self.h = nil
        state.C.moe_tensor_free(h)
      end
    end,
    __tostring = function(self)
      local f = methods.__tostring
      if f then return f(self) end
      return "moe tensor"
    end,
  }
  state.lua_tensor_ct = ffi.metatype("moe_lua_tensor", state.mt)
end
local lua_tensor_ct = state.lua_tensor_ct
moe.Tensor = state.methods -- method table; submodules add methods here

function moe.is_tensor(x)
  return type(x) == "cdata" and ffi.istype(lua_tensor_ct, x)
end

-- ------------------------------------------------------------------ devices --

local device_ct = ffi.typeof("moe_device")
local CPU, CUDA = C.MOE_DEVICE_CPU, C.MOE_DEVICE_CUDA
state.default_device = state.default_device or device_ct(CPU, 0)

-- Parse a device argument: "cpu", "cuda", "cuda:N", a moe_device cdata or nil (the default
-- device).  fn/arg name the caller in errors.
function moe._device(x, fn, arg, level)
  if x == nil then return state.default_device end
  if type(x) == "string" then
    if x == "cpu" then return device_ct(CPU, 0) end
    if x == "cuda" then return device_ct(CUDA, 0) end
    local idx = x:match("^cuda:(%d+)$")
    if idx then return device_ct(CUDA, tonumber(idx)) end
  elseif type(x) == "cdata" and ffi.istype(device_ct, x) then
    if (x.type == CPU and x.index == 0) or (x.type == CUDA and x.index >= 0) then
      return device_ct(x.type, x.index)
    end
  end
  error(string.format("%s: %s: expected \"cpu\", \"cuda\" or \"cuda:N\", got %s",
                      fn or "moe", arg or "device", describe(x)), level or 3)
end

function moe._device_str(d)
  if d.type == CPU then return "cpu" end
  return "cuda:" .. tonumber(d.index)
end

-- ------------------------------------------------------------------- dtypes --

local DTYPE_COUNT = tonumber(C.MOE_DTYPE_COUNT)
local dtype_names = {}
for i = 0, DTYPE_COUNT - 1 do dtype_names[i] = ffi.string(C.moe_dtype_name(i)) end
moe.dtypes = {}
for i = 0, DTYPE_COUNT - 1 do moe.dtypes[i + 1] = dtype_names[i] end

-- Parse a dtype argument (a name such as "bf16" / "bfloat16", or an id) into its id.
function moe._dtype(x, fn, arg, level)
  if type(x) == "string" then
    local id = C.moe_dtype_from_name(x)
    C.moe_clear_error()
    if id >= 0 then return tonumber(id) end
  elseif type(x) == "number" and x % 1 == 0 and x >= 0 and x < DTYPE_COUNT then
    return x
  end
  error(string.format("%s: %s: expected a dtype name (%s) or id 0..%d, got %s",
                      fn or "moe", arg or "dtype", table.concat(moe.dtypes, ", "),
                      DTYPE_COUNT - 1, describe(x)), level or 3)
end

function moe._dtype_name(id) return dtype_names[tonumber(id)] or "?" end

-- ------------------------------------------------------------------- memory --

local mem_box = ffi.new("moe_mem_info[1]")
local function mem_raw()
  moe._check(C.moe_mem_stats(mem_box), "moe.mem_stats")
  return mem_box[0]
end

function moe.mem_stats()
  local m = mem_raw()
  return {
    live_tensors = tonumber(m.live_tensors),
    live_storages = tonumber(m.live_storages),
    host_bytes = tonumber(m.host_bytes),
    device_bytes = tonumber(m.device_bytes),
    peak_device_bytes = tonumber(m.peak_device_bytes),
    peak_host_bytes = tonumber(m.peak_host_bytes),
  }
end

-- GC trigger (Torch7's soft limit): LuaJIT's collector does not see the memory behind a
-- tensor handle, so after an allocation from Lua we compare the accounted bytes with the
-- level right after the last collection; past the threshold we collect, which runs the
-- finalisers of unreachable tensors.  Host and device memory are tracked separately.
local GIB = 1024 * 1024 * 1024
state.gc = state.gc or { threshold = nil, base = { host = 0, device = 0 }, collections = 0 }
local gcs = state.gc
moe._gc = gcs

-- Growth allowed before a collection: the configured threshold, else the larger of 1 GiB and
-- 25% of the level after the last collection.
function moe.gc_threshold(kind)
  if gcs.threshold then return gcs.threshold end
  return math.max(GIB, 0.25 * gcs.base[kind or "device"])
end

function moe.set_gc_threshold(bytes)
  if bytes ~= nil and not (type(bytes) == "number" and bytes >= 0) then
    error("moe.set_gc_threshold: bytes: expected a non-negative number or nil, got " ..
          describe(bytes), 2)
  end
  local old = gcs.threshold
  gcs.threshold = bytes
  return old
end

function moe.collect_garbage()
  collectgarbage("collect")
  local m = mem_raw()
  gcs.base.host = tonumber(m.host_bytes)
  gcs.base.device = tonumber(m.device_bytes)
  gcs.collections = gcs.collections + 1
end

-- kind "host" or "device", level the current accounted bytes; returns true if it collected.
function moe._gc_maybe(kind, level)
  local base = gcs.base[kind]
  if level < base then
    gcs.base[kind] = level -- memory was freed explicitly: measure growth from here
    return false
  end
  if level - base > moe.gc_threshold(kind) then
    moe.collect_garbage()
    return true
  end
  return false
end

-- Wrap a new owned handle; the finaliser frees it.  Checks the GC trigger.
function moe._wrap(h)
  if h == nil then error("moe._wrap: h: expected a tensor handle, got NULL", 2) end
  local t = lua_tensor_ct(h)
  local m = mem_raw()
  if C.moe_tensor_device(h).type == CUDA then
    moe._gc_maybe("device", tonumber(m.device_bytes))
  else
    moe._gc_maybe("host", tonumber(m.host_bytes))
  end
  return t
end

-- ---------------------------------------------------------------- the rest --

function moe.version() return ffi.string(C.moe_version()) end
function moe.build_info() return ffi.string(C.moe_build_info()) end
function moe.cuda_built() return C.moe_cuda_built() ~= 0 end
function moe.cuda_device_count() return tonumber(C.moe_cuda_device_count()) end
function moe.cuda_available() return C.moe_cuda_device_count() > 0 end

function moe.cuda_device_info(index)
  index = index or 0
  local buf = ffi.new("char[256]")
  moe._check(C.moe_cuda_device_info(index, buf, 256), "moe.cuda_device_info")
  return ffi.string(buf)
end

local function cuda_unavailable_reason()
  if C.moe_cuda_built() == 0 then return "libmoe was built without CUDA" end
  return "no CUDA device is available"
end

function moe.set_default_device(d)
  local dev = moe._device(d, "moe.set_default_device", "device")
  if dev.type == CUDA then
    local n = moe.cuda_device_count()
    if n == 0 then
      error("moe.set_default_device: device: CUDA requested but " .. cuda_unavailable_reason(), 2)
    elseif dev.index >= n then
      error(string.format("moe.set_default_device: device: expected cuda:0..cuda:%d, got cuda:%d",
                          n - 1, dev.index), 2)
    end
  end
  local old = moe._device_str(state.default_device)
  state.default_device = dev
  return old
end

function moe.default_device() return moe._device_str(state.default_device) end

-- --------------------------------------------------------------- submodules --

for _, name in ipairs{ "tensor", "graph", "route", "ops", "io", "trace", "fused", "quant", "model", "checkpoint" } do
  require("moe." .. name)(moe)
end

return moe
