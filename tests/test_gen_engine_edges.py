"""The batched sampler after a failed step, and repetition penalty through the engine (test_gen.py's tiny model)."""
import pytest
import torch

from reflectevo.gen import Engine, SamplingParams
from test_gen import one_thread, plain_greedy, prompts_mixed, tiny  # noqa: F401 (fixtures)


def test_error_in_prefill_leaves_no_uncomputed_prefix_hits(tiny):
    """A prefill step that fails inside the model (out of memory, interrupt) never wrote the blocks it registered
    for prefix caching: a retry of the same prompt must compute them, not read what they held before."""
    model, tok = tiny
    eng = Engine(model, tok, kv_cache_gib=0.01)
    eng.runner.k_cache.fill_(float("nan"))  # what a block holds before it is written is arbitrary
    eng.runner.v_cache.fill_(float("nan"))
    prompt = prompts_mixed(16)[3]  # three full blocks + 12

    def fail(module, args):
        raise RuntimeError("out of memory")

    hook = model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            eng.generate([prompt], SamplingParams(max_tokens=4))
    finally:
        hook.remove()
    out = eng.generate([prompt], SamplingParams(max_tokens=4))
    assert out[0][0].token_ids == plain_greedy(model, prompt, 4)


def test_engine_repetition_penalty_matches_transformers_greedy(tiny):
    from transformers import RepetitionPenaltyLogitsProcessor

    model, tok = tiny
    prompts = prompts_mixed(17)[1:3]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, repetition_penalty=1.5), SamplingParams(max_tokens=8)]
    outs = Engine(model, tok, kv_cache_gib=0.01).generate(prompts, params)
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    ids = list(prompts[0])
    for _ in range(8):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1:]
        ids.append(int(penalty(torch.tensor([ids]), logits.clone()).argmax()))
    assert outs[0][0].token_ids == ids[len(prompts[0]):] != plain_greedy(model, prompts[0], 8, eos=())
    assert outs[1][0].token_ids == plain_greedy(model, prompts[1], 8)


def test_scheduler_with_leaked_blocks_raises_instead_of_spinning():
    """With nothing running every block is free; if some were not (a leak), the head of the queue could never be
    admitted and the engine's loop would spin on empty steps forever."""
    from reflectevo.gen.block_manager import BlockManager
    from reflectevo.gen.sampling_params import SamplingParams
    from reflectevo.gen.scheduler import Scheduler
    from reflectevo.gen.sequence import Sequence

    bm = BlockManager(num_blocks=4, block_size=16)
    sp = SamplingParams()
    bm.allocate(Sequence(0, 0, 0, list(range(40)), sp, 0))      # 3 blocks held by no scheduled sequence
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=4096, stats={"preemptions": 0,
                                                                             "prefix_cache_hit_tokens": 0,
                                                                             "prefill_tokens_computed": 0})
    sched.add(Sequence(1, 1, 0, [7] * 30, sp, 0))                  # needs 2 of the 4 blocks: fits an empty cache
    with pytest.raises(RuntimeError, match=r"1 sequences waiting, none running, and only 1 of 4 KV blocks free"):
        sched.schedule()
