"""Reference architectures that timm lacks, registered in timm's registry on import."""

from dynconvert.models import cifar_resnet  # noqa: F401  (registers the models)
