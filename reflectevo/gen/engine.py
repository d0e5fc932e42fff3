"""Engine: the batched sampler (paged KV cache, prefix caching, continuous batching, per-request sampling).

    engine = Engine(model, tokenizer)
    outs = engine.generate(prompts, SamplingParams(...))   # outs[i][j]: j-th sample of prompt i

KV cache size (``kv_cache_gib``, per engine): on CUDA by default ``gpu_memory_utilization`` of the free memory
(several engines on one card: equal shares of it, ``gpu_kv_share``);
on the CPU by default a fifth of the memory available when the engine is built (MemAvailable), between
0.5 and 8 GiB (2 GiB where that cannot be read). The cache is allocated once but its pages are only touched as
blocks fill; a cache too small for the running batch preempts sequences and recomputes them later. With the
prefix cache every freed block stays cached until it is needed again, so over a long run the whole budget
ends up resident.

Prefix cache and weights: every ``generate`` compares a signature of the weights with the last call's and drops
the cached K/V when it changed (optimizer steps, fused ones included, replaced tensors, LoRA scaling and
switches; see ``fingerprint.py``). ``engine.reset_prefix_cache()`` drops it by hand, for changes the signature
cannot see (an NF4 base's quantized data, buffers, code).
"""
from __future__ import annotations

import os
import random
import warnings

import torch

from reflectevo.gen.block_manager import BlockManager
from reflectevo.gen.detokenize import extend_text, output_text, prompt_context
from reflectevo.gen.fingerprint import weights_signature
from reflectevo.gen.progress import Progress
from reflectevo.gen.runner import ModelRunner
from reflectevo.gen.sampler import sample, seq_key
from reflectevo.gen.sampling_params import SamplingParams
from reflectevo.gen.scheduler import Scheduler
from reflectevo.gen.sequence import CompletionOutput, Sequence, Status


CPU_KV_FRACTION = 0.2  # of MemAvailable: room for a second engine (adapter runs) and the training after it
CPU_KV_MIN_GIB, CPU_KV_MAX_GIB, CPU_KV_FALLBACK_GIB = 0.5, 8.0, 2.0
GPU_MEMORY_UTILIZATION = 0.85  # CUDA default: this fraction of the free memory (see gpu_kv_share for several engines)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages where the OS reports them, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_kv_share(model, engines: int) -> float | None:
    """KV cache GiB for each of ``engines`` engines about to be built one after another on ``model``'s CUDA device
    without an explicit ``kv_cache_gib``: an equal share of GPU_MEMORY_UTILIZATION of the memory free now. Left to
    its own default, each engine would take that fraction of what the engines before it left (0.85, 0.13 and 0.02 of
    the free memory for three), leaving 0.3 % of the card for every step's activations and CUDA-graph pools. None
    off CUDA, where each engine's default is bounded already."""
    device = model.device
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return GPU_MEMORY_UTILIZATION * free / max(1, engines) / 2**30 or None


class Engine:
    def __init__(self, model, tokenizer, *, block_size: int = 16, kv_cache_gib: float | None = None,
                 gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, max_model_len: int | None = None, progress: bool | None = None,
                 cuda_graphs: bool | None = None):
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.max_model_len = min(max_model_len or cfg.context_length(), cfg.context_length())
        windows = [w for w in (cfg.window_for_layer(i) for i in range(cfg.num_layers)) if w]
        if windows:  # the paged backend attends to the whole context: stop where a sliding window would start
            self.max_model_len = min(self.max_model_len, min(windows))
        self.block_size = block_size
        self.progress = progress
        dtype = model.dtype if model.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        per_block = ModelRunner.bytes_per_block(cfg, block_size, dtype)
        num_blocks = int(self._kv_budget(model.device, kv_cache_gib, gpu_memory_utilization) // per_block)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget holds no block of {per_block} bytes; raise kv_cache_gib")
        self.runner = ModelRunner(model, num_blocks, block_size)
        if model.device.type == "cuda" and cuda_graphs is not False:
            self.runner.enable_graphs(max_num_seqs, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.stats = {"prefill_tokens_computed": 0, "prefix_cache_hit_tokens": 0, "preemptions": 0,
                      "decode_tokens": 0, "steps": 0}
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.stats)
        eos = getattr(tokenizer, "eos_token_ids", None) or cfg.eos_token_ids or []
        self.eos_token_ids = set(int(t) for t in eos)
        self._next_seq_id = 0
        self._weights_seen = self._weights_signature()

    def _weights_signature(self):
        """Compared at every ``generate``: a change drops the prefix cache (and captured graphs). See
        ``fingerprint.weights_signature`` for what it notices."""
        return weights_signature(self.model)

    def reset_prefix_cache(self):
        """Forget every cached prefix, so the next prompts compute all their K/V again. ``generate`` does this
        itself when it sees the weights changed (in place, replaced, a trainable parameter's content, an NF4
        base's storage, LoRA scaling or switches); call it after a change it cannot see, e.g. to a module's code
        or buffers, or a frozen weight edited in place through ``.data`` (which has its own version counter). Only
        between ``generate`` calls. Captured CUDA graphs go too: they hold the old buffers' addresses and replay
        Python-side values (e.g. a RoPE factor) as they were at capture."""
        self.block_manager.reset_prefix_cache()
        if self.runner.graphs is not None:
            self.runner.graphs.invalidate()

    @staticmethod
    def _kv_budget(device: torch.device, kv_cache_gib, fraction: float) -> float:
        if kv_cache_gib is not None:
            if kv_cache_gib <= 0:
                raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
            return kv_cache_gib * 2**30
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free * fraction  # the activations of one step come out of the remaining fraction
        available = available_memory_bytes()
        if available is None:
            return CPU_KV_FALLBACK_GIB * 2**30
        return min(max(CPU_KV_FRACTION * available, CPU_KV_MIN_GIB * 2**30), CPU_KV_MAX_GIB * 2**30)

    @property
    def num_blocks(self) -> int:
        return self.block_manager.num_blocks

    # ------------------------------------------------------------------ input checks
    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p, add_special_tokens=False)
            else:
                try:
                    ids = [int(t) for t in p]
                except (TypeError, ValueError):
                    raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {p!r}") from None
            if not ids:
                raise ValueError(f"prompts[{i}] is empty")
            limit = min(self.max_model_len - 1, self.num_blocks * self.block_size)
            if len(ids) > limit:
                raise ValueError(f"prompts[{i}] has {len(ids)} tokens, more than the context allows ({limit}: "
                                 f"max_model_len {self.max_model_len}, KV cache {self.num_blocks * self.block_size})")
            vocab = self.model.config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompts[{i}] has token ids outside [0, {vocab})")
            out.append(ids)
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool | None = None) -> list[list[CompletionOutput]]:
        params = SamplingParams() if params is None else params
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be one SamplingParams or a list of {len(prompts)} of them")
        for sp in {id(p): p for p in params}.values():
            sp.validate()  # fields may have been set after construction
        prompt_ids = self._encode(prompts)
        signature = self._weights_signature()
        if signature != self._weights_seen:  # cached K/V (and captured graphs) came from other weights
            self.reset_prefix_cache()
            self._weights_seen = signature
        was_training = self.model.training
        self.model.eval()  # no dropout (LoRA) while sampling; the caller's mode comes back afterwards
        try:
            seqs = self._add_requests(prompt_ids, params)
            total = sum(len(g) for g in seqs)
            show = self.progress if progress is None else progress
            bar = Progress(total, enabled=total >= 64 if show is None else bool(show))
            self._loop(seqs, bar)
        except BaseException as error:
            self._abort(error)
            raise
        finally:
            self.model.train(was_training)
        bar.close()
        return [[self._output(s) for s in g] for g in seqs]

    def _add_requests(self, prompt_ids, params) -> list[list[Sequence]]:
        seqs: list[list[Sequence]] = []
        for i, (ids, sp) in enumerate(zip(prompt_ids, params)):
            base = int(sp.seed) if sp.seed is not None else random.getrandbits(63)
            context = prompt_context(self.tokenizer, ids, sp.skip_special_tokens)  # shared by the n samples
            group = []
            for j in range(sp.n):
                seq = Sequence(self._next_seq_id, i, j, ids, sp, seq_key(base, j))
                seq.prompt_context = context
                self._next_seq_id += 1
                self.scheduler.add(seq)
                group.append(seq)
            seqs.append(group)
        return seqs

    def _abort(self, error: BaseException):
        """Leave the engine usable after ``error``: free every block, drop the queue. A failure of this cleanup
        is only reported: the caller sees the original exception."""
        try:
            self.scheduler.abort()
        except BaseException as cleanup:
            warnings.warn(f"generate: cleanup after {type(error).__name__} failed: {cleanup!r}", stacklevel=3)

    def _loop(self, seqs, bar: Progress):
        while self.scheduler.has_work():
            batch, is_prefill = self.scheduler.schedule()
            if not batch:
                bar.update(self._count_finished(seqs), 0)
                continue
            self.runner.clear_blocks_below(self.block_manager.high_water)
            logits = self.runner.run(batch, is_prefill)
            next_ids = sample(logits, batch).tolist()  # the one host sync of the step
            self.stats["steps"] += 1
            if not is_prefill:
                self.stats["decode_tokens"] += len(batch)
            for seq, tok in zip(batch, next_ids):
                self._append(seq, tok)
            bar.update(self._count_finished(seqs), len(batch))

    def _count_finished(self, seqs) -> int:
        return sum(s.status == Status.FINISHED for g in seqs for s in g)

    def _append(self, seq: Sequence, tok: int):
        seq.token_ids.append(tok)
        self.block_manager.register_full_blocks(seq, len(seq) - 1)
        seq.num_cached_tokens = len(seq) - 1
        sp = seq.params
        reason = None
        if (tok in sp.stop_token_ids) or (not sp.ignore_eos and tok in self.eos_token_ids):
            reason = "stop"
        elif sp.stop and self._hit_stop_string(seq):
            reason = "stop"
        elif seq.num_output_tokens >= sp.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)

    def _hit_stop_string(self, seq: Sequence) -> bool:
        before = self._extend_text(seq)
        # text settled before this token was searched then; a match ending in the new text starts after this
        search_from = max(0, before - max(len(s) for s in seq.params.stop))
        hits = [i for i in (seq.text.find(s, search_from) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.stop_text_end = min(hits)
            return True
        return False

    def _extend_text(self, seq: Sequence) -> int:
        """Appends the output's newly settled text to ``seq.text``; returns its length before (incremental
        detokenization after the prompt's last tokens: see detokenize.py)."""
        return extend_text(self.tokenizer, seq)

    def _output(self, seq: Sequence) -> CompletionOutput:
        ids = seq.output_ids
        if seq.stop_text_end is not None:
            text = seq.text[: seq.stop_text_end]
        else:  # the eos / stop token itself is not part of the text
            drop = seq.finish_reason == "stop" and bool(ids)
            text = output_text(self.tokenizer, seq, len(ids) - drop)
        return CompletionOutput(index=seq.sample_idx, text=text, token_ids=list(ids),
                                finish_reason=seq.finish_reason or "length")
