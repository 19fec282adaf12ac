"""The LLaVA integration on a tiny random LlavaForConditionalGeneration built offline.

Oracle: the unwrapped transformers model. With ``full`` the wrapper must reproduce its
logits and greedy generations; with a budget the language model must receive exactly the
kept image tokens (checked on the tensors it is called with, through a removable hook).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from arr_coc.allocators import Allocator, Selection, create_allocator, list_allocators, topk_indices  # noqa: E402
from arr_coc.integrations import llava  # noqa: E402
from arr_coc.integrations._common import (  # noqa: E402
    compaction_plan,
    gather_sequence,
    image_runs,
    infer_padding_side,
    normalize_budget,
    position_ids_from_mask,
    splice_runs,
    text_query,
)

IMG = 120  # image token id
PAD = 0
GRID = (6, 6)  # 48 px / patch 8
N = GRID[0] * GRID[1]
VOCAB = 128


def tiny_llava(strategy: str = "default", seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=48, patch_size=8, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=PAD, max_position_embeddings=512,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMG,
        vision_feature_select_strategy=strategy, vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return tiny_llava()


def make_batch(
    before: list[int], after: list[int], *, images: list[int] | None = None, n: int = N, side: str = "left", seed: int = 1
) -> dict[str, torch.Tensor]:
    """Prompts ``text(before) <image>*n*images text(after)``, padded on ``side``."""
    g = torch.Generator().manual_seed(seed)
    images = images or [1] * len(before)
    rows = []
    for a, c, k in zip(before, after, images):
        t1 = torch.randint(1, IMG, (a,), generator=g)
        t2 = torch.randint(1, IMG, (c,), generator=g)
        rows.append(torch.cat([t1, torch.full((n * k,), IMG), t2]))
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        if side == "left":
            ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
        else:
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pv = torch.randn(sum(images), 3, 48, 48, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


class Capture:
    """Records what the language model is called with; removed afterwards."""

    def __init__(self, module: nn.Module):
        self.calls: list[dict] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


# --------------------------------------------------------------------------- full == unwrapped
@torch.no_grad()
def test_full_matches_unwrapped_batch1(model):
    assert model.model.language_model.config._attn_implementation == "sdpa"  # the default, no eager needed
    inputs = make_batch([3], [4])
    ref = model(**inputs).logits
    out = llava.wrap(model, "full")(**inputs).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@torch.no_grad()
def test_full_matches_unwrapped_left_padded_batch3(model):
    inputs = make_batch([2, 7, 4], [5, 1, 3])
    real = inputs["attention_mask"].bool()
    vlm = llava.wrap(model, "full", budget=8)  # full ignores the budget
    out = vlm(**inputs).logits
    assert out.shape == (3, inputs["input_ids"].shape[1], VOCAB)
    # same positions as HF generation -> identical computation
    ref = model(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    # default forward numbers pads too; RoPE is relative, so real tokens agree up to rounding
    ref0 = model(**inputs).logits
    torch.testing.assert_close(out[real], ref0[real], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_full_matches_unwrapped_right_padded(model):
    inputs = make_batch([2, 6], [5, 4], side="right")
    assert infer_padding_side(inputs["attention_mask"]) == "right"
    real = inputs["attention_mask"].bool()
    out = llava.wrap(model, "full")(**inputs).logits
    ref = model(**inputs).logits  # right padding: default positions are already contiguous
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_full_generate_equals_unwrapped(model):
    inputs = make_batch([2, 7, 4], [5, 1, 3])
    kw = dict(max_new_tokens=5, do_sample=False)
    ref = model.generate(**inputs, **kw)
    out = llava.wrap(model, "full").generate(**inputs, **kw)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_generate_lengths_count_the_callers_prompt(model):
    """max_length / min_length / the default refer to input_ids as given, as for the plain model."""
    inputs = make_batch([2, 7, 4], [5, 1, 3])
    length = inputs["input_ids"].shape[1]
    vlm = llava.wrap(model, create_allocator("random", seed=0), budget=8)
    assert vlm.prepare(**inputs).input_ids.shape[1] < length - 20  # the shortened prompt is much shorter
    for kw in (dict(max_length=length + 3), dict(), dict(min_length=length + 6, max_new_tokens=6)):
        ref = model.generate(**inputs, do_sample=False, **kw)
        out = vlm.generate(**inputs, do_sample=False, **kw)
        assert out.shape == ref.shape, kw
        assert torch.equal(out[:, :length], inputs["input_ids"])
    assert ref.shape[1] == length + 6
    assert model.generate(**inputs, do_sample=False).shape[1] == length + 20  # transformers' default: 20 new
    cfg = GenerationConfig(max_length=length + 2, do_sample=False, pad_token_id=PAD)
    assert vlm.generate(**inputs, generation_config=cfg).shape == (3, length + 2)
    assert cfg.max_length == length + 2  # the caller's config is not modified
    with pytest.raises(ValueError, match="max_length"):
        vlm.generate(**inputs, max_length=length)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(**inputs, max_length=length)  # the plain model refuses it too


@torch.no_grad()
def test_generate_several_sequences_per_prompt_match_the_plain_model(model):
    inputs = make_batch([2, 7, 4], [5, 1, 3])
    vlm = llava.wrap(model, "full")
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    ref = model.generate(**inputs, **beams)
    out = vlm.generate(**inputs, **beams)
    assert out.shape == ref.shape == (6, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out, ref)
    sampling = dict(max_new_tokens=5, do_sample=True, num_return_sequences=3, top_k=0, temperature=1.5)
    torch.manual_seed(11)
    ref = model.generate(**inputs, **sampling)
    torch.manual_seed(11)
    out = vlm.generate(**inputs, **sampling, return_dict_in_generate=True).sequences
    assert torch.equal(out, ref)
    assert len({tuple(r) for r in out[:3, -5:].tolist()}) > 1  # the draws differ, so the check has teeth
    # a shortening allocator: every returned row starts with its own prompt
    out = llava.wrap(model, create_allocator("random", seed=0), budget=5).generate(**inputs, **beams)
    assert out.shape == (6, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(2, dim=0))


@torch.no_grad()
def test_full_with_labels_gives_the_same_loss(model):
    inputs = make_batch([3, 6], [4, 2], side="right")
    labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == IMG) | (inputs["attention_mask"] == 0), -100)
    ref = model(**inputs, labels=labels).loss
    out = llava.wrap(model, "full")(**inputs, labels=labels).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- budgets reach the LM
@torch.no_grad()
def test_language_model_receives_exactly_k_image_positions(model):
    before, after = [2, 7, 4], [5, 1, 3]
    inputs = make_batch(before, after)
    budget = torch.tensor([4, 9, N + 5])  # the last one exceeds N: every patch (documented)
    vlm = llava.wrap(model, create_allocator("random", seed=3), budget=budget)
    with Capture(model.model.language_model) as cap:
        out = vlm(**inputs)
    assert len(cap.calls) == 1 and not model.model.language_model._forward_pre_hooks
    seen = cap.calls[0]
    emb, mask, pos = seen["inputs_embeds"], seen["attention_mask"], seen["position_ids"]
    kept = torch.tensor([4, 9, N])
    text = torch.tensor(before) + torch.tensor(after)
    assert mask.sum(1).tolist() == (text + kept).tolist()
    assert emb.shape[:2] == mask.shape == (3, int((text + kept).max()))
    assert out.logits.shape[:2] == mask.shape
    # left padded, contiguous positions over the real tokens
    for b in range(3):
        n_b = int(mask[b].sum())
        assert mask[b, -n_b:].all() and not mask[b, :-n_b].any()
        assert pos[b, -n_b:].tolist() == list(range(n_b))
    # content: text embeddings, then the projected features of the chosen patches, then text
    s = vlm.prepare(**inputs)
    feats = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    feats = torch.stack(list(feats))  # [I, N, D]
    table = model.get_input_embeddings().weight
    for b in range(3):
        n_b = int(mask[b].sum())
        row = emb[b, -n_b:]
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        a = before[b]
        idx = s.allocation.indices[b, : kept[b]]
        assert (idx >= 0).all() and (idx.diff() > 0).all()  # raster order
        torch.testing.assert_close(row[:a], table[ids[:a]])
        torch.testing.assert_close(row[a : a + kept[b]], feats[b, idx])
        torch.testing.assert_close(row[a + kept[b] :], table[ids[-after[b]:]])
    assert s.image_counts.tolist() == kept.tolist()
    assert torch.equal(s.position_ids, pos) and torch.equal(s.inputs_embeds, emb)


def test_generate_kv_cache_holds_shortened_sequence(model):
    before, after = [2, 7, 4], [5, 1, 3]
    inputs = make_batch(before, after)
    k, new = 8, 4
    vlm = llava.wrap(model, create_allocator("random", seed=0), budget=k)
    out = vlm.generate(**inputs, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    short = max(b + a + k for b, a in zip(before, after))
    assert short < inputs["input_ids"].shape[1]
    # the cache holds the shortened prompt plus every generated token but the last
    assert out.past_key_values.get_seq_length() == short + new - 1
    seq = out.sequences
    assert seq.shape == (3, inputs["input_ids"].shape[1] + new)
    assert torch.equal(seq[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    # the first new token is the argmax of the wrapper's forward on the same shortened prompt
    with torch.no_grad():
        logits = vlm(**inputs).logits
    assert torch.equal(seq[:, inputs["input_ids"].shape[1]], logits[:, -1].argmax(-1))
    # unwrapped cache for comparison: the full prompt
    ref = model.generate(**inputs, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert ref.past_key_values.get_seq_length() == inputs["input_ids"].shape[1] + new - 1


@pytest.fixture(scope="module")
def model_full_strategy() -> LlavaForConditionalGeneration:
    return tiny_llava(strategy="full")


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("name", list_allocators())
@torch.no_grad()
def test_every_registered_allocator_runs_through(model, model_full_strategy, name, strategy):
    """Strategy "default": 36 patches, no prefix; "full": the CLS goes in as a prefix token."""
    prefix = int(strategy == "full")
    model = model_full_strategy if prefix else model
    before, after = [2, 7, 4], [5, 1, 3]
    inputs = make_batch(before, after, n=N + prefix)
    allocator = create_allocator(name, **({"k": 1} if name == "fastv" else {}))  # the tiny LLM has 2 layers
    budget = torch.tensor([8, 3, 12])
    vlm = llava.wrap(model, allocator, budget=budget, query="prompt")
    with Capture(model.model.language_model) as cap:
        out = vlm(**inputs)
    s = vlm.prepare(**inputs)
    counts = s.allocation.counts
    if vlm.in_llm:  # every image token enters the LLM, the budget (CLS included) is met inside it
        assert counts.tolist() == [N] * 3 and vlm.last_in_llm.trace.mask.sum(1).tolist() == budget.tolist()
        assert out.logits.shape == (3, int((torch.tensor(before) + torch.tensor(after) + budget).max()), VOCAB)
        return
    expected = torch.full((3,), N) if name == "full" else budget
    if name == "full" or getattr(allocator, "fixed_budget", True):
        assert counts.tolist() == expected.tolist()
    else:  # adaptive: never above the budget
        assert (counts <= budget).all() and (counts >= 0).all()
    assert s.image_counts.tolist() == (counts + prefix).tolist()
    text = torch.tensor(before) + torch.tensor(after) + prefix
    # the last call to the language model is the pruned forward (an allocator may probe the LLM first)
    assert cap.calls[-1]["attention_mask"].sum(1).tolist() == (text + counts).tolist()
    assert torch.isfinite(out.logits).all()
    assert out.logits.shape == (3, int((text + counts).max()), VOCAB)


# --------------------------------------------------------------------------- layouts
@torch.no_grad()
def test_full_strategy_keeps_cls_as_prefix():
    model = tiny_llava(strategy="full")
    inputs = make_batch([3, 5], [2, 4], n=N + 1)  # CLS + 36 patches per image
    ref = model(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
    real = inputs["attention_mask"].bool()
    out = llava.wrap(model, "full")(**inputs).logits
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    k = 5
    vlm = llava.wrap(model, create_allocator("random", seed=1), budget=k)
    s = vlm.prepare(**inputs)
    assert s.image_counts.tolist() == [k + 1, k + 1]  # the CLS does not count against the budget
    feats = torch.stack(list(model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output))
    for b, a in enumerate([3, 5]):
        n_b = int(s.attention_mask[b].sum())
        row = s.inputs_embeds[b, -n_b:]
        torch.testing.assert_close(row[a], feats[b, 0])  # CLS first in the image run
        torch.testing.assert_close(row[a + 1 : a + 1 + k], feats[b, 1:][s.allocation.indices[b]])
    # without the prefix the run is exactly K
    s2 = llava.wrap(model, create_allocator("random", seed=1), budget=k, keep_prefix=False).prepare(**inputs)
    assert s2.image_counts.tolist() == [k, k]


@torch.no_grad()
def test_two_images_in_one_prompt_and_a_prompt_without_image(model):
    inputs = make_batch([3, 4, 2], [2, 3, 5], images=[2, 1, 1])
    # drop the image of the last prompt: text only (its pixel_values go too)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    text_only = torch.randint(1, IMG, (7,), generator=torch.Generator().manual_seed(5))
    ids[2], mask[2] = PAD, 0
    ids[2, -7:], mask[2, -7:] = text_only, 1
    pv = inputs["pixel_values"][:3]
    vlm = llava.wrap(model, create_allocator("random", seed=0), budget=torch.tensor([5, 6, 7]))
    s = vlm.prepare(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert s.image_rows.tolist() == [0, 0, 1]
    assert s.image_counts.tolist() == [10, 6, 0]  # per image budget; no image, no tokens
    out = vlm(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    ref = model(input_ids=text_only[None]).logits[0]
    torch.testing.assert_close(out[2, -7:], ref, atol=1e-5, rtol=1e-5)
    # full on the same batch equals the unwrapped model
    full = llava.wrap(model, "full")(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    ref_all = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=hf_positions(mask)).logits
    torch.testing.assert_close(full[mask.bool()], ref_all[mask.bool()], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input
@torch.no_grad()
def test_budget_above_image_tokens_keeps_everything(model):
    inputs = make_batch([2, 5], [3, 1])
    out = llava.wrap(model, "random", budget=10 * N)(**inputs).logits
    ref = llava.wrap(model, "full")(**inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@torch.no_grad()
def test_budget_zero_drops_the_image(model):
    inputs = make_batch([2, 5], [3, 1])
    s = llava.wrap(model, "random", budget=0).prepare(**inputs)
    assert s.image_counts.tolist() == [0, 0]
    assert not (s.input_ids == IMG).any()
    assert s.attention_mask.sum(1).tolist() == [5, 6]


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(model):
    inputs = make_batch([2, 5, 3], [3, 1, 2])
    vlm = llava.wrap(model, "random", budget=4)
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(**{**inputs, "pixel_values": inputs["pixel_values"][:2]})  # 2 images, 3 runs
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])  # placeholders, no images
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=torch.tensor([1, 2]))  # batch of 3
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=-1)
    with pytest.raises(ValueError, match="budget"):
        vlm(**inputs, budget=2.5)
    with pytest.raises(ValueError, match="attention_mask"):
        vlm(**{**inputs, "attention_mask": inputs["attention_mask"][:2]})
    with pytest.raises(ValueError, match="position_ids"):
        vlm(**inputs, position_ids=hf_positions(inputs["attention_mask"]))
    short = make_batch([2], [3], n=N - 1)  # a run one placeholder short
    with pytest.raises(ValueError, match="not a multiple"):
        vlm(**short)
    text_only = {"input_ids": torch.tensor([[5, 6, 7]]), "pixel_values": torch.randn(1, 3, 48, 48)}
    with pytest.raises(ValueError, match="pixel_values"):
        vlm(**text_only)  # an image but no placeholder
    with pytest.raises(ValueError, match="grid"):
        llava.wrap(model, "random", grid=(5, 5))(**inputs)
    with pytest.raises(ValueError, match="model"):
        llava.wrap(nn.Linear(2, 2), "random")
    with pytest.raises(ValueError, match="name"):
        llava.wrap(model, "no-such-allocator")


# --------------------------------------------------------------------------- unwrap / no side effects
@torch.no_grad()
def test_unwrap_returns_the_untouched_model(model):
    inputs = make_batch([2, 5], [3, 1])
    before = model(**inputs).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    vlm = llava.wrap(model, "random", budget=4)
    vlm(**inputs)
    vlm.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert vlm.unwrap() is model
    assert type(model) is LlavaForConditionalGeneration
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert not any(p is q for p in vlm.allocator.parameters() for q in model.parameters())
    torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)


def test_gradients_reach_the_projector(model):
    inputs = make_batch([2, 5], [3, 1])
    vlm = llava.wrap(model, create_allocator("random", seed=0), budget=6)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    model.zero_grad()
    loss = vlm(**inputs, labels=labels).loss
    loss.backward()
    grad = model.model.multi_modal_projector.linear_2.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


# --------------------------------------------------------------------------- fork hook
def test_projector_hook_for_a_fork_splicing_by_length():
    torch.manual_seed(0)
    proj = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    vision = torch.randn(2, 1 + 16, 16)  # CLS + 4x4
    full = proj(vision)
    hook = llava.hook_projector(proj, create_allocator("random", seed=0), budget=5, grid=(4, 4), num_prefix_tokens=1)
    with hook:
        out = proj(vision)
    assert out.shape == (2, 6, 32)
    torch.testing.assert_close(out[:, 0], full[:, 0])
    torch.testing.assert_close(out[:, 1:], full[:, 1:].gather(1, hook.last.indices[..., None].expand(-1, -1, 32)))
    torch.testing.assert_close(proj(vision), full)  # ejected
    assert not proj._forward_hooks


def test_projector_hook_uses_each_query_once():
    torch.manual_seed(0)
    proj = nn.Linear(8, 8)
    vision = torch.randn(2, 16, 8)
    queries = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    feats = nn.functional.linear(vision, proj.weight, proj.bias)  # the projector's output, unhooked
    expected = [create_allocator("fastv_like")(feats, query=q, budget=4, grid=(4, 4)).tokens for q in queries]
    assert not torch.equal(expected[0], expected[1])  # the two queries pick differently
    with llava.hook_projector(proj, create_allocator("fastv_like"), budget=4, grid=(4, 4)) as hook:
        for q, want in zip(queries, expected):  # each call uses the query set just before it
            hook.set_query(q)
            torch.testing.assert_close(proj(vision), want)
            assert hook.query is None  # consumed
        with pytest.raises(ValueError, match="set_query"):
            proj(vision)  # a stale query would be silently wrong: refuse
        with pytest.raises(ValueError, match="one row per image"):
            hook.set_query(queries[0][:1])
            proj(vision)
        hook.set_query(None)  # query-agnostic from now on
        assert proj(vision).shape == (2, 4, 8)
        assert proj(vision).shape == (2, 4, 8)


def test_projector_hook_rejects_ragged_counts():
    class Adaptive(Allocator):
        """Keeps 1 token for the first image and 3 for the second."""

        fixed_budget = False

        def select(self, ctx):
            return Selection(indices=topk_indices(torch.rand(ctx.batch_size, ctx.num_fine), torch.tensor([1, 3])))

    proj = nn.Linear(8, 8)
    with llava.hook_projector(proj, Adaptive(), budget=3, grid=(2, 2)):
        with pytest.raises(ValueError, match="same number"):
            proj(torch.randn(2, 4, 8))


# --------------------------------------------------------------------------- helpers (_common)
def test_compaction_plan_values():
    keep = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    left = compaction_plan(keep, padding_side="left")
    assert left.source.tolist() == [[1, 2, 4], [0, 0, 4]]
    assert left.valid.tolist() == [[True, True, True], [False, True, True]]
    right = compaction_plan(keep, padding_side="right")
    assert right.source.tolist() == [[1, 2, 4], [0, 4, 0]]
    assert right.valid.tolist() == [[True, True, True], [True, True, False]]
    x = torch.arange(10.0).reshape(2, 5)
    assert gather_sequence(x, left, fill=-1).tolist() == [[1, 2, 4], [-1, 5, 9]]
    assert position_ids_from_mask(left.valid).tolist() == [[0, 1, 2], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        compaction_plan(keep, padding_side="middle")


def test_text_query_and_budget_helpers():
    emb = torch.arange(12.0).reshape(1, 4, 3).repeat(2, 1, 1)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    q, qm = text_query(emb, mask)
    assert qm.tolist() == [[True, True, True], [True, False, False]]
    torch.testing.assert_close(q[0], emb[0, [0, 2, 3]])
    torch.testing.assert_close(q[1, 0], emb[1, 2])
    assert normalize_budget(3, 2).tolist() == [3, 3]
    assert normalize_budget([1, 2], 2).tolist() == [1, 2]
    assert normalize_budget(torch.tensor(4.0), 2).tolist() == [4, 4]
    for bad in (True, [1], [1.5, 2], -2, "x"):
        with pytest.raises(ValueError, match="budget"):
            normalize_budget(bad, 2)


def test_image_runs_and_splice():
    m = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    pos, rows = image_runs(m, 2, 3)
    assert pos.tolist() == [[1, 2], [3, 4], [3, 4]] and rows.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="pixel_values"):
        image_runs(m, 2, 2)
    emb = torch.zeros(2, 6, 1)
    tok = torch.tensor([[[7.0], [8.0]], [[9.0], [0.0]], [[5.0], [6.0]]])
    tmask = torch.tensor([[False, True], [True, False], [False, False]])
    out, keep = splice_runs(emb, torch.ones(2, 6, dtype=torch.bool), pos, rows, tok, tmask)
    assert out[..., 0].tolist() == [[0, 8, 0, 9, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert keep.tolist() == [[True, True, False, True, False, True], [True, True, True, False, False, True]]


# --------------------------------------------------------------------------- question-only query
class RecordingFull(Allocator):
    """Keeps everything and records the query it was given."""

    ignores_budget = True

    def forward(self, patch_tokens, query=None, query_mask=None, budget=64, grid=None, num_prefix_tokens=0, **kw):
        self.seen = (query, query_mask)
        return create_allocator("full")(patch_tokens, query, query_mask, budget, grid, num_prefix_tokens)


@torch.no_grad()
def test_the_query_is_the_question_only(model):
    from arr_coc.integrations.query import QuestionFinder

    header, closer = [11, 12], [13, 14]  # "USER:" ... "ASSISTANT:" of a toy template
    q0, q1 = [30, 31, 32], [40, 41]
    rows = [[1, 50, 51] + header + [IMG] * N + [7] + q0 + closer,  # system text, image, "\n", question
            header + q1 + closer]  # text only
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    mask = (torch.arange(length)[None] >= torch.tensor([length - len(r) for r in rows])[:, None]).long()
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(1, 3, 48, 48)}
    finder = QuestionFinder(headers=(tuple(header),), closer=tuple(closer), turn_end=(), image_token_id=IMG,
                            image_suffix=(7,), skip_ids=frozenset({1, IMG}))
    rec = RecordingFull()
    table = model.get_input_embeddings().weight
    ref = llava.wrap(model, "full", query="prompt")(**inputs).logits
    out = llava.wrap(model, rec, query=finder)(**inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # the query changes nothing for `full`
    query, qmask = rec.seen  # one image, of prompt 0
    assert qmask.tolist() == [[True, True, True]]
    torch.testing.assert_close(query[0], table[q0])
    # an explicit per-call mask wins; a callable works like a finder
    explicit = torch.zeros_like(mask, dtype=torch.bool)
    explicit[0, -2:] = True
    llava.wrap(model, rec, query=finder)(**inputs, query_mask=explicit)
    torch.testing.assert_close(rec.seen[0][0], table[closer])
    llava.wrap(model, rec, query=lambda i, m: (i == 50) | (i == 51)).generate(**inputs, max_new_tokens=1)
    torch.testing.assert_close(rec.seen[0][0], table[[50, 51]])
    with pytest.warns(UserWarning, match="processor"):
        llava.wrap(model, "full")
    with pytest.raises(ValueError, match="processor"):
        llava.wrap(model, "full", query="question")
    with pytest.raises(ValueError, match="query_mask"):
        llava.wrap(model, rec, query=finder)(**inputs, query_mask=explicit[:, 1:])
