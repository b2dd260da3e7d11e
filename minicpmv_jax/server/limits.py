"""How much one HTTP request may ask of the server: body size, images, video frames.

A request beyond a limit is refused with a 400 (a 413 for the body) naming the limit, before the work it
would cost: the body is read no further than ``max_body_bytes``, a base64 payload is measured before it is
decoded, an image's pixels are counted from its header before they are decoded, a video's frame size from
its stream header. Each field is a flag of ``minicpmv-jax serve`` (``max_image_pixels`` →
``--max-image-pixels``).
"""

from __future__ import annotations

import dataclasses

from minicpmv_jax.errors import ArgumentError

__all__ = ["Limits"]

MiB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits.

    Attributes:
      max_body_bytes: the request body (JSON with base64 media inside); more is refused with 413.
      max_images: images (``image_url`` parts) in one request, all messages together.
      max_image_bytes: one encoded image (a ``data:`` URL's decoded payload, or a local file).
      max_image_pixels: one image's width × height (checked from its header, before decoding).
      max_video_frames: video frames in one request, all videos together; each video is sampled at one
        frame per second, at most this many frames (the model card's recipe, 64 by default).
      max_video_bytes: one encoded video (a ``data:`` URL's decoded payload, or a local file).
      max_frame_pixels: one video frame's width × height (default 3840×2160, 4K UHD).
    """

    max_body_bytes: int = 128 * MiB
    max_images: int = 16
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 50_000_000
    max_video_frames: int = 64
    max_video_bytes: int = 100 * MiB
    max_frame_pixels: int = 3840 * 2160

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            v = getattr(self, field.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ArgumentError("{} must be an int ≥ 1, got {value!r}", field.name, value=v)
