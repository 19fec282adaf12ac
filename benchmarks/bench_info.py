"""Information-measure benchmarks: arr_coc.info side by side with scikit-learn and dcor.

``python -m benchmarks info [--quick] [--repeats=R] [--threads=T]`` writes experiments/results/info.md:
1. ``mi_features`` vs ``mutual_info_regression(n_jobs=-1)``, n = 10,000, F = 256 (time, max |diff|);
2. 1-D ``ksg_mi`` vs scikit-learn at n = 10^5; 1-D ``ksg_mi`` at n = 10^6 (time, peak memory
   of a fresh process);
3. ``distance_correlation`` vs dcor: 1-D n = 10^5 (both O(n log n)) and 3-D n = 10^4
   (dcor's O(n^2) path vs our tiles);
4. the sklearn issue 30772 case: a rare binary feature independent of the label;
5. KSG bias and spread over seeds on Gaussians and monotone transforms of them;
6. multivariate ``ksg_cmi`` / ``ksg_mi`` (k-d tree engine) vs the same estimator on scipy's
   ``cKDTree`` the way NPEET computes it, n = 2 x 10^4, d = 3 in all (``--only=kdtree`` runs
   this section alone and writes it to experiments/results/info_kdtree.md).
Times are medians of ``--repeats`` runs after a warm-up; CPU times are reported too because
the machine may be shared. arr_coc runs on every core (``--threads``, default all), as
scikit-learn's ``n_jobs=-1`` does; its 1-thread time and the time of its torch engine (the one
that also runs on a GPU, ``ARR_COC_NUMBA=0``) are reported beside it.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks._report import markdown_table, write_report


def _timed(fn, repeats: int, warmup: bool = True) -> tuple[float, float, object]:
    """(median wall s, median process CPU s, last result), after one warm-up run if asked."""
    out = fn() if warmup else None
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def _gauss(n: int, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal(n)


_PEAK_SCRIPT = """
import sys, time, torch
from arr_coc.info import ksg_mi

def hwm():  # peak resident memory of this process in MiB (VmHWM: not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

n = int(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
g = torch.Generator().manual_seed(0)
x = torch.randn(n, generator=g, dtype=torch.float64)
y = 0.6 * x + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
t0 = time.perf_counter()
ksg_mi(x[:1000], y[:1000])  # loads (or compiles) the kernels
load = time.perf_counter() - t0
base = hwm()
t0, c0 = time.perf_counter(), time.process_time()
v = ksg_mi(x, y).item()
print(time.perf_counter() - t0, time.process_time() - c0, v, base, hwm(), load)
"""


def _ckdtree_counts(parts: list[np.ndarray], k: int, count_sets: list[tuple[int, ...]], workers: int) -> list[np.ndarray]:
    """NPEET's neighbour search on scipy's cKDTree: the k-th neighbour distance in the joint
    space by ``query(k + 1, p=inf)`` (the point itself comes first), then in each subspace the
    points within ``eps - 1e-15`` by ``query_ball_point(return_length=True)`` (itself included)."""
    from scipy.spatial import cKDTree

    joint = np.concatenate(parts, axis=1)
    eps = cKDTree(joint).query(joint, k + 1, p=np.inf, workers=workers)[0][:, k]
    out = []
    for cs in count_sets:
        sub = np.concatenate([parts[j] for j in cs], axis=1)
        out.append(cKDTree(sub).query_ball_point(sub, eps - 1e-15, p=np.inf, return_length=True, workers=workers))
    return out


def _ckdtree_ksg(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None, k: int, workers: int) -> float:
    """The estimator of ``ksg_mi`` (z None) / ``ksg_cmi``, with arr_coc's preprocessing
    (standardize, break ties) and the cKDTree search above."""
    from scipy.special import digamma

    from arr_coc.info.continuous import _prepare_vars

    named = {"x": x, "y": y} if z is None else {"x": x, "y": y, "z": z}
    named = {a: (v if v.dim() == 2 else v[:, None]).double() for a, v in named.items()}
    parts = [v.numpy() for v in _prepare_vars(named, 0.25, 0)[0]]
    n = parts[0].shape[0]
    if z is None:
        cx, cy = _ckdtree_counts(parts, k, [(0,), (1,)], workers)
        return float(digamma(k) + digamma(n) - digamma(cx).mean() - digamma(cy).mean())
    cxz, cyz, cz = _ckdtree_counts(parts, k, [(0, 2), (1, 2), (2,)], workers)
    return float(digamma(k) - digamma(cxz).mean() - digamma(cyz).mean() + digamma(cz).mean())


def kdtree_section(repeats: int, threads: int, n: int = 20_000) -> tuple[str, list[list]]:
    """Side by side, interleaved in one process: arr_coc's k-d tree engine vs the cKDTree
    implementation of the same estimator; medians of ``repeats`` runs after a warm-up."""
    from arr_coc.info import ksg_cmi, ksg_mi

    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    y = 0.6 * x + 0.6 * z + torch.randn(n, generator=g, dtype=torch.float64)
    x2 = torch.stack([x, x * z + torch.randn(n, generator=g, dtype=torch.float64)], 1)
    workloads = [
        (f"ksg_cmi(x, y, z), scalars (d = 3), n={n}, k=3", lambda: ksg_cmi(x, y, z, 3).item(), lambda w: _ckdtree_ksg(x, y, z, 3, w)),
        (f"ksg_mi(x [n, 2], y [n, 1]) (d = 3), n={n}, k=3", lambda: ksg_mi(x2, y, 3).item(), lambda w: _ckdtree_ksg(x2, y, None, 3, w)),
    ]
    rows = []
    for name, ours, ref in workloads:
        for t, workers in ((1, 1), (threads, -1)):
            torch.set_num_threads(t)
            a, b = ours(), ref(workers)  # warm-up (kernels compiled or loaded from their cache)
            ta, tb = [], []
            for _ in range(repeats):  # interleaved: both see the same machine load
                w0 = time.perf_counter()
                a = ours()
                ta.append(time.perf_counter() - w0)
                w0 = time.perf_counter()
                b = ref(workers)
                tb.append(time.perf_counter() - w0)
            ma, mb = statistics.median(ta), statistics.median(tb)
            rows.append([name, f"{t} / workers={workers}", mb, ma, mb / ma, a, f"{abs(a - b):.1e}"])
    torch.set_num_threads(threads)
    text = (
        "## Multivariate KSG: k-d tree engine vs scipy cKDTree (NPEET style)\n\n"
        f"The same estimator (arr_coc's standardization and tie breaking, KSG-1 / Frenzel-Pompe), two neighbour searches: "
        "arr_coc's compiled k-d tree (`arr_coc.info.knn.tree_radius_counts`; eps and counts equal to brute force bit for bit) "
        "and scipy's `cKDTree` as NPEET uses it (`query(k + 1, p=inf)` for eps, `query_ball_point(eps - 1e-15, p=inf, "
        "return_length=True)` for the marginal counts). Gaussian data, x, y, z dependent. "
        f"Median of {repeats} runs each, interleaved in one process after a warm-up. `threads`: torch threads for arr_coc / "
        "`workers` for cKDTree.\n\n"
        + markdown_table(["workload", "threads", "cKDTree s", "arr_coc s", "speed-up", "estimate (nats)", "abs diff"], rows)
    )
    return text, rows


def main(argv: list[str]) -> None:
    from arr_coc.info import distance_correlation, ksg_mi, mi_features
    from arr_coc.info.knn import numba_kernels

    quick = "--quick" in argv
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    repeats = next((int(a.split("=")[1]) for a in argv if a.startswith("--repeats=")), 1 if quick else 5)
    scale = 10 if quick else 1
    # arr_coc on every core, as scikit-learn's n_jobs=-1 (processes); a 1-thread column beside it
    threads = next((int(a.split("=")[1]) for a in argv if a.startswith("--threads=")), os.cpu_count() or 1)
    torch.set_num_threads(threads)
    engine = "numba (compiled CPU kernels)" if numba_kernels() is not None else "torch"
    sections = []
    if any(a == "--only=kdtree" for a in argv):
        text, _ = kdtree_section(repeats, threads, 2000 if quick else 20_000)
        command = " ".join(["python -m benchmarks info", *argv])
        load_line = f"arr_coc runs with up to {threads} torch thread(s); load average at start: {load}."
        write_report("info_kdtree", "Information measures: multivariate KSG, k-d trees vs scipy cKDTree", command, load_line + "\n\n" + text)
        return
    from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

    import dcor

    def ours(fn):
        """(wall s on every core, CPU s, result, wall s on 1 thread, wall s of the torch engine)."""
        w, c, out = _timed(fn, repeats)
        torch.set_num_threads(1)
        w1, _, _ = _timed(fn, repeats, warmup=False)
        torch.set_num_threads(threads)
        os.environ["ARR_COC_NUMBA"] = "0"  # the device-agnostic torch engine, for comparison
        try:
            wt, _, _ = _timed(fn, max(1, repeats - 2))
        finally:
            del os.environ["ARR_COC_NUMBA"]
        return w, c, out, w1, wt

    # 1. mi_features vs mutual_info_regression
    n, F = 10_000 // scale, 256 // (4 if quick else 1)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, F))
    y = X[:, :16] @ rng.standard_normal(16) * 0.3 + np.sin(2 * X[:, 16]) + rng.standard_normal(n)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    sk_w, _, sk = _timed(lambda: mutual_info_regression(X, y, n_neighbors=3, n_jobs=-1, random_state=0), repeats, warmup=False)
    w, c, res, w1, wt = ours(lambda: mi_features(Xt, yt, 3, clip=True))
    diff = float(np.abs(res.numpy() - sk).max())
    rows = [[f"mi_features vs mutual_info_regression(n_jobs=-1), n={n}, F={F}, k=3", sk_w, w, c, sk_w / w, w1, wt, f"{diff:.2e}"]]

    # 2. 1-D KSG at 1e5 (and 1e6 in a fresh process for its peak memory)
    n1 = 100_000 // scale
    x1, y1 = _gauss(n1, 0.6, 1)
    sk_w, _, sk1 = _timed(lambda: mutual_info_regression(x1[:, None], y1, n_neighbors=3, random_state=0)[0], repeats)
    w, c, o1, w1, wt = ours(lambda: ksg_mi(torch.from_numpy(x1), torch.from_numpy(y1)).item())
    rows.append([f"1-D ksg_mi vs mutual_info_regression, n={n1}", sk_w, w, c, sk_w / w, w1, wt, f"{abs(o1 - sk1):.2e}"])
    n6 = 1_000_000 // scale
    res = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(n6), str(threads)], capture_output=True, text=True, check=True)
    w6, c6, v6, base_mb, peak_mb, load6 = (float(t) for t in res.stdout.split())
    truth6 = -0.5 * math.log(1 - 0.36)

    # 3. distance correlation
    nd = 100_000 // scale
    xd, yd = _gauss(nd, 0.5, 2)
    yd = yd**2 + xd
    dc_w, _, dref = _timed(lambda: dcor.distance_correlation(xd, yd), repeats)
    w, c, dours, w1, wt = ours(lambda: distance_correlation(torch.from_numpy(xd), torch.from_numpy(yd)).item())
    rows.append([f"distance_correlation 1-D vs dcor (AVL/mergesort), n={nd}", dc_w, w, c, dc_w / w, w1, wt, f"{abs(dours - dref):.2e}"])
    nm = 10_000 // scale
    rng = np.random.default_rng(3)
    Xm = rng.standard_normal((nm, 3))
    Ym = np.stack([Xm[:, 0] * Xm[:, 1], Xm[:, 2] ** 2], 1) + 0.5 * rng.standard_normal((nm, 2))
    dc_w, _, dref = _timed(lambda: dcor.distance_correlation(Xm, Ym), max(1, repeats - 4), warmup=False)
    w, c, dours = _timed(lambda: distance_correlation(torch.from_numpy(Xm), torch.from_numpy(Ym)).item(), max(1, repeats - 2))
    rows.append([f"distance_correlation 3-D x 2-D vs dcor (O(n^2)), n={nm}", dc_w, w, c, dc_w / w, "", "", f"{abs(dours - dref):.2e}"])
    sections.append(
        "## Speed and agreement\n\n"
        f"Median of {repeats} runs after a warm-up (numba kernels compiled, or loaded from their cache, in the warm-up). "
        f"`arr_coc s`: on {threads} thread(s), every core, like scikit-learn's `n_jobs=-1`; `1 thread s`: the same call "
        f"with `torch.set_num_threads(1)`; `torch engine s`: with `ARR_COC_NUMBA=0`, the vectorised torch engine that "
        f"also runs on a GPU. The CPU engine here: {engine}.\n\n"
        + markdown_table(
            ["workload", "reference s", "arr_coc s", "arr_coc CPU s", "speed-up", "1 thread s", "torch engine s", "max abs diff"], rows
        )
        + f"\n\n1-D `ksg_mi` at n = {n6:,} (fresh process, rho = 0.6, truth {truth6:.4f}): {w6:.2f} s wall, "
        f"{c6:.2f} s CPU, estimate {v6:.4f}, peak RSS {peak_mb:.0f} MiB ({peak_mb - base_mb:.0f} MiB above the "
        f"{base_mb:.0f} MiB before the call). The process's first call, on 1,000 points, took {load6:.2f} s: loading "
        "(or, on a fresh checkout, compiling and caching) the kernels.\n"
    )

    # 4. sklearn issue 30772: an independent rare binary feature
    rows30772 = []
    for nr in ([20_000, 200_000] if not quick else [20_000]):
        rng = np.random.default_rng(4)
        label = np.zeros(nr, dtype=np.int64)
        label[rng.choice(nr, 100, replace=False)] = 1
        feat = np.stack([rng.standard_normal(nr), np.zeros(nr)], 1)  # Gaussian noise and a constant
        h = -sum(p * math.log(p) for p in (100 / nr, 1 - 100 / nr))
        sk = mutual_info_classif(feat, label, n_neighbors=3, random_state=0)
        ours = mi_features(torch.from_numpy(feat), torch.from_numpy(label), 3, discrete_target=True)
        rows30772.append([nr, h, sk[0], float(ours[0]), sk[1], float(ours[1])])
    sections.append(
        "## Independent features vs a rare label (scikit-learn issue 30772): truth 0\n\n"
        + markdown_table(["n", "H(label)", "sklearn noise feat.", "ours noise feat.", "sklearn constant feat.", "ours constant feat."], rows30772)
    )

    # 5. KSG bias and spread
    seeds = 4 if quick else 10
    brows = []
    for n_b in ([1000] if quick else [1000, 10_000]):
        for name, rho, tf in [
            ("Gaussian", 0.3, None),
            ("Gaussian", 0.6, None),
            ("Gaussian", 0.9, None),
            ("(exp x, y^3) of Gaussian", 0.6, "mono"),
            ("2-D x 2-D Gaussian", None, "mv"),
        ]:
            ests = []
            for s in range(seeds):
                g = torch.Generator().manual_seed(1000 + s)
                if tf == "mv":
                    cov = torch.tensor([[1.0, 0.3, 0.5, 0.1], [0.3, 1.0, 0.2, 0.4], [0.5, 0.2, 1.0, 0.0], [0.1, 0.4, 0.0, 1.0]], dtype=torch.float64)
                    truth = 0.5 * (torch.logdet(cov[:2, :2]) + torch.logdet(cov[2:, 2:]) - torch.logdet(cov)).item()
                    z = torch.randn(n_b, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
                    if n_b > 5000:
                        break
                    ests.append(ksg_mi(z[:, :2], z[:, 2:]).item())
                else:
                    truth = -0.5 * math.log(1 - rho**2)
                    x = torch.randn(n_b, generator=g, dtype=torch.float64)
                    yv = rho * x + math.sqrt(1 - rho**2) * torch.randn(n_b, generator=g, dtype=torch.float64)
                    if tf == "mono":
                        x, yv = torch.exp(x), yv**3
                    ests.append(ksg_mi(x, yv).item())
            if ests:
                m = statistics.mean(ests)
                brows.append([name, "" if rho is None else rho, n_b, truth, m, m - truth, statistics.stdev(ests)])
    sections.append(
        f"## KSG (k = 3) bias and spread over {seeds} seeds\n\n"
        + markdown_table(["distribution", "rho", "n", "true MI (nats)", "mean estimate", "bias", "std"], brows)
    )

    sections.append(kdtree_section(repeats, threads, 2000 if quick else 20_000)[0])

    command = " ".join(["python -m benchmarks info", *argv])
    sections.insert(0, f"arr_coc runs with {threads} torch thread(s); scikit-learn with n_jobs=-1 where noted; load average at start: {load}.")
    write_report("info", "Information measures: arr_coc.info vs scikit-learn and dcor", command, "\n\n".join(sections))


if __name__ == "__main__":
    main(sys.argv[1:])
