"""The one exception the image commands raise for a failure the user must see."""
from __future__ import annotations


class ImageError(Exception):
    """A failed import, mount, diff or commit; str(e) is the message for stderr."""
