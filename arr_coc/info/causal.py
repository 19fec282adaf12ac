"""Causal information: discrete structural causal models, interventions, causal entropy,
causal information gain, and conditional-independence tests by conditional mutual information.

Definitions (Simoes, Dastani and van Ommen, 2023; "Fundamental properties of causal entropy
and information gain", CLeaR 2024):

- ``do(X = x)`` replaces X's mechanism by the constant x (its parents are cut).
- Causal entropy of Y under the intervention protocol X' (a distribution over X's values):
  ``H_c(Y | do(X ~ X')) = sum_x p_X'(x) H(Y | do(X = x))``.
- Causal information gain: ``I_c(Y | do(X ~ X')) = H(Y) - H_c(Y | do(X ~ X'))``, with H(Y)
  the observational entropy of Y. Unlike mutual information it can be negative (an
  intervention may make Y less predictable), and it is zero when X has no causal effect on Y,
  however strongly the two are correlated through a confounder.

The protocol X' is an argument: ``"uniform"`` (the default: every value of X forced equally
often, the maximum-entropy protocol that measures control over Y independently of how X
happens to be distributed), ``"observational"`` (X's own marginal), or a probability vector.

CMI-based conditional-independence tests return the statistic and a permutation p-value:
discrete data are permuted within strata of Z; continuous data use the local permutation
scheme of Runge (2018), which shuffles X only among samples with nearby Z, so that the null
distribution keeps the X-Z dependence and breaks only the X-Y link given Z.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

from arr_coc.info.continuous import ksg_cmi, ksg_mi
from arr_coc.info.discrete import discrete_cmi, discrete_mi
from arr_coc.info.knn import TILE_ELEMENTS, tree_knn_indices, use_tree
from arr_coc.info.tables import entropy

__all__ = [
    "CITestResult",
    "DiscreteSCM",
    "causal_entropy",
    "causal_information_gain",
    "ci_test",
]

Protocol = Literal["uniform", "observational"] | torch.Tensor


class DiscreteSCM:
    """A structural causal model over finitely many discrete variables.

    Args:
        cardinalities: ordered mapping name -> number of values; the order must be
            topological (every variable after its parents).
        parents: name -> tuple of parent names (missing names have no parents).
        cpts: name -> conditional probability table ``[|pa_1|, ..., |pa_k|, |X|]`` whose last
            dimension sums to 1 (within 1e-6).

    The joint distribution factorises as ``prod_v p(v | pa(v))``; interventions return new
    models and never change this one.
    """

    def __init__(
        self,
        cardinalities: Mapping[str, int],
        parents: Mapping[str, Sequence[str]],
        cpts: Mapping[str, torch.Tensor],
    ):
        self.names: tuple[str, ...] = tuple(cardinalities)
        if not self.names:
            raise ValueError("cardinalities: expected at least one variable")
        self.cardinalities = {n: int(c) for n, c in cardinalities.items()}
        unknown = set(parents) - set(self.names)
        if unknown:
            raise ValueError(f"parents: unknown variables {sorted(unknown)}")
        self.parents = {n: tuple(parents.get(n, ())) for n in self.names}
        self.cpts: dict[str, torch.Tensor] = {}
        seen: set[str] = set()
        for name in self.names:
            card = self.cardinalities[name]
            if card < 1:
                raise ValueError(f"cardinalities: {name!r} needs at least one value, got {card}")
            for p in self.parents[name]:
                if p not in seen:
                    raise ValueError(
                        f"parents: {name!r} has parent {p!r} that is unknown or comes later; "
                        "list the variables in topological order"
                    )
            if name not in cpts:
                raise ValueError(f"cpts: missing the table of {name!r}")
            table = torch.as_tensor(cpts[name], dtype=torch.float64)
            shape = tuple(self.cardinalities[p] for p in self.parents[name]) + (card,)
            if tuple(table.shape) != shape:
                raise ValueError(f"cpts: table of {name!r} must have shape {shape}, got {tuple(table.shape)}")
            if not torch.isfinite(table).all() or (table < 0).any():
                raise ValueError(f"cpts: table of {name!r} must hold finite non-negative probabilities")
            if not torch.allclose(table.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-6):
                raise ValueError(f"cpts: every row of the table of {name!r} must sum to 1")
            self.cpts[name] = table
            seen.add(name)

    # ------------------------------------------------------------------ distributions
    def joint(self) -> torch.Tensor:
        """The observational joint ``[|V_1|, ..., |V_n|]`` in the order of ``names``."""
        if len(self.names) > len(string.ascii_letters):
            raise ValueError("cardinalities: too many variables for an explicit joint table")
        letter = dict(zip(self.names, string.ascii_letters))
        terms = [
            "".join(letter[p] for p in self.parents[n]) + letter[n] for n in self.names
        ]
        out = "".join(letter[n] for n in self.names)
        return torch.einsum(",".join(terms) + "->" + out, *(self.cpts[n] for n in self.names))

    def marginal(self, *names: str) -> torch.Tensor:
        """The marginal table of the given variables, dimensions in the order given."""
        self._check_names(names)
        joint = self.joint()
        keep = [self.names.index(n) for n in names]
        drop = [i for i in range(len(self.names)) if i not in keep]
        table = joint.sum(dim=drop) if drop else joint
        kept_sorted = sorted(keep)
        return table.permute([kept_sorted.index(i) for i in keep])

    def do(self, **values: int | torch.Tensor) -> "DiscreteSCM":
        """The model under an intervention.

        ``scm.do(X=1)`` sets X to 1 (an atomic intervention); ``scm.do(X=pmf)`` with a
        probability vector draws X from ``pmf`` independently of its parents (a stochastic
        intervention). Either way X's incoming edges are cut. An atomic value must lie in X's
        support ``{0, ..., |X| - 1}`` (an int, an integral float such as ``1.0``, or a
        one-element tensor holding one); anything else, ``1.7`` or ``True`` included, is a
        ValueError naming X.
        """
        self._check_names(values)
        parents = dict(self.parents)
        cpts = dict(self.cpts)
        for name, value in values.items():
            card = self.cardinalities[name]
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                pmf = _check_pmf(name, value, card)
            else:
                v = _support_value(name, value, card)
                pmf = torch.zeros(card, dtype=torch.float64)
                pmf[v] = 1.0
            parents[name] = ()
            cpts[name] = pmf
        return DiscreteSCM(self.cardinalities, parents, cpts)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Ancestral sampling: ``n`` joint draws as a dict name -> long tensor ``[n]``."""
        if n < 1:
            raise ValueError(f"n: expected a positive number of samples, got {n}")
        out: dict[str, torch.Tensor] = {}
        for name in self.names:
            table = self.cpts[name]
            if self.parents[name]:
                idx = tuple(out[p] for p in self.parents[name])
                probs = table[idx]  # [n, card]
            else:
                probs = table.expand(n, -1)
            out[name] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return out

    def _check_names(self, names) -> None:
        unknown = [n for n in names if n not in self.cardinalities]
        if unknown:
            raise ValueError(f"variables: unknown {unknown}; the model has {list(self.names)}")


def _support_value(name: str, value: object, card: int) -> int:
    """An atomic intervention value as an int in ``[0, card)``, or a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name}: expected one value in {{0, ..., {card - 1}}} or a probability vector, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise ValueError(f"{name}: expected an integer value in {{0, ..., {card - 1}}}, got {value!r}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"{name}: expected a value in the support {{0, ..., {card - 1}}}, got {value!r} (not an integer)")
    v = int(value)
    if not 0 <= v < card:
        raise ValueError(f"{name}: expected a value in the support {{0, ..., {card - 1}}}, got {v}")
    return v


def _check_pmf(name: str, pmf: torch.Tensor, card: int) -> torch.Tensor:
    """A probability vector of length ``card`` in float64, or a ValueError naming ``name``."""
    pmf = pmf.to(torch.float64)
    if pmf.shape != (card,) or (pmf < 0).any() or not torch.isclose(pmf.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise ValueError(f"{name}: expected a probability vector of length {card}")
    return pmf


def _protocol_pmf(scm: DiscreteSCM, intervened: str, protocol: Protocol) -> torch.Tensor:
    card = scm.cardinalities[intervened]
    if isinstance(protocol, torch.Tensor):
        return _check_pmf("protocol", protocol, card)
    if protocol == "uniform":
        return torch.full((card,), 1.0 / card, dtype=torch.float64)
    if protocol == "observational":
        return scm.marginal(intervened)
    raise ValueError(f"protocol: expected 'uniform', 'observational' or a probability vector, got {protocol!r}")


def causal_entropy(
    scm: DiscreteSCM,
    target: str,
    intervened: str,
    protocol: Protocol = "uniform",
    *,
    base: float = math.e,
) -> torch.Tensor:
    """``H_c(Y | do(X ~ X')) = sum_x p_X'(x) H(Y | do(X = x))`` (scalar tensor)."""
    scm._check_names([target, intervened])
    if target == intervened:
        raise ValueError("target: must differ from the intervened variable")
    pmf = _protocol_pmf(scm, intervened, protocol)
    h = torch.stack(
        [entropy(scm.do(**{intervened: x}).marginal(target), base=base) for x in range(pmf.numel())]
    )
    return (pmf * h).sum()


def causal_information_gain(
    scm: DiscreteSCM,
    target: str,
    intervened: str,
    protocol: Protocol = "uniform",
    *,
    base: float = math.e,
) -> torch.Tensor:
    """``I_c(Y | do(X ~ X')) = H(Y) - H_c(Y | do(X ~ X'))`` (may be negative; not clipped)."""
    return entropy(scm.marginal(target), base=base) - causal_entropy(scm, target, intervened, protocol, base=base)


# ---------------------------------------------------------------------- CI tests
@dataclass
class CITestResult:
    """statistic: I(X;Y|Z) (or I(X;Y) without Z) in the requested base; p_value: permutation
    p-value ``(1 + #{null >= statistic}) / (1 + n_permutations)``; null: [n_permutations]."""

    statistic: torch.Tensor
    p_value: float
    null: torch.Tensor


def _as_2d(name: str, t: torch.Tensor, n: int | None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in (1, 2):
        raise ValueError(f"{name}: expected a [n] or [n, d] tensor")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} samples like x, got {t.shape[0]}")
    return t if t.dim() == 2 else t[:, None]


def _stratified_permutation(z_codes: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A permutation of range(n) that only moves samples within equal values of z_codes."""
    n = z_codes.numel()
    keys = z_codes.double() + torch.rand(n, generator=generator, dtype=torch.float64) * 0.5
    shuffled = keys.argsort()  # grouped by stratum, random order inside each
    grouped = z_codes.argsort(stable=True)  # grouped by stratum, original order
    perm = torch.empty(n, dtype=torch.long)
    perm[grouped] = shuffled
    return perm


def _local_permutation(neighbours: list[list[int]], generator: torch.Generator | None) -> torch.Tensor:
    """Runge (2018): each i takes the x of a random unused neighbour in Z, if any remains."""
    n = len(neighbours)
    order = torch.randperm(n, generator=generator).tolist()
    picks = torch.rand(n, len(neighbours[0]), generator=generator).argsort(dim=1).tolist()
    used = bytearray(n)
    perm = [0] * n
    for i in order:
        cands = neighbours[i]
        choice = cands[picks[i][0]]
        for r in picks[i]:
            if not used[cands[r]]:
                choice = cands[r]
                break
        used[choice] = 1
        perm[i] = choice
    return torch.tensor(perm)


def _z_neighbours(z2: torch.Tensor, k_perm: int) -> torch.Tensor:
    """``[n, k_perm]``: the ``k_perm`` nearest samples in Z (max-norm, itself included), by the
    k-d tree where it applies (no n x n matrix), else from tiles of the distance matrix."""
    if use_tree([z2]):
        return tree_knn_indices(z2, k_perm)
    rows = max(1, TILE_ELEMENTS // z2.shape[0])
    return torch.cat(
        [torch.cdist(z2[r : r + rows], z2, p=float("inf")).topk(k_perm, largest=False, dim=1).indices for r in range(0, z2.shape[0], rows)]
    )


def ci_test(
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    kind: Literal["discrete", "continuous"] = "discrete",
    n_permutations: int = 200,
    k: int = 5,
    k_perm: int = 5,
    generator: torch.Generator | None = None,
    base: float = math.e,
) -> CITestResult:
    """Test X independent of Y given Z by CMI with a permutation p-value.

    discrete: plug-in ``discrete_cmi`` (or ``discrete_mi`` without Z), X permuted within the
    strata of Z. continuous: ``ksg_cmi`` with ``k`` neighbours (``ksg_mi`` without Z), X
    permuted locally among the ``k_perm`` nearest neighbours in Z (Runge 2018). On the CPU
    with numba and at most 8 coordinates in all, both searches use exact k-d trees
    (``arr_coc.info.knn``): O(n log n)-ish per permutation instead of O(n^2); the neighbours
    in Z are then ordered by distance, ties by index.
    Inputs: x, y, z as [n] or [n, d] tensors (integers for ``discrete``).
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations: expected a positive count, got {n_permutations}")
    if kind not in ("discrete", "continuous"):
        raise ValueError(f"kind: expected 'discrete' or 'continuous', got {kind!r}")
    n = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() >= 1 else None
    if n is None or n < 2:
        raise ValueError("x: expected a tensor with at least 2 samples")
    _as_2d("y", y, n)
    if z is not None:
        _as_2d("z", z, n)

    if kind == "discrete":
        if z is None:
            stat_fn = lambda xx: discrete_mi(xx, y, base=base)  # noqa: E731
            codes = torch.zeros(n, dtype=torch.long)
        else:
            stat_fn = lambda xx: discrete_cmi(xx, y, z, base=base)  # noqa: E731
            z2 = _as_2d("z", z, n).cpu().long()
            codes = torch.unique(z2, dim=0, return_inverse=True)[1]
        perm_fn = lambda: _stratified_permutation(codes, generator)  # noqa: E731
    else:
        if z is None:
            stat_fn = lambda xx: ksg_mi(xx, y, k=k, base=base)  # noqa: E731
            perm_fn = lambda: torch.randperm(n, generator=generator)  # noqa: E731
        else:
            if not 1 <= k_perm < n:
                raise ValueError(f"k_perm: expected 1 <= k_perm < n = {n}, got {k_perm}")
            stat_fn = lambda xx: ksg_cmi(xx, y, z, k=k, base=base)  # noqa: E731
            z2 = _as_2d("z", z, n).cpu().double()
            neighbours = _z_neighbours(z2, k_perm).tolist()  # includes i itself
            perm_fn = lambda: _local_permutation(neighbours, generator)  # noqa: E731

    statistic = stat_fn(x)
    null = torch.stack([stat_fn(x[perm_fn().to(x.device)]) for _ in range(n_permutations)])
    p_value = (1 + int((null >= statistic - 1e-12).sum())) / (1 + n_permutations)
    return CITestResult(statistic=statistic, p_value=p_value, null=null)
