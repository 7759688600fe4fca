"""A study's images as PNG, windowed on the server (window/level for CT and MR).

The archived DICOM file is decoded again (the cached model tensor is downsampled), with
a small LRU of decoded instances so paging through frames or dragging the window does
not decode the file each time.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from PIL import Image

from triage.api.deps import DbDep, Reader, SettingsDep
from triage.errors import DicomRejected
from triage.ingest.dicom import DecodedImage, read_instance
from triage.telemetry.logs import event

router = APIRouter(prefix="/api", tags=["images"])
log = logging.getLogger("triage.api")


class _DecodedCache:
    def __init__(self) -> None:
        self._items: OrderedDict[Path, DecodedImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, settings, size: int) -> DecodedImage:  # type: ignore[no-untyped-def]
        with self._lock:
            if path in self._items:
                self._items.move_to_end(path)
                return self._items[path]
        try:
            image = read_instance(path.read_bytes(), settings.ingest).image
        except (OSError, DicomRejected) as exc:
            # The archive was damaged after ingest (deleted, truncated, overwritten): say
            # so by name, not as a bare 500 (missing file) or a 400 blaming the client.
            code = exc.code if isinstance(exc, DicomRejected) else (
                "missing" if isinstance(exc, FileNotFoundError) else "unreadable")
            event(log, "archive_file_unreadable", logging.ERROR, file=path.name,
                  reason_code=code)
            raise HTTPException(
                500, f"the archived file of this instance cannot be read ({code})"
            ) from None
        if image is None:
            raise HTTPException(404, "this instance holds no image")
        with self._lock:
            self._items[path] = image
            while len(self._items) > size:
                self._items.popitem(last=False)
        return image


def _cache(request: Request) -> _DecodedCache:
    state = request.app.state
    if not hasattr(state, "decoded_cache"):
        state.decoded_cache = _DecodedCache()
    return state.decoded_cache


def render_png(image: DecodedImage, frame: int, window: tuple[float, float] | None) -> bytes:
    """One frame as 8-bit PNG: the given window, else the DICOM one, else 0.5-99.5 %."""
    pixels = image.frames[frame]
    if window is None:
        window = image.window
    if window is None:
        low, high = np.percentile(pixels, (0.5, 99.5))
    else:
        centre, width = window
        low, high = centre - width / 2, centre + width / 2
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1)
    if image.invert:
        scaled = 1 - scaled
    buffer = io.BytesIO()
    Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


@router.get(
    "/studies/{study_id}/images/{instance_id}/{frame}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    summary="One frame as PNG; wc/ww set the window (centre/width) in modality units",
)
def image_png(
    study_id: int, instance_id: int, frame: int, who: Reader, db: DbDep,
    settings: SettingsDep, request: Request,
    wc: Annotated[float | None, Query()] = None,
    ww: Annotated[float | None, Query(gt=0)] = None,
) -> Response:
    row = db.execute(
        "SELECT path FROM instances WHERE id = ? AND study_id = ? AND scoreable = 1",
        [instance_id, study_id],
    ).fetchone()
    if row is None:
        raise HTTPException(404, f"study {study_id} has no image instance {instance_id}")
    image = _cache(request).get(settings.home / row[0], settings,
                                settings.review.image_cache_instances)
    if not 0 <= frame < image.frames.shape[0]:
        raise HTTPException(404, f"instance {instance_id} has {image.frames.shape[0]} frames")
    window = (wc, ww) if wc is not None and ww is not None else None
    return Response(render_png(image, frame, window), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=300"})
