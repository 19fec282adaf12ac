"""The Hydra configs (composed with Hydra's compose API) and experiments/train.py's train(cfg)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
_spec = importlib.util.spec_from_file_location("arr_coc_experiments_train", ROOT / "experiments" / "train.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

# small and fast: the micro VLM (width 32), a few examples, CPU
SMALL = [
    "model=micro",
    "data.train_size=16",
    "data.val_size=8",
    "data.test_size=8",
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
DOWNLOADS = {  # options that would fetch weights: composed and checked, never built here
    ("model", "clip_smollm2"),
    ("model", "siglip_qwen"),
    ("model", "smollm2_gguf"),
    ("model/llm", "smollm2_135m"),
    ("model/llm", "qwen2_5_0_5b"),
    ("model/llm", "smollm2_gguf"),
}


def make_cfg(tmp_path: Path, overrides: list[str] = (), *, run: str = "run"):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    out = tmp_path / run
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.work_dir = str(ROOT)
        cfg.hydra.runtime.output_dir = str(out)
    HydraConfig().set_config(cfg)
    return cfg


def options(group: str) -> list[str]:
    files = sorted((CONF / group).glob("*.yaml"))
    if group == "experiment":  # the group is shared with conf/main.yaml's ablations: ours name this script
        files = [p for p in files if "experiments/train.py" in p.read_text()]
    return [p.stem for p in files]


# ------------------------------------------------------------------ composition
def test_default_config_composes_and_resolves(tmp_path):
    cfg = make_cfg(tmp_path)
    assert cfg.allocator.name == "arr_coc" and cfg.budget == 16 and cfg.module.budget == 16
    assert cfg.model._target_.endswith("BaseVLM.from_pretrained")
    assert Path(cfg.model.folder) == ROOT / "checkpoints" / "base_vlm"
    assert cfg.module.optimizer._partial_ is True
    assert cfg.trainer.accelerator == "cpu" and cfg.data.seed == cfg.seed
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    resolved = OmegaConf.to_container(job, resolve=True)  # every interpolation resolves
    assert resolved["callbacks"]["model_checkpoint"]["dirpath"] == str(tmp_path / "run" / "checkpoints")


GROUPS = [
    "data",
    "model",
    "model/vision",
    "model/llm",
    "model/projector",
    "allocator",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "debug",
    "experiment",
]
CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_instantiates(tmp_path, group, option):
    base = ["model=tiny"] if group.startswith("model/") else []
    cfg = make_cfg(tmp_path, base + [f"{group}={option}"])
    node = OmegaConf.select(cfg, group.replace("/", ".")) if group not in ("debug", "experiment") else cfg
    if (group, option) in {("model", "llava_hf"), ("model", "qwen_vl_hf")}:
        # transformers hosts need a local folder; tests/training/test_hosts_hydra.py builds and trains them
        assert OmegaConf.is_missing(node, "path") and node._target_.startswith("arr_coc.training.hosts.")
        return
    if (group, option) in DOWNLOADS:
        target = cfg.model.llm if group == "model" else node
        assert OmegaConf.is_missing(target, "name_or_path") or "/" in target.name_or_path
        if group == "model":
            import timm

            assert timm.is_model(cfg.model.vision.name.split(".")[0]), cfg.model.vision.name
        return
    if group == "data":
        if option == "llava":
            with pytest.raises(MissingMandatoryValue, match="train_json"):
                instantiate(node)
            return
        dm = instantiate(node)
        item = dm.split("val")[0]
        assert item["image"].shape[-1] == node.task.image_size
        assert item["relevance"].shape == (node.task.grid, node.task.grid)
    elif group == "model":
        if option == "base_vlm" and not (ROOT / "checkpoints" / "base_vlm" / "config.json").is_file():
            with pytest.raises(InstantiationException, match="config.json"):
                instantiate(node)
            return
        vlm = instantiate(node)
        pixels = torch.rand(1, 3, vlm.config.vision.img_size, vlm.config.vision.img_size)
        assert vlm.encode_image(pixels).shape[1] == vlm.num_prefix_tokens + vlm.num_patches
    elif group == "model/vision":
        from arr_coc.training.backbones import build_vision_encoder

        vc = instantiate(node)
        import timm

        assert timm.is_model(vc.name.split(".")[0])
        if vc.pretrained:  # weights would download: check the config against timm's record of them
            pc = timm.models.get_pretrained_cfg(vc.name)
            assert pc is not None and vc.img_size == pc.input_size[-1]
            assert tuple(vc.mean) == pytest.approx(pc.mean) and tuple(vc.std) == pytest.approx(pc.std)
            return
        enc = build_vision_encoder(vc)
        assert enc.patch_embed.img_size[0] == vc.img_size
    elif group == "model/llm":
        from arr_coc.training.backbones import build_causal_lm

        lm = build_causal_lm(instantiate(node), vocab_size=50)
        assert lm.get_input_embeddings().num_embeddings == 50
    elif group == "model/projector":
        assert set(node) == {"hidden"}
        vlm = instantiate(cfg.model)  # built through the tiny model
        assert vlm.projector[0].out_features == (node.hidden or vlm.llm_dim)
    elif group == "allocator":
        alloc = instantiate(node)
        x, q = torch.randn(2, 65, 32), torch.randn(2, 5, 32)
        out = alloc(x, query=q, query_mask=torch.ones(2, 5, dtype=torch.bool), budget=8, grid=(8, 8), num_prefix_tokens=1)
        assert out.tokens.shape[-1] == 32
        assert (out.mask.sum(1) <= (64 if option == "full" else 8)).all()
    elif group == "trainer":
        if node.accelerator == "gpu" and not torch.cuda.is_available():
            assert node.devices in (1, -1)
            return
        trainer = instantiate(node)
        assert trainer.max_epochs == node.max_epochs
        if option == "ddp_sim":
            assert trainer.num_devices == 2 and type(trainer.strategy).__name__ == "DDPStrategy"
    elif group in ("callbacks", "logger"):
        if option == "wandb" and importlib.util.find_spec("wandb") is None:
            assert node.wandb.offline is True
            return
        objs = train_script._instantiate_all(node)
        assert len(objs) == len(node)
    elif group == "paths":
        assert Path(node.root_dir) == ROOT
    elif group == "debug":
        assert cfg.trainer.devices == 1 and cfg.data.num_workers == 0
    elif group == "experiment":
        assert cfg.task_name == option
        plain = make_cfg(tmp_path, base)
        assert set(cfg) == set(plain), "an experiment overrides train.yaml's keys, it adds none"
        if option == "adapter":
            assert instantiate(cfg.allocator).adapter is not None


@pytest.mark.parametrize("launcher, target", [("local", "JoblibLauncher"), ("slurm", "SlurmLauncher")])
def test_launchers_compose(tmp_path, launcher, target):
    cfg = make_cfg(tmp_path, [f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)


def test_config_typos_get_clear_errors(tmp_path):
    with pytest.raises(ConfigCompositionException, match="budgt"):
        make_cfg(tmp_path, ["budgt=16"])
    with pytest.raises(ConfigCompositionException, match="arr_cocc"):
        make_cfg(tmp_path, ["allocator=arr_cocc"])
    with pytest.raises(ConfigCompositionException, match="rat"):
        make_cfg(tmp_path, ["module.loss_weights.rat=1.0"])
    cfg = make_cfg(tmp_path, ["+allocator.alhpa=0.5"])  # an argument the allocator does not take
    with pytest.raises(InstantiationException, match="alhpa"):
        instantiate(cfg.allocator)
    cfg = make_cfg(tmp_path, SMALL + ["allocator=random", "+module.loss_weights.rat=1.0"])
    with pytest.raises(InstantiationException, match="loss_weights"):
        train_script.build(cfg)


# ------------------------------------------------------------------ runs
def test_fast_dev_run_stage2(tmp_path):
    cfg = make_cfg(tmp_path, SMALL + ["debug=fast_dev_run"])
    metrics = train_script.train(cfg)
    for key in ("train/loss", "train/ce", "train/rate", "val/acc", "val/tokens", "val/recall", "val/mi_selected_query", "val/throughput"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["val/recall_fine"] <= metrics["val/recall"] <= 1.0
    assert metrics["val/tokens"] <= 16
    per_type = [k for k in metrics if k.startswith("val/acc_")]
    assert per_type and all(k[len("val/acc_") :] in ("shape", "colour", "side", "nearest", "count") for k in per_type)
    assert train_script.optimized_value(cfg, metrics) == metrics["val/acc"]
    with pytest.raises(ValueError, match="optimized_metric"):
        train_script.optimized_value(OmegaConf.create({"optimized_metric": "val/nope"}), metrics)


def test_baseline_allocator_is_evaluated_at_the_budget(tmp_path):
    # the module gives host-reading baselines the base VLM's signals, as evaluation does; the
    # micro tower has one block, so VisionZip reads block -1
    cfg = make_cfg(tmp_path, SMALL + ["debug=fast_dev_run", "allocator=visionzip", "allocator.layer=-1", "budget=8"])
    metrics = train_script.train(cfg)
    assert metrics["val/tokens"] == 8.0 and not any(k.startswith("train/") for k in metrics)


def _run_and_read(tmp_path, overrides, run):
    cfg = make_cfg(tmp_path, overrides, run=run)
    metrics = train_script.train(cfg)
    weights = load_file(str(tmp_path / run / "allocator" / "model.safetensors"))
    return metrics, weights


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    common = SMALL + ["allocator=arr_coc_adapter", "export_allocator=true", "logger=csv", "seed=3"]
    full_m, full_w = _run_and_read(tmp_path, common + ["trainer.max_epochs=2"], "full")
    _run_and_read(tmp_path, common + ["trainer.max_epochs=1"], "first")
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith("vlm.") for k in saved["state_dict"])  # the frozen VLM is not copied
    assert "_target_: arr_coc.training.module.build_vlm" in saved["arr_coc"]["backbones"]["model"]
    res_m, res_w = _run_and_read(tmp_path, common + ["trainer.max_epochs=2", f"ckpt_path={ckpt}"], "resumed")
    assert set(full_w) == set(res_w)
    for k in full_w:
        assert torch.equal(full_w[k], res_w[k]), k
    for k, v in full_m.items():
        if k != "val/throughput":
            assert res_m[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    # and the run really trained: the weights moved from the first epoch's
    first_w = load_file(str(tmp_path / "first" / "allocator" / "model.safetensors"))
    assert any(not torch.equal(first_w[k], full_w[k]) for k in full_w)


def test_runs_are_deterministic_for_a_seed(tmp_path):
    a = train_script.train(make_cfg(tmp_path, SMALL + ["debug=fast_dev_run", "seed=7"], run="a"))
    b = train_script.train(make_cfg(tmp_path, SMALL + ["debug=fast_dev_run", "seed=7"], run="b"))
    c = train_script.train(make_cfg(tmp_path, SMALL + ["debug=fast_dev_run", "seed=8"], run="c"))
    keys = [k for k in a if k != "val/throughput"]
    assert keys and all(a[k] == b[k] for k in keys)
    assert any(a[k] != c[k] for k in keys)


def test_llava_data_trains_through_the_same_entry_point(tmp_path):
    from arr_coc.training.llava_data import export_llava
    from arr_coc.training.task import VQATask

    task = VQATask(seed=2)
    export_llava((dict(task.example(i).__dict__, question_type=task.example(i).qtype) for i in range(24)), tmp_path / "llava")
    cfg = make_cfg(
        tmp_path,
        [s for s in SMALL if not s.startswith("data.")]
        + [
            "data=llava",
            f"data.train_json={tmp_path / 'llava' / 'data.json'}",
            f"data.image_folder={tmp_path / 'llava'}",
            "data.batch_size=8",
            "debug=fast_dev_run",
        ],
    )
    metrics = train_script.train(cfg)
    assert 0.0 <= metrics["val/recall"] <= 1.0 and metrics["val/tokens"] <= 16


def test_pretrained_backbones_load_from_local_files_through_the_configs(tmp_path):
    """The real-model path (timm file overlay, transformers from_pretrained on a folder)
    driven by the same config keys as conf/model/vision/clip_b16.yaml and llm/*.yaml."""
    from safetensors.torch import save_file

    from arr_coc.training.backbones import LLMConfig, VisionConfig, build_causal_lm, build_vision_encoder
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    torch.manual_seed(11)
    vit = build_vision_encoder(VisionConfig(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    vocab = len(build_tokenizer(VQATask()))
    lm = build_causal_lm(LLMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), vocab_size=vocab)
    lm.save_pretrained(tmp_path / "lm")
    cfg = make_cfg(
        tmp_path,
        SMALL
        + [
            "debug=fast_dev_run",
            "model.vision.pretrained=true",
            f"model.vision.pretrained_file={tmp_path / 'vit.safetensors'}",
            f"model.llm.name_or_path={tmp_path / 'lm'}",
        ],
    )
    vlm = instantiate(cfg.model)
    for k, v in vit.state_dict().items():
        assert torch.equal(vlm.vision.state_dict()[k], v), k
    for k, v in lm.state_dict().items():
        assert torch.equal(vlm.llm.state_dict()[k], v), k
    metrics = train_script.train(cfg)
    assert math.isfinite(metrics["val/acc"])


def _script(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_multirun_over_allocator_and_budget(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _script(
        ["-m", "allocator=arr_coc,visionzip", "budget=16,64", *SMALL, "debug=fast_dev_run", f"hydra.sweep.dir={sweep}"],
        tmp_path, 600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(runs) == 4, runs
    for name in ("allocator=arr_coc,budget=16", "allocator=visionzip,budget=64"):
        assert any(f"_{name}," in r for r in runs), runs
    assert all((sweep / r / ".hydra" / "overrides.yaml").is_file() for r in runs)


@pytest.mark.slow
def test_joblib_launcher_runs_a_sweep_in_parallel(tmp_path):
    sweep = tmp_path / "sweep"
    proc = _script(
        ["-m", "hydra/launcher=local", "allocator=random,visionzip", "budget=8", *SMALL, "debug=fast_dev_run",
         f"hydra.sweep.dir={sweep}"],
        tmp_path, 600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 2


@pytest.mark.slow
def test_ddp_sim_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    proc = _script(
        [*SMALL, "trainer=ddp_sim", "trainer.max_epochs=1", "logger=csv", "export_allocator=true", f"hydra.run.dir={out}"],
        tmp_path, 600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    assert "All distributed processes registered. Starting with 2 processes" in proc.stderr + proc.stdout
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "val/acc" in metrics.splitlines()[0]
    assert (out / "allocator" / "model.safetensors").is_file()


def test_every_registered_allocator_has_a_config_that_builds_it():
    """``allocator=<name>`` works for every registered name (conf/allocator/<name>.yaml)."""
    from arr_coc.allocators import create_allocator, list_allocators

    for name in list_allocators():
        path = CONF / "allocator" / f"{name}.yaml"
        assert path.exists(), f"conf/allocator/{name}.yaml is missing"
        built = instantiate(OmegaConf.load(path))
        assert type(built) is type(create_allocator(name)), name
