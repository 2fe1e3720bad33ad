"""Request-size rules every transport applies, each defined once. Transports call them early, before any
work is spent (a multipart body counted before its parts are decoded); the core calls them again, so that a
caller that skips the early check still meets the same rule and the same message."""

from __future__ import annotations

from service.errors import InvalidArgument


def check_count(count: int, limit: int, what: str = "images") -> int:
    """`count` items of one request within `limit`; none is an error too."""
    if count < 1:
        raise InvalidArgument(f"no {what} given")
    if count > limit:
        raise InvalidArgument(f"{count} {what} in one request; the limit is {limit}")
    return count


def check_views(images: int, per_image: int, limit: int, tta: str) -> int:
    """Views in one request (images x the test-time augmentation's views each) within `limit`: views, not
    images, are what a request costs (multiscale makes 30 of each)."""
    views = images * per_image
    if views > limit:
        raise InvalidArgument(
            f"{views} views in one request ({images} images x {per_image} views of tta={tta}); "
            f"the limit is {limit} views (max_views_per_request)"
        )
    return views
