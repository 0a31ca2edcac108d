-- moe.fused -- fused MoE layers: packed experts, and routing -> experts -> combine in one call.
--
--   local ex = moe.experts{gate_up = W13, down = W2, activation = "swiglu", device = "cuda"}
--   local y = moe.fused_moe{hidden = x, logits = L, experts = ex, method = "renormalize",
--                           top_k = 8, replay = buf}
--   local y2, r = moe.fused_moe{hidden = x, experts = ex,
--                               routed = {ids = ids, weights = w}, return_routing = true}
--
-- W13 is [E, 2I, H] (gate rows first, then up; [E, I, H] for relu2), W2 [E, H, I], f32 or
-- bf16 on any device; they are packed once (bf16) on the experts' device.  hidden is bf16
-- [T, H]; the result is bf16 [T, H].  On CUDA each experts object keeps a workspace sized for
-- the largest T seen (ex:reserve(T, K) sizes it ahead); it cannot grow while a CUDA graph is
-- being captured, so run once (or reserve) before capturing.  Semantics: docs/fused.md.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local describe = moe._describe
  local CUDA = C.MOE_DEVICE_CUDA

  local ex_box = ffi.new("moe_experts*[1]")
  local ws_box = ffi.new("moe_workspace*[1]")
  local out_box = ffi.new("moe_tensor*[1]")
  local ecfg_box = ffi.new("moe_experts_cfg[1]")
  local fcfg_box = ffi.new("moe_fused_cfg[1]")
  local skipped_box = ffi.new("int64_t[1]")

  local Experts = {}
  Experts.__index = Experts

  -- args[key] as a tensor (nil when absent and not required); level as error() counts it here.
  local function tensor_arg(fn, args, key, required, level)
    local v = args[key]
    if v == nil and not required then return nil end
    moe._tensor_arg(v, fn, key, (level or 4) + 1)
    return v
  end

  local function num_arg(fn, args, key, default, int)
    local v = args[key]
    if v == nil then return default end
    if type(v) ~= "number" or v ~= v or (int and (v % 1 ~= 0 or v < -2 ^ 31 or v >= 2 ^ 31)) then
      error(fn .. ": " .. key .. ": expected " .. (int and "an integer" or "a number") .. ", got " ..
            describe(v), 4)
    end
    return v
  end

  local function check_known(fn, args, known, list)
    if type(args) ~= "table" then
      error(fn .. ": args: expected a table, got " .. describe(args), 3)
    end
    for k in pairs(args) do
      if not known[k] then
        error(fn .. ": " .. describe(k) .. ": unknown argument (known: " .. list .. ")", 3)
      end
    end
  end

  local EX_LIST = "gate_up, down, activation, bias_gate_up, bias_down, alpha, beta, limit, device, quant"
  local EX_KNOWN = {}
  for k in EX_LIST:gmatch("[%w_]+") do EX_KNOWN[k] = true end

  function moe.experts(args)
    local fn = "moe.experts"
    check_known(fn, args, EX_KNOWN, EX_LIST)
    -- quantised experts (docs/quantization.md, "Fused MoE per mode"): quant = mode, gate_up /
    -- down f32/bf16 tensors (quantised here) or qtensors of the mode (moe.quantize,
    -- moe.quant_from_parts); a qtensor alone implies its mode
    local quant = args.quant
    if quant ~= nil and type(quant) ~= "string" then
      error(fn .. ": quant: expected a quantisation mode name (" .. table.concat(moe.quant_modes(), ", ") ..
            "), got " .. describe(quant), 2)
    end
    local q13, q2
    for _, key in ipairs({ "gate_up", "down" }) do
      local v = args[key]
      if moe.is_qtensor and moe.is_qtensor(v) then
        if v._h == nil then error(fn .. ": " .. key .. ": quantised tensor was freed", 2) end
        quant = quant or v.mode
        if key == "gate_up" then q13 = v else q2 = v end
      end
    end
    local w13 = not q13 and tensor_arg(fn, args, "gate_up", true, 3) or nil
    local w2 = not q2 and tensor_arg(fn, args, "down", true, 3) or nil
    local b13 = tensor_arg(fn, args, "bias_gate_up", false, 3)
    local b2 = tensor_arg(fn, args, "bias_down", false, 3)
    local cfg = ecfg_box[0]
    local def = C.moe_experts_cfg_default()
    cfg.activation = def.activation
    cfg.alpha, cfg.beta, cfg.limit = def.alpha, def.beta, def.limit
    local aname = args.activation or "swiglu"
    if type(aname) ~= "string" then
      error(fn .. ": activation: expected one of swiglu, geglu, relu2, swiglu_oai, got " ..
            describe(aname), 2)
    end
    local act = C.moe_activation_from_name(aname)
    if act < 0 then moe._check(C.MOE_ERR_ARG, fn) end
    cfg.activation = act
    cfg.alpha = num_arg(fn, args, "alpha", def.alpha)
    cfg.beta = num_arg(fn, args, "beta", def.beta)
    cfg.limit = num_arg(fn, args, "limit", def.limit)
    local dev
    if args.device ~= nil then
      dev = moe._device(args.device, fn, "device")
    elseif w13 then
      dev = C.moe_tensor_device(w13.h)
    else
      dev = C.moe_qtensor_device(q13._h)
    end
    ex_box[0] = nil
    local st
    if quant ~= nil then
      local mode = C.moe_quant_mode_from_name(quant)
      if mode < 0 then moe._check(C.MOE_ERR_ARG, fn) end
      st = C.moe_experts_new_quant(ex_box, ecfg_box, mode, w13 and w13.h or nil, w2 and w2.h or nil,
                                   q13 and q13._h or nil, q2 and q2._h or nil, b13 and b13.h or nil,
                                   b2 and b2.h or nil, dev)
    else
      st = C.moe_experts_new(ex_box, ecfg_box, w13.h, w2.h, b13 and b13.h or nil,
                             b2 and b2.h or nil, dev)
    end
    local h = ex_box[0]
    ex_box[0] = nil
    moe._check(st, fn)
    return setmetatable({
      h = ffi.gc(h, C.moe_experts_free),
      E = tonumber(C.moe_experts_num(h)),
      H = tonumber(C.moe_experts_hidden(h)),
      I = tonumber(C.moe_experts_intermediate(h)),
      activation = aname,
      quant = ffi.string(C.moe_quant_mode_name(C.moe_experts_quant(h))),
      device = moe._device_str(dev),
      is_cuda = dev.type == CUDA,
      ws = nil, ws_T = 0, ws_K = 0,
    }, Experts)
  end

  local function E_(self, fn)
    if getmetatable(self) ~= Experts then
      error(fn .. ": self: expected an experts object (moe.experts{...}), got " .. describe(self), 3)
    end
    if self.h == nil then error(fn .. ": experts were freed", 3) end
    return self.h
  end

  function Experts:__tostring()
    if self.h == nil then return "moe.experts(<freed>)" end
    return string.format("moe.experts(E=%d, H=%d, I=%d, activation=%s, quant=%s, device=%s, %.1f MB)",
                         self.E, self.H, self.I, self.activation, self.quant, self.device,
                         tonumber(C.moe_experts_nbytes(self.h)) / 1e6)
  end

  function Experts:nbytes() return tonumber(C.moe_experts_nbytes(E_(self, "ex:nbytes"))) end

  local function free_ws(self)
    local ws = self.ws
    if ws ~= nil then
      self.ws = nil
      ffi.gc(ws, nil)
      C.moe_workspace_free(ws)
    end
    self.ws_T, self.ws_K = 0, 0
  end

  -- Idempotent.
  function Experts:free()
    free_ws(self)
    local h = self.h
    if h ~= nil then
      self.h = nil
      ffi.gc(h, nil)
      C.moe_experts_free(h)
    end
  end

  -- Make the cached workspace hold at least T tokens with top_k K (CUDA only; a no-op on the
  -- CPU, which needs none).  Returns self.
  function Experts:reserve(T, K)
    local h = E_(self, "ex:reserve")
    if type(T) ~= "number" or T < 0 or T % 1 ~= 0 then
      error("ex:reserve: T: expected a non-negative integer, got " .. describe(T), 2)
    end
    if type(K) ~= "number" or K < 1 or K % 1 ~= 0 then
      error("ex:reserve: K: expected a positive integer, got " .. describe(K), 2)
    end
    if not self.is_cuda then return self end
    if self.ws ~= nil and self.ws_K == K and self.ws_T >= T then return self end
    if C.moe_graph_capturing() ~= 0 then
      error(string.format("ex:reserve: the workspace (T <= %d, K = %d) is too small for T = %d, " ..
                          "K = %d and cannot grow during CUDA graph capture: call ex:reserve(%d, %d) " ..
                          "or run once before capturing", self.ws_T, self.ws_K, T, K, T, K), 3)
    end
    local newT = T
    if self.ws_K == K and self.ws_T > newT then newT = self.ws_T end
    free_ws(self)
    ws_box[0] = nil
    local st = C.moe_workspace_new(ws_box, C.moe_experts_device(h), newT, K, h)
    local ws = ws_box[0]
    ws_box[0] = nil
    moe._check(st, "ex:reserve")
    self.ws = ffi.gc(ws, C.moe_workspace_free)
    self.ws_T, self.ws_K = newT, K
    return self
  end

  -- Wait for the device and raise if routed ids out of [0, E) were skipped on CUDA since the
  -- last check; returns the count (0).
  function Experts:check()
    E_(self, "ex:check")
    if self.ws == nil then return 0 end
    local st = C.moe_workspace_check(self.ws, skipped_box)
    moe._check(st, "ex:check")
    return tonumber(skipped_box[0])
  end

  moe.Experts = Experts

  local FM_LIST = "hidden, logits, bias, experts, method, top_k, n_group, topk_group, scale, " ..
                  "normalize, replay, local_offset, local_count, out, routed, return_routing, " ..
                  "ids_out, weights_out"
  local FM_KNOWN = {}
  for k in FM_LIST:gmatch("[%w_]+") do FM_KNOWN[k] = true end

  function moe.fused_moe(args)
    local fn = "moe.fused_moe"
    check_known(fn, args, FM_KNOWN, FM_LIST)
    local ex = args.experts
    if getmetatable(ex) ~= Experts then
      error(fn .. ": experts: expected an experts object (moe.experts{...}), got " .. describe(ex), 2)
    end
    if ex.h == nil then error(fn .. ": experts: experts were freed", 2) end
    local hidden = tensor_arg(fn, args, "hidden", true, 3)
    local logits = tensor_arg(fn, args, "logits", false, 3)
    local bias = tensor_arg(fn, args, "bias", false, 3)
    local replay = tensor_arg(fn, args, "replay", false, 3)
    local out = tensor_arg(fn, args, "out", false, 3)
    local ids_out = tensor_arg(fn, args, "ids_out", false, 3)
    local weights_out = tensor_arg(fn, args, "weights_out", false, 3)
    local rids, rw
    if args.routed ~= nil then
      if type(args.routed) ~= "table" then
        error(fn .. ": routed: expected a table {ids = i32 [T, K], weights = f32 [T, K]}, got " ..
              describe(args.routed), 2)
      end
      for k in pairs(args.routed) do
        if k ~= "ids" and k ~= "weights" then
          error(fn .. ": routed: unknown field " .. describe(k) .. " (known: ids, weights)", 2)
        end
      end
      rids = tensor_arg(fn .. ": routed", args.routed, "ids", true, 3)
      rw = tensor_arg(fn .. ": routed", args.routed, "weights", true, 3)
    end
    local cfg = fcfg_box[0]
    local def = C.moe_fused_cfg_default()
    cfg.route = def.route
    local mname = args.method or "renormalize"
    if type(mname) ~= "string" then
      error(fn .. ": method: expected a method name (see moe.routing_methods()), got " ..
            describe(mname), 2)
    end
    local method = C.moe_route_method_from_name(mname)
    if method < 0 then moe._check(C.MOE_ERR_ARG, fn) end
    cfg.route.method = method
    local K
    if rids then
      local s = rids:shape()
      K = s[2] or 0
      cfg.route.top_k = K
    else
      K = num_arg(fn, args, "top_k", 1, true)
      cfg.route.top_k = K
    end
    cfg.route.n_group = num_arg(fn, args, "n_group", 0, true)
    cfg.route.topk_group = num_arg(fn, args, "topk_group", 0, true)
    cfg.route.scale = num_arg(fn, args, "scale", 1)
    local normalize = args.normalize
    if normalize == nil then normalize = true end
    if type(normalize) ~= "boolean" then
      error(fn .. ": normalize: expected a boolean, got " .. describe(normalize), 2)
    end
    cfg.route.normalize = normalize and 1 or 0
    cfg.local_offset = num_arg(fn, args, "local_offset", 0, true)
    cfg.local_count = num_arg(fn, args, "local_count", -1, true)
    local T = hidden:shape()[1] or 0
    local want_routing = args.return_routing
    if want_routing ~= nil and type(want_routing) ~= "boolean" then
      error(fn .. ": return_routing: expected a boolean, got " .. describe(want_routing), 2)
    end
    if want_routing and K >= 1 then
      local dev = hidden:device()
      ids_out = ids_out or moe.empty({ T, K }, { dtype = "i32", device = dev })
      weights_out = weights_out or moe.empty({ T, K }, { dtype = "f32", device = dev })
    end
    local ws = nil
    if ex.is_cuda and K >= 1 and K <= 32 then
      if ex.ws == nil or ex.ws_K ~= K or ex.ws_T < T then
        if C.moe_graph_capturing() ~= 0 then
          error(string.format("%s: the experts' workspace (T <= %d, K = %d) is too small for T = %d, " ..
                              "K = %d and cannot grow during CUDA graph capture: call " ..
                              "experts:reserve(%d, %d) or run once before capturing",
                              fn, ex.ws_T, ex.ws_K, T, K, T, K), 2)
        end
        ex:reserve(T, K)
      end
      ws = ex.ws
    end
    out_box[0] = out and out.h or nil
    local st = C.moe_fused_moe(fcfg_box, ex.h, hidden.h, logits and logits.h or nil,
                               bias and bias.h or nil, rids and rids.h or nil, rw and rw.h or nil,
                               replay and replay.h or nil, out_box, ids_out and ids_out.h or nil,
                               weights_out and weights_out.h or nil, ws)
    local oh = out_box[0]
    out_box[0] = nil
    moe._check(st, fn)
    local y = out or moe._wrap(oh)
    if want_routing then return y, { ids = ids_out, weights = weights_out } end
    return y
  end

  -- moe.fused_paths() -> {cpu = n, gemv = n, tile = n, wreg = n, wgmma = n, gemv_route = n,
  -- wgmma_rs = n, wreg_i4f16 = n, wgmma_rs_i4f16 = n, wgmma_rs_xonce = n, gemv_bulk = n,
  -- gemv_route_bulk = n}: how many fused_moe calls
  -- each kernel path ran since the start or moe.fused_paths_reset()
  -- (process-wide; a call captured into a CUDA graph counts once, at capture).
  -- moe.fused_paths(true) also resets the counts after reading them.
  local counts_box = ffi.new("int64_t[?]", tonumber(C.MOE_FUSED_PATH_COUNT))
  function moe.fused_paths(reset)
    if reset ~= nil and type(reset) ~= "boolean" then
      error("moe.fused_paths: reset: expected a boolean or nil, got " .. describe(reset), 2)
    end
    C.moe_fused_path_counts(counts_box)
    local r = {}
    for i = 0, tonumber(C.MOE_FUSED_PATH_COUNT) - 1 do
      r[ffi.string(C.moe_fused_path_name(i))] = tonumber(counts_box[i])
    end
    if reset then C.moe_fused_path_reset() end
    return r
  end
  function moe.fused_paths_reset() C.moe_fused_path_reset() end

  function moe.activations()
    local r = {}
    for i = 0, tonumber(C.MOE_ACTIVATION_COUNT) - 1 do r[#r + 1] = ffi.string(C.moe_activation_name(i)) end
    return r
  end
end
