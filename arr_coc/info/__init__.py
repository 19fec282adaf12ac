"""Information measures in torch: exact where closed forms exist, fast, safe on bad input.

Every function that returns information takes ``base`` (e by default: nats; 2: bits).
Tables are probability tensors whose trailing dimensions are the variables (leading ones a
batch); samples are tensors with the sample dimension first (``[n]`` or ``[n, d]``).
Results are tensors on the input's device, computed in float64 (float32 for large float32
inputs).

- tables:      entropy, joint_entropy, conditional_entropy, mutual_information,
               conditional_mutual_information, normalized_mutual_information
- discrete:    discrete_entropy, discrete_mi, discrete_cmi, information_gain (integer samples)
- continuous:  ksg_mi, ksg_cmi, kl_entropy, gaussian_mi, gaussian_cmi, mi_features
- dependence:  pearson, spearman, distance_correlation, permutation_test
- bounds:      infonce_lower_bound, nwj_lower_bound
"""

from arr_coc.info.bounds import infonce_lower_bound, nwj_lower_bound
from arr_coc.info.continuous import gaussian_cmi, gaussian_mi, kl_entropy, ksg_cmi, ksg_mi, mi_features
from arr_coc.info.dependence import distance_correlation, pearson, permutation_test, spearman
from arr_coc.info.discrete import discrete_cmi, discrete_entropy, discrete_mi, information_gain
from arr_coc.info.tables import (
    conditional_entropy,
    conditional_mutual_information,
    entropy,
    joint_entropy,
    mutual_information,
    normalized_mutual_information,
)

__all__ = [
    "conditional_entropy",
    "conditional_mutual_information",
    "discrete_cmi",
    "discrete_entropy",
    "discrete_mi",
    "distance_correlation",
    "entropy",
    "gaussian_cmi",
    "gaussian_mi",
    "infonce_lower_bound",
    "information_gain",
    "joint_entropy",
    "kl_entropy",
    "ksg_cmi",
    "ksg_mi",
    "mi_features",
    "mutual_information",
    "normalized_mutual_information",
    "nwj_lower_bound",
    "pearson",
    "permutation_test",
    "spearman",
]
