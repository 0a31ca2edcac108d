-- moe.ops -- dense math: router GEMM (moe.matmul_nt), RMSNorm, axpby.  Validation and the
-- error messages come from the C engine (engine/src/ops.c), which names the argument.
local ffi = require("ffi")

return function(moe)
  local C = moe.C
  local out_box = ffi.new("moe_tensor*[1]")

  local handle = moe._tensor_arg

  -- out[M, N] = a[M, K] . b[N, K]^T in f32 (the router GEMM: logits = x . W^T).
  -- opts.out: an f32/bf16 [M, N] tensor to write into.
  function moe.matmul_nt(a, b, opts)
    local fn = "moe.matmul_nt"
    local ha, hb = handle(a, fn, "a"), handle(b, fn, "b")
    local out = opts and opts.out
    out_box[0] = out and handle(out, fn, "opts.out") or nil
    local st = C.moe_matmul_nt(ha, hb, out_box)
    local h = out_box[0]
    out_box[0] = nil
    if st ~= 0 then moe._check(st, fn) end
    if out then return out end
    return moe._wrap(h)
  end

  -- RMSNorm over the last dimension; weight may be nil; opts.out to write into (may be x).
  function moe.rmsnorm(x, weight, opts)
    local fn = "moe.rmsnorm"
    local hx = handle(x, fn, "x")
    local hw = weight ~= nil and handle(weight, fn, "weight") or nil
    opts = opts or {}
    local eps = opts.eps or 1e-6
    if type(eps) ~= "number" then error(fn .. ": opts.eps: expected a number, got " .. moe._describe(eps), 2) end
    out_box[0] = opts.out and handle(opts.out, fn, "opts.out") or nil
    local st = C.moe_rmsnorm(hx, hw, eps, out_box)
    local h = out_box[0]
    out_box[0] = nil
    if st ~= 0 then moe._check(st, fn) end
    if opts.out then return opts.out end
    return moe._wrap(h)
  end

  -- y = alpha * x + beta * y in place; returns y.
  function moe.axpby(alpha, x, beta, y)
    local fn = "moe.axpby"
    if type(alpha) ~= "number" then error(fn .. ": alpha: expected a number, got " .. moe._describe(alpha), 2) end
    if type(beta) ~= "number" then error(fn .. ": beta: expected a number, got " .. moe._describe(beta), 2) end
    moe._check(C.moe_axpby(alpha, handle(x, fn, "x"), beta, handle(y, fn, "y")), fn)
    return y
  end
end
