"""The recipe's dataclasses: what one conversion is made of, validated section by section.

These are plain data; reading them from YAML, the command line and built-in recipes, and
resolving the strategy's own ``options``, is ``dynconvert.recipe``'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import yaml

from dynconvert.errors import DynconvertError
from dynconvert.options import check_choice, check_range, option


@dataclass
class ModelConfig:
    """Which static network to convert."""

    name: str = option("", "a timm model name (or the label of a user's own module)")
    weights: str | None = option(None, "local checkpoint (state dict or safetensors); None: timm's pretrained weights")
    pretrained: bool = option(True, "fetch timm's pretrained weights when no weights file is given")
    num_classes: int | None = option(None, "build the model with this many classes (a new, untrained head)")
    leaf_modules: list[str] = option([], "submodules torch.fx keeps whole, as one node of the graph")
    input_size: list[int] | None = option(
        None,
        "input height and width the conversion runs at; None: the model's own (a vision transformer's "
        "img_size), else its pretrained configuration's when built by name, the data's image size when handed in",
    )


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    path: str | None = option(None, "local folder (parquet, image folder) or a hub data set name")
    image_column: str | None = option(None, "image column; None: found from the features")
    label_column: str | None = option(None, "label column; None: found from the features")
    train_split: str = option("train", "split the inserted parts are fitted on")
    calibration_split: str | None = option(None, "split the decisions are calibrated on; None: held out of train")
    eval_split: str | None = option(None, "split the report is measured on; None: validation or test")
    calibration_fraction: float = option(0.1, "share of train held out for calibration")
    max_train_samples: int | None = option(None, "cap on the training images used")
    max_eval_samples: int | None = option(None, "cap on the evaluation images used")
    batch_size: int = option(256, "batch size of the backbone passes (features, calibration, evaluation)")
    cache: bool = option(
        True, "decode each image once into a file under $DYNCONVERT_CACHE that later passes and runs read"
    )
    workers: int | None = option(None, "processes that decode images; None: one per CPU core (at most 8)")

    def validate(self) -> None:
        check_range("data.calibration_fraction", self.calibration_fraction, 0.0, 0.9)
        check_range("data.batch_size", self.batch_size, 1, None)
        check_range("data.workers", self.workers, 0, 64)


@dataclass
class TrainConfig:
    """How the inserted modules are fitted (a strategy may add its own knobs under ``options``)."""

    epochs: int = option(20, "passes over the fit split")
    batch_size: int = option(256, "training batch size")
    lr: float = option(1e-3, "learning rate of the inserted parts")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    distill_temperature: float = option(3.0, "temperature of the self-distillation targets")
    distill_weight: float = option(0.5, "weight of self-distillation against the labels (0: labels only)")

    def validate(self) -> None:
        check_range("train.epochs", self.epochs, 0, None)
        check_range("train.batch_size", self.batch_size, 1, None)
        check_range("train.lr", self.lr, 0.0, None)
        check_range("train.distill_weight", self.distill_weight, 0.0, 1.0)
        check_range("train.distill_temperature", self.distill_temperature, 1e-3, None)


@dataclass
class CalibrateConfig:
    """The budget the run-time decisions are fitted to, on held-out training data."""

    max_accuracy_drop: float | None = option(0.01, "largest accuracy loss allowed (95% upper bound)")
    flops_ratio: float | None = option(None, "or: the FLOPs budget, as a fraction of the static model's")
    criterion: str = option("max_softmax", "confidence of a prediction: max_softmax or entropy")
    reference: str = option("labels", "what a decision is judged against: labels, or agreement with the full model")
    drop_from: str = option(
        "static",
        "what max_accuracy_drop is measured from: the static model, or best: the more accurate of it "
        "and the best point of the sweep (fitted parts can beat the original on a new data set)",
    )

    def validate(self) -> None:
        if (self.max_accuracy_drop is None) == (self.flops_ratio is None):
            raise DynconvertError(
                "calibrate: set exactly one of max_accuracy_drop and flops_ratio "
                "(for example --set calibrate.flops_ratio=0.5 --set calibrate.max_accuracy_drop=null)"
            )
        if self.max_accuracy_drop is not None:
            check_range("calibrate.max_accuracy_drop", self.max_accuracy_drop, 0.0, 1.0)
        if self.flops_ratio is not None:
            check_range("calibrate.flops_ratio", self.flops_ratio, 0.0, 1.0)
        check_choice("calibrate.criterion", self.criterion, ("max_softmax", "entropy"))
        check_choice("calibrate.reference", self.reference, ("agreement", "labels"))
        check_choice("calibrate.drop_from", self.drop_from, ("static", "best"))


@dataclass
class EvaluateConfig:
    """What is measured on the evaluation split."""

    latency_samples: int = option(200, "images timed one by one for the report's latency")
    sweep_points: int = option(
        6, "calibration-sweep points re-measured on the evaluation split where each costs a pass over it"
    )

    def validate(self) -> None:
        check_range("evaluate.latency_samples", self.latency_samples, 0, None)
        check_range("evaluate.sweep_points", self.sweep_points, 1, None)


@dataclass
class Recipe:
    """Everything one conversion needs; written into the output folder as ``recipe.yaml``.

    ``model`` names the network to convert; a strategy that combines several networks (a
    cascade) takes them from ``models``, cheapest first, each with its own weights. Use
    :meth:`model_configs` to read either form.
    """

    strategy: str = option("early-exit", "a registered strategy (dynconvert.list_strategies())")
    seed: int = option(0, "random seed: a run on the same machine repeats exactly")
    device: str = option("cpu", "cpu or cuda")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    models: list[ModelConfig] = option([], "several networks, cheapest first (for strategies that combine models)")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = dataclasses.field(default_factory=CalibrateConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    options: dict[str, Any] = option({}, "the strategy's own options (dynconvert --list-options STRATEGY)")

    def model_configs(self) -> list[ModelConfig]:
        """The networks this recipe converts: ``models`` when set, else ``[model]``."""
        return list(self.models) if self.models else [self.model]

    def validate_sections(self) -> None:
        """Check every section but the strategy's options; raise on the first problem."""
        for section in (self.data, self.train, self.calibrate, self.evaluate):
            section.validate()
        check_range("seed", self.seed, 0, 2**32 - 1)
        if self.models and self.model.name and self.model.name != self.models[0].name:
            raise DynconvertError("set either model or models, not both (models lists every network, cheapest first)")
        for i, config in enumerate(self.model_configs()):
            where = "model" if not self.models else f"models[{i}]"
            check_range(f"{where}.num_classes", config.num_classes, 1, None)
            size = config.input_size
            if size is not None and (len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
                raise DynconvertError(f"recipe key '{where}.input_size' must be [HEIGHT, WIDTH], got {size!r}")
            if not config.name:
                raise DynconvertError(f"{where} names no model: pass MODEL on the command line or set {where}.name")
        check_choice("device", self.device.split(":")[0], ("cpu", "cuda"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
