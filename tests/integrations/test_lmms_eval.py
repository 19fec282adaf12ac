"""lmms-eval path end to end, offline: tiny random LLaVA / Qwen2-VL saved under tmp_path, the
embedded VQA task exported as a local lmms-eval task, run with ``--limit``.

Oracles: the plain host (``unwrapped=true`` runs the same requests without the plug-in):
with ``allocator=full`` the generations must be equal and the log-likelihoods equal to
float tolerance; the log-likelihood is checked against a direct computation from the plain
model's logits; the CLI run must write lmms-eval's results file with each task's metric.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")
transformers = pytest.importorskip("transformers")

from arr_coc.integrations.lmms_eval import MODEL_CLASSES  # noqa: E402
from arr_coc.integrations.lmms_eval.base import parse_allocator_kwargs, parse_budget  # noqa: E402
from arr_coc.integrations.lmms_eval.qwen_vl import MODEL_TYPES  # noqa: E402
from arr_coc.integrations.lmms_eval.tiny import (  # noqa: E402
    export_vqa_task,
    save_tiny_llava,
    save_tiny_qwen2_vl,
    save_tiny_qwen_vl,
)

LIMIT = 4
transformers.utils.logging.disable_progress_bar()
QWEN_PIXELS = dict(min_pixels=32 * 32, max_pixels=32 * 32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmms")
    return {
        "llava": save_tiny_llava(root / "llava"),
        "qwen2_vl": save_tiny_qwen2_vl(root / "qwen2_vl"),
        "tasks": export_vqa_task(root / "tasks", num_questions=LIMIT),
        "root": root,
    }


def _model(name: str, path: Path, **kwargs):
    from lmms_eval.models import get_model

    extra = QWEN_PIXELS if name == "arr_coc_qwen_vl" else {}
    return get_model(name)(pretrained=str(path), device="cpu", **extra, **kwargs)


@pytest.fixture(scope="module")
def task_manager(tiny):
    from lmms_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as mp:  # lmms-eval's datasets cache under tmp, not ~/.cache
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(tiny["root"] / "datasets_cache"))
        # only the local tasks: indexing lmms-eval's own ~1,000 task files takes ~20 s here
        yield TaskManager("ERROR", include_path=str(tiny["tasks"]), include_defaults=False)


def _evaluate(model, task_manager, model_args: str | None = None) -> dict:
    """lmms-eval's Python entry with a model object, or a model name and its ``--model_args`` string."""
    from lmms_eval.evaluator import simple_evaluate

    return simple_evaluate(
        model=model, model_args=model_args, tasks=["arr_coc_vqa_gen", "arr_coc_vqa_mc"], limit=LIMIT,
        log_samples=True, task_manager=task_manager, bootstrap_iters=0, batch_size=2, device="cpu",
        process_docs_parallel=1,
    )


def _responses(results: dict, task: str) -> list:
    """Per document (in order) the filtered responses: [text] for generation, [(nll, greedy)] * choices."""
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _check_metrics(res: dict) -> None:
    assert set(res["results"]) == {"arr_coc_vqa_gen", "arr_coc_vqa_mc"}
    assert 0.0 <= res["results"]["arr_coc_vqa_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= res["results"]["arr_coc_vqa_mc"]["acc,none"] <= 1.0
    assert res["n-samples"]["arr_coc_vqa_gen"]["effective"] == LIMIT
    assert len(res["samples"]["arr_coc_vqa_mc"]) == LIMIT


# ---------------------------------------------------------------------------- arguments
def test_entry_points_register_both_models():
    from lmms_eval.models import get_model, list_available_models

    names = list_available_models()
    for model_id, path in MODEL_CLASSES.items():
        assert model_id in names
        cls = get_model(model_id)
        assert f"{cls.__module__}.{cls.__name__}" == path


def test_budget_and_allocator_arguments():
    assert parse_budget(None) is None and parse_budget("none") is None
    assert parse_budget(64) == 64 and parse_budget(0) == 0
    assert parse_budget(0.25) == 0.25 and parse_budget(1.0) == 1.0
    for bad in (-1, 1.5, 0.0, True, "many"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    assert parse_allocator_kwargs({"levels": "[1,2]", "alpha": 0.5, "price": "none", "kernel": "rbf"}) == {
        "levels": (1, 2), "alpha": 0.5, "price": None, "kernel": "rbf"}


def test_model_arguments_reach_the_allocator_and_the_budget(tiny):
    lm = _model("arr_coc_llava", tiny["llava"], allocator="visionzip", budget=0.25, contextual_ratio=0.25)
    assert lm.allocator_module.contextual_ratio == 0.25
    lm = _model("arr_coc_llava", tiny["llava"], allocator="arr_coc", budget=0.25, kernel="rbf", levels="[1,2]")
    assert lm.allocator_module.kernel == "rbf" and list(lm.allocator_module.pyramid_levels) == [1, 2]
    assert lm.num_image_tokens() == 64 and lm.budget_tokens == 16  # 0.25 of the 8 x 8 patches
    assert lm.vlm.budget == 16
    with pytest.raises(ValueError, match="allocator"):
        _model("arr_coc_llava", tiny["llava"], allocator="nope")
    with pytest.raises(ValueError, match="model_args"):
        _model("arr_coc_llava", tiny["llava"], allocator="full", not_a_keyword=3)
    with pytest.raises(ValueError, match="pretrained"):
        _model("arr_coc_qwen_vl", tiny["llava"])  # a LLaVA checkpoint given to the Qwen model


def test_allocator_checkpoint_loads_the_trained_allocator(tiny):
    from arr_coc.allocators import create_allocator
    from arr_coc.training.hub import save_allocator

    config = {"vision_dim": 64, "query_dim": 64, "relevance_dim": 16}  # the tiny LLaVA's width
    trained = create_allocator("arr_coc", **config)
    with torch.no_grad():  # "train" it: weights no fresh allocator has
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    folder = save_allocator(trained, tiny["root"] / "trained_arr_coc", name="arr_coc", config=config)
    lm = _model("arr_coc_llava", tiny["llava"], allocator_checkpoint=str(folder), budget=16)
    loaded = lm.allocator_module.state_dict()
    expected = trained.state_dict()
    assert type(lm.allocator_module).__name__ == type(trained).__name__ and loaded.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(loaded[k].cpu(), expected[k], rtol=0, atol=0)
    from PIL import Image

    image = Image.new("RGB", (64, 64), (20, 200, 30))
    inputs = lm._encode([lm._prompt("what shape is the green object ?", [image])], [[image]])
    assert lm.vlm.prepare(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]).image_counts.tolist() == [16]
    with pytest.raises(ValueError, match="allocator_checkpoint"):
        _model("arr_coc_llava", tiny["llava"], allocator_checkpoint=str(folder), alpha=0.5)


# ---------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("name,key", [("arr_coc_llava", "llava"), ("arr_coc_qwen_vl", "qwen2_vl")])
def test_full_allocator_gives_the_plain_models_answers(tiny, task_manager, name, key):
    # one model object per run: lmms-eval's evaluator frees the model's modules when done
    wrapped = _evaluate(_model(name, tiny[key], allocator="full", batch_size=2), task_manager)
    plain = _evaluate(_model(name, tiny[key], allocator="full", batch_size=2, unwrapped=True), task_manager)
    _check_metrics(wrapped)
    _check_metrics(plain)
    gen_w, gen_p = _responses(wrapped, "arr_coc_vqa_gen"), _responses(plain, "arr_coc_vqa_gen")
    assert gen_w == gen_p
    assert all(len(r) == 1 and isinstance(r[0], str) for r in gen_w)
    mc_w, mc_p = _responses(wrapped, "arr_coc_vqa_mc"), _responses(plain, "arr_coc_vqa_mc")
    assert len(mc_w) == LIMIT and all(len(r) == 4 for r in mc_w)  # four choices per question
    for rw, rp in zip(mc_w, mc_p):
        for (nll_w, greedy_w), (nll_p, greedy_p) in zip(rw, rp):
            assert math.isclose(float(nll_w), float(nll_p), rel_tol=1e-4, abs_tol=1e-4)
            assert greedy_w == greedy_p
    assert wrapped["results"]["arr_coc_vqa_mc"]["acc,none"] == plain["results"]["arr_coc_vqa_mc"]["acc,none"]


def test_loglikelihood_is_the_continuations_negative_log_probability(tiny):
    """One request by hand: -sum log p(continuation tokens) from the plain model's logits."""
    from lmms_eval.api.instance import GenerationResult, Instance
    from PIL import Image

    lm = _model("arr_coc_llava", tiny["llava"], allocator="arr_coc", budget=64)
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    req = Instance("loglikelihood", ("what colour is the square ?", " red", lambda d: [d["image"]], 0, "t", "test"),
                   idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})
    (out,) = lm.loglikelihood([req])
    assert isinstance(out, GenerationResult)  # lmms-eval 0.7.3 keeps only strings and these intact
    nll, greedy = out.text
    prompt = lm._prompt("what colour is the square ?", [image])
    ctx = lm.processor(text=[prompt], images=[image], return_tensors="pt")
    full = lm.processor(text=[prompt + " red"], images=[image], return_tensors="pt")
    n = full["input_ids"].shape[1] - ctx["input_ids"].shape[1]
    assert n == 1  # " red" is one word of the tiny tokenizer
    with torch.inference_mode():
        logits = lm.model(**full).logits[0].double()  # budget 64 = all 64 patches: the plain sequence
    expected = -torch.log_softmax(logits[-2], -1)[full["input_ids"][0, -1]].item()
    assert math.isclose(nll, expected, rel_tol=1e-4)
    assert greedy == bool(logits[-2].argmax() == full["input_ids"][0, -1])


@pytest.mark.parametrize("name,key,args", [
    ("arr_coc_llava", "llava", "allocator=arr_coc,budget=16,alpha=0.5"),
    ("arr_coc_qwen_vl", "qwen2_vl", "allocator=divprune,budget=0.25,min_pixels=1024,max_pixels=1024"),
])
def test_model_by_name_and_model_args_string(tiny, task_manager, name, key, args):
    """What ``--model NAME --model_args ...`` does: the entry point, then ``create_from_arg_string``."""
    res = _evaluate(name, task_manager, model_args=f"pretrained={tiny[key]},{args}")
    _check_metrics(res)
    assert res["config"]["model"] == name


def _docs(n: int = 3) -> list[dict]:
    from PIL import Image

    from arr_coc.training.task import VQATask

    task, docs = VQATask(7), []
    for i in range(n):
        ex = task.example(i)
        pixels = (ex.image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        docs.append({"image": Image.fromarray(pixels), "question": ex.question, "answer": ex.answer})
    return docs


def _direct_requests(lm, docs: list[dict]) -> tuple[list, list]:
    """generate_until and loglikelihood Instances as lmms-eval builds them, over ``docs``."""
    from lmms_eval.api.instance import Instance

    lm.task_dict = {"t": {"test": docs}}
    visual = lambda d: [d["image"]]  # noqa: E731
    meta = lambda i: {"task": "t", "doc_id": i, "repeats": 1}  # noqa: E731
    gen = [Instance("generate_until", (d["question"], {"max_new_tokens": 3, "until": ["</s>"]}, visual, i, "t", "test"),
                    idx=0, metadata=meta(i)) for i, d in enumerate(docs)]
    ll = [Instance("loglikelihood", (d["question"], " " + w, visual, i, "t", "test"), idx=j, metadata=meta(i))
          for i, d in enumerate(docs) for j, w in enumerate([d["answer"], "red"])]
    return gen, ll


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen25_and_qwen3_full_allocator_gives_the_plain_models_answers(tiny, family):
    path = save_tiny_qwen_vl(tiny["root"] / family, family)
    docs = _docs()
    results = []
    for unwrapped in (False, True):
        lm = _model("arr_coc_qwen_vl", path, allocator="full", batch_size=2, unwrapped=unwrapped)
        assert type(lm.model).__name__ == MODEL_TYPES[family]
        gen, ll = _direct_requests(lm, docs)
        results.append((lm.generate_until(gen), lm.loglikelihood_pairs(ll)))
    (gen_w, ll_w), (gen_p, ll_p) = results
    assert gen_w == gen_p and len(gen_w) == len(docs)
    for (a, ga), (b, gb) in zip(ll_w, ll_p):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) and ga == gb and a > 0


@pytest.mark.parametrize("name,key", [("arr_coc_llava", "llava"), ("arr_coc_qwen_vl", "qwen2_vl")])
def test_batched_requests_equal_one_at_a_time(tiny, name, key):
    """Batches (left padding, sorted by length) change nothing: batch 3 == batch 1, with pruning."""
    docs = _docs()
    out = {}
    for bs in (1, 3):
        lm = _model(name, tiny[key], allocator="arr_coc", budget=16, batch_size=bs)
        gen, ll = _direct_requests(lm, docs)
        out[bs] = (lm.generate_until(gen), lm.loglikelihood_pairs(ll))
    assert out[1][0] == out[3][0]
    for (a, ga), (b, gb) in zip(out[1][1], out[3][1]):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) and ga == gb


# ---------------------------------------------------------------------------- the CLI
def _cli(tiny: dict[str, Path], model: str, model_args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tiny["root"] / "hf_home"), OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args,
           "--tasks", "arr_coc_vqa_gen,arr_coc_vqa_mc", "--include_path", str(tiny["tasks"]),
           "--limit", str(LIMIT), "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    return subprocess.run(cmd, env=env, cwd=tiny["root"], capture_output=True, text=True, timeout=600)


def _check_results_file(out: Path, proc: subprocess.CompletedProcess) -> dict:
    files = sorted(out.rglob("*_results.json"))
    assert proc.returncode == 0 and files, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(files[-1].read_text())
    assert res["results"]["arr_coc_vqa_gen"]["exact_match,none"] is not None
    assert 0.0 <= res["results"]["arr_coc_vqa_mc"]["acc,none"] <= 1.0
    assert res["n-samples"]["arr_coc_vqa_gen"]["effective"] == LIMIT
    assert len(sorted(out.rglob("*_samples_arr_coc_vqa_gen.jsonl"))) == 1
    return res


@pytest.mark.slow
def test_cli_runs_arr_coc_llava_end_to_end(tiny):
    out = tiny["root"] / "cli_llava"
    proc = _cli(tiny, "arr_coc_llava", f"pretrained={tiny['llava']},allocator=arr_coc,budget=16,device=cpu", out)
    res = _check_results_file(out, proc)
    assert "allocator=arr_coc" in res["config"]["model_args"]


@pytest.mark.slow
def test_cli_runs_arr_coc_qwen_vl_end_to_end(tiny):
    out = tiny["root"] / "cli_qwen"
    args = f"pretrained={tiny['qwen2_vl']},allocator=divprune,budget=0.25,device=cpu,min_pixels=1024,max_pixels=1024"
    _check_results_file(out, _cli(tiny, "arr_coc_qwen_vl", args, out))


# ---------------------------------------------------------------------------- summary table
def _write_results(folder: Path, name: str, model_args: str, results: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_results.json").write_text(json.dumps({"config": {"model_args": model_args}, "results": results}))


def test_summary_table_is_relative_to_the_full_run(tmp_path):
    from arr_coc.integrations.lmms_eval.summarize import collect, to_markdown

    def res(pope, gqa, mme):
        return {"pope": {"pope_f1_score,none": pope, "pope_accuracy,none": 0.0}, "gqa": {"exact_match,none": gqa},
                "mme": {"mme_perception_score,none": mme, "mme_cognition_score,none": 1.0}}

    _write_results(tmp_path / "a", "20260101_000000", "pretrained=/m,allocator=full", res(0.80, 0.60, 1500.0))
    _write_results(tmp_path / "b", "20260101_000001", "pretrained=/m,allocator=arr_coc,budget=64", res(0.76, 0.54, 1350.0))
    _write_results(tmp_path / "c", "20260101_000002", "pretrained=/m,allocator=cdpruner,budget=128", res(0.80, 0.57, 1500.0))
    table = collect(tmp_path)
    assert table[("arr_coc", "64")] == {"pope": 0.76, "gqa": 0.54, "mme": 1350.0}
    lines = to_markdown(table).splitlines()
    assert lines[0] == "| allocator | budget | pope | gqa | mme | relative to full (%) |"
    assert lines[2].startswith("| full | all |") and lines[2].endswith("| 100.0 |")
    # (0.76 / 0.80 + 0.54 / 0.60 + 1350 / 1500) / 3 = (0.95 + 0.90 + 0.90) / 3 = 91.67 %
    assert lines[3] == "| cdpruner | 128 | 0.8 | 0.57 | 1500 | 98.3 |"
    assert lines[4] == "| arr_coc | 64 | 0.76 | 0.54 | 1350 | 91.7 |"
    with pytest.raises(ValueError, match="folder"):
        collect(tmp_path / "empty")
