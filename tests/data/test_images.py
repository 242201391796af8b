"""Image sources and their limits. HTTP tests use a local server on 127.0.0.1 only."""

from __future__ import annotations

import base64
import http.server
import struct
import threading
import time
import zlib

import pytest
from helpers import all_at_once

from toolkit.data.images import ImagePolicy, _check_host, load_image
from toolkit.errors import ToolkitError


def _png_bytes(path):
    return path.read_bytes()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels; almost no data follows."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _write_square(tmp_path):
    from toolkit.data.images import make_square_image

    return make_square_image(tmp_path / "sq.png")


def test_data_uri_path_relative_path_and_file_url(images, tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes(images["red"])).decode()
    assert load_image(uri).getpixel((32, 32)) == (255, 0, 0)
    assert load_image(str(images["blue"])).getpixel((32, 32)) == (0, 0, 255)
    assert load_image(images["blue"].name, base_dir=images["blue"].parent).size == (64, 64)
    assert load_image(images["red"].as_uri()).size == (64, 64)


@pytest.mark.parametrize(
    "source, match",
    [
        ("data:image/png,abc", "not base64"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot read image"),
        ("missing.png", "not found"),
        ("ftp://example.com/x.png", "unsupported image URL scheme 'ftp'"),
    ],
)
def test_bad_sources_give_clear_errors(source, match, tmp_path):
    with pytest.raises(ToolkitError, match=match) as err:
        load_image(source, base_dir=tmp_path, where="rows.jsonl:3: messages[0].content[1]")
    assert err.value.where == "rows.jsonl:3: messages[0].content[1]"


def test_pixel_limit_refuses_decompression_bombs_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(100_000, 100_000))
    assert bomb.stat().st_size < 200
    with pytest.raises(ToolkitError, match="over the pixel limit"):
        load_image(str(bomb))
    medium = tmp_path / "medium.png"
    medium.write_bytes(_bomb_png(8000, 8000))  # under PIL's guard, over the policy's 50M default
    with pytest.raises(ToolkitError, match="8000x8000 pixels, over the limit of 50000000"):
        load_image(str(medium))
    with pytest.raises(ToolkitError, match="64x64 pixels, over the limit of 1000"):
        load_image(str(_write_square(tmp_path)), policy=ImagePolicy(max_pixels=1000))


def test_local_files_can_be_confined_to_a_media_dir(images, tmp_path):
    with pytest.raises(ToolkitError, match="outside the allowed media folder"):
        load_image(str(images["red"]), policy=ImagePolicy(media_dir=tmp_path))
    with pytest.raises(ToolkitError, match="local image files are not allowed"):
        load_image(str(images["red"]), policy=ImagePolicy(allow_local_files=False))
    assert load_image(str(images["red"]), policy=ImagePolicy(media_dir=images["red"].parent)).size == (64, 64)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "10.1.2.3", "192.168.0.1", "169.254.169.254"])
def test_private_loopback_and_link_local_hosts_are_refused_by_default(host):
    with pytest.raises(ToolkitError, match="non-public address"):
        _check_host(host, "image", ImagePolicy())
    _check_host(host, "image", ImagePolicy(allow_private_urls=True))


@pytest.fixture()
def server(images):
    """A local HTTP server: /red.png, /big.png (over 1 KB), /slow.png (drips), /redirect -> /red.png."""
    red = _png_bytes(images["red"])

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/red.png")
                self.end_headers()
                return
            body = {"/red.png": red, "/big.png": red + b"\0" * 5000, "/slow.png": red}.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            if self.path == "/slow.png":
                for i in range(0, len(body), 16):
                    self.wfile.write(body[i : i + 16])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_fetch_is_refused_for_loopback_unless_allowed_then_cached(server, tmp_path):
    with pytest.raises(ToolkitError, match="non-public address 127.0.0.1"):
        load_image(f"{server}/red.png", policy=ImagePolicy(cache_dir=tmp_path))
    allowed = ImagePolicy(allow_private_urls=True, cache_dir=tmp_path)
    assert load_image(f"{server}/red.png", policy=allowed).getpixel((32, 32)) == (255, 0, 0)
    assert load_image(f"{server}/redirect", policy=allowed).size == (64, 64)
    assert len(list(tmp_path.iterdir())) == 2  # cached by URL
    with pytest.raises(ToolkitError, match="HTTP 404"):
        load_image(f"{server}/nothing.png", policy=allowed)


def test_two_fetches_of_one_url_at_once_both_cache_it(server, tmp_path, monkeypatch):
    """A DDP launch's ranks read the same training rows at once: both fetch an uncached URL and write the cache.
    Both writes are held until both are ready to rename (a shared temporary would be renamed away under one)."""
    import toolkit.atomic_file as atomic_file  # the cache's writes go through write_atomic

    both_written, replace = threading.Barrier(2, timeout=10), atomic_file.os.replace

    def replace_together(src, dst):
        both_written.wait()
        replace(src, dst)

    monkeypatch.setattr(atomic_file.os, "replace", replace_together)
    policy = ImagePolicy(allow_private_urls=True, cache_dir=tmp_path)
    loaded = all_at_once(lambda _: load_image(f"{server}/red.png", policy=policy), range(2))
    assert [im.getpixel((32, 32)) for im in loaded] == [(255, 0, 0)] * 2
    [cached] = tmp_path.iterdir()  # one cache file, no temporary left
    assert load_image(f"{server}/red.png", policy=policy).getpixel((32, 32)) == (255, 0, 0)
    assert cached.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_http_size_cap_and_timeout(server, tmp_path):
    capped = ImagePolicy(allow_private_urls=True, cache_dir=None, max_bytes=1024)
    with pytest.raises(ToolkitError, match="larger than 1024 bytes"):
        load_image(f"{server}/big.png", policy=capped)
    slow = ImagePolicy(allow_private_urls=True, cache_dir=None, timeout_s=0.3)
    with pytest.raises(ToolkitError, match="took longer than 0.3 s|cannot fetch image"):
        load_image(f"{server}/slow.png", policy=slow)


def test_unreachable_host_gives_a_network_error(tmp_path):
    policy = ImagePolicy(allow_private_urls=True, cache_dir=None, timeout_s=2)
    with pytest.raises(ToolkitError, match="cannot fetch image .* ConnectionError") as err:
        load_image("http://127.0.0.1:9/x.png", policy=policy, where="train.jsonl:4")
    assert "network" in err.value.fix and err.value.where == "train.jsonl:4"
