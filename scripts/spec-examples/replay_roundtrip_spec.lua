-- Example spec: record a routing replay, save it, load it back and compare.
--
-- Run with `moe spec path/to/this/folder`.  Files go to a temporary folder that is removed
-- afterwards.
local moe = require("moe")

local function needs(name, value)
  if value == nil then pending("needs " .. name) end
  return value ~= nil
end

describe("routing replay round trip", function()
  local T, E, K = 48, 16, 2
  local dir

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    os.execute("mkdir -p '" .. dir .. "'")
  end)

  after_each(function()
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("replay -> .npy -> load gives the same ids", function()
    if not (needs("moe.route", moe.route) and needs("moe.save", moe.save) and
            needs("moe.load", moe.load)) then return end
    local logits = moe.randn({ T, E }, { seed = 11 })
    local replay = moe.zeros({ T, K }, { dtype = "i16" })
    local r = moe.route{ logits = logits, method = "topk", top_k = K, replay = replay }
    moe.save(dir .. "/replay.npy", replay)
    local back = moe.load(dir .. "/replay.npy")
    assert.tensor_equal(replay, back)     -- same dtype (i16), shape and bits
    assert.same_routing(r, back)          -- and the routing it describes
  end)

  it("replay -> .safetensors (with metadata) -> load", function()
    if not (needs("moe.route", moe.route) and needs("moe.save", moe.save) and
            needs("moe.load", moe.load)) then return end
    local logits = moe.randn({ T, E }, { seed = 12, dtype = "bf16" })
    local replay = moe.zeros({ T, K }, { dtype = "i16" })
    moe.route{ logits = logits, method = "renormalize", top_k = K, replay = replay }
    moe.save(dir .. "/replay.safetensors", { ["layer.0"] = replay, logits = logits },
             { method = "renormalize" })
    local back = moe.load(dir .. "/replay.safetensors")
    assert.tensor_equal(replay, back["layer.0"])
    assert.tensor_equal(logits, back.logits)
  end)

  it("a different seed routes differently (the comparison can fail)", function()
    if not needs("moe.route", moe.route) then return end
    local a = moe.route{ logits = moe.randn({ T, E }, { seed = 1 }), method = "topk", top_k = K }
    local b = moe.route{ logits = moe.randn({ T, E }, { seed = 2 }), method = "topk", top_k = K }
    assert.is_not.same_routing(a, b)
  end)
end)
