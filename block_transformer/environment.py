"""What a measurement ran on: one report, under ``"environment"`` in every record the tools write.

``bt-eval`` reports, ``bt-bench`` records, uptraining summaries and the benchmark scripts describe
their machine with :func:`describe`; model cards show its ``hardware`` line next to each figure.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def describe(device: str = "cpu", threads: int | None = None) -> dict:
    """Hardware, load and software versions; ``threads``: the torch threads the measured work used."""
    import transformers

    from . import __version__

    threads = threads or torch.get_num_threads()
    return {
        "hardware": hardware(device, threads),
        "device": str(device),
        "threads": threads,
        **machine_load(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "block_transformer": __version__,
    }


def hardware(device: str, threads: int | None = None) -> str:
    """One line for reports and model cards: the GPU's name, or the CPU's and the threads used."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {cpu_name()}, {threads or torch.get_num_threads()} threads"


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_load() -> dict:
    """Load average and CPU count; ``busy`` when other work would make CPU timings meaningless."""
    load1, load5, load15 = os.getloadavg()
    cpus = os.cpu_count() or 1
    return {"load_avg": [load1, load5, load15], "cpu_count": cpus, "busy": load1 > 0.5 * cpus}


def warn_if_busy(load: dict) -> None:
    """Log a warning before timing on a busy machine (``load``: :func:`machine_load` or :func:`describe`)."""
    if load["busy"]:
        logger.warning("the machine is busy (load %.2f on %d CPUs): timings will be unreliable",
                       load["load_avg"][0], load["cpu_count"])
