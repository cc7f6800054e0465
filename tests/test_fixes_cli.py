"""Bad values and malformed overrides are one-line errors; the CLI explains itself (help, config, version)."""

import dataclasses
import typing

import pytest
from conftest import run_cli

from jaxlm import __version__, cli
from jaxlm.config import Config, ConfigError, load_config
from jaxlm.config_cli import keys


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.eval_every=-5", "train.eval_every=-5 must be >= 0 (0 = no evaluation)"),
    ("train.eval_batches=0", "train.eval_batches=0 must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0 (0 = no checkpoints)"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("checkpoint.keep_every=-2", "checkpoint.keep_every=-2 must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("optim.beta1=1", "optim.beta1=1.0 must be in [0, 1)"),
    ("optim.beta2=-0.1", "optim.beta2=-0.1 must be in [0, 1)"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("optim.clip_norm=-1", "optim.clip_norm=-1.0 must be >= 0"),
])
def test_out_of_range_values_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("args", [
    ["mesh.rules={embed:", "null}"],  # what the shell makes of an unquoted mesh.rules={embed: null}
    ["model.n_layers=[1"],
    ["train.run_dir='x"],
])
def test_unparsable_override_is_one_line_error_exit_2(args, capsys):
    assert cli.main(["train", "configs/tiny.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxlm train: error: override") and "quote the whole" in err


def test_quoted_mesh_rules_override_parses():
    assert load_config("configs/tiny.yaml", ["mesh.rules={embed: null}"]).mesh.rules == {"embed": None}


def test_log_every_zero_exits_2_on_the_command_line_without_a_traceback(capsys):
    assert cli.main(["train", "configs/tiny.yaml", "train.log_every=0", "train.run_dir=/nonexistent/x"]) == 2
    assert capsys.readouterr().err == "jaxlm train: error: train.log_every=0 must be >= 1\n"


def test_every_config_key_is_listed_with_type_default_and_description(capsys):
    def leaves(cls, prefix=""):
        out = []
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            out += leaves(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [f"{prefix}{f.name}"]
        return out

    rows = keys()
    assert [r[0] for r in rows] == leaves(Config)
    assert all(r[1] and r[2] and r[3] for r in rows), [r for r in rows if not r[3]]
    assert cli.main(["config", "train.log"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].split()[:3] == ["train.log_every", "int", "10"] and "steps between" in out[0]
    assert dict((r[0], r[1]) for r in rows)["model.norm"] == "pre|post|none"
    assert dict((r[0], r[1]) for r in rows)["data.path"] == "str|null"


def test_version_and_help_texts(capsys):
    def output(*args):
        with pytest.raises(SystemExit) as done:
            cli.main(list(args))
        assert done.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    assert output("--version") == f"jaxlm {__version__}"
    assert "newest first" in output("checkpoint", "ls", "--help")
    assert "directory for the shards" in output("prepare", "--help")
    for command in ("info", "encode", "decode", "convert"):
        assert "a tiktoken encoding name" in output("tokenizer", command, "--help"), command
    assert "`jaxlm config` lists every key" in output("train", "--help")


def test_version_from_the_command_line():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"jaxlm {__version__}"


def test_train_without_a_config_says_what_to_give(capsys):
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxlm train: error: give a YAML config file first") and "overrides" not in err.split(":")[1]
    assert cli.main(["train", "model.n_layers=2"]) == 2
    assert "give a YAML config file first" in capsys.readouterr().err
