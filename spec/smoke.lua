-- spec/smoke.lua -- plain LuaJIT (no Busted): load moe, round-trip a tensor, print "smoke ok".
-- Run: luajit spec/smoke.lua (ctest sets MOE_LIB / MOE_CDEF / MOE_SOURCE_DIR).
local src = os.getenv("MOE_SOURCE_DIR")
if not src or src == "" then
  local me = debug.getinfo(1, "S").source:sub(2)
  src = me:match("^(.*)/spec/[^/]*$") or "."
end
package.path = src .. "/bindings/?.lua;" .. src .. "/bindings/?/init.lua;" .. package.path

local function fail(msg)
  io.stderr:write("smoke FAILED: ", tostring(msg), "\n")
  os.exit(1)
end

local ok, err = pcall(function()
  local moe = require("moe")
  assert(type(moe.version()) == "string" and moe.version():match("^%d+%.%d+%.%d+$"),
         "moe.version() should be MAJOR.MINOR.PATCH, got " .. tostring(moe.version()))
  local t = moe.tensor({{1, 2, 3}, {4, 5, 6}}, {dtype = "f32"})
  local s = t:shape()
  assert(#s == 2 and s[1] == 2 and s[2] == 3, "shape should be {2, 3}")
  assert(t:dtype() == "f32" and t:device() == "cpu", "dtype/device")
  local back = t:to("bf16"):to("f32"):totable()
  for i = 1, 2 do
    for j = 1, 3 do
      assert(back[i][j] == (i - 1) * 3 + j, "round trip through bf16 changed element " .. i .. "," .. j)
    end
  end
  assert(t:transpose():contiguous():get(3, 2) == 6, "transpose + contiguous")
  local live = moe.mem_stats().live_tensors
  t:free()
  t:free()
  assert(moe.mem_stats().live_tensors == live - 1, "free should release one handle")
  assert(not pcall(t.shape, t), "use after free should fail")
  assert(tostring(moe.zeros({2})):match("^tensor%(%[0%., 0%.%], shape=%[2%], dtype=f32, device=cpu%)$"),
         "tostring: " .. tostring(moe.zeros({2})))
  -- a second copy of the module (what a test runner that unloads modules does) shares the
  -- library, the cdef and the tensor metatype with the first
  local keep = moe.ones({2})
  for k in pairs(package.loaded) do
    if k == "moe" or k:match("^moe%.") then package.loaded[k] = nil end
  end
  local moe2 = require("moe")
  assert(moe2 ~= moe, "reload should give a new module table")
  assert(moe2.is_tensor(keep) and keep:totable()[2] == 1, "old tensors work after a reload")
  assert(moe2.zeros({1}):get(1) == 0, "new tensors after a reload")
end)
if not ok then fail(err) end
print("smoke ok")
os.exit(0)
