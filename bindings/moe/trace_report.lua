-- moe.trace_report -- text tables, terminal heatmaps, and the markdown + SVG report of a
-- trace comparison (used by moe.trace; no engine calls here).
local ffi = require("ffi")

local R = {}

local function isnan(x) return x ~= x end

local function pct(x)
  if x == nil or isnan(x) then return "n/a" end
  return string.format("%.2f%%", 100 * x)
end

local function num(x, fmt)
  if x == nil or isnan(x) then return "n/a" end
  return string.format(fmt or "%.4f", x)
end

-- ----------------------------------------------------------------- sparkline --

local SPARK = { "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█" }

local function sparkline(values)
  local mx = 0
  for _, v in ipairs(values) do if not isnan(v) and v > mx then mx = v end end
  local out = {}
  for i, v in ipairs(values) do
    if isnan(v) then
      out[i] = " "
    else
      local k = mx > 0 and math.floor(v / mx * 7 + 0.5) + 1 or 1
      out[i] = SPARK[k]
    end
  end
  return table.concat(out)
end

-- ------------------------------------------------------------- compact table --

function R.cmp_text(c)
  local lines = {}
  local function add(fmt, ...) lines[#lines + 1] = string.format(fmt, ...) end
  add("trace comparison: %d tokens x %d layers, top-%d of %d experts", c.tokens, c.layers,
      c.top_k, c.num_experts)
  add("  A: %s", c.names.a)
  add("  B: %s", c.names.b)
  add("  %-24s %10s   %s", "router disagreement", pct(c.router_disagreement),
      string.format("%d of %d (token, layer) positions", c.differing, c.compared))
  add("  %-24s %10s   %s", "token disagreement", pct(c.token_disagreement),
      string.format("mean %s differing layers per token", num(c.mean_layers_differing, "%.2f")))
  add("  %-24s %10s", "jaccard (mean)", num(c.jaccard))
  add("  %-24s %10s", string.format("overlap@%d", c.top_k), num(c.overlap))
  add("  %-24s %10s", "exact agreement", pct(c.exact_agreement))
  add("  %-24s %10d   %s", "skipped positions", c.skipped,
      string.format("(%d tokens with no captured layer)", c.tokens_skipped))
  add("  %-24s %10s", "JS divergence (mean)", num(c.js_divergence_mean, "%.5f") .. " bits")
  if c.weights then
    add("  %-24s %10s", "mean |dw| shared", num(c.weights.abs_diff, "%.5f"))
    add("  %-24s %10s", "weight mass moved", num(c.weights.mass_moved, "%.5f"))
  end
  add("  load balance         %12s %12s", "A", "B")
  for _, k in ipairs{ "max_over_mean", "cv", "jain", "entropy" } do
    add("    %-18s %12s %12s", k, num(c.load.a[k]), num(c.load.b[k]))
  end
  local rd = {}
  for l = 1, c.layers do rd[l] = c.per_layer[l].router_disagreement end
  if c.layers <= 16 then
    add("  %-6s %10s %10s %9s %9s %9s %9s", "layer", "compared", "skipped", "disagree",
        "jaccard", "overlap", "JS")
    for l = 1, c.layers do
      local p = c.per_layer[l]
      add("  %-6d %10d %10d %9s %9s %9s %9s", l - 1, p.compared, p.skipped,
          pct(p.router_disagreement), num(p.jaccard), num(p.overlap), num(p.js_divergence, "%.5f"))
    end
  else
    add("  per-layer disagreement (layer 0..%d): %s", c.layers - 1, sparkline(rd))
    local idx = {}
    for l = 1, c.layers do idx[l] = l end
    table.sort(idx, function(x, y)
      local a, b = rd[x], rd[y]
      if isnan(a) then a = -1 end
      if isnan(b) then b = -1 end
      if a ~= b then return a > b end
      return x < y
    end)
    local worst = {}
    for i = 1, math.min(3, #idx) do
      worst[i] = string.format("layer %d %s", idx[i] - 1, pct(rd[idx[i]]))
    end
    add("  worst layers: %s", table.concat(worst, ", "))
  end
  local fd, best = c.first_differing_layer, nil
  for l = 1, #fd do if fd[l] > 0 and (not best or fd[l] > fd[best]) then best = l end end
  if best then
    add("  first differing layer: most often layer %d (%d tokens); histogram %s", best - 1,
        fd[best], sparkline(fd))
  end
  return table.concat(lines, "\n")
end

function R.stats_text(s)
  local lines = {}
  local function add(fmt, ...) lines[#lines + 1] = string.format(fmt, ...) end
  add("trace stats: %d tokens x %d layers, top-%d of %d experts", s.tokens, s.layers, s.top_k,
      s.num_experts)
  add("  captured positions %d, skipped %d", s.captured, s.skipped)
  for _, k in ipairs{ "max_over_mean", "cv", "jain", "entropy" } do
    add("  %-16s %s (mean over layers)", k, num(s.balance[k]))
  end
  local hot = {}
  for i, h in ipairs(s.hot_experts) do
    hot[i] = string.format("%d (%s)", h.expert, pct(h.share))
  end
  add("  hot experts: %s", table.concat(hot, ", "))
  return table.concat(lines, "\n")
end

-- ------------------------------------------------------------------ colours --

-- Viridis anchors (matplotlib), interpolated.
local VIRIDIS = {
  { 68, 1, 84 }, { 72, 40, 120 }, { 62, 74, 137 }, { 49, 104, 142 }, { 38, 130, 142 },
  { 31, 158, 137 }, { 53, 183, 121 }, { 109, 205, 89 }, { 180, 222, 44 }, { 253, 231, 37 },
}
-- Diverging blue - white - red.
local DIVERGING = { { 33, 102, 172 }, { 103, 169, 207 }, { 209, 229, 240 }, { 247, 247, 247 },
                    { 253, 219, 199 }, { 239, 138, 98 }, { 178, 24, 43 } }

local function ramp(stops, t)
  if isnan(t) then return 200, 200, 200 end
  t = math.max(0, math.min(1, t))
  local x = t * (#stops - 1)
  local i = math.floor(x)
  if i >= #stops - 1 then i = #stops - 2 end
  local f = x - i
  local a, b = stops[i + 1], stops[i + 2]
  return math.floor(a[1] + (b[1] - a[1]) * f + 0.5), math.floor(a[2] + (b[2] - a[2]) * f + 0.5),
         math.floor(a[3] + (b[3] - a[3]) * f + 0.5)
end

local function hex(r, g, b) return string.format("#%02x%02x%02x", r, g, b) end

-- Nearest xterm-256 colour cube index.
local function xterm(r, g, b)
  local function q(v) return v < 48 and 0 or (v < 115 and 1 or math.floor((v - 35) / 40)) end
  return 16 + 36 * q(r) + 6 * q(g) + q(b)
end

-- --------------------------------------------------------- terminal heatmap --

local isatty_ok = pcall(ffi.cdef, "int isatty(int fd);")

local function color_terminal()
  if os.getenv("NO_COLOR") then return false end
  local term = os.getenv("TERM") or ""
  if not (term:find("256color", 1, true) or os.getenv("COLORTERM")) then return false end
  local ok, r = pcall(function() return ffi.C.isatty(1) end)
  return isatty_ok and ok and r == 1
end
R.color_terminal = color_terminal

local BLOCKS = { " ", "░", "▒", "▓", "█" }

-- loads: array (layers) of arrays (experts) of numbers, a stats result, or a comparison
-- (opts.which = "a" | "b" | "diff").  Returns the text.
function R.heatmap(moe, loads, opts)
  opts = opts or {}
  local fn = "moe.trace.heatmap"
  local title = opts.title
  local signed = opts.signed
  if type(loads) == "table" and getmetatable(loads) == moe.trace.Trace then
    loads = moe.trace.stats(loads).loads
  elseif type(loads) == "table" and loads.loads and loads.loads.a then
    local w = opts.which or "a"
    if w == "diff" then
      local d = {}
      for l = 1, #loads.loads.a do
        local ra, rb, sa, sb = loads.loads.a[l], loads.loads.b[l], 0, 0
        for e = 1, #ra do sa, sb = sa + ra[e], sb + rb[e] end
        d[l] = {}
        for e = 1, #ra do
          d[l][e] = (sb > 0 and rb[e] / sb or 0) - (sa > 0 and ra[e] / sa or 0)
        end
      end
      loads, signed = d, true
      title = title or "load share B - A"
    else
      loads = loads.loads[w]
    end
  elseif type(loads) == "table" and loads.loads then
    loads = loads.loads
  end
  if type(loads) ~= "table" or type(loads[1]) ~= "table" then
    error(fn .. ": loads: expected a table of per-layer tables of expert loads, a trace, stats or a comparison", 2)
  end
  local L, E = #loads, #loads[1]
  local width = opts.width or math.min(96, math.max(8, (tonumber(os.getenv("COLUMNS")) or 100) - 12))
  local group = math.max(1, math.ceil(E / width))
  local cols = math.ceil(E / group)
  local color = opts.color
  if color == nil then color = color_terminal() end
  local mx = 0
  local cells = {}
  for l = 1, L do
    cells[l] = {}
    for c = 1, cols do
      local s = 0
      for e = (c - 1) * group + 1, math.min(E, c * group) do s = s + (loads[l][e] or 0) end
      cells[l][c] = s
      if math.abs(s) > mx then mx = math.abs(s) end
    end
  end
  local out = {}
  if title then out[#out + 1] = title end
  out[#out + 1] = string.format("layers 0..%d (rows) x experts 0..%d (columns%s)", L - 1, E - 1,
                                group > 1 and string.format(", %d experts per column", group) or "")
  for l = 1, L do
    local row = { string.format("%4d │", l - 1) }
    for c = 1, cols do
      local v = cells[l][c]
      local t = mx > 0 and (signed and (v / mx + 1) / 2 or v / mx) or 0
      if color then
        local r, g, b = ramp(signed and DIVERGING or VIRIDIS, t)
        row[#row + 1] = string.format("\27[38;5;%dm█", xterm(r, g, b))
      else
        local a = signed and math.abs(v) / math.max(mx, 1e-300) or t
        local k = math.floor(a * 4 + 0.5) + 1
        if signed and v < 0 and k > 1 then
          row[#row + 1] = ({ "-", "-", "=", "≡" })[k - 1] or "≡"
        else
          row[#row + 1] = BLOCKS[k]
        end
      end
    end
    if color then row[#row + 1] = "\27[0m" end
    row[#row + 1] = "│"
    out[#out + 1] = table.concat(row)
  end
  local fmt = signed and "%+.3g" or "%.4g"
  if color then
    local leg = {}
    for i = 0, 15 do
      local r, g, b = ramp(signed and DIVERGING or VIRIDIS, i / 15)
      leg[#leg + 1] = string.format("\27[38;5;%dm█", xterm(r, g, b))
    end
    out[#out + 1] = string.format("scale: %s %s\27[0m %s", string.format(fmt, signed and -mx or 0),
                                  table.concat(leg), string.format(fmt, mx))
  elseif signed then
    out[#out + 1] = string.format("scale: |value| / %s as ' ░▒▓█' (positive) or '--=≡' (negative)",
                                  string.format("%.4g", mx))
  else
    out[#out + 1] = string.format("scale: ' '=0  ░ ▒ ▓ █ = %s (max per cell)", string.format(fmt, mx))
  end
  return table.concat(out, "\n")
end

-- ---------------------------------------------------------------------- SVG --

local function esc(s)
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
                                         ['"'] = "&quot;", ["'"] = "&apos;" }))
end

local Svg = {}
Svg.__index = Svg

local function svg_new(w, h, title)
  local s = setmetatable({ w = w, h = h, parts = {} }, Svg)
  s:add(string.format('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" ' ..
                      'viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">', w, h, w, h))
  s:add(string.format("<title>%s</title>", esc(title)))
  s:add(string.format('<rect x="0" y="0" width="%d" height="%d" fill="white"/>', w, h))
  s:text(w / 2, 22, title, { size = 15, anchor = "middle", weight = "bold" })
  return s
end

function Svg:add(x) self.parts[#self.parts + 1] = x end

function Svg:text(x, y, str, o)
  o = o or {}
  local tr = o.rotate and string.format(' transform="rotate(%d %.1f %.1f)"', o.rotate, x, y) or ""
  self:add(string.format('<text x="%.1f" y="%.1f" font-size="%d" text-anchor="%s"%s%s%s>%s</text>',
                         x, y, o.size or 12, o.anchor or "start",
                         o.weight and (' font-weight="' .. o.weight .. '"') or "",
                         o.fill and (' fill="' .. o.fill .. '"') or "", tr, esc(str)))
end

function Svg:rect(x, y, w, h, fill, o)
  o = o or {}
  self:add(string.format('<rect x="%.2f" y="%.2f" width="%.2f" height="%.2f" fill="%s"%s%s>%s</rect>',
                         x, y, math.max(w, 0), math.max(h, 0), fill,
                         o.stroke and (' stroke="' .. o.stroke .. '"') or "",
                         o.class and (' class="' .. o.class .. '"') or "",
                         o.tip and ("<title>" .. esc(o.tip) .. "</title>") or ""))
end

function Svg:line(x1, y1, x2, y2, stroke, width, dash)
  self:add(string.format('<line x1="%.2f" y1="%.2f" x2="%.2f" y2="%.2f" stroke="%s" stroke-width="%s"%s/>',
                         x1, y1, x2, y2, stroke, width or 1,
                         dash and (' stroke-dasharray="' .. dash .. '"') or ""))
end

function Svg:finish()
  self:add("</svg>")
  return table.concat(self.parts, "\n") .. "\n"
end

local function nice_max(v)
  if not (v > 0) then return 1 end -- luacheck: ignore 581 (also catches NaN)
  local p = 10 ^ math.floor(math.log10(v))
  for _, m in ipairs{ 1, 2, 2.5, 5, 10 } do
    if m * p >= v then return m * p end
  end
  return 10 * p
end

-- Axis frame with y ticks (0..ymax, 5 steps), x/y labels.
local function axes(s, x0, y0, pw, ph, ymax, xlabel, ylabel, yfmt)
  for i = 0, 5 do
    local v = ymax * i / 5
    local y = y0 + ph - ph * i / 5
    s:line(x0, y, x0 + pw, y, "#dddddd", 1)
    s:text(x0 - 6, y + 4, string.format(yfmt or "%g", v), { anchor = "end", size = 11 })
  end
  s:line(x0, y0, x0, y0 + ph, "#333333", 1)
  s:line(x0, y0 + ph, x0 + pw, y0 + ph, "#333333", 1)
  s:text(x0 + pw / 2, y0 + ph + 38, xlabel, { anchor = "middle" })
  s:text(x0 - 48, y0 + ph / 2, ylabel, { anchor = "middle", rotate = -90 })
end

local function legend(s, x, y, items)
  for i, it in ipairs(items) do
    local yy = y + (i - 1) * 18
    s:rect(x, yy - 10, 12, 12, it[2])
    s:text(x + 18, yy, it[1], { size = 12 })
  end
end

-- Bar chart: series = {{name, colour, values}, ...} over categories (x labels).
-- xname/unit only label the tooltips ("router disagreement, layer 3: 12.5%").
local function bar_chart(title, cats, series, xlabel, ylabel, yfmt, scale, xname, unit)
  local n = #cats
  local pw = math.max(420, math.min(1400, n * 18 * #series))
  local maxlen = 0
  for _, se in ipairs(series) do maxlen = math.max(maxlen, #se[1]) end
  local x0, y0, ph = 80, 50, 300
  local W, Hh = x0 + pw + 60 + 7 * maxlen, 420
  local s = svg_new(W, Hh, title)
  local mx = 0
  for _, se in ipairs(series) do
    for _, v in ipairs(se[3]) do if not isnan(v) and v * (scale or 1) > mx then mx = v * (scale or 1) end end
  end
  local ymax = nice_max(mx)
  axes(s, x0, y0, pw, ph, ymax, xlabel, ylabel, yfmt)
  local slot = pw / math.max(n, 1)
  local bw = slot * 0.8 / #series
  local step = math.max(1, math.ceil(n / 30))
  for i = 1, n do
    local cx = x0 + (i - 1) * slot
    for j, se in ipairs(series) do
      local v = se[3][i]
      if v ~= nil and not isnan(v) then
        local hgt = ph * (v * (scale or 1)) / ymax
        s:rect(cx + slot * 0.1 + (j - 1) * bw, y0 + ph - hgt, bw, hgt, se[2],
               { class = "series-" .. se[1]:gsub("[^%w]", "_"),
                 tip = string.format("%s, %s%s: %s%s", se[1], xname and (xname .. " ") or "", cats[i],
                                     string.format(yfmt or "%g", v * (scale or 1)), unit or "") })
      end
    end
    if (i - 1) % step == 0 then
      s:text(cx + slot / 2, y0 + ph + 16, cats[i], { anchor = "middle", size = 10 })
    end
  end
  local items = {}
  for _, se in ipairs(series) do items[#items + 1] = { se[1], se[2] } end
  legend(s, x0 + pw + 20, y0 + 10, items)
  return s:finish()
end
R.bar_chart = bar_chart

-- Heatmap (layers x experts) with a colour scale bar.
local function heatmap_svg(title, m, signed, unit)
  local L, E = #m, #m[1]
  local cw = math.max(2, math.min(24, math.floor(900 / E)))
  local ch = math.max(4, math.min(24, math.floor(520 / L)))
  local x0, y0 = 70, 50
  local pw, ph = cw * E, ch * L
  local W, Hh = x0 + pw + 150, y0 + ph + 70
  local s = svg_new(W, Hh, title)
  local mx = 0
  for l = 1, L do for e = 1, E do
    local v = math.abs(m[l][e]); if v == v and v > mx then mx = v end
  end end
  if mx == 0 then mx = 1 end
  for l = 1, L do
    for e = 1, E do
      local v = m[l][e]
      local t = signed and (v / mx + 1) / 2 or v / mx
      local r, g, b = ramp(signed and DIVERGING or VIRIDIS, t)
      s:rect(x0 + (e - 1) * cw, y0 + (l - 1) * ch, cw, ch, hex(r, g, b),
             { tip = string.format("layer %d, expert %d: %.4g%s", l - 1, e - 1, v, unit or "") })
    end
  end
  s:line(x0, y0 + ph, x0 + pw, y0 + ph, "#333333", 1)
  s:line(x0, y0, x0, y0 + ph, "#333333", 1)
  local xs = math.max(1, nice_max(E / 10))
  for e = 0, E - 1, xs do
    s:line(x0 + (e + 0.5) * cw, y0 + ph, x0 + (e + 0.5) * cw, y0 + ph + 4, "#333333", 1)
    s:text(x0 + (e + 0.5) * cw, y0 + ph + 16, tostring(e), { anchor = "middle", size = 10 })
  end
  local ys = math.max(1, nice_max(L / 15))
  for l = 0, L - 1, ys do
    s:text(x0 - 6, y0 + (l + 0.5) * ch + 4, tostring(l), { anchor = "end", size = 10 })
  end
  s:text(x0 + pw / 2, y0 + ph + 38, "expert id", { anchor = "middle" })
  s:text(x0 - 40, y0 + ph / 2, "MoE layer", { anchor = "middle", rotate = -90 })
  -- colour scale
  local sx, sy, sh = x0 + pw + 30, y0, math.max(120, math.min(ph, 300))
  local steps = 32
  for i = 0, steps - 1 do
    local t = 1 - i / (steps - 1)
    local r, g, b = ramp(signed and DIVERGING or VIRIDIS, t)
    s:rect(sx, sy + i * sh / steps, 18, sh / steps + 0.5, hex(r, g, b))
  end
  local top = signed and string.format("%+.3g%s", mx, unit or "") or string.format("%.4g%s", mx, unit or "")
  local bot = signed and string.format("%+.3g%s", -mx, unit or "") or "0"
  s:text(sx + 24, sy + 10, top, { size = 11 })
  s:text(sx + 24, sy + sh, bot, { size = 11 })
  if signed then s:text(sx + 24, sy + sh / 2 + 4, "0", { size = 11 }) end
  s:text(sx, sy + sh + 20, "colour scale", { size = 11 })
  return s:finish()
end
R.heatmap_svg = heatmap_svg

local function write_file(path, text)
  local tmp = path .. ".tmp"
  local f, err = io.open(tmp, "wb")
  if not f then error("cmp:report: cannot write " .. path .. ": " .. tostring(err), 3) end
  f:write(text)
  f:close()
  os.rename(tmp, path)
end

-- Per-layer shares (each row divided by its sum), as percentages.
local function shares(m)
  local r = {}
  for l = 1, #m do
    local s = 0
    for e = 1, #m[l] do s = s + m[l][e] end
    r[l] = {}
    for e = 1, #m[l] do r[l][e] = s > 0 and 100 * m[l][e] / s or 0 end
  end
  return r
end

local COL_A, COL_B = "#1f77b4", "#ff7f0e"

function R.write(c, dir, opts)
  local cats = {}
  for l = 1, c.layers do cats[l] = tostring(l - 1) end
  local rd, jc = {}, {}
  for l = 1, c.layers do
    local p = c.per_layer[l]
    rd[l], jc[l] = p.router_disagreement, 1 - p.jaccard
  end
  local files = {}
  local function put(name, text)
    write_file(dir .. "/" .. name, text)
    files[#files + 1] = name
  end
  put("disagreement.svg", bar_chart("Router disagreement per layer", cats,
    { { "router disagreement", "#d62728", rd }, { "1 - jaccard", "#9467bd", jc } },
    "MoE layer", "share of tokens (%)", "%.3g", 100, "layer", "%"))
  local sa, sb = shares(c.loads.a), shares(c.loads.b)
  local diff = {}
  for l = 1, c.layers do
    diff[l] = {}
    for e = 1, c.num_experts do diff[l][e] = sb[l][e] - sa[l][e] end
  end
  put("load_a.svg", heatmap_svg("Expert load share, A: " .. c.names.a, sa, false, "%"))
  put("load_b.svg", heatmap_svg("Expert load share, B: " .. c.names.b, sb, false, "%"))
  put("load_diff.svg", heatmap_svg("Expert load share difference, B - A (percentage points)", diff, true, " pp"))
  local fcats, fvals = {}, {}
  for l = 1, c.layers do fcats[l], fvals[l] = cats[l], c.first_differing_layer[l] end
  fcats[#fcats + 1] = "none"
  fvals[#fvals + 1] = c.tokens_compared - c.tokens_differing
  put("first_diff.svg", bar_chart("First differing layer per token", fcats,
    { { "tokens", "#2ca02c", fvals } }, "first MoE layer where the top-K sets differ", "tokens", "%d", 1,
    "first differing layer"))
  local keys = { "max_over_mean", "cv", "jain", "entropy" }
  local va, vb = {}, {}
  for i, k in ipairs(keys) do va[i], vb[i] = c.load.a[k], c.load.b[k] end
  put("balance.svg", bar_chart("Load balance (mean over layers)", keys,
    { { "A: " .. c.names.a, COL_A, va }, { "B: " .. c.names.b, COL_B, vb } }, "metric", "value", "%.3g"))

  local md = {}
  local function add(fmt, ...) md[#md + 1] = select("#", ...) > 0 and string.format(fmt, ...) or fmt end
  add("# Trace comparison")
  add("")
  add("- **A**: %s", c.names.a)
  add("- **B**: %s", c.names.b)
  add("- %d tokens x %d MoE layers, top-%d of %d experts; %d positions compared, %d skipped " ..
      "(an id of -1 in either trace)",
      c.tokens, c.layers, c.top_k, c.num_experts, c.compared, c.skipped)
  add("")
  add("| metric | value |")
  add("|---|---|")
  add("| router disagreement | %s |", pct(c.router_disagreement))
  add("| token disagreement | %s |", pct(c.token_disagreement))
  add("| mean differing layers per token | %s |", num(c.mean_layers_differing, "%.3f"))
  add("| mean Jaccard | %s |", num(c.jaccard))
  add("| overlap@%d | %s |", c.top_k, num(c.overlap))
  add("| exact positional agreement | %s |", pct(c.exact_agreement))
  add("| mean JS divergence of loads | %s bits |", num(c.js_divergence_mean, "%.5f"))
  if c.weights then
    add("| mean abs weight difference (shared experts) | %s |", num(c.weights.abs_diff, "%.5f"))
    add("| routing-weight mass moved | %s |", num(c.weights.mass_moved, "%.5f"))
  end
  add("")
  add("![router disagreement per layer](disagreement.svg)")
  add("")
  add("## Load balance")
  add("")
  add("| | max/mean | cv | Jain | entropy | hot expert |")
  add("|---|---|---|---|---|---|")
  add("| A | %s | %s | %s | %s | %d |", num(c.load.a.max_over_mean), num(c.load.a.cv), num(c.load.a.jain),
      num(c.load.a.entropy), c.load.a.hot_expert)
  add("| B | %s | %s | %s | %s | %d |", num(c.load.b.max_over_mean), num(c.load.b.cv), num(c.load.b.jain),
      num(c.load.b.entropy), c.load.b.hot_expert)
  add("")
  add("![load balance](balance.svg)")
  add("")
  add("![expert load A](load_a.svg)")
  add("")
  add("![expert load B](load_b.svg)")
  add("")
  add("![expert load difference](load_diff.svg)")
  add("")
  add("## First differing layer")
  add("")
  add("![first differing layer](first_diff.svg)")
  add("")
  add("## Per layer")
  add("")
  add("| layer | compared | skipped | disagreement | Jaccard | overlap | exact | JS (bits) |")
  add("|---|---|---|---|---|---|---|---|")
  for l = 1, c.layers do
    local p = c.per_layer[l]
    add("| %d | %d | %d | %s | %s | %s | %s | %s |", l - 1, p.compared, p.skipped,
        pct(p.router_disagreement), num(p.jaccard), num(p.overlap), pct(p.exact_agreement),
        num(p.js_divergence, "%.5f"))
  end
  add("")
  add("Metrics: docs/traces.md. Layers and expert ids count from 0.")
  put("report.md", table.concat(md, "\n") .. "\n")
  if opts.json ~= false then put("metrics.json", c:json()) end
  return files
end

return R
