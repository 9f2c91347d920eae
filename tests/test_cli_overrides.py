"""One override parser: the train and eval command lines read `--config.FIELD=VALUE` alike."""

import os

import pytest

from bioclip_jax.cli import eval as eval_cli
from bioclip_jax.cli.common import load_train_config
from bioclip_jax.config_fields import override, read_config_file

REPO = os.path.join(os.path.dirname(__file__), "..")
TRAIN_CONFIG = os.path.join(REPO, "configs", "synthetic_tiny.py")


def train(*items):
    return load_train_config(TRAIN_CONFIG, list(items))


def evaluate(*items):
    return eval_cli.build_config(list(items))


@pytest.mark.parametrize("command, field", [(train, "init"), (evaluate, "name")])
def test_a_text_field_keeps_what_was_typed(command, field):
    """eval read 2024 as a number and refused it for a text field; train kept the text."""
    assert command(f"--config.{field}=2024")[field] == "2024"


@pytest.mark.parametrize("command, typo, field", [(train, "totl_steps", "total_steps"),
                                                  (evaluate, "tempates", "templates")])
def test_an_unknown_field_is_one_sentence_with_the_closest_name(command, typo, field):
    with pytest.raises(ValueError) as error:
        command(f"--config.{typo}=1")
    assert str(error.value) == f"--config.{typo}: unknown config field {typo!r}; did you mean {field!r}?"


@pytest.mark.parametrize("command, field, text, value", [
    (train, "data.crop_scale", "[0.5, 1.0]", (0.5, 1.0)), (evaluate, "shots", "[1, 10]", (1, 10)),
    (evaluate, "shots", "5", (5,))])
def test_a_tuple_field_takes_a_list_or_one_number(command, field, text, value):
    node = command(f"--config.{field}={text}")
    for part in field.split("."):
        node = node[part]
    assert node == value


@pytest.mark.parametrize("command, field", [(train, "total_steps"), (evaluate, "trials")])
def test_a_value_of_the_wrong_type_is_one_sentence(command, field):
    with pytest.raises(ValueError, match=rf"^--config\.{field}: config field '{field}' cannot be set to 'many' \("):
        command(f"--config.{field}=many")


def test_an_eval_config_file_and_a_size_table_go_through_the_same_checks(tmp_path):
    (tmp_path / "suite.py").write_text("import ml_collections\n\ndef get_config():\n"
                                       "    return ml_collections.ConfigDict({'shots': 3, 'tempates': 'single'})\n")
    with pytest.raises(ValueError, match=r"suite.py: unknown config field 'tempates'; did you mean 'templates'\?"):
        eval_cli.load_config_file(str(tmp_path / "suite.py"))
    _, config = read_config_file(TRAIN_CONFIG, "synthetic_tiny")
    expected = r"^size: unknown config field 'data.bach_size'; did you mean 'data.batch_size'"
    with pytest.raises(ValueError, match=expected):
        override(config, {"data.bach_size": 8}, where="size")
