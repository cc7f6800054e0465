"""Config loading and every validation error: one line naming the key, exit 2, nothing written."""

import pytest
from conftest import run_cli

from jaxlm import cli
from jaxlm.config import ConfigError, load_config


def test_yaml_and_dotted_overrides_resolve_with_types():
    cfg = load_config("configs/tiny.yaml", ["model.n_layers=2", "optim.lr=3e-4", "train.run_dir=x", "data.path=null"])
    assert cfg.model.n_layers == 2 and cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.d_model == 128  # from the file
    assert cfg.train.run_dir == "x" and cfg.data.path is None


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layer=2"], "unknown config key 'model.n_layer' (did you mean 'model.n_layers'?)"),
    (["modle.d_model=2"], "unknown config key 'modle' (did you mean 'model'?)"),
    (["model.n_layers=two"], "model.n_layers='two' has the wrong type; expected an integer"),
    (["model.norm=layer"], "model.norm='layer' is not allowed; expected one of pre|post|none"),
    (["model.d_model=100", "model.n_heads=3"], "model.d_model=100 must be divisible by model.n_heads=3"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_heads=4 must be divisible by model.n_kv_heads=3"),
    (["data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001 must be > 0"),
    (["train.global_batch=10", "train.microbatches=4"], "train.global_batch=10 must be divisible by train.microbatches=4"),
])
def test_config_errors_name_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layer=2"], "did you mean 'model.n_layers'?"),
    (["mesh.data=3"], "mesh.data=3 x mesh.fsdp=1 x mesh.expert=1 x mesh.tensor=1 = 3, but there are 8 devices"),
    (["train.global_batch=12"], "train.global_batch=12 (per microbatch 12) must be divisible by the data-parallel size 8"),
    (["data.path=/no/such/dir"], "data.path='/no/such/dir' does not exist"),
    (["data.seq_len=1024"], "exceeds model.max_seq_len"),
])
def test_cli_config_errors_exit_2_with_one_line_and_write_nothing(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli("train", "configs/tiny.yaml", *overrides, f"train.run_dir={run_dir}",
                     env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxlm train: error:") and message in lines[0], result.stderr
    assert not run_dir.exists()


def test_cli_missing_config_file_and_print_config():
    missing = run_cli("train", "configs/nope.yaml")
    assert missing.returncode == 2 and "config file 'configs/nope.yaml' does not exist" in missing.stderr
    shown = run_cli("train", "configs/tiny.yaml", "model.n_layers=3", "--print-config")
    assert shown.returncode == 0 and "n_layers: 3" in shown.stdout and "run_dir: runs/tiny" in shown.stdout


def test_missing_data_path_fails_train_but_not_verbs_that_never_read_data(tmp_path, capfd):
    """accounting (and compile) only look at the config; train reads the data and says it is missing."""
    config = tmp_path / "nodata.yaml"
    config.write_text("model: {n_layers: 2}\ndata: {path: /no/such/corpus.txt}\n")
    run_dir = tmp_path / "run"
    assert cli.main(["accounting", str(config)]) == 0
    out = capfd.readouterr()
    assert "parameters" in out.out.lower() and out.err == ""
    assert cli.main(["train", str(config), f"train.run_dir={run_dir}"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["jaxlm train: error: data.path='/no/such/corpus.txt' does not exist; expected a text file, "
                   "directory, glob or prepared data"]
    assert not run_dir.exists()
