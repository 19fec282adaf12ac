"""Offline fixtures for the lmms-eval path: tiny random hosts and the embedded task as an lmms-eval task.

Nothing here downloads. The hosts have random weights (their answers are noise); they exist
to run ``python -m lmms_eval --model arr_coc_llava ...`` end to end on a laptop:

```bash
python -m arr_coc.integrations.lmms_eval.tiny /tmp/lmms_tiny          # models + task
python -m lmms_eval --model arr_coc_llava \\
    --model_args pretrained=/tmp/lmms_tiny/llava,allocator=arr_coc,budget=16,device=cpu \\
    --tasks arr_coc_vqa_gen,arr_coc_vqa_mc --include_path /tmp/lmms_tiny/tasks --limit 8 \\
    --output_path /tmp/lmms_tiny/results
```

- :func:`build_tokenizer`: a word-level tokenizer trained with ``tokenizers`` on the task's
  words, the chat-template words and both families' special tokens.
- :func:`save_tiny_llava` / :func:`save_tiny_qwen_vl`: a random
  ``LlavaForConditionalGeneration`` (CLIP tower, 64 px images, 8 px patches: 64 image tokens)
  or Qwen2-VL / Qwen2.5-VL / Qwen3-VL (images resized to 32 x 32, 2 px patches merged 2 x 2:
  64 visual tokens), saved with a processor that ``AutoProcessor`` loads back.
- :func:`export_vqa_task`: questions of :class:`arr_coc.training.task.VQATask` as a parquet
  file (``image``, ``question``, ``answer``, ``choices``, ``label``) and two lmms-eval task
  YAMLs over it (the ``datasets`` cache goes beside the file): ``arr_coc_vqa_gen``
  (``generate_until``, exact match) and ``arr_coc_vqa_mc`` (``multiple_choice`` over the
  answer words, accuracy from log-likelihoods).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "LLAVA_TEMPLATE",
    "QWEN_TEMPLATE",
    "build_tokenizer",
    "export_vqa_task",
    "save_tiny_llava",
    "save_tiny_qwen2_vl",
    "save_tiny_qwen_vl",
]

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# the LLaVA-1.5 (Vicuna) layout and the Qwen chat layout, over structured message content
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_WORDS = "USER ASSISTANT : system user assistant You are a helpful . Answer with one word"
PROMPT_SUFFIX = "\nAnswer with one word ."


def build_tokenizer():
    """A ``PreTrainedTokenizerFast`` (word level) over the task's words and both chat layouts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from arr_coc.training.task import VQATask

    words = VQATask(0).vocabulary() + CHAT_WORDS.split()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )
    return fast


def save_tiny_llava(path: str | Path, *, seed: int = 0) -> Path:
    """A random 2-layer LLaVA (CLIP tower 64 px / 8 px patches, Llama LM) + processor under ``path``."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    path = Path(path)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text,
                      image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


#: Qwen-VL family -> (model config class, model class, processor class, video processor class)
QWEN_FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def save_tiny_qwen_vl(path: str | Path, family: str = "qwen2_vl", *, seed: int = 0) -> Path:
    """A random 2-layer Qwen2-VL / Qwen2.5-VL / Qwen3-VL + processor under ``path``.

    Images are resized to 32 x 32 and cut into 2 px patches merged 2 x 2 (64 visual tokens).
    """
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor

    if family not in QWEN_FAMILIES:
        raise ValueError(f"family: expected one of {sorted(QWEN_FAMILIES)}, got {family!r}")
    config_cls, model_cls, processor_cls, video_cls = (getattr(transformers, n) for n in QWEN_FAMILIES[family])
    path = Path(path)
    tokenizer = build_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    torch.manual_seed(seed)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, rope_parameters=rope)
    patches = dict(patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, **patches)
    elif family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                      window_size=8, fullatt_block_indexes=[1], **patches)
    else:
        text.update(head_dim=8, rope_parameters=dict(rope, mrope_interleaved=True))
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1], **patches)
    model = model_cls(config_cls(text_config=text, vision_config=vision, **ids)).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    pixels = dict(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=2, temporal_patch_size=2, merge_size=2)
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                              video_processor=video_cls(**pixels), chat_template=QWEN_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_tiny_qwen2_vl(path: str | Path, *, seed: int = 0) -> Path:
    """:func:`save_tiny_qwen_vl` for Qwen2-VL."""
    return save_tiny_qwen_vl(path, "qwen2_vl", seed=seed)


def _task_yaml(name: str, data: Path, output_type: str) -> str:
    head = (
        f"task: {name}\n"
        "dataset_path: parquet\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data}\n"
        f"  cache_dir: {data.parent / '.datasets_cache'}\n"
        "test_split: test\n"
        f"output_type: {output_type}\n"
        "doc_to_visual: image\n"
        "doc_to_text: \"{{question}}" + PROMPT_SUFFIX.replace("\n", "\\n") + "\"\n"
    )
    if output_type == "generate_until":
        body = (
            "doc_to_target: answer\n"
            "generation_kwargs:\n"
            "  max_new_tokens: 4\n"
            "  temperature: 0\n"
            "  do_sample: false\n"
            "  until: [\"</s>\", \"<|im_end|>\"]\n"
            "metric_list:\n"
            "  - metric: exact_match\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "    ignore_case: true\n"
            "    ignore_punctuation: true\n"
        )
    else:
        body = (
            "doc_to_choice: choices\n"
            "doc_to_target: label\n"
            "metric_list:\n"
            "  - metric: acc\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
    return head + body + "metadata:\n  version: 0.0\n"


def export_vqa_task(
    folder: str | Path, *, num_questions: int = 16, seed: int = 123, num_choices: int = 4
) -> Path:
    """The embedded VQA task as an lmms-eval task folder (give it to ``--include_path``).

    Writes ``vqa.parquet`` (``num_questions`` questions from ``VQATask(seed)``: the 64 px
    image, question, answer, ``num_choices`` answer words with the answer among them, the
    answer's index ``label``) and ``arr_coc_vqa_gen.yaml`` / ``arr_coc_vqa_mc.yaml``.
    Returns the folder.
    """
    import datasets
    import numpy as np
    from PIL import Image

    from arr_coc.training.task import VQATask

    if num_questions < 1:
        raise ValueError(f"num_questions: expected >= 1, got {num_questions}")
    task = VQATask(seed)
    words = task.answer_words()
    if not 2 <= num_choices <= len(words):
        raise ValueError(f"num_choices: expected 2..{len(words)}, got {num_choices}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"image": [], "question": [], "answer": [], "choices": [], "label": [], "qtype": []}
    for i in range(num_questions):
        ex = task.example(i)
        pixels = (ex.image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        others = [w for w in words if w != ex.answer]
        choices = [ex.answer] + list(rng.choice(others, size=num_choices - 1, replace=False))
        order = rng.permutation(num_choices)
        choices = [choices[j] for j in order]
        rows["image"].append(Image.fromarray(pixels))
        rows["question"].append(ex.question)
        rows["answer"].append(ex.answer)
        rows["choices"].append(choices)
        rows["label"].append(int(choices.index(ex.answer)))
        rows["qtype"].append(ex.qtype)
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "label": datasets.Value("int64"),
        "qtype": datasets.Value("string"),
    })
    data = folder / "vqa.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data))
    for name, kind in (("arr_coc_vqa_gen", "generate_until"), ("arr_coc_vqa_mc", "multiple_choice")):
        (folder / f"{name}.yaml").write_text(_task_yaml(name, data.resolve(), kind))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for llava/, qwen2_vl/ and tasks/")
    parser.add_argument("--num-questions", type=int, default=16)
    args = parser.parse_args(argv)
    save_tiny_llava(args.out / "llava")
    save_tiny_qwen2_vl(args.out / "qwen2_vl")
    export_vqa_task(args.out / "tasks", num_questions=args.num_questions)
    print(f"wrote {args.out}/llava, {args.out}/qwen2_vl and {args.out}/tasks")


if __name__ == "__main__":
    main()
