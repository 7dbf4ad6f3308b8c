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
    "l2_clip_center": "L2(center='mean', clip=(-100, 0))",
    "l2": "L2 value+metrics",
    "l1_ragged": "L1 on 256x512 ragged list",
    "pipeline_loss_grad_ragged": "Pipeline L1+L2 loss+grad, 256x512 ragged",
}


def measure(backend: str) -> dict[str, Any]:
    env_backend = {"numpy": "numpy", "torch": "torch", "jax": "jax"}[backend]
    import os

    env = {**os.environ, "KERAS_BACKEND": env_backend, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(HERE / "measure.py"), "--backend", backend],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"measuring {backend} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:9.3f}" if ms < 100 else f"{ms:9.1f}"


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        f"{'backend':<7} {'case':<42} {'n':>9} {'floor ms':>9} {'ours ms':>9} "
        f"{'ours/floor':>10} {'ours/native':>11} {'adr/ours':>8} {'keras/ours':>10}"
    ]
    for r in results:
        for c in r["cases"]:
            s = c["seconds"]
            ours = s["ours"]

            def ratio(
                k: str, inverse: bool = False, s: dict[str, float] = s, ours: float = ours
            ) -> str:
                if k not in s:
                    return "-"
                return f"{(s[k] / ours if inverse else ours / s[k]):.2f}x"

            lines.append(
                f"{r['backend']:<7} {CASE_NAMES[c['case']]:<42} {c['n']:>9} "
                f"{fmt_ms(s['floor'])} {fmt_ms(ours)} {ratio('floor'):>10} "
                f"{ratio('native'):>11} {ratio('adr', True):>8} {ratio('keras', True):>10}"
            )
    return lines


def goals(results: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(goal, met, measured) for each goal of the performance issue."""
    out: list[tuple[str, bool, str]] = []
    for r in results:
        b = r["backend"]
        by = {(c["case"], c["n"]): c["seconds"] for c in r["cases"]}
        for case, limit in (("l1", 2.0), ("l2", 2.0), ("l2_clip_center", 3.0)):
            s = by[(case, N_BIG)]
            got = s["ours"] / s["floor"]
            out.append(
                (f"{b}: {CASE_NAMES[case]} <= {limit}x floor at 1e7", got <= limit, f"{got:.2f}x")
            )
            got = s["ours"] / s["native"]
            out.append(
                (
                    f"{b}: {CASE_NAMES[case]} <= 1.1x hand-written native at 1e7",
                    got <= 1.1,
                    f"{got:.2f}x",
                )
            )
            for other in ("adr", "keras"):
                if other in s:
                    got = s[other] / s["ours"]
                    out.append(
                        (
                            f"{b}: {CASE_NAMES[case]} faster than {other} at 1e7",
                            got > 1.0,
                            f"{other} takes {got:.2f}x ours",
                        )
                    )
        if b in ("numpy", "torch"):
            for case in ("l1", "l2", "l2_clip_center"):
                s = by[(case, 1_000)]
                over = (s["ours"] - s["native"]) * 1e6
                out.append(
                    (
                        f"{b}: {CASE_NAMES[case]} per-call overhead at 1e3 <= 5 us",
                        over <= 5.0,
                        f"{over:+.1f} us",
                    )
                )
            for case, mem in r["memory"].items():
                frac = mem["ours"]["extra_bytes"] / mem["ours"]["input_bytes"]
                native = mem["native"]["extra_bytes"] / mem["native"]["input_bytes"]
                out.append(
                    (
                        f"{b}: {CASE_NAMES[case]} peak extra memory at 1e7 <= 25% of input",
                        frac <= 0.25,
                        f"{frac * 100:.1f}% (native: {native * 100:.1f}%)",
                    )
                )
        if b == "torch":
            s = by[("pipeline_loss_grad_ragged", 256 * 512)]
            got = s["ours"] / s["native"]
            out.append(
                (
                    "torch: Pipeline L1+L2 loss+grad on the ragged batch <= 1.3x hand-written",
                    got <= 1.3,
                    f"{got:.2f}x",
                )
            )
    return out


DOC = HERE.parent / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def write_doc(results: list[dict[str, Any]], met: list[tuple[str, bool, str]]) -> None:
    """Replace the results section of docs/benchmarks.md with this run's table and goals."""
    if not DOC.exists() or START not in DOC.read_text():
        return
    import platform

    lines = [
        START,
        "",
        f"Last run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.machine()}, {results[0].get('threads')} CPU threads, "
        f"Python {platform.python_version()}.",
        "",
        "```text",
        *table(results),
        "```",
        "",
        "| goal | measured | |",
        "|---|---|---|",
    ]
    lines += [f"| {g} | {got} | {'met' if ok else '**missed**'} |" for g, ok, got in met]
    lines += ["", "![benchmark chart](benchmarks.png)", "", END]
    text = DOC.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + "\n".join(lines) + tail)


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
    start = time.perf_counter()
    results = []
    for backend in BACKENDS:
        print(f"measuring {backend} ...", flush=True)
        results.append(measure(backend))
    print()
    print("\n".join(table(results)))
    print(
        "\nratios: ours/floor and ours/native (lower is better), adr/ours and keras/ours "
        "(higher: ours is faster)\n"
    )
    met = goals(results)
    for goal, ok, got in met:
        print(f"{'MET ' if ok else 'MISS'} {goal}: {got}")
    misses = sum(not ok for _, ok, _ in met)
    print(
        f"\n{len(met) - misses} of {len(met)} goals met in this run"
        + (f"; {misses} missed (see docs/benchmarks.md)" if misses else "")
    )
    write_doc(results, met)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "results": results,
                "goals": [{"goal": g, "met": ok, "measured": got} for g, ok, got in met],
            },
            indent=1,
        )
        + "\n"
    )
    chart(results)
    print(
        f"wrote {RESULTS.relative_to(HERE.parent)} and {CHART.relative_to(HERE.parent)} "
        f"in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
