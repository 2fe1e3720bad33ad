"""One registry of architectures: name -> builder, preprocessing, label set.

Builders never download anything (torchvision `weights=None`, timm `pretrained=False`). Preprocessing comes
from the library the graph comes from: timm entries use timm's `pretrained_cfg` (input size, crop_pct,
interpolation, mean, std), torchvision entries the values of their `IMAGENET1K_V1` eval transform.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from service import card as cards

from .errors import ExportError

IMAGENET_MEAN = list(cards.IMAGENET_MEAN)
IMAGENET_STD = list(cards.IMAGENET_STD)


@dataclass(frozen=True)
class Arch:
    """One registry entry.

    `build(with_aux)` returns an eval-mode module; `with_aux=True` builds the auxiliary heads that published
    GoogLeNet / Inception v3 checkpoints carry, and `finalize` drops them after loading.
    `remap` turns a foreign checkpoint key layout into this builder's (None: keys are used as they are).
    """

    name: str
    source: str
    description: str
    labels: str
    num_classes: int
    builder: Callable[[bool], nn.Module]
    preprocessing_fn: Callable[[], dict]
    finalize: Callable[[nn.Module], nn.Module] | None = None
    remap: Callable[[dict], dict] | None = None
    has_aux: bool = False
    extra: dict = field(default_factory=dict)

    def build(self, with_aux: bool = False) -> nn.Module:
        return self.builder(with_aux).eval()

    def preprocessing(self) -> dict:
        return dict(self.preprocessing_fn())

    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.preprocessing()["input_size"]
        return int(c), int(h), int(w)


# ---------------------------------------------------------------------------------------------- preprocessing


def _timm_preprocessing(timm_name: str) -> Callable[[], dict]:
    def fn() -> dict:
        import timm

        cfg = timm.models.get_pretrained_cfg(timm_name).to_dict()
        c, h, w = cfg["input_size"]
        crop_pct = float(cfg.get("crop_pct", 0.875))
        return {
            "input_size": [int(c), int(h), int(w)],
            "resize": int(math.floor(h / crop_pct)),
            "crop_pct": crop_pct,
            "interpolation": str(cfg.get("interpolation", "bicubic")),
            "mean": [float(x) for x in cfg["mean"]],
            "std": [float(x) for x in cfg["std"]],
            "channels": int(c),
            "invert": False,
        }

    return fn


def _torchvision_preprocessing(tv_name: str) -> Callable[[], dict]:
    def fn() -> dict:
        import torchvision

        weights = torchvision.models.get_model_weights(tv_name)
        t = weights["IMAGENET1K_V1"].transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0])
        return {
            "input_size": [3, crop, crop],
            "resize": resize,
            "crop_pct": round(crop / resize, 4),
            "interpolation": t.interpolation.value,
            "mean": [float(x) for x in t.mean],
            "std": [float(x) for x in t.std],
            "channels": 3,
            "invert": False,
        }

    return fn


def _fixed_preprocessing(**values) -> Callable[[], dict]:
    return lambda: dict(values)


LENET_PREPROCESSING = {
    "input_size": [1, 32, 32],
    "resize": 32,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": [0.5],
    "std": [0.5],
    "channels": 1,
    # Trained on scikit-learn's digits, which are light ink on a dark ground: the service inverts a
    # grayscale image (255 - x) so that ordinary dark-on-light digits look like what the net learned.
    "invert": True,
}


# ---------------------------------------------------------------------------------------------- builders


def _torchvision(tv_name: str, **kwargs) -> Callable[[bool], nn.Module]:
    def build(with_aux: bool) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(tv_name, weights=None, **kwargs)

    return build


def _torchvision_aux(tv_name: str) -> Callable[[bool], nn.Module]:
    # transform_input=True is what torchvision sets with its published weights: they were trained on
    # (x - 0.5) / 0.5 inputs and the model converts ImageNet-normalised input itself.
    def build(with_aux: bool) -> nn.Module:
        import torchvision

        return torchvision.models.get_model(
            tv_name, weights=None, aux_logits=with_aux, init_weights=True, transform_input=True
        )

    return build


def _drop_googlenet_aux(model: nn.Module) -> nn.Module:
    model.aux_logits = False
    model.aux1 = None
    model.aux2 = None
    return model


def _drop_inception_v3_aux(model: nn.Module) -> nn.Module:
    model.aux_logits = False
    model.AuxLogits = None
    return model


def _timm(timm_name: str) -> Callable[[bool], nn.Module]:
    def build(with_aux: bool) -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False)

    return build


def _own(cls_name: str, **kwargs) -> Callable[[bool], nn.Module]:
    def build(with_aux: bool) -> nn.Module:
        from . import nets

        return getattr(nets, cls_name)(**kwargs)

    return build


def remap_efficientnet_pytorch(state: dict) -> dict:
    """EfficientNet-PyTorch key names (`_conv_stem`, `_blocks.N._bn1`, `_fc`) -> timm's EfficientNet names.

    Blocks are numbered flat there (`_blocks.0` .. `_blocks.15`) and by stage here (`blocks.S.B`); block 0 is
    a depthwise-separable block (dw, pw) and the rest inverted residuals (expand, dw, project).
    Checkpoints already in timm's layout pass through unchanged.
    """
    if not any(k.startswith("_blocks.") for k in state):
        return state
    stage_sizes = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-B0/Lite0 block counts per stage
    flat = [f"blocks.{s}.{b}" for s, n in enumerate(stage_sizes) for b in range(n)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out: dict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit() and int(parts[1]) < len(flat):
            i = int(parts[1])
            table = ds if i == 0 else ir
            if parts[2] in table:
                out[".".join([flat[i], table[parts[2]], *parts[3:]])] = value
                continue
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
            continue
        out[key] = value  # left as is: strict loading reports it as unexpected
    return out


# ---------------------------------------------------------------------------------------------- the registry


def _tv(name: str, description: str, **kwargs) -> Arch:
    return Arch(
        name=name,
        source=f"torchvision:{name}",
        description=description,
        labels="imagenet",
        num_classes=1000,
        builder=_torchvision(name, **kwargs),
        preprocessing_fn=_torchvision_preprocessing(name),
    )


def _tm(name: str, timm_name: str, description: str, **kwargs) -> Arch:
    return Arch(
        name=name,
        source=f"timm:{timm_name}",
        description=description,
        labels="imagenet",
        num_classes=1000,
        builder=_timm(timm_name),
        preprocessing_fn=_timm_preprocessing(timm_name),
        **kwargs,
    )


def _entries() -> list[Arch]:
    e: list[Arch] = [
        Arch(
            name="lenet5",
            source="cnn_serve:export.nets.LeNet5",
            description="LeNet-5 (LeCun et al., 1998): 32x32 grayscale digits, 2 conv + 3 FC layers",
            labels="digits",
            num_classes=10,
            builder=_own("LeNet5"),
            preprocessing_fn=_fixed_preprocessing(**LENET_PREPROCESSING),
        ),
        Arch(
            name="zfnet",
            source="cnn_serve:export.nets.ZFNet",
            description="ZFNet (Zeiler & Fergus, 2013): AlexNet with 7x7/2 conv1 and 512-1024-512 conv3-5",
            labels="imagenet",
            num_classes=1000,
            builder=_own("ZFNet"),
            preprocessing_fn=_fixed_preprocessing(
                input_size=[3, 224, 224],
                resize=256,
                crop_pct=0.875,
                interpolation="bilinear",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                channels=3,
                invert=False,
            ),
        ),
        _tv("alexnet", "AlexNet (Krizhevsky et al., 2012)"),
    ]
    for depth in (11, 13, 16, 19):
        e.append(_tv(f"vgg{depth}", f"VGG-{depth} (Simonyan & Zisserman, 2014)"))
        e.append(_tv(f"vgg{depth}_bn", f"VGG-{depth} with batch normalisation"))
    e += [
        Arch(
            name="googlenet",
            source="torchvision:googlenet",
            description="GoogLeNet / Inception v1 (Szegedy et al., 2014); aux heads dropped for inference",
            labels="imagenet",
            num_classes=1000,
            builder=_torchvision_aux("googlenet"),
            preprocessing_fn=_torchvision_preprocessing("googlenet"),
            finalize=_drop_googlenet_aux,
            has_aux=True,
        ),
        Arch(
            name="inception_v3",
            source="torchvision:inception_v3",
            description="Inception v3 (Szegedy et al., 2015); auxiliary head dropped for inference",
            labels="imagenet",
            num_classes=1000,
            builder=_torchvision_aux("inception_v3"),
            preprocessing_fn=_torchvision_preprocessing("inception_v3"),
            finalize=_drop_inception_v3_aux,
            has_aux=True,
        ),
        _tm("inception_v4", "inception_v4", "Inception-v4 (Szegedy et al., 2016)"),
        _tm("inception_resnet_v2", "inception_resnet_v2", "Inception-ResNet-v2 (Szegedy et al., 2016)"),
    ]
    for depth in (18, 34, 50, 101, 152):
        e.append(_tv(f"resnet{depth}", f"ResNet-{depth} (He et al., 2015)"))
    e += [
        _tv("wide_resnet50_2", "Wide ResNet-50-2 (Zagoruyko & Komodakis, 2016)"),
        _tv("wide_resnet101_2", "Wide ResNet-101-2 (Zagoruyko & Komodakis, 2016)"),
        _tv("resnext50_32x4d", "ResNeXt-50 32x4d (Xie et al., 2016)"),
        _tv("resnext101_32x8d", "ResNeXt-101 32x8d (Xie et al., 2016)"),
    ]
    for depth in (121, 161, 169, 201):
        e.append(_tv(f"densenet{depth}", f"DenseNet-{depth} (Huang et al., 2016)"))
    e += [
        _tm("seresnet50", "seresnet50", "SE-ResNet-50 (Hu et al., 2017)"),
        _tm("seresnext50_32x4d", "seresnext50_32x4d", "SE-ResNeXt-50 32x4d (Hu et al., 2017)"),
        _tm("senet154", "senet154", "SENet-154 (Hu et al., 2017), ILSVRC 2017 winner"),
        _tv("mobilenet_v2", "MobileNet v2 (Sandler et al., 2018)"),
        _tv("mobilenet_v3_large", "MobileNet v3 large (Howard et al., 2019)"),
        _tv("mobilenet_v3_small", "MobileNet v3 small (Howard et al., 2019)"),
        _tm(
            "efficientnet_lite0",
            "tf_efficientnet_lite0",
            "EfficientNet-Lite0 (TensorFlow-trained: 'SAME' padding, BN eps 1e-3)",
            remap=remap_efficientnet_pytorch,
        ),
        _tm("efficientnet_b0", "efficientnet_b0", "EfficientNet-B0 (Tan & Le, 2019)"),
        _tv("squeezenet1_1", "SqueezeNet 1.1 (Iandola et al., 2016)"),
        _tv("shufflenet_v2_x1_0", "ShuffleNet v2 1.0x (Ma et al., 2018)"),
    ]
    return e


REGISTRY: dict[str, Arch] = {a.name: a for a in _entries()}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Arch:
    """The entry for `name`, or an ExportError listing the valid names and the closest ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=3, cutoff=0.4)
        hint = f" closest: {', '.join(close)};" if close else ""
        raise ExportError(
            f"unknown architecture {name!r};{hint} valid names: {', '.join(REGISTRY)}"
        ) from None
