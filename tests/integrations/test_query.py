"""Question-only queries: QuestionFinder on the chat template of every supported family.

Oracle: the rendered prompt's own characters. The question's character span is known (it
is the text we put in), so the expected mask is "the tokens whose offsets overlap the
question", computed by the tokenizer on the prompt with the image placeholders expanded
as the processors expand them. The finder sees only the token ids.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from _templates import FAMILIES  # noqa: E402

from arr_coc.integrations.query import QuestionFinder, resolve_query_mask  # noqa: E402

N_IMAGE = 5  # placeholders per image after expansion
SYSTEM = "You are a helpful assistant. Answer yes or no."


def _user(text: str, image: bool = True, image_last: bool = False) -> dict:
    parts = [{"type": "text", "text": text}]
    img = [{"type": "image"}] if image else []
    return {"role": "user", "content": parts + img if image_last else img + parts}


CASES = {
    "image_then_question": ([_user("How many red cubes are left of the blue sphere?")], "How many red cubes are left of the blue sphere?"),
    "with_system_prompt": ([{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                            _user("Is there a dog on the sofa?")], "Is there a dog on the sofa?"),
    "text_only": ([_user("What is the answer?", image=False)], "What is the answer?"),
    "second_turn": ([_user("Describe the picture in detail."),
                     {"role": "assistant", "content": [{"type": "text", "text": "It is a cat."}]},
                     _user("What is shown in this image?", image=False)], "What is shown in this image?"),
}


def _encode(tok, text: str, question: str, placeholder: str) -> tuple[list[int], list[bool]]:
    """ids of the prompt with placeholders expanded, and the oracle mask of the question's tokens."""
    text = text.replace(placeholder, placeholder * N_IMAGE)
    a = text.rfind(question)
    assert a >= 0
    b = a + len(question)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    want = [s < b and e > a for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), want


def _batch(family: str, cases: list[str]):
    template, build, placeholder = FAMILIES[family]
    tok = build(template)
    rows, wants = [], []
    for name in cases:
        messages, question = CASES[name]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids, want = _encode(tok, text, question, placeholder)
        if family.startswith("llava"):
            ids, want = [tok.bos_token_id] + ids, [False] + want  # the processor adds <s>
        rows.append(ids)
        wants.append(want)
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tok.pad_token_id)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    want = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (r, w) in enumerate(zip(rows, wants)):  # left padding, as for generation
        ids[i, length - len(r):], mask[i, length - len(r):], want[i, length - len(r):] = torch.tensor(r), 1, torch.tensor(w)
    return tok, placeholder, ids, mask, want


@pytest.mark.parametrize("family", list(FAMILIES))
def test_question_only_on_every_family(family):
    cases = list(CASES)
    tok, placeholder, ids, mask, want = _batch(family, cases)
    finder = QuestionFinder.from_chat_template(tok, image_token=placeholder)
    got = finder(ids, mask)
    assert want.sum(1).min() >= 3  # every row has a question of several tokens
    for b in range(len(cases)):
        assert got[b].tolist() == want[b].tolist(), (family, cases[b], tok.convert_ids_to_tokens(ids[b][got[b]]))
    # none of the template, system prompt or image tokens is in the query
    img_id = tok.convert_tokens_to_ids(placeholder)
    assert not got[ids == img_id].any() and not got[mask == 0].any()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_image_after_the_text_and_two_images(family):
    template, build, placeholder = FAMILIES[family]
    tok = build(template)
    q = "Is there a dog on the sofa?"
    msg = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}, {"type": "image"}]}
    text = tok.apply_chat_template([msg], tokenize=False, add_generation_prompt=True)
    ids, want = _encode(tok, text, q, placeholder)
    got = QuestionFinder.from_chat_template(tok, image_token=placeholder)(torch.tensor([ids]))
    assert got[0].tolist() == want


def test_from_processor_uses_its_tokenizer_and_template():
    template, build, placeholder = FAMILIES["qwen2_vl"]
    tok = build(None)

    class Processor:  # the three attributes a transformers processor has
        tokenizer = tok
        chat_template = template
        image_token = placeholder

    finder = QuestionFinder.from_processor(Processor())
    assert finder == QuestionFinder.from_chat_template(build(template), image_token=placeholder)
    with pytest.raises(ValueError, match="chat_template"):
        QuestionFinder.from_chat_template(tok)


def test_a_row_without_the_template_raises_and_explicit_masks_win():
    tok, placeholder, ids, mask, want = _batch("qwen2_vl", ["image_then_question"])
    finder = QuestionFinder.from_chat_template(tok, image_token=placeholder)
    # without the generation prompt (training prompts, or add_generation_prompt=False): same question
    gen = len(tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert torch.equal(finder(ids[:, :-gen], mask[:, :-gen]), want[:, :-gen])
    with pytest.raises(ValueError, match="example 0.*query_mask"):
        finder(ids[:, : -gen - 2], mask[:, : -gen - 2])  # the user's turn does not end
    text_mask = mask.bool() & (ids != tok.convert_tokens_to_ids(placeholder))
    assert torch.equal(resolve_query_mask(finder, ids, mask, text_mask), want)
    assert torch.equal(resolve_query_mask("prompt", ids, mask, text_mask), text_mask)
    explicit = torch.zeros_like(want)
    explicit[0, -1] = True
    assert torch.equal(resolve_query_mask(finder, ids, mask, text_mask, explicit=explicit), explicit)
    assert torch.equal(resolve_query_mask(lambda i, m: i == ids[0, -1], ids, mask, text_mask), (ids == ids[0, -1]) & text_mask)
    with pytest.raises(ValueError, match="query_mask"):
        resolve_query_mask(finder, ids, mask, text_mask, explicit=explicit[:, 1:])
    with pytest.raises(ValueError, match="query"):
        resolve_query_mask("everything", ids, mask, text_mask)
