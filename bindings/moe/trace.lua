-- moe.trace -- routing replay traces: recording, files, comparison, statistics, reports.
--
--   local tr = moe.trace.new{layers = 4, top_k = 8, num_experts = 128, capacity = 2048,
--                            device = "cuda", meta = {model = "qwen3-30b-a3b", quant = "fp8"}}
--   for each batch of T tokens:
--     for l = 1, 4 do moe.route{logits = L[l], top_k = 8, replay = tr:replay(l)} end
--     tr:commit(T)
--   tr:save("fp8.safetensors")
--   local c = moe.trace.compare(moe.trace.load("bf16.safetensors"), tr)
--   print(c); print(c:json()); c:report("report/")
--
-- Layers are numbered 1..L in Lua calls (tr:replay(1) is the first MoE layer); printed tables,
-- reports and files count them 0..L-1 like the arrays on disk.  Expert ids are always the
-- global ids 0..E-1.  Formulas: docs/traces.md.
local ffi = require("ffi")
local json = require("moe.json")

return function(moe)
  local C = moe.C
  local describe = moe._describe
  local check = moe._check

  local T = {}
  moe.trace = T

  local trace_box = ffi.new("moe_trace*[1]")
  local cmp_box = ffi.new("moe_trace_cmp*[1]")
  local sum_box = ffi.new("moe_trace_summary*[1]")
  local NAN = 0 / 0

  local Trace = {}
  Trace.__index = Trace
  T.Trace = Trace

  local function is_int(x) return type(x) == "number" and x % 1 == 0 and x == x end

  local function wrap(h)
    return setmetatable({ _h = ffi.gc(h, C.moe_trace_free) }, Trace)
  end

  local drain -- finishes a commit whose host copy is still in flight (defined below)

  local function H(self, fn)
    if getmetatable(self) ~= Trace then
      error(string.format("%s: self: expected a trace (call it as tr:%s(...)), got %s", fn,
                          fn:match("[:.](.*)$") or fn, describe(self)), 3)
    end
    if self._h == nil then error(fn .. ": trace was freed", 3) end
    if self._pending then drain(self, fn) end
    return self._h
  end

  function T.is_trace(x) return getmetatable(x) == Trace end

  local check_opts = moe._check_opts

  local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

  local function list_dir(dir)
    local names = {}
    local p = io.popen("ls -1 " .. shell_quote(dir) .. " 2>/dev/null")
    if p then
      for line in p:lines() do names[#names + 1] = line end
      p:close()
    end
    return names
  end

  local function mkdir_p(dir, fn, level)
    os.execute("mkdir -p " .. shell_quote(dir)) -- checked below by writing a probe file
    local f = io.open(dir .. "/.moe_probe", "w")
    if not f then error(string.format("%s: dir: cannot create or write %s", fn, dir), level) end
    f:close()
    os.remove(dir .. "/.moe_probe")
  end

  -- ------------------------------------------------------------ construction --

  local pin_box = ffi.new("moe_tensor*[1]")
  local ev_box = ffi.new("moe_event*[1]")
  local pshape = ffi.new("int64_t[1]")

  -- A 1-D host tensor in pinned memory (plain host memory without a CUDA device).
  local function pinned(shape, dtype)
    pshape[0] = shape[1]
    check(C.moe_tensor_new_pinned(pin_box, moe._dtype(dtype), 1, pshape), "moe.trace.new", 4)
    local h = pin_box[0]
    pin_box[0] = nil
    return moe._wrap(h)
  end

  local NEW_OPTS = { layers = true, top_k = true, num_experts = true, capacity = true,
                     weights = true, meta = true, device = true, dir = true,
                     chunk_tokens = true, parts = true }

  -- moe.trace.new{layers =, top_k =, num_experts =, capacity =, weights =, meta =, device =,
  --               dir =, chunk_tokens =, parts =}
  function T.new(opts)
    local fn = "moe.trace.new"
    if type(opts) ~= "table" then
      error(fn .. ": opts: expected a table {layers =, top_k =, ...}, got " .. describe(opts), 2)
    end
    check_opts(opts, fn, NEW_OPTS)
    local L, K, E = opts.layers, opts.top_k, opts.num_experts or 0
    if not (is_int(L) and L >= 1) then
      error(fn .. ": layers: expected a positive integer, got " .. describe(L), 2)
    end
    if not (is_int(K) and K >= 1) then
      error(fn .. ": top_k: expected a positive integer, got " .. describe(K), 2)
    end
    if not (is_int(E) and E >= 0) then
      error(fn .. ": num_experts: expected a non-negative integer, got " .. describe(E), 2)
    end
    local cap = opts.capacity
    if cap ~= nil and not (is_int(cap) and cap >= 1) then
      error(fn .. ": capacity: expected a positive integer (tokens per batch), got " .. describe(cap), 2)
    end
    if opts.meta ~= nil and type(opts.meta) ~= "table" then
      error(fn .. ": meta: expected a table of strings, got " .. describe(opts.meta), 2)
    end
    local ct = opts.chunk_tokens
    if ct ~= nil and not (is_int(ct) and ct >= 1) then
      error(fn .. ": chunk_tokens: expected a positive integer, got " .. describe(ct), 2)
    end
    if opts.dir ~= nil and type(opts.dir) ~= "string" then
      error(fn .. ": dir: expected a directory name, got " .. describe(opts.dir), 2)
    end
    local dev = moe._device(opts.device, fn, "device")
    check(C.moe_trace_new(trace_box, L, K, E, opts.weights and 1 or 0), fn)
    local tr = wrap(trace_box[0])
    trace_box[0] = nil
    for k, v in pairs(opts.meta or {}) do
      if type(k) ~= "string" then
        error(fn .. ": meta: expected string keys, got " .. describe(k), 2)
      end
      check(C.moe_trace_set_meta(tr._h, k, tostring(v)), fn)
    end
    if cap then
      tr._cap = cap
      -- One [L, capacity, K] buffer; layer l's replay buffer is its contiguous slice l, so a
      -- commit moves all layers with one device-to-host copy and resets them with one fill.
      tr._all = moe.empty({ L, cap, K }, { dtype = "i16", device = dev })
      tr._all:fill_(-1)
      tr._replay = {}
      for l = 1, L do tr._replay[l] = tr._all:select(1, l) end
      if opts.weights then
        tr._wall = moe.empty({ L, cap, K }, { dtype = "f32", device = dev })
        tr._wall:fill_(0)
        tr._wbuf = {}
        for l = 1, L do tr._wbuf[l] = tr._wall:select(1, l) end
      end
      if dev.type == C.MOE_DEVICE_CUDA then
        -- Asynchronous commits: the batch is copied on the device into a staging buffer, the
        -- replay buffers are reset, and the staging buffer goes to pinned host memory on a side
        -- stream while the next batch runs; the host side is appended at the next access.
        tr._stage = moe.empty({ L * cap * K }, { dtype = "i16", device = dev })
        tr._host = pinned({ L * cap * K }, "i16")
        if opts.weights then
          tr._wstage = moe.empty({ L * cap * K }, { dtype = "f32", device = dev })
          tr._whost = pinned({ L * cap * K }, "f32")
        end
      end
    end
    if opts.dir then
      mkdir_p(opts.dir, fn, 2)
      for _, name in ipairs(list_dir(opts.dir)) do
        if name:match("^chunk%-%d+.*%.safetensors$") then
          error(string.format("%s: dir: expected a directory without chunk files, but %s/%s exists",
                              fn, opts.dir, name), 2)
        end
      end
      tr._dir = opts.dir
      tr._chunk_tokens = ct or 65536
      tr._chunk = 1
      tr._part = 1
      tr._parts = opts.parts ~= false
      tr._part_files = {}
      tr._written = 0
    end
    return tr
  end

  -- ---------------------------------------------------------------- recording --

  function Trace:replay(layer)
    local fn = "tr:replay"
    H(self, fn)
    if not self._replay then
      error(fn .. ": this trace has no replay buffers (make it with moe.trace.new{capacity = T_max, ...})", 2)
    end
    if not (is_int(layer) and layer >= 1 and layer <= #self._replay) then
      error(string.format("%s: layer: expected 1..%d, got %s", fn, #self._replay, describe(layer)), 2)
    end
    return self._replay[layer]
  end

  -- Weights buffer of a layer (f32 [capacity, K]), for traces made with weights = true.
  function Trace:weights_buffer(layer)
    local fn = "tr:weights_buffer"
    H(self, fn)
    if not self._wbuf then
      error(fn .. ": this trace records no weights (make it with weights = true and a capacity)", 2)
    end
    if not (is_int(layer) and layer >= 1 and layer <= #self._wbuf) then
      error(string.format("%s: layer: expected 1..%d, got %s", fn, #self._wbuf, describe(layer)), 2)
    end
    return self._wbuf[layer]
  end

  -- Copy routing weights w ([T, K]) into the layer's weights buffer.
  function Trace:record_weights(layer, w)
    local buf = self:weights_buffer(layer)
    if not moe.is_tensor(w) then
      error("tr:record_weights: w: expected a tensor [T, K], got " .. describe(w), 2)
    end
    local n = w:shape()[1]
    buf:narrow(1, 1, n):copy_(w:to(buf:dtype()))
  end

  local function chunk_name(dir, c, p)
    if p then return string.format("%s/chunk-%06d.part-%06d.safetensors", dir, c, p) end
    return string.format("%s/chunk-%06d.safetensors", dir, c)
  end

  -- Write the tokens held in memory as the next completed chunk; drop its part files.
  local function flush_chunk(self, fn)
    local h = self._h
    local n = tonumber(C.moe_trace_tokens(h))
    if n == 0 then return end
    check(C.moe_trace_save(h, chunk_name(self._dir, self._chunk)), fn, 4)
    for _, p in ipairs(self._part_files) do os.remove(p) end
    self._part_files = {}
    self._chunk = self._chunk + 1
    self._part = 1
    self._written = self._written + n
    check(C.moe_trace_resize(h, 0), fn, 4)
  end

  -- Append the batch of n tokens held in the replay buffers (rows 1..n of every layer) and
  -- reset those rows to -1.  opts.token_ids: tensor or table of n token ids.
  -- Parts and chunks of a streamed trace after tokens t0.. were appended.
  local function after_append(self, fn, t0, n)
    local h = self._h
    if self._dir and n > 0 then
      if self._parts then
        local p = chunk_name(self._dir, self._chunk, self._part)
        check(C.moe_trace_save_range(h, p, t0, n), fn, 4)
        self._part_files[#self._part_files + 1] = p
        self._part = self._part + 1
      end
      if C.moe_trace_tokens(h) >= self._chunk_tokens then flush_chunk(self, fn) end
    end
  end

  -- Wait for the in-flight host copy of the last commit and append it to the trace.
  drain = function(self, fn)
    local p = self._pending
    self._pending = nil
    local h = self._h
    local st = C.moe_event_wait(p.ev)
    C.moe_event_free(ffi.gc(p.ev, nil))
    if st ~= 0 then check(st, fn, 4) end
    local L, K, n = p.L, p.K, p.n
    -- host staging holds [L, n, K]; the trace wants [n, L, K]
    local ids = self._host:narrow(1, 1, L * n * K):reshape({ L, n, K }):transpose(1, 2)
    local w = p.w and self._whost:narrow(1, 1, L * n * K):reshape({ L, n, K }):transpose(1, 2)
    local t0 = C.moe_trace_tokens(h)
    check(C.moe_trace_append(h, n, ids.h, w and w.h or nil, p.tok and p.tok.h or nil), fn, 4)
    after_append(self, fn, t0, n)
  end

  -- Append the batch of n tokens held in the replay buffers (rows 1..n of every layer) and
  -- reset those rows to -1.  opts.token_ids: tensor or table of n token ids.  On CUDA the copy
  -- to the host runs beside the next batch (see moe.trace.new); it is finished on the next
  -- access to the trace.
  function Trace:commit(n, opts)
    local fn = "tr:commit"
    local h = H(self, fn)
    opts = check_opts(opts, fn, { token_ids = true })
    if self._closed then error(fn .. ": trace was closed", 2) end
    if not self._replay then
      error(fn .. ": this trace has no replay buffers (make it with moe.trace.new{capacity = T_max, ...})", 2)
    end
    if not (is_int(n) and n >= 0 and n <= self._cap) then
      error(string.format("%s: n: expected 0..%d (the capacity), got %s", fn, self._cap, describe(n)), 2)
    end
    local tok = opts.token_ids
    if tok ~= nil and not moe.is_tensor(tok) then
      if type(tok) ~= "table" or #tok ~= n then
        error(string.format("%s: token_ids: expected a tensor or a table of %d ids, got %s", fn, n,
                            describe(tok)), 2)
      end
      tok = moe.tensor(tok, { dtype = "i32", device = "cpu" })
    end
    local t0 = C.moe_trace_tokens(h)
    if n == 0 then
      check(C.moe_trace_append(h, 0, nil, nil, nil), fn)
      return self:total_tokens()
    end
    local ids = self._all:narrow(2, 1, n)
    local w = self._wall and self._wall:narrow(2, 1, n)
    if self._stage then
      local L, K = self._all:shape()[1], self._all:shape()[3]
      local sv = self._stage:narrow(1, 1, L * n * K):reshape({ L, n, K })
      sv:copy_(ids)                    -- device to device, queued on the moelab stream
      ids:fill_(-1)
      local hv = self._host:narrow(1, 1, L * n * K)
      check(C.moe_tensor_copy_to_host_async(hv.h, sv:reshape({ L * n * K }).h, ev_box), fn)
      local pend = { n = n, L = L, K = K, tok = tok, ev = ffi.gc(ev_box[0], C.moe_event_free) }
      ev_box[0] = nil
      if w then
        local wv = self._wstage:narrow(1, 1, L * n * K):reshape({ L, n, K })
        wv:copy_(w)
        w:fill_(0)
        -- the weights copy is queued after the ids copy on the same side stream: one event
        -- (the later one) covers both
        C.moe_event_free(ffi.gc(pend.ev, nil))
        local st1 = C.moe_tensor_copy_to_host_async(self._whost:narrow(1, 1, L * n * K).h,
                                                    wv:reshape({ L * n * K }).h, ev_box)
        if st1 ~= 0 then check(st1, fn) end
        pend.ev = ffi.gc(ev_box[0], C.moe_event_free)
        ev_box[0] = nil
        pend.w = true
      end
      self._pending = pend
      return (self._written or 0) + tonumber(t0) + n
    end
    -- rows 1..n of every layer: [L, n, K] viewed as [n, L, K]; the engine copies it to the
    -- host in one transfer and reorders it there.
    local ids_t = ids:transpose(1, 2) -- locals keep the views alive during the call
    local w_t = w and w:transpose(1, 2)
    check(C.moe_trace_append(h, n, ids_t.h, w_t and w_t.h or nil, tok and tok.h or nil), fn)
    ids:fill_(-1)
    if w then w:fill_(0) end
    after_append(self, fn, t0, n)
    return self:total_tokens()
  end

  -- Append tokens from a tensor [n, L, K] (or a nested table) of ids; opts.weights
  -- ([n, L, K]) and opts.token_ids ([n]) optional.
  function Trace:append(ids, opts)
    local fn = "tr:append"
    local h = H(self, fn)
    opts = check_opts(opts, fn, { weights = true, token_ids = true })
    if type(ids) == "table" then ids = moe.tensor(ids, { dtype = "i32", device = "cpu" }) end
    if not moe.is_tensor(ids) then
      error(fn .. ": ids: expected a tensor [n, L, K] or a nested table, got " .. describe(ids), 2)
    end
    local w, tok = opts.weights, opts.token_ids
    if type(w) == "table" then w = moe.tensor(w, { dtype = "f32", device = "cpu" }) end
    if type(tok) == "table" then tok = moe.tensor(tok, { dtype = "i32", device = "cpu" }) end
    local n = ids:shape()[1] or 0
    check(C.moe_trace_append(h, n, ids.h, w and w.h or nil, tok and tok.h or nil), fn)
    return self
  end

  -- Flush the last chunk of a streamed trace (dir mode).  Returns the directory or the trace.
  function Trace:close()
    local fn = "tr:close"
    H(self, fn)
    if self._dir and not self._closed then flush_chunk(self, fn) end
    self._closed = true
    return self._dir or self
  end

  function Trace:free()
    local h = self._h
    if h ~= nil then
      ffi.gc(h, nil)
      C.moe_trace_free(h)
      self._h = nil
    end
    if self._pending then
      C.moe_event_free(ffi.gc(self._pending.ev, nil))
      self._pending = nil
    end
    self._replay, self._wbuf, self._all, self._wall = nil, nil, nil, nil
    self._stage, self._host, self._wstage, self._whost = nil, nil, nil, nil
  end

  -- ------------------------------------------------------------------ access --

  function Trace:tokens() return tonumber(C.moe_trace_tokens(H(self, "tr:tokens"))) end
  function Trace:layers() return tonumber(C.moe_trace_layers(H(self, "tr:layers"))) end
  function Trace:top_k() return tonumber(C.moe_trace_top_k(H(self, "tr:top_k"))) end
  function Trace:num_experts() return tonumber(C.moe_trace_num_experts(H(self, "tr:num_experts"))) end
  function Trace:has_weights() return C.moe_trace_has_weights(H(self, "tr:has_weights")) ~= 0 end
  function Trace:has_token_ids() return C.moe_trace_has_token_ids(H(self, "tr:has_token_ids")) ~= 0 end
  -- Tokens written to completed chunk files (dir mode) plus those held in memory.
  function Trace:total_tokens() return (self._written or 0) + self:tokens() end

  function Trace:set_num_experts(e)
    local h = H(self, "tr:set_num_experts")
    if not (is_int(e) and e >= 0) then
      error("tr:set_num_experts: e: expected a non-negative integer, got " .. describe(e), 2)
    end
    check(C.moe_trace_set_num_experts(h, e), "tr:set_num_experts")
    return self
  end

  function Trace:meta()
    local h = H(self, "tr:meta")
    local m = {}
    for i = 0, C.moe_trace_meta_count(h) - 1 do
      m[ffi.string(C.moe_trace_meta_key(h, i))] = ffi.string(C.moe_trace_meta_value(h, i))
    end
    return m
  end

  function Trace:set_meta(k, v)
    local h = H(self, "tr:set_meta")
    if type(k) ~= "string" then error("tr:set_meta: key: expected a string, got " .. describe(k), 2) end
    check(C.moe_trace_set_meta(h, k, v ~= nil and tostring(v) or nil), "tr:set_meta")
    return self
  end

  -- Ids of token t (1..T) at layer l (1..L) as a Lua array.
  function Trace:get(t, l)
    local h = H(self, "tr:get")
    local n, L, K = self:tokens(), self:layers(), self:top_k()
    if not (is_int(t) and t >= 1 and t <= n) then
      error(string.format("tr:get: t: expected 1..%d, got %s", n, describe(t)), 2)
    end
    if not (is_int(l) and l >= 1 and l <= L) then
      error(string.format("tr:get: l: expected 1..%d, got %s", L, describe(l)), 2)
    end
    local p = C.moe_trace_ids(h) + ((t - 1) * L + (l - 1)) * K
    local r = {}
    for k = 1, K do r[k] = p[k - 1] end
    return r
  end

  local function array_tensor(ptr, elem, shape, dtype)
    local t = moe.empty(shape, { dtype = dtype, device = "cpu" })
    local n = 1
    for _, d in ipairs(shape) do n = n * d end
    if n > 0 then ffi.copy(C.moe_tensor_data(t.h), ptr, n * elem) end
    return t
  end

  -- Host tensor copies of the arrays: ids i16 [T, L, K], weights f32 [T, L, K], token ids [T].
  function Trace:ids()
    local h = H(self, "tr:ids")
    return array_tensor(C.moe_trace_ids(h), 2, { self:tokens(), self:layers(), self:top_k() }, "i16")
  end

  function Trace:weights()
    local h = H(self, "tr:weights")
    if not self:has_weights() then return nil end
    return array_tensor(C.moe_trace_weights(h), 4, { self:tokens(), self:layers(), self:top_k() }, "f32")
  end

  function Trace:token_ids()
    local h = H(self, "tr:token_ids")
    if not self:has_token_ids() then return nil end
    return array_tensor(C.moe_trace_token_ids(h), 4, { self:tokens() }, "i32")
  end

  function Trace:save(path)
    local h = H(self, "tr:save")
    if type(path) ~= "string" then error("tr:save: path: expected a file name, got " .. describe(path), 2) end
    check(C.moe_trace_save(h, path), "tr:save")
    return self
  end

  -- A short label: meta model / quant / method, else the file name.
  function Trace:label()
    local m = self:meta()
    local parts = {}
    for _, k in ipairs{ "model", "quant", "method" } do
      if m[k] and m[k] ~= "" then parts[#parts + 1] = m[k] end
    end
    if #parts > 0 then return table.concat(parts, " / ") end
    return self._path or "trace"
  end

  function Trace:info()
    H(self, "tr:info")
    local E = self:num_experts()
    local lines = {
      string.format("moe trace: %d tokens x %d layers x top-%d of %s experts", self:tokens(),
                    self:layers(), self:top_k(), E > 0 and tostring(E) or "?"),
      string.format("  arrays: routed_experts i16%s%s", self:has_weights() and ", weights f32" or "",
                    self:has_token_ids() and ", token_ids i32" or ""),
    }
    local m, keys = self:meta(), {}
    for k in pairs(m) do keys[#keys + 1] = k end
    table.sort(keys)
    for _, k in ipairs(keys) do lines[#lines + 1] = string.format("  %-16s %s", k, m[k]) end
    return table.concat(lines, "\n")
  end

  Trace.__tostring = function(self)
    if self._h == nil then return "moe trace (freed)" end
    local E = self:num_experts()
    return string.format("moe trace: %d tokens x %d layers x top-%d of %s experts%s", self:tokens(),
                         self:layers(), self:top_k(), E > 0 and tostring(E) or "?",
                         self:has_weights() and ", weights" or "")
  end

  -- ------------------------------------------------------------------- files --

  function T.load(path, opts)
    local fn = "moe.trace.load"
    if type(path) ~= "string" then
      error(fn .. ": path: expected a file or directory name, got " .. describe(path), 2)
    end
    opts = check_opts(opts, fn, { num_experts = true })
    check(C.moe_trace_load(path, trace_box), fn)
    local tr = wrap(trace_box[0])
    trace_box[0] = nil
    tr._path = path
    if opts.num_experts then
      check(C.moe_trace_set_num_experts(tr._h, opts.num_experts), fn)
    end
    return tr
  end

  -- ------------------------------------------------------------- statistics --

  local function balance(b)
    return json.ordered({
      cv = b.cv, jain = b.jain, max_over_mean = b.max_over_mean, entropy = b.entropy,
      total = tonumber(b.total), hot_expert = tonumber(b.hot_expert),
    }, { "cv", "jain", "max_over_mean", "entropy", "total", "hot_expert" })
  end

  local function loads_table(p, L, E)
    local m = {}
    for l = 0, L - 1 do
      local row = {}
      for e = 0, E - 1 do row[e + 1] = tonumber(p[l * E + e]) end
      m[l + 1] = row
    end
    return m
  end

  -- Experts sorted by load (descending, then id), first n: {{expert =, load =, share =}, ...}.
  local function hot(row, n)
    local idx, total = {}, 0
    for e = 1, #row do idx[e] = e; total = total + row[e] end
    table.sort(idx, function(a, b)
      if row[a] ~= row[b] then return row[a] > row[b] end
      return a < b
    end)
    local r = {}
    for i = 1, math.min(n, #idx) do
      local e = idx[i]
      r[i] = { expert = e - 1, load = row[e], share = total > 0 and row[e] / total or NAN }
    end
    return r
  end
  T._hot = hot

  local function copts(opts)
    local o = ffi.new("moe_trace_cmp_opts")
    o.threads = opts.threads or 0
    o.ignore_weights = opts.ignore_weights and 1 or 0
    o.ignore_token_ids = opts.ignore_token_ids and 1 or 0
    return o
  end

  -- Statistics of one trace: per-layer loads over captured positions, balance, hot experts.
  function T.stats(tr, opts)
    local fn = "moe.trace.stats"
    if getmetatable(tr) ~= Trace then error(fn .. ": tr: expected a trace, got " .. describe(tr), 2) end
    local h = H(tr, fn)
    opts = check_opts(opts, fn, { threads = true, hot = true })
    check(C.moe_trace_stats(h, copts(opts), sum_box), fn)
    local s = sum_box[0]
    sum_box[0] = nil
    local L, E = tonumber(s.layers), tonumber(s.num_experts)
    local r = {
      tokens = tonumber(s.tokens), layers = L, top_k = tonumber(s.top_k), num_experts = E,
      captured = tonumber(s.captured), skipped = tonumber(s.skipped),
      balance = balance(s.balance), per_layer = {},
    }
    local ok, err = pcall(function()
      r.loads = loads_table(s.loads, L, E)
      local total = {}
      for e = 1, E do total[e] = 0 end
      for l = 1, L do
        local b = balance(s.per_layer[l - 1])
        b.hot_experts = hot(r.loads[l], opts.hot or 5)
        r.per_layer[l] = b
        for e = 1, E do total[e] = total[e] + r.loads[l][e] end
      end
      r.hot_experts = hot(total, opts.hot or 10)
    end)
    C.moe_trace_summary_free(s)
    if not ok then error(err, 2) end
    return setmetatable(r, T.Stats)
  end
  function Trace:stats(opts) return T.stats(self, opts) end

  -- ------------------------------------------------------------- comparison --

  local Cmp = {}
  Cmp.__index = Cmp
  T.Comparison = Cmp

  local LAYER_KEYS = { "router_disagreement", "jaccard", "overlap", "exact_agreement", "skipped",
                       "compared", "differing", "js_divergence", "weight_abs_diff",
                       "weight_mass_moved", "load" }
  local TOP_KEYS = { "router_disagreement", "token_disagreement", "mean_layers_differing",
                     "jaccard", "overlap", "exact_agreement", "skipped", "per_layer", "load",
                     "js_divergence", "first_differing_layer", "weights", "compared",
                     "differing", "exact", "positions", "tokens", "layers", "top_k",
                     "num_experts", "tokens_compared", "tokens_skipped", "tokens_differing",
                     "js_divergence_mean", "names" }

  function T.compare(a, b, opts)
    local fn = "moe.trace.compare"
    if getmetatable(a) ~= Trace then error(fn .. ": a: expected a trace, got " .. describe(a), 2) end
    if getmetatable(b) ~= Trace then error(fn .. ": b: expected a trace, got " .. describe(b), 2) end
    opts = check_opts(opts, fn, { threads = true, ignore_weights = true, ignore_token_ids = true,
                                  names = true })
    local ha, hb = H(a, fn), H(b, fn)
    check(C.moe_trace_compare(ha, hb, copts(opts), cmp_box), fn)
    local c = cmp_box[0]
    cmp_box[0] = nil
    local r
    local ok, err = pcall(function()
      local L, E = tonumber(c.layers), tonumber(c.num_experts)
      r = {
        tokens = tonumber(c.tokens), layers = L, top_k = tonumber(c.top_k), num_experts = E,
        positions = tonumber(c.positions), compared = tonumber(c.compared),
        skipped = tonumber(c.skipped), differing = tonumber(c.differing),
        exact = tonumber(c.exact), tokens_compared = tonumber(c.tokens_compared),
        tokens_skipped = tonumber(c.tokens_skipped), tokens_differing = tonumber(c.tokens_differing),
        router_disagreement = c.router_disagreement, token_disagreement = c.token_disagreement,
        mean_layers_differing = c.mean_layers_differing, jaccard = c.jaccard,
        overlap = c.overlap, exact_agreement = c.exact_agreement,
        js_divergence_mean = c.js_divergence,
        load = json.ordered({ a = balance(c.load_a), b = balance(c.load_b) }, { "a", "b" }),
        per_layer = {}, js_divergence = {}, first_differing_layer = {},
        names = json.ordered({ a = (opts.names and opts.names[1]) or a:label(),
                               b = (opts.names and opts.names[2]) or b:label() }, { "a", "b" }),
        has_weights = c.has_weights ~= 0,
      }
      if r.has_weights then
        r.weights = json.ordered({ abs_diff = c.weight_abs_diff, mass_moved = c.weight_mass_moved,
                                   pairs = tonumber(c.weight_pairs) },
                                 { "abs_diff", "mass_moved", "pairs" })
      end
      for l = 1, L do
        local p = c.per_layer[l - 1]
        local e = {
          router_disagreement = p.router_disagreement, jaccard = p.jaccard, overlap = p.overlap,
          exact_agreement = p.exact_agreement, skipped = tonumber(p.skipped),
          compared = tonumber(p.compared), differing = tonumber(p.differing),
          js_divergence = p.js_divergence,
          load = json.ordered({ a = balance(p.load_a), b = balance(p.load_b) }, { "a", "b" }),
        }
        if r.has_weights then
          e.weight_abs_diff, e.weight_mass_moved = p.weight_abs_diff, p.weight_mass_moved
        end
        r.per_layer[l] = json.ordered(e, LAYER_KEYS)
        r.js_divergence[l] = p.js_divergence
        r.first_differing_layer[l] = tonumber(c.first_diff_hist[l - 1])
      end
      r.loads = { a = loads_table(c.loads_a, L, E), b = loads_table(c.loads_b, L, E) }
    end)
    C.moe_trace_cmp_free(c)
    if not ok then error(err, 2) end
    return setmetatable(r, Cmp)
  end
  function Trace:compare(other, opts) return T.compare(self, other, opts) end

  -- JSON text of the metrics (stable key order).  opts.indent (default 2; false: compact),
  -- opts.loads = true adds the per-layer expert counts of both traces.
  function Cmp:json(opts)
    opts = opts or {}
    local t = {}
    for _, k in ipairs(TOP_KEYS) do t[k] = self[k] end
    local keys = { unpack(TOP_KEYS) }
    if opts.loads then
      t.loads = json.ordered({ a = self.loads.a, b = self.loads.b }, { "a", "b" })
      keys[#keys + 1] = "loads"
    end
    local indent = opts.indent
    if indent == nil then indent = 2 end
    return json.encode(json.ordered(t, keys), { indent = indent or nil })
  end

  local report = require("moe.trace_report")
  T.heatmap = function(loads, opts) return report.heatmap(moe, loads, opts) end
  Cmp.__tostring = function(self) return report.cmp_text(self) end
  -- Terminal heatmap of one side's loads or of their difference: which = "a" | "b" | "diff".
  function Cmp:heatmap(opts) return T.heatmap(self, opts) end
  function Trace:heatmap(opts) return T.heatmap(self, opts) end
  function Cmp:report(dir, opts)
    if type(dir) ~= "string" then error("cmp:report: dir: expected a directory name, got " .. describe(dir), 2) end
    mkdir_p(dir, "cmp:report", 2)
    return report.write(self, dir, opts or {})
  end

  T.Stats = {}
  T.Stats.__index = T.Stats
  T.Stats.__tostring = function(self) return report.stats_text(self) end
  function T.Stats:heatmap(opts) return T.heatmap(self.loads, opts) end
  function T.Stats:json(opts)
    local indent = (opts and opts.indent)
    if indent == nil then indent = 2 end
    local t = {}
    for k, v in pairs(self) do t[k] = v end
    return json.encode(json.ordered(t, { "tokens", "layers", "top_k", "num_experts", "captured",
                                         "skipped", "balance", "hot_experts", "per_layer", "loads" }),
                       { indent = indent or nil })
  end
end
