"""Decode through CUDA-graph static buffers (reflectevo/gen/cuda_graphs.py). The capture itself needs a GPU
(tests/test_gpu.py); here ``emulate=True`` runs the same padded static-buffer step eagerly, which is where the
bucket padding, the -1 slots and the zero context lengths of padding rows must be right."""
import warnings

import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from reflectevo.gen.cuda_graphs import buckets
from test_gen import one_thread, plain_greedy, prompts_mixed, tiny  # noqa: F401 (fixtures)


def test_buckets_cover_every_batch_size_up_to_the_limit():
    assert buckets(256)[:8] == [1, 2, 4, 8, 16, 24, 32, 48] and buckets(256)[-1] == 256
    assert buckets(5) == [1, 2, 4, 5] and buckets(1) == [1]
    for m in (1, 3, 17, 64, 100):
        b = buckets(m)
        assert b == sorted(set(b)) and b[-1] == m


def _params():  # different lengths: the running batch shrinks across buckets as sequences finish
    return [SamplingParams(max_tokens=m, n=2 if i % 2 else 1) for i, m in enumerate((3, 14, 7, 11, 9))]


def test_emulated_graph_steps_give_the_eager_greedy_outputs(tiny, one_thread):  # noqa: F811
    model, tok = tiny
    prompts = prompts_mixed() + [[3, 4, 5, 6, 7, 8, 9]]
    eager = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, _params())
    eng = Engine(model, tok, kv_cache_gib=0.01, max_num_seqs=7)
    eng.runner.enable_graphs(7, eng.max_model_len, emulate=True)
    used = []
    run = eng.runner.graphs.run
    eng.runner.graphs.run = lambda ids, *a: used.append(len(ids)) or run(ids, *a)
    graphed = eng.generate(prompts, _params())
    assert [[o.token_ids for o in g] for g in graphed] == [[o.token_ids for o in g] for g in eager]
    assert any(eng.runner.graphs.bucket(n) > n for n in used), used  # some steps really were padded
    assert graphed[1][0].token_ids == plain_greedy(model, prompts[1], 14)


def test_padded_steps_survive_a_cache_allocated_over_nan_garbage(tiny, one_thread, monkeypatch):  # noqa: F811
    """Memory the allocator hands over may hold a freed tensor's NaN. Padding rows and unused table columns make the
    CPU attention weight never-written slots by zero, which must not turn a real row into NaN."""
    model, tok = tiny
    prompts = prompts_mixed() + [[3, 4, 5, 6, 7, 8, 9]]
    eager = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, _params())
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    eng = Engine(model, tok, kv_cache_gib=0.01, max_num_seqs=7)
    eng.runner.enable_graphs(7, eng.max_model_len, emulate=True)
    graphed = eng.generate(prompts, _params())
    assert [[o.token_ids for o in g] for g in graphed] == [[o.token_ids for o in g] for g in eager]


def test_a_failed_capture_turns_graphs_off_with_one_warning_and_decodes_eagerly(tiny, one_thread):  # noqa: F811
    model, tok = tiny
    prompts = prompts_mixed()
    eager = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, SamplingParams(max_tokens=6))
    eng = Engine(model, tok, kv_cache_gib=0.01)
    eng.runner.enable_graphs(256, eng.max_model_len)  # not emulated: capturing needs CUDA, so it fails here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = eng.generate(prompts, SamplingParams(max_tokens=6))
    assert [o[0].token_ids for o in outs] == [o[0].token_ids for o in eager]
    assert eng.runner.graphs.failed and sum("CUDA graphs off" in str(w.message) for w in caught) == 1


def test_graphs_are_dropped_when_the_weights_change(tiny, one_thread):  # noqa: F811
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    eng.runner.enable_graphs(8, eng.max_model_len, emulate=True)
    eng.runner.graphs.graphs[1] = ("stale", None)
    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert eng.runner.graphs.graphs == {1: ("stale", None)}  # same weights: kept
    with torch.no_grad():
        model.norm.weight.mul_(1.0)  # an in-place update bumps the version
    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    assert eng.runner.graphs.graphs == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_engine_builds_graphs_on_cuda_by_default(tiny):  # noqa: F811
    model, tok = tiny
    eng = Engine(model.cuda(), tok, kv_cache_gib=0.05)
    assert eng.runner.graphs is not None
    model.cpu()


def test_reset_prefix_cache_drops_the_captured_graphs_too(tiny, one_thread):  # noqa: F811
    """The call users make after a change the weights signature cannot see (a replaced buffer, a Python-side RoPE
    factor): captured graphs hold the old buffers' addresses and replay the old values, so they go with the cache."""
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    eng.runner.enable_graphs(8, eng.max_model_len, emulate=True)
    eng.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
    eng.runner.graphs.graphs[1] = ("stale", None)
    eng.reset_prefix_cache()
    assert eng.runner.graphs.graphs == {} and not eng.block_manager.block_of
