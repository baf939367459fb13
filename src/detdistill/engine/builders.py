"""From config sections to objects: detectors, data sets, loaders, saved models.

Kept apart from the training loop so that ``eval``, ``doctor``, ``analyze`` and
``predict`` build things exactly the way training did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from detdistill.data import (
    EMBEDDED_DATASETS,
    CocoDetection,
    VOCDetection,
    YoloDetection,
    build_transforms,
    collate_fn,
    embedded_dir,
    make_embedded,
)
from detdistill.data.tiles import TiledDataset, TileSettings
from detdistill.engine.checkpoint import load_checkpoint
from detdistill.engine.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    config_section,
    import_modules,
    registered,
)
from detdistill.engine.distributed import get_rank, get_world_size
from detdistill.engine.sampling import ResumableBatchSampler
from detdistill.errors import CheckpointError, DetDistillError
from detdistill.models import build_detector
from detdistill.models.backbones import BackboneArgumentError
from detdistill.models.detector_weights import DetectorWeightsError, load_detector_weights
from detdistill.models.registry import DETECTORS
from detdistill.models.yolo import YOLODetector
from detdistill.registry import Registry
from detdistill.slicing import SlicedDetector, SliceSettings
from detdistill.state_dicts import load_state_dict_strict

log = logging.getLogger(__name__)


def build_model(model_cfg: ModelConfig, image_size: int, pretrained: bool = True) -> nn.Module:
    """The detector a ``model`` config section describes, for square-ish inputs of ``image_size``.

    ``pretrained=False`` builds the same architecture without loading backbone
    or whole-detector weights (no download), for when a checkpoint's weights
    follow; the normalisation layers stay those of the pretrained build (frozen
    BN). With ``model.weights`` set (and ``pretrained``) the whole detector is
    loaded from torchvision detection weights after it is built
    (:func:`~detdistill.models.detector_weights.load_detector_weights`), and
    ``model.weights_backbone`` is not loaded: every backbone weight is replaced.
    """
    whole = model_cfg.weights is not None
    if getattr(DETECTORS.get(model_cfg.name), "builds_own_backbone", False):
        return _build_own_backbone_model(model_cfg, image_size, pretrained)
    kwargs: dict[str, Any] = {
        "backbone": model_cfg.backbone,
        "num_classes": model_cfg.num_classes,
        "levels": tuple(model_cfg.levels),
        "backbone_kwargs": dict(model_cfg.backbone_kwargs),
        "weights_backbone": model_cfg.weights_backbone if pretrained and not whole else None,
        "min_size": image_size,
        "max_size": image_size,
    }
    overlap = sorted(set(kwargs) & set(model_cfg.kwargs))
    if overlap:
        raise ConfigError(f"model.kwargs repeats {', '.join(overlap)}: set them on model.* instead")
    kwargs.update(model_cfg.kwargs)
    if whole or (not pretrained and model_cfg.weights_backbone is not None):
        kwargs.setdefault("norm_layer", "frozen_bn")
    try:
        model = build_detector(model_cfg.name, **kwargs)
    except BackboneArgumentError as exc:
        raise ConfigError(f"model.backbone_kwargs: {exc}") from exc
    except TypeError as exc:
        raise ConfigError(f"model.kwargs: {exc}") from exc
    except ValueError as exc:  # a value the detector refuses (levels, a head option)
        raise ConfigError(f"model: {exc}", "model") from exc
    if whole and pretrained:
        try:
            report = load_detector_weights(model, model_cfg.weights)
        except DetectorWeightsError as exc:
            raise ConfigError(f"model.weights: {exc}", "model.weights") from exc
        log.info("model.weights: %d tensors loaded from %s", report.loaded, report.source)
    return model


def _build_own_backbone_model(
    model_cfg: ModelConfig, image_size: int, pretrained: bool
) -> nn.Module:
    """A family whose model file defines its backbone (``yolo``: an Ultralytics YAML).

    ``model.backbone``, ``levels`` and ``weights_backbone`` do not apply;
    ``model.weights`` is the family's own checkpoint (an Ultralytics ``best.pt``).
    """
    kwargs = {"num_classes": model_cfg.num_classes, "image_size": image_size, **model_cfg.kwargs}
    try:
        model = build_detector(model_cfg.name, **kwargs)
    except (TypeError, DetDistillError) as exc:
        raise ConfigError(f"model.kwargs: {exc}", "model.kwargs") from exc
    if model_cfg.weights is not None and pretrained:
        try:
            model.load_ultralytics_weights(model_cfg.weights)
        except DetDistillError as exc:
            raise ConfigError(f"model.weights: {exc}", "model.weights") from exc
    return model


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    class_names: list[str]


#: How a data section's files become the training and validation sets: ``(data section,
#: train transforms, val transforms, train, class names)`` -> ``(train set, val set)``. With
#: ``train=False`` only the validation set is needed and the reader may return it in both
#: places. ``class_names`` (a saved model's, when it is evaluated) map the file's classes by
#: name onto the model's; ``None`` keeps the file's own. The training set takes the
#: validation set's names.
DataReader = Callable[
    [DataConfig, v2.Compose, v2.Compose, bool, "Sequence[str] | None"], tuple[Dataset, Dataset]
]

#: What ``eval --data PATH`` means for a format: ``(PATH, --images, --split)`` -> the keys of
#: a data section that name those files (e.g. COCO: ``val_annotations``, ``val_images``).
PathSection = Callable[[Path, "Path | None", str], dict[str, Any]]


@dataclass(frozen=True)
class DataFormat:
    """A registered ``data.format``: its reader, and its one-path form for ``eval --data``.

    ``from_path`` is ``None`` for a format no single path names (the embedded sets).
    """

    read: DataReader
    from_path: PathSection | None = None


#: ``data.format`` names. A user's module (``imports:``) adds one with
#: ``@register_data_format("name")`` on its reader; the val set's class names are the run's.
DATA_FORMATS: Registry[DataFormat] = Registry("data format")


def register_data_format(
    name: str, from_path: PathSection | None = None
) -> Callable[[DataReader], DataReader]:
    """Decorator: register a :data:`DataReader` as ``data.format: name``.

    ``from_path`` lets ``detdistill eval --data PATH --format name`` (and
    ``analyze``) read a validation set from one path; without it the format is
    evaluated through a saved model's own data section only.
    """

    def add(read: DataReader) -> DataReader:
        DATA_FORMATS.register(name)(DataFormat(read, from_path))
        return read

    return add


def _coco_images_dir(annotations: Path, images: Path | None) -> Path:
    """``--images``, else the folder named as the file (``val/`` for ``val.json``, the
    layout ``detdistill data make`` writes), else ``images/`` beside it, else its folder."""
    if images is not None:
        return images
    for candidate in (
        annotations.with_suffix(""),
        annotations.parent / "images",
        annotations.parent,
    ):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no images folder next to {annotations}: pass --images")


def _coco_path(path: Path, images: Path | None, split: str) -> dict[str, Any]:
    return {"val_annotations": str(path), "val_images": str(_coco_images_dir(path, images))}


def _voc_path(path: Path, images: Path | None, split: str) -> dict[str, Any]:
    if images is not None:
        raise ConfigError("--images is for COCO data: a VOC root holds its own JPEGImages")
    return {"root": str(path), "val_split": split}


def _yolo_path(path: Path, images: Path | None, split: str) -> dict[str, Any]:
    if images is not None:
        raise ConfigError("--images is for COCO data: a data.yaml names its own image folders")
    return {"yaml": str(path), "val_split": split}


@register_data_format("embedded")
def _embedded(
    data_cfg: DataConfig,
    train_tf: v2.Compose,
    val_tf: v2.Compose,
    train: bool,
    class_names: Sequence[str] | None,
) -> tuple[Dataset, Dataset]:
    """A generated set (:mod:`detdistill.data.embedded`), made once per setting under ``data.root``."""
    registered(EMBEDDED_DATASETS, data_cfg.name, "data.name")
    settings = {
        "num_train": data_cfg.num_train,
        "num_val": data_cfg.num_val,
        "seed": data_cfg.seed,
        "image_size": data_cfg.image_size,
    }
    try:
        folder = embedded_dir(data_cfg.root, data_cfg.name, **settings)
        paths = make_embedded(data_cfg.name, folder, **settings)
    except ValueError as exc:  # a setting the generator refuses (e.g. too small an image)
        raise ConfigError(f"data ({data_cfg.name}): {exc}", "data") from None
    train_set = CocoDetection(
        paths["train_images"], paths["train_annotations"], train_tf, class_names=class_names
    )
    val_set = CocoDetection(
        paths["val_images"], paths["val_annotations"], val_tf, class_names=train_set.class_names
    )
    return train_set, val_set


@register_data_format("coco", from_path=_coco_path)
def _coco(
    data_cfg: DataConfig,
    train_tf: v2.Compose,
    val_tf: v2.Compose,
    train: bool,
    class_names: Sequence[str] | None,
) -> tuple[Dataset, Dataset]:
    """COCO JSON and image folders; the training pair is only required when training."""
    missing = [
        key
        for key in ("train_images", "train_annotations", "val_images", "val_annotations")
        if getattr(data_cfg, key) is None and (train or key.startswith("val"))
    ]
    if missing:
        raise ConfigError(f"data.format=coco needs data.{', data.'.join(missing)}")
    val_set = CocoDetection(
        data_cfg.val_images, data_cfg.val_annotations, val_tf, class_names=class_names
    )
    if not train:
        return val_set, val_set
    train_set = CocoDetection(
        data_cfg.train_images, data_cfg.train_annotations, train_tf, class_names=val_set.class_names
    )
    return train_set, val_set


@register_data_format("yolo", from_path=_yolo_path)
def _yolo(
    data_cfg: DataConfig,
    train_tf: v2.Compose,
    val_tf: v2.Compose,
    train: bool,
    class_names: Sequence[str] | None,
) -> tuple[Dataset, Dataset]:
    """An Ultralytics ``data.yaml``; ``train_split``/``val_split`` name its keys."""
    if data_cfg.yaml is None:
        raise ConfigError("data.format=yolo needs data.yaml")
    val_set = YoloDetection(data_cfg.yaml, data_cfg.val_split, val_tf, class_names=class_names)
    if not train:
        return val_set, val_set
    train_set = YoloDetection(
        data_cfg.yaml, data_cfg.train_split, train_tf, class_names=val_set.class_names
    )
    return train_set, val_set


@register_data_format("voc", from_path=_voc_path)
def _voc(
    data_cfg: DataConfig,
    train_tf: v2.Compose,
    val_tf: v2.Compose,
    train: bool,
    class_names: Sequence[str] | None,
) -> tuple[Dataset, Dataset]:
    """A VOC root (``JPEGImages``, ``Annotations``, ``ImageSets/Main``) in ``data.root``."""
    val_set = VOCDetection(
        data_cfg.root, data_cfg.val_split, class_names=class_names, transforms=val_tf
    )
    if not train:
        return val_set, val_set
    train_set = VOCDetection(
        data_cfg.root, data_cfg.train_split, class_names=val_set.class_names, transforms=train_tf
    )
    return train_set, val_set


def build_datasets(
    data_cfg: DataConfig, train: bool = True, class_names: Sequence[str] | None = None
) -> DataSplits:
    """Training and validation sets of a ``data`` section, by its registered ``data.format``.

    The transforms and tiling are the same for every format, so they are
    decided here and each format only reads its files. ``class_names`` (a saved
    model's) map the files' classes onto the model's by name.
    """
    read = registered(DATA_FORMATS, data_cfg.format, "data.format").read
    tiles = data_cfg.tiles
    if tiles is not None and data_cfg.multiscale:
        raise ConfigError("data.tiles and data.multiscale cannot be combined: tiles keep the scale")
    if tiles is None:
        train_tf = build_transforms(
            True, data_cfg.image_size, hflip=data_cfg.hflip, multiscale=data_cfg.multiscale
        )
        val_tf = build_transforms(False, data_cfg.image_size)
    else:  # native resolution: tiles are cut from the images, evaluation is sliced
        train_tf = val_tf = build_transforms(False, None)
    train_set, val_set = read(data_cfg, train_tf, val_tf, train, class_names)
    if tiles is not None and train:
        settings = TileSettings(
            tiles.size, tiles.per_image, tiles.min_visible, tiles.object_centred
        )
        train_set = TiledDataset(
            train_set, settings, build_transforms(True, None, hflip=data_cfg.hflip)
        )
    return DataSplits(train_set, val_set, list(val_set.class_names))


def build_eval_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    """Ordered, this rank's share only (no padding duplicates that would count twice)."""
    sampler = ResumableBatchSampler(
        len(dataset),
        batch_size,
        shuffle=False,
        rank=get_rank(),
        world_size=get_world_size(),
        drop_last=False,
    )
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers
    )


def evaluation_model(model: nn.Module, data_cfg: DataConfig) -> nn.Module:
    """The model as evaluation must run it: a tiled run sees whole images window by window.

    Its detector works at the tile size, so whole (native-size) validation
    images go through :class:`~detdistill.slicing.SlicedDetector` with windows
    of that size; any other run is evaluated as it is.
    """
    if data_cfg.tiles is None:
        return model
    return SlicedDetector(model, SliceSettings(data_cfg.tiles.size))


@dataclass
class LoadedModel:
    model: nn.Module
    class_names: list[str]
    payload: dict[str, Any]
    data: DataConfig

    @property
    def image_size(self) -> int:
        return self.data.model_input_size

    @property
    def has_data_section(self) -> bool:
        """False for an Ultralytics checkpoint: it records an image size, not a data set."""
        return bool(self.payload)


def load_detector(
    checkpoint: str | Path,
    model_cfg: ModelConfig | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """A detector rebuilt from a ``model.pt`` (its own saved config unless one is given), loaded strictly.

    An Ultralytics checkpoint (a ``best.pt``) is read too, as a ``yolo`` model
    with the architecture, classes and image size it records: a YOLO user's
    teacher needs no conversion.
    """
    try:
        payload = load_checkpoint(checkpoint, map_location=map_location)
    except CheckpointError:
        foreign = YOLODetector.from_ultralytics_checkpoint(checkpoint)
        if foreign is None:
            raise
        model, class_names, image_size = foreign
        return LoadedModel(model, class_names, {}, DataConfig(image_size=image_size))
    missing = [key for key in ("model", "config", "class_names") if key not in payload]
    if missing:
        hint = (
            ": last_state.pt is a run's training state; pass its model.pt"
            if "optimizer" in payload
            else ": it is not a detector saved by detdistill (model.pt) or Ultralytics (best.pt)"
        )
        raise CheckpointError(f"{checkpoint} has no {', '.join(missing)}{hint}")
    # the run's own modules first: its detector (or backbone) may be one they register
    import_modules(payload["config"].get("imports", []), f"{checkpoint}: imports")
    data = config_section(payload["config"], "data")
    model_cfg = model_cfg or config_section(payload["config"], "model")
    model = build_model(model_cfg, data.model_input_size, pretrained=False)
    load_state_dict_strict(model, payload["model"], f"detector weights in {checkpoint}")
    return LoadedModel(model, list(payload["class_names"]), payload, data)
