"""Typed configs: presets, overrides, inheritance and the errors users will see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detdistill.engine.config import (
    Config,
    DistillConfig,
    ModelConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
    save_config,
)
from detdistill.engine.validate import validate_config
from detdistill.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    return message


# --- loading and overrides ----------------------------------------------------


def test_empty_preset_gives_the_schema_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "c.yaml", ""))
    assert cfg == Config()
    assert cfg.train.lr == 0.01 and cfg.model.levels == [3, 4, 5] and cfg.distill is None


def test_values_are_typed_and_int_is_accepted_for_float(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path / "c.yaml", "train: {lr: 1, grad_clip: null}\ndata: {multiscale: [96, 128]}\n"
        )
    )
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.grad_clip is None
    assert cfg.data.multiscale == [96, 128]


def test_scientific_notation_is_a_float(tmp_path: Path) -> None:
    # Plain PyYAML (YAML 1.1) reads 1e-4 as the string "1e-4".
    cfg = load_config(
        write(tmp_path / "c.yaml", "train: {weight_decay: 1e-4, lr: 5E-3}\n"),
        ["train.ema_decay=9.99e-1"],
    )
    assert cfg.train.weight_decay == pytest.approx(1e-4)
    assert cfg.train.lr == pytest.approx(5e-3)
    assert cfg.train.ema_decay == pytest.approx(0.999)


def test_overrides_set_nested_values_and_keep_the_rest(tmp_path: Path) -> None:
    preset = write(tmp_path / "c.yaml", "distill: {teacher_checkpoint: t.pt}\n")
    cfg = load_config(
        preset,
        [
            "train.lr=0.02",
            "distill.methods.rm=4",
            "distill.methods.kd=1",
            "distill.method_options.rm.temperature=2.0",
            "model.levels=[3, 4, 5, 6, 7]",
            "train.max_steps=5",
            "train.grad_clip=null",
            "output_dir=runs/x=y",  # only the first '=' separates key and value
        ],
    )
    assert cfg.train.lr == 0.02
    assert cfg.distill is not None
    assert cfg.distill.methods == {"rm": 4.0, "pfi": "auto", "kd": 1.0}
    assert cfg.distill.method_options == {"rm": {"temperature": 2.0}}
    assert cfg.model.levels == [3, 4, 5, 6, 7]
    assert cfg.train.max_steps == 5 and cfg.train.grad_clip is None
    assert cfg.output_dir == "runs/x=y"


def test_overrides_can_enable_a_null_section_in_any_order() -> None:
    cfg = apply_overrides(
        Config(),
        [
            "distill.methods.kd=1.0",
            "distill.teacher_model.backbone=resnet18",
            "distill.teacher_checkpoint=teacher.pt",
        ],
    )
    assert cfg.distill == DistillConfig(
        teacher_checkpoint="teacher.pt",
        teacher_model=ModelConfig(backbone="resnet18"),
        methods={"rm": "auto", "pfi": "auto", "kd": 1.0},
    )
    assert apply_overrides(cfg, ["distill=null"]).distill is None


def test_later_override_wins_and_input_is_not_mutated() -> None:
    base = Config()
    cfg = apply_overrides(base, ["train.lr=0.1", "train.lr=0.2"])
    assert cfg.train.lr == 0.2 and base.train.lr == 0.01


def test_parse_override() -> None:
    assert parse_override("train.lr=0.02") == ("train.lr", 0.02)
    assert parse_override(" train.amp = true") == ("train.amp", True)
    assert parse_override("data.multiscale=[1, 2]") == ("data.multiscale", [1, 2])
    assert parse_override("output_dir=") == ("output_dir", None)


# --- round trip -------------------------------------------------------------------


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = apply_overrides(
        Config(),
        [
            "distill.teacher_checkpoint=t.pt",
            "distill.teacher_model.backbone_kwargs={width: 64}",
            "distill.method_options={rm: {temperature: 2.0, score: prob}}",
            "model.kwargs={num_convs: 2}",
            "train.lr=0.003",
            "data.format=coco",
            "data.train_annotations=a.json",
        ],
    )
    path = save_config(cfg, tmp_path / "deep" / "config.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    plain = config_to_dict(cfg)
    assert isinstance(plain["distill"]["teacher_model"], dict)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(preset: Path, tmp_path: Path) -> None:
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_the_presets_named_in_the_docs_exist_and_say_what_they_claim() -> None:
    names = {p.name for p in PRESETS}
    assert {
        "digits_teacher.yaml",
        "digits_student.yaml",
        "digits_distill.yaml",
        "voc_r50_r18.yaml",
        "coco_retinanet_r101_r50.yaml",
    } <= names

    teacher = load_config(CONFIGS / "digits_teacher.yaml")
    student = load_config(CONFIGS / "digits_student.yaml")
    distill = load_config(CONFIGS / "digits_distill.yaml")
    assert teacher.data == student.data == distill.data
    assert teacher.model.levels == student.model.levels
    assert teacher.model.backbone_kwargs["width"] > student.model.backbone_kwargs["width"]
    assert distill.model == student.model and distill.train == student.train
    assert distill.distill is not None and student.distill is None

    # The demo's presets: the same data, backbones and recipe, with a GFL head.
    gfl = {
        r: load_config(CONFIGS / f"digits_gfl_{r}.yaml") for r in ("teacher", "student", "distill")
    }
    assert {c.model.name for c in gfl.values()} == {"gfl"}
    assert gfl["teacher"].data == gfl["student"].data == gfl["distill"].data == teacher.data
    assert gfl["teacher"].model.backbone_kwargs == teacher.model.backbone_kwargs
    assert gfl["student"].model.backbone_kwargs == student.model.backbone_kwargs
    assert gfl["distill"].model == gfl["student"].model
    assert gfl["distill"].train == gfl["student"].train == student.train
    assert gfl["distill"].distill.methods == distill.distill.methods
    assert gfl["distill"].distill.teacher_checkpoint == f"{gfl['teacher'].output_dir}/model.pt"

    voc = load_config(CONFIGS / "voc_r50_r18.yaml")
    assert voc.data.format == "voc" and voc.model.num_classes == 20
    assert voc.model.backbone == "resnet18" and voc.distill is not None
    assert 512 <= voc.data.image_size <= 640

    coco = load_config(CONFIGS / "coco_retinanet_r101_r50.yaml")
    assert coco.data.format == "coco" and coco.model.num_classes == 80
    assert coco.model.backbone == "resnet50" and coco.model.levels == [3, 4, 5, 6, 7]
    assert coco.train.epochs == 24 and coco.train.milestones == [16, 22]
    assert coco.train.lr == 0.01 and coco.train.schedule == "step"
    assert coco.distill is not None and coco.distill.methods == {"rm": "auto", "pfi": "auto"}
    assert coco.distill.teacher_model is None  # read from the teacher checkpoint
    teacher = load_config(CONFIGS / "coco_retinanet_r101.yaml")
    assert teacher.model.backbone == "resnet101" and teacher.model.levels == coco.model.levels
    assert coco.distill.teacher_checkpoint == f"{teacher.output_dir}/model.pt"


# --- inheritance --------------------------------------------------------------------


def test_base_inheritance_merges_sections_and_replaces_mappings(tmp_path: Path) -> None:
    (tmp_path / "presets").mkdir()
    write(
        tmp_path / "presets" / "base.yaml",
        "seed: 3\ntrain: {lr: 0.05, epochs: 2}\n"
        "distill: {teacher_checkpoint: t.pt, methods: {rm: 4.0, pfi: 1.5}}\n",
    )
    child = write(
        tmp_path / "presets" / "child.yaml",
        "_base_: base.yaml\ntrain: {epochs: 5}\ndistill: {methods: {kd: 1.0}}\n",
    )
    grandchild = write(tmp_path / "gc.yaml", "_base_: presets/child.yaml\nseed: 7\n")

    cfg = load_config(child)
    assert cfg.seed == 3
    assert cfg.train.lr == 0.05 and cfg.train.epochs == 5  # section merged key by key
    assert cfg.distill is not None
    assert cfg.distill.teacher_checkpoint == "t.pt"
    assert cfg.distill.methods == {"kd": 1.0}  # a mapping field is replaced as a whole

    cfg = load_config(grandchild, ["train.epochs=9"])  # paths relative to each file
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs) == (7, 0.05, 9)


def test_base_can_be_switched_off_by_a_child(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "distill: {teacher_checkpoint: t.pt}\n")
    child = write(tmp_path / "child.yaml", "_base_: base.yaml\ndistill: null\n")
    assert load_config(child).distill is None


# --- errors ---------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    preset = write(tmp_path / "c.yaml", "train: {lrr: 0.1}\n")
    message = error_of(load_config, preset)
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in message
    assert str(preset) in message

    message = error_of(apply_overrides, Config(), ["train.lrr=0.1"])
    assert message == (
        "override 'train.lrr=0.1': unknown key 'train.lrr' (did you mean 'train.lr'?)"
    )
    assert "unknown key 'trian' (did you mean 'train'?)" in error_of(
        apply_overrides, Config(), ["trian.lr=0.1"]
    )


def test_unknown_key_without_a_close_match_lists_the_valid_keys() -> None:
    message = error_of(apply_overrides, Config(), ["data.zzz=1"])
    assert "unknown key 'data.zzz'" in message and "batch_size" in message


def test_wrong_type_names_key_expected_and_got() -> None:
    assert error_of(apply_overrides, Config(), ["train.epochs=ten"]).endswith(
        "train.epochs: expected int, got str 'ten'"
    )
    assert "train.epochs: expected int, got float 1.5" in error_of(
        apply_overrides, Config(), ["train.epochs=1.5"]
    )
    assert "train.amp: expected bool, got int 1" in error_of(
        apply_overrides, Config(), ["train.amp=1"]
    )
    assert "train.grad_clip: expected float or null, got str 'big'" in error_of(
        apply_overrides, Config(), ["train.grad_clip=big"]
    )
    assert "model.levels[1]: expected int, got str 'x'" in error_of(
        apply_overrides, Config(), ["model.levels=[3, x]"]
    )
    assert "data.multiscale: expected list[int], got int 5" in error_of(
        apply_overrides, Config(), ["data.multiscale=5"]
    )
    assert "distill.methods.rm: expected float or one of 'auto', got str 'high'" in error_of(
        apply_overrides, Config(), ["distill.teacher_checkpoint=t", "distill.methods.rm=high"]
    )
    assert "distill.teacher_model.num_classes: expected int" in error_of(
        apply_overrides,
        Config(),
        ["distill.teacher_checkpoint=t", "distill.teacher_model.num_classes=many"],
    )


def test_wrong_type_in_a_file_names_the_file(tmp_path: Path) -> None:
    preset = write(tmp_path / "c.yaml", "train:\n  epochs: ten\n")
    assert error_of(load_config, preset) == f"{preset}: train.epochs: expected int, got str 'ten'"
    assert "model: expected mapping, got list" in error_of(
        load_config, write(tmp_path / "d.yaml", "model: [1, 2]\n")
    )


def test_bad_literal_lists_the_choices() -> None:
    message = error_of(
        apply_overrides,
        Config(),
        ["distill.teacher_checkpoint=t", "distill.auto_ratio={feature: 2}"],
    )
    assert "expected one of 'features', 'outputs', got str 'feature'" in message
    assert "did you mean 'features'" in message


def test_unknown_registered_name_lists_the_registered_ones() -> None:
    """Format, optimizer and schedule are registry names, checked before any work."""
    message = error_of(validate_config, apply_overrides(Config(), ["train.optimizer=adam"]))
    assert message.startswith("train.optimizer: unknown optimizer 'adam'; registered optimizers: ")
    assert "adamw, sgd" in message and "did you mean 'adamw'" in message
    message = error_of(validate_config, apply_overrides(Config(), ["data.format=darknet"]))
    assert "data.format: unknown data format 'darknet'" in message
    assert "coco, embedded, voc, yolo" in message and len(message.splitlines()) == 1
    message = error_of(validate_config, apply_overrides(Config(), ["train.schedule=linear"]))
    assert (
        "train.schedule: unknown schedule 'linear'; registered schedules: cosine, step" in message
    )


def test_out_of_range_values() -> None:
    assert "data.seed: must be >= 0" in error_of(apply_overrides, Config(), ["data.seed=-1"])
    message = error_of(apply_overrides, Config(), ["data.multiscale=[96, -32]"])
    assert "data.multiscale: sizes must be > 0" in message
    assert "train.lr: must be > 0" in error_of(apply_overrides, Config(), ["train.lr=-1"])
    assert "data.hflip: must be in [0, 1]" in error_of(apply_overrides, Config(), ["data.hflip=2"])
    assert "device: must be" in error_of(apply_overrides, Config(), ["device=gpu"])
    assert apply_overrides(Config(), ["device=cuda:1"]).device == "cuda:1"


def test_missing_required_key() -> None:
    message = error_of(apply_overrides, Config(), ["distill.methods.rm=4"])
    assert "missing required key 'distill.teacher_checkpoint'" in message


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert error_of(load_config, missing) == f"config file not found: {missing}"
    child = write(tmp_path / "child.yaml", "_base_: gone.yaml\n")
    assert f"_base_ file not found: {tmp_path / 'gone.yaml'}" in error_of(load_config, child)


def test_base_cycle_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    assert "_base_ cycle" in error_of(load_config, tmp_path / "a.yaml")


def test_invalid_yaml_and_non_mapping_presets(tmp_path: Path) -> None:
    assert "invalid YAML" in error_of(load_config, write(tmp_path / "a.yaml", "train: [1,\n"))
    assert "must be a mapping" in error_of(load_config, write(tmp_path / "b.yaml", "- 1\n"))


@pytest.mark.parametrize("text", ["foo", "=3", "train..lr=1", "train.lr", " =1"])
def test_bad_override_syntax(text: str) -> None:
    message = error_of(apply_overrides, Config(), [text])
    assert message.startswith(f"bad override {text!r}: expected KEY=VALUE")


def test_text_keys_take_the_value_as_typed() -> None:
    """Paths and names are text: YAML would cut ``a #1`` at the comment, and turn ``yes``
    and ``1e3`` into a bool and a float."""
    cfg = apply_overrides(
        Config(),
        ["output_dir=runs/a #1", "data.yaml=yes", "distill.teacher_checkpoint=1e3",
         "data.root='quoted path'"],
    )  # fmt: skip
    assert cfg.output_dir == "runs/a #1" and cfg.data.yaml == "yes"
    assert cfg.distill.teacher_checkpoint == "1e3" and cfg.data.root == "quoted path"
    assert apply_overrides(Config(), ["data.yaml=null"]).data.yaml is None
    assert apply_overrides(Config(), ["data.num_train=12"]).data.num_train == 12  # not text


def test_a_file_that_is_not_text_is_not_a_config(tmp_path: Path) -> None:
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00")
    assert error_of(load_config, binary) == f"{binary} is not a YAML config (not UTF-8 text)"


def test_a_mapping_typed_without_spaces_gets_a_hint() -> None:
    message = error_of(apply_overrides, Config(), ["model.backbone_kwargs={width:4,depth:1}"])
    assert "needs a space after ':'" in message and "{width: 4} instead of {width:4}" in message
    spaced = apply_overrides(Config(), ["model.backbone_kwargs={width: 4, depth: 1}"])
    assert spaced.model.backbone_kwargs == {"width": 4, "depth": 1}


def test_unknown_model_arguments_name_the_config_key_they_came_from() -> None:
    from detdistill.engine.builders import build_model

    def build_error(override: str) -> str:
        cfg = apply_overrides(Config(), ["model.backbone=tiny", override])
        return error_of(build_model, cfg.model, 64)

    assert build_error("model.backbone_kwargs={widht: 4}").startswith(
        "model.backbone_kwargs: backbone 'tiny': "
    )
    assert "'widht'" in build_error("model.backbone_kwargs={widht: 4}")
    assert build_error("model.kwargs={num_conv: 2}").startswith("model.kwargs: ")
    assert "width, depth and num_stages must be >= 1" in build_error(
        "model.backbone_kwargs={width: 0}"
    )
    assert build_error("model.levels=[9]").startswith("model: lowest level 9")


def test_override_through_a_scalar_is_an_error() -> None:
    message = error_of(apply_overrides, Config(), ["train.lr.x=1"])
    assert "'train.lr' is float 0.01, not a section" in message


def test_a_single_string_of_overrides_is_rejected() -> None:
    with pytest.raises(TypeError):
        apply_overrides(Config(), "train.lr=0.1")  # type: ignore[arg-type]
