"""Cost of the checks made before a received instance is acknowledged (issue 23, item 2).

Times :func:`triage.ingest.dicom.check_received` (what the C-STORE handler and STOW-RS
run on every instance before answering) on instances as they arrive, a few thousand
times each, and its parts: the parse without converting every value (``parse_header``:
elements and their declared lengths; the received instance is parsed again when the
ingest loop reads it) and the pixel data check. For comparison, the reader's parse that
converts every value (``parse_every_value``), which the check leaves to the reader.
Instances:

- ``ct_512_synthetic``: a 512x512 16-bit CT as ``bench/network_ingest.py`` sends it
  (triage's own writer: a short header);
- ``ct_512_real_header``: pydicom's CT_small.dcm header (a scanner's, ~100 elements)
  over 512x512 16-bit pixels: a realistic CT slice;
- ``mr_jpeg2000``: pydicom's MR_small_jp2klossless.dcm (encapsulated: item framing).

Prints one JSON object (``--out`` writes it too). Per-instance figures are the best and
the median of ``--batches`` batches of ``--n`` calls, in microseconds.

    .venv/bin/python bench/receive_check.py --n 3000
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.ingest.dicom import check_pixel_data, check_received, parse_dataset  # noqa: E402
from triage.replay.dicom_writer import image_dataset  # noqa: E402

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def instances() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.normal(40, 300, (512, 512)).astype(np.int16)
    synthetic = image_dataset(pixels, modality="CT", study_uid="2.25.1", window=(40.0, 400.0),
                              rescale=(1.0, -1024.0))
    real = pydicom.dcmread(CORPUS / "CT_small.dcm")
    real.Rows = real.Columns = 512
    real.PixelData = pixels.tobytes()
    return {
        "ct_512_synthetic": _encoded(synthetic),
        "ct_512_real_header": _encoded(real),
        "mr_jpeg2000": (CORPUS / "MR_small_jp2klossless.dcm").read_bytes(),
    }


def timed(call: Callable[[], object], n: int, batches: int) -> dict[str, float]:
    per_call = []
    for _ in range(batches):
        started = time.perf_counter()
        for _ in range(n):
            call()
        per_call.append((time.perf_counter() - started) / n * 1e6)
    return {"best_us": round(min(per_call), 1), "median_us": round(statistics.median(per_call), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="calls per batch")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    results: dict[str, object] = {}
    for name, data in instances().items():
        check_received(data)  # it passes: the cost measured is the cost of a good instance
        ds = parse_dataset(data)
        results[name] = {
            "bytes": len(data),
            "elements": sum(1 for _ in ds.iterall()),
            "check_received": timed(lambda d=data: check_received(d), args.n, args.batches),
            "parse_header": timed(lambda d=data: parse_dataset(d, every_value=False),
                                  args.n, args.batches),
            "parse_every_value": timed(lambda d=data: parse_dataset(d), args.n, args.batches),
            "check_pixel_data": timed(lambda d=ds: check_pixel_data(d), args.n, args.batches),
        }
    out = {"benchmark": "receive_check", "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
           "python": platform.python_version(), "pydicom": pydicom.__version__,
           "command": "bench/receive_check.py " + " ".join(sys.argv[1:]),
           "calls_per_batch": args.n, "batches": args.batches, "instances": results}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
