"""Image sources for chat messages, in one place: `data:` base64 URIs, local paths and `file://` URLs.

Returns RGB PIL images; the processor (chat.py) resizes and normalises them. Remote http(s) URLs, size and
pixel limits arrive with the data path (issue 2/7); until then they are refused with a clear error.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from toolkit.errors import ToolkitError


def load_image(source: str, *, base_dir: Path | None = None, where: str = "image_url"):
    """Open `source` (data URI, file:// URL or path relative to `base_dir`) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ToolkitError("data URI is not base64", where=where, fix="use data:image/png;base64,...")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ToolkitError("data URI payload is not valid base64", where=where) from None
        stream, label = io.BytesIO(raw), "data URI"
    else:
        parsed = urlparse(source)
        if parsed.scheme in ("http", "https"):
            raise ToolkitError(
                "remote image URLs are not supported yet", where=where, fix="pass a local path or a data: URI"
            )
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise ToolkitError(f"image file {str(path)!r} not found", where=where, fix="check the path")
        stream, label = path, str(path)
    try:
        with Image.open(stream) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ToolkitError(f"cannot read image {label}: {exc}", where=where, fix="use a PNG or JPEG") from None


def make_square_image(path: str | Path, *, color: str = "red", size: int = 64) -> Path:
    """Write a PNG of a coloured square on white (test and quickstart images, made locally)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
