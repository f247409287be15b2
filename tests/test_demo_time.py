"""`benchmarks/demo_time.py`: its table comparison and argument checks (the timing itself runs `make demo`)."""

import pytest
from benchmark_scripts import load_benchmark

REPORT = """### fashion_mnist_tiny (fashion_mnist, linf, 200 test examples, profile demo, seed 0)

| model | quant. | clean | worst 0.1 |
| --- | --- | --- | --- |
| float | float | 86.5 | 0.0 |
| stq_jr | stq | 74.0 | 17.5 |

| other table | x |
| --- | --- |
"""


@pytest.fixture(scope="module")
def demo_time():
    return load_benchmark("demo_time")


def test_report_table_reads_only_the_first_table(demo_time):
    table = demo_time.report_table(REPORT)
    assert table[0] == ["model", "quant.", "clean", "worst 0.1"]
    assert table[2:] == [["float", "float", "86.5", "0.0"], ["stq_jr", "stq", "74.0", "17.5"]]


def test_table_differences_name_each_changed_cell(demo_time):
    committed = demo_time.report_table(REPORT)
    assert demo_time.table_differences(committed, committed) == []
    measured = demo_time.report_table(REPORT.replace("74.0 | 17.5", "74.1 | 17.5"))
    assert demo_time.table_differences(measured, committed) == [
        {"model": "stq_jr", "column": "clean", "measured": "74.1", "committed": "74.0"}]
    other_columns = demo_time.report_table(REPORT.replace("worst 0.1", "worst 0.05"))
    assert demo_time.table_differences(other_columns, committed)[0]["column"] == "<header>"
    fewer_rows = demo_time.report_table(REPORT.replace("| float | float | 86.5 | 0.0 |\n", ""))
    assert demo_time.table_differences(fewer_rows, committed)[0]["column"] == "<header>"
    assert demo_time.table_differences([], committed)[0]["column"] == "<header>"
    renamed = demo_time.report_table(REPORT.replace("| stq_jr |", "| stq_ard |"))
    assert demo_time.table_differences(renamed, committed) == [
        {"model": "stq_ard", "column": "<model>", "measured": "stq_ard", "committed": "stq_jr"}]


def test_bad_arguments_name_the_argument_and_value(demo_time, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        demo_time.main(["--budget-s", "-1"])
    assert error.value.code == 2 and "Received: --budget-s=-1.0" in capsys.readouterr().err
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit):
        demo_time.main(["--workdir", str(tmp_path)])
    assert f"Received: --workdir={tmp_path}" in capsys.readouterr().err


def test_minutes_round_to_whole_seconds(demo_time):
    assert demo_time._minutes(526.4) == "8 min 46 s"
    assert demo_time._minutes(599.6) == "10 min 00 s"
