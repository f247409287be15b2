import tinyrobust as tr
from tinyrobust import cli


def test_demo_runs_and_prints_accuracy_and_footprint(capsys):
    assert cli.main(["demo", "--limit", "256", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "Clean test accuracy:" in out and "total" in out and "conv_2" in out


def test_demo_bad_quantization_exits_2(capsys):
    assert cli.main(["demo", "--quantization", "int3"]) == 2
    assert "Received: quantization='int3'" in capsys.readouterr().err


def test_import_exposes_namespace():
    for name in ["quantizers", "layers", "data", "models", "summary"]:
        assert hasattr(tr, name)
