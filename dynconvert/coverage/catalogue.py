"""The architectures the coverage check runs on: the smallest timm variant of each family at a
small input it accepts, and timm's own tiny test models."""

from __future__ import annotations

from dataclasses import dataclass, field

import timm
import torch

NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """A timm model as the check builds it: name, family, input side and extra timm kwargs.

    ``residual`` says whether the architecture has residual blocks (read from its timm source):
    a block-skipping strategy that finds none is then a failure, not "n/a". None: unknown,
    trust the library.
    """

    name: str
    family: str
    size: int = 64
    kwargs: dict = field(default_factory=dict)
    residual: bool | None = True


def _spec(name: str, family: str, size: int = 64, residual: bool | None = True, **kwargs) -> ModelSpec:
    return ModelSpec(name, family, size, kwargs, residual)


def _vit(name: str, family: str, size: int = 64, **kwargs) -> ModelSpec:
    return ModelSpec(name, family, size, {"img_size": size, **kwargs})


# The smallest timm variant of each family, at a small input the architecture accepts.
MODELS: list[ModelSpec] = [
    _spec("resnet18", "ResNet"),
    _spec("resnet50", "ResNet"),
    _spec("resnetv2_50", "ResNet"),
    _spec("resnet18d", "ResNet-D"),
    _spec("resnet26d", "ResNet-D"),
    _spec("resnext26ts", "ResNeXt"),
    _spec("resnext50_32x4d", "ResNeXt"),
    _spec("seresnext26d_32x4d", "ResNeXt"),
    _spec("regnetx_002", "RegNet"),
    _spec("regnety_002", "RegNet"),
    _spec("mobilenetv2_050", "MobileNet"),
    _spec("mobilenetv3_small_050", "MobileNet"),
    _spec("mobilenetv4_conv_small", "MobileNet"),
    _spec("efficientnet_b0", "EfficientNet"),
    _spec("efficientnet_lite0", "EfficientNet"),
    _spec("efficientnetv2_rw_t", "EfficientNet"),
    _spec("convnext_atto", "ConvNeXt"),
    _spec("convnext_femto", "ConvNeXt"),
    _spec("convnextv2_atto", "ConvNeXt"),
    _vit("vit_tiny_patch16_224", "ViT/DeiT"),
    _vit("deit_tiny_patch16_224", "ViT/DeiT"),
    _vit("deit_tiny_distilled_patch16_224", "ViT/DeiT"),
    _vit("eva02_tiny_patch14_224", "ViT/DeiT", size=56),
    _vit("swin_tiny_patch4_window7_224", "Swin", window_size=4),
    _vit("swinv2_cr_tiny_224", "Swin", window_size=4),
    _vit("cait_xxs24_224", "other transformer"),
    _vit("xcit_nano_12_p16_224", "other transformer"),
    _vit("pit_ti_224", "other transformer"),
    _vit("levit_128s", "other transformer"),
    _vit("coat_lite_tiny", "other transformer"),
    _spec("pvt_v2_b0", "other transformer"),
    _spec("twins_pcpvt_small", "other transformer"),
    _spec("mobilevit_xxs", "hybrid conv-transformer"),
    _spec("edgenext_xx_small", "hybrid conv-transformer"),
    _spec("fastvit_t8", "hybrid conv-transformer"),
    _spec("efficientvit_b0", "hybrid conv-transformer"),
    _vit("mixer_s16_224", "MLP"),
    _vit("resmlp_12_224", "MLP"),
    _spec("poolformer_s12", "MetaFormer"),
    _spec("densenet121", "other CNN", residual=False),
    _spec("vgg11", "other CNN", residual=False),
    _spec("dla34", "other CNN"),
    _spec("ghostnet_100", "other CNN"),
    _spec("repvgg_a0", "other CNN"),
    _spec("cspresnet50", "other CNN"),
    _spec("ese_vovnet19b_dw", "other CNN", residual=False),
    _spec("rexnet_100", "other CNN"),
    _spec("lcnet_050", "other CNN", residual=False),
    _spec("hrnet_w18_small", "other CNN"),
    _spec("nf_resnet26", "other CNN"),
    _spec("inception_v3", "other CNN", size=96, residual=False),
]

# timm's own tiny test models; the MaxViT-style ones need an input their windows divide.
_TEST_SIZES = {"test_maxvit": 160, "test_coatnet": 160}
_TEST_IMG_SIZE = {"test_vit3", "test_vit_relpos"}


def timm_test_specs() -> list[ModelSpec]:
    """Every ``timm.list_models('test_*')`` model, family "timm test model"."""
    specs = []
    for name in timm.list_models("test_*"):
        size = _TEST_SIZES.get(name, 64)
        kwargs = {"img_size": size} if name in _TEST_IMG_SIZE else {}
        residual = not name.startswith("test_efficientnet")  # their blocks have no skip connection
        specs.append(ModelSpec(name, "timm test model", size, kwargs, residual))
    return specs


def all_specs() -> list[ModelSpec]:
    return MODELS + timm_test_specs()


def spec_for(name: str) -> ModelSpec:
    """The catalogued spec of ``name``, or a 64 px spec of family "other" for any timm name."""
    for spec in all_specs():
        if spec.name == name:
            return spec
    return ModelSpec(name, "other", residual=None)


def build_base(spec: ModelSpec) -> torch.nn.Module:
    """The random-init timm model in eval mode; its pretrained config states the small input size,
    so that ``Preprocess.from_model`` (used by convert and load) sees the size the check runs at."""
    model = timm.create_model(spec.name, pretrained=False, num_classes=NUM_CLASSES, **spec.kwargs).eval()
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, spec.size, spec.size)
    model.pretrained_cfg = cfg
    return model
