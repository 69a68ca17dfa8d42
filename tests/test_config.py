"""Config reading: unknown keys, wrong types and ranges are named before anything runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from cpwb.core.config import from_dict, load_yaml_config, parse_override, require
from cpwb.core.errors import ConfigError


@dataclass
class Example:
    tau: float = 0.5
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)
    adapter: str | None = None

    def __post_init__(self):
        require(self.tau > 0, "tau", "must be > 0")


def test_values_are_typed_and_ints_widen_to_floats():
    config = from_dict(Example, {"tau": 1, "names": ["x"], "adapter": None})
    assert config.tau == 1.0 and isinstance(config.tau, float) and config.names == ["x"]


@pytest.mark.parametrize("data, field_name, text", [
    ({"taux": 1.0}, "taux", "unknown setting"),
    ({"steps": "10"}, "steps", "expected int"),
    ({"steps": True}, "steps", "expected int"),
    ({"mode": "c"}, "mode", "must be one of"),
    ({"names": ["ok", 3]}, "names[1]", "expected str"),
    ({"tau": -1.0}, "tau", "must be > 0"),
])
def test_bad_values_name_the_field_and_file(data, field_name, text, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("\n".join(f"{k}: {v!r}" if not isinstance(v, (list, bool)) else f"{k}: {v}".replace("True", "true")
                              for k, v in data.items()))
    with pytest.raises(ConfigError) as err:
        load_yaml_config(Example, path)
    assert err.value.field == field_name and text in str(err.value) and str(path) in str(err.value)


def test_missing_file_and_bad_yaml_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml_config(Example, tmp_path / "absent.yaml")
    (tmp_path / "broken.yaml").write_text("tau: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_config(Example, tmp_path / "broken.yaml")


def test_exponent_floats_without_a_dot_are_read_as_floats():
    assert from_dict(Example, {"tau": "1e-4"}).tau == 1e-4
    with pytest.raises(ConfigError, match="expected float"):
        from_dict(Example, {"tau": "fast"})


def test_overrides_parse_as_yaml():
    assert parse_override("tau=0.25") == ("tau", 0.25)
    assert parse_override("names=[a, b]") == ("names", ["a", "b"])
    with pytest.raises(ConfigError):
        parse_override("novalue")
