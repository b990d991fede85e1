"""The yardstick for attnc's main loops: a plain FlashAttention-2-style forward kernel in Triton
(no mask, scale folded into exp2, one program per (q tile, batch * head)), written here from the
algorithm, compiled the same way as attnc's kernels (codegen/target.py) for the same targets."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fa2_fwd(Q, K, V, Out, stride_qm, stride_km, stride_vm, stride_om, N, qk_scale_log2,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh * N * HEAD_DIM
    q = tl.load(Q + base + offs_m[:, None] * stride_qm + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + base + cols[:, None] * stride_km + offs_d[None, :])
        v = tl.load(V + base + cols[:, None] * stride_vm + offs_d[None, :])
        s = tl.dot(q, tl.trans(k)) * qk_scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(Out + base + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(Out.dtype.element_ty))


def compile_yardstick(arch: int, dtype: str, head_dim: int, block_m: int = 64, block_n: int = 64,
                      num_warps: int = 4, num_stages: int = 3):
    """The yardstick compiled natively for sm_`arch` (needs TRITON_INTERPRET unset or 0)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptr = "*" + dtype
    sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "stride_qm": "i32", "stride_km": "i32", "stride_vm": "i32",
           "stride_om": "i32", "N": "i32", "qk_scale_log2": "fp32",
           "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    const = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n}
    # Specialised as a launch on contiguous tensors is (and as attnc's reports are): aligned
    # pointers, row strides (= head_dim) and N divisible by 16.
    aligned = [n for n, name in enumerate(sig) if sig[name].startswith("*")
               or (name.startswith("stride") and head_dim % 16 == 0) or name == "N"]
    attrs = {(n,): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fa2_fwd, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
