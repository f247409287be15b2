"""L2 radii for the KWS experiments: accuracy of trained DS-CNNs under L2 PGD and C&W on the synthetic keywords.

The L2 epsilons of `experiments/speech_commands_dscnn.toml` are in MFCC units;
this measures where L2 attacks start to bite on the same front end, and the
spread of the inputs per MFCC coefficient (the scale of the L-inf epsilons). It loads
the models that the `jr_sweep` profile of `experiments/synthetic_kws_dscnn.toml`
trained (`models/<name>.keras` in its output folder) and attacks the first
`--examples` synthetic test clips.

Writes benchmarks/results/kws_l2_radii.json and .md. Run:

    tinyrobust bench experiments/synthetic_kws_dscnn.toml --profile jr_sweep --out runs/jr_sweep
    .venv/bin/python benchmarks/kws_l2_radii.py --run runs/jr_sweep
"""

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from tinyrobust import attacks, data  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def measure(model, x, y, epsilons, input_range, pgd_steps, cw_steps):
    """Clean accuracy and accuracy under L2 PGD and C&W at each eps."""
    suite = {"pgd": attacks.PGD(epsilons, norm="l2", steps=pgd_steps, input_range=input_range),
             "cw": attacks.CarliniWagnerL2(epsilons, steps=cw_steps, input_range=input_range)}
    return attacks.robust_accuracy(model, (x, y), suite, verbose=False).accuracy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="output folder of the jr_sweep profile")
    parser.add_argument("--models", default="float,stq,stq_jr_0.3")
    parser.add_argument("--epsilons", default="0.25,0.5,1,2")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--cw-steps", type=int, default=100)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    x, y = data.load_arrays("synthetic_kws", "test", limit=args.examples)
    input_range = tuple(data.info("synthetic_kws").input_range)
    rows = {}
    for name in args.models.split(","):
        path = pathlib.Path(args.run) / "models" / f"{name}.keras"
        if not path.is_file():
            raise FileNotFoundError(f"No trained model {path}: run the jr_sweep profile first. Received: --run={args.run!r}")
        rows[name] = measure(keras.saving.load_model(path), x, y, epsilons, input_range, args.pgd_steps, args.cw_steps)
        print(name, rows[name], flush=True)
    RESULTS.mkdir(exist_ok=True)
    spread = [round(float(v), 2) for v in x.std(axis=(0, 1, 3))]  # per MFCC coefficient, over clips and frames
    record = {"command": "benchmarks/kws_l2_radii.py " + " ".join(argv), "examples": int(len(x)),
              "input_std_per_coefficient": spread,
              "epsilons": epsilons, "pgd_steps": args.pgd_steps, "cw_steps": args.cw_steps, "models": rows}
    (RESULTS / "kws_l2_radii.json").write_text(json.dumps(record, indent=2) + "\n")
    header = ["model", "clean"] + [f"{a} {e:g}" for a in ("pgd", "cw") for e in epsilons]
    lines = [f"L2 accuracy (%) on {len(x)} synthetic keyword test clips; PGD-{args.pgd_steps}, C&W {args.cw_steps} "
             f"steps; eps in MFCC units. Input standard deviation per MFCC coefficient: {spread}.", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, accuracy in rows.items():
        cells = [name, f"{100 * accuracy['clean']:.1f}"]
        cells += [f"{100 * accuracy['attacks'][a][str(e)]:.1f}" for a in ("pgd", "cw") for e in epsilons]
        lines.append("| " + " | ".join(cells) + " |")
    (RESULTS / "kws_l2_radii.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
