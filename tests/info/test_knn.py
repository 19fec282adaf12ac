"""Exact k-NN engines: the strip search (torch) and the grid search (numba) must agree bit for
bit with brute-force tiles, ties, duplicates and outliers included."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arr_coc.info import knn
from arr_coc.info.knn import brute_radius_counts, ksg_counts_2d, kth_1d_sorted, strict_counts_sorted, strip_kth_2d

ENGINES = ["torch"] + (["numba"] if knn.numba_kernels() is not None else [])


@pytest.fixture(autouse=True)
def two_threads():
    """Run the engines' thread pools whatever the machine (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pairs():
    g = torch.Generator().manual_seed(0)
    out = []
    for n, rho in [(5, 0.0), (40, 0.0), (500, 0.9), (800, 0.0), (600, 0.999), (3000, 0.5)]:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        out.append((x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)))
    # heavy tails, and far clusters in either variable
    c = torch.distributions.Cauchy(0.0, 1.0).sample((500,)).double()
    out.append((c, torch.randn(500, generator=g, dtype=torch.float64) + 0.01 * c))
    far = torch.cat([torch.randn(200, generator=g), 1e9 + torch.randn(200, generator=g)]).double()
    out.append((far, torch.randn(400, generator=g, dtype=torch.float64)))
    out.append((torch.randn(400, generator=g, dtype=torch.float64), far))
    # heavy ties (integer data), exact duplicate points, a constant variable
    out.append((torch.randint(0, 5, (500,), generator=g).double(), torch.randint(0, 3, (500,), generator=g).double()))
    d = torch.randn(200, generator=g, dtype=torch.float64)
    out.append((d.repeat(3), (2 * d).repeat(3)))
    out.append((torch.zeros(300, dtype=torch.float64), torch.randn(300, generator=g, dtype=torch.float64)))
    out.append((torch.randn(300, generator=g, dtype=torch.float64), torch.zeros(300, dtype=torch.float64)))
    return out


def _sorted(t):
    return torch.sort(t.reshape(-1)).values


@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_strip_search_equals_brute(k):
    for x, y in _pairs():
        if k >= x.numel():
            continue
        ref, _ = brute_radius_counts([x[:, None], y[:, None]], k, [])
        assert torch.equal(strip_kth_2d(x[None], y, k)[0], ref)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_counts_equal_brute(engine, k):
    for x, y in _pairs():
        if k >= x.numel():
            continue
        _, (cx, cy) = brute_radius_counts([x[:, None], y[:, None]], k, [(0,), (1,)])
        nx, ny, tied = ksg_counts_2d(x[None], y, k, engine=engine)
        # the counts come in no particular point order: compare them as multisets
        assert torch.equal(_sorted(nx), _sorted(cx)) and torch.equal(_sorted(ny), _sorted(cy))
        assert bool(tied[0]) == bool((torch.sort(x).values.diff() == 0).any())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("chunk", [1 << 13, 97])  # one step, or many steps on a thread pool
def test_batched_sets_share_y_and_are_independent(engine, chunk, monkeypatch):
    monkeypatch.setattr(knn, "CHUNK", chunk)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1000, generator=g, dtype=torch.float64)
    x[3] = x[3].round()  # one set with ties
    y = x[0] * 0.5 + torch.randn(1000, generator=g, dtype=torch.float64)
    nx, ny, tied = ksg_counts_2d(x, y, 3, engine=engine)
    eps = strip_kth_2d(x, y, 3)
    assert tied.tolist() == [False, False, False, True, False, False, False]
    for b in range(7):
        ref, (cx, cy) = brute_radius_counts([x[b, :, None], y[:, None]], 3, [(0,), (1,)])
        assert torch.equal(eps[b], ref)
        assert torch.equal(_sorted(nx[b]), _sorted(cx)) and torch.equal(_sorted(ny[b]), _sorted(cy))


@pytest.mark.skipif("numba" not in ENGINES, reason="numba is not installed")
def test_one_large_set_split_across_threads():
    # the compiled engine splits one large set's queries across threads; the torch engine
    # (checked against brute force above) must give the same counts
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 30_000, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[0]) + 0.3 * torch.randn(30_000, generator=g, dtype=torch.float64)
    a = ksg_counts_2d(x, y, 3, engine="numba")
    b = ksg_counts_2d(x, y, 3, engine="torch")
    assert torch.equal(_sorted(a[0]), _sorted(b[0])) and torch.equal(_sorted(a[1]), _sorted(b[1]))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=2, max_value=60),
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.sampled_from([2, 5, 1000]),
)
def test_engines_equal_brute_on_random_tied_sets(n, k, seed, levels):
    # integer-valued coordinates with few levels: ties and duplicate points everywhere
    if k >= n:
        k = n - 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (n,), generator=g).double()
    y = torch.randint(0, levels, (n,), generator=g).double() * 0.5
    ref, (cx, cy) = brute_radius_counts([x[:, None], y[:, None]], k, [(0,), (1,)])
    assert torch.equal(strip_kth_2d(x[None], y, k)[0], ref)
    for engine in ENGINES:
        nx, ny, _ = ksg_counts_2d(x[None], y, k, engine=engine)
        assert torch.equal(_sorted(nx), _sorted(cx)) and torch.equal(_sorted(ny), _sorted(cy))


def test_engine_choice_and_switch(monkeypatch):
    x, y = torch.randn(1, 50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    with pytest.raises(ValueError, match="engine"):
        ksg_counts_2d(x, y, 3, engine="kdtree")
    monkeypatch.setenv("ARR_COC_NUMBA", "0")
    assert knn.numba_kernels() is None  # switched off: auto runs the torch engine
    with pytest.raises(ValueError, match="numba"):
        ksg_counts_2d(x, y, 3, engine="numba")
    nx, ny, _ = ksg_counts_2d(x, y, 3)
    _, (cx, cy) = brute_radius_counts([x[0, :, None], y[:, None]], 3, [(0,), (1,)])
    assert torch.equal(_sorted(nx), _sorted(cx)) and torch.equal(_sorted(ny), _sorted(cy))


def test_counts_use_the_exact_float_predicate():
    # values whose sum with eps rounds across the boundary: the count must follow |v_j - v_i| < eps
    v = torch.tensor([0.1, 0.2, 0.3, 0.30000000000000004, 0.7], dtype=torch.float64)
    eps = (v[3] - v[0]).expand(5).clone()
    got = strict_counts_sorted(v[None], v[None], eps[None])[0]
    ref = ((v[None, :] - v[:, None]).abs() < eps[:, None]).sum(1)
    assert torch.equal(got, ref)
    shared = strict_counts_sorted(v, v.expand(3, 5), eps.expand(3, 5))  # one sorted row for all
    assert torch.equal(shared, ref.expand(3, 5))


def test_kth_1d_sorted_matches_brute():
    g = torch.Generator().manual_seed(2)
    v = torch.sort(torch.randint(0, 50, (300,), generator=g).double() + torch.rand(300, generator=g).double().round()).values
    for k in (1, 4):
        got = kth_1d_sorted(v[None], k)[0]
        d = (v[:, None] - v[None, :]).abs()
        d.fill_diagonal_(math.inf)
        assert torch.equal(got, d.kthvalue(k, dim=1).values)


# ----------------------------------------------------------------------------- k-d trees (issue 17, item 7)

needs_numba = pytest.mark.skipif(knn.numba_kernels() is None, reason="numba not installed")


def _tree_cases():
    g = torch.Generator().manual_seed(30)
    gauss = torch.randn(700, 4, generator=g, dtype=torch.float64)
    corr = gauss @ torch.tensor([[1.0, 0.9, 0.0, 0.3], [0.0, 0.4, 0.2, 0.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.1]], dtype=torch.float64)
    ties = torch.randint(0, 4, (600, 4), generator=g).double()
    dups = torch.randn(80, 4, generator=g, dtype=torch.float64).repeat(8, 1)  # every point 7 exact duplicates
    outliers = torch.cat([torch.randn(400, 4, generator=g, dtype=torch.float64), torch.full((3, 4), 1e6, dtype=torch.float64)])
    rounded = torch.round(torch.randn(500, 4, generator=g, dtype=torch.float64) * 3) / 3  # ties on a rounding grid
    return {"gauss": gauss, "correlated": corr, "ties": ties, "duplicates": dups, "outliers": outliers, "rounded": rounded}


@needs_numba
@pytest.mark.parametrize("case", list(_tree_cases()))
@pytest.mark.parametrize("k", [1, 4])
def test_tree_radius_counts_equal_brute_force_bit_for_bit(case, k):
    V = _tree_cases()[case]
    for split, sets in (
        ([V[:, :1], V[:, 1:2], V[:, 2:3]], [(0, 2), (1, 2), (2,), (0,), (0, 1)]),  # ksg_cmi, scalars
        ([V[:, :2], V[:, 2:]], [(0,), (1,)]),  # ksg_mi, 2-D x 2-D
        ([V[:, :1], V[:, 1:3], V[:, 3:]], [(0, 2), (1, 2), (2,)]),  # ksg_cmi with a 2-D y
    ):
        e1, c1 = brute_radius_counts(split, k, sets)
        e2, c2 = knn.tree_radius_counts(split, k, sets)
        assert torch.equal(e1, e2), case
        for a, b in zip(c1, c2):
            assert torch.equal(a, b), case


@needs_numba
@pytest.mark.parametrize("case", ["gauss", "ties", "duplicates"])
def test_tree_knn_indices_are_the_nearest_by_distance_then_index(case):
    V = _tree_cases()[case][:, :2].contiguous()
    k = 6
    idx = knn.tree_knn_indices(V, k)
    d = torch.cdist(V, V, p=math.inf)
    n = V.shape[0]
    # brute force: sort by (distance, index) - the index breaks ties
    order = torch.stack([torch.tensor(sorted(range(n), key=lambda j: (d[i, j].item(), j))[:k]) for i in range(0, n, 97)])
    assert torch.equal(idx[::97], order)


@needs_numba
def test_estimators_use_the_tree_with_the_brute_force_values():
    from arr_coc.info import ksg_cmi, ksg_mi

    g = torch.Generator().manual_seed(31)
    x = torch.randn(600, 2, generator=g, dtype=torch.float64)
    y = x[:, :1] + torch.randn(600, 1, generator=g, dtype=torch.float64)
    z = torch.randint(0, 5, (600,), generator=g).double()  # tied: jittered, then searched
    assert ksg_mi(x, y, method="tree").item() == ksg_mi(x, y, method="brute").item()
    assert ksg_mi(x, y).item() == ksg_mi(x, y, method="brute").item()
    assert ksg_cmi(x[:, 0], y, z, method="tree").item() == ksg_cmi(x[:, 0], y, z, method="brute").item()
    assert ksg_cmi(x, y, z).item() == ksg_cmi(x, y, z, method="brute").item()
    with pytest.raises(ValueError, match="method"):
        ksg_mi(torch.randn(300, 5), torch.randn(300, 4), method="tree")  # 9 coordinates


@needs_numba
def test_tree_threads_split_the_queries_without_changing_them():
    g = torch.Generator().manual_seed(32)
    V = torch.randn(9000, 3, generator=g, dtype=torch.float64)
    V[:3000, 2] = torch.round(V[:3000, 2])  # some ties
    split = [V[:, :1], V[:, 1:2], V[:, 2:]]
    sets = [(0, 2), (1, 2), (2,)]
    e2, c2 = knn.tree_radius_counts(split, 3, sets)  # 2 threads (fixture)
    torch.set_num_threads(1)
    e1, c1 = knn.tree_radius_counts(split, 3, sets)
    assert torch.equal(e1, e2) and all(torch.equal(a, b) for a, b in zip(c1, c2))
    # spot check against brute force on a few hundred queries (one tile row per query)
    rows = torch.arange(0, 9000, 37)
    d = torch.cdist(V[rows], V, p=math.inf)
    d[torch.arange(rows.numel()), rows] = math.inf
    assert torch.equal(d.kthvalue(3, dim=1).values, e1[rows])
    dz = (V[rows, 2:] - V[None, :, 2]).abs()
    dz[torch.arange(rows.numel()), rows] = math.inf
    assert torch.equal((dz < e1[rows, None]).sum(1), c1[2][rows])


@needs_numba
def test_auto_picks_the_tree_for_low_dimensional_cpu_inputs(monkeypatch):
    # the O(n^2) tiles must not run for multivariate ksg_mi / ksg_cmi / ci_test on the CPU
    from arr_coc.info import causal, continuous

    def refuse(*args, **kwargs):
        raise AssertionError("the tiled O(n^2) search ran")

    monkeypatch.setattr(continuous, "brute_radius_counts", refuse)
    g = torch.Generator().manual_seed(33)
    x, y, z = (torch.randn(400, 2, generator=g, dtype=torch.float64) for _ in range(3))
    continuous.ksg_mi(x, y)
    continuous.ksg_cmi(x, y, z)
    r = causal.ci_test(x[:, 0], y[:, 0], z, kind="continuous", n_permutations=3, generator=torch.Generator().manual_seed(0))
    assert 0 < r.p_value <= 1
    with pytest.raises(AssertionError, match="O\\(n\\^2\\)"):
        continuous.ksg_mi(torch.randn(400, 5, generator=g, dtype=torch.float64), torch.randn(400, 4, generator=g, dtype=torch.float64))
