"""Analysis tools built on ``arr_coc.info``: quantization information loss, information flow
through layers, and pipeline-stage planning. (Causal information lives in
``arr_coc.info.causal``.)"""

from arr_coc.analysis.flow import ActivationRecorder, LayerInformation, information_plane, noisy_gaussian_information, probe_information
from arr_coc.analysis.pipeline import StagePlan, bubble_fraction, gradient_snr, per_example_gradients, plan_stages
from arr_coc.analysis.quantization import QuantizationReport, dequantize, quantization_report, quantize

__all__ = [
    "ActivationRecorder",
    "LayerInformation",
    "QuantizationReport",
    "StagePlan",
    "bubble_fraction",
    "dequantize",
    "gradient_snr",
    "information_plane",
    "noisy_gaussian_information",
    "per_example_gradients",
    "plan_stages",
    "probe_information",
    "quantization_report",
    "quantize",
]
