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

    monkeypatch.setattr(bench, "run", run)
    monkeypatch.setattr(bench, "load", lambda path, profile=None: types.SimpleNamespace(name="x", profile=profile))
    out = tmp_path / "a b"
    assert cli.main(["bench", "my experiment.toml", "--out", str(out), "--quiet"]) == 0
    assert seen["command"] == f"tinyrobust bench 'my experiment.toml' --out '{out}' --quiet"
