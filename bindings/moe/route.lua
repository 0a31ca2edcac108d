-- moe.route -- routing (top-K expert selection + weights) with optional routing replay.
--
--   local r = moe.route{logits = L, method = "deepseekv3", top_k = 8, bias = b,
--                       n_group = 8, topk_group = 4, scale = 2.5, replay = buf}
--   r.ids       -- i32 [T, K], descending selection score, ties to the lower expert index
--   r.weights   -- f32 [T, K] (weights_dtype = "bf16" for bf16)
--   print(r)    -- a few tokens, pretty-printed
--   for _, m in ipairs(moe.routing_methods()) do print(m.name, m.description) end
--
-- ids / weights may be passed in (preallocated, e.g. for CUDA-graph capture, where no
-- allocation is allowed); replay (i16 [R >= T, K]) receives the ids as int16, rows >= T are
-- left alone.  Semantics: docs/routing.md.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local describe = moe._describe

  local cfg_box = ffi.new("moe_route_cfg[1]")
  local ids_box = ffi.new("moe_tensor*[1]")
  local w_box = ffi.new("moe_tensor*[1]")

  local METHODS = {
    { name = "default", params = { "top_k" },
      description = "softmax over all E; weights = the chosen probabilities (no renormalisation)" },
    { name = "renormalize", params = { "top_k" },
      description = "top-K of the logits; weights = softmax over the K chosen logits" },
    { name = "renormalize_naive", params = { "top_k" },
      description = "softmax over all E, top-K, weights renormalised to sum 1" },
    { name = "topk", params = { "top_k" },
      description = "top-K of the logits; weights = the raw chosen logits" },
    { name = "sigmoid_renorm", params = { "top_k", "normalize" },
      description = "top-K of sigmoid(l); weights = s / max(sum s, 1e-20) (or s with normalize = false)" },
    { name = "deepseekv3", params = { "top_k", "bias", "n_group", "topk_group", "scale" },
      description = "select on sigmoid(l) + bias (groups: sum of top-2 per group, keep topk_group); " ..
                    "weights = s * scale / (sum s + 1e-20)" },
    { name = "minimax2", params = { "top_k", "bias" },
      description = "select on sigmoid(l) + bias; weights = s / (sum s + 1e-20)" },
    { name = "llama4", params = { "top_k" },
      description = "top-1 of the logits (K must be 1); weight = sigmoid(l)" },
  }

  -- The public list (fresh tables, so callers may modify what they get).
  function moe.routing_methods()
    local out = {}
    for i, m in ipairs(METHODS) do
      local p = {}
      for j, v in ipairs(m.params) do p[j] = v end
      out[i] = { name = m.name, params = p, description = m.description }
    end
    return out
  end

  local KNOWN = {
    logits = true, bias = true, method = true, top_k = true, n_group = true, topk_group = true,
    scale = true, normalize = true, replay = true, ids = true, weights = true, weights_dtype = true,
  }

  local Result = {}
  Result.__index = Result

  function Result.__tostring(r)
    local ids, w = r.ids:totable(), r.weights:totable()
    local T = #ids
    local lines = { string.format("moe.route: method %s, top_k %d, %d token%s, ids %s, weights %s on %s",
                                  r.method, r.top_k, T, T == 1 and "" or "s", r.ids:dtype(),
                                  r.weights:dtype(), r.ids:device()) }
    local show = math.min(T, 8)
    for t = 1, show do
      local parts = {}
      for k = 1, #ids[t] do parts[k] = string.format("%d:%.5g", ids[t][k], w[t][k]) end
      lines[#lines + 1] = string.format("  [%d] %s", t - 1, table.concat(parts, "  "))
    end
    if T > show then lines[#lines + 1] = string.format("  ... (%d more)", T - show) end
    return table.concat(lines, "\n")
  end

  local function tensor_arg(args, key, required)
    local v = args[key]
    if v == nil and not required then return nil end
    moe._tensor_arg(v, "moe.route", key, 4) -- 4: the caller of moe.route
    return v
  end

  local function int_arg(args, key, default)
    local v = args[key]
    if v == nil then return default end
    if type(v) ~= "number" or v % 1 ~= 0 or v < -2 ^ 31 or v >= 2 ^ 31 then
      error("moe.route: " .. key .. ": expected an integer, got " .. describe(v), 3)
    end
    return v
  end

  function moe.route(args)
    if type(args) ~= "table" then
      error("moe.route: args: expected a table {logits = ..., method = ..., top_k = ...}, got " ..
            describe(args), 2)
    end
    for k in pairs(args) do
      if not KNOWN[k] then
        error("moe.route: " .. describe(k) .. ": unknown argument (known: logits, bias, method, " ..
              "top_k, n_group, topk_group, scale, normalize, replay, ids, weights, weights_dtype)", 2)
      end
    end
    local logits = tensor_arg(args, "logits", true)
    local bias = tensor_arg(args, "bias")
    local replay = tensor_arg(args, "replay")
    local ids = tensor_arg(args, "ids")
    local weights = tensor_arg(args, "weights")
    local mname = args.method or "renormalize"
    if type(mname) ~= "string" then
      error("moe.route: method: expected a method name (see moe.routing_methods()), got " ..
            describe(mname), 2)
    end
    local method = C.moe_route_method_from_name(mname)
    if method < 0 then moe._check(C.MOE_ERR_ARG, "moe.route") end
    local cfg = cfg_box[0]
    cfg.method = method
    cfg.top_k = int_arg(args, "top_k", 1)
    cfg.n_group = int_arg(args, "n_group", 0)
    cfg.topk_group = int_arg(args, "topk_group", 0)
    local scale = args.scale
    if scale == nil then scale = 1 end
    if type(scale) ~= "number" then
      error("moe.route: scale: expected a number, got " .. describe(scale), 2)
    end
    cfg.scale = scale
    local normalize = args.normalize
    if normalize == nil then normalize = true end
    if type(normalize) ~= "boolean" then
      error("moe.route: normalize: expected a boolean, got " .. describe(normalize), 2)
    end
    cfg.normalize = normalize and 1 or 0
    cfg.weights_dtype = args.weights_dtype == nil and C.MOE_F32 or
                        moe._dtype(args.weights_dtype, "moe.route", "weights_dtype")
    ids_box[0] = ids and ids.h or nil
    w_box[0] = weights and weights.h or nil
    local st = C.moe_route(cfg_box, logits.h, bias and bias.h or nil, ids_box, w_box,
                           replay and replay.h or nil)
    local ih, wh = ids_box[0], w_box[0]
    ids_box[0], w_box[0] = nil, nil
    moe._check(st, "moe.route")
    return setmetatable({
      ids = ids or moe._wrap(ih),
      weights = weights or moe._wrap(wh),
      method = mname,
      top_k = tonumber(cfg.top_k),
    }, Result)
  end

  moe.RouteResult = Result
end
