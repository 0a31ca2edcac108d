-- moe.doc -- docstrings for help() in the REPL.
--
--   moe.doc(f, "moe.thing(x [, opts]) -> y\n  What it does.")   -- register (returns f)
--   moe.doc_of(f)                                           -- the text, or nil
--
-- Docstrings are kept in moe._doc, keyed by the function (weak keys).  The table NAMED below
-- documents the functions of the moe module by name; an entry is attached only when the
-- function exists (looked up again on every moe.doc_of, so modules loaded later get their
-- docs too) -- help() never describes a function that is not there.
--
-- As a submodule: require("moe.doc")(moe) installs moe.doc, moe.doc_of and moe._doc.

local NAMED = {
  -- module
  ["moe.version"] = "moe.version() -> string\n  Engine version \"MAJOR.MINOR.PATCH\".",
  ["moe.build_info"] = "moe.build_info() -> string\n  Compiler, CUDA yes/no and CUDA architectures of libmoe.",
  ["moe.cuda_built"] = "moe.cuda_built() -> boolean\n  true when libmoe was built with the CUDA backend.",
  ["moe.cuda_device_count"] = "moe.cuda_device_count() -> integer\n  Usable CUDA devices (0 without CUDA, driver or GPU).",
  ["moe.cuda_available"] = "moe.cuda_available() -> boolean\n  true when at least one CUDA device can be used.",
  ["moe.cuda_device_info"] = "moe.cuda_device_info([index]) -> string\n  Name and compute capability of CUDA device `index` (default 0).",
  ["moe.set_default_device"] = "moe.set_default_device(device) -> previous\n  Device used when opts.device is not given: \"cpu\", \"cuda\" or \"cuda:N\".",
  ["moe.default_device"] = "moe.default_device() -> string\n  The current default device (\"cpu\" or \"cuda:N\").",
  ["moe.synchronize"] = "moe.synchronize([device])\n  Wait until all moelab work queued on the device is done (CPU: no-op).",
  ["moe.mem_stats"] = "moe.mem_stats() -> table\n  live_tensors, live_storages, host_bytes, device_bytes, peak_device_bytes, peak_host_bytes.",
  ["moe.gc_threshold"] = "moe.gc_threshold([kind]) -> bytes\n  Memory growth (\"host\" or \"device\") that triggers a Lua garbage collection.",
  ["moe.set_gc_threshold"] = "moe.set_gc_threshold(bytes | nil) -> previous\n  Fix the growth threshold of the GC trigger (nil: automatic).",
  ["moe.collect_garbage"] = "moe.collect_garbage()\n  Full Lua collection (frees unreachable tensors) and reset of the GC trigger.",
  ["moe.is_tensor"] = "moe.is_tensor(x) -> boolean\n  true when x is a moe tensor.",
  -- constructors
  ["moe.empty"] = "moe.empty(shape [, {dtype=, device=}]) -> tensor\n  Uninitialised tensor; dtype default \"f32\", device the default device.",
  ["moe.zeros"] = "moe.zeros(shape [, {dtype=, device=}]) -> tensor\n  Tensor of zeros, e.g. moe.zeros({4, 16}, {dtype = \"bf16\"}).",
  ["moe.ones"] = "moe.ones(shape [, {dtype=, device=}]) -> tensor\n  Tensor of ones.",
  ["moe.full"] = "moe.full(shape, value [, {dtype=, device=}]) -> tensor\n  Tensor filled with value (converted with the cast rules).",
  ["moe.manual_seed"] = "moe.manual_seed(seed)\n  Set the counter that gives the seed of the next random tensor made without opts.seed.",
  ["moe.randn"] = "moe.randn(shape [, {dtype=, device=, seed=, mean=0, std=1}]) -> tensor\n  Normal values from Philox4x32-10: the same on CPU and CUDA for the same seed, shape and dtype.",
  ["moe.rand"] = "moe.rand(shape [, {dtype=, device=, seed=, lo=0, hi=1}]) -> tensor\n  Uniform values on [lo, hi) from Philox4x32-10.",
  ["moe.arange"] = "moe.arange(n [, opts]) | moe.arange(start, stop [, step] [, opts]) -> tensor\n  start, start+step, ... while below stop (above it for a negative step).",
  ["moe.tensor"] = "moe.tensor(data [, {dtype=, device=}]) -> tensor\n  Tensor from a number, boolean or nested table (shape inferred), e.g. moe.tensor({{1, 2}, {3, 4}}).",
  -- I/O, routing and the rest of the planned API: attached only once they exist
  ["moe.load"] = "moe.load(path) -> tensor | tensors, metadata\n  Read a .npy file (one tensor) or a .safetensors file (a table name -> tensor and a table of metadata strings).",
  ["moe.save"] = "moe.save(path, tensor | table [, metadata])\n  Write .npy (one tensor) or .safetensors (a table of named tensors, optional string metadata).",
  ["moe.routing_methods"] = "moe.routing_methods() -> {{name=, params=, description=}, ...}\n  The routing methods moe.route knows, with their parameters.",
  ["moe.matmul_nt"] = "moe.matmul_nt(a, b [, {out=}]) -> tensor\n  out[M, N] = a[M, K] . b[N, K]^T in f32 (the router GEMM: logits = x . W^T).",
  ["moe.rmsnorm"] = "moe.rmsnorm(x [, weight] [, {eps=1e-6, out=}]) -> tensor\n  RMSNorm over the last dimension.",
  ["moe.axpby"] = "moe.axpby(alpha, x, beta, y) -> y\n  y = alpha * x + beta * y, in place.",
  ["moe.quant_modes"] = "moe.quant_modes() -> list\n  The quantisation modes (bf16, fp8, fp8_block, nvfp4, mxfp4, mxint4).",
  ["moe.quantize"] = "moe.quantize(t, mode [, {block_rows=}]) -> qtensor\n  Quantise f32/bf16/f16 [N, K] or [E, N, K]: q.data, q.scales, q.global_scale (nvfp4); q:dequantize(dtype), q:save(path).",
  ["moe.dequantize"] = "moe.dequantize(q, dtype) -> tensor\n  Values of a quantised tensor in dtype (\"f32\", \"bf16\", ...).",
  ["moe.is_qtensor"] = "moe.is_qtensor(x) -> boolean\n  true when x is a quantised tensor (moe.quantize).",
  ["moe.quant_from_parts"] = "moe.quant_from_parts{mode=, data=, scales=, ...} -> qtensor\n  A quantised tensor from a checkpoint's codes and scales.",
  ["moe.quant_load"] = "moe.quant_load(path [, opts]) -> qtensor\n  Read a quantised tensor written by q:save(path).",
  ["moe.route"] = "moe.route{logits=, method=, top_k=, bias=, n_group=, topk_group=, scale=, replay=} -> {ids=, weights=}\n  Route tokens: ids i32 [T, K], weights [T, K]; replay (i16 [R, K]) receives the ids.",
  ["moe.fused_moe"] = "moe.fused_moe{hidden=, experts=, logits= | routed={ids=, weights=}, method=, top_k=, bias=, replay=, out=, return_routing=} -> y [, routing]\n  Routing -> experts -> combine in one call; hidden bf16 [T, H] -> bf16 [T, H] (docs/fused.md).",
  ["moe.fused_paths"] = "moe.fused_paths([reset]) -> {cpu=, gemv=, tile=, wreg=, wgmma=, gemv_route=, wgmma_rs=, wreg_i4f16=, wgmma_rs_i4f16=, wgmma_rs_xonce=, gemv_bulk=, gemv_route_bulk=}\n  How many fused_moe calls each kernel path ran (since the start or moe.fused_paths_reset(); reset = true also resets).",
  ["moe.fused_paths_reset"] = "moe.fused_paths_reset()\n  Zero the counts of moe.fused_paths.",
  ["moe.experts"] = "moe.experts{gate_up=, down=, activation=\"swiglu\", device=, ...} -> experts\n  Pack expert weights W13 [E, 2I, H] and W2 [E, H, I] once on the device (ex:reserve(T, K) sizes the CUDA workspace).",
  ["moe.graph.capture"] = "moe.graph.capture(fn [, {device=}]) -> graph\n  Capture the CUDA work fn queues (allocate outputs beforehand); g:replay(), g:time(warmup, n), g:free().",
  ["moe.graph.is_capturing"] = "moe.graph.is_capturing() -> boolean\n  true while a CUDA graph capture is in progress.",
  ["moe.trace.compare"] = "moe.trace.compare(a, b) -> comparison\n  Compare two routing traces (router disagreement, ...); print(cmp), cmp:report(dir).",
  ["moe.trace.new"] = "moe.trace.new{layers=, top_k=, num_experts=, capacity=, device=, meta=} -> trace\n  An empty routing trace: route with replay = tr:replay(l) for each layer, then tr:commit(T).",
  ["moe.trace.stats"] = "moe.trace.stats(trace [, opts]) -> stats\n  Expert load and balance statistics of a trace.",
  ["moe.trace.is_trace"] = "moe.trace.is_trace(x) -> boolean\n  true when x is a routing trace.",
  ["moe.trace.load"] = "moe.trace.load(path) -> trace\n  Read a trace saved with tr:save(path).",
  ["moe.model.presets"] = "moe.model.presets() -> list\n  The names of the model presets.",
  ["moe.model.preset"] = "moe.model.preset(name [, {layers=, size=}]) -> model\n  A model preset such as \"qwen3-30b-a3b\"; m:run{tokens=, quant=, device=, seed=} returns a trace.",
  -- tensor methods
  ["Tensor:shape"] = "t:shape() -> {d1, d2, ...}\n  The shape as a Lua table.",
  ["Tensor:size"] = "t:size([dim]) -> integer | table\n  Size of dimension dim (1-based, negative from the end); the shape without dim.",
  ["Tensor:stride"] = "t:stride() -> table\n  Strides in elements.",
  ["Tensor:dtype"] = "t:dtype() -> string\n  \"f32\", \"bf16\", ...",
  ["Tensor:device"] = "t:device() -> string\n  \"cpu\" or \"cuda:N\".",
  ["Tensor:numel"] = "t:numel() -> integer\n  Number of elements.",
  ["Tensor:ndim"] = "t:ndim() -> integer\n  Number of dimensions.",
  ["Tensor:nbytes"] = "t:nbytes() -> integer\n  Bytes the elements occupy when contiguous.",
  ["Tensor:is_contiguous"] = "t:is_contiguous() -> boolean",
  ["Tensor:is_cuda"] = "t:is_cuda() -> boolean",
  ["Tensor:data_ptr"] = "t:data_ptr([ctype]) -> pointer\n  Address of the first element, cast to ctype when given (\"float*\", ...).",
  ["Tensor:free"] = "t:free()\n  Release the tensor now (idempotent).",
  ["Tensor:is_freed"] = "t:is_freed() -> boolean",
  ["Tensor:narrow"] = "t:narrow(dim, start, length) -> view\n  Elements start .. start+length-1 (1-based) of dimension dim.",
  ["Tensor:select"] = "t:select(dim, index) -> view\n  Index `index` (1-based) of dimension dim, which is removed.",
  ["Tensor:transpose"] = "t:transpose(dim0, dim1) -> view\n  Swap two dimensions (t:t() is the same).",
  ["Tensor:reshape"] = "t:reshape(shape) -> view\n  Same elements, new shape (one entry may be -1); t must be contiguous.  t:view is the same.",
  ["Tensor:clone"] = "t:clone() -> tensor\n  Contiguous copy (same device and dtype).",
  ["Tensor:contiguous"] = "t:contiguous() -> tensor\n  t itself when contiguous, else a contiguous copy.",
  ["Tensor:to"] = "t:to(device) | t:to(dtype) | t:to(device, dtype) -> tensor\n  A new tensor on the device and/or converted to the dtype.",
  ["Tensor:copy_"] = "t:copy_(src) -> t\n  Copy src's values into t (shapes equal; dtypes and devices may differ).",
  ["Tensor:fill_"] = "t:fill_(value) -> t\n  Set every element.",
  ["Tensor:totable"] = "t:totable() -> nested table\n  The values as (nested) Lua numbers.",
  ["Tensor:item"] = "t:item() -> number\n  The value of a one-element tensor.",
  ["Tensor:get"] = "t:get(i, j, ...) -> number\n  One element (1-based indices).",
  ["Tensor:set"] = "t:set(value, i, j, ...) -> t\n  Write one element (1-based indices).",
}

-- Resolve "moe.a.b" / "Tensor:m" to the function, or nil.
local function resolve(moe, name)
  local cur
  local rest
  if name:sub(1, 7) == "Tensor:" then
    cur, rest = moe.Tensor, name:sub(8)
  elseif name:sub(1, 4) == "moe." then
    cur, rest = moe, name:sub(5)
  else
    return nil
  end
  for part in rest:gmatch("[^%.]+") do
    if type(cur) ~= "table" then return nil end
    local ok, v = pcall(function() return cur[part] end)
    if not ok then return nil end
    cur = v
  end
  if type(cur) == "function" then return cur end
  return nil
end

return function(moe)
  if moe.doc and moe._doc then return moe end
  local docs = setmetatable({}, { __mode = "k" })
  moe._doc = docs
  moe._doc_names = setmetatable({}, { __mode = "k" }) -- function -> "moe.randn"

  function moe.doc(f, text)
    if type(f) ~= "function" and type(f) ~= "table" then
      error("moe.doc: f: expected a function or table, got " .. type(f), 2)
    end
    if type(text) ~= "string" then
      error("moe.doc: text: expected a string, got " .. type(text), 2)
    end
    docs[f] = text
    return f
  end

  local function attach()
    for name, text in pairs(NAMED) do
      local f = resolve(moe, name)
      if f then
        if docs[f] == nil then docs[f] = text end
        if moe._doc_names[f] == nil then moe._doc_names[f] = name end
      end
    end
  end
  moe._doc_attach = attach

  function moe.doc_of(f)
    if docs[f] == nil then attach() end
    return docs[f]
  end

  -- Documented names that exist now, sorted (for help(moe)).
  function moe._doc_list(prefix)
    attach()
    local list = {}
    for name in pairs(NAMED) do
      if (prefix == nil or name:sub(1, #prefix) == prefix) and resolve(moe, name) then
        list[#list + 1] = name
      end
    end
    table.sort(list)
    return list, NAMED
  end

  attach()
  return moe
end
