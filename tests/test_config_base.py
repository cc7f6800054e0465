"""`base: other.yaml`: a config inherits another (relative to itself, chained), overridden key by key;
cycles and missing bases are one-line errors; a YAML syntax error names the file, line and column."""

import pytest
from conftest import REPO, run_cli

from jaxlm.config import ConfigError, load_config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_merges_section_by_section_relative_to_each_file(tmp_path):
    write(tmp_path / "a" / "root.yaml", "model: {d_model: 64, n_layers: 3, n_heads: 4}\noptim: {lr: 0.01}\n"
                                        "train: {run_dir: runs/root, steps: 7}\n")
    write(tmp_path / "a" / "mid.yaml", "base: root.yaml\nmodel: {n_layers: 2}\ndata: {seq_len: 32}\n")
    leaf = write(tmp_path / "b" / "leaf.yaml", "base: ../a/mid.yaml\nmodel: {n_heads: 2}\noptim: {lr: 0.002}\n")
    cfg = load_config(leaf, ["model.n_kv_heads=1"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (64, 2, 2, 1)
    assert cfg.optim.lr == 0.002 and cfg.data.seq_len == 32 and cfg.train.steps == 7
    assert cfg.train.run_dir == "runs/leaf"  # a base's run_dir is not inherited: never train into its run


def test_base_of_a_repo_config_and_print_config_shows_the_resolved_result(tmp_path):
    child = write(tmp_path / "tiny-lion.yaml", f"base: {REPO / 'configs' / 'tiny.yaml'}\noptim: {{lr: 3.0e-4}}\n")
    shown = run_cli("train", str(child), "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert "d_model: 128" in shown.stdout and "lr: 0.0003" in shown.stdout and "warmup_steps: 30" in shown.stdout
    assert "run_dir: runs/tiny-lion" in shown.stdout and "base" not in shown.stdout


@pytest.mark.parametrize("files,message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "base 'a.yaml' makes a cycle ("),
    ({"a.yaml": "base: a.yaml\n"}, "base 'a.yaml' makes a cycle ("),
    ({"a.yaml": "base: nope.yaml\n"}, "base 'nope.yaml' ("),
    ({"a.yaml": "base: [b.yaml]\n"}, "base=['b.yaml'] must be the path of a YAML file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "model: {n_layers: 2\n"}, "b.yaml' is not valid YAML: line 2, column 1:"),
])
def test_bad_bases_are_one_line_errors(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("text,where", [
    ("model:\n  d_model: 64\n  n_layers: [1\n", "line 4, column 1: expected ',' or ']', but got '<stream end>' "
                                                "(while parsing a flow sequence at line 3, column 13)"),
    ("model:\n  d_model: 64\n   n_layers: 2\n", "line 3, column 12: mapping values are not allowed here"),
    ("model: {d_model: 64}\nmodel: {n_layers: 2}\n", "line 2, column 1: key 'model' appears twice in one mapping"),
])
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, where):
    path = write(tmp_path / "typo.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"config file {str(path)!r} is not valid YAML: {where}"
