"""LLaVA conversation format: export the embedded task, read it back, and batch it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from arr_coc.training.datamodule import (
    EmbeddedVQADataModule,
    LlavaDataModule,
    VQACollator,
)
from arr_coc.training.llava_data import (
    IMAGE_TOKEN,
    LlavaDataset,
    export_llava,
    read_llava_json,
)
from arr_coc.training.task import VQATask
from arr_coc.training.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def task():
    return VQATask(seed=5)


def test_round_trip_through_the_datamodule(task, tmp_path):
    dm_ref = EmbeddedVQADataModule(task, train_size=12, val_size=0, batch_size=4)
    examples = [dm_ref.split("train")[i] for i in range(12)]
    json_path = export_llava(examples, tmp_path / "llava")
    records = json.loads(json_path.read_text())
    assert len(records) == 12
    first = records[0]["conversations"]
    assert first[0]["from"] == "human" and first[0]["value"].startswith(IMAGE_TOKEN)
    assert first[1] == {"from": "gpt", "value": examples[0]["answer"]}

    ds = LlavaDataset(json_path, tmp_path / "llava")
    assert len(ds) == 12
    for ex, got in zip(examples, ds):
        assert got["question"] == ex["question"] and got["answer"] == ex["answer"]
        assert got["question_type"] == ex["question_type"]
        assert torch.equal(got["relevance"], ex["relevance"])
        # 8-bit PNG: every pixel within half a grey level
        assert (got["image"] - ex["image"]).abs().max().item() <= 0.5 / 255 + 1e-6

    tok = build_tokenizer(task)
    dm = LlavaDataModule(json_path, tmp_path / "llava", tok, val_fraction=0.25, batch_size=4, image_size=64)
    assert len(dm.split("train")) == 9 and len(dm.split("val")) == 3
    assert [dm.split("val")[i]["question"] for i in range(3)] == [e["question"] for e in examples[9:]]
    dm = LlavaDataModule(json_path, tmp_path / "llava", tok, val_fraction=0.0, batch_size=4, image_size=64)
    ref_loader = dm_ref._loader(dm_ref.split("train"), train=False)
    got_loader = dm._loader(dm.split("train"), train=False)
    assert len(got_loader) == len(ref_loader) == 3
    for ref, got in zip(ref_loader, got_loader):
        assert set(got) == set(ref)
        for key in ("question_ids", "question_mask", "answer", "relevance", "question_type"):
            assert torch.equal(got[key], ref[key]), key
        torch.testing.assert_close(got["pixels"], ref["pixels"], atol=0.5 / 255 + 1e-6, rtol=0)
    # the training loader is a seeded shuffle of the same examples
    ids = torch.cat([b["answer"] for b in dm.train_dataloader()])
    assert sorted(ids.tolist()) == sorted(torch.cat([b["answer"] for b in got_loader]).tolist())


def test_multi_turn_records_other_image_sizes_and_shared_images(task, tmp_path):
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(folder / "img" / "a.jpg")
    records = [
        {
            "id": "a",
            "image": "img/a.jpg",
            "conversations": [
                {"from": "human", "value": "what shape is the red object ?\n<image>"},
                {"from": "gpt", "value": "circle"},
                {"from": "human", "value": "how many squares are there ?"},
                {"from": "gpt", "value": "two"},
            ],
        }
    ]
    (folder / "conv.json").write_text(json.dumps(records))
    ds = LlavaDataset(folder / "conv.json", folder, image_size=64)
    assert len(ds) == 2
    assert ds[0]["question"] == "what shape is the red object ?" and ds[1]["answer"] == "two"
    assert ds[0]["image"].shape == (3, 64, 64) and "relevance" not in ds[0]
    assert len(LlavaDataset(folder / "conv.json", folder, first_turn_only=True)) == 1
    assert LlavaDataset(folder / "conv.json", folder)[0]["image"].shape == (3, 40, 50)

    # examples that share an image_id become turns of one record with one image file
    ex = [dict(task.example(0).__dict__, question_type="shape", image_id="s0") for _ in range(2)]
    ex[1]["question"] = "how many circles are there ?"
    path = export_llava(ex, tmp_path / "shared")
    recs = read_llava_json(path)
    assert len(recs) == 1 and len(recs[0]["conversations"]) == 4
    assert IMAGE_TOKEN not in recs[0]["conversations"][2]["value"]
    assert [e["question"] for e in LlavaDataset(path, tmp_path / "shared")] == [e["question"] for e in ex]


@pytest.mark.parametrize(
    "records, match",
    [
        ({"image": "x.png"}, "JSON list"),
        ([{"image": "x.png"}], "conversations"),
        ([{"conversations": []}], "image"),
        ([{"image": "x.png", "conversations": [{"from": "human", "value": "<image> q"}]}], "alternating"),
        ([{"image": "x.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], "<image>"),
        ([{"image": "x.png", "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "human", "value": "a"}]}], "human turn"),
    ],
)
def test_malformed_files_are_refused_with_a_reason(tmp_path, records, match):
    (tmp_path / "c.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match=match):
        LlavaDataset(tmp_path / "c.json", tmp_path)


def test_missing_files_and_unknown_answers(task, tmp_path):
    with pytest.raises(ValueError, match="json_path"):
        LlavaDataset(tmp_path / "nope.json", tmp_path)
    rec = [{"image": "gone.png", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "c.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="missing file"):
        LlavaDataset(tmp_path / "c.json", tmp_path)[0]
    collate = VQACollator(build_tokenizer(task))
    item = {"image": torch.zeros(3, 8, 8), "question": "what shape is the red object ?", "answer": "dodecahedron"}
    with pytest.raises(ValueError, match="dodecahedron"):
        collate([item])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        export_llava([dict(item, answer="circle", image=torch.full((3, 8, 8), 2.0))], tmp_path / "bad")


# ------------------------------------------------------------------ whole conversations (real hosts)
def _hosts():
    pytest.importorskip("transformers")
    from tests.training import test_hosts

    return test_hosts


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_whole_conversations_label_every_assistant_turn(family, tmp_path):
    from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset

    th = _hosts()
    build, px, end, n_image = (
        (th.tiny_llava, th.LLAVA_PX, "</s>", 36) if family == "llava" else (th.tiny_qwen2_vl, th.QWEN_PX, "<|im_end|>", 16)
    )
    _, proc = build()
    tok = proc.tokenizer
    path = th.write_conversations(tmp_path, size=40)
    ds = LlavaConversationDataset(path, tmp_path, image_size=px)
    assert len(ds) == len(th.RECORDS) and ds[0]["image"].shape == (3, px, px)
    assert ds[0]["turns"] == [("what shape is the red object ?", "circle"), ("how many blue object ?", "two")]
    assert ds[0]["image_text"] == ("", "what shape is the red object ?")
    assert ds[1]["image_text"] == ("what colour is the square ?", "")
    batch = ChatCollator(proc)([ds[i] for i in range(len(ds))])
    image_id = tok.convert_tokens_to_ids(proc.image_token)
    for b, rec in enumerate(th.RECORDS):
        ids, labels, mask = batch["input_ids"][b], batch["labels"][b], batch["attention_mask"][b].bool()
        answers = [t["value"] for t in rec["conversations"][1::2]]
        questions = [" ".join(t["value"].replace("<image>", " ").split()) for t in rec["conversations"][0::2]]
        # the targets: every answer and its end-of-turn token, in order; nothing else
        expected = tok(" ".join(f"{a} {end}" for a in answers), add_special_tokens=False)["input_ids"]
        assert labels[labels != -100].tolist() == expected
        assert torch.equal(ids[labels != -100], labels[labels != -100])
        assert ((labels != -100) <= mask).all()
        # one contiguous image run of the host's size, before or after the question's words
        cols = (ids == image_id).nonzero().flatten()
        assert cols.numel() == n_image and int(cols[-1] - cols[0]) == n_image - 1
        first_word = tok.convert_tokens_to_ids(questions[0].split()[0])
        word_col = int((ids == first_word).nonzero()[0])
        assert (word_col > cols[-1]) == rec["conversations"][0]["value"].startswith("<image>")
        # the query: the user's questions only
        q = batch["question_ids"][b][batch["question_mask"][b]]
        assert q.tolist() == tok("\n".join(questions), add_special_tokens=False)["input_ids"]
    if family == "qwen2_vl":
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 4 and batch["pixel_values"].shape == (4 * 64, 24)
    else:
        assert batch["pixel_values"].shape == (4, 3, px, px)


def test_conversation_relevance_truncation_and_the_data_config_entry(tmp_path):
    from arr_coc.training.chat_datamodule import LlavaChatDataModule, llava_data_module
    from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset

    th = _hosts()
    _, proc = th.tiny_llava()
    rec = dict(th.RECORDS[0], relevance=[[[1, 0], [0, 0]], [[0, 0], [0, 1]]])
    path = th.write_conversations(tmp_path, records=[rec, th.RECORDS[1]])
    ds = LlavaConversationDataset(path, tmp_path, image_size=th.LLAVA_PX)
    assert ds[0]["relevance"].tolist() == [[True, False], [False, True]] and "relevance" not in ds[1]
    full = ChatCollator(proc)([ds[0]])
    cut = ChatCollator(proc, max_length=40)([ds[0]])
    assert cut["input_ids"].shape[1] == 40 and torch.equal(cut["input_ids"], full["input_ids"][:, :40])
    with pytest.raises(ValueError, match="max_length"):
        ChatCollator(proc, max_length=20)([ds[0]])
    # a template whose turns do not extend each other cannot locate the answers
    last_only = "{{ messages[-1]['content'][-1].get('text', '') }}"
    with pytest.raises(ValueError, match="chat_template"):
        ChatCollator(proc, chat_template=last_only)([ds[0]])
    # conf/data/llava.yaml's entry: a processor -> whole conversations, none -> one-word turns
    dm = llava_data_module(train_json=path, image_folder=tmp_path, processor=proc, image_size=th.LLAVA_PX,
                           val_fraction=0.5, batch_size=2, tokenizer=None)
    assert isinstance(dm, LlavaChatDataModule) and len(dm.split("train")) == 1 and len(dm.split("val")) == 1
    assert set(next(iter(dm.train_dataloader()))) >= {"input_ids", "labels", "pixel_values", "question_ids"}
    plain = llava_data_module(train_json=path, image_folder=tmp_path, tokenizer=proc.tokenizer, batch_size=2)
    assert type(plain) is LlavaDataModule and len(plain.split("train")) + len(plain.split("val")) == 3
    with pytest.raises(ValueError, match="first_turn_only"):
        llava_data_module(train_json=path, image_folder=tmp_path, processor=proc, first_turn_only=True)


@pytest.mark.parametrize(
    "conversations, match",
    [
        ([{"from": "human", "value": "<image> <image> q"}, {"from": "gpt", "value": "a"}], "exactly one"),
        ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"},
          {"from": "human", "value": "<image> r"}, {"from": "gpt", "value": "b"}], "turn 2"),
        ([{"from": "human", "value": "<image> q"}], "alternating"),
    ],
)
def test_malformed_conversations_are_refused(tmp_path, conversations, match):
    from arr_coc.training.llava_data import LlavaConversationDataset

    (tmp_path / "c.json").write_text(json.dumps([{"image": "x.png", "conversations": conversations}]))
    with pytest.raises(ValueError, match=match):
        LlavaConversationDataset(tmp_path / "c.json", tmp_path)


# the chat templates the hosts ship (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2-VL-7B-Instruct chat_template.json)
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_the_published_chat_templates_label_exactly_the_answers(family, tmp_path):
    from arr_coc.training.llava_data import ChatCollator, LlavaConversationDataset

    th = _hosts()
    build, px, template, end = (
        (th.tiny_llava, th.LLAVA_PX, LLAVA_15_TEMPLATE, "") if family == "llava"
        else (th.tiny_qwen2_vl, th.QWEN_PX, QWEN2_VL_TEMPLATE, " <|im_end|>")
    )
    _, proc = build()
    ds = LlavaConversationDataset(th.write_conversations(tmp_path), tmp_path, image_size=px)
    collate = ChatCollator(proc, chat_template=template)
    pieces = collate.segments(ds[0]["turns"], ds[0]["image_text"])
    assert [p for p, is_answer in pieces if is_answer] == (
        [" circle ", " two "] if family == "llava" else ["circle<|im_end|>\n", "two<|im_end|>\n"]
    )
    batch = collate([ds[0], ds[2]])
    for b, answers in enumerate([["circle", "two"], ["three", "one blue circle"]]):
        labels = batch["labels"][b]
        expected = proc.tokenizer(" ".join(a + end for a in answers), add_special_tokens=False)["input_ids"]
        assert labels[labels != -100].tolist() == expected
