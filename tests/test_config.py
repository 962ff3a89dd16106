import pytest
import yaml

from mentor.config import ConfigError, apply_overrides, dump_config, load_config, parse_override
from mentor.losses import Objective
from mentor.recipes import list_recipes


def test_shipped_recipes_parse_and_validate():
    names = [n for n, _ in list_recipes()]
    assert "digits" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name
        assert cfg.objective


def test_overrides_are_typed_and_nested():
    cfg = load_config("digits", ["train.lr=3e-4", "objective.kd.temperature=2", "train.seed=7"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.objective["kd"]["temperature"] == 2
    assert cfg.train.seed == 7


def test_override_can_remove_and_replace_objective_terms():
    cfg = load_config("digits", ["objective.kd=null"])
    assert list(cfg.objective) == ["ce"]
    cfg = load_config("digits", ["objective={ce: {weight: 1}}"])
    assert cfg.objective == {"ce": {"weight": 1}}


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["train.lr=abc"])
    assert "train.lr" in str(e.value) and "'abc'" in str(e.value)


def test_unknown_top_level_key_suggests():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["trian.lr=0.1"])
    assert "Did you mean 'train'?" in str(e.value)


def test_unknown_nested_key_suggests_and_lists():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["train.max_step=5"])
    msg = str(e.value)
    assert "train.max_step" in msg and "Did you mean 'max_steps'" in msg
    assert "batch_size" in msg  # lists the valid keys


def test_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["train.optimizer=adam"])
    assert "'adamw' or 'sgd'" in str(e.value)


def test_unknown_loss_and_hyperparameter_fail_at_load():
    with pytest.raises(ConfigError, match="Did you mean 'kd'"):
        load_config("digits", ["objective.kdd.weight=1"])
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        load_config("digits", ["objective.kd.temprature=1"])


def test_schedule_names_checked_at_load():
    with pytest.raises(ConfigError, match="Did you mean 'weight'"):
        load_config("digits", ["train.schedules.kd.wieght={start: 0, end: 1, steps: 5}"])
    cfg = load_config("digits", ["train.schedules.kd.weight={start: 0, end: 1, steps: 5}"])
    assert cfg.train.schedules["kd"]["weight"].steps == 5


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"train": {"lr": 1}}, ["train.lr.x=2"])


def test_override_values_are_never_evaluated():
    path, value = parse_override("name=__import__('os').system('true')")
    assert path == ["name"] and isinstance(value, str)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown recipe 'digitz'.*Did you mean 'digits'"):
        load_config("digitz")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("digits", ["train.lr=0.01"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert yaml.safe_load(p.read_text())["train"]["lr"] == 0.01


def test_source_constraints():
    with pytest.raises(ConfigError, match="teacher.cache"):
        load_config("digits", ["teacher.source=cache"])
    with pytest.raises(ConfigError, match="at least two"):
        load_config("digits", ["teacher.source=ensemble"])


def test_negative_objective_weight_is_refused_naming_the_term():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["objective.kd.weight=-0.5"])
    msg = str(e.value)
    assert "objective.kd.weight: -0.5 is negative" in msg and ">= 0" in msg
    with pytest.raises(ValueError, match=r"objective.ce.weight: -1 is negative"):
        Objective({"kd": {"weight": 1.0}, "ce": {"weight": -1}})
    with pytest.raises(ValueError, match=r"objective.kd.weight: 'abc' is not a number"):
        Objective({"kd": {"weight": "abc"}})
    with pytest.raises(ValueError, match=r"objective.kd.weight: inf is not a finite number"):
        Objective({"kd": {"weight": float("inf")}})
    with pytest.raises(ConfigError, match=r"objective.kd.weight: None is not a number"):
        load_config("digits", ["objective.kd.weight=null"])


def test_all_zero_objective_weights_are_refused_naming_the_terms():
    with pytest.raises(ConfigError) as e:
        load_config("digits", ["objective.kd.weight=0", "objective.ce.weight=0"])
    msg = str(e.value)
    assert "every term has weight 0" in msg
    assert "objective.kd.weight=0" in msg and "objective.ce.weight=0" in msg
    with pytest.raises(ConfigError, match=r"every term has weight 0 \(objective.kd.weight=0\)"):
        load_config({"objective": {"kd": {"weight": 0}}})


def test_zero_weight_on_one_term_or_ramped_up_is_allowed():
    cfg = load_config("digits", ["objective.kd.weight=0"])
    assert cfg.objective["kd"]["weight"] == 0 and cfg.objective["ce"]["weight"] == 0.1
    assert Objective(cfg.objective).weights == {"kd": 0.0, "ce": 0.1}
    ramp = "train.schedules.kd.weight={start: 0, end: 1, steps: 5}"
    cfg = load_config({"objective": {"kd": {"weight": 0}}}, [ramp])
    assert cfg.train.schedules["kd"]["weight"].end == 1
    # ramped down to 0 from a positive start is fine too; a negative ramp is not
    load_config(
        {"objective": {"kd": {"weight": 0}}}, [ramp.replace("start: 0, end: 1", "start: 1, end: 0")]
    )
    with pytest.raises(
        ConfigError, match=r"train.schedules.kd.weight.start: weight -1.0 of term 'kd' is negative"
    ):
        load_config("digits", [ramp.replace("start: 0", "start: -1")])
    with pytest.raises(ConfigError, match="every term has weight 0"):
        load_config({"objective": {"kd": {"weight": 0}}}, [ramp.replace("end: 1", "end: 0")])


def test_every_yaml_snippet_in_docs_config_is_a_valid_recipe():
    """The ```yaml examples of docs/config.md load as recipes (keys and values validated)."""
    import re
    from pathlib import Path

    import yaml

    from mentor.config import load_config

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        spec = yaml.safe_load(block)
        assert isinstance(spec, dict), block
        cfg = load_config(spec)  # raises naming the bad key
        for section in spec:
            assert getattr(cfg, section) is not None


def test_teacher_precision_auto_resolves_by_hardware(monkeypatch):
    """auto = bf16 where the hardware has native bf16, else fp32 — resolved at load."""
    import mentor.config as C

    monkeypatch.setattr(C, "native_bf16", lambda: True)
    assert C.load_config("digits", ["teacher.precision=auto"]).teacher.precision == "bf16"
    monkeypatch.setattr(C, "native_bf16", lambda: False)
    cfg = C.load_config("digits", ["teacher.precision=auto"])
    assert cfg.teacher.precision == "fp32"
    assert "precision: fp32" in C.dump_config(cfg)  # config.yaml records what ran
    with pytest.raises(C.ConfigError, match="precision"):
        C.load_config("digits", ["teacher.precision=fp8"])
