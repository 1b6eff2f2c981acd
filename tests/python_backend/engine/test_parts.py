"""Unit tests of the engine's parts: block manager, scheduler, sampler, detokenizer."""

from __future__ import annotations

import pytest
import torch

from python_backend.engine import detokenize
from python_backend.engine.kv_cache import BlockManager, NoFreeBlocks
from python_backend.engine.sampler import _filter, sample
from python_backend.engine.scheduler import Scheduler
from python_backend.engine.sequence import SamplingParams, Sequence, Status


def test_blocks_refcount_and_prefix_reuse():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    assert bm.num_free == 5
    tokens = list(range(12))
    parent = 0
    for i, block in enumerate(a):
        h = bm.chain_hash(parent, tokens[i * 4 : (i + 1) * 4])
        bm.register(block, h, tokens[i * 4 : (i + 1) * 4], parent)
        parent = h
    bm.free(a)
    assert bm.num_free == 8  # reusable, but still holding the prefix
    blocks, hashes = bm.match_prefix(tokens + [99], max_tokens=12)
    assert blocks == a and len(hashes) == 3 and bm.num_free == 5
    assert bm.match_prefix([0, 1, 2, 7], max_tokens=4) == ([], [])  # different first block
    bm.free(blocks)
    bm.allocate(8)  # evicts the cached blocks when nothing else is free
    assert bm.match_prefix(tokens, max_tokens=12) == ([], [])
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1)


def test_a_hash_collision_is_not_a_prefix_hit(monkeypatch):
    """Every prefix hashes alike here: only the block's own tokens tell them apart."""
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda parent, tokens: 42))
    bm = BlockManager(num_blocks=4, block_size=4)
    [block] = bm.allocate(1)
    bm.register(block, 42, [1, 2, 3, 4], 0)
    assert bm.match_prefix([9, 9, 9, 9, 5], max_tokens=4) == ([], [])
    assert bm.match_prefix([1, 2, 3, 4, 5], max_tokens=4) == ([block], [42])


def test_a_prefix_hit_survives_its_first_blocks_being_recomputed():
    """Two requests with one prefix prefill together: only the first one's copy of the shared block is
    cached, the second's next block is. Once the first one's copy is evicted and recomputed by a third
    request, the second's block is still found behind it."""
    bm = BlockManager(num_blocks=8, block_size=2)
    h1 = bm.chain_hash(0, [1, 2])
    h2 = bm.chain_hash(h1, [3, 4])
    a1, b1, b2 = bm.allocate(3)
    bm.register(a1, h1, [1, 2], 0)
    bm.register(b1, h1, [1, 2], 0)  # the same prefix again: not registered twice
    bm.register(b2, h2, [3, 4], h1)
    bm.free([a1])
    bm.free([b1, b2])
    bm.allocate(6)  # every block never used or not cached
    [c1] = bm.allocate(1)  # evicts the least recently freed cached block: a1
    assert c1 == a1
    assert bm.match_prefix([1, 2, 3, 4, 5], max_tokens=4) == ([], [])  # block 1 is gone
    bm.register(c1, h1, [1, 2], 0)
    blocks, _ = bm.match_prefix([1, 2, 3, 4, 5], max_tokens=4)
    assert blocks == [c1, b2]


def _seq(i: int, n_prompt: int, priority: int = 0) -> Sequence:
    return Sequence(
        request_id=str(i),
        prompt_ids=list(range(1, n_prompt + 1)),
        params=SamplingParams(max_tokens=100),
        arrival_index=i,
        priority=priority,
    )


def test_scheduler_budget_chunking_and_admission():
    bm = BlockManager(num_blocks=100, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(3):
        sched.add(_seq(i, 8))
    b = sched.schedule()
    assert [(s.request_id, n) for s, n in b.prefills] == [("0", 8), ("1", 2)]  # chunked by the budget
    assert len(sched.waiting) == 1  # the seat cap holds the third back
    sched.after_step(b)
    b = sched.schedule()
    assert [(s.request_id, n) for s, n in b.prefills] == [("1", 6)]  # seq 0 has nothing uncomputed yet


def test_scheduler_preempts_least_urgent_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, watermark=0.0)
    first, second = _seq(0, 4), _seq(1, 4)
    sched.add(first)
    sched.add(second)
    b = sched.schedule()
    sched.after_step(b)
    for s in (first, second):
        s.output_ids.append(7)  # each made one token; the next step needs a second block each
    bm.allocate(1)  # someone else holds one block: only one of the two can grow
    b = sched.schedule()
    assert b.preempted == [second] and second.status is Status.WAITING and second.block_table == []
    assert b.decodes == [first]


def test_priority_orders_waiting_queue():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    sched.add(_seq(0, 4, priority=5))
    sched.add(_seq(1, 4, priority=1))
    assert sched.schedule().prefills[0][0].request_id == "1"


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert (
        torch.isinf(_filter(logits, 2, 1.0, 0.0)[2:]).all() and not torch.isinf(_filter(logits, 2, 1.0, 0.0)[:2]).any()
    )
    probs = logits.softmax(-1)
    kept = ~torch.isinf(_filter(logits, 0, 0.8, 0.0))
    assert kept.tolist() == [True, True, False, False, False] and probs[:1].sum() < 0.8 <= probs[:2].sum()
    kept = ~torch.isinf(_filter(logits, 0, 1.0, 0.3))
    assert kept.tolist() == [True, True, False, False, False]  # exp(-1) = 0.37 >= 0.3, exp(-2) = 0.14 < 0.3


def test_sample_penalties_and_min_tokens():
    seq = _seq(0, 3)
    seq.params = SamplingParams(temperature=0.0, repetition_penalty=100.0, min_tokens=2)
    logits = torch.tensor([[0.5, 5.0, 4.0, 1.0, 9.0]])  # token 4 is EOS; tokens 1-3 are in the prompt
    ids, _ = sample(logits, [seq], eos_ids=[4])
    assert ids == [0]  # EOS suppressed (min_tokens); prompt tokens divided by 100 fall below 0.5


def test_detokenizer_holds_back_partial_stop(smollm2_source):
    tok = smollm2_source[1]
    state = detokenize.new_state(tok("Hello").input_ids)
    decode = detokenize.decoder(tok)
    ids = tok(" world. END here", add_special_tokens=False).input_ids
    sent = ""
    for t in ids:
        detokenize.add_token(decode, state, t)
        if detokenize.find_stop(state, ["END"]) is not None:
            break
        sent += detokenize.take_delta(state, ["END"], final=False)
    assert "E" not in sent and sent.startswith(" world")
