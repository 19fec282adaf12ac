"""``python -m arr_coc.info``: the information measures on canonical cases, closed form beside
the estimate, with the time each took. Runs in a few seconds on a laptop CPU."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch

from arr_coc import info


def _gauss(n: int, rho: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, generator=g, dtype=torch.float64)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)


def _dcor_gauss(rho: float) -> float:
    """Population distance correlation of a bivariate Gaussian (Szekely, Rizzo & Bakirov 2007)."""
    r = abs(rho)
    num = r * math.asin(r) + math.sqrt(1 - r * r) - r * math.asin(r / 2) - math.sqrt(4 - r * r) + 1
    return math.sqrt(num / (1 + math.pi / 3 - math.sqrt(3)))


def cases() -> list[tuple[str, str, float, str, Callable[[], torch.Tensor]]]:
    """(measure, case, closed form, unit, estimator)."""
    g = torch.Generator().manual_seed(0)
    rho = 0.8
    i_rho = -0.5 * math.log(1 - rho**2)
    x, y = _gauss(10_000, rho, g)
    xor = torch.zeros(2, 2, 2, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            xor[a, b, a ^ b] = 0.25
    channel = torch.tensor([[0.45, 0.05], [0.1, 0.4]], dtype=torch.float64)
    codes = torch.multinomial(channel.flatten(), 50_000, replacement=True, generator=g)
    cov = torch.tensor([[1.0, 0.3, 0.5, 0.1], [0.3, 1.0, 0.2, 0.4], [0.5, 0.2, 1.0, 0.0], [0.1, 0.4, 0.0, 1.0]], dtype=torch.float64)
    z4 = torch.randn(2000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    i_cov = 0.5 * (torch.logdet(cov[:2, :2]) + torch.logdet(cov[2:, 2:]) - torch.logdet(cov)).item()
    zc = torch.randn(2000, generator=g, dtype=torch.float64)
    xc = zc + torch.randn(2000, generator=g, dtype=torch.float64)
    yc = zc + torch.randn(2000, generator=g, dtype=torch.float64)
    X = torch.randn(5000, 16, generator=g, dtype=torch.float64)
    yt = x[:5000]
    X[:, 0] = rho * yt + math.sqrt(1 - rho**2) * torch.randn(5000, generator=g, dtype=torch.float64)
    v = 1 - rho**2
    xs, ys = x[:1024], y[:1024]
    critic = -0.5 * math.log(v) - (ys[None, :] - rho * xs[:, None]) ** 2 / (2 * v) + ys[None, :] ** 2 / 2
    return [
        ("entropy", "uniform over 8 symbols", 3.0, "bits", lambda: info.entropy(torch.full((8,), 1 / 8), base=2)),
        ("mutual_information", "XOR table: I(X;Y)", 0.0, "bits", lambda: info.mutual_information(xor.sum(-1), base=2)),
        ("conditional_mutual_information", "XOR table: I(X;Y|Z)", 1.0, "bits", lambda: info.conditional_mutual_information(xor, base=2)),
        ("discrete_mi", "50k samples of a binary channel", info.mutual_information(channel).item(), "nats",
         lambda: info.discrete_mi(codes // 2, codes % 2)),
        ("gaussian_mi", "Gaussian rho=0.8, n=10k", i_rho, "nats", lambda: info.gaussian_mi(x, y)),
        ("ksg_mi", "Gaussian rho=0.8, n=10k, k=3", i_rho, "nats", lambda: info.ksg_mi(x, y)),
        ("ksg_mi", "same, (exp x, y^3): MI invariant", i_rho, "nats", lambda: info.ksg_mi(torch.exp(x), y**3)),
        ("ksg_mi", "2-D x 2-D Gaussian, n=2k (log-det)", i_cov, "nats", lambda: info.ksg_mi(z4[:, :2], z4[:, 2:])),
        ("ksg_cmi", "common cause: I(X;Y|Z), n=2k", 0.0, "nats", lambda: info.ksg_cmi(xc, yc, zc)),
        ("gaussian_mi", "same pair, no conditioning", -0.5 * math.log(0.75), "nats", lambda: info.gaussian_mi(xc, yc)),
        ("kl_entropy", "N(0, 3^2), n=10k", 0.5 * math.log(2 * math.pi * math.e * 9), "nats", lambda: info.kl_entropy(3 * x)),
        ("mi_features", "16 features, n=5k: the informative one", i_rho, "nats", lambda: info.mi_features(X, yt)[0]),
        ("pearson", "Gaussian rho=0.8", rho, "", lambda: info.pearson(x, y)),
        ("spearman", "Gaussian rho=0.8: (6/pi) asin(rho/2)", 6 / math.pi * math.asin(rho / 2), "", lambda: info.spearman(x, y)),
        ("distance_correlation", "Gaussian rho=0.8, n=10k, O(n log n)", _dcor_gauss(rho), "", lambda: info.distance_correlation(x, y)),
        ("infonce_lower_bound", "optimal critic, N=1024 (<= I)", i_rho, "nats", lambda: info.infonce_lower_bound(critic)),
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the table. ``--threads=N`` sets torch's intra-op threads (default 1: these
    workloads are many small operations, fastest on one thread, and a shared machine's
    other cores stay free)."""
    argv = argv or []
    threads = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--threads=")), 1)
    torch.set_num_threads(threads)
    rows = []
    for measure, case, truth, unit, fn in cases():
        t0 = time.perf_counter()
        est = float(fn())
        dt = time.perf_counter() - t0
        rows.append((measure, case, truth, est, unit, dt))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    head = f"{'measure':<{w1}}  {'case':<{w2}}  {'closed form':>11}  {'estimate':>9}  {'unit':<4}  {'seconds':>7}"
    print("arr_coc.info: information measures on canonical cases\n")
    print(head)
    print("-" * len(head))
    for measure, case, truth, est, unit, dt in rows:
        print(f"{measure:<{w1}}  {case:<{w2}}  {truth:>11.4f}  {est:>9.4f}  {unit:<4}  {dt:>7.3f}")
    print(f"\ntotal {sum(r[-1] for r in rows):.2f} s, torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(sys.argv[1:])
