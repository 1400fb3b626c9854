"""What a measurement ran on (no hostname): device, library versions, date.

Recorded by the benchmarks (``benchmarks.report`` re-exports :func:`environment`) and by
``specdec distill`` in its run record.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment() -> dict:
    """What the numbers were measured on (no hostname): device, library versions, date."""
    env = {"date": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
           "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
           "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["device_count"] = torch.cuda.device_count()
            env["cuda"] = torch.version.cuda
        else:
            env["device"] = env["cpu"]
            env["device_count"] = 1
    except ImportError:
        env["device"] = env["cpu"]
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    env["implementation"] = sys.implementation.name
    return env
