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

``--load N`` measures reading a saved extraction of N images instead: the parent extracts once and saves
it both ways, a folder (the cache's format, memory-mapped by ``Extraction.load``) and one ``.npz`` (read
whole, as the cache was read before format 3); then fresh children each load one and, in a second round,
also recompute the features at the median θ (``itae(θ)`` reads every cached value once). Besides the peak
RSS each child reports the peak after its model was loaded (the peak reset through ``/proc/self/clear_refs``,
minus the memory then: what the reading costs) and its anonymous and file-backed resident memory at the end
(``/proc/self/status``):
pages of a memory-mapped file are file-backed, and the kernel can drop them under pressure.

    python bench/bench_memory.py                         # 300 and 3,000 images, CPU
    python bench/bench_memory.py --images 1000 10000     # the issue's sizes
    python bench/bench_memory.py --load 1000             # reading a 1,000-image extraction back
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
extract(backbone, balanced_subset(open_source("fashion-mnist", root={root_data!r}), {n}, seed=0), batch_size={batch},
        precision={precision!r})
"""


_LOAD_CHILD = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from itae.backbones import load_backbone
from itae.extract import Extraction
backbone = load_backbone({model!r}, weights="random", device="cpu")
with open("/proc/self/clear_refs", "w") as refs:  # from here on VmHWM, the peak, counts what the reading costs
    refs.write("5")
base = dict(line.split(":", 1) for line in open("/proc/self/status"))["VmRSS"]
if {path!r}:
    extraction = Extraction.load({path!r})
    extraction.attach(backbone)
    if {itae!r}:
        extraction.itae(float(np.median(extraction.query_norms[:, 1:])))
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(*(int(value.split()[0]) * 1024 for value in (base, status["VmHWM"], status["RssAnon"], status["RssFile"])))
"""


def child_command(via: str, model: str, n: int, batch: int, device: str, workdir: Path, data_root: str | None,
                  precision: str = "fp32") -> list[str]:
    if via == "library":
        code = _LIBRARY_CHILD.format(root=str(_common.ROOT), root_data=data_root, model=model, n=n, batch=batch,
                                     device=device, precision=precision)
        return [sys.executable, "-c", code]
    where = ["--root", data_root] if data_root else []
    return [
        sys.executable, "-m", "itae", "extract", "--data", "fashion-mnist", *where, "--limit", str(n),
        "--model", model, "--weights", "random", "--device", device, "--batch-size", str(batch), "--precision", precision,
        "--cache-dir", str(workdir / "cache"), "--out", str(workdir / f"extract-{n}.npz"),
    ]


def peak_rss(command: list[str], workdir: Path, threads: int | None, stdout=subprocess.DEVNULL) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of one child process running ``command``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(_common.ROOT), os.environ.get("PYTHONPATH")])))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = workdir / "stderr.txt"
    start = time.perf_counter()
    with open(log, "wb") as stderr:  # a file, not a pipe: a chatty progress bar cannot fill it and block the child
        child = subprocess.Popen(command, cwd=_common.ROOT, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"the child failed: {' '.join(command[:6])} ...\n{log.read_text(errors='replace')[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def load_figure(args) -> dict:
    """Peak RSS of children that read back an extraction of ``args.load`` images, saved as a folder and as an .npz."""
    from itae.backbones import load_backbone
    from itae.data import balanced_subset, open_source
    from itae.extract import extract

    backbone = load_backbone(args.model, weights="random", device="cpu")
    dataset = balanced_subset(open_source("fashion-mnist", root=args.root), args.load, seed=0)
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        extraction = extract(backbone, dataset, batch_size=args.batch, precision=args.precision)
        paths = {"none (model only)": "", "folder (memory-mapped)": str(extraction.save(workdir / "folder")),
                 ".npz (read whole)": str(extraction.save(workdir / "archive.npz"))}
        saved = sum(f.stat().st_size for f in (workdir / "folder").iterdir())
        del extraction
        rows = []
        for itae in (False, True):
            for name, path in paths.items():
                if itae and not path:
                    continue
                code = _LOAD_CHILD.format(root=str(_common.ROOT), model=args.model, path=path, itae=itae)
                out = workdir / "stdout.txt"
                with open(out, "wb") as stdout:
                    peak, seconds = peak_rss([sys.executable, "-c", code], workdir, args.threads, stdout=stdout)
                base, peak_after, anon, file_backed = map(int, out.read_text().split())
                rows.append({"read": name, "itae": itae, "peak_bytes": peak, "peak_over_model_bytes": peak_after - base,
                             "anon_bytes": anon, "file_bytes": file_backed, "seconds": seconds})
    print(f"\nReading back {args.load:,} images ({args.model} random weights, {args.precision}; {saved / MIB:.0f} MiB on disk)")
    print("  peak: of the whole process; peak over model: the peak after the model was loaded, minus the memory then")
    print(f"  {'read':<26}{'then':>10}{'peak MiB':>10}{'peak over model':>17}{'anon MiB':>10}{'file MiB':>10}{'wall s':>8}")
    for r in rows:
        print(f"  {r['read']:<26}{'itae(θ)' if r['itae'] else 'load':>10}{r['peak_bytes'] / MIB:>10.0f}"
              f"{r['peak_over_model_bytes'] / MIB:>17.0f}{r['anon_bytes'] / MIB:>10.0f}{r['file_bytes'] / MIB:>10.0f}{r['seconds']:>8.1f}")
    return {"figure": "memory_load", "model": args.model, "images": args.load, "precision": args.precision,
            "saved_bytes": saved, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_device_args(parser, precision=False)
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--images", type=int, nargs="+", default=[300, 3000])
    parser.add_argument("--base", type=int, default=None, help="images of the baseline run, the fixed cost (default: one batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--via", choices=("cli", "library"), default="cli")
    parser.add_argument("--root", default=None, help="folder holding the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="of the extraction (default fp32: the larger cache, and comparable across CPUs)")
    parser.add_argument("--load", type=int, metavar="N", help="measure reading back an extraction of N images instead")
    args = parser.parse_args(argv)
    print(_common.machine())
    if args.load:
        out = load_figure(args)
        _common.write_json(args.json, out)
        return out
    shapes = cache_bytes(args.model)
    per_image = shapes[f"cache_{args.precision}"] + shapes["other_arrays"]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for n in [args.base or args.batch, *args.images]:
            peak, seconds = peak_rss(child_command(args.via, args.model, n, args.batch, args.device, Path(workdir), args.root, args.precision), Path(workdir), args.threads)
            rows.append({"images": n, "peak_bytes": peak, "seconds": seconds, "arrays_bytes": n * per_image})
    base = rows[0]
    print(f"\n`itae extract` via {args.via}, {args.model} random weights, {args.precision}, batch {args.batch}; "
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
