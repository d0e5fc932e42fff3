"""Batched sampling with a paged KV cache: prefix caching, continuous batching, per-request sampling params."""
from reflectevo.gen.engine import Engine
from reflectevo.gen.sampling_params import SamplingParams
from reflectevo.gen.sequence import CompletionOutput

__all__ = ["Engine", "SamplingParams", "CompletionOutput"]
