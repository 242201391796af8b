"""Image sources for chat messages, in one place: `data:` base64 URIs, local paths, `file://` and http(s) URLs.

Limits live in one ImagePolicy: bytes per image, pixels per image (decompression bombs), fetch timeout,
whether private/loopback/link-local hosts may be fetched (refused by default, redirects included), and
which local folder paths may come from (training data: the dataset's folder; the server: --allowed-media-dir).
Remote images are cached on disk by URL. Returns RGB PIL images; the processor (chat.py) resizes them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

from toolkit.atomic_file import write_atomic
from toolkit.errors import ToolkitError

DEFAULT_CACHE = Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit")) / "images"


@dataclass(frozen=True)
class ImagePolicy:
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # about 7000 x 7000; PIL's own bomb guard starts at 2 x 89M
    timeout_s: float = 10.0
    allow_private_urls: bool = False
    allow_local_files: bool = True
    media_dir: Path | None = None  # when set, local paths must resolve inside it
    cache_dir: Path | None = DEFAULT_CACHE
    max_redirects: int = 3


def _decode_data_uri(uri: str, where: str, policy: ImagePolicy) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ToolkitError("data URI is not base64", where=where, fix="use data:image/png;base64,...")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ToolkitError(f"image is larger than {policy.max_bytes} bytes", where=where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ToolkitError("data URI payload is not valid base64", where=where) from None


def _check_host(host: str, where: str, policy: ImagePolicy) -> None:
    """Refuse hosts that resolve to loopback, private, link-local or otherwise non-public addresses."""
    if policy.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ToolkitError(
            f"cannot resolve image host {host!r} ({exc})",
            where=where,
            fix="check the URL, or that this machine is online",
        ) from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if not addr.is_global:
            raise ToolkitError(
                f"image URL host {host!r} resolves to non-public address {addr}",
                where=where,
                fix="use a public URL or a data: URI (the server allows private hosts only with --allow-private-urls)",
            )


def _fetch(url: str, where: str, policy: ImagePolicy) -> bytes:
    import requests

    cache_file = None
    if policy.cache_dir is not None:
        cache_file = Path(policy.cache_dir) / hashlib.sha256(url.encode()).hexdigest()
        if cache_file.is_file():
            return cache_file.read_bytes()
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        parsed = urlparse(current)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ToolkitError(f"unsupported image URL {current!r}", where=where, fix="use http(s) or data: URIs")
        _check_host(parsed.hostname, where, policy)
        try:
            resp = requests.get(current, stream=True, timeout=policy.timeout_s, allow_redirects=False)
        except requests.RequestException as exc:
            raise ToolkitError(
                f"cannot fetch image {url!r}: {type(exc).__name__}",
                where=where,
                fix="check the URL and the network (offline machines need local files or data: URIs)",
            ) from None
        if resp.is_redirect:  # followed by hand so every hop is checked against the private-address rule
            current = urljoin(current, resp.headers.get("location", ""))
            resp.close()
            continue
        if resp.status_code != 200:
            raise ToolkitError(f"fetching image {url!r} gave HTTP {resp.status_code}", where=where)
        declared = int(resp.headers.get("content-length") or 0)
        if declared > policy.max_bytes:
            raise ToolkitError(f"image is larger than {policy.max_bytes} bytes ({declared})", where=where)
        chunks, size = [], 0
        # read1 returns whatever has arrived (iter_content would wait to fill its chunk), so a server that drips
        # bytes meets the overall deadline instead of a per-read timeout it never trips
        while chunk := resp.raw.read1(64 * 1024, decode_content=True):
            size += len(chunk)
            if size > policy.max_bytes:
                raise ToolkitError(f"image is larger than {policy.max_bytes} bytes", where=where)
            if time.monotonic() > deadline:
                raise ToolkitError(f"fetching image {url!r} took longer than {policy.timeout_s} s", where=where)
            chunks.append(chunk)
        data = b"".join(chunks)
        if cache_file is not None:  # a DDP launch's ranks (or the server's threads) may fetch one URL at once
            write_atomic(cache_file, data)
        return data
    raise ToolkitError(f"image URL {url!r} redirects more than {policy.max_redirects} times", where=where)


def _local_path(source: str, base_dir: Path | None, where: str, policy: ImagePolicy) -> Path:
    parsed = urlparse(source)
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(source)
    if not policy.allow_local_files:
        raise ToolkitError(
            "local image files are not allowed here",
            where=where,
            fix="send a data: URI or an http(s) URL (the server allows files only under --allowed-media-dir)",
        )
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    path = path.resolve()
    if policy.media_dir is not None and not path.is_relative_to(Path(policy.media_dir).resolve()):
        raise ToolkitError(f"image path {source!r} is outside the allowed media folder", where=where)
    if not path.is_file():
        raise ToolkitError(f"image file {str(path)!r} not found", where=where, fix="check the path")
    if path.stat().st_size > policy.max_bytes:
        raise ToolkitError(f"image is larger than {policy.max_bytes} bytes", where=where)
    return path


def load_image(
    source: str, *, base_dir: Path | None = None, where: str = "image_url", policy: ImagePolicy | None = None
):
    """Open `source` (data URI, http(s) URL, file:// URL or path relative to `base_dir`) as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    policy = policy or ImagePolicy()
    scheme = urlparse(source).scheme
    if source.startswith("data:"):
        stream, label = io.BytesIO(_decode_data_uri(source, where, policy)), "data URI"
    elif scheme in ("http", "https"):
        stream, label = io.BytesIO(_fetch(source, where, policy)), source
    elif scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive, treated as a path
        path = _local_path(source, base_dir, where, policy)
        stream, label = path, str(path)
    else:
        raise ToolkitError(
            f"unsupported image URL scheme {scheme!r}",
            where=where,
            fix="use a data: URI, an http(s) URL or a file path",
        )
    try:
        with Image.open(stream) as img:
            # Check the header's size before decoding: a small file can declare gigapixels.
            if img.width * img.height > policy.max_pixels:
                raise ToolkitError(
                    f"image is {img.width}x{img.height} pixels, over the limit of {policy.max_pixels}",
                    where=where,
                    fix="resize the image",
                )
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:  # PIL's own guard, at 2 x its MAX_IMAGE_PIXELS
        raise ToolkitError(f"image is over the pixel limit ({exc})", where=where, fix="resize the image") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ToolkitError(f"cannot read image {label[:120]}: {exc}", where=where, fix="use a PNG or JPEG") from None


def make_square_image(
    path: str | Path, *, color: str = "red", size: int = 64, background: str = "white", box: tuple | None = None
) -> Path:
    """Write a PNG of a coloured square (box = (x0, y0, x1, y1), default centred) on a background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(img).rectangle(box or [size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
