-- moe.model -- model presets and a synthetic multi-layer MoE stack that records routing traces.
--
--   local m  = moe.model.preset("qwen3-30b-a3b", {size = "tiny"})
--   local tr = m:run{tokens = 512, quant = "bf16", device = "cpu", seed = 0, trace = "bf16.safetensors"}
--
-- Per MoE layer: RMSNorm -> router GEMM in f32 (routers stay unquantised) -> routing with replay
-- into the trace -> fused MoE in the chosen quantisation (+ shared expert) -> residual add.
-- Weights are synthetic and deterministic: layer l's tensors are drawn from Philox streams keyed
-- by (seed, layer, tensor), generated when the layer runs and freed after it, so no run holds
-- more than one layer's weights.  Initialisation is Kaiming-uniform (as torch.nn.Linear):
-- U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the router gets std 1/sqrt(H) so that logits of a
-- normalised token have unit scale; the down projection is scaled by 1/sqrt(2 * layers), as in
-- GPT-2-style residual scaling, to keep the residual stream bounded over many layers.
local ffi = require("ffi")

return function(moe)
  local M = {}
  moe.model = M

  -- ---------------------------------------------------------------- presets --
  -- H, I, E, shared experts (+ their I), K, method, groups, scale, activation and the number
  -- of MoE layers of each model (dense layers of the real model are not modelled).
  local PRESETS = {
    ["deepseek-v3"]     = {H = 7168, I = 2048, E = 256, shared = 1, shared_I = 2048, K = 8, method = "deepseekv3",
                           n_group = 8, topk_group = 4, scale = 2.5, bias = true, layers = 58,
                           note = "61 layers, first 3 dense"},
    ["kimi-k2"]         = {H = 7168, I = 2048, E = 384, shared = 1, shared_I = 2048, K = 8, method = "deepseekv3",
                           n_group = 1, topk_group = 1, scale = 2.827, bias = true, layers = 60,
                           note = "61 layers, first dense"},
    ["glm-4.5"]         = {H = 5120, I = 1536, E = 160, shared = 1, shared_I = 1536, K = 8, method = "deepseekv3",
                           n_group = 1, topk_group = 1, scale = 2.5, bias = true, layers = 89,
                           note = "92 layers, first 3 dense"},
    ["qwen3-30b-a3b"]   = {H = 2048, I = 768, E = 128, shared = 0, K = 8, method = "renormalize", layers = 48},
    ["qwen3-235b-a22b"] = {H = 4096, I = 1536, E = 128, shared = 0, K = 8, method = "renormalize", layers = 94},
    ["mixtral-8x7b"]    = {H = 4096, I = 14336, E = 8, shared = 0, K = 2, method = "renormalize", layers = 32},
    ["mixtral-8x22b"]   = {H = 6144, I = 16384, E = 8, shared = 0, K = 2, method = "renormalize", layers = 56},
    ["llama4-scout"]    = {H = 5120, I = 8192, E = 16, shared = 1, shared_I = 8192, K = 1, method = "llama4", layers = 48},
    ["llama4-maverick"] = {H = 5120, I = 8192, E = 128, shared = 1, shared_I = 8192, K = 1, method = "llama4",
                           layers = 24, note = "48 layers, MoE every other layer"},
    ["gpt-oss-20b"]     = {H = 2880, I = 2880, E = 32, shared = 0, K = 4, method = "renormalize",
                           activation = "swiglu_oai", expert_bias = true, layers = 24},
    ["gpt-oss-120b"]    = {H = 2880, I = 2880, E = 128, shared = 0, K = 4, method = "renormalize",
                           activation = "swiglu_oai", expert_bias = true, layers = 36},
    ["minimax-m2"]      = {H = 3072, I = 1536, E = 256, shared = 0, K = 8, method = "minimax2", bias = true, layers = 62},
    ["olmoe"]           = {H = 2048, I = 1024, E = 64, shared = 0, K = 8, method = "default", layers = 16},
  }
  local ORDER = {"deepseek-v3", "kimi-k2", "glm-4.5", "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b",
                 "mixtral-8x22b", "llama4-scout", "llama4-maverick", "gpt-oss-20b", "gpt-oss-120b",
                 "minimax-m2", "olmoe"}
  -- Scaled sizes keep E, K and the router; H and I are multiples of 128 so every quantisation
  -- block size (16, 32, 128) divides them.
  local SIZES = {
    full = nil,
    small = {H = 1024, I = 512, layers = 8},
    tiny = {H = 256, I = 128, layers = 4},
  }

  local function copy(t)
    local r = {}
    for k, v in pairs(t) do r[k] = v end
    return r
  end

  --- List of preset names, in a stable order.
  function M.presets()
    local r = {}
    for i, n in ipairs(ORDER) do r[i] = n end
    return r
  end

  --- The configuration table of a preset at a size ("full", "small", "tiny").
  function M.config(name, size)
    local fn = "moe.model.config"
    local p = PRESETS[name]
    if not p then
      error(string.format("%s: name: expected one of %s, got %s", fn, table.concat(ORDER, ", "),
                          moe._describe(name)), 3)
    end
    size = size or "full"
    if size ~= "full" and not SIZES[size] then
      error(string.format("%s: size: expected \"full\", \"small\" or \"tiny\", got %s", fn, moe._describe(size)), 3)
    end
    local c = copy(p)
    c.name, c.size = name, size
    c.full_layers = p.layers
    c.activation = c.activation or "swiglu"
    if size ~= "full" then
      local s = SIZES[size]
      c.H, c.I, c.layers = s.H, s.I, math.min(s.layers, p.layers)
      if c.shared_I then c.shared_I = s.I end
    end
    return c
  end

  -- ------------------------------------------------------------------ model --
  local Model = {}
  Model.__index = Model

  --- moe.model.preset(name, {size = "tiny"|"small"|"full", layers = n, seed = 0})
  function M.preset(name, opts)
    opts = opts or {}
    local c = M.config(name, opts.size)
    if opts.layers ~= nil then
      if type(opts.layers) ~= "number" or opts.layers < 1 or opts.layers % 1 ~= 0 then
        error("moe.model.preset: opts.layers: expected a positive integer, got " .. moe._describe(opts.layers), 2)
      end
      c.layers = opts.layers
    end
    c.seed = opts.seed or 0
    return setmetatable({cfg = c, source = "synthetic"}, Model)
  end

  function Model:__tostring()
    local c = self.cfg
    return string.format("moe model %s (%s): H %d, I %d, E %d%s, K %d, %s%s, %d MoE layers, %s weights",
      c.name, c.size, c.H, c.I, c.E, c.shared > 0 and ("+" .. c.shared) or "", c.K, c.method,
      c.n_group and c.n_group > 1 and string.format(" %d/%d groups", c.n_group, c.topk_group) or "",
      c.layers, self.source)
  end

  -- Philox stream ids: seed * 2^20 + layer * 64 + tensor, kept below 2^53 in Lua numbers.
  local function stream(seed, layer, what)
    return (seed % 4096) * 1048576 + layer * 64 + what
  end

  local function uniform(shape, bound, seed, dev, dtype)
    return moe.rand(shape, {lo = -bound, hi = bound, seed = seed, device = dev, dtype = dtype or "bf16"})
  end

  --- Weights of MoE layer l (1-based) on device dev: router f32 [E, H], routing bias f32 [E]
  --- (methods with a bias), W13 bf16 [E, 2I, H], W2 bf16 [E, H, I], and for presets with a
  --- shared expert W13s [1, 2Is, H], W2s [1, H, Is]; per-expert biases for swiglu_oai models.
  function Model:layer_weights(l, dev)
    if self.loader then return self.loader(self, l, dev) end
    local c = self.cfg
    local s = c.seed
    local H, I, E = c.H, c.I, c.E
    local gated = c.activation ~= "relu2"
    local rows = gated and 2 * I or I
    local w = {}
    -- router: std 1/sqrt(H) -> U(-sqrt(3/H), sqrt(3/H)), f32
    w.router = uniform({E, H}, math.sqrt(3 / H), stream(s, l, 1), dev, "f32")
    if c.bias then
      -- e_score_correction_bias: small per-expert offsets, as learned by aux-loss-free balancing
      w.bias = uniform({E}, 0.02, stream(s, l, 2), dev, "f32")
    end
    local res = 1 / math.sqrt(2 * c.full_layers)
    w.gate_up = uniform({E, rows, H}, 1 / math.sqrt(H), stream(s, l, 3), dev)
    w.down = uniform({E, H, I}, res / math.sqrt(I), stream(s, l, 4), dev)
    if c.expert_bias then
      w.bias_gate_up = uniform({E, rows}, 0.05, stream(s, l, 5), dev, "f32")
      w.bias_down = uniform({E, H}, 0.05 * res, stream(s, l, 6), dev, "f32")
    end
    if c.shared > 0 then
      local Is = c.shared_I
      w.shared_gate_up = uniform({1, 2 * Is, H}, 1 / math.sqrt(H), stream(s, l, 7), dev)
      w.shared_down = uniform({1, H, Is}, res / math.sqrt(Is), stream(s, l, 8), dev)
    end
    return w
  end

  --- Token hidden states [T, H] bf16 with realistic statistics: unit-scale Gaussian features
  --- plus a few "massive activation" channels (x 20) as observed in the residual streams of
  --- large LMs.  Deterministic in (seed, T, H).
  function Model:tokens(T, opts)
    opts = opts or {}
    local c = self.cfg
    local dev = opts.device
    local x = moe.randn({T, c.H}, {seed = stream(opts.seed or 0, 1000, 9), device = dev, dtype = "f32"})
    local ch = {1, math.floor(c.H / 3) + 1, math.floor(2 * c.H / 3) + 1}
    for i, j in ipairs(ch) do
      local col = moe.randn({T, 1}, {seed = stream(opts.seed or 0, 1000, 9 + i), device = dev, dtype = "f32",
                                     mean = 0, std = 20})
      x:narrow(2, j, 1):copy_(col)
    end
    return x:to("bf16")
  end


  -- ------------------------------------------------------------- progress --
  -- A progress bar on stderr: redrawn at most 10 times a second on a terminal, plain lines
  -- (at most one per 10%) otherwise; `finish` prints the timing summary.
  local isatty_cache
  local function stderr_is_tty()
    if isatty_cache == nil then
      pcall(ffi.cdef, "int isatty(int fd);")
      local ok, r = pcall(function() return ffi.C.isatty(2) end)
      isatty_cache = ok and r == 1
    end
    return isatty_cache
  end

  local function now()
    return os.clock()
  end
  pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } moe_lua_timespec; " ..
                  "int clock_gettime(int clk, moe_lua_timespec *tp);")
  local ts = ffi.new("moe_lua_timespec")
  local ok_clock = pcall(function() return ffi.C.clock_gettime(1, ts) end)
  if ok_clock then
    now = function()
      ffi.C.clock_gettime(1, ts)
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
  end
  M.now = now

  local Progress = {}
  Progress.__index = Progress

  function M.progress(label, total, opts)
    opts = opts or {}
    local p = setmetatable({label = label, total = total, done = 0, t0 = now(), last = -1,
                            last_pct = -1, tty = stderr_is_tty(), quiet = opts.quiet}, Progress)
    return p
  end

  function Progress:step(n, what)
    self.done = self.done + (n or 1)
    if self.quiet then return end
    local t = now()
    local frac = self.total > 0 and self.done / self.total or 1
    if self.tty then
      if t - self.last < 0.1 and self.done < self.total then return end
      self.last = t
      local width = 30
      local fill = math.floor(frac * width + 0.5)
      local el = t - self.t0
      local eta = frac > 0 and el / frac - el or 0
      io.stderr:write(string.format("\r%s [%s%s] %3d%% %s %.1fs elapsed, ~%.1fs left \27[K",
        self.label, string.rep("#", fill), string.rep(".", width - fill), math.floor(frac * 100),
        what or "", el, eta))
    else
      local pct = math.floor(frac * 10) * 10
      if pct > self.last_pct then
        self.last_pct = pct
        io.stderr:write(string.format("%s: %d%% %s(%.1fs)\n", self.label, pct, what and (what .. " ") or "",
                                      t - self.t0))
      end
    end
  end

  function Progress:finish(summary)
    local el = now() - self.t0
    if not self.quiet then
      if self.tty then io.stderr:write("\r\27[K") end
      io.stderr:write(string.format("%s: done in %.2fs%s\n", self.label, el, summary and (" (" .. summary .. ")") or ""))
    end
    return el
  end

  -- --------------------------------------------------------------- running --
  local QUANTS = {bf16 = true, fp8 = true, fp8_block = true, nvfp4 = true, mxfp4 = true, mxint4 = true}

  local function default_device()
    return moe.cuda_available() and "cuda" or "cpu"
  end

  -- Build the experts object of one layer in one quantisation mode.
  local function make_experts(c, w, quant, dev)
    local args = {gate_up = w.gate_up, down = w.down, activation = c.activation, device = dev,
                  bias_gate_up = w.bias_gate_up, bias_down = w.bias_down}
    if quant ~= "bf16" then args.quant = quant end
    return moe.experts(args)
  end

  local function make_shared(w, quant, dev)
    if not w.shared_gate_up then return nil end
    local args = {gate_up = w.shared_gate_up, down = w.shared_down, activation = "swiglu", device = dev}
    if quant ~= "bf16" then args.quant = quant end
    return moe.experts(args)
  end

  -- Forward one MoE layer for rows [r0, r0 + n) of the residual stream x (f32 [T, H]) with the
  -- experts of every mode in `states` (one state per mode: its own x, trace, experts).
  local function layer_forward(c, w, st, l, r0, n)
    local x = st.x:narrow(1, r0, n)
    local h = st.h:narrow(1, 1, n)
    moe.rmsnorm(x, nil, {eps = 1e-6, out = h})          -- bf16 normalised hidden states
    local logits = st.logits:narrow(1, 1, n)
    moe.matmul_nt(h, w.router, {out = logits})          -- router GEMM, f32
    if w.router_bias then M.add_logits_bias(logits, w.router_bias) end -- GPT-OSS router bias
    local replay = st.trace:replay(l):narrow(1, r0, n)
    local y = st.y:narrow(1, 1, n)
    moe.fused_moe{hidden = h, logits = logits, bias = w.bias, experts = st.ex, method = c.method,
                  top_k = c.K, n_group = c.n_group, topk_group = c.topk_group, scale = c.scale,
                  replay = replay, out = y}
    if st.shared then
      local ys = st.ys:narrow(1, 1, n)
      moe.fused_moe{hidden = h, experts = st.shared, out = ys,
                    routed = {ids = st.shared_ids:narrow(1, 1, n), weights = st.shared_w:narrow(1, 1, n)}}
      moe.axpby(1, ys, 1, y)
    end
    moe.axpby(1, y, 1, x)                                -- residual add (f32 stream)
  end

  local function new_state(self, quant, T, batch, dev, seed, x0)
    local c = self.cfg
    local st = {quant = quant}
    st.x = x0:to("f32") -- always a new tensor: each mode has its own residual stream
    st.h = moe.empty({batch, c.H}, {dtype = "bf16", device = dev})
    st.y = moe.empty({batch, c.H}, {dtype = "bf16", device = dev})
    st.logits = moe.empty({batch, c.E}, {dtype = "f32", device = dev})
    if c.shared > 0 then
      st.ys = moe.empty({batch, c.H}, {dtype = "bf16", device = dev})
      st.shared_ids = moe.zeros({batch, 1}, {dtype = "i32", device = dev})
      st.shared_w = moe.full({batch, 1}, 1, {dtype = "f32", device = dev})
    end
    st.trace = moe.trace.new{layers = c.layers, top_k = c.K, num_experts = c.E, capacity = T, device = dev,
                             meta = {model = c.name, size = c.size, method = c.method, quant = quant,
                                     seed = tostring(seed), tokens = tostring(T),
                                     source = self.source, device = dev}}
    return st
  end

  local function check_quant(fn, q)
    if not QUANTS[q] then
      error(string.format("%s: quant: expected one of bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4, got %s",
                          fn, moe._describe(q)), 4)
    end
  end

  -- Run the stack in several modes on the same tokens, layer by layer: each layer's weights
  -- are generated once and quantised into every mode.  Returns {mode = trace}, seconds.
  function Model:run_modes(opts)
    local fn = opts._fn or "m:run_modes"
    local c = self.cfg
    local quants = opts.quants
    local dev = opts.device or default_device()
    local seed = opts.seed or 0
    local x0
    if opts.hidden ~= nil then
      x0 = opts.hidden
      if not moe.is_tensor(x0) or #x0:shape() ~= 2 or x0:shape()[2] ~= c.H then
        error(string.format("%s: hidden: expected a tensor [T, %d], got %s", fn, c.H, moe._describe(x0)), 3)
      end
      x0 = x0:to(dev)
    else
      local T = opts.tokens or 256
      if type(T) ~= "number" or T < 1 or T % 1 ~= 0 then
        error(fn .. ": tokens: expected a positive integer, got " .. moe._describe(T), 3)
      end
      x0 = self:tokens(T, {seed = seed, device = dev})
    end
    local T = x0:shape()[1]
    local batch = opts.batch or math.min(T, 4096)
    if type(batch) ~= "number" or batch < 1 or batch % 1 ~= 0 then
      error(fn .. ": batch: expected a positive integer, got " .. moe._describe(batch), 3)
    end
    batch = math.min(batch, T)
    local states = {}
    for i, q in ipairs(quants) do
      check_quant(fn, q)
      states[i] = new_state(self, q, T, batch, dev, seed, x0)
    end
    local prog = M.progress(string.format("%s %s [%s] on %s", c.name, c.size, table.concat(quants, ","), dev),
                            c.layers * #quants, {quiet = opts.quiet})
    for l = 1, c.layers do
      local w = self:layer_weights(l, dev)
      for _, st in ipairs(states) do
        st.ex = make_experts(c, w, st.quant, dev)
        st.shared = make_shared(w, st.quant, dev)
        for r0 = 1, T, batch do
          layer_forward(c, w, st, l, r0, math.min(batch, T - r0 + 1))
        end
        st.ex:free()
        st.ex = nil
        if st.shared then st.shared:free(); st.shared = nil end
        prog:step(1, string.format("layer %d/%d %s", l, c.layers, st.quant))
      end
      for _, t in pairs(w) do t:free() end
    end
    local result = {}
    for _, st in ipairs(states) do
      moe.synchronize(dev)
      st.trace:commit(T)
      result[st.quant] = st.trace
      st.final = st.x
    end
    local secs = prog:finish(string.format("%d tokens x %d layers x %d modes", T, c.layers, #quants))
    return result, secs, states
  end

  --- m:run{tokens = T | hidden = x, batch =, quant = "bf16", device =, seed = 0, trace = path}
  --- Runs the stack and returns its routing trace (saved to `trace` when given).
  function Model:run(opts)
    opts = opts or {}
    local fn = "m:run"
    for k in pairs(opts) do
      if not ({tokens = 1, hidden = 1, batch = 1, quant = 1, device = 1, seed = 1, trace = 1, quiet = 1})[k] then
        error(fn .. ": " .. moe._describe(k) .. ": unknown option (known: tokens, hidden, batch, quant, device, " ..
              "seed, trace, quiet)", 2)
      end
    end
    local q = opts.quant or "bf16"
    check_quant(fn, q)
    local traces, _, states = self:run_modes{quants = {q}, tokens = opts.tokens, hidden = opts.hidden,
                                             batch = opts.batch, device = opts.device, seed = opts.seed,
                                             quiet = opts.quiet, _fn = fn}
    local tr = traces[q]
    if opts.trace then tr:save(opts.trace) end
    self.last_hidden = states[1].final
    return tr
  end

  -- ------------------------------------------------------------ experiment --
  local function rel_l2(a, b)
    local ta, tb = a:to("cpu"):to("f32"), b:to("cpu"):to("f32")
    local n = ta:numel()
    local pa = ffi.cast("const float*", ta:data_ptr())
    local pb = ffi.cast("const float*", tb:data_ptr())
    local num, den = 0, 0
    for i = 0, n - 1 do
      local d = pa[i] - pb[i]
      num = num + d * d
      den = den + pb[i] * pb[i]
    end
    return den > 0 and math.sqrt(num / den) or 0
  end

  local function write_file(path, text)
    local f, err = io.open(path, "w")
    if not f then error("moe.experiment: out: cannot write " .. path .. ": " .. tostring(err), 3) end
    f:write(text)
    f:close()
  end

  local MODE_COLOURS = {fp8 = "#1f77b4", fp8_block = "#2ca02c", nvfp4 = "#d62728", mxfp4 = "#9467bd",
                        mxint4 = "#ff7f0e", bf16 = "#7f7f7f"}

  --- moe.experiment{model = m | "preset", size = "tiny", layers =, quants = {...}, tokens = T, hidden = x,
  ---                batch =, device =, seed = 0, out = dir, quiet = false}
  --- Runs every mode on the same tokens, compares each mode's trace with the bf16 one and
  --- writes dir/report.md, dir/summary.json, dir/router_disagreement.svg, dir/traces/*.safetensors
  --- and a full comparison report per mode in dir/<mode>/.  Returns the summary table.
  function moe.experiment(opts)
    local fn = "moe.experiment"
    if type(opts) ~= "table" then error(fn .. ": opts: expected a table, got " .. moe._describe(opts), 2) end
    local known = {model = 1, size = 1, layers = 1, quants = 1, tokens = 1, hidden = 1, batch = 1, device = 1,
                   seed = 1, out = 1, quiet = 1}
    for k in pairs(opts) do
      if not known[k] then
        error(fn .. ": " .. moe._describe(k) .. ": unknown option (known: model, size, layers, quants, tokens, " ..
              "hidden, batch, device, seed, out, quiet)", 2)
      end
    end
    local m = opts.model or "qwen3-30b-a3b"
    if type(m) == "string" then m = M.preset(m, {size = opts.size or "tiny", layers = opts.layers, seed = opts.seed}) end
    if getmetatable(m) ~= Model then
      error(fn .. ": model: expected a preset name or a moe.model object, got " .. moe._describe(m), 2)
    end
    local quants = opts.quants or {"bf16", "fp8", "fp8_block", "nvfp4", "mxfp4", "mxint4"}
    if type(quants) ~= "table" or #quants == 0 then
      error(fn .. ": quants: expected a non-empty list of modes, got " .. moe._describe(quants), 2)
    end
    local list = {"bf16"}
    for _, q in ipairs(quants) do
      check_quant(fn, q)
      if q ~= "bf16" then list[#list + 1] = q end
    end
    local out = opts.out
    if out ~= nil and type(out) ~= "string" then
      error(fn .. ": out: expected a directory name, got " .. moe._describe(out), 2)
    end
    local dev = opts.device or default_device()
    local traces, secs, states = m:run_modes{quants = list, tokens = opts.tokens or 512, hidden = opts.hidden,
                                             batch = opts.batch,
                                             device = dev, seed = opts.seed, quiet = opts.quiet, _fn = fn}
    local ref = traces.bf16
    local final = {}
    for _, st in ipairs(states) do final[st.quant] = st.x end
    local c = m.cfg
    local rows = {}
    for _, q in ipairs(list) do
      if q ~= "bf16" then
        local cmp = moe.trace.compare(ref, traces[q])
        rows[#rows + 1] = {mode = q, cmp = cmp, router_disagreement = cmp.router_disagreement,
                           token_disagreement = cmp.token_disagreement,
                           mean_layers_differing = cmp.mean_layers_differing, jaccard = cmp.jaccard,
                           overlap = cmp.overlap, output_rel_l2 = rel_l2(final[q], final.bf16)}
      end
    end
    local summary = {model = c.name, size = c.size, layers = c.layers, H = c.H, I = c.I, E = c.E, K = c.K,
                     method = c.method, tokens = ref:tokens(), device = dev, seed = opts.seed or 0,
                     seconds = secs, modes = {}}
    for i, r in ipairs(rows) do
      summary.modes[i] = {mode = r.mode, router_disagreement = r.router_disagreement,
                          token_disagreement = r.token_disagreement,
                          mean_layers_differing = r.mean_layers_differing, jaccard = r.jaccard,
                          overlap = r.overlap, output_rel_l2 = r.output_rel_l2}
    end
    summary.text = M.summary_text(summary)
    if out then
      os.execute("mkdir -p '" .. out:gsub("'", "'\\''") .. "/traces'")
      for _, q in ipairs(list) do traces[q]:save(out .. "/traces/" .. q .. ".safetensors") end
      local md = {string.format("# Routing drift under quantisation: %s (%s)\n", c.name, c.size),
                  string.format("%d tokens, %d MoE layers, H %d, I %d, E %d, K %d, method %s, device %s, seed %d. " ..
                                "Each mode runs the same tokens through the same synthetic weights; its routing " ..
                                "trace is compared with the bf16 run's.\n", summary.tokens, c.layers, c.H, c.I, c.E,
                                c.K, c.method, dev, summary.seed),
                  "| mode | router disagreement | token disagreement | mean layers differing | Jaccard | overlap@K " ..
                  "| output rel. L2 vs bf16 | details |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"}
      for _, r in ipairs(rows) do
        md[#md + 1] = string.format("| %s | %.2f%% | %.2f%% | %.3f | %.4f | %.4f | %.3e | [%s/report.md](%s/report.md) |",
          r.mode, 100 * r.router_disagreement, 100 * r.token_disagreement, r.mean_layers_differing, r.jaccard,
          r.overlap, r.output_rel_l2, r.mode, r.mode)
        r.cmp:report(out .. "/" .. r.mode)
      end
      if #rows > 0 then
        local cats = {}
        for l = 1, c.layers do cats[l] = tostring(l - 1) end
        local series = {}
        for i, r in ipairs(rows) do
          local v = {}
          for l = 1, c.layers do v[l] = r.cmp.per_layer[l].router_disagreement end
          series[i] = {r.mode, MODE_COLOURS[r.mode] or "#444444", v}
        end
        local report = require("moe.trace_report")
        write_file(out .. "/router_disagreement.svg",
          report.bar_chart("Router disagreement vs bf16 per layer", cats, series, "layer",
                           "router disagreement (%)", "%.1f", 100, "layer", "%"))
        md[#md + 1] = "\n![router disagreement per layer](router_disagreement.svg)\n"
      end
      md[#md + 1] = string.format("\nRun time %.2f s. Traces: `traces/<mode>.safetensors` (compare any two with " ..
                                  "`moe trace compare`). Summary as JSON: `summary.json`.\n", secs)
      write_file(out .. "/report.md", table.concat(md, "\n"))
      local js = {}
      for k, v in pairs(summary) do if k ~= "text" then js[k] = v end end
      write_file(out .. "/summary.json", require("moe.json").encode(js, {indent = 2}) .. "\n")
      summary.report = out .. "/report.md"
    end
    summary.traces = traces
    return summary
  end

  function M.summary_text(s)
    local lines = {string.format("%s (%s): %d tokens x %d layers, E %d, K %d, %s on %s, %.2f s", s.model, s.size,
                                 s.tokens, s.layers, s.E, s.K, s.method, s.device, s.seconds),
                   string.format("  %-10s %10s %10s %9s %8s %8s %12s", "mode", "router dis", "token dis",
                                 "layers/t", "jaccard", "overlap", "out rel L2")}
    for _, r in ipairs(s.modes) do
      lines[#lines + 1] = string.format("  %-10s %9.2f%% %9.2f%% %9.3f %8.4f %8.4f %12.3e", r.mode,
        100 * r.router_disagreement, 100 * r.token_disagreement, r.mean_layers_differing, r.jaccard, r.overlap,
        r.output_rel_l2)
    end
    return table.concat(lines, "\n")
  end
  M.Model = Model
  return M
end
