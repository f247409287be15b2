"""tinyrobust's default worst case next to an ART cascade on the same model and examples.

The demo's STQ + JR model (`<run>/models/stq_jr.keras`, from `tinyrobust demo
--out <run>`) is attacked on the first 500 Fashion-MNIST test examples at
L-inf eps 0.05 and 0.1 by

- tinyrobust as the `fashion_mnist_tiny` experiment's demo profile evaluates
  it: the profile's configured attacks and its suite (today FGSM, PGD-10 and
  `autoattack-fast`), worst case per example; and the standard `autoattack`
  suite alone;
- an ART cascade (adversarial-robustness-toolbox, AutoAttack's recipe): APGD-CE
  with 5 restarts, APGD-DLR with 5 restarts (100 steps each), Square with
  p_init 0.8 and 1,000 queries, each run only on the examples still robust.

The issue's target: tinyrobust's default worst case within 1 point of the ART
cascade. Writes benchmarks/results/art_cascade.{json,md}. Run:

    .venv/bin/tinyrobust demo --out /tmp/demo
    .venv/bin/python benchmarks/art_cascade.py --run /tmp/demo
"""

import argparse
import json
import os
import pathlib
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tinyrobust as tr  # noqa: E402
from tinyrobust import bench  # noqa: E402
from tinyrobust.bench.config import build_attack, build_suite  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
EXPERIMENT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "fashion_mnist_tiny.toml"
EPSILONS = (0.05, 0.1)


def tinyrobust_default(model, x, y, profile):
    """Worst case of the experiment profile's evaluation (configured attacks + its suite), per eps."""
    config = bench.load(EXPERIMENT, profile=profile)
    threat = config.threat_models["linf"]
    info = tr.data.info("fashion_mnist")
    suite = {name: build_attack(spec, "linf", list(EPSILONS), info.input_range, config.seed)
             for name, spec in threat.attacks.items()}
    suite[threat.suite["name"]] = build_suite(threat.suite, "linf", list(EPSILONS), info.input_range,
                                              info.num_classes, config.seed)
    report = tr.attacks.robust_accuracy(model, (x, y), suite, verbose=False)
    return report.accuracy()


def tinyrobust_suite(model, x, y, name):
    report = tr.attacks.robust_accuracy(model, (x, y), {name: tr.attacks.suite(name, list(EPSILONS))}, verbose=False)
    return report.accuracy()


def art_cascade(model, x, y, eps, square_queries):
    """Robust accuracy after ART's APGD-CE x5, APGD-DLR x5 and Square (p_init 0.8), each on the survivors."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(model, nb_classes=10, input_shape=x.shape[1:], clip_values=(0.0, 1.0),
                                        loss_object=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stages = {
        "apgd-ce": AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=100,
                                                nb_random_init=5, loss_type="cross_entropy", batch_size=500,
                                                verbose=False),
        "apgd-dlr": AutoProjectedGradientDescent(classifier, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=100,
                                                 nb_random_init=5, loss_type="difference_logits_ratio",
                                                 batch_size=500, verbose=False),
        "square": SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=square_queries, p_init=0.8,
                               nb_restarts=1, batch_size=500, verbose=False),
    }
    robust = np.argmax(classifier.predict(x), axis=1) == y
    after = {}
    for name, attack in stages.items():
        index = np.flatnonzero(robust)
        if index.size:
            x_adv = attack.generate(x[index], y=y[index])
            robust[index] = np.argmax(classifier.predict(x_adv), axis=1) == y[index]
        after[name] = float(robust.mean())
    return after


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of `tinyrobust demo --out ...`")
    parser.add_argument("--model", default="stq_jr")
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--square-queries", type=int, default=1000)
    args = parser.parse_args()
    path = pathlib.Path(args.run) / "models" / f"{args.model}.keras"
    if not path.is_file():
        raise SystemExit(f"No model at {path}: run `tinyrobust demo --out {args.run}` first. Received: --run={args.run}")
    model = keras.saving.load_model(path)
    x, y = tr.data.load_arrays("fashion_mnist", "test", limit=args.examples)
    record = {"command": f".venv/bin/python benchmarks/art_cascade.py --run {args.run} --model {args.model} "
                         f"--examples {args.examples} --square-queries {args.square_queries}",
              "machine": platform.platform(), "model": str(path), "examples": int(len(x)), "epsilons": list(EPSILONS)}
    start = time.perf_counter()
    record["tinyrobust_default"] = tinyrobust_default(model, x, y, "demo")
    record["seconds_tinyrobust_default"] = time.perf_counter() - start
    start = time.perf_counter()
    record["tinyrobust_autoattack"] = tinyrobust_suite(model, x, y, "autoattack")
    record["seconds_tinyrobust_autoattack"] = time.perf_counter() - start
    start = time.perf_counter()
    record["art_cascade"] = {str(e): art_cascade(model, x, y, e, args.square_queries) for e in EPSILONS}
    record["seconds_art_cascade"] = time.perf_counter() - start
    lines = ["| eps | tinyrobust default worst (demo profile) | tinyrobust autoattack | ART APGD-CE x5 | "
             "+ APGD-DLR x5 | + Square (ART cascade) | default - ART |", "|" + " --- |" * 7]
    for e in map(str, EPSILONS):
        ours, art = record["tinyrobust_default"]["worst"][e], record["art_cascade"][e]
        lines.append(f"| {e} | {100 * ours:.1f} | {100 * record['tinyrobust_autoattack']['worst'][e]:.1f} | "
                     f"{100 * art['apgd-ce']:.1f} | {100 * art['apgd-dlr']:.1f} | {100 * art['square']:.1f} | "
                     f"{100 * (ours - art['square']):+.1f} |")
    text = (f"Robust accuracy (%) of `{path.name}` on the first {len(x)} Fashion-MNIST test examples, L-inf. "
            f"Clean: {100 * record['tinyrobust_default']['clean']:.1f}%.\n\n" + "\n".join(lines)
            + f"\n\nWall time: tinyrobust default {record['seconds_tinyrobust_default']:.0f} s, tinyrobust autoattack "
              f"{record['seconds_tinyrobust_autoattack']:.0f} s, ART cascade {record['seconds_art_cascade']:.0f} s "
              f"(2 CPU cores).\n\nCommand: `{record['command']}`\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "art_cascade.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / "art_cascade.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
