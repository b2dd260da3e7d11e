"""Media parts of a request → PIL images and video frames.

An ``image_url`` part (OpenAI's) or a ``video_url`` part (vLLM's extension, ``{"type": "video_url",
"video_url": {"url": ...}}``) names its media by URL:

* ``data:<type>;base64,<payload>``: the file inline. Images must be PNG, JPEG, WebP or GIF (PIL opens
  nothing else here: some of its other formats run external programs); videos any container of
  :data:`minicpmv_jax.video.VIDEO_FORMATS`.
* ``file:///path``: a file on the server, only when the server was started with
  ``--allowed-local-media DIR`` and only inside ``DIR`` once symbolic links and ``..`` are resolved.
* ``http(s)://``: refused. The server fetches nothing from the network (no SSRF); send the file inline.

A video becomes its frames, one per second (at most :attr:`Limits.max_video_frames
<minicpmv_jax.server.limits.Limits.max_video_frames>`), each an image of the conversation, exactly as
``minicpmv-jax chat --video`` does (docs/model.md §6): with :data:`minicpmv_jax.video.VIDEO_OPTIONS` (a
request's own ``use_image_id`` / ``max_slice_nums`` take precedence).

Every failure is a 400 :class:`~minicpmv_jax.server.errors.APIError` whose ``param`` is the part's URL
field (``messages[0].content[1].image_url.url``). Decoding is CPU work: call these from a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request

from PIL import Image

from minicpmv_jax.errors import ArgumentError
from minicpmv_jax.image_processing import ImageError, ImageTooLargeError, load_image
from minicpmv_jax.video import VideoError, load_video

from .errors import APIError, bad_request
from .limits import Limits

__all__ = ["IMAGE_FORMATS", "local_media_root", "load_image_url", "load_video_url"]

#: The image formats a request may send (PIL's names).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


def local_media_root(folder: str | os.PathLike | None) -> str | None:
    """``--allowed-local-media``'s folder, resolved (symbolic links and ``..``); None keeps ``file://`` off.

    Raises:
      ArgumentError: ``folder`` is not an existing folder.
    """
    if folder is None:
        return None
    root = os.path.realpath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(root):
        raise ArgumentError("{} {path}: not an existing folder", "allowed_local_media", path=os.fspath(folder))
    return root


def load_image_url(url: str, param: str, limits: Limits, local_root: str | None) -> Image.Image:
    """An ``image_url``'s URL → a loaded RGB PIL image, within ``limits``."""
    data = _fetch(url, param, "image", limits.max_image_bytes, local_root)
    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            data = f.read()
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS):
            pass  # the header only: is it one of the formats we accept?
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise bad_request(f"{param}: not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image "
                          "(unreadable or another format)", param, "invalid_image") from None
    try:
        return load_image(data, max_pixels=limits.max_image_pixels)
    except ImageTooLargeError:
        width, height = Image.open(io.BytesIO(data)).size
        raise bad_request(f"{param}: the image is {width}x{height} = {width * height:,} pixels, more than this "
                          f"server's limit of {limits.max_image_pixels:,} (--max-image-pixels)", param,
                          "image_too_large") from None
    except ImageError as e:
        raise bad_request(f"{param}: {e}", param, "invalid_image") from None


def load_video_url(url: str, param: str, limits: Limits, local_root: str | None, max_frames: int
                   ) -> list[Image.Image]:
    """A ``video_url``'s URL → its frames (one per second, at most ``max_frames``), RGB PIL images."""
    source = _fetch(url, param, "video", limits.max_video_bytes, local_root)
    try:
        return load_video(source, max_frames=max_frames, max_pixels=limits.max_frame_pixels)
    except VideoError as e:
        raise bad_request(f"{param}: {e}", param, "invalid_video") from None


def _fetch(url: str, param: str, kind: str, max_bytes: int, local_root: str | None) -> bytes | str:
    """The media a URL names: the decoded bytes of a ``data:`` URL, or the resolved path of a permitted
    ``file://`` URL (of at most ``max_bytes``)."""
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    flag = f"--max-{kind}-bytes"
    if scheme == "data":
        header, comma, payload = url[5:].partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise bad_request(f"{param}: a data: URL must be base64 (data:{kind}/...;base64,...)", param)
        if len(payload) // 4 * 3 > max_bytes + 2:
            raise _too_big(param, kind, len(payload) // 4 * 3, max_bytes, flag)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: the data: URL's payload is not valid base64", param) from None
        if len(data) > max_bytes:
            raise _too_big(param, kind, len(data), max_bytes, flag)
        if not data:
            raise bad_request(f"{param}: the data: URL is empty", param)
        return data
    if scheme == "file":
        return _local_file(url, param, kind, max_bytes, local_root, flag)
    if scheme in ("http", "https"):
        raise bad_request(f"{param}: this server does not fetch remote URLs; send the {kind} inline as a "
                          f"data: URL (base64){' or a file:// URL' if local_root else ''}", param,
                          "remote_url_refused")
    also = " or file:///..." if local_root else ""
    raise bad_request(f"{param}: unsupported URL {url[:32]!r}: expected data:{kind}/...;base64,...{also}", param)


def _local_file(url: str, param: str, kind: str, max_bytes: int, local_root: str | None, flag: str) -> str:
    if local_root is None:
        raise bad_request(f"{param}: file:// URLs are off on this server (start it with --allowed-local-media "
                          "DIR to serve files under DIR)", param, "local_file_refused")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise bad_request(f"{param}: a file:// URL must name a local path (file:///...), got host "
                          f"{parts.netloc!r}", param)
    path = os.path.realpath(urllib.request.url2pathname(parts.path))
    if os.path.commonpath([path, local_root]) != local_root:
        raise bad_request(f"{param}: {path} is outside the folder this server may read (--allowed-local-media)",
                          param, "local_file_refused")
    if not os.path.isfile(path):
        raise bad_request(f"{param}: no such file {path}", param)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise _too_big(param, kind, size, max_bytes, flag)
    return path


def _too_big(param: str, kind: str, size: int, limit: int, flag: str) -> APIError:
    return bad_request(f"{param}: the {kind} is {size:,} bytes, more than this server's limit of {limit:,} "
                       f"({flag})", param, f"{kind}_too_large")
