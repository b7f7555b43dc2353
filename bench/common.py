"""What every benchmark prints: the machine it ran on and one markdown row per figure."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path


def machine(device: str = "cpu") -> str:
    """CPU count and model name, plus the GPU when `device` is a CUDA device."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    text = f"{os.cpu_count()}-core {model}"
    if device.startswith("cuda"):
        import torch

        return f"{text}, {torch.cuda.get_device_name(torch.device(device))}"
    return f"{text}, no GPU"


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def command(script: str, argv: list[str] | None) -> str:
    """The command line as typed from the repository root."""
    return " ".join([f"python bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def row(benchmark: str, cmd: str, device: str, result: str) -> str:
    """One line for the table in bench/RESULTS.md; the load average goes with the result."""
    return (
        f"| {benchmark} | `{cmd}` | {machine(device)} | {datetime.date.today()} "
        f"| {result} (load {load_average()}) |"
    )
