"""The benchmark suite: ``nox -s bench`` (or ``python benchmarks/run.py``).

Runs ``benchmarks/measure.py`` once per backend (numpy, torch eager, jax jit), each in its
own process, then prints every median and ratio, checks the performance goals against the
ratios measured in this run, writes ``benchmarks/results/latest.json`` and draws
``docs/benchmarks.png``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "latest.json"
CHART = HERE.parent / "docs" / "benchmarks.png"
BACKENDS = ["numpy", "torch", "jax"]
N_BIG = 10_000_000
CASE_NAMES = {
    "l1": "L1 value+metrics",
    "l2_clip_center": "L2(clip, center) value+metrics",
    "l2": "L2 value+metrics",
    "l1_ragged": "L1 on 256x512 ragged list",
}
sys.path.insert(0, str(HERE))
from training import LABELS  # noqa: E402  (benchmarks/training.py)

STEP = {"torch": "loss.backward()", "jax": "jit(value_and_grad)", "numpy": "value_and_grad"}
FAMILY = HERE / "family_distributions.py"


def stale_modules() -> list[str]:
    """The modules of the installed ``regularizers`` that differ from this checkout's
    ``src/regularizers`` (none where they agree, or where the package imported is the
    checkout itself). A virtualenv reused without reinstalling (``nox -R``) would measure
    the copy installed when it was made, not the code beside this file."""
    import regularizers

    installed = Path(regularizers.__file__).parent
    source = HERE.parent / "src" / "regularizers"
    if not source.is_dir() or installed.resolve() == source.resolve():
        return []
    names = {p.relative_to(source) for p in source.rglob("*.py")}
    names |= {p.relative_to(installed) for p in installed.rglob("*.py")}
    return sorted(
        str(n)
        for n in names
        if not (
            (source / n).is_file()
            and (installed / n).is_file()
            and (source / n).read_bytes() == (installed / n).read_bytes()
        )
    )


def measure(backend: str, extra: list[str]) -> dict[str, Any]:
    import os

    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), "--backend", backend, *extra],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"measuring {backend} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure_family(smoke: bool) -> list[dict[str, Any]]:
    """Entropy, KL and JSD over [2048, 32000] logits, forward + backward, against the naive
    torch idiom: time and peak extra memory, each implementation in a fresh process."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "family.json")
        size = ["--tokens", "8", "--vocab", "512"] if smoke else []
        # the median of three timed calls after the warm one: one call alone swung a row
        # from 0.58x to 1.46x between runs of the same code on this shared 2-core host
        cmd = [sys.executable, str(FAMILY), "--repeats", "3", "--impls", "naive,ours_autograd"]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        out = subprocess.run(
            [*cmd, *size, "--json", path], capture_output=True, text=True, env=env, check=False
        )
        if out.returncode != 0:
            sys.stderr.write(out.stdout[-2000:] + out.stderr[-4000:])
            raise SystemExit("measuring the family's distributions failed")
        with open(path) as fh:
            return json.load(fh)  # type: ignore[no-any-return]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f} ms" if ms < 100 else f"{ms:.1f} ms"


def training_label(backend: str, case: str) -> str:
    """``train_L2_tinker`` -> ``L2 loss.backward(), Tinker batch``."""
    kind, rest = case.split("_", 1)
    name, size = rest.rsplit("_", 1)
    where = "Tinker batch" if size == "tinker" else "1e3"
    if kind == "fwdgrad":
        return f"{LABELS[name]} forward with grad, {where}"
    if kind == "compiled":
        return f"Pipeline torch.compile(fullgraph) loss.backward(), {where}"
    if kind == "verl":
        return f"SampledKL k3 masked mean loss.backward(), {where}"
    return f"{LABELS[name]} {STEP[backend]}, {where}"


Row = dict[str, Any]


def row(
    backend: str,
    case: str,
    n: Any,
    ours: str,
    ref_name: str,
    ref: str,
    ratio: float | None,
    limit: float | None = None,
    lower: bool = True,
) -> Row:
    """One line of the table: ``ratio`` = ours / reference, against ``limit`` (``lower``:
    the goal is ratio <= limit; otherwise ratio < limit strictly)."""
    goal = None if limit is None else f"<={limit:g}x" if lower else f"<{limit:g}x"
    met = None
    if limit is not None and ratio is not None:
        met = ratio <= limit if lower else ratio < limit
    return {
        "backend": backend,
        "key": None,
        "case": case,
        "n": n,
        "ours": ours,
        "reference": ref_name,
        "ref": ref,
        "ratio": ratio,
        "goal": goal,
        "met": met,
    }


def ratio(case: dict[str, Any], ref: str) -> float:
    """Ours / ``ref`` for one measured case: the median over rounds of the two timed in the
    same round (``measure.paired``), or, in results written before it kept them, the ratio
    of the two medians."""
    got = case.get("paired", {}).get(ref)
    s = case["seconds"]
    return float(got) if got is not None else float(s["ours"] / s[ref])


def rows(results: list[dict[str, Any]], family: list[dict[str, Any]]) -> list[Row]:
    """Every line of the one table, each goal of issue 12 (and the earlier ones) on its row."""
    out: list[Row] = []
    for r in results:
        b = r["backend"]
        by = {(c["case"], c["n"]): c for c in r["cases"]}
        big = max(n for case, n in by if case == "l1")
        for case, limit in (("l1", 2.0), ("l2", 2.0), ("l2_clip_center", 3.0)):
            c = by[(case, big)]
            s = c["seconds"]
            name, ours = CASE_NAMES[case], fmt_ms(s["ours"])
            out.append(
                row(b, name, big, ours, "sum(x)", fmt_ms(s["floor"]), ratio(c, "floor"), limit)
            )
            out.append(
                row(b, name, big, ours, "native", fmt_ms(s["native"]), ratio(c, "native"), 1.1)
            )
            for other in ("adr", "keras"):
                if other in s:
                    out.append(
                        row(
                            b,
                            name,
                            big,
                            ours,
                            other,
                            fmt_ms(s[other]),
                            ratio(c, other),
                            1.0,
                            lower=False,
                        )
                    )
        if b in ("numpy", "torch"):
            for case in ("l1", "l2", "l2_clip_center"):
                c = by[(case, 1_000)]
                s = c["seconds"]
                out.append(
                    row(
                        b,
                        f"{CASE_NAMES[case]} (per-call overhead)",
                        1_000,
                        fmt_ms(s["ours"]),
                        "native",
                        fmt_ms(s["native"]),
                        ratio(c, "native"),
                        1.5,
                    )
                )
        for c in r["cases"]:
            case, s = c["case"], c["seconds"]
            if case == "l1_ragged":
                out.append(
                    row(
                        b,
                        CASE_NAMES[case],
                        c["n"],
                        fmt_ms(s["ours"]),
                        "sum(x)",
                        fmt_ms(s["floor"]),
                        ratio(c, "floor"),
                    )
                )
                continue
            if case.split("_")[0] not in ("train", "fwdgrad", "compiled", "verl"):
                continue
            ref_name = next(k for k in s if k != "ours")
            limit = {"train": 1.3, "fwdgrad": 1.5, "verl": 1.3}.get(case.split("_")[0])
            out.append(
                row(
                    b,
                    training_label(b, case),
                    c["n"],
                    fmt_ms(s["ours"]),
                    ref_name,
                    fmt_ms(s[ref_name]),
                    ratio(c, ref_name),
                    limit,
                )
            )
            out[-1]["key"] = case
        for case, mem in r.get("memory", {}).items():
            frac = mem["ours"]["extra_bytes"] / mem["ours"]["input_bytes"]
            native = mem["native"]["extra_bytes"] / mem["native"]["input_bytes"]
            out.append(
                row(
                    b,
                    f"{CASE_NAMES[case]} peak extra memory / input",
                    big,
                    f"{frac * 100:.1f}%",
                    "native",
                    f"{native * 100:.1f}%",
                    frac,
                    0.25,
                )
            )
    by_impl = {(f["case"], f["impl"]): f for f in family}
    for case in dict.fromkeys(f["case"] for f in family):
        naive, ours = by_impl[(case, "naive")], by_impl[(case, "ours_autograd")]
        label = f"{case.upper() if case != 'entropy' else 'Entropy'} fwd+bwd [T, V] logits"
        shape = "x".join(str(d) for d in naive["shape"])
        t = ours["median_s"] / naive["median_s"]
        m = ours["peak_extra_bytes"] / max(naive["peak_extra_bytes"], 1)
        out.append(
            row(
                "torch",
                f"{label}, time",
                shape,
                fmt_ms(ours["median_s"]),
                "naive",
                fmt_ms(naive["median_s"]),
                t,
                1.0,
            )
        )
        mib = 2**20
        out.append(
            row(
                "torch",
                f"{label}, peak extra memory",
                shape,
                f"{ours['peak_extra_bytes'] / mib:.0f} MiB",
                "naive",
                f"{naive['peak_extra_bytes'] / mib:.0f} MiB",
                m,
                0.5,
            )
        )
    return out


def table(lines: list[Row]) -> list[str]:
    """The one table: every case, its goal and whether this run met it."""
    width = max(len(r["case"]) for r in lines)
    head = (
        f"{'backend':<7} {'case':<{width}} {'n':>9} {'ours':>11} {'reference':>18} "
        f"{'ratio':>7} {'goal':>6} {'':<6}"
    )
    out = [head, "-" * len(head)]
    for r in lines:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        status = "" if r["met"] is None else "met" if r["met"] else "MISSED"
        ref = f"{r['reference']} {r['ref']}"
        out.append(
            f"{r['backend']:<7} {r['case']:<{width}} {r['n']!s:>9} {r['ours']:>11} {ref:>18} "
            f"{ratio:>7} {r['goal'] or '-':>6} {status:<6}"
        )
    return out


def summary(lines: list[Row]) -> str:
    goals = [r for r in lines if r["met"] is not None]
    missed = sum(not r["met"] for r in goals)
    return f"{len(goals) - missed} of {len(goals)} goals met in this run" + (
        f"; {missed} missed" if missed else ""
    )


DOC = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def header(results: list[dict[str, Any]]) -> str:
    import platform

    return (
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, {results[0].get('threads')} CPU threads, "
        f"Python {platform.python_version()}, load average at the start "
        f"{results[0].get('load', '?')}."
    )


def write_doc(results: list[dict[str, Any]], lines: list[Row], seconds: float) -> None:
    """Replace the results section of docs/benchmarks.md with this run's table."""
    if not DOC.exists() or START not in DOC.read_text():
        return
    text = [
        START,
        "",
        header(results) + f" The run took {seconds / 60:.1f} minutes.",
        "",
        "Each ratio is ours / the reference, both measured in this run: the median over "
        "interleaved rounds (in a shuffled order) of the two timed in the same round; the "
        "times are medians over the rounds (for the [T, V] rows: of three calls, each "
        "implementation in its own process). `n` is elements (the [T, V] rows: tokens x "
        "classes). " + summary(lines) + ".",
        "",
        "```text",
        *table(lines),
        "```",
        "",
        "![benchmark chart](benchmarks.png)",
        "",
        END,
    ]
    replace_between(DOC, START, END, "\n".join(text))


README = HERE.parent / "README.md"
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


def write_readme(results: list[dict[str, Any]], lines: list[Row]) -> None:
    """The README's headline of the last run: value+metrics at 1e7 against one ``sum(x)``,
    the training path against hand-written code, and the family's cases."""
    if README_START not in README.read_text():
        return

    def ratios(pred: Any) -> list[float]:
        return [r["ratio"] for r in lines if pred(r)]

    text = [
        README_START,
        header(results),
        "",
        "| | L1 / L2 / L2 clip+center at 1e7, time / one `sum(x)` | training path, ours / "
        "hand-written: median (worst) over every built-in and the Pipeline | goals met |",
        "|---|---|---|---|",
    ]
    for r in results:
        b = r["backend"]
        mine = [x for x in lines if x["backend"] == b]
        floor = [
            f"{x['ratio']:.2f}x"
            for x in mine
            if x["reference"] == "sum(x)" and x["case"].endswith("value+metrics")
        ]
        train = ratios(
            lambda x, b=b: (
                x["backend"] == b
                and str(x["key"]).startswith("train_")
                and str(x["key"]).endswith("_tinker")
            )
        )
        train.sort()
        goals = [x for x in mine if x["met"] is not None]
        mid = train[len(train) // 2] if train else float("nan")
        worst = train[-1] if train else float("nan")
        text.append(
            f"| {b} | {' / '.join(floor)} | {mid:.2f}x ({worst:.2f}x) | "
            f"{sum(bool(x['met']) for x in goals)} of {len(goals)} |"
        )
    family = [
        x for x in lines if "fwd+bwd [T, V]" in x["case"] or "SampledKL k3 masked" in x["case"]
    ]
    text += [
        "",
        "Family, torch: "
        + "; ".join(
            f"{x['case'].replace(' loss.backward(), Tinker batch', ' vs verl')} {x['ratio']:.2f}x"
            for x in family
        )
        + f". {summary(lines)}.",
        README_END,
    ]
    replace_between(README, README_START, README_END, "\n".join(text))


def replace_between(path: Path, start: str, end: str, text: str) -> None:
    old = path.read_text()
    head, rest = old.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + text + tail)


def chart(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = ["l1", "l2", "l2_clip_center"]
    impls = [
        ("ours", "regularizers"),
        ("native", "hand-written native"),
        ("adr", "ADR transcription"),
        ("keras", "Keras 3 (value only)"),
    ]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=True)
    for ax, r in zip(axes, results, strict=True):
        by = {(c["case"], c["n"]): c["seconds"] for c in r["cases"]}
        width = 0.2
        for i, (key, label) in enumerate(impls):
            xs, ys = [], []
            for j, case in enumerate(cases):
                s = by[(case, N_BIG)]
                if key in s:
                    xs.append(j + (i - 1.5) * width)
                    ys.append(s[key] / s["floor"])
            ax.bar(xs, ys, width, label=label)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)), ["L1", "L2", "L2 clip+center"])
        ax.set_title(f"{r['backend']} ({'jit' if r['backend'] == 'jax' else 'eager'}), 1e7 float32")
    axes[0].set_ylabel("time / one native sum(x)  (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle("value + metrics, relative to one read pass (dashed line = the floor)")
    fig.tight_layout()
    CHART.parent.mkdir(exist_ok=True)
    fig.savefig(CHART, dpi=110)


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per measurement")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every case once at tiny sizes (checks the benchmarks run; writes nothing)",
    )
    parser.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable")
    parser.add_argument("--no-family", action="store_true", help="skip the [T, V] family cases")
    args = parser.parse_args()
    stale = stale_modules()
    if stale:
        raise SystemExit(
            f"the installed regularizers is not this checkout's ({', '.join(stale[:4])}"
            f"{' ...' if len(stale) > 4 else ''} differ): reinstall it (nox -s bench, not -R)"
        )
    extra = ["--budget", str(args.budget)] + (["--smoke"] if args.smoke else [])
    start = time.perf_counter()
    results = []
    for backend in args.backend or BACKENDS:
        print(f"measuring {backend} ...", flush=True)
        results.append(measure(backend, extra))
    family: list[dict[str, Any]] = []
    if not args.no_family:
        print("measuring Entropy, KL and JSD over [T, V] logits (torch) ...", flush=True)
        family = measure_family(args.smoke)
    for r in results:
        for name in r.get("missing", []):
            print(f"NO TRAINING-PATH CASE for the built-in {name} (benchmarks/training.py)")
        for name, why in r.get("skipped", {}).items():
            print(f"{name}: no training-path case ({why})")
    lines = rows(results, family)
    print()
    print("\n".join(table(lines)))
    print(
        "\nratio = ours / reference, both measured in this run; reference: sum(x) (one read: "
        "the floor), native (hand-written), adr (the ADR's code), keras, verl (verl's k3 "
        "idiom), naive (log_softmax idiom), eager (the Pipeline without torch.compile)"
    )
    seconds = time.perf_counter() - start
    print(f"\n{summary(lines)} ({seconds:.0f} s)")
    if args.smoke or args.backend or args.no_family:
        print("a smoke or partial run: nothing written")
        return 1 if any(r.get("missing") for r in results) else 0
    write_doc(results, lines, seconds)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps({"results": results, "family": family, "table": lines}, indent=1) + "\n"
    )
    written = f"{RESULTS.relative_to(HERE.parent)}, {DOC.relative_to(HERE.parent)}"
    write_readme(results, lines)
    chart(results)
    print(f"wrote {written}, README.md and {CHART.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
