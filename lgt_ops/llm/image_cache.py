"""What the request engine sends for an image: the stage's URL source behind a small LRU."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol


class ImageUrls(Protocol):
    """Turns an image id into what the endpoint receives (data URL or presigned URL)."""

    def url_for(self, image_id: str) -> str: ...


class ImageCache:
    """A small LRU of encoded images: requests are grouped by image, so hits dominate."""

    def __init__(self, source: ImageUrls, size: int = 64) -> None:
        self.source = source
        self.size = size
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str) -> str:
        with self._lock:
            if image_id in self._items:
                self._items.move_to_end(image_id)
                return self._items[image_id]
        url = self.source.url_for(image_id)
        with self._lock:
            self._items[image_id] = url
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return url
