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
- ``information_check.md`` (section ``information_check``, settings in
  ``conf/information_check/default.yaml``): the allocators' reported I(c_S; Q) against the base
  VLM's per-question Barber-Agakov bound, rank correlations per allocator x budget, per question
  and pooled (issue 16, goal 5; :mod:`arr_coc.analysis.allocation_information`).

```bash
python experiments/analysis.py                       # the shipped base VLM
python experiments/analysis.py num_images=128 stages=[2,4]
python experiments/analysis.py sections=[information_check] +information_check=default
```
"""

from __future__ import annotations

import logging
import math
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


# ---------------------------------------------------------------------------- information check
def _information_check_config(cfg: DictConfig) -> DictConfig:
    """``cfg.information_check`` (``+information_check=default``), else conf/information_check/default.yaml."""
    node = cfg.get("information_check")
    if node is None:
        node = OmegaConf.load(ROOT / "conf" / "information_check" / "default.yaml")
    if not node.get("cases"):
        raise ValueError("information_check.cases: expected at least one case (base_vlm, task, budgets, allocators)")
    return node


def _ic_fmt(v: float, digits: int = 3) -> str:
    return "nan" if v != v else f"{v:.{digits}f}"


def _ic_ci(v: float, ci: tuple[float, float]) -> str:
    return f"{_ic_fmt(v)} [{_ic_fmt(ci[0])}, {_ic_fmt(ci[1])}]"


def _ic_case(name: str, case: DictConfig, ic: DictConfig) -> str:
    """One case of the information check: load, record, correlate, and its Markdown."""
    from arr_coc.allocators import create_allocator
    from arr_coc.analysis.allocation_information import (
        answer_token_ids,
        gain_saturation,
        information_check,
        record_allocation_information,
        type_breakdown,
    )
    from arr_coc.evaluation import build_eval_batches
    from arr_coc.training.base_vlm import BaseVLM
    from arr_coc.training.hub import load_allocator
    from arr_coc.training.tasks import build_task
    from arr_coc.training.tokenizer import build_tokenizer

    folder = Path(case.base_vlm)
    folder = folder if folder.is_absolute() else ROOT / folder
    if not (folder / "config.json").is_file():
        raise ValueError(f"information_check.cases.{name}.base_vlm: no base VLM (config.json) in {folder}")
    vlm = BaseVLM.from_pretrained(folder).eval()
    vlm.requires_grad_(False)
    task = build_task(OmegaConf.to_container(case.task, resolve=True), int(case.task_seed))
    tok = build_tokenizer(task)
    batches = build_eval_batches(task, tok, start=int(case.start), size=int(case.size), batch_size=int(ic.batch_size))
    allocators, kinds = {}, {}
    for label, spec in case.allocators.items():
        spec = OmegaConf.to_container(spec, resolve=True)
        if "checkpoint" in spec:
            path = Path(spec["checkpoint"])
            allocators[label] = load_allocator(path if path.is_absolute() else ROOT / path)
            kinds[label] = f"trained, loaded from `{spec['checkpoint']}`"
        else:
            allocators[label] = create_allocator(spec["name"], **(spec.get("kwargs") or {}))
            kinds[label] = f"`create_allocator({spec['name']!r})`, untrained (training-free)"
    ids = answer_token_ids(task, tok)
    t0 = time.perf_counter()
    rec = record_allocation_information(vlm, allocators, batches, [int(k) for k in case.budgets], answer_ids=ids)
    check = information_check(rec.cells, num_bootstrap=int(ic.num_bootstrap), level=float(ic.level), seed=int(ic.seed))
    seconds = time.perf_counter() - t0
    answers = torch.cat([b["answer"] for b in batches])
    h_a = float(discrete_entropy(answers))
    snap = folder / "snapshot.json"
    step = ""
    if snap.is_file():
        import json

        step = f" (stage-1 step {json.loads(snap.read_text()).get('step')})"
    lvl = int(round(100 * float(ic.level)))
    parts = [
        f"## {case.get('title', name)}\n\n",
        f"Base VLM `{case.base_vlm}`{step}; task `{dict(case.task)}` seed {int(case.task_seed)}, "
        f"questions {int(case.start)} .. {int(case.start) + int(case.size) - 1} ({rec.full_bound.numel()}); "
        f"budgets {list(case.budgets)} of {vlm.num_patches} tokens. Answer set |A| = {rec.num_answers} "
        f"(log |A| = {math.log(rec.num_answers):.3f} nats; empirical H(A) = {h_a:.3f}). All {vlm.num_patches} tokens: "
        f"accuracy {float(rec.full_correct.double().mean()):.3f}, mean bound log|A| - CE = {float(rec.full_bound.mean()):.3f} nats.\n\n",
        "Allocators: " + "; ".join(f"`{k}` {v}" for k, v in kinds.items()) + ".",
    ]
    if rec.without_gain:
        parts.append(f" Reporting no gain (no rows): {', '.join(rec.without_gain)}.")
    parts.append(f" Recording and bootstrap: {seconds:.0f} s.\n\n")
    parts.append(f"### Per allocator x budget, across questions ({lvl}% intervals, {int(ic.num_bootstrap)} question resamples)\n\n")
    rows = []
    for c in check.per_cell:
        rows.append([
            c.allocator, c.budget, _ic_fmt(c.tokens, 1), _ic_fmt(c.accuracy),
            f"{_ic_fmt(c.gain_right)} / {_ic_fmt(c.gain_wrong)}", f"{_ic_fmt(c.bound_right)} / {_ic_fmt(c.bound_wrong)}",
            _ic_ci(c.correlation.spearman, c.correlation.spearman_ci), _ic_ci(c.correlation.kendall, c.correlation.kendall_ci),
            _ic_fmt(c.within_type_spearman), _ic_ci(c.gain_auroc, c.gain_auroc_ci),
            _ic_fmt(c.gain_type_share), _ic_fmt(c.gain_query_tokens_spearman),
        ])
    parts.append(markdown_table(
        ["allocator", "budget", "tokens", "accuracy", "gain nats right / wrong", "bound nats right / wrong",
         "Spearman(gain, bound)", "Kendall tau-b", "Spearman within type", "AUROC gain -> right",
         "gain variance between types", "Spearman(gain, question tokens)"], rows))
    parts.append("\n\n### Per question, across budgets / allocators (mean over questions where both vary)\n\n")
    prow = [[p.scope, len(p.cells), f"{p.questions} / {p.total_questions}", _ic_ci(p.spearman, p.spearman_ci), _ic_ci(p.kendall, p.kendall_ci)]
            for p in check.per_question]
    parts.append(markdown_table(["scope", "cells", "questions used", "mean Spearman", "mean Kendall tau-b"], prow))
    mid = sorted(int(k) for k in case.budgets)[len(case.budgets) // 2]
    qtypes = list(getattr(task, "question_types", []))
    trow = []
    for c in rec.cells:
        if c.budget != mid:
            continue
        for t in type_breakdown(c):
            name_t = qtypes[t.question_type] if 0 <= t.question_type < len(qtypes) else str(t.question_type)
            trow.append([c.allocator, name_t, t.n, _ic_fmt(t.accuracy), _ic_fmt(t.gain), _ic_fmt(t.bound), _ic_fmt(t.spearman)])
    parts.append(f"\n\n### Per question type at budget {mid} (what moves the gain and the bound)\n\n")
    parts.append(markdown_table(["allocator", "type", "questions", "accuracy", "mean gain nats", "mean bound nats", "Spearman within type"], trow))
    pc = check.pooled
    parts.append(
        f"\n\nPooled over every (allocator, budget, question), {pc.n} rows, questions resampled as clusters: "
        f"Spearman {_ic_ci(pc.spearman, pc.spearman_ci)}, Kendall tau-b {_ic_ci(pc.kendall, pc.kendall_ci)}.\n\n"
    )
    sat = gain_saturation(rec.cells)
    if sat:
        parts.append(
            "Reported gain unchanged between an allocator's two largest budgets (the query chain ran out of "
            "information first): " + ", ".join(f"`{k}` {100 * v:.1f}% of questions" for k, v in sat.items()) + ".\n\n"
        )
    pos = sum(c.correlation.spearman_ci[0] > 0 for c in check.per_cell)
    neg = sum(c.correlation.spearman_ci[1] < 0 for c in check.per_cell)
    parts.append(
        f"Across questions, the Spearman interval lies above 0 in {pos}, below 0 in {neg}, and covers 0 in "
        f"{len(check.per_cell) - pos - neg} of {len(check.per_cell)} allocator x budget cells.\n\n"
    )
    return "".join(parts)


def information_check_section(cfg: DictConfig) -> str:
    """Issue 16 goal 5: the reported I(c_S; Q) checked against the VLM's Barber-Agakov bound."""
    ic = _information_check_config(cfg)
    if ic.get("threads"):
        torch.set_num_threads(int(ic.threads))
    head = (
        "Does the allocator's reported information I(c_S; Q) (``out.gain``: the chain-rule sum of the "
        "greedy's query gains, a mutual information under a Gaussian model of the candidates and the query "
        "in the allocator's relevance space; `arr_coc_adapter` reports the same quantity for its own picks) "
        "track what the kept tokens tell the frozen VLM about the answer? The independent estimate is the VLM's "
        "Barber-Agakov term per question, log |A| + log q(answer | kept tokens, question), q the VLM's softmax "
        "over the answer set A (mean: log |A| - CE; the bound proper, H(A) - CE <= I(kept, question; answer), "
        "differs by a constant, so ranks are unchanged). Rank correlations of gain vs bound: per allocator x "
        "budget across questions (with the count-weighted mean of per-question-type Spearman, since the type "
        "moves both), per question across budgets and allocators, and pooled; percentile bootstrap intervals "
        "over questions. AUROC gain -> right: the probability that a question answered right has a higher "
        "gain than one answered wrong (0.5 = no signal). What the gain follows instead: the share of its variance "
        "between question types (eta^2) and its Spearman with the question's token count. Module: `arr_coc.analysis.allocation_information`.\n\n"
    )
    return head + "".join(_ic_case(str(name), case, ic) for name, case in ic.cases.items())


def run(cfg: DictConfig) -> dict[str, Path]:
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.results_dir)
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    if "information_check" in cfg.sections:  # its own base VLMs and tasks (conf/information_check)
        ic_name = str(_information_check_config(cfg).get("results_name", "information_check"))
        ic_command = "python experiments/analysis.py " + " ".join(cfg.get("overrides", []) or [])
        paths[ic_name] = write_report(
            ic_name, "Reported I(c_S; Q) vs the VLM's Barber-Agakov bound (issue 16, goal 5)",
            ic_command.strip(), information_check_section(cfg), results_dir=out_dir,
        )
        if not set(cfg.sections) - {"information_check"}:
            return paths
    vlm, batch, trained = load_model_and_data(cfg)
    note = "" if trained else "**The base VLM checkpoint was missing: these figures are for an untrained model.**\n\n"
    command = "python experiments/analysis.py " + " ".join(cfg.get("overrides", []) or [])
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
