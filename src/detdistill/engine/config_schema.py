"""The run configuration's schema: sections as dataclasses, ranges next to their fields.

Every key a preset may set is declared here with its type, default and (where
one applies) its range check; :mod:`detdistill.engine.config` reads YAML and
overrides into these classes and checks them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from detdistill.distill.auto_weights import DEFAULT_BATCHES, DEFAULT_RATIOS

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "TileConfig",
    "TrainConfig",
]


# ---------------------------------------------------------------------------
# Range checks, attached to fields as metadata so they sit next to the field.


def _check(predicate: Callable[[Any], bool], message: str) -> dict[str, Any]:
    return {"check": (predicate, message)}


_POSITIVE = _check(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
_OPTIONAL_POSITIVE = _check(lambda v: v is None or v > 0, "must be > 0 or null")
_PROBABILITY = _check(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
_UNIT_RIGHT_CLOSED = _check(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
_OPEN_UNIT = _check(lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
_NON_EMPTY = _check(lambda v: len(v) > 0, "must not be empty")
_SIZES = _check(lambda v: all(s > 0 for s in v), "sizes must be > 0")
_WEIGHTS = _check(
    lambda v: all(w == "auto" or w >= 0 for w in v.values()), "weights must be >= 0 or 'auto'"
)
_RATIOS = _check(lambda v: all(r > 0 for r in v.values()), "ratios must be > 0")
_DEVICE = _check(
    lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None,
    "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
)


# ---------------------------------------------------------------------------
# Schema


@dataclass
class TileConfig:
    """Train on crops at native resolution (:mod:`detdistill.data.tiles`); evaluate sliced."""

    size: int = field(metadata=_POSITIVE)
    per_image: int = field(default=4, metadata=_POSITIVE)
    min_visible: float = field(default=0.5, metadata=_UNIT_RIGHT_CLOSED)
    object_centred: float = field(default=0.5, metadata=_PROBABILITY)


@dataclass
class DataConfig:
    """Where the images come from and how they are batched (per process)."""

    # A registered data format (DATA_FORMATS in detdistill.engine.builders): checked
    # by name in detdistill.engine.validate, so that a plug-in's format is accepted.
    format: str = "embedded"
    name: str = "digits"
    root: str = ".cache/detdistill/data"
    # Which embedded data set: its own seed, not the run's, so that runs with
    # different seeds train and evaluate on the same images.
    seed: int = field(default=0, metadata=_NON_NEGATIVE)
    train_images: str | None = None
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    # format: yolo: the data.yaml; train_split/val_split name its keys
    yaml: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    num_train: int = field(default=3000, metadata=_POSITIVE)
    num_val: int = field(default=500, metadata=_POSITIVE)
    image_size: int = field(default=128, metadata=_POSITIVE)
    multiscale: list[int] = field(default_factory=list, metadata=_SIZES)
    hflip: float = field(default=0.5, metadata=_PROBABILITY)
    batch_size: int = field(default=16, metadata=_POSITIVE)
    num_workers: int = field(default=2, metadata=_NON_NEGATIVE)
    # Large images with small objects: train on tiles instead of resizing whole
    # images to image_size (which then only sizes the whole-image pass).
    tiles: TileConfig | None = None

    @property
    def model_input_size(self) -> int:
        """The size the detector works at: the tile side when tiling, else ``image_size``."""
        return self.tiles.size if self.tiles is not None else self.image_size


@dataclass
class ModelConfig:
    """Which detector to build; ``kwargs`` go to the detector builder.

    ``weights_backbone`` loads the backbone body only (ImageNet weights: a
    torchvision weights name or a local file). ``weights`` loads the whole
    detector from a torchvision detection model
    (:func:`detdistill.models.detector_weights.load_detector_weights`): a name
    such as ``RetinaNet_ResNet50_FPN_Weights.COCO_V1`` or
    ``FCOS_ResNet50_FPN_Weights.COCO_V1`` (downloaded by torchvision), or a local
    file holding that model's ``state_dict()``. It fits ``retinanet``
    (torchvision's v1, ``head_norm`` unset) and ``fcos`` with ``backbone:
    resnet50`` and ``levels: [3, 4, 5, 6, 7]``; with another ``num_classes`` the
    class predictor is re-initialised. It replaces ``weights_backbone`` (which is
    then not loaded) and, like it, makes ``norm_layer`` default to ``frozen_bn``.
    A model rebuilt from a checkpoint does not read it (the checkpoint holds the weights).
    """

    name: str = "retinanet"
    backbone: str = "tiny"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    weights_backbone: str | None = None
    weights: str | None = None
    num_classes: int = field(default=10, metadata=_POSITIVE)
    levels: list[int] = field(default_factory=lambda: [3, 4, 5], metadata=_NON_EMPTY)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation schedule; ``max_steps`` stops early for smoke runs."""

    epochs: int = field(default=12, metadata=_POSITIVE)
    # Registered names (OPTIMIZERS in detdistill.engine.optim, SCHEDULES in detdistill.engine.schedule), checked in
    # detdistill.engine.validate like data.format.
    optimizer: str = "sgd"
    lr: float = field(default=0.01, metadata=_POSITIVE)
    momentum: float = field(default=0.9, metadata=_PROBABILITY)
    weight_decay: float = field(default=1e-4, metadata=_NON_NEGATIVE)
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = field(default=0.1, metadata=_POSITIVE)
    warmup_iters: int = field(default=100, metadata=_NON_NEGATIVE)
    warmup_factor: float = field(default=0.001, metadata=_UNIT_RIGHT_CLOSED)
    grad_clip: float | None = field(default=10.0, metadata=_OPTIONAL_POSITIVE)
    amp: bool = False
    ema: bool = False
    # reached after the EMA's first ~2000 updates, from 0 (engine.run_setup.ramped_ema)
    ema_decay: float = field(default=0.9998, metadata=_OPEN_UNIT)
    eval_interval: int = field(default=1, metadata=_NON_NEGATIVE)  # 0: after the last epoch only
    log_interval: int = field(default=20, metadata=_POSITIVE)
    max_steps: int | None = field(default=None, metadata=_OPTIONAL_POSITIVE)


@dataclass
class DistillConfig:
    """Teacher and distillation terms; ``methods`` maps method name to loss weight.

    A weight may be ``auto``: chosen before the first step so that the term's
    gradient on the student parameters it reaches is ``auto_ratio[kind]`` times
    the detection loss's, measured on the first ``auto_batches`` batches; the
    kind is ``features`` or ``outputs``, what the method imitates
    (:mod:`detdistill.distill.auto_weights`). ``teacher_model`` may be left out: the
    teacher checkpoint stores its own config, which is the safest description
    of the weights it holds. ``teacher_half``, ``teacher_channels_last`` and
    ``teacher_compile`` choose how the frozen teacher runs
    (:class:`detdistill.distill.Distiller`).
    """

    teacher_checkpoint: str
    teacher_model: ModelConfig | None = None
    methods: dict[str, float | Literal["auto"]] = field(
        default_factory=lambda: {"rm": "auto", "pfi": "auto"}, metadata=_WEIGHTS
    )
    auto_ratio: dict[Literal["features", "outputs"], float] = field(
        default_factory=lambda: dict(DEFAULT_RATIOS), metadata=_RATIOS
    )
    auto_batches: int = field(default=DEFAULT_BATCHES, metadata=_POSITIVE)
    # Lower an auto weight whose term outgrows 2x its target ratio during training
    # (docs/weights.md, the guard); false keeps the weights chosen at the start, as before.
    auto_guard: bool = True
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    teacher_half: bool = False
    teacher_channels_last: bool = True
    teacher_compile: bool = False


@dataclass
class Config:
    """One run: data, model, optimisation and (optionally) distillation.

    ``imports`` names modules (``my_package.my_methods``) that register methods,
    detectors, data formats, ... of the user's own; they are imported before the
    config's names are checked (:func:`detdistill.engine.validate.validate_config`)
    and before a checkpoint of the run is rebuilt, so those names work like
    built-in ones.
    """

    imports: list[str] = field(default_factory=list)
    seed: int = 0
    output_dir: str = "runs/run"
    device: str = field(default="auto", metadata=_DEVICE)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig | None = None
