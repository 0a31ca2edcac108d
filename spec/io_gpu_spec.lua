-- moe.save of CUDA tensors (copied through the host) and loading them back to the GPU: the
-- bytes in the files equal those of the same tensors saved from the CPU.  Run alone without
-- a CUDA device, this file exits 77 (skipped).
local ffi = require("ffi")
local moe = require("moe")

local function raw(t)
  local c = t:to("cpu"):contiguous()
  return ffi.string(c:data_ptr(), c:nbytes())
end

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local base = os.tmpname()
local made = { base }
local function tmp(suffix)
  made[#made + 1] = base .. suffix
  return base .. suffix
end
teardown(function() for _, p in ipairs(made) do os.remove(p) end end)

describe("file I/O with CUDA tensors #gpu", function()
  it("saves CUDA tensors (contiguous and views) exactly like their CPU copies", function()
    local x = moe.randn({ 33, 17 }, { seed = 5 })
    local gx = x:to("cuda")
    for _, v in ipairs{ { x, gx }, { x:transpose(1, 2), gx:transpose(1, 2) },
                        { x:narrow(2, 3, 5), gx:narrow(2, 3, 5) } } do
      local pc, pg = tmp("_c.npy"), tmp("_g.npy")
      moe.save(pc, v[1])
      moe.save(pg, v[2])
      assert.equal(read_bytes(pc), read_bytes(pg))
      local back = moe.load(pg)
      assert.equal("cpu", back:device())
      assert.equal(raw(v[1]), raw(back))
      assert.equal(raw(v[1]), raw(back:to("cuda")))
    end
  end)

  it("saves every dtype from the GPU to safetensors", function()
    local cpu, gpu = {}, {}
    for _, dt in ipairs(moe.dtypes) do
      local t = moe.randn({ 4, 6 }, { seed = 9 }):to(dt)
      cpu[dt] = t
      gpu[dt] = t:to("cuda")
    end
    local pc, pg = tmp("_c.safetensors"), tmp("_g.safetensors")
    moe.save(pc, cpu, { where = "x" })
    moe.save(pg, gpu, { where = "x" })
    assert.equal(read_bytes(pc), read_bytes(pg))
    local r = moe.load(pg)
    for dt, t in pairs(cpu) do
      assert.equal(dt, r[dt]:dtype())
      assert.equal(raw(t), raw(r[dt]:to("cuda")))
    end
  end)
end)
