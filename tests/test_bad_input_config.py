"""Config input that looks valid but is wrong, through ``medseg-diff train --config`` as a user runs it.

Each is refused when the config loads (before the data check and any training work): exit status 2, one line on
stderr naming the config file (or the ``--set`` override), the key path and the problem, no traceback. Duplicate
YAML keys, alias bombs, wrong types and tracking URIs MLflow cannot use; and the forms that look alike but are
fine still load.
"""

import time
from pathlib import Path

import pytest
import yaml

from factories import tiny_config, write_case
from medseg_diff.cli import main
from medseg_diff.config import load_config
from medseg_diff.data.manifest import build_manifest, write_manifest
from medseg_diff.errors import ConfigError
from medseg_diff.tracking import uris


def run(capsys, *args) -> tuple[int, str]:
    """``medseg-diff ARGS``: its exit status and its one stderr line (asserted: no traceback, nothing else)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("medseg-diff train: error: "), captured.err
    return rc, lines[0]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four 16³ cases: a config that loads would go on to check and train on them."""
    import medseg_diff.stages.train  # noqa: F401  (torch, MONAI: imported here, not inside a timed call)

    root = tmp_path_factory.mktemp("bad_config") / "data"
    for i in range(4):
        write_case(root, f"C{i}", seed=i)
    return write_manifest(build_manifest(root, folds=2, test_fraction=0.25, seed=0), root / "manifest.json")


@pytest.fixture
def config(manifest, tmp_path, monkeypatch) -> Path:
    """A valid config (tiny U-Net, tracking off) in ``tmp_path/c.yaml``, run from ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = tiny_config(manifest, tmp_path / "run", "unet", train={"epochs": 1, "steps_per_epoch": 1},
                      data={"max_val_cases": 0})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    return path


def refused(capsys, tmp_path, *args) -> str:
    """``train ARGS`` ends with status 2 before any work (no run folder); its one line."""
    rc, line = run(capsys, "train", *args)
    assert rc == 2, line
    assert not (tmp_path / "run").exists()
    return line


# --- duplicate keys ----------------------------------------------------------------------------------------------


def test_a_section_given_twice_is_named_with_both_lines(config, tmp_path, capsys):
    text = config.read_text(encoding="utf-8")
    lines = text.count("\n")
    config.write_text(text + "experiment:\n  seed: 3\n", encoding="utf-8")  # `experiment:` is also near the top
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line == "experiment:")
    line = refused(capsys, tmp_path, "--config", config)
    assert f"{config}: config key 'experiment': appears twice (lines {first} and {lines + 1})" in line


def test_a_nested_key_given_twice_is_named_by_its_path(config, tmp_path, capsys):
    config.write_text("train:\n  lr: 0.001\n  epochs: 2\n  lr: 0.1\n", encoding="utf-8")
    line = refused(capsys, tmp_path, "--config", config)
    assert f"{config}: config key 'train.lr': appears twice (lines 2 and 4)" in line


def test_a_key_given_twice_in_an_extended_file_names_that_file(config, tmp_path, capsys):
    (tmp_path / "parent.yaml").write_text("model:\n  kind: unet\n  kind: diffusion\n", encoding="utf-8")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\n", encoding="utf-8")
    line = refused(capsys, tmp_path, "--config", child)
    assert f"{tmp_path / 'parent.yaml'}: config key 'model.kind': appears twice (lines 2 and 3)" in line


def test_a_key_given_twice_in_a_set_value_is_named(config, tmp_path, capsys):
    line = refused(capsys, tmp_path, "--config", config, "--set", "model.unet={channels: [8, 16], channels: [4, 8]}")
    assert "--set model.unet={channels: [8, 16], channels: [4, 8]}: config key 'model.unet.channels': appears " \
           "twice in the value" in line


# --- YAML aliases ------------------------------------------------------------------------------------------------

LAUGHS = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"&{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]  # 9^9 values once expanded


@pytest.mark.parametrize("where, key", [
    ("tracking:\n  run_name: [{laughs}]\n", "tracking.run_name[5]"),  # a known key: a string expected
    ("experiment:\n  name: x\n" + "".join(f"{k}: {{l{i}}}\n" for i, k in enumerate("abcdefghi")), "f"),  # unknown keys
])
def test_an_alias_bomb_is_refused_at_once(config, tmp_path, capsys, where, key):
    text = where.format(laughs=", ".join(LAUGHS), **{f"l{i}": laugh for i, laugh in enumerate(LAUGHS)})
    config.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    line = refused(capsys, tmp_path, "--config", config)
    assert time.perf_counter() - start < 2.0
    assert f"{config}: config key '{key}': expands to more than 100000 values once its YAML aliases are " \
           "expanded (an alias bomb?)" in line


def test_an_alias_bomb_in_a_set_value_is_refused(config, tmp_path, capsys):
    start = time.perf_counter()
    line = refused(capsys, tmp_path, "--config", config, "--set", f"tracking.run_name=[{', '.join(LAUGHS)}]")
    assert time.perf_counter() - start < 2.0
    assert "config key 'tracking.run_name[5]': expands to more than 100000 values" in line and "--set " in line


@pytest.mark.parametrize("text, key, problem", [
    ("train:\n  lr: &x 0.1\n" + "".join(f"  k{i}: *x\n" for i in range(101)), "train.k100",
     "uses more than 100 YAML aliases (*x)"),
    ("data:\n  roi_size: &r [*r, 16, 16]\n", "data.roi_size[0]", "alias *r refers to a value that contains it"),
    ("train:\n  lr: " + "[" * 60 + "]" * 60 + "\n", "train.lr[0][0][0][0][0][0][0][0][0][0]...",
     "nested more than 50 levels deep"),
])
def test_other_yaml_structures_no_config_needs_are_refused(config, tmp_path, capsys, text, key, problem):
    config.write_text(text, encoding="utf-8")
    line = refused(capsys, tmp_path, "--config", config)
    assert f"{config}: config key '{key}': {problem}" in line


# --- wrong types -------------------------------------------------------------------------------------------------

WRONG_TYPES = [  # (--set override, key path, problem): across the sections
    ("experiment.seed=1e3", "experiment.seed", "must be an integer, got '1e3' (text to YAML: write 1000)"),
    ("experiment.output_dir=[a]", "experiment.output_dir", "must be a string, got ['a']"),
    ("experiment=[a]", "experiment", "must be a mapping, got list"),
    ("data.roi_size=96", "data.roi_size", "must be a list, got int 96"),
    ("data.roi_size=[16, 16, true]", "data.roi_size[2]", "must be an integer, got True"),
    ("data.spacing=[1, 1, a]", "data.spacing[2]", "must be a number, got 'a'"),
    ("data.cache={a: 1}", "data.cache", "must be one of 'memory', 'disk', 'none', got {'a': 1}"),
    ("data.max_val_cases=none", "data.max_val_cases", "must be an integer, got 'none'"),
    ("model=unet", "model", "must be a mapping, got str"),
    ("model.unet.channels=[16, '32']", "model.unet.channels[1]",
     "must be an integer, got '32' (text: write the number without quotes)"),
    ("model.denoiser.heads=4.5", "model.denoiser.heads", "must be an integer, got 4.5"),
    ("train.lr=2e-4", "train.lr", "must be a number, got '2e-4' (text to YAML: write 2.0e-4 for a number)"),
    ("train.lr=.inf", "train.lr", "must be a finite number, got inf"),
    ("train.epochs=true", "train.epochs", "must be an integer, got True"),
    ("train.amp=1", "train.amp", "must be true or false, got 1"),
    ("train.device=0", "train.device", "must be a string, got 0"),
    ("infer.overlap=[0.5]", "infer.overlap", "must be a number, got [0.5]"),
    ("infer.threshold='0.5'", "infer.threshold", "must be a number, got '0.5' (text: write the number without quotes)"),
    ("tracking.uri={a: b}", "tracking.uri", "must be a string, got {'a': 'b'}"),
    ("tracking.run_name=2024-05-01", "tracking.run_name", "must be a string, got datetime.date(2024, 5, 1)"),
    ("tracking.register_model=null", "tracking.register_model", "must be a string, got None"),
    ("train.epochs=[" + ", ".join(map(str, range(500))) + "]", "train.epochs",
     "must be an integer, got [0, 1, 2, 3, 4, 5, ...]"),  # a long value, cut in the message
]


@pytest.mark.parametrize("override, key, problem", WRONG_TYPES, ids=[o[:30] for o, _, _ in WRONG_TYPES])
def test_a_wrong_type_is_named_by_its_key_path(config, tmp_path, capsys, override, key, problem):
    line = refused(capsys, tmp_path, "--config", config, "--set", override)
    assert f": config key '{key}': {problem}" in line and "--set " in line
    assert len(line) < 400


@pytest.mark.parametrize("text, key, problem", [
    ("train:\n  1: a\n  abc: b\n", "train.1", "unknown key"),  # keys of mixed types
    ("train:\n  lr: [0.1\n", "-", "not valid YAML (expected ',' or ']', but got '<stream end>' at line 3, column 1)"),
    ("extends: nowhere.yaml\n", "extends", "nowhere.yaml not found"),
    ("just text\n", "-", "top level must be a mapping, got str"),
])
def test_a_wrong_config_file_is_named(config, tmp_path, capsys, text, key, problem):
    config.write_text(text, encoding="utf-8")
    line = refused(capsys, tmp_path, "--config", config)
    assert f"{config}: config key '{key}': " in line and problem in line


def test_a_config_that_is_not_utf8_is_named(config, tmp_path, capsys):
    config.write_bytes("experiment:\n  name: caf\xe9\n".encode("latin-1"))
    line = refused(capsys, tmp_path, "--config", config)
    assert f"{config}: config key '-': not UTF-8 text (byte 23)" in line


# --- tracking.uri ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, problem", [
    ("bogus://x", "scheme 'bogus' is not one MLflow tracks to"),
    ("mlflow.db", "a plain path or file: URI names a folder (the store FOLDER/mlflow.db); for the database file "
                  "mlflow.db write sqlite:///mlflow.db"),
    ("http://localhost:50x0", "the port must be a number in 0..65535"),
    ("file://otherhost/runs", "a file: URI names a folder on this machine"),
    ("sqlite:///", "names no database file"),
    ("taken", "'taken' is a file; a plain path or file: URI names a folder for the store FOLDER/mlflow.db"),
    ("mlruns", "'mlruns' holds an MLflow file store, which MLflow 3 no longer opens; migrate it into this folder with: "
               "mlflow migrate-filestore --source mlruns --target sqlite:///mlruns/mlflow.db"),
])
def test_a_tracking_uri_mlflow_cannot_use_is_refused_at_load(config, tmp_path, capsys, uri, problem):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "mlruns" / "0").mkdir(parents=True)  # MLflow 2's file store
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    line = refused(capsys, tmp_path, "--config", config, "--set", "tracking.enabled=true",
                   "--set", f"tracking.uri={uri}")
    assert f"--set tracking.uri={uri}: config key 'tracking.uri': {problem}" in line


def test_a_bad_mlflow_tracking_uri_is_refused_at_load_naming_the_config(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
    line = refused(capsys, tmp_path, "--config", config, "--set", "tracking.enabled=true")
    assert (f"{config}: config key 'tracking.uri': is null, so $MLFLOW_TRACKING_URI='localhost:5000' is used, and it: "
            "scheme 'localhost' is not one MLflow tracks to") in line
    with pytest.raises(ConfigError, match="scheme 'localhost'") as info:  # --tracking-uri / the variable, elsewhere
        uris.resolve_uri(None)
    assert info.value.key == "tracking.uri" and info.value.source == "$MLFLOW_TRACKING_URI"
    with pytest.raises(ConfigError, match="scheme 'bogus'") as info:
        uris.resolve_uri("bogus://x", "--tracking-uri")
    assert str(info.value).startswith("--tracking-uri: config key 'tracking.uri': ")


@pytest.mark.parametrize("uri, store", [
    (None, "sqlite:///mlflow.db"),
    ("sqlite:///runs/x.db", "sqlite:///runs/x.db"),
    ("store", "sqlite:///store/mlflow.db"),
    ("./store/", "sqlite:///store/mlflow.db"),
    ("file:store", "sqlite:///store/mlflow.db"),
    ("file:///abs/store", "sqlite:////abs/store/mlflow.db"),
    ("/abs/store", "sqlite:////abs/store/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("databricks", "databricks"),
    ("databricks://profile", "databricks://profile"),
    ("postgresql+psycopg2://u@host/db", "postgresql+psycopg2://u@host/db"),
])
def test_every_documented_tracking_uri_form_loads_and_resolves(config, uri, store):
    cfg = load_config(config, ["tracking.enabled=true", f"tracking.uri={'null' if uri is None else uri}"])
    assert cfg.tracking.uri == uri and uris.resolve_uri(cfg.tracking.uri) == store


def test_a_migrated_file_store_folder_and_mlflows_own_switch_are_accepted(config, tmp_path, monkeypatch):
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "mlruns" / "0" / "meta.yaml").write_text("name: Default\n")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow opens its file store as before
    cfg = load_config(config, ["tracking.enabled=true", "tracking.uri=mlruns"])
    assert uris.resolve_uri(cfg.tracking.uri) == "mlruns"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    (tmp_path / "mlruns" / "mlflow.db").write_bytes(b"")  # mlflow migrate-filestore --target sqlite:///mlruns/mlflow.db
    cfg = load_config(config, ["tracking.enabled=true", "tracking.uri=mlruns"])
    assert uris.resolve_uri(cfg.tracking.uri) == "sqlite:///mlruns/mlflow.db"


URIS = ["", " ", "sqlite:///x.db", "sqlite://x.db", "sqlite:///", "sqlite:///:memory:", "file:///a/b", "file:a",
        "file://localhost/a", "file://h/a", "folder", "/abs/folder", "~/runs", "x.db", "file:x.sqlite", "C:\\runs",
        "http://h", "http://", "https://h:99999", "http://h:x", "databricks", "databricks-uc", "uc", "databricks://p",
        "uc:catalog", "postgresql://u@h/db", "mysql+pymysql://h/db", "mssql://h/db", "bogus://x", "localhost:5000",
        "s3://bucket/x", "http://[::1"]


ACCEPTED = {"sqlite:///x.db", "sqlite:///:memory:", "file:///a/b", "file:a", "file://localhost/a", "folder",
            "/abs/folder", "~/runs", "x.db", "file:x.sqlite", "C:\\runs", "http://h", "databricks", "databricks-uc",
            "uc", "databricks://p", "uc:catalog", "postgresql://u@h/db", "mysql+pymysql://h/db", "mssql://h/db"}


def test_the_uri_rules_take_every_documented_form_and_refuse_the_rest(tmp_path, monkeypatch):
    """One set of rules (``store_uris``) for the config check at load and for the tracker that opens the store: the
    form (``uri_problem``), then what is on disk for a folder (``folder_problem``)."""
    for uri in URIS:
        assert (uris.uri_problem(uri) is None) == (uri in ACCEPTED), uri
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    (tmp_path / "old" / ".trash").mkdir(parents=True)
    refused = [u for u in ["f", "f/sub", "old", "file:old", "new", "sqlite:///f", "x.db", "file:x.sqlite", "databricks"]
               if uris.folder_problem(u)]
    assert refused == ["f", "f/sub", "old", "file:old", "x.db", "file:x.sqlite"]


def test_a_folder_tracking_uri_trains_into_the_store_inside_it(config, tmp_path, capsys):
    """What ended in ``internal error: MlflowException ... filesystem backend in maintenance mode``: a folder is now
    the embedded store FOLDER/mlflow.db, the run's artifacts in FOLDER/mlartifacts."""
    store = tmp_path / "store"
    rc = main(["train", "--config", str(config), "--set", "tracking.enabled=true", "--set", f"tracking.uri={store}",
               "--set", "tracking.register_model=''", "--set", "tracking.log_checkpoints=false"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err, captured.err
    run_id = captured.out.split("MLflow run ")[1].split()[0]
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts" / run_id).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "run", "store"]  # no ./mlflow.db, no ./mlruns


# --- what looks alike and is fine ------------------------------------------------------------------------------------


def test_anchors_merge_keys_and_empty_sections_still_load(config, tmp_path):
    (tmp_path / "parent.yaml").write_text(config.read_text(encoding="utf-8"), encoding="utf-8")
    config.write_text("extends: parent.yaml\n"
                      "data:\n  roi_size: &roi [32, 32, 32]\n"
                      "infer:\n  roi_size: *roi\n"
                      "train:\n  # epochs: 5   (every key commented out: the section is left as it is)\n"
                      "model:\n  unet: {<<: {channels: [8, 16], strides: [2]}, strides: [4]}\n", encoding="utf-8")
    cfg = load_config(config, ["train.lr=1.0e-3", "data.spacing=[1.0, 1.0, 2.0]"])
    assert cfg.data.roi_size == cfg.infer.roi_size == (32, 32, 32)
    assert cfg.train.epochs == 1 and cfg.train.steps_per_epoch == 1  # the parent's, not the defaults
    assert cfg.model.unet.channels == (8, 16) and cfg.model.unet.strides == (4,)
    assert cfg.train.lr == 1e-3 and cfg.data.spacing == (1.0, 1.0, 2.0)
    assert not (tmp_path / "run").exists()


def test_the_loader_is_a_plain_yaml_loader_for_other_readers():
    """``yaml.load(text, Loader=ConfigLoader)``: what a reader of another YAML file (a series rule) can use."""
    from medseg_diff.safe_yaml import ConfigLoader

    assert yaml.load("t1: ['^T1$']\nflair: x\n", Loader=ConfigLoader) == {"t1": ["^T1$"], "flair": "x"}
    with pytest.raises(yaml.YAMLError, match="key 't1': appears twice \\(lines 1 and 2\\)"):
        yaml.load("t1: a\nt1: b\n", Loader=ConfigLoader)


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_bad_tracking_uri_flag_is_refused_before_any_work(command, manifest, tmp_path, capsys, monkeypatch):
    """Before: evaluate found out only when its tracker started, after every prediction had been made."""
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not read: the flag is checked first")
    args = (["evaluate", "--manifest", manifest, "--model", f"m={checkpoint}"] if command == "evaluate" else
            ["predict", "--checkpoint", checkpoint, "--input", manifest])
    rc = main([str(a) for a in [*args, "--out", tmp_path / "out", "--tracking-uri", "bogus://x"]])
    err = capsys.readouterr().err
    assert rc == 2 and "--tracking-uri" in err and "scheme 'bogus'" in err and "Traceback" not in err
    assert "not read" not in err and not (tmp_path / "out").exists()
    if command == "evaluate":  # with tracking on and no flag, the environment's URI is checked the same way
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
        rc = main([str(a) for a in [*args, "--out", tmp_path / "out"]])
        err = capsys.readouterr().err
        assert rc == 2 and "$MLFLOW_TRACKING_URI" in err and "scheme 'localhost'" in err


@pytest.mark.parametrize("text, problem", [
    ("t1ce: ['^T1 POST']\nt1ce: ['^AX T1C']\n", "appears twice"),
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, "
                                                          f"*{p}, *{p}]\n" for p, c in zip("abcdef", "bcdefg")),
     "YAML aliases"),
])
def test_a_series_rule_is_read_as_safely_as_a_config(text, problem, tmp_path, capsys):
    rule = tmp_path / "rule.yaml"
    rule.write_text(text, encoding="utf-8")
    start = time.perf_counter()
    rc = main(["predict", "--checkpoint", str(tmp_path / "c.pt"), "--input", str(tmp_path), "--out",
               str(tmp_path / "out"), "--series-rule", str(rule)])
    err = capsys.readouterr().err
    assert rc == 2 and str(rule) in err and problem in err and time.perf_counter() - start < 2
