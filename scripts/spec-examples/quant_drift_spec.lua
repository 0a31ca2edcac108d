-- Example spec: a quantisation drift budget.
--
-- Runs a tiny preset of a real MoE architecture in bf16 and in a quantised mode over the
-- same tokens, and bounds how much the routing moves.  It is written against the planned
-- model API (moe.model.preset, m:run returning a trace, moe.trace.compare); until that
-- exists the tests report "pending", not "success".
local moe = require("moe")

-- moe.model with presets and m:run, or pending.
local function model_api()
  local ok, model = pcall(function() return moe.model end)
  if ok and type(model) == "table" and model.preset then
    local pok, m = pcall(model.preset, "qwen3-30b-a3b", { size = "tiny", layers = 2 })
    if pok and m and m.run then return model end
  end
  pending("needs moe.model")
  return nil
end

describe("quantisation drift budget (qwen3-30b-a3b, tiny)", function()
  local TOKENS, SEED = 256, 0

  local function run(quant, device)
    local m = moe.model.preset("qwen3-30b-a3b", { size = "tiny", layers = 2 })
    return m:run{ tokens = TOKENS, quant = quant, device = device or "cpu", seed = SEED }
  end

  it("fp8_block moves less than 2% of the routing decisions", function()
    if not model_api() then return end
    assert.routing_disagreement_below(run("bf16"), run("fp8_block"), 0.02)
  end)

  it("nvfp4 moves less than 10%", function()
    if not model_api() then return end
    assert.routing_disagreement_below(run("bf16"), run("nvfp4"), 0.10)
  end)

  it("bf16 against itself does not move at all", function()
    if not model_api() then return end
    assert.is_not.routing_disagreement_below(run("bf16"), run("bf16"), 0) -- 0 is not < 0
    assert.routing_disagreement_below(run("bf16"), run("bf16"), 1e-12)
  end)

  it("#gpu the CUDA run stays within the same budget as the CPU run", function()
    if not model_api() then return end
    assert.routing_disagreement_below(run("bf16", "cpu"), run("fp8_block", "cuda"), 0.02)
  end)
end)
