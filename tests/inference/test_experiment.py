"""experiments/inference.py composes with Hydra and writes its three reports (tiny sizes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_inference_experiment_runs(tmp_path):
    from hydra import compose, initialize_config_dir

    spec = importlib.util.spec_from_file_location("inference_experiment", ROOT / "experiments" / "inference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            config_name="inference",
            overrides=[
                f"results_dir={tmp_path}", "checkpoint=/nonexistent", "kv.num_questions=16", "kv.ratios=[0,0.5]",
                "routing.train_pairs=64", "routing.critic_steps=2", "routing.critic_batch=16", "routing.reference=32",
                "routing.num_requests=16", "routing.repeats=1", "routing.full_fractions=[0,0.5,1]",
                "retrieval.train_pairs=64", "retrieval.critic_steps=2", "retrieval.critic_batch=16",
                "retrieval.gallery=64", "retrieval.num_queries=8", "retrieval.k=[1,5]", "retrieval.timing_sizes=[64]",
                "retrieval.repeats=1",
            ],
        )
    paths = mod.run(cfg, "pytest")
    assert set(paths) == {"inference_kv", "inference_routing", "inference_retrieval"}
    kv = (tmp_path / "inference_kv.md").read_text()
    # ratio 0 agrees with the uncompressed answer for every press
    agree = kv.split("### Agreement")[1].split("###")[0]
    rows = [r for r in agree.splitlines() if r.startswith("| ") and "press" not in r]
    assert len(rows) == 7 and all(r.split("|")[2].strip() == "1" for r in rows)
    assert "Command: `pytest`" in (tmp_path / "inference_routing.md").read_text()
    # retrieval: pmi and cosine in the critic's own space rank identically (pmi only shifts
    # each query's scores), so their precision rows agree; raw-space cosine is its own row
    ret = (tmp_path / "inference_retrieval.md").read_text()
    prec = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in ret.split("### Precision@k")[1].split("###")[0].splitlines() if r.startswith("| ")}
    assert prec["pmi (InfoNCE critic)"] == prec["cosine, critic space (the critic's own embeddings)"]
    assert "cosine, raw LLM space (untrained)" in prec and "pooled ROC AUC" in ret
    with pytest.raises(ValueError, match="sections"):
        mod.run(compose_like(cfg, sections=["nope"]), "pytest")


def compose_like(cfg, **kw):
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg)
    c.update(kw)
    return OmegaConf.create(c)
