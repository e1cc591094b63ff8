"""16-bit compute on a CPU without native 16-bit matrix products is named, once, with the fix."""
from __future__ import annotations

import logging

import torch

from infinity.config.training import Precision
from infinity.zero import settings
from infinity.zero.settings import slow_half_precision

CPU = torch.device("cpu")


def test_bf16_and_fp16_on_an_avx2_cpu_are_named_with_the_fix():
    for p in (Precision.BF16, Precision.FP16):
        message = slow_half_precision(p, CPU, "AVX2")
        assert message is not None and f"{p.value}.enabled false" in message and "AVX2" in message


def test_fp32_a_native_16_bit_cpu_and_a_gpu_are_not():
    assert slow_half_precision(Precision.FP32, CPU, "AVX2") is None
    assert slow_half_precision(Precision.BF16, CPU, "AVX512_BF16") is None
    assert slow_half_precision(Precision.BF16, CPU, "AMX") is None
    assert slow_half_precision(Precision.BF16, torch.device("cuda"), "AVX2") is None


def test_an_avx512_cpu_is_judged_by_its_features_per_format():
    """torch says "AVX512" for an AVX-512 CPU with or without AVX512-BF16: bf16 is fast with the feature
    (0.029 s against fp32's 0.058 s, [Note: half precision on a CPU without it]); fp16 is not (7.75 s)."""
    bf16_cpu = frozenset({"avx512_bf16"})
    assert slow_half_precision(Precision.BF16, CPU, "AVX512", bf16_cpu) is None
    fp16 = slow_half_precision(Precision.FP16, CPU, "AVX512", bf16_cpu)
    assert fp16 is not None and "no native fp16" in fp16 and "fp16.enabled false" in fp16 and "AMX-FP16" in fp16
    assert slow_half_precision(Precision.BF16, CPU, "AVX512") is not None  # AVX-512 without BF16
    assert slow_half_precision(Precision.FP16, CPU, "AVX512", frozenset({"amx_fp16"})) is None


def test_this_cpus_features_are_read_from_torch():
    features = settings.cpu_features()
    assert features <= {"avx512_bf16", "amx_tile", "amx_fp16"}
    assert ("avx512_bf16" in features) == torch.cpu._is_avx512_bf16_supported()


def test_the_warning_is_logged_once_per_precision(caplog, monkeypatch):
    monkeypatch.setattr(settings, "_warned_half", set())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(settings, "cpu_features", frozenset)  # an AVX2 CPU has none of them
    with caplog.at_level(logging.WARNING, logger="infinity.zero"):
        for _ in range(3):
            settings.warn_slow_half_precision(Precision.BF16, CPU)
    assert sum("bf16.enabled false" in r.message for r in caplog.records) == 1
