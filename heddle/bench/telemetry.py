"""Background telemetry while a scenario runs.

Every process samples its own CPU use (user + system seconds per wall second, in percent of one
core) and resident set size. On a GPU a background NVML sampler adds, for the process's device:
utilisation (SM and memory), memory used, power, temperature and, where the device and driver
expose them, PCIe and NVLink throughput. NVML missing (no ``nvidia-ml-py``, no driver) degrades to
one logged note and CPU-side samples; a counter the device does not support is dropped after its
first failure, with one note.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("heddle.bench")

try:
    _PAGE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE = 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _nvml_counters(nvml, handle) -> dict:
    """name -> function returning the current value, for every counter this device answers."""
    counters = {
        "gpu_util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        "gpu_mem_util_pct": lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).memory),
        "gpu_mem_used_mb": lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
        "gpu_power_w": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
        "gpu_temp_c": lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
        # KB/s over the driver's 20 ms window
        "pcie_tx_mb_s": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) / 1024,
        "pcie_rx_mb_s": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) / 1024,
    }
    tx_id = getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", None)
    rx_id = getattr(nvml, "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", None)
    if tx_id is not None and rx_id is not None:
        def nvlink(field_id):
            def read():  # cumulative KiB counter; the summary reports its increase
                value = nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0]
                if getattr(value, "nvmlReturn", 0) != 0:
                    raise RuntimeError(f"field {field_id} returned {value.nvmlReturn}")
                return float(value.value.ullVal) / 1024
            return read
        counters["nvlink_tx_mb"] = nvlink(tx_id)
        counters["nvlink_rx_mb"] = nvlink(rx_id)
    return counters


class Telemetry:
    """Context manager sampling every ``interval`` seconds on a daemon thread.

    ``gpu_index``: the CUDA device (NVML index) to watch, or None on CPU.
    After exit, ``samples`` holds ``{"t", "cpu_pct", "rss_mb", <gpu counters>}`` dicts and
    :meth:`summary` their mean / max; ``notes`` lists what was unavailable.
    """

    def __init__(self, *, interval: float = 0.25, gpu_index: int | None = None):
        if not interval > 0:
            raise ValueError(f"interval={interval} must be > 0 seconds")
        self.interval = interval
        self.gpu_index = gpu_index
        self.samples: list[dict] = []
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters: dict = {}
        self._nvml = None

    def _note(self, message: str) -> None:
        self.notes.append(message)
        log.warning("heddle bench telemetry: %s", message)

    def _start_nvml(self) -> None:
        try:
            import pynvml as nvml
        except ImportError:
            self._note("NVML unavailable (pip install nvidia-ml-py): GPU counters not sampled")
            return
        try:
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a driver
            self._note(f"NVML unavailable ({type(e).__name__}: {e}): GPU counters not sampled")
            return
        self._nvml = nvml
        self._counters = _nvml_counters(nvml, handle)

    def _sample(self, cpu_before: tuple[float, float]) -> tuple[float, float]:
        now = time.perf_counter()
        t = os.times()
        cpu = t.user + t.system
        wall = now - cpu_before[0]
        sample = {"t": now - self._t0, "rss_mb": rss_bytes() / 2**20,
                  "cpu_pct": 100.0 * (cpu - cpu_before[1]) / wall if wall > 0 else 0.0}
        for name, read in list(self._counters.items()):
            try:
                sample[name] = read()
            except Exception as e:  # noqa: BLE001 - a counter this device lacks
                del self._counters[name]
                self._note(f"{name} not available on GPU {self.gpu_index} ({type(e).__name__})")
        self.samples.append(sample)
        return now, cpu

    def _loop(self) -> None:
        t = os.times()
        state = (time.perf_counter(), t.user + t.system)
        while not self._stop.wait(self.interval):
            state = self._sample(state)
        self._sample(state)

    def __enter__(self) -> "Telemetry":
        self._t0 = time.perf_counter()
        if self.gpu_index is not None:
            self._start_nvml()
        self._thread = threading.Thread(target=self._loop, name="heddle-telemetry", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down a library that worked
                pass

    def summary(self) -> dict:
        """Mean and max of every sampled value (cumulative NVLink counters: their increase)."""
        out: dict = {"telemetry_samples": len(self.samples)}
        keys = sorted({k for s in self.samples for k in s} - {"t"})
        for key in keys:
            values = [s[key] for s in self.samples if key in s]
            if key.startswith("nvlink_"):
                out[f"{key}_total"] = values[-1] - values[0]
                continue
            out[f"{key}_mean"] = sum(values) / len(values)
            out[f"{key}_max"] = max(values)
        if self.notes:
            out["telemetry_note"] = "; ".join(self.notes)
        return out
