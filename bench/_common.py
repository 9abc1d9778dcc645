"""What every benchmark shares: the machine's name, device and precision handling, interleaved timing.

Machines are shared and noisy, so a benchmark never reports an absolute time alone: it runs the
variants it compares side by side, in rotating order (A B C, B C A, ...) so that drift and
thermal changes hit all of them alike, and reports the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from threadpoolctl import threadpool_limits
from timm.layers import LayerScale

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/x.py` works without `pip install -e .`

from itae.devices import resolve_device  # noqa: E402
from itae.errors import DeviceError  # noqa: E402
from itae.extract import resolve_precision  # noqa: E402

__all__ = [
    "ROOT",
    "add_device_args",
    "autocast",
    "cpu_flags",
    "cpu_model",
    "informative_random",
    "limit_threads",
    "machine",
    "median_ratio",
    "resolve",
    "synchronize",
    "time_interleaved",
    "timed",
    "write_json",
]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> str:
    """The CPU's family and model numbers and its vector-unit flags (AVX, AVX-512, AMX, FMA) from /proc/cpuinfo.

    A bare "AMD EPYC" names no generation; these say which kernels torch can use (bf16 needs avx512_bf16 or amx).
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    except OSError:
        return "flags unknown"
    vector = [flag for flag in fields.get("flags", "").split() if flag.startswith(("avx", "amx", "fma"))]
    return f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; flags {' '.join(vector) or 'none'}"


def machine() -> str:
    """One line naming the CPU (model, family, vector flags), its usable cores, torch's threads and the GPU (or "none")."""
    cores = len(os.sched_getaffinity(0))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"CPU {cpu_model()} ({cpu_flags()}), {cores} cores (torch threads {torch.get_num_threads()}); GPU {gpu}; "
            f"torch {torch.__version__}; load average {load}")


def add_device_args(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """``--device`` and (optionally) ``--precision``, shared by every benchmark."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    if precision:
        parser.add_argument(
            "--precision", choices=("auto", "fp32", "bf16"), default="auto",
            help="auto: bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere",
        )
    parser.add_argument("--threads", type=int, help="CPU threads for torch, BLAS and OpenMP (default: all cores)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")


def limit_threads(threads: int | None) -> None:
    """Cap torch's, BLAS's and OpenMP's threads. On a machine shared with other jobs, OpenMP's
    spinning threads collapse when the cores are oversubscribed: one thread each measures fairly."""
    if threads is not None:
        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)


def informative_random(model: torch.nn.Module, layer_scale: float = 0.1) -> None:
    """Set every LayerScale of a random-weight model to ``layer_scale``, in place.

    timm initialises DINOv2's LayerScale at 1e-5, so with random weights every image gets the same
    CLS feature (cosines above 0.999999) and K-Means spends its whole ``max_iter`` on ties. At 0.1
    the features depend on the image (cosines down to ~0.5); the cost of a forward pass is the same.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerScale):
                module.gamma.fill_(layer_scale)


def resolve(device: str, precision: str = "fp32") -> tuple[torch.device, str]:
    """The torch device and the precision actually used (``itae.extract.resolve_precision``'s "auto")."""
    try:
        device = resolve_device(device)
    except DeviceError as error:
        sys.exit(str(error))
    return device, resolve_precision(precision, device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on the device when asked for; a no-op for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, its queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    variants: dict[str, Callable[[], object]], device: torch.device, repeats: int = 5, warmup: int = 1
) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, interleaved, after ``warmup`` untimed rounds.

    Round ``r`` runs the variants in order rotated by ``r`` (A B C, B C A, C A B, ...), so no variant
    always runs first, right after a cold cache or a slow neighbour.

    Returns
    -------
    dict name -> list of ``repeats`` seconds, index ``r`` from round ``r``
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(variants[name], device))
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of ``numerator[r] / denominator[r]``: drift between rounds cancels."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def write_json(path: Path | None, results: dict) -> None:
    """Write ``results`` (with the machine line) to ``path`` when one was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(results, machine=machine()), indent=2, default=float))
