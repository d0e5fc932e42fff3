"""Benchmark: the paged-KV batched sampler against transformers' batched generate, on the ReflectEvo shape.

Shape: ``num_prompts`` prompts sharing a ``prefix_tokens`` few-shot prefix, each with a distinct ~``suffix_tokens``
question, ``n`` samples per prompt, ``max_tokens`` new tokens (greedy, eos ignored on both sides so both generate
exactly the same number of tokens). Ours: one Engine.generate call on a fresh engine (empty prefix cache).
transformers: generate on the same weights (LlamaForCausalLM loaded with our state dict), prompts left-padded and
each repeated n times (the expansion num_return_sequences does), greedy. Reported: generated tokens/s, wall time,
prefill tokens each side computes, and the ratio.

CUDA adds Llama-3-8B shapes with random weights (bf16 and NF4; the transformers NF4 baseline uses bitsandbytes'
Linear4bit): the decode step time at batch 64 against the bandwidth floor, (weight bytes + K/V bytes read per step)
/ device copy rate measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from reflectevo.bench.common import copy_bandwidth_gbs, env_info
from reflectevo.gen import Engine, SamplingParams

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                 num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, architecture="llama", eos_token_ids=[128001])


def make_prompts(vocab: int, num_prompts: int, prefix_tokens: int, suffix_tokens: int, seed: int = 0):
    """Token-id prompts: one shared prefix + a distinct suffix of suffix_tokens +- 20% per prompt."""
    g = torch.Generator().manual_seed(seed)
    lo = 100 if vocab > 1000 else 1
    prefix = torch.randint(lo, vocab, (prefix_tokens,), generator=g).tolist()
    prompts = []
    for _ in range(num_prompts):
        n = int(suffix_tokens * (0.8 + 0.4 * torch.rand((), generator=g).item())) or 1
        prompts.append(prefix + torch.randint(lo, vocab, (n,), generator=g).tolist())
    return prompts


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_twin(model):
    """transformers LlamaForCausalLM holding our model's weights (float models only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in model.config.to_hf().items() if k not in ("architectures", "model_type")})
    default = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)  # built in the model's dtype: no fp32 copy of an 8B model
    try:
        with torch.device(model.device):
            hf = LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(default)
    state = {("model." + k if not k.startswith("lm_head") else k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"hf_twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.tie_weights()
    return hf.eval()


def time_ours(model, tokenizer, prompts, n, max_tokens, device, **engine_kw):
    engine = Engine(model, tokenizer, **engine_kw)
    if torch.device(device).type == "cuda":  # compile, autotune and capture the decode graphs the run will use
        engine.generate(prompts, SamplingParams(n=n, max_tokens=8, ignore_eos=True))
        engine.block_manager.reset_prefix_cache()  # then cache-cold for the timed run (graphs kept)
    else:
        engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2))  # warm-up, cache-cold for the real prompts
    engine.stats.update(prefill_tokens_computed=0, prefix_cache_hit_tokens=0, preemptions=0)
    _sync(device)
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    outs = engine.generate(prompts, SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=True))
    _sync(device)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    generated = sum(len(o.token_ids) for g in outs for o in g)
    return {"seconds": seconds, "cpu_seconds": cpu_s, "load_avg_1m": [load0, os.getloadavg()[0]],
            "generated_tokens": generated, "tokens_per_s": generated / seconds,
            "prefill_tokens_computed": engine.stats["prefill_tokens_computed"],
            "prefix_cache_hit_tokens": engine.stats["prefix_cache_hit_tokens"],
            "preemptions": engine.stats["preemptions"], "kv_cache_blocks": engine.num_blocks,
            "cuda_graphs": _graph_state(engine)}, outs


def _graph_state(engine) -> dict | None:
    g = engine.runner.graphs
    return None if g is None else {"captured_buckets": sorted(g.graphs), "failed": g.failed}


def time_hf(hf, prompts, n, max_tokens, device, batch_size=None, pad_id=0):
    rows = [p for p in prompts for _ in range(n)]
    batch_size = batch_size or len(rows)
    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    generated, computed, outs = 0, 0, []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False, pad_token_id=pad_id)
        outs.extend(out[:, width:].tolist())
        generated += out[:, width:].numel()
        computed += ids.numel()
    _sync(device)
    seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu_s, "load_avg_1m": [load0, os.getloadavg()[0]],
            "generated_tokens": generated, "tokens_per_s": generated / seconds,
            "prefill_tokens_computed": computed, "batch_size": batch_size}, outs


def reflectevo_shape(device, model_source, num_prompts, prefix_tokens, suffix_tokens, n, max_tokens,
                     hf_baseline, kv_cache_gib, hf_batch_size):
    from reflectevo.model import load_model

    model, tok = load_model(model_source, device=device)
    prompts = make_prompts(model.config.vocab_size, num_prompts, prefix_tokens, suffix_tokens)
    res = {"shape": {"model": model_source, "num_prompts": num_prompts, "prefix_tokens": prefix_tokens,
                     "suffix_tokens": suffix_tokens, "n": n, "max_tokens": max_tokens,
                     "dtype": str(model.dtype).replace("torch.", "")}}
    kw = {"kv_cache_gib": kv_cache_gib} if kv_cache_gib else {}
    res["ours"], ours_out = time_ours(model, tok, prompts, n, max_tokens, device, **kw)
    if hf_baseline:
        hf = hf_twin(model)
        _warm_hf(hf, prompts, device)
        res["hf"], hf_out = time_hf(hf, prompts, n, max_tokens, device, hf_batch_size, tok.pad_token_id or 0)
        ours_flat = [o.token_ids for g in ours_out for o in g]
        res["greedy_rows_identical"] = sum(a == b for a, b in zip(ours_flat, hf_out))
        res["rows"] = len(ours_flat)
        res["speedup"] = res["ours"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
        res["cpu_time_ratio"] = res["hf"]["cpu_seconds"] / res["ours"]["cpu_seconds"]
        del hf
    return res


def _random_llama(device, config=None):
    from reflectevo.model import ModelConfig, Transformer

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Transformer(ModelConfig(**(config or LLAMA3_8B)))
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _to_nf4(model):
    from reflectevo.model.lora import NF4Linear

    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, NF4Linear.from_linear(child, compute_dtype=torch.bfloat16))
    torch.cuda.empty_cache()
    return model


def _hf_to_bnb_nf4(hf, device):
    """transformers twin with every linear but lm_head swapped for bitsandbytes' Linear4bit (NF4, bf16 compute)."""
    import bitsandbytes as bnb

    for mod in list(hf.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                               compress_statistics=True).to(device)  # quantised where it lies
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(mod, name, new)
                del child
    torch.cuda.empty_cache()
    return hf


def _warm_hf(hf, prompts, device):
    """One short generate before the timed ones, as our side's engine gets: the first call pays one-off set-up."""
    time_hf(hf, [prompts[0][:8]], 1, 2, device)


def _hf_step_ms(hf, prompts, max_tokens, device):
    time_hf(hf, prompts, 1, 2, device)  # warm-up at the timed batch shape
    t = {}
    for m in (1, max_tokens):
        t[m] = time_hf(hf, prompts, 1, m, device)[0]["seconds"]
    return (t[max_tokens] - t[1]) / (max_tokens - 1) * 1e3


def _weight_bytes(model, rows: int = 0) -> int:
    """Bytes a decode step of ``rows`` sequences reads for weights: parameters and buffers, plus the packed NF4
    tensors of NF4Linear. An untied input embedding is read only at the step's ``rows`` token ids, not whole (for
    Llama-3-8B the whole table is 1 GB: 6 % of the bf16 model's weight bytes, 18 % of the NF4 one's)."""
    emb = model.embed_tokens.weight
    seen, total = {id(emb)}, 0
    if emb is model.lm_head.weight:
        total += emb.numel() * emb.element_size()
    else:
        total += min(rows, emb.shape[0]) * emb.shape[1] * emb.element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for mod in model.modules():
        q = getattr(mod, "q", None)
        if q is not None and hasattr(q, "nbytes"):
            total += int(q.nbytes() if callable(q.nbytes) else q.nbytes)
    return total


class _NoTok:
    eos_token_ids: list[int] = []

    def encode(self, text, add_special_tokens=False):
        raise ValueError("token-id prompts only")

    def decode(self, ids, skip_special_tokens=True):
        return ""


def _decode_step_ms(model, prompts, max_tokens, device, kv_cache_gib, **engine_kw):
    """Our decode step at batch len(prompts): (t[max_tokens] - t[1]) / (max_tokens - 1) on one warmed-up engine
    whose prefix cache is emptied before each timed call (no hits); wall and host CPU milliseconds."""
    eng = Engine(model, _NoTok(), max_num_seqs=len(prompts), kv_cache_gib=kv_cache_gib, **engine_kw)
    eng.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # compiles / captures at the timed shapes
    times, cpu = {}, {}
    for m in (1, max_tokens):
        eng.block_manager.reset_prefix_cache()  # cache-cold; the captured graphs stay
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        eng.generate(prompts, SamplingParams(max_tokens=m, ignore_eos=True))
        _sync(device)
        times[m], cpu[m] = time.perf_counter() - t0, time.process_time() - c0
    del eng
    return ((times[max_tokens] - times[1]) / (max_tokens - 1) * 1e3,
            (cpu[max_tokens] - cpu[1]) / (max_tokens - 1) * 1e3)


def _with_fused_nf4(fn, rows: int):
    """fn() with nf4_matmul's auto path sending up to ``rows`` rows to the fused kernel (the GEMV up to its own
    limit), thresholds restored afterwards."""
    import importlib

    nm = importlib.import_module("reflectevo.kernels.nf4_matmul")
    before = nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS
    nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS = nm.GEMV_MAX_ROWS, rows
    try:
        return fn()
    finally:
        nm.AUTO_GEMV_MAX_ROWS, nm.AUTO_FUSED_MAX_ROWS = before


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def decode_floor(device, quantize, batch=64, prompt_tokens=512, max_tokens=64, hf_baseline=True, config=None,
                 shape: dict | None = None, kv_cache_gib: float = 16):
    """Llama-3-8B shapes, random weights, ``quantize`` None (bf16) or "nf4", one model built for everything:

    - ``shape`` (the ReflectEvo shape: num_prompts, prefix_tokens, suffix_tokens, n, max_tokens) when given: one
      Engine.generate against transformers' batched generate (bitsandbytes Linear4bit for NF4), same prompts;
    - the decode step at batch ``batch`` (prompts of ``prompt_tokens``) against the bandwidth floor, (weight bytes +
      K/V bytes read per step) / device copy rate measured in the same run, and transformers' decode step.
    transformers runs first, on a twin built from the bf16 weights, and is freed before our side runs."""
    model = _random_llama(device, config)
    vocab = model.config.vocab_size
    step_prompts = make_prompts(vocab, batch, 0, prompt_tokens, seed=1)
    shape_prompts = make_prompts(vocab, shape["num_prompts"], shape["prefix_tokens"], shape["suffix_tokens"]) \
        if shape else None
    row = {"quantize": quantize or "bf16", "batch": batch, "prompt_tokens": prompt_tokens, "hf_decode_step_ms": None}
    hf_out = None
    if hf_baseline:
        hf = hf_twin(model)
        if quantize == "nf4":
            hf = _hf_to_bnb_nf4(hf, device)
        _warm_hf(hf, step_prompts, device)
        if shape:
            row["hf"], hf_out = time_hf(hf, shape_prompts, shape["n"], shape["max_tokens"], device)
        row["hf_decode_step_ms"] = _hf_step_ms(hf, step_prompts, max_tokens, device)
        del hf
        _free(device)
    if quantize == "nf4":
        model = _to_nf4(model)
    if shape:
        row["shape"] = dict(shape)
        row["ours"], ours_out = time_ours(model, _NoTok(), shape_prompts, shape["n"], shape["max_tokens"], device,
                                          kv_cache_gib=kv_cache_gib)
        _free(device)
        if hf_out is not None:
            flat = [o.token_ids for g in ours_out for o in g]
            row["greedy_rows_identical"], row["rows"] = sum(a == b for a, b in zip(flat, hf_out)), len(flat)
            row["speedup"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
    weight_bytes = _weight_bytes(model, rows=batch)
    step_ms, step_cpu_ms = _decode_step_ms(model, step_prompts, max_tokens, device, kv_cache_gib)
    if torch.device(device).type == "cuda":
        row["decode_step_ms_eager"] = _decode_step_ms(model, step_prompts, max_tokens, device, kv_cache_gib,
                                                      cuda_graphs=False)[0]
        if quantize == "nf4":  # the same step with the NF4 layers on the fused kernel instead of the auto path
            row["decode_step_ms_fused"] = _with_fused_nf4(
                lambda m=model: _decode_step_ms(m, step_prompts, max_tokens, device, kv_cache_gib)[0], batch)
    cfg = model.config
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    mean_ctx = sum(len(p) for p in step_prompts) / batch + max_tokens / 2
    kv_bytes = batch * mean_ctx * kv_token
    gbs = copy_bandwidth_gbs(device)
    floor_ms = (weight_bytes + kv_bytes) / (gbs * 1e9) * 1e3
    row.update(decode_step_ms=step_ms, decode_step_cpu_ms=step_cpu_ms, floor_ms=floor_ms, fraction_of_floor=floor_ms / step_ms,
               weight_bytes=weight_bytes, kv_bytes_per_step=kv_bytes, copy_gbs=gbs)
    if row["hf_decode_step_ms"]:
        row["decode_step_speedup"] = row["hf_decode_step_ms"] / step_ms
    del model
    _free(device)
    return row


def run(device="cpu", model_source="smollm2-135m", num_prompts=64, prefix_tokens=1024, n=2, max_tokens=128,
        hf_baseline=True, suffix_tokens=50, kv_cache_gib=None, hf_batch_size=None, quick=False, llama8b=True,
        threads=None) -> dict:
    device = str(device)
    if threads:  # on a shared CPU box one thread avoids OpenMP spin-waits on descheduled peers
        torch.set_num_threads(threads)
    if quick:
        num_prompts, prefix_tokens, max_tokens = min(num_prompts, 8), min(prefix_tokens, 256), min(max_tokens, 16)
    result = {"env": env_info(device)}  # torch_threads is recorded there
    cuda = torch.device(device).type == "cuda"
    try:
        result["reflectevo_shape"] = reflectevo_shape(device, model_source, num_prompts, prefix_tokens,
                                                      suffix_tokens, n, max_tokens, hf_baseline, kv_cache_gib,
                                                      hf_batch_size)
    except Exception as e:  # noqa: BLE001 - a GPU machine may lack the embedded model: the 8B rows still run
        if not cuda:
            raise
        result["reflectevo_shape"] = {"error": f"{type(e).__name__}: {e}"}
        _free(device)
    if cuda and llama8b and not quick:
        shape = {"model": "Llama-3-8B shapes, random weights", "num_prompts": num_prompts,
                 "prefix_tokens": prefix_tokens, "suffix_tokens": suffix_tokens, "n": n, "max_tokens": max_tokens}
        result["llama3_8b_decode"] = []
        for q in (None, "nf4"):  # one failing dtype keeps the other's row
            try:
                result["llama3_8b_decode"].append(decode_floor(device, q, hf_baseline=hf_baseline, shape=shape))
            except Exception as e:  # noqa: BLE001
                result["llama3_8b_decode"].append({"quantize": q or "bf16", "error": f"{type(e).__name__}: {e}"})
                _free(device)
    return result


def _load(r: dict) -> str:
    return ", ".join(f"{x:.1f}" for x in r["load_avg_1m"])


def format_table(result: dict) -> str:
    r = result["reflectevo_shape"]
    e = result["env"]
    lines = [f"Run {e.get('date')}: torch {e.get('torch')}, triton {e.get('triton')}, python {e.get('python')}, "
             f"{e.get('cpu')} x{e.get('cpu_count')}, {e.get('torch_threads')} torch threads.", ""]
    if "error" in r:
        lines += [f"## Batched sampler ({result['env']['device']}): embedded-model run FAILED ({r['error'][:200]})"]
    else:
        s = r["shape"]
        lines += [f"## Batched sampler ({result['env']['device']}, {s['model']} {s['dtype']})", "",
                  f"Shape: {s['num_prompts']} prompts sharing a {s['prefix_tokens']}-token prefix + "
                  f"~{s['suffix_tokens']}-token suffixes, n={s['n']}, {s['max_tokens']} new tokens (greedy, eos "
                  f"ignored); {result['env'].get('torch_threads')} torch threads.", "",
                  "| engine | seconds | process CPU s | load avg (start, end) | generated tokens | tokens/s "
                  "| prefill tokens computed | prefix-cache hit tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        o = r["ours"]
        lines.append(f"| reflectevo.gen | {o['seconds']:.2f} | {o['cpu_seconds']:.1f} | {_load(o)} | "
                     f"{o['generated_tokens']} | {o['tokens_per_s']:.1f} | {o['prefill_tokens_computed']} | "
                     f"{o['prefix_cache_hit_tokens']} |")
        if "hf" in r:
            h = r["hf"]
            lines.append(f"| transformers generate | {h['seconds']:.2f} | {h['cpu_seconds']:.1f} | {_load(h)} | "
                         f"{h['generated_tokens']} | {h['tokens_per_s']:.1f} | {h['prefill_tokens_computed']} | - |")
            lines += ["", f"Speedup (tokens/s): **{r['speedup']:.2f}x**; "
                          f"process CPU time ratio {r['cpu_time_ratio']:.2f}x. "
                          f"Greedy rows token-identical: {r['greedy_rows_identical']}/{r['rows']}."]
    rows = result.get("llama3_8b_decode") or []
    shaped = [d for d in rows if "ours" in d]
    if shaped:
        s = shaped[0]["shape"]
        lines += ["", f"### {s['model']}: {s['num_prompts']} prompts sharing a {s['prefix_tokens']}-token prefix + "
                      f"~{s['suffix_tokens']}-token suffixes, n={s['n']}, {s['max_tokens']} new tokens", "",
                  "| weights | ours s | ours tokens/s | ours prefill tokens | transformers s | transformers tokens/s "
                  "| transformers prefill tokens | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for d in shaped:
            o, h = d["ours"], d.get("hf")
            hf_cols = (f"{h['seconds']:.2f} | {h['tokens_per_s']:.1f} | {h['prefill_tokens_computed']} | "
                       f"**{d['speedup']:.2f}x**") if h else "- | - | - | -"
            lines.append(f"| {d['quantize']} | {o['seconds']:.2f} | {o['tokens_per_s']:.1f} | "
                         f"{o['prefill_tokens_computed']} | {hf_cols} |")
    if rows:
        lines += ["", "| Llama-3-8B random | batch | decode step ms (CUDA graphs) | without graphs | host CPU ms "
                      "per step | floor ms | fraction of floor | transformers step ms | NF4 on the fused kernel: "
                      "step ms (fraction of floor) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in rows:
            if "error" in d:
                lines.append(f"| {d['quantize']} | FAILED: {d['error'][:200]} | | | | | | | |")
                continue
            hf = f"{d['hf_decode_step_ms']:.2f}" if d.get("hf_decode_step_ms") else "-"
            cpu_ms = f"{d['decode_step_cpu_ms']:.2f}" if d.get("decode_step_cpu_ms") is not None else "-"
            eager = f"{d['decode_step_ms_eager']:.2f}" if d.get("decode_step_ms_eager") else "-"
            fused = (f"{d['decode_step_ms_fused']:.2f} ({d['floor_ms'] / d['decode_step_ms_fused']:.2f})"
                     if d.get("decode_step_ms_fused") else "-")
            lines.append(f"| {d['quantize']} | {d['batch']} | {d['decode_step_ms']:.2f} | {eager} | {cpu_ms} | "
                         f"{d['floor_ms']:.2f} | "
                         f"{d['fraction_of_floor']:.2f} | {hf} | {fused} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--suffix-tokens", type=int, default=50)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--hf-batch-size", type=int, default=None)
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for both sides")
    p.add_argument("--out", default=None, help="write JSON here and the Markdown table next to it (.md)")
    a = p.parse_args()
    res = run(a.device, a.model, a.num_prompts, a.prefix_tokens, a.n, a.max_tokens, not a.no_hf, a.suffix_tokens,
              a.kv_cache_gib, a.hf_batch_size, threads=a.threads)
    table = format_table(res)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)
        with open(a.out.rsplit(".", 1)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
