"""Each host-reading baseline against a transcription of its released code, on shared inputs.

The ``released_*`` functions below are transcriptions of the authors' code (repository and
function named in each), reduced to the tensors they read; they are deliberately written
the way the release writes them (loops, batch-wide ops), not the way our allocators do.
"""

from __future__ import annotations

import pytest
import torch

from arr_coc.allocators import create_allocator
from arr_coc.allocators.host import SignalUnavailable
from arr_coc.training.base_host import BaseVLMHost
from tests.allocators._tiny import tiny_batch, tiny_vlm


class StubHost:
    """A host whose signals are given tensors (``None``: the signal is missing)."""

    def __init__(self, attention=None, keys=None, text=None, text_mask=None, patches=None):
        self.attention, self.keys = attention, keys
        self.text, self.text_mask, self.patches = text, text_mask, patches
        self.asked = []

    def vision_attention(self, layer):
        self.asked.append(("vision_attention", layer))
        if self.attention is None:
            raise SignalUnavailable("host: no 'vision_attention'")
        return self.attention[layer]

    def vision_keys(self, layer):
        self.asked.append(("vision_keys", layer))
        if self.keys is None:
            raise SignalUnavailable("host: no 'vision_keys'")
        return self.keys[layer]

    def text_features(self):
        if self.text is None:
            raise SignalUnavailable("host: no 'text_features'")
        return self.text, self.text_mask

    def patch_features(self):
        if self.patches is None:
            raise SignalUnavailable("host: no 'patch_features'")
        return self.patches


def random_attention(g, b, h, n, layers=3):
    """{layer: [B, H, n, n] softmax rows} for layers -layers..-1 (and their positive names)."""
    att = {}
    for i in range(layers):
        a = torch.softmax(3 * torch.randn(b, h, n, n, generator=g, dtype=torch.float64), dim=-1)
        att[i] = att[i - layers] = a
    return att


def kept(out, row):
    return sorted(out.indices[row][out.mask[row]].tolist())


# ---------------------------------------------------------------------------- FasterVLM
def released_fastervlm(attentions, select_layer, visual_token_num):
    """github Theia-4869/FasterVLM: clip_encoder.feature_select + llava_arch.encode_images."""
    image_attentions = attentions[select_layer]
    image_attentions = image_attentions[:, :, 0, 1:]
    image_attentions = image_attentions.mean(dim=1)  # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]  # (B, T)
    return token_indices


def test_cls_attention_reads_the_towers_cls_attention_at_layer_minus_2():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 1 + 25, 8, generator=g, dtype=torch.float64)
    att = random_attention(g, 2, 3, 26)
    host = StubHost(attention=att)
    out = create_allocator("cls_attention")(tokens, budget=6, grid=(5, 5), num_prefix_tokens=1, host=host)
    want = released_fastervlm(att, -2, 6)
    for b in range(2):
        assert kept(out, b) == sorted(want[b].tolist())
    assert host.asked == [("vision_attention", -2)] and out.extras["signal"] == "host"
    # no host: the documented recomputation, labelled as such
    assert create_allocator("cls_attention")(tokens, budget=6, grid=(5, 5), num_prefix_tokens=1).extras["signal"] == "recomputed"
    with pytest.raises(ValueError, match="vision_attention"):
        create_allocator("cls_attention")(tokens, budget=6, grid=(5, 5), num_prefix_tokens=1, host=StubHost())
    with pytest.raises(ValueError, match="vision_attention"):  # wrong token count
        create_allocator("cls_attention")(tokens[:, 1:], budget=6, grid=(5, 5), num_prefix_tokens=0, host=StubHost(
            attention={-2: att[-2][:, :, :, :20]}))


@torch.no_grad()
def test_cls_attention_with_the_base_vlm_host():
    vlm = tiny_vlm()
    pixels, ids, mask = tiny_batch(vlm)
    vision = vlm.encode_image(pixels)
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    out = create_allocator("cls_attention")(vlm.project(vision), budget=5, grid=vlm.grid, num_prefix_tokens=1, host=host)
    want = released_fastervlm({-2: host.vision_attention(-2)}, -2, 5)
    for b in range(3):
        assert kept(out, b) == sorted(want[b].tolist())


# ---------------------------------------------------------------------------- VisionZip
def released_visionzip(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """github dvlab-research/VisionZip, visionzip/clip_encoder.py, CLIPVisionTower_VisionZip.forward
    (after the tower ran): attn_weights = attentions[-2], hidden_states = hidden_states[-2],
    metric = layers[-2].metric (keys averaged over heads). Returns (all_indices, tokens)."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1 :]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1), hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1], contextual_num, dtype=hidden_states_filtered.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(hidden_states_filtered.shape[1]), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    # (the release also returns the [CLS] among the dominant tokens; the contract never passes it on)
    return all_indices, dominant_tokens, contextual_tokens, mask


@pytest.mark.parametrize("budget", [20, 64])
def test_visionzip_matches_the_released_code(budget):
    g = torch.Generator().manual_seed(1)
    n = 100
    hidden = torch.randn(2, 1 + n, 8, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 1 + n, 4, generator=g, dtype=torch.float64)
    att = random_attention(g, 2, 3, 1 + n)
    host = StubHost(attention=att, keys={-2: keys, 1: keys})
    vz = create_allocator("visionzip")
    kd, kc = (int(x[0]) for x in vz.split_budget(torch.tensor([budget])))
    out = vz(hidden, budget=budget, grid=(10, 10), num_prefix_tokens=1, host=host)
    all_idx, dom_tok, ctx_tok, rest_mask = released_visionzip(att[-2], hidden, keys, kd, kc)
    for b in range(2):
        dominant = sorted((all_idx[b, 1:] - 1).tolist())
        assert sorted(out.extras["dominant"][b].tolist()) == dominant
        targets = sorted(out.extras["contextual"][b].tolist())
        # the released targets, mapped back from the filtered order to patch indices
        remaining = [i - 1 for i in range(1, n + 1) if rest_mask[b, i]]
        step = max(1, len(remaining) // kc)
        assert targets == remaining[::step][:kc]
        for i in range(int(out.mask[b].sum())):
            idx = int(out.indices[b, i])
            if idx in targets:
                want = ctx_tok[b, targets.index(idx)]
            else:
                want = hidden[b, 1 + idx]
            torch.testing.assert_close(out.tokens[b, i], want, rtol=1e-12, atol=1e-12)
        # the released dominant tokens (after its [CLS]) are ours, in the same (raster) order
        is_dom = torch.tensor([int(i) in dominant for i in out.indices[b]])
        torch.testing.assert_close(out.tokens[b][is_dom], dom_tok[b, 1:])
    assert out.extras["signal"] == "host" and ("vision_keys", -2) in host.asked
    with pytest.raises(ValueError, match="vision_keys"):
        vz(hidden, budget=budget, grid=(10, 10), num_prefix_tokens=1, host=StubHost(attention=att))


# ---------------------------------------------------------------------------- FastV
def released_fastv(vlm, visual, question_ids, fastv_k, keep_n):
    """github pkunlp-icler/FastV, modeling_llama.py LlamaModel.forward (the layer_idx == FASTV_k
    branch, batch size 1), with transformers' own LlamaModel running the layers: all layers on
    the full sequence for the attention of layer K-1 and the input of layer K, then a copy of
    the model holding layers K.. on the kept tokens."""
    import copy

    inputs, attn, pos = vlm.llm_inputs(visual, None, None, question_ids, None)
    full = vlm.llm.model(inputs_embeds=inputs, attention_mask=attn, position_ids=pos,
                         output_attentions=True, output_hidden_states=True, use_cache=False)
    image_start, image_len, seq_len = 0, visual.shape[1], inputs.shape[1]
    last_layer_attention = full.attentions[fastv_k - 1]
    last_layer_attention_avg = torch.mean(last_layer_attention, dim=1)[0]
    last_layer_attention_avg_last_tok = last_layer_attention_avg[-1]
    last_layer_attention_avg_last_tok_image = last_layer_attention_avg_last_tok[image_start:image_start + image_len]
    top_attention_rank_index = last_layer_attention_avg_last_tok_image.topk(keep_n).indices + image_start
    keep_indexs = torch.cat((torch.arange(image_start), top_attention_rank_index, torch.arange(image_start + image_len, seq_len)))
    keep_indexs = keep_indexs.sort().values
    hidden_states = full.hidden_states[fastv_k][:, keep_indexs, :]
    position_ids = pos[:, keep_indexs]  # the release: keep_indexs (its position ids are sequence indices)
    tail = copy.deepcopy(vlm.llm.model)
    tail.layers = torch.nn.ModuleList(list(tail.layers)[fastv_k:])
    tail.config.num_hidden_layers = len(tail.layers)
    out = tail(inputs_embeds=hidden_states, attention_mask=torch.ones(1, hidden_states.shape[1], dtype=torch.long),
               position_ids=position_ids, use_cache=False)
    return vlm.llm.lm_head(out.last_hidden_state[:, -1]), sorted(top_attention_rank_index.tolist())


@pytest.fixture(scope="module")
def llm_setup():
    vlm = tiny_vlm()
    pixels, ids, mask = tiny_batch(vlm)
    with torch.no_grad():
        vision = vlm.encode_image(pixels)
    return vlm, pixels, vision, ids, mask


@pytest.mark.parametrize("fastv_k,keep_n", [(2, 5), (1, 9), (3, 1)])
@torch.no_grad()
def test_fastv_matches_the_released_code(llm_setup, fastv_k, keep_n):
    vlm, pixels, vision, ids, mask = llm_setup
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    visual = vlm.project(vision[:, 1:])
    fastv = create_allocator("fastv", k=fastv_k)
    got, trace = host.answer_in_llm(fastv, visual, None, None, ids, mask, keep_n, return_trace=True)
    for b in (0, 2):  # unpadded questions
        want, top = released_fastv(vlm, visual[b : b + 1], ids[b : b + 1], fastv_k, keep_n)
        assert sorted(trace.kept[b][trace.mask[b]].tolist()) == top
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)
    # the padded row is answered as if alone
    alone = BaseVLMHost(vlm, pixels[1:2], vision[1:2], ids[1:2, :3], mask[1:2, :3])
    torch.testing.assert_close(
        alone.answer_in_llm(fastv, visual[1:2], None, None, ids[1:2, :3], mask[1:2, :3], keep_n), got[1:2], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fastv_budget_semantics_and_fallback(llm_setup):
    vlm, pixels, vision, ids, mask = llm_setup
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    visual = vlm.project(vision[:, 1:])
    fastv = create_allocator("fastv")
    assert fastv.in_llm and fastv.prune_layers(4) == (1,)
    # a budget of every token keeps every token: the plain answer
    torch.testing.assert_close(host.answer_in_llm(fastv, visual, None, None, ids, mask, 16),
                               vlm.answer_logits(visual, None, None, ids, mask), rtol=1e-5, atol=1e-5)
    _, trace = host.answer_in_llm(fastv, visual, None, None, ids, mask, torch.tensor([3, 7, 0]), return_trace=True)
    assert trace.mask.sum(1).tolist() == [3, 7, 0] and trace.counts[0].tolist() == [3, 7, 0]
    with pytest.raises(ValueError, match="k="):
        host.answer_in_llm(create_allocator("fastv", k=4), visual, None, None, ids, mask, 3)
    # as a plain allocator: fastv_like's proxy, flagged
    out = fastv(vlm.project(vision), query=vlm.query_embeddings(ids), query_mask=mask, budget=4, grid=vlm.grid, num_prefix_tokens=1)
    ref = create_allocator("fastv_like")(vlm.project(vision), query=vlm.query_embeddings(ids), query_mask=mask, budget=4,
                                         grid=vlm.grid, num_prefix_tokens=1)
    assert torch.equal(out.indices, ref.indices) and out.extras["in_llm"] is False


# ---------------------------------------------------------------------------- ToMe
def released_tome_round(metric, x, r):
    """github facebookresearch/ToMe, tome/merge.py: bipartite_soft_matching (no class token)
    and merge_wavg, one round. Returns {patch each output token started as: (token, size)}."""
    t = metric.shape[1]
    r = min(r, t // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    x = x / size
    origin = torch.cat([2 * unm_idx[..., 0], 2 * torch.arange(t // 2)[None].expand(x.shape[0], -1) + 1], 1)
    return [{int(o): (x[bb, i], float(size[bb, i, 0])) for i, o in enumerate(origin[bb])} for bb in range(x.shape[0])]


@pytest.mark.parametrize("n,budget", [(16, 9), (15, 8), (16, 8)])
def test_tome_matches_the_released_round_on_host_keys(n, budget):
    g = torch.Generator().manual_seed(n + budget)
    tokens = torch.randn(2, 1 + n, 6, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 1 + n, 4, generator=g, dtype=torch.float64)
    host = StubHost(keys={-1: keys})
    out = create_allocator("tome", inside=False)(tokens, budget=budget, grid=(1, n), num_prefix_tokens=1, host=host)
    assert out.extras["signal"] == "host" and host.asked == [("vision_keys", -1)]
    want = released_tome_round(keys[:, 1:], tokens[:, 1:], n - budget)
    for b in range(2):
        assert sorted(want[b]) == kept(out, b)
        for i in range(budget):
            tok, size = want[b][int(out.indices[b, i])]
            torch.testing.assert_close(out.tokens[b, i], tok)
            assert out.extras["sizes"][b, i].item() == size
    # matching on keys, not on the tokens: the same tokens with other keys merge differently
    plain = create_allocator("tome")(tokens, budget=budget, grid=(1, n), num_prefix_tokens=1)
    assert plain.extras["signal"] == "tokens"
    want_plain = released_tome_round(tokens[:, 1:], tokens[:, 1:], n - budget)
    assert all(sorted(want_plain[b]) == kept(plain, b) for b in range(2))


# ---------------------------------------------------------------------------- SparseVLM
def released_cluster_and_merge(x, cluster_num, generator):
    """github Gumpest/SparseVLMs, llava/model/language_model/utils.py cluster_and_merge
    (the density noise drawn from ``generator`` instead of the global RNG)."""
    import einops as ein

    B, N, C = x.shape
    x1 = ein.rearrange(x, "b l r -> b l () r")
    x2 = ein.rearrange(x, "b l r -> b () l r")
    distance = (x1 - x2).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    dist_nearest, _index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density = density + torch.rand(density.shape[1:], generator=generator)[None].to(density.dtype) * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, _index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = dist_matrix[torch.arange(B)[:, None], index_down]  # index_points
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    source = x * norm_weight
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=source.reshape(B * N, C).type(x.dtype))
    return x_merged.reshape(B, cluster_num, C), index_down


def segment_model(vlm, start):
    """transformers' own LlamaModel holding layers start.. of the base VLM's LLM (a copy)."""
    import copy

    seg = copy.deepcopy(vlm.llm.model)
    seg.layers = torch.nn.ModuleList(list(seg.layers)[start:])
    seg.config.num_hidden_layers = len(seg.layers)
    return seg


def released_sparsevlm(vlm, visual, visual_positions, question_ids, pruning_loc, plan, seed=0):
    """github Gumpest/SparseVLMs LlamaDynamicvitModel.forward (v1.0, batch size 1) with
    score.attn_postprocess_topk, on transformers' own LlamaModel run segment by segment.
    ``plan(stage, v_token_num) -> kept count`` replaces the release's hard-coded table."""
    gen = torch.Generator().manual_seed(seed)
    inputs, _, pos = vlm.llm_inputs(visual, None, visual_positions, question_ids, None)
    v_token_start, v_token_num = 0, visual.shape[1]
    text_token_start = v_token_start + v_token_num
    v_t = inputs[:, v_token_start:text_token_start, :]
    t_t = inputs[:, text_token_start:, :]
    m_v_t = v_t @ t_t.transpose(1, 2)
    m_v_t = m_v_t.softmax(2).mean(1)
    t_token_idx = torch.where(m_v_t > m_v_t.mean())
    hidden_states, position_ids, start, kept_log = inputs, pos, 0, []
    for stage, layer_idx in enumerate(pruning_loc):
        seg = segment_model(vlm, start)
        out = seg(inputs_embeds=hidden_states, attention_mask=torch.ones(hidden_states.shape[:2], dtype=torch.long),
                  position_ids=position_ids, output_attentions=True, output_hidden_states=True, use_cache=False)
        self_attn_weights = out.attentions[layer_idx - start].mean(1)
        layer_output = out.hidden_states[layer_idx + 1 - start]
        cur_t_idx = t_token_idx[1] + text_token_start
        relation_vis_text = self_attn_weights[:, cur_t_idx, v_token_start:v_token_start + v_token_num].mean(1)
        keep_n = plan(stage, v_token_num)
        pred_score_vis = torch.zeros_like(relation_vis_text, dtype=bool)
        _, indices = torch.topk(relation_vis_text, keep_n, dim=1)
        pred_score_vis[0][indices] = 1
        policy = torch.ones(1, hidden_states.shape[1], dtype=hidden_states.dtype)
        policy[:, v_token_start:text_token_start] = pred_score_vis.type(dtype=hidden_states.dtype)
        total_sparse_token_idx = torch.where(policy == 0)[1].unsqueeze(0)
        select_token_idx = torch.where(policy == 1)[1].unsqueeze(0)
        select_vis_token_num = int(pred_score_vis.sum())
        if total_sparse_token_idx.shape[1] > 0:
            total_sparse_token = layer_output[:, total_sparse_token_idx[0]]
            merge_token_idx_stage1 = torch.where(pred_score_vis == 0)[1]
            merge_token_stage1 = relation_vis_text[0][merge_token_idx_stage1]
            merge_token_num_stage1 = int(merge_token_idx_stage1.shape[0] * 0.3) + 1
            merge_token_stage2_idx = merge_token_stage1.topk(merge_token_num_stage1)[1]
            merge_token_stage2 = total_sparse_token[:, merge_token_stage2_idx, :]
            cluster_num = int(merge_token_stage2.shape[1] / 10) + 1
            merge_sparse_token, _ = released_cluster_and_merge(merge_token_stage2, cluster_num, gen)
            select_token = layer_output[:, select_token_idx[0]]
            hidden_states = torch.cat((select_token[:, :v_token_start + select_vis_token_num], merge_sparse_token,
                                       select_token[:, v_token_start + select_vis_token_num:]), dim=1)
            sel_pos = position_ids[:, select_token_idx[0]]
            position_ids = torch.cat((sel_pos[:, :select_vis_token_num], torch.zeros(1, cluster_num, dtype=torch.long),
                                      sel_pos[:, select_vis_token_num:]), dim=1)  # kept position ids (see the docstring)
            v_token_num = select_vis_token_num + cluster_num
        else:
            hidden_states = layer_output[:, select_token_idx[0]]
            position_ids = position_ids[:, select_token_idx[0]]
            v_token_num = select_vis_token_num
        text_token_start = v_token_start + v_token_num
        kept_log.append(v_token_num)
        start = layer_idx + 1
    seg = segment_model(vlm, start)
    out = seg(inputs_embeds=hidden_states, attention_mask=torch.ones(hidden_states.shape[:2], dtype=torch.long),
              position_ids=position_ids, use_cache=False)
    return vlm.llm.lm_head(out.last_hidden_state[:, -1]), kept_log


@pytest.mark.parametrize("budget", [3, 7])
@torch.no_grad()
def test_sparsevlm_matches_the_released_code(llm_setup, budget):
    vlm, pixels, vision, ids, mask = llm_setup
    # a 16-token image gives too few pruned tokens for several clusters; repeat it to 48 tokens
    visual = vlm.project(vision[:, 1:]).repeat(1, 3, 1) + 0.01 * torch.randn(3, 48, 32, generator=torch.Generator().manual_seed(5))
    positions = vlm.fine_positions(3).repeat(1, 3, 1)
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    sv = create_allocator("sparsevlm")
    layers = sv.prune_layers(4)
    assert layers == (0, 1, 2)

    def plan(stage, v_now):
        return sv.plan(v_now, sv.stage_total(48, budget, stage, len(layers)))[0]

    got, trace = host.answer_in_llm(sv, visual, None, positions, ids, mask, budget, return_trace=True)
    assert trace.mask.sum(1).tolist() == [budget] * 3
    for b in (0, 2):  # unpadded questions
        want, counts = released_sparsevlm(vlm, visual[b : b + 1], positions[b : b + 1], ids[b : b + 1], layers, plan)
        assert [int(c[b]) for c in trace.counts] == counts and counts[-1] == budget
        torch.testing.assert_close(got[b : b + 1], want, rtol=1e-5, atol=1e-5)


def test_sparsevlm_pieces():
    from arr_coc.allocators.sparsevlm import (
        dpc_knn_merge,
        recycled_count,
        select_raters,
    )

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 23, 5, generator=g, dtype=torch.float64)
    want, centres = released_cluster_and_merge(x, 3, torch.Generator().manual_seed(9))
    noise = torch.rand(23, generator=torch.Generator().manual_seed(9)) * 1e-6
    got, got_centres = dpc_knn_merge(x[0], 3, noise.double())
    torch.testing.assert_close(got, want[0])
    assert got_centres.tolist() == centres[0].tolist()
    assert [recycled_count(p) for p in (0, 1, 29, 30, 100, 510)] == [0, 1, 1, 2, 4, 16]
    # raters: padded text tokens never rate, and the mean is over the real ones
    v, t = torch.randn(2, 6, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    tm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    r = select_raters(v, torch.ones(2, 6, dtype=torch.bool), t, tm)
    m = torch.softmax(v[1] @ t[1, :3].T, dim=1).mean(0)
    assert r[1].tolist() == (m > m.mean()).tolist() + [False, False]
    sv = create_allocator("sparsevlm")
    assert [sv.stage_total(576, 64, s, 3) for s in range(3)] == [round(576 * (64 / 576) ** (1 / 3)), round(576 * (64 / 576) ** (2 / 3)), 64]
    kept, c = sv.plan(300, 64)
    assert kept + c == 64 and c == recycled_count(300 - kept)
    assert sv.prune_layers(32) == (2, 6, 15) and sv.prune_layers(8) == (0, 2, 4)


# ---------------------------------------------------------------------------- CDPruner
def released_cdpruner(image_features, image_embeds, text_embeds, visual_token_num, sign=-1.0):
    """github Theia-4869/CDPruner, llava/model/llava_arch.py encode_images (after the towers and
    the projector): image_features = mm_projector output (B, N, D), image_embeds (B, N, C) in
    the CLIP space, text_embeds (M, C). ``sign=-1`` is the release; +1 drops its minus."""
    B, N, _C = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (sign * relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N), dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum("tb,tbn->bn", cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float("inf")
    return torch.sort(select_idx.t()).values, relevance


@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("text", ["pooled", "tokens"])
def test_cdpruner_matches_the_released_code(negate, text):
    g = torch.Generator().manual_seed(21)
    n, k = 30, 8
    tokens = torch.randn(2, 1 + n, 12, generator=g, dtype=torch.float64)  # projected tokens (+ a CLS)
    patches = torch.nn.functional.normalize(torch.randn(2, n, 6, generator=g, dtype=torch.float64), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(2, 4, 6, generator=g, dtype=torch.float64), dim=-1)
    wmask = torch.tensor([[True, True, True, False], [True] * 4])
    pooled = torch.nn.functional.normalize(torch.randn(2, 6, generator=g, dtype=torch.float64), dim=-1)
    host = StubHost(text=words, text_mask=wmask, patches=patches)
    host.text_embedding = lambda: pooled
    cdp = create_allocator("cdpruner", negate_relevance=negate, text=text)
    out = cdp(tokens, budget=k, grid=(5, 6), num_prefix_tokens=1, host=host)
    assert out.extras["signal"] == "host"
    for b in range(2):
        text_embeds = pooled[b : b + 1] if text == "pooled" else words[b][wmask[b]]
        want, rel = released_cdpruner(tokens[b : b + 1, 1:], patches[b : b + 1], text_embeds, k, sign=-1.0 if negate else 1.0)
        assert kept(out, b) == want[0].tolist()
        torch.testing.assert_close(out.extras["quality"][b], rel[0])
    # the sign matters: the two conventions choose differently here
    other = create_allocator("cdpruner", negate_relevance=not negate, text=text)(tokens, budget=k, grid=(5, 6),
                                                                                 num_prefix_tokens=1, host=host)
    assert any(kept(other, b) != kept(out, b) for b in range(2))


def test_cdpruner_names_missing_text_signals():
    tokens = torch.randn(1, 17, 8)
    with pytest.raises(ValueError, match="patch_features"):
        create_allocator("cdpruner")(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=StubHost())
    host = StubHost(patches=torch.randn(1, 16, 4))
    with pytest.raises(ValueError, match="text_embedding"):
        create_allocator("cdpruner")(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=host)
    with pytest.raises(ValueError, match="text_features"):
        create_allocator("cdpruner", text="tokens")(tokens, budget=3, grid=(4, 4), num_prefix_tokens=1, host=host)
    vlm = tiny_vlm()
    if not getattr(vlm, "has_text_tower", False):  # a v1 base VLM: the host says which signal is missing
        pixels, ids, mask = tiny_batch(vlm, b=1)
        host = BaseVLMHost(vlm, pixels, None, ids, mask)
        with pytest.raises(ValueError, match="patch_features"):
            create_allocator("cdpruner")(vlm.project(host.vision_tokens), budget=3, grid=vlm.grid, num_prefix_tokens=1, host=host)


@torch.no_grad()
def test_cdpruner_with_the_base_vlm_text_tower():
    from arr_coc.training.base_vlm import BaseVLMConfig

    if "text_tower" not in BaseVLMConfig.__dataclass_fields__:
        pytest.skip("this base VLM has no CLIP text tower yet")
    vlm = tiny_vlm(text_tower=True)
    pixels, ids, mask = tiny_batch(vlm)
    vision = vlm.encode_image(pixels)
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    feats, fmask = host.text_features()
    torch.testing.assert_close(feats, vlm.instruction_features(ids, mask))
    assert torch.equal(fmask, mask)
    torch.testing.assert_close(host.text_embedding(), vlm.instruction_embedding(ids, mask))
    torch.testing.assert_close(host.patch_features(), vlm.patch_features(vision))
    projected = vlm.project(vision)
    for negate in (True, False):
        out = create_allocator("cdpruner", negate_relevance=negate)(projected, budget=5, grid=vlm.grid, num_prefix_tokens=1, host=host)
        for b in range(3):
            want, _ = released_cdpruner(projected[b : b + 1, 1:].double(), host.patch_features()[b : b + 1].double(),
                                        host.text_embedding()[b : b + 1].double(), 5, sign=-1.0 if negate else 1.0)
            assert kept(out, b) == want[0].tolist()


def released_tome_tower(vit, x, r_list):
    """github facebookresearch/ToMe, tome/patch/timm.py ToMeBlock.forward / ToMeAttention.forward
    (prop_attn=True, class_token=True) over a timm ViT's blocks, batch size 1, from the block-0
    input x; with merge.py's bipartite_soft_matching and merge_wavg. Returns (tokens, size)."""
    import math

    def bipartite_soft_matching(metric, r, class_token=False):
        protected = 1 if class_token else 0
        t = metric.shape[1]
        r = min(r, (t - protected) // 2)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

        def merge(x, mode="mean"):
            src, dst = x[..., ::2, :], x[..., 1::2, :]
            n, t1, c = src.shape
            unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
            src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
            dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
            return torch.cat([unm, dst], dim=1)

        return merge

    def merge_wavg(merge, x, size=None):
        if size is None:
            size = torch.ones_like(x[..., 0, None])
        x = merge(x * size, mode="sum")
        size = merge(size, mode="sum")
        return x / size, size

    size = None
    for blk, r in zip(vit.blocks, r_list):
        # ToMeAttention.forward(self.norm1(x), size)
        y = blk.norm1(x)
        B, N, C = y.shape
        qkv = blk.attn.qkv(y).reshape(B, N, 3, blk.attn.num_heads, C // blk.attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * blk.attn.scale
        if size is not None:
            attn = attn + size.log()[:, None, None, :, 0]
        attn = attn.softmax(dim=-1)
        x_attn = blk.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        metric = k.mean(1)
        # ToMeBlock.forward
        x = x + blk.drop_path1(x_attn)
        if r > 0:
            merge = bipartite_soft_matching(metric, r, class_token=True)
            x, size = merge_wavg(merge, x, size)
        x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    return vit.norm(x), size


@pytest.mark.parametrize("budget", [5, 9])
@torch.no_grad()
def test_tome_inside_the_tower_matches_the_released_code(llm_setup, budget):
    from arr_coc.allocators.tome import tome_schedule

    vlm, pixels, vision, ids, mask = llm_setup
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    projected = vlm.project(vision)
    out = create_allocator("tome")(projected, budget=budget, grid=vlm.grid, num_prefix_tokens=1, host=host)
    assert out.extras["signal"] == "tower" and out.counts.tolist() == [budget] * 3
    vit = vlm.vision
    x0 = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed((pixels - vlm.pixel_mean) / vlm.pixel_std))))
    sched = tome_schedule(16, budget, 2)
    assert sum(sched) == 16 - budget
    for b in range(3):
        tokens, size = released_tome_tower(vit, x0[b : b + 1], sched)
        want = vlm.project(tokens[:, 1:])[0]  # the release keeps its [CLS] first; the LLM gets the patches
        want_size = size[0, 1:, 0]
        got = out.tokens[b][out.mask[b]]
        dist = torch.cdist(got, want)
        match = dist.argmin(1)
        assert sorted(match.tolist()) == list(range(budget))  # one-to-one
        torch.testing.assert_close(got, want[match], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.extras["sizes"][b][out.mask[b]], want_size[match])
    # nothing to merge: the tower's own output
    merged = host.vision_merge(torch.zeros(3, 2, dtype=torch.long))
    torch.testing.assert_close(merged.tokens, projected[:, 1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(merged.origin, torch.arange(16).expand(3, 16))
    # below what the tower can reach (at most half per block): the rest merged after it
    low = create_allocator("tome")(projected, budget=2, grid=vlm.grid, num_prefix_tokens=1, host=host)
    assert low.counts.tolist() == [2, 2, 2] and (low.extras["sizes"].sum(1) == 16).all()
    with pytest.raises(ValueError, match="vision_blocks"):
        create_allocator("tome")(projected, budget=2, grid=vlm.grid, num_prefix_tokens=1, host=StubHost())


def test_visionzip_merges_before_the_projector_when_the_host_can():
    """The release merges the tower's hidden states, then projects: with a host that gives the
    tower's tokens and the projector, the contextual tokens are project(released merge)."""
    g = torch.Generator().manual_seed(2)
    n = 64
    hidden = torch.randn(2, 1 + n, 8, generator=g, dtype=torch.float64)
    keys = torch.randn(2, 1 + n, 4, generator=g, dtype=torch.float64)
    att = random_attention(g, 2, 2, 1 + n)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)

    def project(v):
        return torch.tanh(v @ w)

    host = StubHost(attention=att, keys={-2: keys})
    host.vision_output = lambda: hidden
    host.to_token_space = project
    out = create_allocator("visionzip")(project(hidden), budget=20, grid=(8, 8), num_prefix_tokens=1, host=host)
    assert out.extras["merge_space"] == "vision"
    kd, kc = (int(x[0]) for x in create_allocator("visionzip").split_budget(torch.tensor([20])))
    all_idx, dom_tok, ctx_tok, _ = released_visionzip(att[-2], hidden, keys, kd, kc)
    for b in range(2):
        targets = sorted(out.extras["contextual"][b].tolist())
        dominant = set((all_idx[b, 1:] - 1).tolist())
        for i in range(20):
            idx = int(out.indices[b, i])
            want = project(ctx_tok[b, targets.index(idx)]) if idx in targets else project(hidden[b, 1 + idx])
            assert idx in targets or idx in dominant
            torch.testing.assert_close(out.tokens[b, i], want)
    # a host without the tower's tokens: merged in the tokens' space, and said so
    plain = create_allocator("visionzip")(project(hidden), budget=20, grid=(8, 8), num_prefix_tokens=1,
                                          host=StubHost(attention=att, keys={-2: keys}))
    assert plain.extras["merge_space"] == "tokens"
    assert torch.equal(plain.indices, out.indices)


@torch.no_grad()
def test_visionzip_with_the_base_vlm_host(llm_setup):
    vlm, pixels, vision, ids, mask = llm_setup
    host = BaseVLMHost(vlm, pixels, vision, ids, mask)
    out = create_allocator("visionzip")(vlm.project(vision), budget=7, grid=vlm.grid, num_prefix_tokens=1, host=host)
    assert out.extras["merge_space"] == "vision" and out.counts.tolist() == [7, 7, 7]
    kd, kc = (int(x[0]) for x in create_allocator("visionzip").split_budget(torch.tensor([7])))
    for b in range(3):
        all_idx, _, ctx_tok, _ = released_visionzip(host.vision_attention(-2)[b : b + 1], vision[b : b + 1],
                                                    host.vision_keys(-2)[b : b + 1], kd, kc)
        assert sorted(out.extras["dominant"][b].tolist()) == sorted((all_idx[0, 1:] - 1).tolist())
        targets = sorted(out.extras["contextual"][b].tolist())
        got = torch.stack([out.tokens[b, (out.indices[b] == t).nonzero().item()] for t in targets])
        torch.testing.assert_close(got, vlm.project(ctx_tok)[0])
