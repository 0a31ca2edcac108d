-- ABI check: the layout of every public struct (sizeof, alignof, offsetof of each field) and the
-- size of every enum, as the C compiler sees moe.h, must equal what LuaJIT computes from the
-- generated cdef.  scripts/gen_abi_check.lua parses the cdef and writes the C program.
local ffi = require("ffi")
local moe = require("moe")
-- spec/helper.lua, found next to this file whatever the working directory
local H = package.loaded["spec.helper"]
  or dofile((debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec") .. "/helper.lua")

local SRC = H.source_dir
local gen = assert(loadfile(SRC .. "/scripts/gen_abi_check.lua"))()

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local cdef_path = os.getenv("MOE_CDEF")
if not cdef_path or cdef_path == "" then cdef_path = moe.cdef_path end

describe("gen_abi_check parser", function()
  it("finds field names in comma lists, pointers, arrays, function pointers and nested structs", function()
    local list = gen.parse([[
      typedef struct a_t { int x; const char *name; int64_t *p, *q; int64_t shape[8], n;
                           void (*cb)(int, void *); struct { int u; } inner; unsigned flag : 1; } a_t;
      typedef struct opaque opaque;
      typedef enum color { RED = 0, GREEN } color;
      void f(a_t *a);
      typedef struct { float w; } anon_t;
    ]])
    assert.equal(3, #list)
    assert.same({ kind = "struct", name = "a_t",
                  fields = { "x", "name", "p", "q", "shape", "n", "cb", "inner" },
                  bitfields = { "flag" } }, list[1])
    assert.same({ kind = "enum", name = "color" }, list[2])
    assert.same({ "w" }, list[3].fields)
  end)
end)

describe("ABI of the public structs", function()
  local have_cc = H.sh("command -v cc >/dev/null 2>&1")
  if not have_cc then
    pending("no C compiler (cc) on PATH: the C side of the ABI check cannot be built")
    return
  end

  it("C and the FFI agree on sizeof, alignof and offsetof of every field", function()
    local list = gen.parse(read(cdef_path))
    local by_name, nstructs, nfields = {}, 0, 0
    for _, it in ipairs(list) do
      by_name[it.name] = it
      if it.kind == "struct" then
        nstructs = nstructs + 1
        nfields = nfields + #it.fields
      end
    end
    assert.truthy(nstructs >= 3, "expected at least 3 public structs in " .. cdef_path .. ", found " .. nstructs)
    for _, need in ipairs{ "moe_device", "moe_mem_info", "moe_route_cfg" } do
      assert.truthy(by_name[need] and #by_name[need].fields >= 2, "struct " .. need .. " not parsed")
    end

    local tmp = os.tmpname()
    local csrc, exe = tmp .. ".c", tmp .. ".bin"
    local f = assert(io.open(csrc, "wb"))
    f:write(gen.emit(list))
    f:close()
    local cmd = string.format("cc -std=c11 -I'%s/engine/include' -o '%s' '%s' 2>&1", SRC, exe, csrc)
    local p = io.popen(cmd)
    local cc_out = p:read("*a")
    p:close()
    local exists = io.open(exe, "rb")
    assert.truthy(exists, "compiling the ABI program failed:\n" .. cc_out)
    exists:close()

    local pr = io.popen("'" .. exe .. "'")
    local c_side = pr:read("*a")
    pr:close()
    os.remove(csrc); os.remove(exe); os.remove(tmp)

    local checked_s, checked_f, checked_e = 0, 0, 0
    for line in c_side:gmatch("[^\n]+") do
      local kind, a, b, c = line:match("^(%u) (%S+) (%S+) ?(%S*)$")
      if kind == "S" then
        assert.equal(tonumber(b), ffi.sizeof(a), "sizeof(" .. a .. ")")
        assert.equal(tonumber(c), ffi.alignof(a), "alignof(" .. a .. ")")
        checked_s = checked_s + 1
      elseif kind == "F" then
        assert.equal(tonumber(c), ffi.offsetof(a, b), "offsetof(" .. a .. ", " .. b .. ")")
        checked_f = checked_f + 1
      elseif kind == "E" then
        assert.equal(tonumber(b), ffi.sizeof(a), "sizeof(" .. a .. ")")
        checked_e = checked_e + 1
      else
        error("unexpected line from the ABI program: " .. line)
      end
    end
    assert.equal(nstructs, checked_s)
    assert.equal(nfields, checked_f)
    assert.truthy(checked_f >= 10, "only " .. checked_f .. " fields checked")
    assert.truthy(checked_e >= 1, "no enum checked")
  end)

  it("the binding struct holds exactly one handle pointer", function()
    assert.equal(ffi.sizeof("void *"), ffi.sizeof("moe_lua_tensor"))
    assert.equal(0, ffi.offsetof("moe_lua_tensor", "h"))
  end)
end)
