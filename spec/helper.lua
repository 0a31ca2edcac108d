-- spec/helper.lua -- loaded by Busted before the spec files (moe spec passes it as --helper).
-- Requiring moe here keeps libmoe loaded across spec files: Busted unloads modules that a
-- spec file loaded, and an unloaded ffi library would leave cdata pointing into nowhere.
local ffi = require("ffi")

local function source_dir()
  local env = os.getenv("MOE_SOURCE_DIR")
  if env and env ~= "" then return env end
  local src = debug.getinfo(1, "S").source:sub(2)
  local dir = src:match("^(.*)/spec/[^/]*$")
  return dir or "."
end

local SRC = source_dir()
if not package.path:find(SRC .. "/bindings/?.lua", 1, true) then
  package.path = SRC .. "/bindings/?.lua;" .. SRC .. "/bindings/?/init.lua;" .. package.path
end

local moe = require("moe")

local H = { moe = moe, source_dir = SRC }

-- The message of the error raised by fn(...), or nil when it did not fail.
function H.error_of(fn, ...)
  local ok, err = pcall(fn, ...)
  if ok then return nil end
  return tostring(err)
end

-- f()'s results with the environment variable `name` set to v (nil: unset), the previous
-- value restored afterwards; an error in f is raised as an assertion failure with its message.
-- (The engine reads its MOE_FUSED_* switches on every call.)
pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
function H.with_env(name, v, f)
  local prev = os.getenv(name)
  if v then ffi.C.setenv(name, v, 1) else ffi.C.unsetenv(name) end
  local res = { pcall(f) }
  if prev then ffi.C.setenv(name, prev, 1) else ffi.C.unsetenv(name) end
  assert(res[1], tostring(res[2]))
  return unpack(res, 2, table.maxn(res))
end

-- |a - b| <= atol + rtol * |b|, NaN equal to NaN.
-- Relative L2 error of tensor a against tensor b (any devices, any float dtypes): ||a - b|| / ||b||
-- (||a - b|| when b is all zero); math.huge when a difference is NaN.
function H.rel_l2(a, b)
  local x, y = a:to("cpu"):to("f32"), b:to("cpu"):to("f32")
  local n = x:numel()
  local xa, ya = x:reshape({ n }):totable(), y:reshape({ n }):totable()
  local num, den = 0, 0
  for i = 1, n do
    local d = xa[i] - ya[i]
    if d ~= d then return math.huge end
    num = num + d * d
    den = den + ya[i] * ya[i]
  end
  return den > 0 and math.sqrt(num / den) or math.sqrt(num)
end

function H.close(a, b, rtol, atol)
  if a ~= a and b ~= b then return true end
  if a == b then return true end
  rtol, atol = rtol or 1e-6, atol or 0
  return math.abs(a - b) <= atol + rtol * math.abs(b)
end

-- Round a Lua number (double) to float32 by the C conversion (round to nearest even).
local f32box = ffi.new("float[1]")
function H.f32(x)
  f32box[0] = x
  return f32box[0]
end

-- Flatten nested tables (row-major).
function H.flatten(t, out)
  out = out or {}
  if type(t) ~= "table" then out[#out + 1] = t return out end
  for i = 1, #t do H.flatten(t[i], out) end
  return out
end

-- Count live tensor handles after a full collection.
function H.live()
  collectgarbage("collect")
  collectgarbage("collect")
  return moe.mem_stats().live_tensors
end

-- Run a C compiler command; true when it exited 0.
function H.sh(cmd)
  local r = os.execute(cmd)
  return r == 0 or r == true
end

package.loaded["spec.helper"] = H
_G.moe_spec_helper = H
return H
