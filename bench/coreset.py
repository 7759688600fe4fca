"""Benchmark of triage.coreset; prints ONE JSON object on stdout.

Cases (each in its own subprocess so that peak memory is attributable):

* ``greedy``: k_center_greedy on ``--n`` x ``--d`` random normal float32 features (fixed seed),
  selecting ``--k`` with nothing labeled.
* ``greedy_at_ref_n`` and ``full_matrix_ref``: the same greedy and a reference that builds the
  full ``n x n`` float32 distance matrix, at the largest ``n`` whose matrix fits in a sixth of
  physical RAM (leaving room for concurrent processes; ``--ref-n`` overrides); the picks of both
  are compared.
* ``outliers_direct`` / ``outliers_summary``: k_center_with_outliers below and above its
  ``max_direct`` threshold.

Memory method: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set, KiB on Linux)
is read in the child after the features are generated and again after the case ran;
``peak_extra_mib`` is the difference, i.e. the peak memory the algorithm needed beyond its
input (0 if it never exceeded the earlier peak). ``peak_rss_mib`` is the child's absolute peak.
Timings are wall-clock ``time.perf_counter`` of the call alone, after a small warm-up call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _features(n: int, d: int, seed: int):
    import torch

    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _full_matrix_greedy(x, k: int, first: int) -> tuple[list[int], float]:
    """Reference: full float32 distance matrix, then farthest-first on its rows."""
    import torch

    sq = (x * x).sum(1)
    dist = x @ x.T  # [n, n]: the only large allocation, modified in place below
    dist.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_(min=0.0).sqrt_()
    dist.fill_diagonal_(0.0)
    picks = [first]
    md = dist[first].clone()
    for _ in range(k - 1):
        j = int(torch.argmax(md))
        picks.append(j)
        torch.minimum(md, dist[j], out=md)
    return picks, float(md.max())


def _child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from triage.coreset import k_center_greedy, k_center_with_outliers

    warm = _features(64, 8, 1)
    k_center_greedy(warm, [], 4)
    k_center_with_outliers(warm, [], 2, 1)
    x = _features(args.n, args.d, args.seed)
    base = _maxrss_mib()
    t0 = time.perf_counter()
    out: dict = {}
    if args.case == "greedy":
        res = k_center_greedy(x, [], args.k, seed=args.seed)
        out.update(radius=res.radius, picks=res.indices.tolist())
    elif args.case == "full_matrix_ref":
        first = int(np.random.default_rng(args.seed).integers(args.n))  # same rule as the library
        picks, radius = _full_matrix_greedy(x, args.k, first)
        out.update(radius=radius, picks=picks)
    else:
        res = k_center_with_outliers(x, [], args.k, args.z, seed=args.seed)
        out.update(radius=res.radius, bound=res.bound, guess_radius=res.guess_radius,
                   summary_radius=res.summary_radius, n_outliers=int(res.outliers.size))
    elapsed = time.perf_counter() - t0
    peak = _maxrss_mib()
    out.update(n=args.n, d=args.d, k=args.k, time_s=round(elapsed, 3),
               peak_rss_mib=round(peak, 1), peak_extra_mib=round(max(0.0, peak - base), 1),
               input_mib=round(x.numel() * 4 / 2**20, 1), torch_threads=torch.get_num_threads())
    return out


def _run(case: str, n: int, d: int, k: int, seed: int, z: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--n", str(n), "--d", str(d),
           "--k", str(k), "--seed", str(seed), "--z", str(z)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:], "returncode": proc.returncode}
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="points for the main greedy case")
    p.add_argument("--d", type=int, default=512, help="feature dimension (all cases)")
    p.add_argument("--k", type=int, default=1000, help="picks for greedy and reference cases")
    p.add_argument("--ref-n", type=int, default=None, help="n for the full-matrix reference")
    p.add_argument("--outlier-n", type=int, default=20_000, help="n for outliers_summary")
    p.add_argument("--outlier-k", type=int, default=100)
    p.add_argument("--outlier-z", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--z", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(_child(args)))
        return

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ref_n = args.ref_n or int(math.isqrt(ram // 6 // 4) // 1024 * 1024)
    ref_n = min(ref_n, args.n)
    k_ref = min(args.k, ref_n)
    res: dict = {
        "machine": {"nproc": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
                    "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
        "memory_method": "ru_maxrss delta in a subprocess per case (after input generation)",
        "ref_n_choice": ("set by --ref-n" if args.ref_n else "largest multiple of 1024 with "
                         "n^2 float32 <= RAM/6 (room for concurrent processes)")
                        + f": n={ref_n}, {ref_n * ref_n * 4 / 2**30:.2f} GiB matrix",
    }
    res["greedy"] = _run("greedy", args.n, args.d, args.k, args.seed)
    res["greedy_at_ref_n"] = _run("greedy", ref_n, args.d, k_ref, args.seed)
    res["full_matrix_ref"] = _run("full_matrix_ref", ref_n, args.d, k_ref, args.seed)
    a = res["greedy_at_ref_n"].pop("picks", [])
    b = res["full_matrix_ref"].pop("picks", [])
    res["greedy"].pop("picks", None)
    mismatch = next((i for i, (u, v) in enumerate(zip(a, b, strict=False)) if u != v), None)
    res["ref_same_picks"] = bool(a) and a == b
    res["ref_first_mismatch"] = mismatch
    n_direct = min(4000, args.outlier_n)
    res["outliers_direct"] = _run("outliers", n_direct, args.d, args.outlier_k, args.seed,
                                  args.outlier_z)
    res["outliers_summary"] = _run("outliers", args.outlier_n, args.d, args.outlier_k,
                                   args.seed, args.outlier_z)
    res["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
