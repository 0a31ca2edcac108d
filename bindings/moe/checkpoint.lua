-- moe.checkpoint -- moe.model.load_hf: a Hugging Face style checkpoint directory as a moe.model.
--
--   local m = moe.model.load_hf("Qwen3-30B-A3B", {layers = 4})        -- first 4 MoE layers
--   local m = moe.model.load_hf("DeepSeek-V3", {layers = {3, 10}})    -- model.layers.3 .. 10
--   local tr = m:run{tokens = 512, device = "cuda"}                   -- as with a preset
--
-- The directory holds config.json and either model.safetensors.index.json (weight_map: tensor
-- name -> shard file) or a single model.safetensors.  config.json gives the preset fields
-- (H, I, E, K, routing method, groups, scale, shared experts, which layers are MoE); the
-- returned model's loader reads one MoE layer's router, routing bias and experts when the run
-- reaches it, stacks the per-expert matrices into the engine's layout (W13 [E, 2I, H] gate
-- rows first, W2 [E, H, I]) and frees them after the layer.  Shards are opened (mmapped) on
-- first use and kept open; only the tensors a layer needs are read.  Naming and layouts per
-- model family: docs/guide.md ("Checkpoints").
local ffi = require("ffi")
local json = require("moe.json")

return function(moe)
  local C = moe.C
  local describe = moe._describe
  local M = moe.model
  if not M then error("moe.checkpoint: moe.model must be installed first (init.lua order)", 0) end

  local FN = "moe.model.load_hf"
  local file_box = ffi.new("moe_st_file*[1]")
  local tensor_box = ffi.new("moe_tensor*[1]")

  -- ------------------------------------------------------------------ files --

  local function read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local s = f:read("*a")
    f:close()
    return s
  end

  local function decode_json(path, what)
    local text = read_file(path)
    if not text then return nil end
    local ok, v = pcall(json.decode, text)
    if not ok then error(string.format("%s: %s: %s is not valid JSON: %s", FN, what, path, tostring(v)), 0) end
    if type(v) ~= "table" then error(string.format("%s: %s: %s: expected a JSON object", FN, what, path), 0) end
    return v
  end

  local function basename(p) return (p:gsub("/+$", ""):match("([^/]*)$")) end

  local shape_str = moe._shape_str

  -- --------------------------------------------------------- config mapping --
  -- Each family: method, the config keys of E, K, I, and which decoder layers are MoE.
  local FAMILIES = {
    deepseek = {method = "deepseekv3", layout = "per_expert", E = "n_routed_experts", I = "moe_intermediate_size"},
    qwen_moe = {method = "renormalize", layout = "per_expert", E = "num_experts", I = "moe_intermediate_size"},
    olmoe = {method = "default", layout = "per_expert", E = "num_experts", I = "intermediate_size"},
    mixtral = {method = "renormalize", layout = "mixtral", E = "num_local_experts", I = "intermediate_size"},
    minimax = {method = "minimax2", layout = "mixtral", E = "num_local_experts", I = "intermediate_size"},
    gpt_oss = {method = "renormalize", layout = "gpt_oss", E = "num_local_experts", I = "intermediate_size",
               activation = "swiglu_oai"},
    llama4 = {method = "llama4", layout = "llama4", E = "num_local_experts", I = "intermediate_size"},
  }
  local MODEL_TYPES = {
    deepseek_v3 = "deepseek", kimi_k2 = "deepseek", glm4_moe = "deepseek",
    qwen3_moe = "qwen_moe", qwen2_moe = "qwen_moe", mixtral = "mixtral", gpt_oss = "gpt_oss",
    llama4 = "llama4", llama4_text = "llama4", minimax_m2 = "minimax", minimax = "minimax", olmoe = "olmoe",
  }
  local ARCHITECTURES = {
    DeepseekV3ForCausalLM = "deepseek_v3", Glm4MoeForCausalLM = "glm4_moe",
    Qwen3MoeForCausalLM = "qwen3_moe", Qwen2MoeForCausalLM = "qwen2_moe", MixtralForCausalLM = "mixtral",
    GptOssForCausalLM = "gpt_oss", Llama4ForConditionalGeneration = "llama4", Llama4ForCausalLM = "llama4_text",
    MiniMaxM2ForCausalLM = "minimax_m2", OlmoeForCausalLM = "olmoe",
  }

  local function known_types()
    local r = {}
    for k in pairs(MODEL_TYPES) do r[#r + 1] = k end
    table.sort(r)
    return table.concat(r, ", ")
  end

  -- A config value: positive integer (required unless a default is given).
  local function int_field(cfg, key, path, default)
    local v = cfg[key]
    if v == nil or v == json.null then
      if default ~= nil then return default end
      error(string.format("%s: config: %s has no %q (needed for this model type)", FN, path, key), 0)
    end
    if type(v) ~= "number" or v % 1 ~= 0 or v < 0 then
      error(string.format("%s: config: %s: %q: expected a non-negative integer, got %s", FN, path, key,
                          describe(v)), 0)
    end
    return v
  end

  local function num_field(cfg, key, path, default)
    local v = cfg[key]
    if v == nil or v == json.null then return default end
    if type(v) ~= "number" then
      error(string.format("%s: config: %s: %q: expected a number, got %s", FN, path, key, describe(v)), 0)
    end
    return v
  end

  local function bool_field(cfg, key, default)
    local v = cfg[key]
    if v == nil or v == json.null then return default end
    return v == true
  end

  -- Which model type: model_type, else the first known architecture.
  local function model_type_of(raw, path)
    local mt = raw.model_type
    if type(mt) == "string" and MODEL_TYPES[mt] then return mt end
    if type(raw.architectures) == "table" then
      for _, a in ipairs(raw.architectures) do
        if ARCHITECTURES[a] then return ARCHITECTURES[a] end
      end
    end
    local archs = type(raw.architectures) == "table" and table.concat(raw.architectures, ", ") or "none"
    error(string.format("%s: config: %s: unknown model_type %s (architectures: %s); known model types: %s",
                        FN, path, describe(mt), archs, known_types()), 0)
  end

  -- Decoder layer i (0-based) is a MoE layer?
  local function moe_layer_pred(fam, mt, cfg, path, nl)
    if fam == "deepseek" then
      local first = int_field(cfg, "first_k_dense_replace", path, 0)
      local freq = mt == "glm4_moe" and 1 or int_field(cfg, "moe_layer_freq", path, 1)
      if freq < 1 then freq = 1 end
      return function(i) return i >= first and i % freq == 0 end
    elseif fam == "qwen_moe" then
      local step = int_field(cfg, "decoder_sparse_step", path, 1)
      if step < 1 then step = 1 end
      local dense = {}
      if type(cfg.mlp_only_layers) == "table" then
        for _, i in ipairs(cfg.mlp_only_layers) do dense[i] = true end
      end
      return function(i) return not dense[i] and (i + 1) % step == 0 end
    elseif fam == "llama4" then
      local set = {}
      if type(cfg.moe_layers) == "table" and #cfg.moe_layers > 0 then
        for _, i in ipairs(cfg.moe_layers) do set[i] = true end
      else
        local step = int_field(cfg, "interleave_moe_layer_step", path, 1)
        if step < 1 then step = 1 end
        for i = step - 1, nl - 1, step do set[i] = true end
      end
      return function(i) return set[i] == true end
    end
    return function() return true end
  end

  -- config.json -> the preset-shaped cfg table (without the layer range).
  local function map_config(raw, path)
    local mt = model_type_of(raw, path)
    local fam = MODEL_TYPES[mt]
    local F = FAMILIES[fam]
    -- multimodal wrappers (Llama 4) keep the language model's fields in text_config
    local cfg = raw
    if type(raw.text_config) == "table" then
      cfg = {}
      for k, v in pairs(raw) do cfg[k] = v end
      for k, v in pairs(raw.text_config) do cfg[k] = v end
    end
    local c = {model_type = mt, family = fam, layout = F.layout, method = F.method,
               activation = F.activation or "swiglu", shared = 0}
    c.H = int_field(cfg, "hidden_size", path)
    c.num_hidden_layers = int_field(cfg, "num_hidden_layers", path)
    c.E = int_field(cfg, F.E, path)
    c.I = int_field(cfg, F.I, path)
    if fam == "gpt_oss" then
      c.K = cfg.experts_per_token ~= nil and int_field(cfg, "experts_per_token", path)
            or int_field(cfg, "num_experts_per_tok", path)
      c.expert_bias = true
      c.router_bias = true
      c.limit = num_field(cfg, "swiglu_limit", path, 7)
    else
      c.K = int_field(cfg, "num_experts_per_tok", path)
    end
    if fam == "deepseek" then
      c.n_group = int_field(cfg, "n_group", path, 1)
      c.topk_group = int_field(cfg, "topk_group", path, 1)
      c.scale = num_field(cfg, "routed_scaling_factor", path, 1)
      local ns = int_field(cfg, "n_shared_experts", path, 0)
      if ns > 0 then c.shared, c.shared_I = ns, ns * c.I end
      c.first_k_dense_replace = int_field(cfg, "first_k_dense_replace", path, 0)
      c.norm_topk_prob = bool_field(cfg, "norm_topk_prob", true)
      -- moelab's deepseekv3 method is sigmoid scoring with normalised weights (DeepSeek-V3's
      -- noaux_tc); softmax scoring (DeepSeek-V2's greedy / group_limited_greedy) is another router
      local sf = cfg.scoring_func
      if sf ~= nil and sf ~= json.null and sf ~= "sigmoid" then
        error(string.format("%s: config: %s: scoring_func %s: the deepseekv3 method scores with sigmoid; " ..
                            "softmax routers (DeepSeek-V2 style) are not mapped", FN, path, describe(sf)), 0)
      end
      if not c.norm_topk_prob then
        error(string.format("%s: config: %s: norm_topk_prob false: the deepseekv3 method always normalises " ..
                            "the chosen weights", FN, path), 0)
      end
    elseif fam == "qwen_moe" or fam == "olmoe" then
      c.norm_topk_prob = bool_field(cfg, "norm_topk_prob", false)
      c.method = c.norm_topk_prob and "renormalize" or "default"
      if mt == "qwen2_moe" then
        local si = int_field(cfg, "shared_expert_intermediate_size", path, 0)
        if si > 0 then c.shared, c.shared_I = 1, si end
      end
    elseif fam == "llama4" then
      c.shared, c.shared_I = 1, c.I
    end
    if c.E < 1 or c.K < 1 or c.K > c.E then
      error(string.format("%s: config: %s: expected 1 <= experts per token (%d) <= experts (%d)", FN, path,
                          c.K, c.E), 0)
    end
    c.is_moe = moe_layer_pred(fam, mt, cfg, path, c.num_hidden_layers)
    return c
  end
  M._hf_map_config = map_config

  -- -------------------------------------------------------------- tensors --
  -- A source: the directory, its weight map (name -> shard file) and the open shards.
  local Source = {}
  Source.__index = Source

  local function open_source(dir)
    local src = setmetatable({dir = dir, shards = {}}, Source)
    local index_path = dir .. "/model.safetensors.index.json"
    local index = decode_json(index_path, "index")
    if index then
      if type(index.weight_map) ~= "table" then
        error(string.format("%s: index: %s has no weight_map object", FN, index_path), 0)
      end
      src.map = index.weight_map
      src.where = index_path
    else
      local single = dir .. "/model.safetensors"
      local fh = io.open(single, "rb")
      if fh then fh:close() else
        error(string.format("%s: dir: %s has neither model.safetensors.index.json nor model.safetensors", FN, dir), 0)
      end
      src.single = "model.safetensors"
      src.where = single
    end
    return src
  end

  -- The open shard file (mmapped once, kept until the source is collected).
  function Source:shard(file, for_name)
    local f = self.shards[file]
    if f then return f end
    local path = self.dir .. "/" .. file
    file_box[0] = nil
    local st = C.moe_st_open(path, file_box)
    f = file_box[0]
    file_box[0] = nil
    if st ~= 0 then
      error(string.format("%s: shard %s (holding %s) cannot be opened: %s", FN, path, for_name,
                          ffi.string(C.moe_last_error())), 0)
    end
    f = ffi.gc(f, C.moe_st_close)
    self.shards[file] = f
    return f
  end

  -- Shard file name of a tensor, or nil.
  function Source:file_of(name)
    if self.map then
      local v = self.map[name]
      return type(v) == "string" and v or nil
    end
    local f = self:shard(self.single, name)
    return C.moe_st_find(f, name) >= 0 and self.single or nil
  end

  function Source:has(name) return self:file_of(name) ~= nil end

  -- Tensor names (for prefix detection and GPT-OSS checks).
  function Source:names()
    local r = {}
    if self.map then
      for k in pairs(self.map) do r[#r + 1] = k end
    else
      local f = self:shard(self.single, "the tensor list")
      for i = 0, C.moe_st_count(f) - 1 do r[#r + 1] = ffi.string(C.moe_st_name(f, i)) end
    end
    return r
  end

  -- A host tensor viewing the mapped shard (read-only by contract); shape checked.
  function Source:get(name, shape, what)
    local file = self:file_of(name)
    if not file then
      if self.map then
        error(string.format("%s: tensor %s (%s) is missing: it is not in the weight_map of %s", FN, name,
                            what, self.where), 0)
      end
      error(string.format("%s: tensor %s (%s) is missing from the shard %s", FN, name, what, self.where), 0)
    end
    local f = self:shard(file, name)
    local i = C.moe_st_find(f, name)
    if i < 0 then
      error(string.format("%s: tensor %s (%s) is missing from the shard %s/%s (the index names that shard)",
                          FN, name, what, self.dir, file), 0)
    end
    tensor_box[0] = nil
    local st = C.moe_st_get(f, i, tensor_box)
    local h = tensor_box[0]
    tensor_box[0] = nil
    if st ~= 0 then
      error(string.format("%s: tensor %s in %s/%s: %s", FN, name, self.dir, file, ffi.string(C.moe_last_error())), 0)
    end
    local t = moe._wrap(h)
    if shape then
      local s = t:shape()
      local ok = #s == #shape
      for d = 1, #shape do ok = ok and s[d] == shape[d] end
      if not ok then
        t:free()
        error(string.format("%s: tensor %s (%s) in %s/%s: expected shape %s, got %s", FN, name, what, self.dir,
                            file, shape_str(shape), shape_str(s)), 0)
      end
    end
    return t
  end

  -- A weight matrix as a tensor of real values: FP8 checkpoints store e4m3 codes with either
  -- 128x128 block scales `<name>_scale_inv` (DeepSeek-V3 / Kimi K2 / Qwen3-FP8 / GLM-FP8:
  -- w = code * scale_inv per block) or a per-tensor `<name>_scale` (compressed-tensors); both
  -- are dequantised here (to bf16) with the engine's fp8_block / fp8 dequantiser.
  function Source:get_weight(name, shape, what)
    local t = self:get(name, shape, what)
    if t:dtype() ~= "f8_e4m3" then return t end
    local block, per_tensor = name .. "_scale_inv", name .. "_scale"
    local mode, sname
    if self:has(block) then
      mode, sname = "fp8_block", block
    elseif self:has(per_tensor) then
      mode, sname = "fp8", per_tensor
    else
      t:free()
      error(string.format("%s: tensor %s (%s) is FP8 (e4m3) but neither %s nor %s is in the checkpoint", FN, name,
                          what, block, per_tensor), 0)
    end
    local sc = self:get(sname, nil, "scales of " .. name)
    local s32 = sc:to("f32")
    sc:free()
    if mode == "fp8" and s32:numel() == 1 then
      local r = s32:reshape({})
      s32:free()
      s32 = r
    end
    local ok, q = pcall(moe.quant_from_parts, {mode = mode, data = t, scales = s32})
    if not ok then
      t:free(); s32:free()
      error(string.format("%s: tensor %s (%s) with scales %s: %s", FN, name, what, sname, tostring(q)), 0)
    end
    local w = q:dequantize("bf16")
    q:free(); t:free(); s32:free()
    return w
  end

  -- Copy a source tensor into dst (a view) and free the source view.
  local function fill(dst, src)
    dst:copy_(src)
    src:free()
  end

  -- --------------------------------------------------------------- layouts --

  -- Names of one MoE layer in each layout.  p = "<prefix>layers.N."
  local function per_expert_names(c, p)
    local shared = c.model_type == "qwen2_moe" and "shared_expert" or "shared_experts"
    return {
      router = p .. "mlp.gate.weight",
      bias = {p .. "mlp.gate.e_score_correction_bias", p .. "mlp.e_score_correction_bias"},
      gate = function(e) return p .. "mlp.experts." .. e .. ".gate_proj.weight" end,
      up = function(e) return p .. "mlp.experts." .. e .. ".up_proj.weight" end,
      down = function(e) return p .. "mlp.experts." .. e .. ".down_proj.weight" end,
      shared_gate = p .. "mlp." .. shared .. ".gate_proj.weight",
      shared_up = p .. "mlp." .. shared .. ".up_proj.weight",
      shared_down = p .. "mlp." .. shared .. ".down_proj.weight",
      shared_expert_gate = p .. "mlp.shared_expert_gate.weight",
    }
  end

  local function mixtral_names(_, p)
    return {
      router = p .. "block_sparse_moe.gate.weight",
      bias = {p .. "block_sparse_moe.e_score_correction_bias", p .. "block_sparse_moe.gate.e_score_correction_bias"},
      gate = function(e) return p .. "block_sparse_moe.experts." .. e .. ".w1.weight" end,
      up = function(e) return p .. "block_sparse_moe.experts." .. e .. ".w3.weight" end,
      down = function(e) return p .. "block_sparse_moe.experts." .. e .. ".w2.weight" end,
    }
  end

  local NAMES = {per_expert = per_expert_names, mixtral = mixtral_names}

  -- Router and routing bias (f32, on dev).
  local function load_router(src, c, names, dev, w)
    local r = src:get_weight(names.router, {c.E, c.H}, "router weight [E, H]")
    w.router = r:to(dev, "f32")
    r:free()
    if c.method == "deepseekv3" or c.method == "minimax2" then
      for _, bn in ipairs(names.bias or {}) do
        if src:has(bn) then
          local b = src:get(bn, {c.E}, "routing bias [E]")
          w.bias = b:to(dev, "f32")
          b:free()
          break
        end
      end
    end
  end

  -- One gated MLP [rows of gate; rows of up] into dst [2I, H] and down into ddst [H, I].
  local function load_mlp(src, gname, uname, dname, I, H, what, dst, ddst)
    fill(dst:narrow(1, 1, I), src:get_weight(gname, {I, H}, what .. " gate projection [I, H]"))
    fill(dst:narrow(1, I + 1, I), src:get_weight(uname, {I, H}, what .. " up projection [I, H]"))
    fill(ddst, src:get_weight(dname, {H, I}, what .. " down projection [H, I]"))
  end

  -- Per-expert layouts (DeepSeek / Qwen / GLM / OLMoE, Mixtral / MiniMax).
  local function load_per_expert(src, c, p, dev, w)
    local names = NAMES[c.layout](c, p)
    load_router(src, c, names, dev, w)
    local E, I, H = c.E, c.I, c.H
    local gu = moe.empty({E, 2 * I, H}, {dtype = "bf16", device = "cpu"})
    local dn = moe.empty({E, H, I}, {dtype = "bf16", device = "cpu"})
    for e = 1, E do
      local g, d = gu:select(1, e), dn:select(1, e)
      load_mlp(src, names.gate(e - 1), names.up(e - 1), names.down(e - 1), I, H, "expert " .. (e - 1), g, d)
      g:free()
      d:free()
    end
    if c.shared > 0 then
      local Is = c.shared_I
      local sgu = moe.empty({1, 2 * Is, H}, {dtype = "bf16", device = "cpu"})
      local sdn = moe.empty({1, H, Is}, {dtype = "bf16", device = "cpu"})
      load_mlp(src, names.shared_gate, names.shared_up, names.shared_down, Is, H, "shared expert",
               sgu:select(1, 1), sdn:select(1, 1))
      w.shared_gate_up, w.shared_down = sgu, sdn
      if names.shared_expert_gate and src:has(names.shared_expert_gate) then
        local sg = src:get(names.shared_expert_gate, {1, H}, "shared expert gate [1, H]")
        w.shared_expert_gate = sg:to(dev, "f32")
        sg:free()
      end
    end
    w.gate_up, w.down = gu, dn
  end

  -- GPT-OSS: fused gate_up_proj [E, H, 2I], gate/up interleaved along the last dimension
  -- (column 2i is gate row i, column 2i+1 up row i), down_proj [E, I, H], biases, router bias.
  local function load_gpt_oss(src, c, p, dev, w)
    local E, I, H = c.E, c.I, c.H
    local pre = p .. "mlp."
    if src:has(pre .. "experts.gate_up_proj_blocks") then
      error(string.format("%s: tensor %s: MXFP4-packed experts (gate_up_proj_blocks/_scales) are not read; " ..
                          "load a dequantised bf16 checkpoint (for example saved by transformers with " ..
                          "Mxfp4Config(dequantize=True))", FN, pre .. "experts.gate_up_proj_blocks"), 0)
    end
    local r = src:get(pre .. "router.weight", {E, H}, "router weight [E, H]")
    w.router = r:to(dev, "f32")
    r:free()
    local rb = src:get(pre .. "router.bias", {E}, "router bias [E], added to the logits")
    w.router_bias = rb:to(dev, "f32")
    rb:free()
    local gu = moe.empty({E, 2 * I, H}, {dtype = "bf16", device = "cpu"})
    local src_gu = src:get(pre .. "experts.gate_up_proj", {E, H, 2 * I}, "experts gate_up_proj [E, H, 2I]")
    local pairs4 = src_gu:reshape({E, H, I, 2})
    for j = 1, 2 do -- 1: gate (even columns), 2: up (odd columns)
      local sel = pairs4:select(4, j)        -- [E, H, I]
      local tr = sel:transpose(2, 3)         -- [E, I, H]
      local dst = gu:narrow(2, (j - 1) * I + 1, I)
      dst:copy_(tr)
      dst:free(); tr:free(); sel:free()
    end
    pairs4:free()
    src_gu:free()
    local bgu = moe.empty({E, 2 * I}, {dtype = "f32", device = "cpu"})
    local src_b = src:get(pre .. "experts.gate_up_proj_bias", {E, 2 * I}, "experts gate_up_proj_bias [E, 2I]")
    local b3 = src_b:reshape({E, I, 2})
    for j = 1, 2 do
      local sel = b3:select(3, j)
      local dst = bgu:narrow(2, (j - 1) * I + 1, I)
      dst:copy_(sel)
      dst:free(); sel:free()
    end
    b3:free()
    src_b:free()
    local dn = moe.empty({E, H, I}, {dtype = "bf16", device = "cpu"})
    local src_d = src:get(pre .. "experts.down_proj", {E, I, H}, "experts down_proj [E, I, H]")
    local tr = src_d:transpose(2, 3)
    dn:copy_(tr)
    tr:free()
    src_d:free()
    local bd = src:get(pre .. "experts.down_proj_bias", {E, H}, "experts down_proj_bias [E, H]")
    w.bias_down = bd:to(dev, "f32")
    bd:free()
    w.gate_up, w.down, w.bias_gate_up = gu, dn, bgu
  end

  -- Llama 4: gate_up_proj [E, H, 2I] with gate = columns [0, I), up = [I, 2I); down_proj
  -- [E, I, H]; router feed_forward.router.weight; shared expert feed_forward.shared_expert.*.
  local function load_llama4(src, c, p, dev, w)
    local E, I, H = c.E, c.I, c.H
    local pre = p .. "feed_forward."
    local r = src:get(pre .. "router.weight", {E, H}, "router weight [E, H]")
    w.router = r:to(dev, "f32")
    r:free()
    local gu = moe.empty({E, 2 * I, H}, {dtype = "bf16", device = "cpu"})
    local s = src:get(pre .. "experts.gate_up_proj", {E, H, 2 * I}, "experts gate_up_proj [E, H, 2I]")
    local tr = s:transpose(2, 3) -- [E, 2I, H]: rows [0, I) gate, [I, 2I) up, as ours
    gu:copy_(tr)
    tr:free(); s:free()
    local dn = moe.empty({E, H, I}, {dtype = "bf16", device = "cpu"})
    local sd = src:get(pre .. "experts.down_proj", {E, I, H}, "experts down_proj [E, I, H]")
    local td = sd:transpose(2, 3)
    dn:copy_(td)
    td:free(); sd:free()
    local Is = c.shared_I
    local sgu = moe.empty({1, 2 * Is, H}, {dtype = "bf16", device = "cpu"})
    local sdn = moe.empty({1, H, Is}, {dtype = "bf16", device = "cpu"})
    load_mlp(src, pre .. "shared_expert.gate_proj.weight", pre .. "shared_expert.up_proj.weight",
             pre .. "shared_expert.down_proj.weight", Is, H, "shared expert", sgu:select(1, 1), sdn:select(1, 1))
    w.gate_up, w.down, w.shared_gate_up, w.shared_down = gu, dn, sgu, sdn
  end

  local LOADERS = {per_expert = load_per_expert, mixtral = load_per_expert, gpt_oss = load_gpt_oss,
                   llama4 = load_llama4}

  -- Router tensor of a layer (relative to "<prefix>layers.N."), per layout: finds the prefix.
  local ROUTER = {per_expert = "mlp.gate.weight", mixtral = "block_sparse_moe.gate.weight",
                  gpt_oss = "mlp.router.weight", llama4 = "feed_forward.router.weight"}

  -- The prefix before "layers.N." of the language model's tensors ("model.",
  -- "language_model.model.", ...): among the prefixes seen in the names, the one under which
  -- the first MoE layer's router exists (a vision tower's "vision_model.model.layers.N." does
  -- not have one); "model." when none does (the missing-tensor error then names it).
  local function layer_prefix(src, layout, first)
    local seen, list = {}, {}
    for _, n in ipairs(src:names()) do
      local p = n:match("^(.-)layers%.%d+%.")
      if p and not seen[p] then seen[p] = true; list[#list + 1] = p end
    end
    table.sort(list, function(a, b) return #a < #b or (#a == #b and a < b) end)
    for _, p in ipairs(list) do
      if src:has(p .. "layers." .. first .. "." .. ROUTER[layout]) then return p end
    end
    return "model."
  end

  -- logits[t, :] += bias for every row t of logits [n, E] (GPT-OSS router bias; moe.route has no
  -- logits bias).  The broadcast rows are built once per bias tensor (doubling copies) and cached.
  local bias_rows = setmetatable({}, {__mode = "k"})
  function M.add_logits_bias(logits, bias)
    local fn = "moe.model.add_logits_bias"
    if not moe.is_tensor(logits) or logits:ndim() ~= 2 then
      error(fn .. ": logits: expected a tensor [n, E], got " .. describe(logits), 2)
    end
    local n, E = logits:shape()[1], logits:shape()[2]
    if not moe.is_tensor(bias) or bias:ndim() ~= 1 or bias:shape()[1] ~= E then
      error(string.format("%s: bias: expected a tensor [%d], got %s", fn, E, describe(bias)), 2)
    end
    if n == 0 then return logits end
    local rows = bias_rows[bias]
    if not rows or rows:is_freed() or rows:shape()[1] < n or rows:device() ~= logits:device() then
      rows = moe.empty({n, E}, {dtype = "f32", device = logits:device()})
      rows:select(1, 1):copy_(bias)
      local k = 1
      while k < n do
        local m = math.min(k, n - k)
        rows:narrow(1, k + 1, m):copy_(rows:narrow(1, 1, m))
        k = k + m
      end
      bias_rows[bias] = rows
    end
    moe.axpby(1, rows:narrow(1, 1, n), 1, logits)
    return logits
  end

  -- ----------------------------------------------------------- load_hf --

  local KNOWN_OPTS = {layers = true, device = true, size = true, name = true}

  --- moe.model.load_hf(dir, {layers = n | {first, last}, device =, name =})
  function M.load_hf(dir, opts)
    if type(dir) ~= "string" or dir == "" then
      error(FN .. ": dir: expected a checkpoint directory name, got " .. describe(dir), 2)
    end
    opts = opts or {}
    if type(opts) ~= "table" then error(FN .. ": opts: expected a table or nil, got " .. describe(opts), 2) end
    for k in pairs(opts) do
      if not KNOWN_OPTS[k] then
        error(FN .. ": opts: unknown option " .. describe(k) .. " (known: layers, device, name)", 2)
      end
    end
    if opts.size ~= nil then
      error(FN .. ": opts.size: a checkpoint has its own size (scale it with a preset instead), got " ..
            describe(opts.size), 2)
    end
    if opts.device ~= nil then moe._device(opts.device, FN, "opts.device", 3) end
    if opts.name ~= nil and type(opts.name) ~= "string" then
      error(FN .. ": opts.name: expected a string, got " .. describe(opts.name), 2)
    end
    dir = dir:gsub("/+$", "")
    local cfg_path = dir .. "/config.json"
    local raw = decode_json(cfg_path, "config")
    if not raw then error(string.format("%s: dir: %s has no config.json (or it cannot be read)", FN, dir), 2) end
    local ok, c = pcall(map_config, raw, cfg_path)
    if not ok then error(c, 2) end

    -- MoE layers of the whole checkpoint, then the chosen range
    local all = {}
    for i = 0, c.num_hidden_layers - 1 do
      if c.is_moe(i) then all[#all + 1] = i end
    end
    local ids = {}
    local L = opts.layers
    if L == nil then
      ids = all
    elseif type(L) == "number" then
      if L % 1 ~= 0 or L < 1 or L > #all then
        error(string.format("%s: opts.layers: expected a number of MoE layers in 1..%d (of %d decoder layers), " ..
                            "got %s", FN, #all, c.num_hidden_layers, describe(L)), 2)
      end
      for i = 1, L do ids[i] = all[i] end
    elseif type(L) == "table" then
      local a, b = L[1], L[2]
      local n = c.num_hidden_layers
      if #L ~= 2 or type(a) ~= "number" or type(b) ~= "number" or a % 1 ~= 0 or b % 1 ~= 0 or a < 0 or b >= n
         or a > b then
        error(string.format("%s: opts.layers: expected {first, last} with 0 <= first <= last <= %d (checkpoint " ..
                            "layer numbers, as in model.layers.N), got %s", FN, n - 1, describe(L)), 2)
      end
      for _, i in ipairs(all) do
        if i >= a and i <= b then ids[#ids + 1] = i end
      end
      if #ids == 0 then
        error(string.format("%s: opts.layers: layers %d..%d hold no MoE layer (MoE layers: %s)", FN, a, b,
                            #all > 0 and (all[1] .. ".." .. all[#all]) or "none"), 2)
      end
    else
      error(FN .. ": opts.layers: expected a number of MoE layers or {first, last}, got " .. describe(L), 2)
    end
    if #ids == 0 then error(string.format("%s: config: %s declares no MoE layer", FN, cfg_path), 2) end

    local sok, src = pcall(open_source, dir)
    if not sok then error(src, 2) end
    c.prefix = layer_prefix(src, c.layout, ids[1])
    c.is_moe = nil
    c.layer_ids = ids
    c.layers = #ids
    c.full_layers = #all
    c.name = opts.name or (type(raw._name_or_path) == "string" and raw._name_or_path ~= "" and
                           basename(raw._name_or_path)) or basename(dir)
    c.size = "checkpoint"
    c.seed = 0
    c.dir = dir
    if c.method == "deepseekv3" or c.method == "minimax2" then
      -- routing bias present when the first chosen layer has one
      local names = NAMES[c.layout](c, c.prefix .. "layers." .. ids[1] .. ".")
      for _, bn in ipairs(names.bias) do
        if src:has(bn) then c.bias = true break end
      end
    end
    local default_dev = opts.device
    local loader = function(self, l, dev)
      local cc = self.cfg
      if type(l) ~= "number" or l % 1 ~= 0 or l < 1 or l > cc.layers then
        error(string.format("m:layer_weights: l: expected a MoE layer 1..%d, got %s", cc.layers, describe(l)), 3)
      end
      dev = dev or default_dev or "cpu"
      local w = {}
      local p = cc.prefix .. "layers." .. cc.layer_ids[l] .. "."
      local lok, err = pcall(LOADERS[cc.layout], src, cc, p, dev, w)
      if not lok then
        for _, t in pairs(w) do t:free() end
        error(err, 3)
      end
      if dev ~= "cpu" then
        for _, k in ipairs{"gate_up", "down", "shared_gate_up", "shared_down", "bias_gate_up"} do
          if w[k] and w[k]:device() ~= moe._device_str(moe._device(dev)) then
            local t = w[k]:to(dev)
            w[k]:free()
            w[k] = t
          end
        end
      end
      return w
    end
    local m = setmetatable({cfg = c, source = "checkpoint:" .. dir, loader = loader, _src = src}, M.Model)
    return m
  end
end
