"""NF4 quantisation against bitsandbytes (byte-identical packing, identical dequantisation), the Triton dequant
kernel against the PyTorch reference, and the fused 4-bit matmul (forward and dx) against dequant + matmul."""
import io

import pytest
import torch

from reflectevo.kernels import kernel_backend
from reflectevo.kernels.nf4 import (
    NF4_TABLE,
    NF4Tensor,
    _dequantize_triton,
    dynamic_code,
    kernel_args,
    nf4_dequantize,
    nf4_dequantize_reference,
    nf4_from_bnb,
    nf4_quantize,
)
from reflectevo.kernels.nf4_gemv import gemv
from reflectevo.kernels.nf4_matmul import llama3_8b_nf4_bytes_per_param, nf4_matmul

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def cpu_triton():
    """For the tests that launch a Triton kernel on CPU tensors directly rather than through a dispatcher (which
    raises InterpreterRequired, a skip in conftest): skipped the same way where the interpreter is off, i.e. on a
    CUDA machine, where Triton refuses CPU pointers and tests/test_gpu.py runs the kernels compiled."""
    from reflectevo.kernels._dispatch import interpreting

    if not interpreting():
        pytest.skip("Triton on CPU tensors needs the interpreter, which is off here")


def _weights():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(70, 33, generator=g)
    yield "random_large", torch.randn(257, 129, generator=g)
    yield "zero", torch.zeros(64, 64)
    yield "constant", torch.full((48, 40), 0.3)
    yield "constant_neg_1d", torch.full((300,), -2.0)
    yield "tiny_scale", torch.randn(31, 97, generator=g) * 1e-30
    rows = torch.logspace(-6, 3, 3)[:, None]
    yield "mixed_scale", torch.randn(3, 64 * 256 + 5, generator=g) * rows  # spans > 1 double-quant block
    yield "single", torch.tensor([0.7])
    yield "odd_bf16", torch.randn(17, 3, generator=g).bfloat16()
    yield "outliers", torch.randn(65, 65, generator=g) * (1 + 100 * (torch.rand(65, 65, generator=g) > 0.99))


WEIGHTS = list(_weights())


@pytest.mark.parametrize("name,w", WEIGHTS, ids=[n for n, _ in WEIGHTS])
def test_bytes_and_dequant_match_bitsandbytes(name, w):
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize(w, blocksize=64, double_quant=True)
    assert q.data.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    assert torch.equal(q.data, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)
    assert torch.equal(q.absmax2, state.state2.absmax)
    assert torch.equal(q.code2, state.state2.code)
    assert torch.equal(q.offset, state.offset)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        ref = bnbf.dequantize_4bit(packed, state)
        ours = nf4_dequantize_reference(q, dtype)
        assert ours.dtype == dtype and ours.shape == w.shape
        assert torch.equal(ours.reshape(-1), ref.reshape(-1)), (name, dtype)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    w = torch.randn(90, 70)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    q = nf4_quantize(w, blocksize=blocksize)
    assert torch.equal(q.data, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(nf4_dequantize_reference(q, torch.float32), bnbf.dequantize_4bit(packed, state))
    with kernel_backend("triton"):
        assert torch.equal(nf4_dequantize(q, torch.float32), nf4_dequantize_reference(q, torch.float32))
        x = torch.randn(3, 70)
        torch.testing.assert_close(nf4_matmul(x, q, path="gemv"), x @ nf4_dequantize_reference(q, torch.float32).t())


def test_without_double_quant_matches_bitsandbytes():
    w = torch.randn(100, 77)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q = nf4_quantize(w, double_quant=False)
    assert torch.equal(q.data, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    assert torch.equal(nf4_dequantize_reference(q, torch.float32), bnbf.dequantize_4bit(packed, state))


def test_bnb_tensor_imports_and_dequantizes_identically():
    w = torch.randn(100, 130)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = nf4_from_bnb(packed, state)
    ref = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(nf4_dequantize_reference(q, torch.float32), ref)
    with kernel_backend("triton"):
        assert torch.equal(nf4_dequantize(q, torch.float32), ref)


def test_tables_match_bitsandbytes():
    assert torch.equal(NF4_TABLE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_code(), bnbf.create_dynamic_map())


def test_error_is_small_and_zero_exact():
    w = torch.randn(128, 128)
    d = nf4_dequantize_reference(nf4_quantize(w), torch.float32)
    rel = (d - w).norm() / w.norm()
    assert 0.05 < rel < 0.15  # NF4 on Gaussian weights: ~10% relative error
    assert torch.count_nonzero(nf4_dequantize_reference(nf4_quantize(torch.zeros(10, 10)))) == 0


@pytest.mark.parametrize("name,w", [WEIGHTS[i] for i in (0, 3, 4, 5, 8)], ids=[WEIGHTS[i][0] for i in (0, 3, 4, 5, 8)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_dequant_matches_reference(name, w, double_quant):
    q = nf4_quantize(w, double_quant=double_quant)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        with kernel_backend("triton"):
            out = nf4_dequantize(q, dtype)
        assert torch.equal(out, nf4_dequantize_reference(q, dtype))
        for byte_table in (True, False):  # one lookup per byte in the pair table, or one per nibble
            assert torch.equal(_dequantize_triton(q, dtype, byte_table), out)


def test_triton_dequant_across_double_quant_blocks():
    w = torch.randn(2, 64 * 256 + 64 * 3 + 7) * torch.tensor([[1e-3], [10.0]])
    q = nf4_quantize(w)
    assert q.absmax2.numel() == 3
    with kernel_backend("triton"):
        out = nf4_dequantize(q, torch.float32)
    assert torch.equal(out, nf4_dequantize_reference(q, torch.float32))


def test_nf4tensor_moves_and_saves(tmp_path):
    q = nf4_quantize(torch.randn(40, 24))
    moved = q.to("cpu", dtype=torch.float32)
    assert moved.dtype == torch.float32 and moved.data.data_ptr() == q.data.data_ptr()
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    back = NF4Tensor.from_state_dict(torch.load(buf))
    assert back.shape == q.shape and back.blocksize == 64 and back.dtype == q.dtype
    assert torch.equal(nf4_dequantize_reference(back), nf4_dequantize_reference(q))
    from safetensors.torch import load_file, save_file

    save_file(q.state_dict(), str(tmp_path / "w.safetensors"))
    back = NF4Tensor.from_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(nf4_dequantize_reference(back), nf4_dequantize_reference(q))
    torch.save(q, tmp_path / "q.pt")
    assert torch.equal(torch.load(tmp_path / "q.pt", weights_only=False).data, q.data)


def test_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(torch.randn(8, 8), blocksize=48)
    with pytest.raises(ValueError, match="dtype"):
        nf4_quantize(torch.ones(8, 8, dtype=torch.int32))
    q = nf4_quantize(torch.randn(16, 32))
    with pytest.raises(ValueError, match="features"):
        nf4_matmul(torch.randn(2, 31), q)


def _ref_matmul(x, q, bias, dy):
    """fp32 math on the weight rounded to x's dtype (what dequant + matmul computes, without output rounding)."""
    w = nf4_dequantize_reference(q, x.dtype).float()
    y = x.float() @ w.t() + (bias.float() if bias is not None else 0)
    return y, dy.float() @ w


MATMUL_CASES = [
    # (N, K, tokens, dtype, path)
    (48, 96, 1, torch.float32, "gemv"),
    (40, 70, 5, torch.bfloat16, "gemv"),
    (32, 128, 3, torch.float32, "gemv"),  # K % 64 == 0: one absmax per tile row
    (24, 33, 1, torch.float32, "gemv"),  # K odd: values of one byte straddle two rows
    (16, 256, 2, torch.bfloat16, "gemv"),  # K split over four programs, fp32 partial sums
    (40, 192, 2, torch.float32, "gemv"),  # whole K tiles (no K mask) in two splits, features ragged
    (40, 128, 24, torch.float32, "fused"),
    (48, 96, 20, torch.float32, "fused"),
    (33, 64, 17, torch.bfloat16, "fused"),
    (40, 70, 9, torch.float32, "fused"),  # K not a multiple of 64: blocks straddle rows
    (48, 96, 12, torch.bfloat16, "dequant"),
]


@pytest.mark.parametrize("n,k,m,dtype,path", MATMUL_CASES)
def test_fused_matmul_forward_and_dx(n, k, m, dtype, path):
    g = torch.Generator().manual_seed(n * k + m)
    q = nf4_quantize(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    x = torch.randn(2, m, k, generator=g).to(dtype).requires_grad_(True)
    with kernel_backend("triton"):
        y = nf4_matmul(x, q, bias, path=path)
        dy = torch.randn(y.shape, generator=g).to(dtype)
        (dx,) = torch.autograd.grad(y, x, dy)
    y_ref, dx_ref = _ref_matmul(x.detach().reshape(-1, k), q, bias, dy.reshape(-1, n))
    assert y.shape == (2, m, n) and y.dtype == dtype and dx.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y.reshape(-1, n).float(), y_ref, **tol)
    torch.testing.assert_close(dx.reshape(-1, k).float(), dx_ref, **tol)


def _fused_case(transpose_w: bool, rows: int, seed: int):
    """(the nf4_matmul module, q, a, bias, expected a · W or a · Wᵀ + bias) for W [136, 128]: ragged rows and
    features against any tile, two quantisation blocks per weight row."""
    nm = pytest.importorskip("reflectevo.kernels.nf4_matmul")
    if not nm.HAS_TRITON:
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(seed)
    n, k = 136, 128
    q = nf4_quantize(torch.randn(n, k, generator=g))
    w = nf4_dequantize_reference(q, torch.float32)
    a = torch.randn(rows, n if transpose_w else k, generator=g)
    bias = None if transpose_w else torch.randn(n, generator=g)
    return nm, q, a, bias, (a @ w if transpose_w else a @ w.t() + bias)


@pytest.mark.parametrize("transpose_w", [False, True])
def test_fused_kernel_with_every_cuda_tile(transpose_w, cpu_triton):
    """The tiles the CUDA autotuner picks from, run under the interpreter, in the forward and the input-gradient
    direction."""
    nm, q, a, bias, expect = _fused_case(transpose_w, 40, 7)
    with kernel_backend("triton"):
        for tile in nm._tile_configs(transpose_w):
            got = nm._fused(a, q, bias, transpose_w, tile=tile)
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5, msg=lambda s: f"{tile}: {s}")


@pytest.mark.parametrize("transpose_w,r_per_split,swap", [(False, 32, False), (False, 64, False), (False, 64, True),
                                                           (True, 32, False), (True, 96, False)])
def test_fused_kernel_split_over_r(transpose_w, r_per_split, swap, cpu_triton):
    """R split over programs (decode-sized inputs on CUDA): fp32 partial sums, then bias and the cast; splits of
    one and two quantisation blocks, a ragged last split (R = 136 rows of W in the input-gradient direction); the
    forward also as outᵀ = W · xᵀ (SWAP, what the CUDA decode tile runs)."""
    nm, q, a, bias, expect = _fused_case(transpose_w, 20, 8)
    tile = nm.triton.Config(dict(BLOCK_M=16, BLOCK_P=32 if transpose_w else 16, BLOCK_R=32, SWAP=swap))
    with kernel_backend("triton"):
        got = nm._fused(a, q, bias, transpose_w, tile=tile, r_per_split=r_per_split)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_split_plan_fills_the_machine_in_whole_tiles():
    from reflectevo.kernels.nf4_matmul import _split_plan

    for rows, p, r in ((64, 4096, 4096), (64, 1024, 4096), (16, 4096, 14336), (64, 14336, 4096), (1, 64, 256)):
        per = _split_plan(rows, p, r, max(16, rows), 64, 64, 132)
        splits = -(-r // per)
        programs = -(-rows // max(16, rows)) * -(-p // 64) * splits
        assert per % 64 == 0 and (splits - 1) * per < r <= splits * per
        assert per >= min(r, 4 * 64)  # each split at least four R tiles
        assert programs >= min(2 * 132, -(-p // 64) * (r // 256)) or splits == 1


def test_cpu_default_path_is_dequant_matmul():
    q = nf4_quantize(torch.randn(24, 32))
    x = torch.randn(3, 32, requires_grad=True)
    y = nf4_matmul(x, q)
    w = nf4_dequantize_reference(q, torch.float32)
    assert torch.equal(y, x @ w.t())
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 24) @ w)


def test_llama3_8b_bytes_per_param():
    r = llama3_8b_nf4_bytes_per_param()
    assert r["linear_params"] == 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert 0.5156 < r["bytes_per_param"] <= 0.52


def test_storage_bytes_match_layout():
    q = nf4_quantize(torch.randn(512, 512))
    n = 512 * 512
    assert q.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 256 * 4 + 4
    assert (q.data.numel() + q.absmax.numel() + 4 * q.absmax2.numel()) / n <= 0.52


def test_absmax_codes_as_words_or_bytes_give_the_same_products(cpu_triton):
    """The kernels read the uint8 absmax codes as int32 words (a whole number of words, 4-byte aligned) or, when
    that does not hold, byte by byte: both forms, in the fused kernel's two directions and the GEMV, equal the
    reference."""
    import dataclasses

    nm, q, a, bias, expect = _fused_case(False, 24, 9)
    shifted = torch.zeros(q.absmax.numel() + 1, dtype=torch.uint8)
    shifted[1:] = q.absmax
    q_bytes = dataclasses.replace(q, absmax=shifted[1:])  # same codes at an odd address: no words
    assert kernel_args(q)[1] and not kernel_args(q_bytes)[1]
    w = nf4_dequantize_reference(q, torch.float32)
    dy = torch.randn(24, 136, generator=torch.Generator().manual_seed(3))
    with kernel_backend("triton"):
        for form in (q, q_bytes):
            torch.testing.assert_close(nm._fused(a, form, bias, False), expect, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nm._fused(dy, form, None, True), dy @ w, rtol=1e-5, atol=1e-5)
            for blocks in (True, False):
                torch.testing.assert_close(gemv(a[:3], form, bias, blocks=blocks), expect[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_gemv_kernels_and_level_lookups_agree(rows, cpu_triton):
    """The GEMV's block kernel (one scale per block sum) and its elementwise kernel, each with the pair-table and
    the nibble lookups, and the fused kernel's two lookups, against the fp64 product: K = 320 (five blocks) split
    over programs, 72 features (ragged against the 16-wide tile)."""
    nm = pytest.importorskip("reflectevo.kernels.nf4_matmul")
    if not nm.HAS_TRITON:
        pytest.skip("no triton")
    g = torch.Generator().manual_seed(rows)
    q = nf4_quantize(torch.randn(72, 320, generator=g))
    w = nf4_dequantize_reference(q, torch.float32).double()
    x = torch.randn(rows, 320, generator=g)
    bias = torch.randn(72, generator=g)
    expect = (x.double() @ w.t() + bias.double()).float()
    dy = torch.randn(rows, 72, generator=g)
    with kernel_backend("triton"):
        for byte_table in (True, False):
            for blocks in (True, False):
                got = gemv(x, q, bias, blocks=blocks, byte_table=byte_table)
                torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5, msg=lambda m: f"{blocks} {byte_table} {m}")
            torch.testing.assert_close(nm._fused(x, q, bias, False, byte_table=byte_table), expect, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(nm._fused(dy, q, None, True, byte_table=byte_table),
                                       (dy.double() @ w).float(), rtol=1e-5, atol=1e-5)
        if rows == 1:  # bf16: the block kernel does not round W to bf16; against the exact product of bf16 x
            xb = x.bfloat16()
            exact = xb.double() @ w.t() + bias.bfloat16().double()
            got = gemv(xb, q, bias.bfloat16(), blocks=True).double()
            assert ((got - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()  # the output's rounding alone
    with pytest.raises(ValueError, match="at most 8 rows"):
        gemv(torch.randn(9, 320), q, None)


@pytest.mark.parametrize("shape", [(5, 104), (3, 64 * 256 + 24)])
def test_triton_dequant_from_words_with_a_partial_last_block(shape, cpu_triton):
    """Packed bytes read as int32 words (numel % 8 == 0) when the last quantisation block is cut short, against the
    reference and the byte-by-byte read, bf16 and fp32."""
    q = nf4_quantize(torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])))
    assert q.numel() % 8 == 0 and q.numel() % 64 != 0
    for dtype in (torch.float32, torch.bfloat16):
        with kernel_backend("triton"):
            words = _dequantize_triton(q, dtype)
        assert torch.equal(words, nf4_dequantize_reference(q, dtype))
        assert torch.equal(words, _dequantize_triton(q, dtype, byte_table=True))


def test_benchmark_recommends_only_what_every_shape_supports():
    """The NF4 benchmark's settings advice from a CUDA-like result: the GEMV wins at 1 token on both shapes, the
    fused kernel at 16 tokens on one shape only (so no fused threshold), the other level table wins 3 of 4 rows."""
    from reflectevo.bench import nf4_kernels as bench

    def row(shape, tokens, **ms):
        return {"shape": shape, "tokens": tokens, **{f"{k}_graph_ms": v for k, v in ms.items()}}

    result = {"matmul": [row([64, 64], 1, gemv=1.0, fused=3.0, dequant=2.0, gemv_elementwise=1.5, fused_other_table=2.0),
                         row([32, 64], 1, gemv=1.0, fused=3.0, dequant=1.5, gemv_elementwise=0.5, fused_other_table=2.0),
                         row([64, 64], 16, gemv=4.0, fused=1.0, dequant=2.0, fused_other_table=0.5),
                         row([32, 64], 16, gemv=4.0, fused=3.0, dequant=2.0, fused_other_table=4.0)],
              "dequant": []}
    rec = bench.recommend(result)
    assert rec["AUTO_GEMV_MAX_ROWS"][0] == 1 and rec["AUTO_FUSED_MAX_ROWS"][0] == 0
    assert rec["nf4.BYTE_TABLE"][0] is (not bench.nf4_mod.BYTE_TABLE) and "3 of 4" in rec["nf4.BYTE_TABLE"][1]
    assert rec["nf4_gemv.GEMV_BLOCKS"][0] is bench.nf4_gemv.GEMV_BLOCKS  # 1 of 2: no change
    assert "AUTO_GEMV_MAX_ROWS = 1" in bench.format_recommendation(result)
    assert bench.recommend({"matmul": [{"shape": [8, 8], "tokens": 1, "dequant_ms": 1.0}]}) == {}


def test_one_row_gemv_through_autograd():
    """nf4_matmul on one row takes the GEMV block kernel forward and the fused kernel for dx: both against fp64."""
    g = torch.Generator().manual_seed(11)
    q = nf4_quantize(torch.randn(40, 192, generator=g))
    w = nf4_dequantize_reference(q, torch.float32).double()
    x = torch.randn(1, 192, generator=g, requires_grad=True)
    bias = torch.randn(40, generator=g)
    with kernel_backend("triton"):
        y = nf4_matmul(x, q, bias, path="gemv")
        dy = torch.randn(y.shape, generator=g)
        (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(y.double(), x.detach().double() @ w.t() + bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), dy.double() @ w, rtol=1e-5, atol=1e-5)
