"""A device cost model: how long one serving-engine step takes on a given accelerator.

Device profiles (datasheet figures plus calibrated efficiencies) and model shapes give the time of
any step the engine can run: the weights it must read (the experts its tokens can reach), the KV
it reads and writes at its dtype, the FLOPs of its prefill and decode tokens, a fixed per-step
cost, and swap transfers over the host link. It imports nothing from ``scalellm_jax``: the
scheduler simulator (``python -m benchmarks.simulator --device``) and the engine's simulated device
(``--simulate-device``) both build on it, and a real GPU run recalibrates it
(``python -m device_models.calibration``).
"""

from device_models.calibration import Calibration, load_calibration
from device_models.costs import DeviceCostModel, StepWork
from device_models.profiles import DEVICES, DeviceProfile, device_profile
from device_models.shapes import MODELS, ModelShape, model_shape

__all__ = [
    "DEVICES", "MODELS", "Calibration", "DeviceCostModel", "DeviceProfile", "ModelShape", "StepWork",
    "device_profile", "load_calibration", "model_shape",
]
