"""What robustness each training method buys per CPU-second: the STQ small CNN on Fashion-MNIST.

Every method trains the same stochastic-ternary small CNN on the same
Fashion-MNIST training images for the same epochs and batches (Adam, constant
learning rate), with at least two seeds, and is measured on the validation
split (held out of the training split by `tinyrobust.data`, never the test
split):
- training cost: process CPU-seconds (both cores) and wall seconds of the
  training batches alone (the per-epoch check below is timed apart);
- clean accuracy on the whole validation split;
- worst case at `--epsilon` over FGSM, PGD-20 and the standard suite
  (APGD-CE, APGD-T, Square: `autoattack`, or `--suite autoattack-fast`) on the
  first `--examples` validation images;
- whether training collapsed (catastrophic overfitting): after every epoch a
  PGD-10 check on 500 other validation images; "collapsed" when it fell more
  than 20 points below its best epoch (the bench's early-stopping rule).

Methods (eps = `--epsilon` unless a name says otherwise): `none` (plain STQ
training, the cost unit); `pgd10`, `pgd3` (PGD-AT, step 2.5 eps / steps);
`trades3` (TRADES, beta 6); `fgsm_rs` (step 1.25 eps); `n_fgsm` (noise 2 eps,
step eps, no projection); `grad_align` (FGSM + GradAlign, lambda 0.2); `jr`
(per-layer JR, the fashion_mnist_tiny weights {input 0.05, relu_2 0.02});
`jr_quarter` (the same JR on a quarter of each batch). `--collapse-epsilon E`
adds `fgsm_rs`, `n_fgsm` and `grad_align` at radius E (named `<method>@E`, and
evaluated at E): a radius where FGSM-RS is known to overfit catastrophically.
Every method's own settings are its paper's defaults (tinyrobust's docstrings
say which); none was tuned here.

Each run is written to `<output>/<method>_seed<k>.json` as it finishes and
reused when its settings match, so an interrupted benchmark resumes; the
summary (`<output>.json`, `.md` and the Pareto plot `<output>.png`) is rebuilt
from those files. Run:

    .venv/bin/python benchmarks/training_cost.py [--seeds 0 1] [--epochs 5] [--limit 10000] \\
        [--examples 200] [--collapse-epsilon 0.2] [--output benchmarks/results/training_cost]
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

METHODS = ("none", "pgd10", "pgd3", "trades3", "fgsm_rs", "n_fgsm", "grad_align", "jr", "jr_quarter")
ONE_STEP = ("fgsm_rs", "n_fgsm", "grad_align")
JR_WEIGHTS = {"input": 0.05, "relu_2": 0.02}
CHECK_EXAMPLES = 500
COLLAPSE = 0.2


def method_settings(name, epsilon):
    """`(adversary, jacobian)` configs of a method name (`<method>` or `<method>@<eps>`) as plain dicts."""
    base, _, radius = name.partition("@")
    eps = float(radius) if radius else epsilon
    adversaries = {"pgd10": {"method": "pgd", "steps": 10}, "pgd3": {"method": "pgd", "steps": 3},
                   "trades3": {"method": "trades", "steps": 3}, "fgsm_rs": {"method": "fgsm_rs"},
                   "n_fgsm": {"method": "n_fgsm"}, "grad_align": {"method": "grad_align"}}
    if base not in METHODS or (radius and base not in ONE_STEP):
        raise ValueError(f"Unknown method (allowed: {', '.join(METHODS)}, or <one-step method>@<eps>). "
                         f"Received: method={name!r}")
    adversary = None if base not in adversaries else {**adversaries[base], "epsilon": eps}
    jacobian = None
    if base in ("jr", "jr_quarter"):
        jacobian = {"layers": dict(JR_WEIGHTS), "batch_fraction": 0.25 if base == "jr_quarter" else 1.0}
    return adversary, jacobian, eps


def run_one(name, seed, args):
    """Trains and measures one method at one seed; returns its record."""
    import tensorflow as tf

    import tinyrobust as tr
    from tinyrobust import attacks, data

    tf.get_logger().setLevel("ERROR")  # the attacks' retracing notes, one per new batch shape
    adversary, jacobian, eps = method_settings(name, args.epsilon)
    keras.utils.set_random_seed(seed)
    x_train, y_train = data.load_arrays("fashion_mnist", "train", limit=args.limit)
    x_val, y_val = data.load_arrays("fashion_mnist", "validation")
    x_check, y_check = x_val[-CHECK_EXAMPLES:], y_val[-CHECK_EXAMPLES:]
    x_eval, y_eval = x_val[:args.examples], y_val[:args.examples]
    network = tr.models.small_cnn(quantization="stq", width=args.width)
    model = tr.RobustModel.wrap(
        network,
        adversary=None if adversary is None else tr.AdversarialTraining(seed=seed, **adversary),
        jacobian=None if jacobian is None else tr.JacobianRegularizer(seed=seed, **jacobian))
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    check = attacks.PGD(eps, steps=10, rel_step_size=0.25, seed=seed)
    clock = _Clock(network, check, x_check, y_check)
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, verbose=0, shuffle=True,
              callbacks=[clock])
    clean = float(np.mean(np.argmax(network.predict(x_val, batch_size=512, verbose=0), -1) == y_val))
    suite = attacks.suite(args.suite, eps, seed=seed)
    evaluated = {"fgsm": attacks.FGSM(eps), "pgd": attacks.PGD(eps, steps=20, seed=seed), args.suite: suite}
    report = attacks.robust_accuracy(network, (x_eval, y_eval), evaluated, verbose=False)
    robust = {attack: float(next(iter(values.values()))) for attack, values in report.accuracy()["attacks"].items()
              if "/" not in attack}
    worst = float(next(iter(report.accuracy()["worst"].values())))
    best = max(clock.history)
    return {"method": name, "seed": seed, "epsilon": eps, "adversary": adversary, "jacobian": jacobian,
            "train_cpu_s": round(clock.cpu, 2), "train_wall_s": round(clock.wall, 2),
            "clean_validation": clean, "robust_validation": robust, "worst_validation": worst,
            "pgd10_check_per_epoch": clock.history,
            "collapsed": any(value < max(clock.history[:i + 1]) - COLLAPSE for i, value in enumerate(clock.history)),
            "best_check_epoch": clock.history.index(best) + 1}


class _Clock(keras.callbacks.Callback):
    """Times the training batches of each epoch, then runs the held-out PGD-10 check outside the timed part.

    Attributes:
        cpu, wall: seconds of training (process CPU, both cores; and wall).
        history: the check's accuracy after each epoch.
    """

    def __init__(self, network, check, x, y):
        super().__init__()
        self.network, self.check, self.x, self.y = network, check, x, y
        self.cpu = self.wall = 0.0
        self.history = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = (time.process_time(), time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.cpu += time.process_time() - self._start[0]
        self.wall += time.perf_counter() - self._start[1]
        x_adv = self.check(self.network, self.x, self.y)
        predicted = np.argmax(self.network.predict(x_adv, batch_size=500, verbose=0), -1)
        self.history.append(float(np.mean(predicted == self.y)))


def settings(args):
    """What a stored run must match to be reused."""
    return {"epochs": args.epochs, "limit": args.limit, "batch_size": args.batch_size, "width": args.width,
            "learning_rate": args.learning_rate, "examples": args.examples, "suite": args.suite,
            "check_examples": CHECK_EXAMPLES}


def summarise(runs):
    """Per method: mean and spread over seeds of cost, clean and worst case, and the collapses."""
    rows = []
    plain = [r["train_cpu_s"] for r in runs if r["method"] == "none"]
    unit = statistics.mean(plain) if plain else None
    for name in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == name]

        def stat(key, group=group):
            values = [r[key] for r in group]
            return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

        cpu, clean, worst = stat("train_cpu_s"), stat("clean_validation"), stat("worst_validation")
        checks = [r["pgd10_check_per_epoch"] for r in group]
        trajectory = [statistics.mean(values) for values in
                      zip(*([c[0], max(c), c[-1]] for c in checks))]  # first, best and last epoch, seed mean
        rows.append({"method": name, "epsilon": group[0]["epsilon"], "seeds": sorted(r["seed"] for r in group),
                     "train_cpu_s": cpu, "cost_vs_plain": None if unit is None else cpu[0] / unit,
                     "clean_validation": clean, "worst_validation": worst,
                     "fgsm_validation": statistics.mean(r["robust_validation"]["fgsm"] for r in group),
                     "check_first_best_last": trajectory,
                     "collapsed": sum(r["collapsed"] for r in group)})
    return rows


def markdown(rows, meta):
    lines = [f"# Training cost against robustness (`{meta['command']}`)", "",
             f"STQ small CNN (width {meta['settings']['width']}) on {meta['settings']['limit']} Fashion-MNIST "
             f"training images, {meta['settings']['epochs']} epochs at batch {meta['settings']['batch_size']} "
             f"(Adam {meta['settings']['learning_rate']}); clean accuracy on the whole validation split, worst case "
             f"over FGSM, PGD-20 and the `{meta['settings']['suite']}` suite on {meta['settings']['examples']} "
             "validation images; FGSM (val): FGSM alone there (far above the worst case is catastrophic overfitting's "
             "signature); the held-out PGD-10 check on 500 other validation images after each epoch (means over "
             "seeds); collapsed = that check fell more than 20 points below its best (the rule fixed before the "
             "runs). "
             "Mean ± standard deviation over seeds. CPU-seconds count both cores; the host's speed is in the JSON "
             "(`machine`).", "",
             "| method | eps | seeds | train CPU-s | x plain | clean (val) | worst (val) | FGSM (val) | "
             "held-out PGD-10: first / best / last epoch | collapsed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = "" if r["cost_vs_plain"] is None else f"{r['cost_vs_plain']:.2f}x"
        lines.append(f"| {r['method']} | {r['epsilon']:g} | {len(r['seeds'])} | {r['train_cpu_s'][0]:,.0f} ± "
                     f"{r['train_cpu_s'][1]:,.0f} | {ratio} | {100 * r['clean_validation'][0]:.1f} ± "
                     f"{100 * r['clean_validation'][1]:.1f}% | {100 * r['worst_validation'][0]:.1f} ± "
                     f"{100 * r['worst_validation'][1]:.1f}% | {100 * r['fgsm_validation']:.1f}% | "
                     + " / ".join(f"{100 * v:.1f}" for v in r["check_first_best_last"])
                     + f"% | {r['collapsed']} of {len(r['seeds'])} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, epsilon):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r["epsilon"] != epsilon:
            continue
        axis.errorbar(r["train_cpu_s"][0], 100 * r["worst_validation"][0], xerr=r["train_cpu_s"][1],
                      yerr=100 * r["worst_validation"][1], fmt="o", capsize=3, label=r["method"])
    axis.set_xscale("log")
    axis.set_xlabel("training CPU-seconds (log scale)")
    axis.set_ylabel(f"worst-case validation accuracy at eps {epsilon:g} (%)")
    axis.set_title("STQ small CNN on Fashion-MNIST: robustness against training cost")
    axis.legend(fontsize=8, ncol=2)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--collapse-epsilon", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--suite", default="autoattack", choices=["autoattack", "autoattack-fast"])
    parser.add_argument("--output", default="benchmarks/results/training_cost")
    args = parser.parse_args(argv)
    for name in ("epochs", "limit", "batch_size", "width", "examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1. Received: {getattr(args, name)}")
    for name in ("epsilon", "collapse_epsilon"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1] (inputs are in [0, 1]). Received: {value}")
    if args.collapse_epsilon is not None:
        args.methods = list(args.methods) + [f"{m}@{args.collapse_epsilon:g}" for m in ONE_STEP]
    for name in args.methods:
        try:
            method_settings(name, args.epsilon)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/training_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    folder = pathlib.Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    from tinyrobust.bench.runner import machine, versions

    wanted = settings(args)
    runs = []
    for seed in args.seeds:
        for name in args.methods:
            path = folder / f"{name}_seed{seed}.json"
            if path.exists():
                stored = json.loads(path.read_text())
                if stored.get("settings") == wanted:
                    runs.append(stored["run"])
                    continue
            run = run_one(name, seed, args)
            record = {"command": command, "settings": wanted, "machine": machine(), "versions": versions(), "run": run}
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            temporary.replace(path)
            runs.append(run)
            print(f"{name} seed {seed}: {run['train_cpu_s']:.0f} CPU-s, clean {run['clean_validation']:.3f}, "
                  f"worst {run['worst_validation']:.3f}, collapsed {run['collapsed']}", flush=True)
    rows = summarise(runs)
    meta = {"command": command, "settings": wanted, "machine": machine(), "versions": versions()}
    pathlib.Path(f"{args.output}.json").write_text(json.dumps({**meta, "methods": rows}, indent=1) + "\n")
    pathlib.Path(f"{args.output}.md").write_text(markdown(rows, meta))
    plot(rows, f"{args.output}.png", args.epsilon)


if __name__ == "__main__":
    main()
