"""Bad values and malformed overrides are one-line errors; the CLI explains itself (help, config, version)."""

import dataclasses
import typing

import pytest
from conftest import REPO, run_cli

from jaxlm import __version__, cli
from jaxlm.config import Config, ConfigError, load_config
from jaxlm.config.cli import keys


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every=0 must be >= 1"),
    ("train.eval_every=-5", "train.eval_every=-5 must be >= 0 (0 = no evaluation)"),
    ("train.eval_batches=0", "train.eval_batches=0 must be >= 1"),
    ("checkpoint.every=-1", "checkpoint.every=-1 must be >= 0 (0 = no checkpoints)"),
    ("checkpoint.keep=0", "checkpoint.keep=0 must be >= 1"),
    ("checkpoint.keep_every=-2", "checkpoint.keep_every=-2 must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
    ("model.share_blocks=0", "model.share_blocks=0 must be >= 1 (1 = no sharing)"),
    ("optim.beta1=1", "optim.beta1=1.0 must be in [0, 1)"),
    ("optim.beta2=-0.1", "optim.beta2=-0.1 must be in [0, 1)"),
    ("model.norm_eps=-1", "model.norm_eps=-1.0 must be > 0"),
    ("model.norm_eps=0", "model.norm_eps=0.0 must be > 0"),
    ("optim.clip_norm=-1", "optim.clip_norm=-1.0 must be >= 0"),
    ("optim.lr=.nan", "optim.lr=nan must be a finite number"),  # not blamed on optim.min_lr
    ("optim.lr=.inf", "optim.lr=inf must be a finite number"),
    ("moe.n_experts=-2", "moe.n_experts=-2 must be >= 0 (0 = a dense model)"),  # not blamed on moe.top_k
    ("mesh.rules={embeds: fsdp}", "mesh.rules.embeds: no such logical axis; expected one of batch, length, embed"),
    ("train.run_dir=gs://bucket/run", "train.run_dir=gs://bucket/run is a URL; jaxlm writes run directories with "
                                      "plain file I/O, so mount the bucket"),
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


def test_unusable_paths_and_arguments_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    """Whatever the path or argument is, the error is one line naming it, exit 2 (1 for a failed
    write), no traceback and no argparse usage block; no output appears."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model: {}")
    cases = [
        (["train", str(tmp_path)], 2, f"config file '{tmp_path}' is a directory; expected a YAML file"),
        (["train", str(binary)], 2, f"config file '{binary}' is not UTF-8 text (byte 0)"),
        (["tokenizer", "convert", "bytes", "-o", str(a_file / "tok")], 2, f"{a_file / 'tok'}: Not a directory"),
        (["prepare", str(a_file), "--tokenizer", "bytes", "-o", str(a_file / "x")], 2, "Not a directory"),
        (["generate", "nowhere", "--step"], 2, "argument --step: expected one argument; see jaxlm generate --help"),
        (["checkpoint", "ls"], 2, "jaxlm checkpoint ls: error: the following arguments are required"),
        ([], 2, None),  # the help, as a usage error
    ]
    for argv, code, message in cases:
        try:
            got = cli.main(argv)
        except SystemExit as e:  # argparse's own exit
            got = e.code
        out, err = capsys.readouterr()
        assert got == code, (argv, err)
        if message is None:
            assert "usage: jaxlm" in out
            continue
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "binary.yaml"]


def test_bad_sampling_and_eval_arguments_are_refused():
    from argparse import Namespace

    from jaxlm.errors import UserError
    from jaxlm.inference.cli_eval import evaluate
    from jaxlm.inference.diffusion import generate_mdlm
    from jaxlm.inference.sampling import Sampling

    with pytest.raises(UserError, match="^--block-size 0 must be >= 1$"):  # the one flag that is wrong, alone
        generate_mdlm(None, None, None, "x", Namespace(steps=64, max_new_tokens=8, block_size=0))

    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(UserError, match="must be a finite number >= 0"):
            Sampling(temperature)
    with pytest.raises(UserError, match="--max-tokens -5 must be >= 0"):
        evaluate("nowhere", "nowhere", max_tokens=-5)


def test_a_failed_export_write_is_one_line_exit_1_and_keeps_the_old_output(tmp_path):
    """A full disk mid-write (an OSError, or safetensors' own error type for the same thing):
    RunFailed (one line, exit 1), no temporary left, and an existing output under --force kept."""
    import errno

    from jaxlm.errors import RunFailed
    from jaxlm.export.atomic import atomic_output

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("old")
    SafetensorError = type("SafetensorError", (Exception,), {"__module__": "safetensors._safetensors_rust"})
    for failure in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("Error while writing")):
        with pytest.raises(RunFailed, match=f"writing {out} failed: .*; {out} is left as it was") as err:
            with atomic_output(out, force=True, directory=True) as tmp:
                (tmp / "model.safetensors").write_text("half")
                raise failure
        assert err.value.exit_code == 1 and "\n" not in str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and (out / "config.json").read_text() == "old"
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: it propagates as it is
        with atomic_output(tmp_path / "other", force=False, directory=True):
            1 / 0


def test_tokenizer_output_is_not_replaced_unasked_and_bad_tokenizer_arguments_are_refused(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world hello\n")
    out = str(tmp_path / "tok")
    assert cli.main(["tokenizer", "convert", "bytes", "-o", out]) == 0
    before = (tmp_path / "tok" / "tokenizer.json").read_bytes()
    for argv in (["tokenizer", "convert", "bytes", "-o", out, "--name", "other"],
                 ["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", out]):
        assert cli.main(argv) == 2
        assert capsys.readouterr().err.strip() == f"jaxlm tokenizer: error: {out} already holds a tokenizer; pass " \
                                                  "--force to replace it"
        assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == before
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "5000", "-o", out, "--force"]) == 0
    # "hello", " world", " hello" and "\n": 10 merges make each pre-token one token, then none is left
    assert capsys.readouterr().out.strip().endswith("fewer than --vocab-size 5000: after 10 merges every pre-token "
                                                    "of the corpus is one token, so no pair is left to merge")
    assert cli.main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--special", "", "-o", out]) == 2
    assert "--special '' is empty" in capsys.readouterr().err
    assert cli.main(["prepare", str(corpus), "--tokenizer", "bytes", "-o", str(tmp_path / "p"), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "jaxlm prepare: error: --workers 0 must be >= 1"


def test_a_train_that_fails_before_writing_leaves_no_directory_and_existing_ones_keep_their_lock(tmp_path, capsys):
    fresh = tmp_path / "new" / "run"
    assert cli.main(["train", "configs/tiny.yaml", f"train.run_dir={fresh}", "--resume", str(tmp_path / "nope")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # neither the run directory nor the parent made for it
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli.main(["train", "configs/tiny.yaml", f"train.run_dir={existing}", "--resume", str(tmp_path / "nope")]) == 2
    assert [p.name for p in existing.iterdir()] == ["run.lock"]  # a directory the user made is theirs


def test_a_config_key_given_twice_and_an_unwritable_json_report_are_refused_before_any_work(tmp_path, capsys):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n")
    with pytest.raises(ConfigError, match="key 'd_model' appears twice in one mapping"):
        load_config(twice)
    assert cli.main(["compile", "configs/tiny.yaml", "--topology", "v5p:2x2x2", "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"jaxlm compile: error: --json {tmp_path} cannot be written: give a "
                                               "file path in an existing directory")


def test_time_to_loss_takes_overrides_after_target_as_the_readme_gives_them():
    import importlib.util

    spec = importlib.util.spec_from_file_location("time_to_loss", REPO / "bench" / "time_to_loss.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["configs/shakespeare-char-cpu.yaml", "--target", "1.88", "data.path=input.txt",
                             "train.steps=5"])
    assert (args.config, args.target, args.overrides) == ("configs/shakespeare-char-cpu.yaml", 1.88,
                                                          ["data.path=input.txt", "train.steps=5"])


def test_checkpoint_ls_of_a_directory_that_is_not_a_run_and_prepare_into_an_unrelated_one_are_refused(
        tmp_path, capsys):
    """Both exit 2 in one line and leave the directory as it was; a run with no checkpoint yet is listed."""
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    text = tmp_path / "text.txt"
    text.write_text("hello world")
    for argv, message in [(["checkpoint", "ls", str(other)], "is not a run directory"),
                          (["prepare", str(text), "--tokenizer", "bytes", "-o", str(other)],
                           "is a non-empty directory that `jaxlm prepare` did not make")]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in other.iterdir()) == ["cat.jpg"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}")
    assert cli.main(["checkpoint", "ls", str(run)]) == 0
    assert "no checkpoints" in capsys.readouterr().out
