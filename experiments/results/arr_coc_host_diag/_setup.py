"""What the issue-16 diagnostics share: the validation set of an experiment config, encoded once,
and a module saved by ``save_allocators`` rebuilt under other inference arguments."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "experiments"))
import main as M  # noqa: E402

from arr_coc.allocators import create_allocator  # noqa: E402
from arr_coc.evaluation import _encode, build_eval_batches  # noqa: E402
from arr_coc.training.base_vlm import BaseVLM  # noqa: E402
from arr_coc.training.hub import load_allocator  # noqa: E402
from arr_coc.training.tokenizer import build_tokenizer  # noqa: E402


def validation_set(experiment: str, threads: int) -> SimpleNamespace:
    """cfg, vlm, task, start, size, batches, encodings (one per batch) and question types of
    ``+experiment=<experiment>``'s evaluation set, at ``threads`` torch threads."""
    torch.set_num_threads(threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="main", overrides=[f"+experiment={experiment}"])
    vlm = BaseVLM.from_pretrained(M._path(cfg.model_folder)).eval()
    vlm.requires_grad_(False)
    task = M.build_eval_task(cfg, int(cfg.data.task_seed))
    start, size = int(cfg.eval.start), int(cfg.eval.size)
    batches = build_eval_batches(task, build_tokenizer(task), start=start, size=size, batch_size=64)
    with torch.no_grad():
        encodings = [_encode(vlm, b) for b in batches]
    return SimpleNamespace(cfg=cfg, vlm=vlm, task=task, start=start, size=size, batches=batches,
                           encodings=encodings, types=list(task.question_types))


def saved_module(label: str, **overrides):
    """The module saved to ``logs/diag/<label>``, rebuilt with ``overrides`` on its saved arguments
    (the same weights), in eval mode."""
    source = ROOT / "logs/diag" / label
    trained = load_allocator(source)
    saved = json.loads((source / "config.json").read_text())
    alloc = create_allocator(saved["name"], **{**saved["allocator_config"], **overrides})
    alloc.load_state_dict(trained.state_dict())
    return alloc.eval()


def evidence_counts(vlm, alloc, batches, encodings, budget: int, threshold: float | None) -> SimpleNamespace:
    """Per question, ``alloc`` at ``budget`` over the batches: correct [Q], question type [Q], and of
    the picks whose prior information exceeds ``threshold`` nats (every pick when None: the greedy's
    own evidence) the count [Q], how many are relevant cells [Q], the relevant cells [Q] and whether
    all of them are among those picks [Q] (bool)."""
    from arr_coc.evaluation import run_allocation

    out = {k: [] for k in ("correct", "qtype", "evidence", "hits", "relevant", "all_in")}
    with torch.no_grad():
        for b, e in zip(batches, encodings):
            res = run_allocation(vlm, alloc, b, budget, encoded=e)
            picks, info = res.out.extras["pick_order"], res.out.extras["prior_information"]
            ev = (picks >= 0) & (info.gather(1, picks.clamp_min(0)) > (threshold if threshold is not None else -1.0))
            rel = b["relevance"].flatten(1)
            hit = ev & rel.gather(1, picks.clamp_min(0))
            for key, v in (("correct", (res.logits.argmax(-1) == b["answer"]).float()), ("qtype", b["question_type"]),
                           ("evidence", ev.sum(1)), ("hits", hit.sum(1)), ("relevant", rel.sum(1)),
                           ("all_in", hit.sum(1) == rel.sum(1))):
                out[key].append(v)
    return SimpleNamespace(**{k: torch.cat(v) for k, v in out.items()})
