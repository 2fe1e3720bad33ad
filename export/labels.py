"""Label sets copied into every model card at export time (the serving side has no timm, no torchvision)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[dict, ...]:
    """ImageNet-1k: index, WordNet id (timm's `ImageNetInfo`), short name (torchvision's categories)."""
    import torchvision
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    if info.num_classes() != 1000 or len(names) != 1000:
        raise RuntimeError("the installed timm / torchvision do not ship 1000 ImageNet classes")
    return tuple({"index": i, "id": info.index_to_label_name(i), "name": names[i]} for i in range(1000))


def digit_labels() -> tuple[dict, ...]:
    return tuple({"index": i, "id": str(i), "name": str(i)} for i in range(10))


def label_set(kind: str) -> list[dict]:
    if kind == "imagenet":
        return [dict(x) for x in imagenet_labels()]
    if kind == "digits":
        return [dict(x) for x in digit_labels()]
    raise ValueError(f"unknown label set {kind!r}")
