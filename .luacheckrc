-- luacheck configuration (Debian package lua-check): `luacheck bindings scripts spec`
std = "luajit"
max_line_length = 150
ignore = { "581" } -- "not (x <= y)" is deliberate where NaN must count as failure
codes = true
files["spec"] = { std = "+busted" }
files["scripts/spec-examples"] = { std = "+busted" }
files["scripts/repl.lua"] = { globals = { "help", "_PROMPT" } }
exclude_files = { "build*/**", ".gpu-deps/**" }
files["bindings/moe/doc.lua"] = { ignore = { "631" } } -- docstrings are long lines by design
