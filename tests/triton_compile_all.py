"""Compile every Triton kernel variant the CUDA code paths launch, ahead of time, for real GPU targets.

The CPU interpreter forgives what the CUDA compiler rejects (a dot under 16 rows, int64 loop bounds, a branch on a
runtime value inside a constexpr helper, mixed dtypes in tl.where). The constexprs and argument types below are the
ones the launch sites pass on CUDA; keep them in step with those sites.

Run as ``python tests/triton_compile_all.py [--shard I/N] [arch ...]`` (arch like 90 or 86, default 90) in a process
without TRITON_INTERPRET.
Prints ``compiled N`` and exits 0; exit 3 with the reason when this Triton cannot target CUDA on this machine;
a compile error propagates with the kernel and its constexprs named.
"""
from __future__ import annotations

import importlib
import sys
import time

def _variants():
    """(kernel, signature types by argument name, constexprs, launch options) for every launch-site variant."""
    import triton
    import triton.language as tl

    k = {m: importlib.import_module(f"reflectevo.kernels.{m}")
         for m in ("rmsnorm", "rope", "swiglu", "linear_logprobs", "linear_logprobs_tiles", "nf4", "nf4_matmul",
                   "nf4_bnb_cuda", "paged_attention")}
    out = []
    # RMSNorm / RoPE / SwiGLU: the training dtypes and the fp64 path the tests check
    for dt, compute, acc in (("bf16", tl.float32, "fp32"), ("fp16", tl.float32, "fp32"), ("fp64", tl.float64, "fp64")):
        out.append((k["rmsnorm"]._rms_norm_fwd_kernel,
                    dict(X=f"*{dt}", W=f"*{dt}", Y=f"*{dt}", RSTD=f"*{acc}", stride_x="i32", stride_y="i32",
                         N="i32", eps="fp32"), dict(BLOCK=4096, COMPUTE=compute), dict(num_warps=8)))
        for has_dw in (True, False):
            out.append((k["rmsnorm"]._rms_norm_bwd_kernel,
                        dict(DY=f"*{dt}", X=f"*{dt}", W=f"*{dt}", RSTD=f"*{acc}", DX=f"*{dt}", DW_PARTIAL=f"*{acc}",
                             stride_dy="i32", stride_x="i32", stride_dx="i32", M="i32", N="i32",
                             rows_per_program="i32"),
                        dict(BLOCK=4096, COMPUTE=compute, HAS_DW=has_dw), dict(num_warps=8)))
        for backward in (False, True):
            out.append((k["rope"]._rope_kernel,
                        dict(X=f"*{dt}", COS="*fp32", SIN="*fp32", OUT=f"*{dt}", T="i32", H="i32", HALF="i32",
                             stride_xb="i32", stride_xt="i32", stride_xh="i32", stride_ob="i32", stride_ot="i32",
                             stride_oh="i32", stride_cb="i32", stride_ct="i32"),
                        dict(BLOCK_H=32, BLOCK_HALF=64, BACKWARD=backward, COMPUTE=compute), dict(num_warps=8)))
        out.append((k["swiglu"]._swiglu_fwd_kernel, dict(G=f"*{dt}", U=f"*{dt}", Y=f"*{dt}", numel="i64"),
                    dict(BLOCK=1024, COMPUTE=compute), {}))
        out.append((k["swiglu"]._swiglu_bwd_kernel,
                    dict(DY=f"*{dt}", G=f"*{dt}", U=f"*{dt}", DG=f"*{dt}", DU=f"*{dt}", numel="i64"),
                    dict(BLOCK=1024, COMPUTE=compute), {}))

    # linear log-probs: the row kernel over fp32 logit chunks (G in the hidden dtype, or in place), the tiled kernels
    # (z, G) dtypes: fp32 logits with G in any dtype; impl="chunks16": 16-bit logits with G over them
    for z_dt, g_dt in (("fp32", "fp32"), ("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16")):
        for write_g in ((True, False) if g_dt == z_dt else (True,)):
            out.append((k["linear_logprobs"]._rows_kernel,
                        dict(z_ptr=f"*{z_dt}", labels_ptr="*i64", weight_ptr="*fp32", logp_ptr="*fp32",
                             g_ptr=f"*{g_dt}", V="i32", stride_z="i32", stride_g="i32"),
                        dict(WRITE_G=write_g, BLOCK_V=4096), dict(num_warps=8)))
    for dt in ("bf16", "fp16", "fp32"):
        block_h = 32 if dt == "fp32" else 64
        prec = "ieee" if dt == "fp32" else "tf32"
        tiles = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", labels_ptr="*i64", N="i32", V="i32", H="i32", sxn="i32",
                     sxh="i32", swv="i32", swh="i32")
        blocks = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=block_h, PRECISION=prec, UPCAST=False)
        out.append((k["linear_logprobs_tiles"]._fwd_kernel,
                    dict(tiles, part_m_ptr="*fp32", part_s_ptr="*fp32", part_label_ptr="*fp32",
                         blocks_per_split="i32"), blocks, dict(num_warps=8)))
        for dw in ((True, False) if dt != "fp16" else (True,)):
            out.append((k["linear_logprobs_tiles"]._bwd_kernel,
                        dict(tiles, max_ptr="*fp32", logsum_ptr="*fp32", g_ptr="*fp32", dx_ptr="*fp32",
                             dw_ptr="*fp32", num_v_blocks="i32"), dict(blocks, COMPUTE_DW=dw), dict(num_warps=8)))

    # NF4: dequantisation, the fused in-loop-decode matmul (forward and input gradient), the small-batch gemv
    nf4_ptrs = dict(data_ptr="*u8", absmax_ptr="*fp32", absmax2_ptr="*fp32", code2_ptr="*fp32", offset_ptr="*fp32",
                    pairs_ptr="*fp32")
    for dt in ("bf16", "fp16", "fp32"):
        for double in (True, False):
            sig = dict(nf4_ptrs, out_ptr=f"*{dt}", n="i64", n_bytes="i64")
            if double:
                sig["absmax_ptr"] = "*u8"
            for byte_table, words in ((False, True), (False, False), (True, False)):
                out.append((k["nf4"]._nf4_dequant_kernel, sig,
                            dict(BLOCKSIZE=64, DOUBLE=double, ROWS=64, BYTE_TABLE=byte_table, NIBBLE_WORDS=words),
                            dict(enable_fp_fusion=False, num_warps=8)))
    out.append((k["nf4_bnb_cuda"]._rcp_approx_kernel, dict(x_ptr="*fp32", out_ptr="*fp32", n="i32"),
                dict(BLOCK=1024), {}))
    for blocksize in (32, 4096):  # the extremes of bitsandbytes' block sizes: many rows, one row per program
        out.append((k["nf4"]._nf4_dequant_kernel,
                    dict(nf4_ptrs, absmax_ptr="*u8", out_ptr="*bf16", n="i64", n_bytes="i64"),
                    dict(BLOCKSIZE=blocksize, DOUBLE=True, ROWS=max(1, 4096 // blocksize), BYTE_TABLE=False,
                         NIBBLE_WORDS=True),
                    dict(enable_fp_fusion=False, num_warps=8)))
    # every autotuner tile (aligned K, the real models) for bf16 in both directions, fp32 and fp16 once per direction
    # (their dots differ: ieee fp32, fp16 operands); the fixed tile of the unaligned path
    nm = k["nf4_matmul"]
    unaligned = nm._unaligned_tile()
    fused = [("bf16", trans, True, cfg) for trans in (False, True) for cfg in nm._tile_configs(trans)]
    fused += [(dt, trans, True, nm._tile_configs(trans)[3]) for dt in ("fp32", "fp16") for trans in (False, True)]
    fused += [(dt, trans, False, unaligned) for dt in ("bf16", "fp32") for trans in (False, True)]
    fused = [(dt, trans, aligned, cfg, False, False) for dt, trans, aligned, cfg in fused]
    fused += [("bf16", trans, True, nm._tile_configs(trans)[3], False, True) for trans in (False, True)]  # pair table
    # decode-sized inputs: the fixed split-R tiles, fp32 partial sums
    fused += [("bf16", trans, True, triton.Config(dict(BLOCK_M=m, BLOCK_P=64, BLOCK_R=64, SWAP=swap), num_warps=4,
                                                  num_stages=3), True, False)
              for trans in (False, True) for m in (16, 32, 64) for swap in ((True, False) if not trans else (False,))]
    # absmax codes as int32 words (WORDS) on the aligned shapes of real models, as bytes on the odd ones
    for dt, trans, aligned, cfg, split, byte_table in fused:
        sig = dict(nf4_ptrs, a_ptr=f"*{dt}", bias_ptr=f"*{dt}", out_ptr="*fp32" if split else f"*{dt}", M="i32",
                   N="i32", K="i32", stride_am="i32", stride_om="i32", m_bucket="i32", r_per_split="i32",
                   absmax_ptr="*i32" if aligned else "*u8")
        out.append((nm._fused_kernel, sig,
                    dict(BLOCKSIZE=64, DOUBLE=True, HAS_BIAS=not trans, IEEE=dt == "fp32", DOT_FP32=False,
                         TRANS=trans, K_ALIGNED=aligned, SPLIT=split, WORDS=aligned, BYTE_TABLE=byte_table,
                         **cfg.kwargs),
                    dict(enable_fp_fusion=False, num_warps=cfg.num_warps, num_stages=cfg.num_stages)))
    gemv = [("bf16", rows, True, True, 3) for rows in (2, 4, 8)] + [("bf16", 2, False, False, 3),
                                                                    ("fp16", 8, True, True, 3),
                                                                    ("fp32", 8, True, True, 3), ("bf16", 2, True, True, 1)]
    nf4_gemv = importlib.import_module("reflectevo.kernels.nf4_gemv")
    for dt, rows, pairs, per_line, stages in gemv:
        bk = 64
        sig = dict(nf4_ptrs, x_ptr=f"*{dt}", part_ptr="*fp32", M="i32", N="i32", K="i32", stride_xm="i32",
                   k_per_split="i32", absmax_ptr="*i32" if per_line else "*u8")
        for byte_table in ((False, True) if rows == 2 else (False,)):
            out.append((nf4_gemv._gemv_kernel, sig,
                        dict(BLOCKSIZE=64, DOUBLE=True, WORDS=per_line, PAIRS=pairs, PER_LINE=per_line,
                             BYTE_TABLE=byte_table, ROWS=rows, BLOCK_N=max(16, 4096 // (rows * bk)), BLOCK_K=bk,
                             STAGES=stages),
                        dict(enable_fp_fusion=False)))
    # the one-row block GEMV, each width its plan picks
    for dt in ("bf16", "fp16", "fp32"):
        sig = dict(nf4_ptrs, x_ptr=f"*{dt}", part_ptr="*fp32", N="i32", K="i32", k_per_split="i32",
                   absmax_ptr="*i32")
        for bn in ((256, 128, 64) if dt == "bf16" else (256,)):
            out.append((nf4_gemv._gemv_blocks_kernel, sig, dict(BLOCKSIZE=64, DOUBLE=True, WORDS=True, BLOCK_N=bn),
                        {}))

    # paged attention: KV store and the split-K decode, Llama-3-8B (G=4, D=128) and SmolLM2 (G=3, D=64) heads
    for dt in ("bf16", "fp16", "fp32"):
        for row in (8 * 128, 3 * 64):
            out.append((k["paged_attention"]._store_kv_kernel,
                        dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", slot_ptr="*i32"),
                        dict(row=row, BLOCK=1024), {}))
    decode = [("bf16", hkv, g, d) for hkv, g, d in ((8, 4, 128), (3, 3, 64))]
    decode += [(dt, 8, 4, 128) for dt in ("fp16", "fp32")]
    for dt, hkv, g, d in decode:
        out.append((k["paged_attention"]._paged_decode_kernel,
                    dict(q_ptr=f"*{dt}", kc_ptr=f"*{dt}", vc_ptr=f"*{dt}", bt_ptr="*i32", lens_ptr="*i32",
                         out_ptr="*fp32", lse_ptr="*fp32", scale="fp32", stride_bt="i32", blocks_per_split="i32",
                         max_splits="i32"),
                    dict(HKV=hkv, G=g, D=d, BS=16, BLOCK_G=16, BLOCK_D=d,
                         PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False), {}))
    for hq, d in ((32, 128), (9, 64)):
        out.append((k["paged_attention"]._merge_splits_kernel,
                    dict(part_ptr="*fp32", lse_ptr="*fp32", lens_ptr="*i32", out_ptr="*fp32", blocks_per_split="i32",
                         max_splits="i32"), dict(HQ=hq, D=d, BS=16, BLOCK_D=d), {}))
    return out


def compile_all(archs: list[int], shard: int = 0, shards: int = 1) -> int:
    """Compile the variants (every ``shards``-th from ``shard``) for each arch; returns how many compiled."""
    import triton
    from triton.compiler import ASTSource
    from triton.compiler.errors import CompilationError

    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:
        print("this Triton has no GPUTarget")
        sys.exit(3)
    count = 0
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for fn, sig, constexprs, options in _variants()[shard::shards]:
            signature = {name: sig.get(name, "constexpr") for name in fn.arg_names}
            missing = [n for n in fn.arg_names if signature[n] == "constexpr" and n not in constexprs]
            if missing:
                raise AssertionError(f"{fn.__name__}: no type or constexpr value for {missing}")
            try:
                triton.compile(ASTSource(fn, signature, constexprs), target=target,
                               options={"num_warps": 4, **options})
            except CompilationError as e:
                raise AssertionError(f"sm_{arch} {fn.__name__} {constexprs}: {e}") from e
            except Exception as e:  # no ptxas / CUDA backend on this machine
                print(f"cannot compile for CUDA here: {type(e).__name__}: {str(e)[:300]}")
                sys.exit(3)
            count += 1
    return count


if __name__ == "__main__":
    args = sys.argv[1:]
    shard, shards = 0, 1
    if args[:1] == ["--shard"]:
        shard, shards = (int(x) for x in args[1].split("/"))
        args = args[2:]
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    t0 = time.perf_counter()
    n = compile_all([int(a) for a in args] or [90], shard, shards)
    print(f"compiled {n} in {time.perf_counter() - t0:.1f} s")
