"""Values keep their type: text fields keep the text as written (YAML 1.1 would read
``off``/``no``/``yes`` as booleans and ``2024`` as a number), other fields get YAML values."""

from __future__ import annotations

import pytest

from mentor.config import ConfigError, apply_overrides, dump_config, load_config, parse_override

CACHE = ["teacher.source=cache", "teacher.cache=/tmp/some-cache"]


def test_documented_cache_check_off_override_is_the_word_off():
    cfg = load_config("digits", [*CACHE, "teacher.cache_check=off"])
    assert cfg.teacher.options.cache_check == "off"
    # the order of the overrides does not matter (the source is known from all of them)
    cfg = load_config("digits", ["teacher.cache_check=off", *CACHE])
    assert cfg.teacher.options.cache_check == "off"
    cfg = load_config("digits", [*CACHE, "teacher.cache_check=warn"])
    assert cfg.teacher.options.cache_check == "warn"


def test_text_fields_keep_what_was_typed():
    cfg = load_config(
        "digits",
        [
            "teacher.source=cache",
            "teacher.cache=2024",
            "output.dir=no",
            "name=yes",
            "description=Distill: fast #1",
        ],
    )
    assert cfg.teacher.options.cache == "2024"
    assert cfg.output.dir == "no"
    assert cfg.name == "yes"
    assert cfg.description == "Distill: fast #1"
    assert load_config("digits", ["output.dir=2024"]).output.dir == "2024"
    assert load_config("digits", ["name=010"]).name == "010"  # not the octal 8
    assert load_config("digits", ["name=1.50"]).name == "1.50"
    assert load_config("digits", ["name=on"]).name == "on"


def test_parse_override_types_by_field():
    assert parse_override("teacher.cache_check=off") == (["teacher", "cache_check"], "off")
    assert parse_override("output.dir=2024") == (["output", "dir"], "2024")
    assert parse_override("name=no") == (["name"], "no")
    assert parse_override("train.progress=no") == (["train", "progress"], False)
    assert parse_override("train.lr=3e-4")[1] in ("3e-4", 3e-4)  # pydantic reads it as 3e-4
    assert parse_override("train.seed=7") == (["train", "seed"], 7)


def test_quotes_and_null_on_text_fields():
    assert load_config("digits", ["name='null'"]).name == "null"
    assert load_config("digits", ['name="yes"']).name == "yes"
    cfg = load_config("digits", ["teacher.builder=mlp"])
    assert cfg.teacher.builder == "mlp"
    assert load_config("digits", ["teacher.builder=null"]).teacher.builder is None
    with pytest.raises(ConfigError, match="output.dir: invalid value None"):
        load_config("digits", ["output.dir=null"])  # not an optional field: not the text 'null'


def test_other_fields_still_get_yaml_values():
    cfg = load_config(
        "digits",
        [
            "train.lr=3e-4",
            "train.progress=false",
            "output.overwrite=yes",
            "student.params.hidden=[0,5]",
            "data.params.flag=yes",
            "objective={ce: {weight: 1}}",
        ],
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.progress is False
    assert cfg.output.overwrite is True
    assert cfg.student.params["hidden"] == [0, 5]
    assert cfg.data.params["flag"] is True  # free-form params stay YAML
    assert cfg.objective == {"ce": {"weight": 1}}
    with pytest.raises(ConfigError, match="train.seed: invalid value 'abc'"):
        load_config("digits", ["train.seed=abc"])


def test_section_override_keeps_text_fields_inside_it():
    cfg = load_config("digits", ["teacher={source: cache, cache: 2024, cache_check: off}"])
    assert cfg.teacher.options.cache == "2024"
    assert cfg.teacher.options.cache_check == "off"
    cfg = load_config("digits", ["output={dir: 2024, overwrite: yes}"])
    assert cfg.output.dir == "2024" and cfg.output.overwrite is True


def test_ensemble_member_sections_are_typed_too():
    out = apply_overrides(
        {},
        [
            "teacher.source=ensemble",
            "teacher.members=[{builder: mlp, path: 2024}, {builder: mlp, path: no}]",
        ],
    )
    assert out["teacher"]["members"] == [
        {"builder": "mlp", "path": "2024"},
        {"builder": "mlp", "path": "no"},
    ]


def test_recipe_file_keeps_text_fields(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: yes\n"
        "teacher:\n"
        "  source: cache\n"
        "  cache: 2024\n"
        "  cache_check: off\n"
        "output: {dir: no, overwrite: yes}\n"
        "student: {builder: mlp, params: {hidden: [8]}}\n"
        "data: {params: {flag: on}}\n"
        "train: {progress: off, lr: 1e-3}\n"
    )
    cfg = load_config(recipe)
    assert cfg.name == "yes"
    assert cfg.teacher.options.cache == "2024"
    assert cfg.teacher.options.cache_check == "off"
    assert cfg.output.dir == "no" and cfg.output.overwrite is True
    assert cfg.data.params["flag"] is True
    assert cfg.train.progress is False
    # the resolved config round-trips (the dump quotes 'off', 'no', '2024')
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_recipe_file_anchors_and_merge_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "teacher: &t\n  source: cache\n  cache: 2024\n  cache_check: off\n"
        "output:\n  dir: 2025\n"
        "name: &n no\n"
        "description: *n\n"
    )
    cfg = load_config(recipe)
    assert cfg.teacher.options.cache == "2024" and cfg.teacher.options.cache_check == "off"
    assert cfg.output.dir == "2025"
    assert cfg.name == "no" and cfg.description == "no"


def test_mapping_booleans_for_unambiguous_literals():
    base = {"teacher": {"source": "cache", "cache": "c"}}
    cfg = load_config({"teacher": {**base["teacher"], "cache_check": False}})
    assert cfg.teacher.options.cache_check == "off"
    # True has no spelling among strict/warn/off: refused, naming the field and the choices
    with pytest.raises(ConfigError, match=r"teacher.cache_check: invalid value True.*'off'"):
        load_config({"teacher": {**base["teacher"], "cache_check": True}})
    # a plain text field is not guessed (True could have been yes, on or true)
    with pytest.raises(ConfigError, match="name: invalid value True"):
        load_config({"name": True})


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n# and another\n", "---\n"])
def test_empty_recipe_file_is_refused(tmp_path, text):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    msg = str(e.value)
    assert str(recipe) in msg and "is empty" in msg and "{}" in msg


def test_explicit_empty_mapping_is_all_defaults(tmp_path):
    recipe = tmp_path / "defaults.yaml"
    recipe.write_text("{}  # all defaults\n")
    cfg = load_config(recipe)
    assert cfg.name == "run" and cfg.objective == {"kd": {"weight": 1.0}}


def test_yaml_booleans_are_not_numbers():
    """`train.seed=no` would silently become seed 0: numeric fields refuse YAML booleans."""
    with pytest.raises(ConfigError, match=r"train.seed=no: a number is expected"):
        load_config("digits", ["train.seed=no"])
    with pytest.raises(ConfigError, match=r"train.max_steps=yes"):
        load_config("digits", ["train.max_steps=yes"])
    assert load_config("digits", ["train.seed=3", "train.lr=1e-3"]).train.seed == 3
    assert load_config("digits", ["train.progress=no"]).train.progress is False
