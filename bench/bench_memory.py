"""Figure 5: peak resident memory of ``itae extract`` against the size of what it extracts.

Each run is a fresh child process (``python -m itae extract ... --weights random``, or the library's
``extract`` with ``--via library``) on a class-balanced subset of the Fashion-MNIST test set; its
peak resident set (``ru_maxrss`` from ``os.wait4``) is read when it exits. A tiny run (``--base``
images) gives the fixed cost: interpreter, libraries, model and the dataset's raw arrays. For each
size N the table prints

- ``arrays``: features, norms, attention and the final-block cache the extraction keeps, from the
  model's shapes (``bench_theta_change.cache_bytes``), N x bytes per image;
- ``growth``: peak(N) - peak(base);
- ``beyond``: growth - arrays (what the run costs beyond its own results): it must stay ~flat in N.

On 2 CPU cores ViT-S/14 extracts about 10 images/s, so 10,000 images take ~17 min; the default is
300 and 3,000, and the 10,000 figure is extrapolated from the per-image growth (say so when quoting).

    python bench/bench_memory.py                         # 300 and 3,000 images, CPU
    python bench/bench_memory.py --images 1000 10000     # the issue's sizes
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
from bench_theta_change import cache_bytes

MIB = 1024**2

_LIBRARY_CHILD = """
import sys
sys.path.insert(0, {root!r})
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from itae.extract import extract
backbone = load_backbone({model!r}, weights="random", device={device!r})
extract(backbone, balanced_subset(open_source("fashion-mnist", root={root_data!r}), {n}, seed=0), batch_size={batch})
"""


def child_command(via: str, model: str, n: int, batch: int, device: str, workdir: Path, data_root: str | None) -> list[str]:
    if via == "library":
        code = _LIBRARY_CHILD.format(root=str(_common.ROOT), root_data=data_root, model=model, n=n, batch=batch, device=device)
        return [sys.executable, "-c", code]
    where = ["--root", data_root] if data_root else []
    return [
        sys.executable, "-m", "itae", "extract", "--data", "fashion-mnist", *where, "--limit", str(n),
        "--model", model, "--weights", "random", "--device", device, "--batch-size", str(batch),
        "--cache-dir", str(workdir / "cache"), "--out", str(workdir / f"extract-{n}.npz"),
    ]


def peak_rss(command: list[str], workdir: Path, threads: int | None) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of one child process running ``command``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_common.ROOT), os.environ.get("PYTHONPATH")])))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = workdir / "stderr.txt"
    start = time.perf_counter()
    with open(log, "wb") as stderr:  # a file, not a pipe: a chatty progress bar cannot fill it and block the child
        child = subprocess.Popen(command, cwd=_common.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the child failed: {' '.join(command[:6])} ...\n{log.read_text(errors='replace')[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser, precision=False)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--images", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--base", type=int, default=None, help="images of the baseline run, the fixed cost (default: one batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--via", choices=("cli", "library"), default="cli")
    parser.add_argument("--root", default=None, help="folder holding the Fashion-MNIST IDX files (default: Debian's)")
    args = parser.parse_args(argv)
    print(_common.machine())
    shapes = cache_bytes(args.model)
    per_image = shapes["cache_fp32"] + shapes["other_arrays"]  # CPU extraction is fp32
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in [args.base or args.batch, *args.images]:
            peak, seconds = peak_rss(child_command(args.via, args.model, n, args.batch, args.device, Path(workdir), args.root), Path(workdir), args.threads)
            rows.append({"images": n, "peak_bytes": peak, "seconds": seconds, "arrays_bytes": n * per_image})
    base = rows[0]
    print(f"\n`itae extract` via {args.via}, {args.model} random weights, fp32, batch {args.batch}; "
          f"results take {per_image / 1024:.1f} KiB per image")
    print(f"  {'images':>7}{'peak MiB':>10}{'arrays MiB':>12}{'growth MiB':>12}{'beyond MiB':>12}{'wall s':>9}")
    for r in rows:
        r["growth_bytes"] = r["peak_bytes"] - base["peak_bytes"]
        r["beyond_bytes"] = r["growth_bytes"] - (r["arrays_bytes"] - base["arrays_bytes"])
        print(f"  {r['images']:>7,}{r['peak_bytes'] / MIB:>10.0f}{r['arrays_bytes'] / MIB:>12.1f}"
              f"{r['growth_bytes'] / MIB:>12.1f}{r['beyond_bytes'] / MIB:>12.1f}{r['seconds']:>9.1f}")
    first, last = rows[-2], rows[-1]  # the two largest runs: the per-image slope, free of batch-size effects
    slope = (last["peak_bytes"] - first["peak_bytes"]) / (last["images"] - first["images"])
    print(f"  growth per image {slope / 1024:.1f} KiB (arrays alone {per_image / 1024:.1f} KiB); "
          f"extrapolated peak at 10,000 images: {(base['peak_bytes'] + slope * (10_000 - base['images'])) / MIB:,.0f} MiB")
    out = {"figure": "memory", "model": args.model, "via": args.via, "per_image_bytes": per_image, "rows": rows,
           "growth_per_image_bytes": slope}
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
