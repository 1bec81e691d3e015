"""One strict loader for the daemon's config and training's: an unknown key or a wrong type is
an error naming the file, the table and the key, in both."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import load_config as load_kit_config
from edge.configfile import ConfigError
from training.config import load_config as load_training_config

ROOT = Path(__file__).resolve().parent.parent
SKIN = ROOT / "training/configs/skin-lesion.toml"


@pytest.mark.parametrize("key, value, needle", [
    ("train.seed", "seven", "[train].seed: expected int, got 'seven'"),
    ("train.seed", 7.5, "[train].seed: expected int, got 7.5"),
    ("train.rotate", 1, "[train].rotate: expected bool, got 1"),
    ("export.tta", "flip_lr", "[export].tta: expected list[str], got 'flip_lr'"),
    ("export.tta", ["flip_lr", 2], "[export].tta: expected list[str]"),
    ("train.sede", 7, "[train]: unknown option(s) sede"),
    ("decision.target_sensitivity", "high", "[decision].target_sensitivity: expected float"),
])
def test_training_configs_are_read_strictly(key, value, needle):
    """As `python -m training train --set KEY=VALUE` gives them (JSON values)."""
    with pytest.raises(ConfigError) as err:
        load_training_config(SKIN, {key: value})
    assert str(SKIN) in err.value.message and needle in err.value.message


def test_an_int_where_a_float_is_wanted_is_that_float():
    cfg = load_training_config(SKIN, {"decision.target_sensitivity": 1})
    assert cfg.decision.target_sensitivity == 1.0
    assert isinstance(cfg.decision.target_sensitivity, float)


def test_the_daemon_config_names_the_file_and_key_too(tmp_path):
    path = tmp_path / "kit.toml"
    path.write_text('[web]\nport = "8080"\n')
    with pytest.raises(ConfigError) as err:
        load_kit_config(path)
    assert f"{path} [web].port: expected int, got '8080'" in err.value.message
    path.write_text('[source]\nkind = "picamera2"\ncolour_gains = "red"\n')
    with pytest.raises(ConfigError, match=r"kit.toml \[source\]\.colour_gains: expected list"):
        load_kit_config(path)


def test_a_missing_required_table_key_is_named(tmp_path):
    blood = ROOT / "training/configs/blood-smear.toml"
    path = tmp_path / "blood.toml"
    text = blood.read_text()
    assert "\ngroup = " in text
    path.write_text("\n".join(line for line in text.splitlines()
                              if not line.startswith("group = ")))
    with pytest.raises(ConfigError, match=r"\[decision\]: missing group"):
        load_training_config(path)
