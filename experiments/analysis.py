"""Information analysis of the base VLM on the embedded task (Hydra entry point).

Three reports under ``experiments/results/``, each with the command and commit:

- ``analysis_quantization.md``: FP8 (e4m3, e5m2) and int8, per-tensor vs per-channel scales,
  on the frozen ViT's patch features: SNR, exact code entropy, Gaussian and KSG estimates of
  I(original; quantized), and the task information kept (base-VLM answer accuracy with the
  quantized features, and a linear-probe bound on I(features; answer)).
- ``analysis_flow.md`` + ``analysis_information_plane.png``: I(X; T_k) and I(T_k; Y) for every
  ViT block and every LLM layer (forward hooks, removed afterwards).
- ``analysis_pipeline.md`` + ``analysis_pipeline.png``: a stage split of ViT + projector + LLM
  layers from measured per-layer time and activation size, the bubble fraction over
  micro-batch counts, and the gradient SNR over micro-batch sizes.

```bash
python experiments/analysis.py                       # the shipped base VLM
python experiments/analysis.py num_images=128 stages=[2,4]
```
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from arr_coc.analysis import (
    ActivationRecorder,
    bubble_fraction,
    dequantize,
    gradient_snr,
    information_plane,
    per_example_gradients,
    plan_stages,
    quantization_report,
    quantize,
)
from arr_coc.info import discrete_entropy
from arr_coc.reporting import markdown_table, write_report

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def load_model_and_data(cfg: DictConfig):
    """The base VLM (shipped checkpoint, or an untrained one built for the task) and a batch."""
    from arr_coc.training.base_vlm import BaseVLM, BaseVLMConfig
    from arr_coc.training.datamodule import EmbeddedVQADataset, VQACollator
    from arr_coc.training.task import VQATask
    from arr_coc.training.tokenizer import build_tokenizer

    task = VQATask(seed=int(cfg.task_seed), image_size=int(cfg.image_size), grid=int(cfg.grid))
    tok = build_tokenizer(task)
    folder = Path(cfg.checkpoint)
    if not folder.is_absolute():
        folder = ROOT / folder
    if (folder / "config.json").is_file():
        vlm, trained = BaseVLM.from_pretrained(folder), True
    else:
        log.warning("no base VLM at %s: analysing an untrained one", folder)
        vlm, trained = BaseVLM(BaseVLMConfig.for_task(task, tok)), False
    vlm.eval()
    start = 10_000_000
    ds = EmbeddedVQADataset(task, start=start, length=int(cfg.num_images))
    batch = VQACollator(tok)([ds[i] for i in range(len(ds))])
    # an image-level label (a function of the pixels alone) for the vision layers
    batch["num_objects"] = torch.tensor([len(task.scene(start + i).objects) for i in range(len(ds))])
    return vlm, batch, trained


@torch.no_grad()
def _task_information(vlm, visual_feats, batch) -> tuple[float, float]:
    """(accuracy, Barber-Agakov bound H(answer) - CE in nats) of the VLM reading these features.

    The VLM is a variational decoder q(answer | features, question), so
    I(features, question; answer) >= H(answer) - E[-log q(answer | ...)].
    """
    logits = vlm.answer_logits(vlm.project(visual_feats), None, None, batch["question_ids"], batch["question_mask"])
    acc = float((logits.argmax(-1) == batch["answer"]).float().mean())
    ce = float(torch.nn.functional.cross_entropy(logits.double(), batch["answer"]))
    return acc, float(discrete_entropy(batch["answer"])) - ce


def quantization_section(vlm, batch, cfg) -> str:
    with torch.no_grad():
        tokens = vlm.encode_image(batch["pixels"])[:, vlm.num_prefix_tokens :]  # [B, N, Dv]
    b, n, d = tokens.shape
    feats = tokens.reshape(b * n, d)
    g = torch.Generator().manual_seed(0)
    rows = quantization_report(feats, ksg_samples=int(cfg.ksg_samples), ksg_channels=16, generator=g)
    base_acc, base_info = _task_information(vlm, tokens, batch)
    table = []
    for r in rows:
        codes, scale = quantize(tokens, r.scheme, r.granularity)
        q = dequantize(codes, scale)
        table.append(
            [
                r.scheme,
                r.granularity,
                round(r.snr_db, 2),
                round(r.code_entropy, 3),
                round(r.gaussian_mi, 3),
                round(r.ksg_mi, 3),
                *(round(v, 4) for v in _task_information(vlm, q, batch)),
            ]
        )
    header = ["scheme", "scale", "SNR dB", "H(Q(x)) nats", "Gaussian I nats", "KSG I nats", "VLM accuracy", "I(f,q;answer) >= nats"]
    body = (
        f"Features: the frozen ViT's patch tokens, {b} images x {n} patches x {d} channels "
        f"(per-channel = one scale per feature channel). Full-precision VLM accuracy on these "
        f"{b} questions: {base_acc:.4f}; task information kept, the Barber-Agakov bound "
        f"I(features, question; answer) >= H(answer) - CE of the VLM: {base_info:.3f} nats at full precision. "
        "I(x; Q(x)) = H(Q(x)) exactly for a deterministic quantizer (the code entropy column); "
        "the Gaussian column is the additive-noise view -1/2 log(1 - rho^2), the KSG column its "
        "k-NN estimate (k = 3) on a subsample. All per channel, averaged over channels.\n\n"
        + markdown_table(header, table)
    )
    return body


def flow_section(vlm, batch, cfg, out_dir: Path) -> str:
    vit_layers = [f"vision.blocks.{i}" for i in range(len(vlm.vision.blocks))]
    llm_layers = [f"llm.model.layers.{i}" for i in range(len(vlm.llm.model.layers))]

    def last_token(out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        return h[:, -1].detach().float()

    with ActivationRecorder(vlm, vit_layers) as rec_v, ActivationRecorder(vlm, llm_layers, pool=last_token) as rec_l:
        with torch.no_grad():
            vlm(batch["pixels"], batch["question_ids"], batch["question_mask"])
    hooks_left = sum(len(m._forward_hooks) for m in vlm.modules())
    answers = torch.unique(batch["answer"], return_inverse=True)[1]
    objects = torch.unique(batch["num_objects"], return_inverse=True)[1]
    kw = dict(noise=float(cfg.noise), dims=int(cfg.pca_dims))
    rows = information_plane(rec_v.activations, objects, generator=torch.Generator().manual_seed(0), **kw)
    rows += information_plane(rec_l.activations, answers, generator=torch.Generator().manual_seed(0), **kw)
    table = [[r.layer, r.dim, round(r.i_input, 3), round(r.i_label, 3)] for r in rows]
    _plot_plane(rows, out_dir / "analysis_information_plane.png")
    return (
        f"{len(answers)} questions. ViT blocks: mean over tokens, label Y = the number of objects "
        f"in the image (a function of the pixels alone); LLM layers: the readout token (the "
        f"answer position), label Y = the answer. I(X;T) = Gaussian bound on I(X; T + eps) with eps at "
        f"{cfg.noise} x the layer's RMS, on {cfg.pca_dims} principal components; I(T;Y) = H(Y) - "
        f"held-out cross-entropy of a linear probe (a lower bound). Hooks left on the model "
        f"after profiling: {hooks_left}.\n\n"
        + markdown_table(["layer", "width", "I(X;T) nats", "I(T;Y) nats"], table)
        + "\n\n![information plane](analysis_information_plane.png)"
    )


def _plot_plane(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for prefix, colour in (("vision", "tab:blue"), ("llm", "tab:orange")):
        pts = [(r.i_input, r.i_label) for r in rows if r.layer.startswith(prefix)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color=colour, label="ViT blocks" if prefix == "vision" else "LLM layers")
            for i, (x, y) in enumerate(pts):
                ax.annotate(str(i), (x, y), fontsize=7)
    ax.set_xlabel("I(X; T) [nats, noisy Gaussian bound]")
    ax.set_ylabel("I(T; Y) [nats, probe bound]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_profile(vlm, batch) -> tuple[list[str], list[float], list[float]]:
    """Per-layer forward time (s) and output bytes per example, in execution order."""
    names = (
        ["vision.patch_embed"]
        + [f"vision.blocks.{i}" for i in range(len(vlm.vision.blocks))]
        + ["projector"]
        + [f"llm.model.layers.{i}" for i in range(len(vlm.llm.model.layers))]
    )
    modules = dict(vlm.named_modules())
    start: dict[str, float] = {}
    spent = {n: 0.0 for n in names}
    size = {n: 0.0 for n in names}
    handles = []
    for n in names:
        m = modules[n]

        def pre(_m, _i, n=n):
            start[n] = time.perf_counter()

        def post(_m, _i, out, n=n):
            spent[n] += time.perf_counter() - start[n]
            t = out[0] if isinstance(out, (tuple, list)) else out
            size[n] = t.numel() * t.element_size() / t.shape[0]

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad():
            for _ in range(3):
                vlm(batch["pixels"], batch["question_ids"], batch["question_mask"])
    finally:
        for h in handles:
            h.remove()
    return names, [spent[n] / 3 for n in names], [size[n] for n in names]


def pipeline_section(vlm, batch, cfg, out_dir: Path) -> str:
    names, compute, nbytes = _layer_profile(vlm, batch)
    parts = ["Per-layer forward time (batch of %d) and activation bytes per example:\n" % batch["pixels"].shape[0]]
    parts.append(markdown_table(["layer", "ms", "bytes/example"], [[n, round(1e3 * c, 3), int(b)] for n, c, b in zip(names, compute, nbytes)]))
    plan_rows = []
    for s in cfg.stages:
        plan = plan_stages(compute, nbytes, int(s), tolerance=float(cfg.tolerance))
        cuts = ", ".join(names[b] for b in plan.boundaries) or "-"
        plan_rows.append([s, cuts, round(plan.balance, 3), int(plan.bytes_sent)] + [round(bubble_fraction(int(s), m), 3) for m in cfg.microbatches])
    parts.append(
        "\n\nStage splits (slowest stage within %.0f%% of the optimum, then fewest bytes sent); "
        "bubble = (S - 1) / (m + S - 1), the idle fraction of a flushed GPipe/1F1B pipeline "
        "with m micro-batches:\n" % (100 * float(cfg.tolerance))
    )
    parts.append(markdown_table(["stages", "first layer of each later stage", "balance", "bytes sent/example"] + [f"bubble m={m}" for m in cfg.microbatches], plan_rows))

    # gradient signal-to-noise ratio of the answer loss over micro-batch sizes
    params = [p for p in vlm.projector.parameters()] + [p for p in vlm.llm.parameters() if p.requires_grad]
    n_ex = min(int(cfg.snr_examples), batch["pixels"].shape[0])
    with torch.no_grad():
        visual_all = vlm.encode_image(batch["pixels"][:n_ex])[:, vlm.num_prefix_tokens :]

    def loss(model, i):
        logits = model.answer_logits(
            model.project(visual_all[i : i + 1]), None, None, batch["question_ids"][i : i + 1], batch["question_mask"][i : i + 1]
        )
        return torch.nn.functional.cross_entropy(logits, batch["answer"][i : i + 1])

    grads = per_example_gradients(vlm, loss, n_ex, params)
    snr = gradient_snr(grads, list(cfg.snr_batch_sizes))
    parts.append(
        f"\n\nGradient SNR of the answer loss (projector + LLM parameters, {n_ex} per-example "
        "gradients): SNR(b) = ||mu||^2 / (tr Sigma / b), ||mu||^2 estimated without bias.\n"
    )
    parts.append(markdown_table(["micro-batch b", "SNR(b)"], [[b, round(v, 4)] for b, v in snr.items()]))
    _plot_pipeline(cfg, snr, out_dir / "analysis_pipeline.png")
    parts.append("\n\n![pipeline](analysis_pipeline.png)")
    return "".join(parts)


def _plot_pipeline(cfg, snr: dict[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ms = list(range(1, max(cfg.microbatches) + 1))
    for s in cfg.stages:
        a1.plot(ms, [bubble_fraction(int(s), m) for m in ms], label=f"S={s}")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("micro-batches m")
    a1.set_ylabel("bubble fraction")
    a1.legend()
    a2.plot(list(snr), list(snr.values()), "o-")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("micro-batch size b")
    a2.set_ylabel("gradient SNR")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Path]:
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.results_dir)
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm, batch, trained = load_model_and_data(cfg)
    note = "" if trained else "**The base VLM checkpoint was missing: these figures are for an untrained model.**\n\n"
    command = "python experiments/analysis.py " + " ".join(cfg.get("overrides", []) or [])
    paths = {}
    for name, title, fn in (
        ("analysis_quantization", "Quantization information loss (FP8 / int8)", lambda: quantization_section(vlm, batch, cfg)),
        ("analysis_flow", "Information flow through the layers", lambda: flow_section(vlm, batch, cfg, out_dir)),
        ("analysis_pipeline", "Pipeline stages, bubble and gradient noise", lambda: pipeline_section(vlm, batch, cfg, out_dir)),
    ):
        if name.removeprefix("analysis_") in cfg.sections:
            paths[name] = write_report(name, title, command.strip(), note + fn(), results_dir=out_dir)
    return paths


@hydra.main(version_base="1.3", config_path="../conf", config_name="analysis")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    OmegaConf.set_struct(cfg, False)
    cfg.overrides = list(HydraConfig.get().overrides.task)
    run(cfg)


if __name__ == "__main__":
    main()
