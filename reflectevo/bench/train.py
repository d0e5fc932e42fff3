"""Benchmark: one SFT step and one DPO step of our trainer against transformers + peft, same model/data/batch.

Both stacks get the same weights, the same LoRA (rank r on q/k/v/o/gate/up/down, alpha 2r, no dropout), the same
token ids and lengths, AdamW on the LoRA parameters, gradient clipping 1.0, and are timed side by side in one
process (interleaved repetitions, median).

Ours (what ``reflectevo sft`` / ``reflectevo dpo`` run): packed rows (block-diagonal attention, no padding
tokens), hidden states -> fused ``linear_cross_entropy`` / ``linear_logprobs`` on the labelled (response) positions
only, chosen + rejected in one forward; DPO reference log-probs cached before training (the default), and also
timed with ``--ref-on-the-fly`` (an extra no-grad forward with the adapters off), which is the like-for-like
comparison with the reference stack.

Reference stack (TRL is not installed; its DPO step written out by hand): right-padded batch + attention mask,
LlamaForCausalLM + peft LoRA, SFT = the model's own labels loss (full logits); DPO = concatenated chosen/rejected
forward, full logits, log_softmax, gather, masked sums, a no-grad reference forward with the adapter disabled,
sigmoid loss.

CPU: SmolLM2-135M (embedded), LoRA r=16, sequences of up to 512 tokens (prompt ~60-75 %, response ~15-25 %),
SFT 4 sequences, DPO 4 pairs. CUDA: Llama-3-8B shapes with random weights, QLoRA (our NF4 vs bitsandbytes 4-bit
NF4) r=16, bf16 autocast, activation checkpointing both sides, sequences of up to 2048 tokens, one pair per
micro-step (SFT: 2 sequences).
"""
from __future__ import annotations

import copy
import statistics
import time

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None

import torch

from reflectevo.bench.common import cpu_peak_extra_bytes, cuda_peak_extra_bytes, env_info

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_pairs(vocab: int, pairs: int, seq: int, seed: int = 0):
    """[(prompt ids, chosen ids, rejected ids)] with random lengths; prompt + longest response <= seq."""
    g = torch.Generator().manual_seed(seed)

    def rand_len(lo, hi):
        return int(lo + (hi - lo) * torch.rand((), generator=g).item())

    out = []
    for _ in range(pairs):
        p = rand_len(0.60 * seq, 0.75 * seq)
        c, r = rand_len(0.15 * seq, 0.25 * seq), rand_len(0.15 * seq, 0.25 * seq)
        ids = lambda n: torch.randint(100, vocab, (n,), generator=g).tolist()  # noqa: E731
        out.append((ids(p), ids(c), ids(r)))
    return out


# ------------------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------------------
class Ours:
    def __init__(self, model, pairs, seq, r, device, sft_seqs, bf16=False):
        from reflectevo.model.lora import attach_lora
        from reflectevo.trainer.config import TrainConfig
        from reflectevo.trainer.data import Example, make_batch
        from reflectevo.trainer.dpo import compute_reference
        from reflectevo.trainer.loop import build_optimizer

        self.model, self.device = model, torch.device(device)
        cuda = self.device.type == "cuda"
        self.cfg = TrainConfig(max_length=seq, batch_size=len(pairs), lora_r=r, bf16=cuda or bf16)
        self.params = attach_lora(model, r=r, alpha=2 * r, dropout=0.0)
        model.gradient_checkpointing = cuda
        self.opt = build_optimizer(self.params, self.cfg, self.device)
        self.dpo_ex = [Example(str(i), "bench", p, [c, rj]) for i, (p, c, rj) in enumerate(pairs)]
        self.sft_ex = [Example(str(i), "bench", pairs[i % len(pairs)][0], [pairs[i % len(pairs)][1]])
                       for i in range(sft_seqs)]
        self.sft_batch = make_batch(self.sft_ex, self.cfg, False, 0).to(self.device)
        self.dpo_batch = make_batch(self.dpo_ex, self.cfg, True, 0).to(self.device)
        t0 = time.perf_counter()
        self.ref = compute_reference(model, self.dpo_ex, self.cfg, 0, use_adapters=False)
        _sync(device)
        self.ref_seconds = time.perf_counter() - t0
        model.train()

    def _step(self, objective, batch):
        from reflectevo.trainer.loop import _autocast

        with _autocast(self.device, self.cfg):
            loss, _ = objective.micro_step(self.model, batch, objective.step_normaliser([batch]))
        return _optimizer_step(loss, self.params, self.opt)

    def sft(self):
        from reflectevo.trainer.sft import SFTObjective

        return self._step(SFTObjective(), self.sft_batch)

    def dpo(self, on_the_fly=False):
        from reflectevo.trainer.dpo import DPOObjective

        return self._step(DPOObjective(self.cfg, None if on_the_fly else self.ref), self.dpo_batch)


# ------------------------------------------------------------------------------------------------------------
# reference stack: transformers + peft (+ bitsandbytes 4-bit on CUDA)
# ------------------------------------------------------------------------------------------------------------
def _padded(seqs: list[list[int]], prompt_lens: list[int], device):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, p:len(s)] = torch.tensor(s[p:])
    return ids.to(device), mask.to(device), labels.to(device)


def _optimizer_step(loss, params, opt) -> float:
    """The same optimizer step for both stacks: backward, clip to 1.0, AdamW step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


class Reference:
    def __init__(self, hf, pairs, r, device, sft_seqs, bf16=False):
        from peft import LoraConfig, get_peft_model

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if cuda:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS,
                                                   task_type="CAUSAL_LM"))
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused: the default optimizer of transformers' Trainer with torch >= 2.8 ("adamw_torch_fused"), CPU too
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, fused=True)
        sft = [pairs[i % len(pairs)] for i in range(sft_seqs)]
        self.sft_batch = _padded([p + c for p, c, _ in sft], [len(p) for p, _, _ in sft], self.device)
        seqs = [p + c for p, c, _ in pairs] + [p + rj for p, _, rj in pairs]
        plens = [len(p) for p, _, _ in pairs] * 2
        self.dpo_batch = _padded(seqs, plens, self.device)
        self.P = len(pairs)
        self.bf16 = cuda or bf16

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _finish(self, loss):
        return _optimizer_step(loss, self.params, self.opt)

    def sft(self):
        ids, mask, labels = self.sft_batch
        with self._autocast():
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return self._finish(loss)

    def _seq_logps(self, ids, mask, labels):
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt = labels[:, 1:]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * (tgt != -100)).sum(-1)

    def dpo(self, beta=0.1):
        ids, mask, labels = self.dpo_batch
        with self._autocast():
            with torch.no_grad(), self.model.disable_adapter():
                ref = self._seq_logps(ids, mask, labels)
            pol = self._seq_logps(ids, mask, labels)
        u = (pol[:self.P] - pol[self.P:]) - (ref[:self.P] - ref[self.P:])
        return self._finish(-torch.nn.functional.logsigmoid(beta * u).mean())


# ------------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------------
def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _cpu_models(source):
    from reflectevo.bench.sampler import hf_twin
    from reflectevo.model import load_model

    model, _ = load_model(source, device="cpu")
    hf = hf_twin(model)
    return model, hf


def _random_linear(out_f, in_f, device):
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=torch.bfloat16)
    lin.weight.data.normal_(0.0, 0.02)
    lin.weight.requires_grad_(False)
    return lin


def _llama8b_ours(device):
    from reflectevo.bench.sampler import _random_llama, _to_nf4

    return _to_nf4(_random_llama(device)).train()


def _llama8b_hf(device):
    """transformers Llama-3-8B shapes, random weights, every decoder linear a bitsandbytes NF4 Linear4bit."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from reflectevo.bench.sampler import LLAMA3_8B
    from reflectevo.model import ModelConfig

    hf_cfg = LlamaConfig(**{k: v for k, v in ModelConfig(**LLAMA3_8B).to_hf().items()
                            if k not in ("architectures", "model_type")})
    hf_cfg.dtype = torch.bfloat16
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    for layer in hf.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    w = _random_linear(child.out_features, child.in_features, device).weight.data
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                          device="meta")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True).to(device)
                    setattr(parent, name, q)
                    del w
    for mod in hf.modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                fresh = torch.empty(p.shape, device=device, dtype=torch.bfloat16)
                fresh.normal_(0.0, 0.02) if p.dim() > 1 else fresh.fill_(1.0)
                setattr(mod, pname, torch.nn.Parameter(fresh, requires_grad=False))
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg).to(device)
    torch.cuda.empty_cache()
    return hf


# ------------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------------
def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _time_interleaved(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Each round runs every step once, in order; also counts each step's minor page faults (first touches of
    memory the allocator got from the kernel: on a CPU they cost time, and they depend on what ran before)."""
    times, faults = {k: [] for k in fns}, {k: [] for k in fns}
    first = {}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            f0, t0 = _minor_faults(), time.perf_counter()
            loss = fn()
            _sync(device)
            if rep == 0:
                first[name] = loss
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
                faults[name].append(_minor_faults() - f0)
    return {k: {"median_s": statistics.median(v), "times_s": v, "first_loss": first[k],
                "minor_faults": faults[k]} for k, v in times.items()}


def _peak(fn, device) -> int:
    if torch.device(device).type == "cuda":
        return cuda_peak_extra_bytes(fn, device)
    return cpu_peak_extra_bytes(fn)


def _bench_pair(ours_factory, ref_factory, pairs, seq, device, sft_seqs, warmup, repeats, r, memory_only=False,
                separate=False, bf16=False):
    """Build both stacks, time their steps interleaved; CUDA builds one stack at a time (memory)."""
    cuda = torch.device(device).type == "cuda"
    separate = cuda or separate
    sft_tokens = sum(len(pairs[i % len(pairs)][0]) + len(pairs[i % len(pairs)][1]) for i in range(sft_seqs))
    dpo_tokens = sum(2 * len(p) + len(c) + len(rj) for p, c, rj in pairs)
    rows, totals = {}, {}
    if not separate:
        model, hf = ours_factory(), ref_factory()
        # bf16: also the reference as its users run it fastest, weights loaded in bf16 (peft keeps the adapters
        # in fp32 under autocast); its norms and residual stream then compute in bf16, ours stay fp32
        hf16 = copy.deepcopy(hf).to(torch.bfloat16) if bf16 else None
        ours = Ours(model, pairs, seq, r, device, sft_seqs, bf16)
        ref = Reference(hf, pairs, r, device, sft_seqs, bf16)
        fns = {"ours_sft": ours.sft, "ref_sft": ref.sft, "ours_dpo": ours.dpo,
               "ours_dpo_onthefly": lambda: ours.dpo(True), "ref_dpo": ref.dpo}
        if hf16 is not None:
            ref16 = Reference(hf16, pairs, r, device, sft_seqs, bf16)
            fns.update({"ref16_sft": ref16.sft, "ref16_dpo": ref16.dpo})
        if memory_only:
            for fn in fns.values():
                fn()
            return {k: _peak(fn, device) for k, fn in fns.items()}
        timed = _time_interleaved(fns, device, warmup, repeats)
        peaks = {k: None for k in fns}
        ref_s = ours.ref_seconds
    else:  # one stack at a time (memory); the step's total peak is what a smaller card must hold
        timed, peaks = {}, {}

        def measure(fns):
            timed.update(_time_interleaved(fns, device, warmup, repeats))
            for k, f in fns.items():
                peaks[k] = _peak(f, device)
                totals[k] = torch.cuda.max_memory_allocated(device) if cuda else None
                print(f"[bench train] {k}: median {timed[k]['median_s']:.3f} s, peak extra "
                      f"{peaks[k] / 2**30:.2f} GiB, total {(totals[k] or 0) / 2**30:.2f} GiB", flush=True)

        model = ours_factory()
        ours = Ours(model, pairs, seq, r, device, sft_seqs, bf16)
        ref_s = ours.ref_seconds
        measure({"ours_sft": ours.sft, "ours_dpo": ours.dpo, "ours_dpo_onthefly": lambda: ours.dpo(True)})
        del ours, model
        _free(device)
        try:
            ref = Reference(ref_factory(), pairs, r, device, sft_seqs, bf16)
            measure({"ref_sft": ref.sft, "ref_dpo": ref.dpo})
            del ref
        except Exception as e:  # noqa: BLE001 - keep our rows when the reference stack fails
            rows["ref_error"] = f"{type(e).__name__}: {e}"
        _free(device)
    for name, t in timed.items():
        tokens = sft_tokens if name.endswith("sft") else dpo_tokens
        rows[name] = {**t, "tokens": tokens, "tokens_per_s": tokens / t["median_s"], "peak_extra_bytes": peaks[name]}
        rows[name]["peak_total_bytes"] = totals.get(name)
    if "ref_error" in rows:
        rows["ours_reference_pass_s"] = ref_s
        return rows
    rows["speedup_sft"] = rows["ref_sft"]["median_s"] / rows["ours_sft"]["median_s"]
    rows["speedup_dpo_cached_ref"] = rows["ref_dpo"]["median_s"] / rows["ours_dpo"]["median_s"]
    rows["speedup_dpo_ref_on_the_fly"] = rows["ref_dpo"]["median_s"] / rows["ours_dpo_onthefly"]["median_s"]
    if "ref16_sft" in rows:
        rows["speedup_sft_vs_bf16_weights"] = rows["ref16_sft"]["median_s"] / rows["ours_sft"]["median_s"]
        rows["speedup_dpo_cached_ref_vs_bf16_weights"] = rows["ref16_dpo"]["median_s"] / rows["ours_dpo"]["median_s"]
    for key, ref_name, ours_name in (("sft", "ref_sft", "ours_sft"), ("dpo_cached_ref", "ref_dpo", "ours_dpo"),
                                      ("dpo_ref_on_the_fly", "ref_dpo", "ours_dpo_onthefly")):
        if not separate:  # the same round's steps ran back to back: their ratio cancels the machine's drift
            per_round = [a / b for a, b in zip(rows[ref_name]["times_s"], rows[ours_name]["times_s"])]
            rows[f"round_ratios_{key}"] = per_round
            rows[f"median_round_ratio_{key}"] = statistics.median(per_round)
    rows["ours_reference_pass_s"] = ref_s
    return rows


def _cpu_memory_subprocess(quick: bool, bf16: bool = False) -> dict | None:
    """Peak RSS growth per step, measured in a fresh process with MALLOC_MMAP_THRESHOLD_=65536 (see common.py)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-m", "reflectevo.bench.train", "--device", "cpu", "--memory-only"] + (["--quick"] if quick else [])
    cmd += ["--bf16"] if bf16 else []
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(device="cpu", quick=False, warmup=1, repeats=2, source="smollm2-135m", memory=True,
        memory_only=False, llama8b: bool | None = None, seq: int | None = None, bf16: bool = False) -> dict:
    """CPU: ``source`` in fp32, both stacks side by side (``bf16``: both under bf16 autocast from fp32 weights, as
    ``reflectevo sft --bf16`` trains on a CPU, plus the reference with all its weights loaded in bf16).
    CUDA (or ``llama8b=True``): Llama-3-8B shapes, QLoRA."""
    device = str(device)
    cuda, seq_override = torch.device(device).type == "cuda", seq
    llama8b = cuda if llama8b is None else llama8b
    if llama8b:
        seq, n_pairs, sft_seqs, r = 2048, 1, 2, 16
        from reflectevo.bench.sampler import LLAMA3_8B
        vocab, ours_f, ref_f = LLAMA3_8B["vocab_size"], lambda: _llama8b_ours(device), lambda: _llama8b_hf(device)
        model_name = "Llama-3-8B shapes, random weights, NF4 base (ours) vs bitsandbytes NF4 (reference)"
    else:
        seq, n_pairs, sft_seqs, r = (256, 2, 2, 16) if quick else (512, 4, 4, 16)
        holder = {}

        def ours_f():
            holder["model"], holder["hf"] = _cpu_models(source)
            return holder["model"]

        ours_f_model = ours_f

        def ref_f():
            return holder["hf"]

        vocab, ours_f = 49152, ours_f_model
        model_name = f"{source} (fp32" + (" weights, bf16 autocast on both stacks)" if bf16 else ")")
    if quick:
        warmup, repeats = 1, 1
    elif llama8b:  # the H200 run of 2026-11-30 spread 0.56-0.90 s over two repeats of one step
        repeats = max(repeats, 5)
    seq = seq_override if seq_override else seq
    torch.manual_seed(0)
    pairs = make_pairs(vocab, n_pairs, seq)
    rows = _bench_pair(ours_f, ref_f, pairs, seq, device, sft_seqs, warmup, repeats, r, memory_only=memory_only,
                       separate=llama8b, bf16=bf16 and not llama8b)
    if memory_only:
        return rows
    if not llama8b and memory:
        peaks = _cpu_memory_subprocess(quick, bf16)
        for k, v in (peaks or {}).items():
            rows[k]["peak_extra_bytes"] = v
    return {"env": env_info(device), "model": model_name, "lora_r": r, "seq": seq, "pairs": n_pairs,
            "sft_sequences": sft_seqs, "warmup": warmup, "repeats": repeats, "results": rows,
            "reference_stack": "transformers + peft" + (" + bitsandbytes 4-bit" if llama8b else "") +
                               " (DPO step by hand: full logits, log_softmax, gather, sigmoid loss)"}


def format_table(res: dict) -> str:
    r = res["results"]
    lines = [f"### Training step: reflectevo vs {res['reference_stack']}",
             f"{res['model']}, LoRA r={res['lora_r']} on all linear layers, sequences <= {res['seq']} tokens, "
             f"SFT {res['sft_sequences']} sequences, DPO {res['pairs']} pairs; median of {res['repeats']} "
             f"(after {res['warmup']} warm-up); device {res['env']['device']}, torch threads "
             f"{res['env']['torch_threads']}",
             "",
             "| step | stack | tokens | median s | tokens/s | peak extra MiB | peak total MiB | first loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    names = [("ours_sft", "SFT", "reflectevo"), ("ref_sft", "SFT", "transformers+peft"),
             ("ours_dpo", "DPO", "reflectevo (cached ref)"), ("ours_dpo_onthefly", "DPO", "reflectevo (ref on the fly)"),
             ("ref_dpo", "DPO", "transformers+peft (ref per step)"),
             ("ref16_sft", "SFT", "transformers+peft, bf16 weights"),
             ("ref16_dpo", "DPO", "transformers+peft, bf16 weights (ref per step)")]

    def mib(x):
        return "n/a" if x is None else f"{x / 2**20:,.0f}"

    for key, step, stack in names:
        if key not in r:
            continue
        x = r[key]
        lines.append(f"| {step} | {stack} | {x['tokens']} | {x['median_s']:.3f} | {x['tokens_per_s']:,.0f} | "
                     f"{mib(x['peak_extra_bytes'])} | {mib(x.get('peak_total_bytes'))} | {x['first_loss']:.4f} |")
    if "ref_error" in r:
        lines += ["", f"Reference stack FAILED: {r['ref_error'][:300]}"]
    else:
        lines += ["", f"Speed-up (reference time / ours): SFT {r['speedup_sft']:.2f}x, DPO with cached reference "
                      f"{r['speedup_dpo_cached_ref']:.2f}x, DPO with reference on the fly "
                      f"{r['speedup_dpo_ref_on_the_fly']:.2f}x."]
        if "median_round_ratio_sft" in r:
            lines.append(f"Median of the per-round ratios (each round's reference step / ours, run back to back): SFT "
                         f"{r['median_round_ratio_sft']:.2f}x, DPO {r['median_round_ratio_dpo_cached_ref']:.2f}x / "
                         f"{r['median_round_ratio_dpo_ref_on_the_fly']:.2f}x.")
        if "speedup_sft_vs_bf16_weights" in r:
            lines.append(f"Against the reference with bf16 weights: SFT {r['speedup_sft_vs_bf16_weights']:.2f}x, DPO "
                         f"with cached reference {r['speedup_dpo_cached_ref_vs_bf16_weights']:.2f}x.")
    lines.append(f"Our one-off reference pass over the pairs: {r['ours_reference_pass_s']:.2f} s.")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-only", action="store_true", help="print only the peak memory of each step (JSON)")
    ap.add_argument("--bf16", action="store_true", help="CPU: both stacks under bf16 autocast")
    ap.add_argument("--repeats", type=int, default=2, help="timed steps of each stack after the warm-up (median)")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats {a.repeats}: must be at least 1")
    if a.memory_only:
        print(json.dumps(run(a.device, quick=a.quick, memory_only=True, bf16=a.bf16)))
        raise SystemExit(0)
    result = run(a.device, quick=a.quick, bf16=a.bf16, repeats=a.repeats)
    print(format_table(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
