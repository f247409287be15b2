"""Wall time of the README's demo command on a fresh clone, against its 10-minute budget.

Clones the committed HEAD of this repository into a new folder and times two
steps there: `make .venv/.installed system-deps` (the install: a new `.venv`,
pip from whatever index or cache the machine has, the Debian packages when
they are missing) and then `make demo` (the demo alone, `.venv` existing by
then). Their sum is what one `make demo` costs on a fresh machine of this
kind. The demo's table is compared with the committed one
(`benchmarks/results/fashion_mnist_tiny_demo/report.md`): two runs on one host
give bit-identical models, two hosts may differ in the last digits.

Uncommitted changes are not measured (the clone is of HEAD). Run it with
nothing else on the cores: another job's load counts as the demo's time.

Writes benchmarks/results/<output>.json and .md. Run:

    .venv/bin/python benchmarks/demo_time.py [--budget-s 600] [--workdir DIR] [--output demo_time]
"""

import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMITTED_REPORT = RESULTS / "fashion_mnist_tiny_demo" / "report.md"
DEMO_REPORT = pathlib.Path("runs") / "fashion_mnist_tiny" / "demo" / "report.md"  # in the clone
STEPS = {"install": ["make", ".venv/.installed", "system-deps"], "demo": ["make", "demo"]}


def report_table(text):
    """The rows of the first Markdown table in a bench `report.md`.

    Args:
        text: the report's text.

    Returns:
        A list of rows, each a list of its stripped cells (header and rule included).
    """
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows


def table_differences(measured, committed):
    """Cells that differ between two report tables with the same header.

    Args:
        measured, committed: tables from `report_table`.

    Returns:
        A list of `{"model", "column", "measured", "committed"}`, empty when the tables agree; a single entry
        with column "<header>" when their headers or row counts differ, or "<model>" when a row's model does.
    """
    if not measured or not committed or measured[0] != committed[0] or len(measured) != len(committed):
        return [{"model": None, "column": "<header>", "measured": measured[:1], "committed": committed[:1]}]
    header = measured[0]
    differences = []
    for row, other in zip(measured[2:], committed[2:]):
        if row[0] != other[0]:
            return [{"model": row[0], "column": "<model>", "measured": row[0], "committed": other[0]}]
        differences += [{"model": row[0], "column": column, "measured": a, "committed": b}
                         for column, a, b in zip(header, row, other) if a != b]
    return differences


def _run(step, command, cwd, log):
    """Runs one timed step in `cwd`, appending its output to `log`; returns its wall time in seconds."""
    print(f"{step}: {' '.join(command)}", flush=True)
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        start = time.perf_counter()
        status = subprocess.run(command, check=False, cwd=cwd, stdout=out, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if status != 0:
        tail = "\n".join(pathlib.Path(log).read_text().splitlines()[-20:])
        raise RuntimeError(f"`{' '.join(command)}` failed with exit status {status} after {seconds:.0f} s "
                           f"(log: {log}):\n{tail}")
    print(f"{step}: {seconds:.0f} s", flush=True)
    return seconds


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def _minutes(seconds):
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=600.0, help="the budget for install + demo, in seconds")
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="an empty or missing folder for the clone (default: a new temporary folder, "
                             "deleted after a successful run)")
    parser.add_argument("--output", default="demo_time", help="file name (without extension) under results/")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"Expected --budget-s to be a positive number of seconds. Received: --budget-s={args.budget_s}")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"Expected --workdir to be an empty or missing folder. Received: --workdir={args.workdir}")

    # Imported after the argument checks: it imports TensorFlow.
    from tinyrobust.bench.runner import machine

    commit = _git("rev-parse", "HEAD")
    if _git("status", "--porcelain", "--untracked-files=no"):
        print(f"note: uncommitted changes are not measured; the clone is of HEAD ({commit[:7]})", file=sys.stderr)
    workdir = args.workdir or pathlib.Path(tempfile.mkdtemp(prefix="demo_time_"))
    clone = workdir / "tinyrobust"
    log = workdir / "demo_time.log"
    clone.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    seconds = {step: _run(step, command, clone, log) for step, command in STEPS.items()}  # a failure keeps workdir
    table = report_table((clone / DEMO_REPORT).read_text())
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    total = sum(seconds.values())
    differences = table_differences(table, report_table(COMMITTED_REPORT.read_text()))
    command = f"python benchmarks/demo_time.py --budget-s {args.budget_s:g} --output {args.output}"
    result = {"benchmark": "demo_time", "commit": commit, "date": datetime.date.today().isoformat(),
              "seconds": {**seconds, "total": total}, "budget_s": args.budget_s, "within_budget": total <= args.budget_s,
              "same_table_as_committed": not differences, "table_differences": differences,
              "machine": machine(), "command": command}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.output}.json").write_text(json.dumps(result, indent=2) + "\n")
    host = result["machine"]
    lines = ["# The README's demo command on a fresh clone", "",
             f"Commit {commit[:7]}, {result['date']}, on {host['cpu']} ({host['cpu_id']}), {host['cores']} cores.", "",
             "| step | wall time |", "| --- | --- |",
             f"| install (`make .venv/.installed system-deps`) | {_minutes(seconds['install'])} |",
             f"| demo (`make demo`) | {_minutes(seconds['demo'])} |",
             f"| total | {_minutes(total)} |", "",
             f"Budget {_minutes(args.budget_s)}: {'met' if result['within_budget'] else 'missed'}. "
             + ("The demo's table equals the committed one to the digit." if not differences else
                f"The demo's table differs from the committed one in {len(differences)} cell(s)."), "",
             f"Command: `{command}`"]
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
