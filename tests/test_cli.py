import types

import tinyrobust as tr
from tinyrobust import cli


def test_demo_runs_the_fashion_mnist_tiny_experiment_in_its_demo_profile(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "_bench", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["demo"]) == 0
    assert seen["experiment"].endswith("experiments/fashion_mnist_tiny.toml") and seen["profile"] == "demo"
    assert seen["argv"][:3] == ["bench", seen["experiment"], "--profile"]


def test_demo_unknown_profile_exits_2(capsys):
    assert cli.main(["demo", "--profile", "nope"]) == 2
    assert "Received: profile='nope'" in capsys.readouterr().err


def test_import_exposes_namespace():
    for name in ["quantizers", "layers", "data", "models", "summary"]:
        assert hasattr(tr, name)


def test_interrupt_ends_with_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_bench", interrupted)
    assert cli.main(["demo"]) == 130
    err = capsys.readouterr().err
    assert "interrupted. Run the same command again to resume." in err and "Traceback" not in err


def test_recorded_command_is_shell_quoted(monkeypatch, tmp_path):
    from tinyrobust import bench

    seen = {}

    def run(config, out, command, verbose, fresh):
        seen.update(command=command)
        out.mkdir(parents=True)
        (out / "report.md").write_text("report\n")
        return []

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "load", lambda path, profile=None: types.SimpleNamespace(name="x", profile=profile))
    out = tmp_path / "a b"
    assert cli.main(["bench", "my experiment.toml", "--out", str(out), "--quiet"]) == 0
    assert seen["command"] == f"tinyrobust bench 'my experiment.toml' --out '{out}' --quiet"


def _console_script(*args, env=None):
    """Runs the installed `tinyrobust` console script (its own process, as a user would)."""
    import os
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(sys.executable).with_name("tinyrobust")
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=300,
                          env={**environment, **(env or {})})


def test_help_prints_only_the_usage_and_does_not_load_tensorflow():
    out = _console_script("--help", env={"PYTHONVERBOSE": "1"})  # every import is listed on stderr
    assert out.returncode == 0 and out.stdout.startswith("usage: tinyrobust")
    assert "import 'tensorflow'" not in out.stderr and "import 'keras'" not in out.stderr


def test_a_command_starts_without_tensorflows_noise_unless_asked():
    quiet = _console_script("report", "/no/such/folder")
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == ["tinyrobust report: No result files (schema version 1) under "
                                                 "'/no/such/folder'"]
    asked = _console_script("report", "/no/such/folder", env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert asked.returncode == 2 and len(asked.stderr.strip().splitlines()) > 1  # TensorFlow's own lines


def test_export_refuses_a_bad_name_before_writing_anything(tmp_path, capsys):
    model = tr.models.small_cnn(width=4)
    path = tmp_path / "m.keras"
    model.save(path)
    out = tmp_path / "out"
    assert cli.main(["export", str(path), "--out", str(out), "--name", "my-model"]) == 2
    assert "Received: name='my-model'" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["export", str(path), "--out", str(out), "--name", "../escape"]) == 2
    assert not out.exists() and not (tmp_path / "escape.tflite").exists()
    for limit in ("0.5", "big"):
        assert cli.main(["export", str(path), "--out", str(out), "--compress", "--arena-limit", limit]) == 2
        assert "Received: arena_limit=" in capsys.readouterr().err
        assert not out.exists()


def test_export_ships_the_smallest_flash_with_arena_limit_none(tmp_path, capsys):
    path = tmp_path / "m.keras"
    tr.models.small_cnn(quantization="stq", width=4).save(path)
    out = tmp_path / "out"
    assert cli.main(["export", str(path), "--out", str(out), "--compress", "--arena-limit", "none",
                     "--calibration-size", "16", "--parity-size", "16"]) == 0
    report = tr.export.CompressionReport.load(out / "m.compression.json")
    assert report.arena_limit is None and report.groups == {} and report.compressed
    assert "TFLM_DECODE" in capsys.readouterr().out
