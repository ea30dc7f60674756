"""Telemetry: CPU/RSS sampling, NVML absent (one note, no crash), NVML present (fake module)."""

import logging
import sys
import types

from heddle.bench.telemetry import Telemetry, rss_bytes


def _busy(t: Telemetry, samples: int = 3):
    """Work until the sampler has taken ``samples`` samples (no sleeps for synchronisation)."""
    x = 0
    while len(t.samples) < samples:
        x += sum(range(1000))
    return x


def test_nvml_absent_degrades_to_one_note(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    caplog.set_level(logging.WARNING, logger="heddle.bench")
    with Telemetry(interval=0.01, gpu_index=0) as t:
        _busy(t)
    s = t.summary()
    notes = [r for r in caplog.records if "NVML unavailable" in r.getMessage()]
    assert len(notes) == 1
    assert "NVML unavailable" in s["telemetry_note"]
    assert s["telemetry_samples"] >= 3
    assert s["rss_mb_max"] > 10 and s["cpu_pct_mean"] > 0
    assert not any(k.startswith("gpu_") for k in s)


def test_cpu_only_has_no_note():
    with Telemetry(interval=0.01) as t:
        _busy(t, 2)
    s = t.summary()
    assert "telemetry_note" not in s and s["rss_mb_mean"] <= s["rss_mb_max"]
    assert rss_bytes() > 1 << 20


def _fake_nvml(fail_power: bool):
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU, nvml.NVML_PCIE_UTIL_TX_BYTES, nvml.NVML_PCIE_UTIL_RX_BYTES = 0, 0, 1
    nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139
    counter = {"kib": 0}
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=30)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 * 2**30)

    def power(h):
        if fail_power:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return 250_000
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetTemperature = lambda h, kind: 65
    nvml.nvmlDeviceGetPcieThroughput = lambda h, kind: 2048 if kind == 0 else 1024

    def fields(h, ids):
        counter["kib"] += 1024
        return [types.SimpleNamespace(nvmlReturn=0, value=types.SimpleNamespace(ullVal=counter["kib"]))]
    nvml.nvmlDeviceGetFieldValues = fields
    return nvml


def test_nvml_counters_sampled_and_unsupported_dropped(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(fail_power=True))
    caplog.set_level(logging.WARNING, logger="heddle.bench")
    with Telemetry(interval=0.01, gpu_index=1) as t:
        _busy(t, 4)
    s = t.summary()
    assert s["gpu_util_pct_mean"] == 80 and s["gpu_mem_used_mb_max"] == 2048 and s["gpu_temp_c_max"] == 65
    assert s["pcie_tx_mb_s_mean"] == 2.0 and s["pcie_rx_mb_s_mean"] == 1.0
    assert s["nvlink_tx_mb_total"] > 0
    assert "gpu_power_w_mean" not in s
    assert [r.getMessage() for r in caplog.records].count(
        "heddle bench telemetry: gpu_power_w not available on GPU 1 (RuntimeError)") == 1


def test_nvml_index_follows_cuda_visible_devices(monkeypatch):
    from heddle.bench.runner import nvml_index

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert nvml_index(0) == 4 and nvml_index(1) == 6
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert nvml_index(0) == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_index(3) == 3
