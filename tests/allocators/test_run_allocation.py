"""``evaluation.run_allocation`` hands host-reading allocators a host and runs in-LLM ones inside the LLM."""

from __future__ import annotations

import torch

from arr_coc.allocators import create_allocator
from arr_coc.evaluation import run_allocation
from arr_coc.training.base_host import BaseVLMHost
from tests.allocators._tiny import tiny_batch, tiny_vlm


@torch.no_grad()
def test_run_allocation_with_a_host_and_in_llm():
    vlm = tiny_vlm()
    pixels, ids, mask = tiny_batch(vlm)
    batch = {"pixels": pixels, "question_ids": ids, "question_mask": mask}
    vision = vlm.encode_image(pixels)
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    # in-LLM: the host's answer, and the kept tokens' positions
    fastv = create_allocator("fastv").eval()
    res = run_allocation(vlm, fastv, batch, 5)
    want, trace = host.answer_in_llm(fastv, vlm.project(vision[:, 1:]), None, None, ids, mask, 5, return_trace=True)
    torch.testing.assert_close(res.logits, want)
    assert res.mask.sum(1).tolist() == [5, 5, 5]
    fine_pos = vlm.fine_positions(3)
    for b in range(3):
        kept = trace.kept[b][trace.mask[b]]
        assert torch.equal(res.positions[b][res.mask[b]], fine_pos[b, kept])
    # sparsevlm too, down to no image token at all
    for k in (0, 4, 20):
        res = run_allocation(vlm, create_allocator("sparsevlm").eval(), batch, k)
        assert res.mask.sum(1).tolist() == [min(k, 16)] * 3 and torch.isfinite(res.logits).all()
        assert ((res.positions[..., 0] >= 0) == res.mask).all()
    # host-reading: the allocator sees the host (its choice is the tower's [CLS] attention top-k)
    res = run_allocation(vlm, create_allocator("cls_attention").eval(), batch, 4)
    assert res.out.extras["signal"] == "host"
    top = host.vision_attention(-2)[:, :, 0, 1:].mean(1).topk(4).indices
    for b in range(3):
        assert sorted(res.out.indices[b].tolist()) == sorted(top[b].tolist())
    # one host per encoded batch, shared by the allocators and budgets run on it
    from arr_coc.evaluation import _encode

    enc = _encode(vlm, batch)
    run_allocation(vlm, create_allocator("cls_attention").eval(), batch, 4, encoded=enc)
    shared = enc._host
    calls = []
    handle = vlm.vision.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res = run_allocation(vlm, create_allocator("visionzip").eval(), batch, 6, encoded=enc)
    finally:
        handle.remove()
    assert enc._host is shared and calls == [] and res.out.extras["signal"] == "host"
    handle = vlm.vision.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        run_allocation(vlm, create_allocator("visionzip").eval(), batch, 6)  # no shared encoding: a new host
    finally:
        handle.remove()
    assert len(calls) == 2  # the batch's encoding, then the host's hooked forward
    # a signal the host lacks (no text tower here): the host-free rule, with a warning
    import pytest

    with pytest.warns(UserWarning, match="text_embedding|patch_features"):
        res = run_allocation(vlm, create_allocator("cdpruner").eval(), batch, 4)
    assert res.out.extras["signal"] == "query" and res.mask.sum(1).tolist() == [4, 4, 4]
    # allocators that read no host signal are called as before
    res = run_allocation(vlm, create_allocator("pool").eval(), batch, 4)
    assert res.mask.sum(1).tolist() == [4, 4, 4]
