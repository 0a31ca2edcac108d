-- repl -- `moe repl`: an interactive LuaJIT prompt with moe loaded.
--
-- Line editing, history (~/.moelab_history) and TAB completion come from GNU readline through
-- the FFI (libreadline.so.8).  When the library is missing or stdin is not a terminal, lines
-- are read with io.read and no prompt is printed, so the REPL can be fed through a pipe.
--
-- Each input is tried first as an expression (`return <input>`, as Torch's trepl does) and
-- its values are printed; otherwise as a statement.  Input whose compile error ends in
-- '<eof>' is unfinished (the rule of luajit.c): the next line is read with a `>>` prompt.
-- A top-level `local x = ...` / `local function f` is made global so that it survives to
-- the next input.  Errors print a short traceback and the prompt goes on.
--
-- Completion uses an FFI callback (rl_completion_entry_function).  Callbacks are fine here,
-- in the REPL only (never in the library); the function that calls readline() runs with
-- the JIT off, as LuaJIT requires for a C function that calls back into Lua.
local ffi = require("ffi")

local M = {}

local HISTORY_LINES = 1000
local SLOW_MS = 10

-- ---------------------------------------------------------------- FFI ----

local function cdef(s)
  return (pcall(ffi.cdef, s))
end

cdef("int isatty(int fd);")
cdef("typedef struct moe_repl_timespec { long tv_sec; long tv_nsec; } moe_repl_timespec;")
cdef("int clock_gettime(int clk_id, moe_repl_timespec *tp);")
cdef("typedef void (*moe_repl_sighandler)(int);")
cdef("moe_repl_sighandler signal(int signum, moe_repl_sighandler handler);")

local clock
do
  local ok = pcall(function()
    local ts = ffi.new("moe_repl_timespec")
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    clock = function()
      ffi.C.clock_gettime(1, ts)
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
    end
  end)
  if not ok then clock = os.clock end
end

local function stdin_is_tty()
  local ok, r = pcall(function() return ffi.C.isatty(0) == 1 end)
  return ok and r
end

-- The SIGINT handler in place (luajit.c's: it makes the running Lua code raise
-- "interrupted!" and then resets itself); re-armed before each input and evaluation.
local sigint_handler
do
  local ok = pcall(function()
    local ign = ffi.cast("moe_repl_sighandler", 1) -- SIG_IGN
    sigint_handler = ffi.C.signal(2, ign)
    ffi.C.signal(2, sigint_handler)
  end)
  if not ok then sigint_handler = nil end
end
local function arm_sigint()
  if sigint_handler ~= nil then pcall(ffi.C.signal, 2, sigint_handler) end
end
-- While readline waits, SIGINT is ignored: the handler above would arm a hook that fires in
-- the next Lua code, which may be the completion callback, and an error must never leave
-- an FFI callback.  (So Ctrl-C at the prompt does nothing; Ctrl-U clears the line.)
local function ignore_sigint()
  if sigint_handler ~= nil then pcall(ffi.C.signal, 2, ffi.cast("moe_repl_sighandler", 1)) end
end

-- readline, or nil when unavailable.
local function load_readline()
  local ok, lib = pcall(ffi.load, "libreadline.so.8")
  if not ok then return nil end
  local decl = {
    "char *readline(const char *prompt);",
    "void add_history(const char *line);",
    "int read_history(const char *filename);",
    "int write_history(const char *filename);",
    "int history_truncate_file(const char *filename, int nlines);",
    "typedef char *(*moe_repl_compentry)(const char *text, int state);",
    "void free(void *p);",
    "char *strdup(const char *s);",
  }
  for _, d in ipairs(decl) do cdef(d) end
  -- Variables are declared one by one: an older declaration elsewhere must not stop us.
  cdef("extern moe_repl_compentry rl_completion_entry_function;")
  cdef("extern int rl_completion_append_character;")
  cdef("extern const char *rl_readline_name;")
  local ok2 = pcall(function() return lib.readline end)
  if not ok2 then return nil end
  return lib
end

-- ----------------------------------------------------------- printing ----

local function is_identifier(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

-- tostring for values with __tostring; a short listing for plain tables.
local function pretty(v, depth, seen)
  depth = depth or 0
  if type(v) ~= "table" then
    if type(v) == "string" and depth > 0 then return string.format("%q", v) end
    return tostring(v)
  end
  local mt = getmetatable(v)
  if mt and mt.__tostring then return tostring(v) end
  seen = seen or {}
  if seen[v] or depth >= 2 then return tostring(v) end
  seen[v] = true
  local parts, n = {}, #v
  local LIMIT = 20
  for i = 1, math.min(n, LIMIT) do parts[#parts + 1] = pretty(v[i], depth + 1, seen) end
  if n > LIMIT then parts[#parts + 1] = "... (" .. n .. " items)" end
  local keys = {}
  for k in pairs(v) do
    if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then keys[#keys + 1] = k end
  end
  table.sort(keys, function(a, b)
    if type(a) == type(b) and (type(a) == "string" or type(a) == "number") then return a < b end
    return type(a) < type(b)
  end)
  for i, k in ipairs(keys) do
    if i > LIMIT then parts[#parts + 1] = "... (" .. #keys .. " keys)" break end
    local ks = is_identifier(k) and k or ("[" .. pretty(k, depth + 1, seen) .. "]")
    parts[#parts + 1] = ks .. " = " .. pretty(v[k], depth + 1, seen)
  end
  seen[v] = nil
  local s = "{" .. table.concat(parts, ", ") .. "}"
  if #s > 100 and depth == 0 then
    s = "{\n  " .. table.concat(parts, ",\n  ") .. "\n}"
  end
  return s
end
M.pretty = pretty

-- The terminal heatmap that goes under a trace, trace stats or a comparison in the REPL (nil for
-- other values, or when the heatmap cannot be drawn).
function M.heatmap_of(moe, v)
  local tr = moe and moe.trace
  if not tr or type(v) ~= "table" then return nil end
  local mt = getmetatable(v)
  local ok, s
  if mt == tr.Comparison then
    ok, s = pcall(v.heatmap, v, { which = "diff" })
  elseif mt == tr.Trace or mt == tr.Stats then
    ok, s = pcall(v.heatmap, v)
  else
    return nil
  end
  return ok and s or nil
end

-- ---------------------------------------------------------- compiling ----

-- Make a leading `local` global so the name survives to the next input.
local function globalize(src)
  local s = src:gsub("^(%s*)local%s+function%s+", "%1function ", 1)
  if s ~= src then return s end
  local lead, names, rest = src:match("^(%s*)local%s+([%a_][%w_%s,]*)=(.*)$")
  if lead and not rest:match("^=") then return lead .. names .. "=" .. rest end
  return src
end
M.globalize = globalize

-- Compile one input: returns fn, or nil, "incomplete", or nil, errmsg.
-- The expression form is `return select(1, <input>\n)`, not `return <input>`: a call in
-- tail position would lose its frame, and error("x") would then lose its "stdin:1:".
local function compile(src, chunkname)
  local f = loadstring("return select(1, " .. src .. "\n)", chunkname)
  if f then return f end
  local err
  f, err = loadstring(globalize(src), chunkname)
  if f then return f end
  if err:sub(-7) == "'<eof>'" then return nil, "incomplete" end
  return nil, err
end
M.compile = compile

-- Short traceback: the message, then the frames above the REPL's own.
local function short_traceback(e)
  local msg = type(e) == "string" and e or pretty(e)
  local tb = debug.traceback("", 3)
  local lines = {}
  for line in tb:gmatch("[^\n]+") do
    if line:find("repl.lua", 1, true) or line:find("%[C%]: in function 'xpcall'") then break end
    if not line:match("^stack traceback:") then lines[#lines + 1] = line end
    if #lines >= 8 then lines[#lines + 1] = "\t..." break end
  end
  if #lines == 0 then return msg end
  return msg .. "\nstack traceback:\n" .. table.concat(lines, "\n")
end

-- --------------------------------------------------------- completion ----

local KEYWORDS = { "and", "break", "do", "else", "elseif", "end", "false", "for", "function",
                   "goto", "if", "in", "local", "nil", "not", "or", "repeat", "return", "then",
                   "true", "until", "while" }

local function safe_index(t, k)
  local ok, v = pcall(function() return t[k] end)
  if ok then return v end
  return nil
end

-- Fields a value offers after "." (sep ".") or ":" (methods).
local function fields_of(v, sep, moe)
  local names = {}
  local function add_table(t, only_fn)
    if type(t) ~= "table" then return end
    for k, x in pairs(t) do
      if type(k) == "string" and (not only_fn or type(x) == "function") then names[k] = true end
    end
  end
  if type(v) == "table" then
    add_table(v, sep == ":")
    local mt = getmetatable(v)
    if type(mt) == "table" and type(mt.__index) == "table" then add_table(mt.__index, sep == ":") end
  elseif type(v) == "string" then
    add_table(string, true)
  elseif type(v) == "cdata" and moe and moe.is_tensor and moe.is_tensor(v) then
    add_table(moe.Tensor, true)
    if sep == "." then names.h = true end
  end
  return names
end

-- Candidates completing `text` against the globals of env.
function M.complete(text, env, moe)
  local out = {}
  local base, sep, partial = text:match("^(.-)([%.:])([%w_]*)$")
  if base and base ~= "" and base:match("^[%a_][%w_%.]*$") and not base:match("%.%.") then
    local v = env
    for part in base:gmatch("[^%.]+") do
      v = (type(v) == "table" or type(v) == "cdata") and safe_index(v, part) or nil
      if v == nil then return out end
    end
    for name in pairs(fields_of(v, sep, moe)) do
      if name:sub(1, #partial) == partial and is_identifier(name) and
         (partial:sub(1, 1) == "_" or name:sub(1, 1) ~= "_" or name == partial) then
        out[#out + 1] = base .. sep .. name
      end
    end
  elseif text:match("^[%a_]?[%w_]*$") then
    local seen = {}
    for k in pairs(env) do
      if type(k) == "string" and k:sub(1, #text) == text and not seen[k] then
        seen[k] = true
        out[#out + 1] = k
      end
    end
    for _, k in ipairs(KEYWORDS) do
      if k:sub(1, #text) == text and not seen[k] then out[#out + 1] = k end
    end
  end
  table.sort(out)
  return out
end

-- ---------------------------------------------------------------- help ----

local REPL_HELP = [[
moe repl -- LuaJIT with moe loaded.
  <expression>    evaluated and printed (several values are separated by tabs)
  <statement>     run; unfinished input continues on the >> prompt
  help(f)         documentation of a moe function or tensor method
  help(moe)       the documented moe functions; help(t) for a tensor: its methods
  :time           toggle the timing line (shown for commands over 10 ms)
  :heatmap        toggle the expert-load heatmap printed under traces, trace stats and
                  comparisons (a comparison shows the load-share difference B - A)
  :help           this text
  :quit           leave (also Ctrl-D)
TAB completes names, moe.<TAB> and t:<TAB> for tensors.  History: ~/.moelab_history.
`local x = ...` at the prompt defines a global x (each input is its own chunk).]]

local function make_help(moe)
  return function(x, ...)
    if select("#", ...) > 0 then error("help: expected one argument", 2) end
    if x == nil then print(REPL_HELP) return end
    if not moe then print("help: the engine is not loaded") return end
    local doc_of = moe.doc_of
    if type(x) == "string" then
      local f = safe_index(moe, x) or safe_index(moe.Tensor or {}, x)
      if f == nil then print("help: no moe function or tensor method named '" .. x .. "'") return end
      x = f
    end
    if x == moe then
      local list, texts = moe._doc_list("moe.")
      print("moe functions (help(moe.NAME) for one):")
      for _, name in ipairs(list) do
        print(string.format("  %-26s %s", name, (texts[name]:match("\n%s*([^\n]*)") or "")))
      end
      print("Tensor methods: help(t) for a tensor t, or help(moe.Tensor).")
      return
    end
    if x == moe.Tensor or (moe.is_tensor and moe.is_tensor(x)) then
      local list, texts = moe._doc_list("Tensor:")
      print("tensor methods:")
      for _, name in ipairs(list) do
        print("  " .. texts[name]:match("^[^\n]*"))
      end
      return
    end
    local text = doc_of(x)
    if text then print(text) return end
    if type(x) == "function" then
      local info = debug.getinfo(x, "S")
      local where = info.what == "C" and "a C function" or
                    (info.short_src .. ":" .. tostring(info.linedefined))
      print("no documentation for this function (" .. where .. ")")
    elseif type(x) == "table" then
      local names, methods = {}, {}
      for k in pairs(x) do if type(k) == "string" then names[#names + 1] = k end end
      local mt = getmetatable(x)
      if type(mt) == "table" and type(mt.__index) == "table" then
        for k, v in pairs(mt.__index) do
          if type(k) == "string" and type(v) == "function" and k:sub(1, 1) ~= "_" then
            methods[#methods + 1] = k
          end
        end
      end
      table.sort(names)
      table.sort(methods)
      print("no documentation; fields: " .. table.concat(names, ", "))
      if #methods > 0 then print("methods: " .. table.concat(methods, ", ")) end
    else
      print("no documentation for a " .. type(x))
    end
  end
end

-- ---------------------------------------------------------------- main ----

-- opts: { input = function(prompt) -> line|nil (tests), output = function(s) }.
function M.main(opts)
  opts = opts or {}
  local out = opts.output or function(s) io.stdout:write(s) io.stdout:flush() end
  local function println(s) out(s .. "\n") end

  local mok, moe = pcall(require, "moe")
  if mok then
    local dok, doc = pcall(require, "moe.doc")
    if dok then doc(moe) end
    _G.moe = moe
  else
    io.stderr:write("moe repl: the engine did not load (plain LuaJIT from here on):\n  ",
                    (tostring(moe):gsub("\n.*", "")), "\n")
    moe = nil
  end
  _G.help = make_help(moe)

  local interactive = opts.input == nil and stdin_is_tty()
  local rl = (interactive and not os.getenv("MOE_REPL_NO_READLINE")) and load_readline() or nil
  local history = (os.getenv("HOME") or ".") .. "/.moelab_history"
  local keep = {} -- luacheck: ignore 241 (holds cdata that must stay alive: callback, readline name)

  if rl then
    rl.read_history(history)
    local name = ffi.new("char[?]", 7, "moelab")
    keep.name = name
    pcall(function() rl.rl_readline_name = name end)
    local matches, idx = {}, 0
    local cb = ffi.cast("moe_repl_compentry", function(ctext, state)
      local ok, r = pcall(function()
        if state == 0 then
          matches = M.complete(ffi.string(ctext), _G, moe)
          idx = 0
          pcall(function() rl.rl_completion_append_character = 0 end)
        end
        idx = idx + 1
        return matches[idx]
      end)
      if ok and r then return ffi.C.strdup(r) end
      return nil
    end)
    keep.cb = cb
    pcall(function() rl.rl_completion_entry_function = cb end)
  end

  local function read(prompt)
    if opts.input then return opts.input(prompt) end
    if rl then
      ignore_sigint()
      local p = rl.readline(prompt)
      arm_sigint()
      if p == nil then return nil end
      local s = ffi.string(p)
      ffi.C.free(p)
      return s
    end
    if interactive then out(prompt) end
    return io.read("*l")
  end
  jit.off(read, true)

  local show_time = true
  local show_heatmap = true
  local chunkname = "=stdin"

  local function execute(src)
    local f, err = compile(src, chunkname)
    if not f then return err end
    arm_sigint()
    local t0 = clock()
    local res = { n = 0 }
    local function pack(...) res.n = select("#", ...) for i = 1, res.n do res[i] = select(i, ...) end end
    pack(xpcall(f, short_traceback))
    local dt = clock() - t0
    if not res[1] then
      println(tostring(res[2]))
    else
      local n = res.n
      if n >= 2 then
        local parts = {}
        for i = 2, n do parts[#parts + 1] = pretty(res[i]) end
        println(table.concat(parts, "\t"))
        _G._ = res[2]
        if show_heatmap and n == 2 then
          local hm = M.heatmap_of(moe, res[2])
          if hm then println(hm) end
        end
      end
    end
    if show_time and dt * 1000 > SLOW_MS then
      println(dt >= 1 and string.format("(%.2f s)", dt) or string.format("(%.1f ms)", dt * 1000))
    end
  end

  if interactive then
    println(string.format("moelab %s -- LuaJIT %s.  help() for help, :quit or Ctrl-D to leave.",
                          moe and moe.version() or "(engine not loaded)",
                          (jit.version:gsub("^LuaJIT ", ""))))
  end

  local buffer = nil
  while true do
    arm_sigint()
    local ok, line = pcall(read, buffer and ">> " or "moe> ")
    if not ok then -- Ctrl-C while reading: drop the pending input
      println(tostring(line):match("interrupted") and "^C" or tostring(line))
      buffer = nil
    else
      if line == nil then
        if interactive then println("") end
        break
      end
      if rl and line:match("%S") then
        rl.add_history(line)
        rl.write_history(history)
      end
      local cmd = buffer == nil and line:match("^%s*:(%a+)%s*$")
      if cmd then
        if cmd == "quit" or cmd == "q" or cmd == "exit" then break
        elseif cmd == "time" then
          show_time = not show_time
          println("timing " .. (show_time and "on (commands over 10 ms)" or "off"))
        elseif cmd == "heatmap" then
          show_heatmap = not show_heatmap
          println("heatmap " .. (show_heatmap and "on" or "off"))
        elseif cmd == "help" then println(REPL_HELP)
        else println("unknown command :" .. cmd .. " (:help lists them)") end
      elseif buffer == nil and not line:match("%S") then -- luacheck: ignore 542
        -- empty line: nothing to do
      else
        local src = buffer and (buffer .. "\n" .. line) or line
        local rok, err = pcall(execute, src)
        if not rok then
          println(tostring(err):match("interrupted") and "interrupted" or tostring(err))
          buffer = nil
        elseif err == "incomplete" then
          buffer = src
        else
          buffer = nil
          if err then println(err) end
        end
      end
    end
  end
  if rl then
    rl.write_history(history)
    rl.history_truncate_file(history, HISTORY_LINES)
  end
  return 0
end

return M
