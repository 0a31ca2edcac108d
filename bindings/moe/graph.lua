-- moe.graph -- CUDA graph capture and replay of moelab work, and moe.synchronize.
--
--   local g = moe.graph.capture(function() moe.route{...} end, {device = "cuda"})
--   g:replay(); moe.synchronize("cuda")
--   local us = g:time(10, 100)   -- table of 100 per-replay times in microseconds
--   g:free()
--
-- Allocate every tensor the captured function writes before capturing: device allocations
-- are refused while a capture is in progress.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local describe = moe._describe
  local CUDA = C.MOE_DEVICE_CUDA

  local graph_box = ffi.new("moe_graph*[1]")

  local Graph = {}
  Graph.__index = Graph

  local function G(self, fn)
    if getmetatable(self) ~= Graph then
      error(fn .. ": self: expected a graph (call it as g:" .. fn:match(":(.*)$") .. "(...)), got " ..
            describe(self), 3)
    end
    if self.g == nil then error(fn .. ": graph was freed", 3) end
    return self.g
  end

  function Graph:replay()
    moe._check(C.moe_graph_replay(G(self, "g:replay")), "g:replay")
    return self
  end

  -- warmup untimed replays, then n timed ones; returns a table of n times in microseconds.
  function Graph:time(warmup, n)
    local g = G(self, "g:time")
    warmup = warmup or 10
    n = n or 100
    if type(warmup) ~= "number" or warmup < 0 or warmup % 1 ~= 0 then
      error("g:time: warmup: expected a non-negative integer, got " .. describe(warmup), 2)
    end
    if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
      error("g:time: n: expected a positive integer, got " .. describe(n), 2)
    end
    local buf = ffi.new("float[?]", n)
    moe._check(C.moe_graph_time(g, warmup, n, buf), "g:time")
    local r = {}
    for i = 1, n do r[i] = buf[i - 1] end
    return r
  end

  -- Idempotent.
  function Graph:free()
    local g = self.g
    if g ~= nil then
      self.g = nil
      ffi.gc(g, nil)
      C.moe_graph_free(g)
    end
  end

  function Graph:__tostring()
    return self.g == nil and "moe.graph(<freed>)" or ("moe.graph(device=" .. self.device .. ")")
  end

  local CAPTURE_OPTS = { device = true }

  local graph = {}

  -- Capture everything fn queues on the moelab stream of the device; abort and re-raise
  -- if fn fails.
  function graph.capture(fn, opts)
    if type(fn) ~= "function" then
      error("moe.graph.capture: fn: expected a function, got " .. describe(fn), 2)
    end
    if opts ~= nil and type(opts) ~= "table" then
      error("moe.graph.capture: opts: expected a table or nil, got " .. describe(opts), 2)
    end
    opts = opts or {}
    for k in pairs(opts) do
      if not CAPTURE_OPTS[k] then
        error("moe.graph.capture: opts: unknown option " .. describe(k) .. " (known: device)", 2)
      end
    end
    local dev
    if opts.device ~= nil then
      dev = moe._device(opts.device, "moe.graph.capture", "opts.device")
    else
      dev = moe._device(nil)
      if dev.type ~= CUDA then dev = moe._device("cuda") end
    end
    if dev.type ~= CUDA then
      error("moe.graph.capture: opts.device: expected a CUDA device, got " ..
            moe._device_str(dev), 2)
    end
    moe._check(C.moe_graph_begin(dev), "moe.graph.capture")
    local ok, err = pcall(fn)
    if not ok then
      C.moe_graph_abort()
      error(err, 0)
    end
    local st = C.moe_graph_end(graph_box)
    local g = graph_box[0]
    graph_box[0] = nil
    moe._check(st, "moe.graph.capture")
    return setmetatable({ g = ffi.gc(g, C.moe_graph_free), device = moe._device_str(dev) }, Graph)
  end

  function graph.is_capturing() return C.moe_graph_capturing() ~= 0 end

  moe.graph = graph
  moe.Graph = Graph

  function moe.synchronize(device)
    local dev = moe._device(device, "moe.synchronize", "device")
    moe._check(C.moe_synchronize(dev), "moe.synchronize")
  end
end
