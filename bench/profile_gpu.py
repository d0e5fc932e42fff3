"""Where a decode step and a QLoRA DPO step spend their time on a GPU (Llama-3-8B shapes, random weights).

    python bench/profile_gpu.py OUTDIR [decode] [train]

For each: host time to issue the step (the call returning, no sync) against the time until the device is done,
medians over the timed steps (host ~ device: the step is bound by Python and kernel launches), and the
torch.profiler table of the heaviest CUDA kernels and CPU ops, written to OUTDIR/profile-<what>.txt.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def _tables(prof, rows=25) -> str:
    ka = prof.key_averages()
    cuda = ka.table(sort_by="self_cuda_time_total", row_limit=rows) + "\n\n" if DEVICE == "cuda" else ""
    return cuda + ka.table(sort_by="self_cpu_time_total", row_limit=rows)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=32, eos_token_ids=[1])  # a CPU smoke run of this script


_ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _host_vs_device(fn, steps: int) -> tuple[float, float]:
    host, device = [], []
    for _ in range(steps):
        _sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync()
        host.append(t1 - t0)
        device.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e3, statistics.median(device) * 1e3


def profile_decode(out: Path, quantize: str | None, batch=64, prompt_tokens=512):
    from reflectevo.bench.sampler import LLAMA3_8B, _NoTok, _random_llama, _to_nf4, make_prompts
    from reflectevo.gen import Engine, SamplingParams
    from reflectevo.gen.sampler import sample

    import copy

    model = _random_llama(DEVICE, None if DEVICE == "cuda" else dict(LLAMA3_8B, **TINY))
    if quantize == "nf4":
        model = _to_nf4(model)
    prompts = make_prompts(model.config.vocab_size, batch, 0, prompt_tokens, seed=1)
    eng = Engine(model, _NoTok(), max_num_seqs=batch, kv_cache_gib=16)
    eng.generate(prompts, SamplingParams(max_tokens=3, ignore_eos=True))  # warm-up at the shapes
    runner, captured = eng.runner, {}
    orig_run = runner.run

    def run(seqs, is_prefill):  # keep a snapshot of one decode batch to replay
        if not is_prefill and "seqs" not in captured:
            snap = []
            for s in seqs:
                c = copy.copy(s)
                c.token_ids, c.block_table = list(s.token_ids), list(s.block_table)
                snap.append(c)
            captured["seqs"] = snap
        return orig_run(seqs, is_prefill)

    runner.run = run
    eng.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
    runner.run = orig_run
    seqs = captured["seqs"]  # its blocks are free again but hold the same K/V: replaying rewrites one slot each
    lines = [f"decode, {quantize or 'bf16'}, batch {batch}, prompt {prompt_tokens}"]

    def step():
        sample(orig_run(seqs, False), seqs).tolist()

    host, dev = _host_vs_device(step, 10)
    with torch.inference_mode():
        model_only = _host_vs_device(lambda: model.hidden_states(
            torch.zeros(1, batch, dtype=torch.long, device=DEVICE)), 10)
    lines.append(f"step: host {host:.2f} ms, until device done {dev:.2f} ms")
    lines.append(f"model.hidden_states alone (plain attention, {batch} tokens): host {model_only[0]:.2f} ms, "
                 f"device done {model_only[1]:.2f} ms")
    with profile(activities=_ACTIVITIES) as prof:
        for _ in range(3):
            step()
        _sync()
    text = "\n".join(lines) + "\n\n" + _tables(prof)
    (out / f"profile-decode-{quantize or 'bf16'}.txt").write_text(text)
    print("\n".join(lines), flush=True)
    del eng, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def profile_train(out: Path):
    from reflectevo.bench.train import Ours, _llama8b_ours, make_pairs

    import reflectevo.bench.sampler as sampler

    seq = 2048 if DEVICE == "cuda" else 128
    if DEVICE != "cuda":
        sampler.LLAMA3_8B = dict(sampler.LLAMA3_8B, **TINY)
    pairs = make_pairs(sampler.LLAMA3_8B["vocab_size"], 1, seq)
    ours = Ours(_llama8b_ours(DEVICE), pairs, seq, 16, DEVICE, 2)
    lines = ["QLoRA DPO step (cached reference), Llama-3-8B shapes, 1 pair, seq 2048"]
    for name, fn in (("dpo", ours.dpo), ("sft", ours.sft)):
        fn()
        host, dev = _host_vs_device(fn, 4)
        lines.append(f"{name}: host {host:.1f} ms, until device done {dev:.1f} ms")
    with profile(activities=_ACTIVITIES) as prof:
        ours.dpo()
        _sync()
    (out / "profile-train.txt").write_text("\n".join(lines) + "\n\n" + _tables(prof))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    what = sys.argv[2:] or ["decode", "train"]
    if "decode" in what:
        for q in (None, "nf4"):
            try:
                profile_decode(out, q)
            except Exception as e:  # noqa: BLE001
                print(f"decode {q}: FAILED {type(e).__name__}: {e}", flush=True)
    if "train" in what:
        try:
            profile_train(out)
        except Exception as e:  # noqa: BLE001
            print(f"train: FAILED {type(e).__name__}: {e}", flush=True)
