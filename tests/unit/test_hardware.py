"""hardware.device / hardware.mixed_precision resolution on machines with and without a CUDA GPU."""

import pytest

from acestep_ft.config import HardwareConfig
from acestep_ft.config import resolve_hardware


@pytest.mark.parametrize("device,precision,cuda,bf16,expected", [
    ("auto", "auto", False, False, (True, "no")),    # this CPU machine: fp32 on the CPU
    ("auto", "auto", True, True, (False, "bf16")),   # an Ampere+ GPU
    ("auto", "auto", True, False, (False, "no")),    # an older GPU without bf16
    ("cpu", "auto", True, True, (True, "no")),       # CPU asked for on a GPU machine
    ("cuda", "fp16", True, True, (False, "fp16")),   # explicit choices pass through
    ("cpu", "bf16", False, False, (True, "bf16")),   # bf16 autocast on the CPU is allowed
])
def test_resolve_hardware(device, precision, cuda, bf16, expected):
    assert resolve_hardware(HardwareConfig(device=device, mixed_precision=precision), cuda, bf16) == expected
