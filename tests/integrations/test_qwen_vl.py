"""The Qwen-VL plug-in on tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL models built offline.

Oracles: the unmodified model (``full`` must change nothing, logits and greedy tokens), the
closed form of M-RoPE positions (image cell (r, c) after text ending at s - 1 -> (s, s + r,
s + c); text after an image continues at s + max(h', w')), and the unmodified model run on
the full sequence with the dropped image positions masked out of attention and the full
position ids passed explicitly (dropping a key is the same as masking it).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from arr_coc.allocators import create_allocator, list_allocators  # noqa: E402
from arr_coc.integrations import qwen_vl  # noqa: E402
from arr_coc.integrations.qwen_vl import normalize_image_budget, wrap  # noqa: E402

IMG, VID, VS, VE, PAD = 120, 121, 122, 123, 0
IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
VISION = dict(patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
# two image sizes: merged grids 2 x 3 and 4 x 2
GRIDS = torch.tensor([[1, 4, 6], [1, 8, 4]])
MERGED = [(2, 3), (4, 2)]


def _qwen2():
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters=ROPE),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **VISION),
        **IDS, attn_implementation="sdpa")
    return transformers.Qwen2VLForConditionalGeneration(cfg)


def _qwen25():
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(**TEXT, rope_parameters=ROPE),
        # window of 2 x 2 merged cells: the 2 x 3 and 4 x 2 grids use windowed attention
        vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                           window_size=8, fullatt_block_indexes=[1], **VISION),
        **IDS, attn_implementation="sdpa")
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg)


def _qwen3():
    cfg = transformers.Qwen3VLConfig(
        text_config=dict(**TEXT, head_dim=8, rope_parameters=dict(ROPE, mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **VISION),
        **IDS, attn_implementation="sdpa")
    return transformers.Qwen3VLForConditionalGeneration(cfg)


BUILDERS = {"qwen2_vl": _qwen2, "qwen2_5_vl": _qwen25, "qwen3_vl": _qwen3}
_CACHE: dict[str, torch.nn.Module] = {}


def _model(name: str) -> torch.nn.Module:
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = BUILDERS[name]().eval()
    return _CACHE[name]


@pytest.fixture(params=list(BUILDERS))
def family(request):
    return request.param


def _batch(padding_side: str = "left", seed: int = 1) -> dict[str, torch.Tensor]:
    """Two prompts, an image of each size, different text lengths, padded."""
    n = [h * w for h, w in MERGED]
    seqs = [[5, 6, VS] + [IMG] * n[0] + [VE, 7, 8, 9], [5, VS] + [IMG] * n[1] + [VE, 7, 8, 9, 10, 11]]
    length = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = [PAD] * (length - len(s))
        ids.append(pad + s if padding_side == "left" else s + pad)
        m = [0] * len(pad)
        mask.append(m + [1] * len(s) if padding_side == "left" else [1] * len(s) + m)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 2 * 2, generator=gen)
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=pixels,
                image_grid_thw=GRIDS.clone())


class _Capture:
    """Forward pre-hook on the language model recording what it is fed; removed on exit."""

    def __init__(self, model):
        self.lm = model.get_decoder()
        self.calls: list[dict] = []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.calls.append({k: v for k, v in kwargs.items() if k in (
                "inputs_embeds", "attention_mask", "position_ids", "visual_pos_masks", "deepstack_visual_embeds")})
        self.handle = self.lm.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _expected_positions(input_ids, attention_mask):
    """Closed-form M-RoPE positions [3, B, L] of the full sequence (images in GRIDS order)."""
    out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    img = 0
    for b in range(input_ids.shape[0]):
        p, col = 0, 0
        cols = attention_mask[b].nonzero().flatten().tolist()
        while col < len(cols):
            c = cols[col]
            if int(input_ids[b, c]) == IMG:
                h, w = MERGED[img]
                for r in range(h):
                    for cc in range(w):
                        out[:, b, cols[col + r * w + cc]] = torch.tensor([p, p + r, p + cc])
                p += max(h, w)
                col += h * w
                img += 1
            else:
                out[:, b, c] = p
                p += 1
                col += 1
    return out


# ---------------------------------------------------------------------------- full == plain
def test_full_matches_plain_logits_and_positions(family):
    model = _model(family)
    inputs = _batch()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs).logits
        vlm = wrap(model, "full")
        with _Capture(model) as cap:
            out = vlm(**inputs)
    torch.testing.assert_close(out.logits[real], ref[real], rtol=1e-5, atol=1e-5)
    (call,) = cap.calls
    expected = _expected_positions(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(call["position_ids"][:, real], expected[:, real])
    tf_pos, _ = model.model.get_rope_index(input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                           attention_mask=inputs["attention_mask"])
    assert torch.equal(call["position_ids"], tf_pos)
    assert out.prepared.kept.tolist() == [6, 8]


def test_full_generate_matches_plain_and_leaves_the_model_alone(family):
    model = _model(family)
    inputs = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.model.rope_deltas = None
    vlm = wrap(model, "full")
    with torch.no_grad():
        ours = vlm.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert model.model.rope_deltas is None  # the plug-in writes no model state
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, ref)
    assert vlm.unwrap() is model
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.get_decoder()._forward_pre_hooks


def test_full_right_padding_labels_and_mm_token_type_ids():
    model = _model("qwen2_vl")
    inputs = _batch("right")
    labels = torch.where(inputs["attention_mask"].bool() & (inputs["input_ids"] != IMG), inputs["input_ids"], -100)
    mm = (inputs["input_ids"] == IMG).long()
    with torch.no_grad():
        ref = model(**inputs, labels=labels)
        out = wrap(model, "full")(**inputs, labels=labels, mm_token_type_ids=mm)
    real = inputs["attention_mask"].bool()
    assert out.prepared.padding_side == "right"
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- with a budget
def test_budget_kept_counts_and_original_positions(family):
    model = _model(family)
    inputs = _batch()
    budget = torch.tensor([2, 5])
    vlm = wrap(model, create_allocator("random", seed=3), budget=budget)
    with torch.no_grad(), _Capture(model) as cap:
        out = vlm(**inputs)
    (call,) = cap.calls
    prep = out.prepared
    assert prep.kept.tolist() == [2, 5]
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != IMG)).sum(1)
    mask = call["attention_mask"]
    assert mask.sum(1).tolist() == (text + torch.tensor([2, 5])).tolist()
    assert call["inputs_embeds"].shape[1] == int(mask.sum(1).max())
    assert prep.visual_mask.sum(1).tolist() == [2, 5]
    # every real slot carries the closed-form position of the column it came from
    expected = _expected_positions(inputs["input_ids"], inputs["attention_mask"])
    pos = call["position_ids"]
    for b in range(2):
        real = mask[b].bool()
        src = prep.source[b][real]
        assert torch.equal(pos[:, b][:, real], expected[:, b, src])
        # image tokens: (s, s + r, s + c) for the allocator's (row, col) on the merged grid
        idx, cells = prep.allocations[b]
        vis = prep.visual_mask[b]
        s = int(pos[0, b][vis][0])
        assert torch.equal(pos[:, b][:, vis].T, torch.stack([torch.full_like(cells[:, 0], s), s + cells[:, 0],
                                                             s + cells[:, 1]], 1))
        # text after the image keeps its position: s + max(h', w') for the first one
        after = real & ~vis & (torch.arange(mask.shape[1]) > vis.nonzero().max())
        assert int(pos[0, b][after][0]) == s + max(MERGED[b])
    if family == "qwen3_vl":
        assert torch.equal(call["visual_pos_masks"], prep.visual_mask)
        assert [d.shape[0] for d in call["deepstack_visual_embeds"]] == [7, 7]
    # rope deltas: the next position after the prompt is max + 1
    real_pos = pos.masked_fill(~mask.bool()[None], -1).amax(dim=(0, 2))
    assert torch.equal(out.rope_deltas[:, 0], real_pos + 1 - mask.shape[1])


def _assert_matches_masked_plain(model, vlm, inputs):
    """Oracle: keys dropped from the sequence == keys masked out, full positions passed explicitly."""
    with torch.no_grad():
        out = vlm(**inputs)
        prep = out.prepared
        kept_mask = torch.zeros_like(inputs["attention_mask"])
        for b in range(kept_mask.shape[0]):
            real = prep.attention_mask[b].bool()
            kept_mask[b, prep.source[b][real]] = 1
        full_pos, _ = model.model.get_rope_index(input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"])
        ref = model(**dict(inputs, attention_mask=kept_mask), position_ids=full_pos).logits
    for b in range(kept_mask.shape[0]):
        real = prep.attention_mask[b].bool()
        torch.testing.assert_close(out.logits[b][real], ref[b][prep.source[b][real]], rtol=1e-4, atol=1e-5)
    return prep


def test_budget_equals_plain_model_with_dropped_positions_masked(family):
    model = _model(family)
    vlm = wrap(model, create_allocator("random", seed=5), budget=torch.tensor([3, 4]))
    prep = _assert_matches_masked_plain(model, vlm, _batch())
    assert prep.kept.tolist() == [3, 4]


def test_two_images_in_one_prompt_and_a_prompt_without_image():
    """Images are assigned to prompts in reading order; DeepStack offsets follow."""
    model = _model("qwen3_vl")
    n = [h * w for h, w in MERGED]
    seqs = [[5, VS] + [IMG] * n[0] + [VE, 6, VS] + [IMG] * n[1] + [VE, 7, 8], [9, 10, 11, 12]]
    length = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (length - len(s)) + s for s in seqs])
    inputs = dict(input_ids=ids, attention_mask=(ids != PAD).long(), image_grid_thw=GRIDS.clone(),
                  pixel_values=torch.randn(int(GRIDS.prod(-1).sum()), 24, generator=torch.Generator().manual_seed(4)))
    vlm = wrap(model, create_allocator("random", seed=1), budget=[4, 3])
    prep = _assert_matches_masked_plain(model, vlm, inputs)
    assert prep.image_rows.tolist() == [0, 0]
    assert prep.visual_mask.sum(1).tolist() == [7, 0]


def test_generate_with_budget_continues_positions_and_caches_the_short_sequence(family):
    model = _model(family)
    inputs = _batch()
    vlm = wrap(model, create_allocator("random", seed=2), budget=0.5)
    with torch.no_grad():
        first = vlm(**inputs)
        with _Capture(model) as cap:
            gen = vlm.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    prep = first.prepared
    short = prep.inputs_embeds.shape[1]
    assert prep.kept.tolist() == [3, 4]
    assert gen.sequences.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(gen.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert gen.past_key_values.get_seq_length() == short + 2  # the last new token is not fed back
    # greedy first token == argmax of the shortened prefill's last logits
    assert torch.equal(gen.sequences[:, inputs["input_ids"].shape[1]], first.logits[:, -1].argmax(-1))
    # decode steps: one new slot each, at max prompt position + 1, + 2 in all three axes
    steps = [c for c in cap.calls if c["inputs_embeds"].shape[1] == 1][-2:]
    start = prep.position_ids.amax(dim=(0, 2))  # [B]
    for i, call in enumerate(steps):
        pos = call["position_ids"]
        assert pos.shape[0] == 4  # the text row for the mask, then (t, h, w), as model.generate builds them
        assert torch.equal(pos[1:, :, 0], (start + 1 + i)[None].expand(3, -1))


def test_generate_max_length_and_beams_match_plain_qwen2():
    """max_length counts the caller's prompt; beam search expands embeds and 3-D positions alike."""
    model = _model("qwen2_vl")
    inputs = _batch()
    vlm = wrap(model, "full")
    with torch.no_grad():
        for kw in (dict(max_length=20), dict(max_new_tokens=3, num_beams=2, num_return_sequences=2)):
            model.model.rope_deltas = None
            ours = vlm.generate(**inputs, do_sample=False, **kw)
            ref = model.generate(**inputs, do_sample=False, **kw)
            assert torch.equal(ours, ref)


def test_generate_default_length_min_length_and_sampling_match_plain_qwen2():
    """No length given: 20 new tokens as transformers; min_length counts the caller's prompt;
    seeded sampling with several sequences per prompt draws the same tokens."""
    model = _model("qwen2_vl")
    inputs = _batch()
    length = inputs["input_ids"].shape[1]
    vlm = wrap(model, "full")
    sampling = dict(max_new_tokens=4, do_sample=True, num_return_sequences=3, top_k=0, temperature=1.5)
    with torch.no_grad():
        for kw in (dict(do_sample=False), dict(do_sample=False, min_length=length + 5, max_new_tokens=5), sampling):
            model.model.rope_deltas = None
            torch.manual_seed(3)
            ours = vlm.generate(**inputs, **kw)
            torch.manual_seed(3)
            ref = model.generate(**inputs, **kw)
            assert torch.equal(ours, ref), kw
        assert ours.shape == (6, length + 4)
        model.model.rope_deltas = None
        assert vlm.generate(**inputs, do_sample=False).shape[1] == length + 20
        short = wrap(model, "random", budget=2)
        assert short.generate(**inputs, do_sample=False, max_length=length + 2).shape == (2, length + 2)
        with pytest.raises(ValueError, match="max_length"):
            short.generate(**inputs, do_sample=False, max_length=length - 1)


@pytest.mark.parametrize("name", list_allocators())
@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen3_vl"])
def test_every_registered_allocator_runs(name, fam):
    model = _model(fam)
    inputs = _batch()
    budget = torch.tensor([3, 5])
    allocator = create_allocator(name, **({"k": 1} if name == "fastv" else {}))  # the tiny LLMs have 2 layers
    vlm = wrap(model, allocator, budget=budget, query="prompt")
    if vlm.in_llm and fam == "qwen3_vl":  # DeepStack fills layers 0 and 1: nothing to prune after
        with pytest.raises(ValueError, match="DeepStack"), torch.no_grad():
            vlm(**inputs)
        return
    with torch.no_grad():
        out = vlm(**inputs)
    prep = out.prepared
    assert torch.isfinite(out.logits).all()
    kept = prep.kept
    if vlm.in_llm:  # every token enters the LLM; the budget is met inside it
        assert kept.tolist() == [6, 8]
        assert vlm.last_in_llm.trace.mask.sum(1).tolist() == budget.tolist()
    elif name == "full":
        assert kept.tolist() == [6, 8]
    else:
        assert (kept <= budget).all()
        if getattr(vlm.allocator, "fixed_budget", False):
            assert kept.tolist() == budget.tolist()
    assert prep.visual_mask.sum(1).tolist() == kept.tolist()
    # positions of image tokens: those of the top-left merged cell of what was kept
    full_pos, _ = model.model.get_rope_index(input_ids=inputs["input_ids"], image_grid_thw=GRIDS,
                                             attention_mask=inputs["attention_mask"])
    for b in range(2):
        real = prep.attention_mask[b].bool()
        assert torch.equal(prep.position_ids[:, b][:, real], full_pos[:, b, prep.source[b][real]])


# ---------------------------------------------------------------------------- errors and helpers
def test_bad_inputs_raise_clear_errors():
    model = _model("qwen2_vl")
    inputs = _batch()
    vlm = wrap(model, "random", budget=3)
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=torch.tensor([1, 2, 3]))  # 2 images, 3 budgets
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=-1)
    with pytest.raises(ValueError, match="video"):
        vlm(**inputs, pixel_values_videos=torch.zeros(8, 24), video_grid_thw=torch.tensor([[2, 2, 2]]))
    vid = inputs["input_ids"].clone()
    vid[0, -1] = VID
    with pytest.raises(ValueError, match="video"):
        vlm(**dict(inputs, input_ids=vid))
    with pytest.raises(ValueError, match="image_grid_thw"):
        vlm(**dict(inputs, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]])))
    with pytest.raises(ValueError, match="image_grid_thw"):
        vlm(**dict(inputs, image_grid_thw=torch.tensor([[2, 4, 6], [1, 8, 4]])))
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(**dict(inputs, pixel_values=None))
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(**dict(inputs, pixel_values=inputs["pixel_values"][:-4]))
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        vlm(**inputs, mm_token_type_ids=torch.zeros_like(inputs["input_ids"]))
    with pytest.raises(ValueError, match="position_ids"):
        vlm(**inputs, position_ids=torch.zeros(3, 2, inputs["input_ids"].shape[1], dtype=torch.long))
    with pytest.raises(ValueError, match="model"):
        wrap(torch.nn.Linear(2, 2), "full")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="Qwen"):
        wrap(llama, "full")


def test_qwen3_generate_rejects_beams_and_a_prompt_ending_in_an_image():
    model = _model("qwen3_vl")
    inputs = _batch()
    vlm = wrap(model, "random", budget=2)
    with pytest.raises(ValueError, match="num_beams"):
        vlm.generate(**inputs, max_new_tokens=2, num_beams=2)
    ids = torch.tensor([[5, 6, VS] + [IMG] * 6])  # ends with the image (2 x 3 merged cells)
    one = dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=GRIDS[:1],
               pixel_values=inputs["pixel_values"][:24])
    with pytest.raises(ValueError, match="text token"):
        wrap(model, "full").generate(**one, max_new_tokens=2)


def test_normalize_image_budget_values():
    sizes = torch.tensor([576, 24, 1])
    assert normalize_image_budget(None, sizes).tolist() == [576, 24, 1]
    assert normalize_image_budget(64, sizes).tolist() == [64, 64, 64]
    assert normalize_image_budget(0.25, sizes).tolist() == [144, 6, 1]
    assert normalize_image_budget(1 / 9, sizes).tolist() == [64, 3, 1]
    assert normalize_image_budget(1 / 18, sizes).tolist() == [32, 1, 1]
    assert normalize_image_budget([5, 0, 2], sizes).tolist() == [5, 0, 2]
    with pytest.raises(ValueError, match="budget"):
        normalize_image_budget([5, 0], sizes)
    with pytest.raises(ValueError, match="budget"):
        normalize_image_budget(0.0, sizes)
    with pytest.raises(ValueError, match="budget"):
        normalize_image_budget(True, sizes)


def test_budget_zero_drops_the_image_and_a_text_only_prompt_runs():
    model = _model("qwen3_vl")
    inputs = _batch()
    with torch.no_grad():
        out = wrap(model, "random", budget=0)(**inputs)
        assert out.prepared.kept.tolist() == [0, 0]
        assert not out.prepared.visual_mask.any()
        assert torch.isfinite(out.logits).all()
        text = torch.tensor([[5, 6, 7, 8]])
        # the plain model reuses rope_deltas cached by an earlier generate (another batch size); reset them
        model.model.rope_deltas = None
        ref = model(input_ids=text).logits
        ours = wrap(model, "random", budget=3)(input_ids=text).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_supported_models_cover_the_installed_classes():
    assert set(qwen_vl.SUPPORTED_MODELS) == {
        "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration"}
    for name in BUILDERS:
        assert wrap(_model(name), "full").family == name


def test_deepstack_region_features_match_the_candidate_pyramid():
    """A pooled token's DeepStack feature is the area average the pyramid gives its candidate."""
    from arr_coc.pyramid import build_pyramid, pyramid_positions

    grid = (3, 5)
    feat = torch.randn(15, 4)
    pos, _ = pyramid_positions(grid, (1, 2))
    ours = qwen_vl._pyramid_features(feat, grid, 2)[qwen_vl._candidate_index(pos, grid)]
    torch.testing.assert_close(ours, build_pyramid(feat[None], grid, (1, 2)).candidates[0])


def test_gradients_reach_the_vision_tower():
    model = _model("qwen2_vl")
    vlm = wrap(model, create_allocator("random", seed=0), budget=3)
    try:
        vlm(**_batch()).logits.sum().backward()
        grads = [p.grad for p in model.model.visual.merger.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        model.zero_grad(set_to_none=True)


def test_the_query_is_the_question_only():
    from arr_coc.integrations.query import QuestionFinder

    model = _model("qwen2_vl")
    inputs = _batch()  # rows: [5, 6, VS, image, VE, 7, 8, 9] and [5, VS, image, VE, 7, 8, 9, 10, 11]
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, tokens, query=None, query_mask=None, **kw):
            seen.append((query, query_mask))
            return create_allocator("full")(tokens, query, query_mask, **kw)

    finder = QuestionFinder(headers=((5,),), closer=(9,), turn_end=(), image_token_id=IMG, image_prefix=(VS,),
                            image_suffix=(VE,), skip_ids=frozenset({VS, VE, IMG}))
    with torch.no_grad():
        ref = wrap(model, "full", query="prompt")(**inputs).logits
        out = wrap(model, Recording(), query=finder)(**inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    table = model.get_input_embeddings().weight
    (q0, m0), (q1, m1) = seen  # one allocator call per image size, in grid order: image 0, then image 1
    assert m0.tolist() == [[True, True, True]] and m1.tolist() == [[True, True, False]]
    torch.testing.assert_close(q0[0], table[[6, 7, 8]])  # after the header 5, without VS / image / VE
    torch.testing.assert_close(q1[0, :2], table[[7, 8]])  # 10, 11 follow the closer 9
