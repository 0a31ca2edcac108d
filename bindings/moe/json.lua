-- moe.json -- a small JSON encoder with a stable key order, and a strict decoder.
--
--   local json = require("moe.json")
--   json.encode({b = 1, a = {1, 2}})            --> {"a":[1,2],"b":1}   (keys sorted)
--   json.encode(json.object({"z", 1}, {"a", 2})) --> {"z":1,"a":2}      (keys in given order)
--   json.encode(t, {indent = 2})                 -- pretty-printed
--   json.decode('{"a": [1, 2.5, null]}')         --> {a = {1, 2.5, json.null}}
--
-- Tables: an array when its keys are exactly 1..n (n >= 1), else an object.  An empty table
-- is an object ({}); json.array() makes an empty array.  A table whose metatable has __keys
-- (a list) is an object written in that order (missing keys are skipped).  NaN and infinities
-- are written as null (JSON has no spelling for them); integral numbers without exponent.
local M = {}

M.null = setmetatable({}, { __tostring = function() return "null" end })
local ARRAY_MT = { __json_array = true }

function M.array(t) return setmetatable(t or {}, ARRAY_MT) end

-- An object with a fixed key order: json.object({"k1", v1}, {"k2", v2}, ...).
function M.object(...)
  local t, keys = {}, {}
  for i = 1, select("#", ...) do
    local kv = select(i, ...)
    keys[#keys + 1] = kv[1]
    t[kv[1]] = kv[2]
  end
  return setmetatable(t, { __keys = keys })
end

-- Set the key order of an existing table (returns it).
function M.ordered(t, keys)
  return setmetatable(t, { __keys = keys })
end

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}

local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end
M.quote = quote

local function number(x)
  if x ~= x or x == math.huge or x == -math.huge then return "null" end
  if x == math.floor(x) and math.abs(x) < 2 ^ 53 then return string.format("%d", x) end
  for _, f in ipairs{ "%.15g", "%.16g" } do
    local s = string.format(f, x)
    if tonumber(s) == x then return s end
  end
  return string.format("%.17g", x)
end

local function is_array(t)
  local mt = getmetatable(t)
  if mt and mt.__json_array then return true end
  if mt and mt.__keys then return false end
  local n = #t
  if n == 0 then return false end
  local count = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
    count = count + 1
  end
  return count == n
end

local function encode(v, out, indent, depth, seen)
  local tv = type(v)
  if v == nil or v == M.null then
    out[#out + 1] = "null"
  elseif tv == "boolean" then
    out[#out + 1] = v and "true" or "false"
  elseif tv == "number" then
    out[#out + 1] = number(v)
  elseif tv == "string" then
    out[#out + 1] = quote(v)
  elseif tv == "cdata" and tonumber(v) then
    out[#out + 1] = number(tonumber(v))
  elseif tv == "table" then
    if seen[v] then error("json.encode: cycle in the value", 0) end
    seen[v] = true
    local nl = indent and ("\n" .. string.rep(" ", indent * (depth + 1))) or ""
    local close = indent and ("\n" .. string.rep(" ", indent * depth)) or ""
    local sep = indent and ": " or ":"
    if is_array(v) then
      if #v == 0 then
        out[#out + 1] = "[]"
      else
        out[#out + 1] = "["
        for i = 1, #v do
          if i > 1 then out[#out + 1] = "," end
          out[#out + 1] = nl
          encode(v[i], out, indent, depth + 1, seen)
        end
        out[#out + 1] = close .. "]"
      end
    else
      local mt = getmetatable(v)
      local keys = {}
      if mt and mt.__keys then
        for _, k in ipairs(mt.__keys) do
          if v[k] ~= nil then keys[#keys + 1] = k end
        end
      else
        for k in pairs(v) do
          if type(k) ~= "string" and type(k) ~= "number" then
            error("json.encode: object keys must be strings or numbers, got " .. type(k), 0)
          end
          keys[#keys + 1] = k
        end
        table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
      end
      if #keys == 0 then
        out[#out + 1] = "{}"
      else
        out[#out + 1] = "{"
        for i, k in ipairs(keys) do
          if i > 1 then out[#out + 1] = "," end
          out[#out + 1] = nl .. quote(tostring(k)) .. sep
          encode(v[k], out, indent, depth + 1, seen)
        end
        out[#out + 1] = close .. "}"
      end
    end
    seen[v] = nil
  else
    error("json.encode: cannot encode a " .. tv, 0)
  end
end

function M.encode(v, opts)
  local out = {}
  encode(v, out, opts and opts.indent, 0, {})
  return table.concat(out)
end

-- ------------------------------------------------------------------ decode --

local function decode_error(s, pos, what)
  local line = 1
  for _ in s:sub(1, pos - 1):gmatch("\n") do line = line + 1 end
  error(string.format("json.decode: %s at byte %d (line %d)", what, pos, line), 0)
end

local function skip(s, pos)
  return s:find("[^ \t\r\n]", pos) or #s + 1
end

local decode_value

local function decode_string(s, pos)
  local buf, i = {}, pos + 1
  while true do
    local c = s:sub(i, i)
    if c == "" then decode_error(s, pos, "unterminated string") end
    if c == '"' then return table.concat(buf), i + 1 end
    if c == "\\" then
      local e = s:sub(i + 1, i + 1)
      local map = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n",
                    r = "\r", t = "\t" }
      if map[e] then
        buf[#buf + 1] = map[e]
        i = i + 2
      elseif e == "u" then
        local hex = s:sub(i + 2, i + 5)
        if not hex:match("^%x%x%x%x$") then decode_error(s, i, "bad \\u escape") end
        local cp = tonumber(hex, 16)
        i = i + 6
        if cp >= 0xD800 and cp <= 0xDBFF and s:sub(i, i + 1) == "\\u" then
          local lo = tonumber(s:sub(i + 2, i + 5), 16)
          if lo and lo >= 0xDC00 and lo <= 0xDFFF then
            cp = 0x10000 + (cp - 0xD800) * 0x400 + (lo - 0xDC00)
            i = i + 6
          end
        end
        if cp < 0x80 then
          buf[#buf + 1] = string.char(cp)
        elseif cp < 0x800 then
          buf[#buf + 1] = string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64)
        elseif cp < 0x10000 then
          buf[#buf + 1] = string.char(0xE0 + math.floor(cp / 4096),
                                      0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
        else
          buf[#buf + 1] = string.char(0xF0 + math.floor(cp / 262144),
                                      0x80 + math.floor(cp / 4096) % 64,
                                      0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
        end
      else
        decode_error(s, i, "bad escape")
      end
    elseif c:byte() < 32 then
      decode_error(s, i, "control character in string")
    else
      local j = s:find('["\\%c]', i)
      if not j then decode_error(s, pos, "unterminated string") end
      buf[#buf + 1] = s:sub(i, j - 1)
      i = j
    end
  end
end

decode_value = function(s, pos, depth)
  if depth > 200 then decode_error(s, pos, "nesting too deep") end
  pos = skip(s, pos)
  local c = s:sub(pos, pos)
  if c == "{" then
    local t = {}
    pos = skip(s, pos + 1)
    if s:sub(pos, pos) == "}" then return t, pos + 1 end
    while true do
      pos = skip(s, pos)
      if s:sub(pos, pos) ~= '"' then decode_error(s, pos, "expected a string key") end
      local k
      k, pos = decode_string(s, pos)
      pos = skip(s, pos)
      if s:sub(pos, pos) ~= ":" then decode_error(s, pos, "expected ':'") end
      local v
      v, pos = decode_value(s, pos + 1, depth + 1)
      t[k] = v
      pos = skip(s, pos)
      local d = s:sub(pos, pos)
      if d == "}" then return t, pos + 1 end
      if d ~= "," then decode_error(s, pos, "expected ',' or '}'") end
      pos = pos + 1
    end
  elseif c == "[" then
    local t = M.array({})
    pos = skip(s, pos + 1)
    if s:sub(pos, pos) == "]" then return t, pos + 1 end
    while true do
      local v
      v, pos = decode_value(s, pos, depth + 1)
      t[#t + 1] = v
      pos = skip(s, pos)
      local d = s:sub(pos, pos)
      if d == "]" then return t, pos + 1 end
      if d ~= "," then decode_error(s, pos, "expected ',' or ']'") end
      pos = pos + 1
    end
  elseif c == '"' then
    return decode_string(s, pos)
  elseif s:sub(pos, pos + 3) == "true" then
    return true, pos + 4
  elseif s:sub(pos, pos + 4) == "false" then
    return false, pos + 5
  elseif s:sub(pos, pos + 3) == "null" then
    return M.null, pos + 4
  else
    local num = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
    if not num or num == "" or not tonumber(num) then decode_error(s, pos, "unexpected character") end
    return tonumber(num), pos + #num
  end
end

function M.decode(s)
  if type(s) ~= "string" then error("json.decode: expected a string, got " .. type(s), 2) end
  local v, pos = decode_value(s, 1, 0)
  pos = skip(s, pos)
  if pos <= #s then decode_error(s, pos, "trailing characters") end
  return v
end

return M
