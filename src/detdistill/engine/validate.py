"""Checks of a whole run config that need the registries, made before any work starts.

The schema (:mod:`detdistill.engine.config_schema`) checks types and ranges
as the config is read; names (detectors, distillation methods, the data
format, the optimizer and schedule) and method options can only be checked
against what is registered. Doing it here, first, means a typo costs one line
and no data loading or teacher evaluation.
"""

from __future__ import annotations

from detdistill.engine.builders import DATA_FORMATS
from detdistill.engine.config import import_modules, registered
from detdistill.engine.config_schema import Config
from detdistill.engine.optim import OPTIMIZERS
from detdistill.engine.schedule import SCHEDULES
from detdistill.errors import ConfigError, UnknownNameError
from detdistill.losses import build_method
from detdistill.models.registry import DETECTORS

__all__ = ["validate_config"]


def validate_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the key of the first unknown name or bad method option.

    The config's ``imports`` are imported first, so that the names their modules
    register are known.
    """
    import_modules(cfg.imports, "imports")
    registered(DATA_FORMATS, cfg.data.format, "data.format")
    registered(OPTIMIZERS, cfg.train.optimizer, "train.optimizer")
    registered(SCHEDULES, cfg.train.schedule, "train.schedule")
    models = {"model.name": cfg.model}
    if cfg.distill is not None and cfg.distill.teacher_model is not None:
        models["distill.teacher_model.name"] = cfg.distill.teacher_model
    for key, model in models.items():
        registered(DETECTORS, model.name, key)
    if cfg.distill is None:
        return
    if not cfg.distill.methods:
        raise ConfigError(
            "distill.methods is empty: a student without a method is plain training "
            "(detdistill train <student config>, or drop the distill section)",
            "distill.methods",
        )
    options = cfg.distill.method_options
    unused = sorted(set(options) - set(cfg.distill.methods))
    if unused:
        raise ConfigError(
            f"distill.method_options: options for method(s) not selected: {', '.join(unused)}",
            "distill.method_options",
        )
    for name in cfg.distill.methods:
        try:
            build_method(name, **options.get(name, {}))
        except UnknownNameError as exc:
            raise ConfigError(f"distill.methods: {exc}", "distill.methods") from None
        except (ValueError, TypeError) as exc:
            key = f"distill.method_options.{name}"
            raise ConfigError(f"{key}: {exc}", key) from None
