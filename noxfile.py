"""Sessions: one test session per backend configuration, scaling out, lint, the docs,
and the examples.

``nox`` runs every test session, lint and the docs build (the README's test command, and
CI); ``nox -s demo`` runs the main job; ``nox -s example`` trains the example models;
``nox -R`` reuses the virtualenvs for fast local re-runs.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable

import nox

nox.needs_version = ">=2024.3.2"
# pip, not uv: these machines carry torch's CPU wheel on disk, which only pip looks at.
nox.options.default_venv_backend = "virtualenv"
nox.options.error_on_missing_interpreters = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
TEST_DEPS = nox.project.dependency_groups(PYPROJECT, "test")
LINT_DEPS = nox.project.dependency_groups(PYPROJECT, "lint")
# Always this range: a looser one pulls a multi-GB CUDA build of torch.
TORCH = "torch>=2.13,<2.14"
# Triton's interpreter runs its kernels on the CPU (3.9 is the one checked with that torch)
TRITON = "triton>=3.5,<4"

# backend configuration -> what its session installs besides the test group
BACKENDS: dict[str, list[str]] = {
    "numpy": [],
    "array_api_strict": ["array-api-strict"],
    "array_api_strictest": ["array-api-strict"],
    "torch": [TORCH],
    "jax": ["jax"],
    "dask": ["dask[array]"],
}
TEST_SESSIONS = [f"tests-{name}" for name in BACKENDS]
nox.options.sessions = [
    *TEST_SESSIONS,
    "tests-tinker",
    "tests-triton",
    "tests-keras",
    "tests-docs",
    "distributed",
    "lint",
    "docs",
]
# JAX compiles every drawn shape, op by op when eager and again under jit: its session draws
# 3 examples per property (2 for each generic per-penalty property) where the others draw 40,
# the same properties as everywhere else. (Uncapped, it alone ran past an hour in CI.) Dask
# builds and runs a graph per call: 10 examples.
# CI runs every session in one clone, and the venvs add up to about 9 GB (torch, JAX and
# Keras, each in several). With REGULARIZERS_DISCARD_VENVS=1 (what .ci/run sets), each session
# deletes its venv once it has passed, so the disk holds one venv at a time.
DISCARD_VENVS = os.environ.get("REGULARIZERS_DISCARD_VENVS") == "1"


def session(*args: object, **kwargs: object) -> Callable[[Callable[[nox.Session], None]], object]:
    """``nox.session`` whose session deletes its venv after passing, when asked to."""

    def decorate(body: Callable[[nox.Session], None]) -> object:
        @functools.wraps(body)
        def run(session: nox.Session) -> None:
            body(session)
            location = getattr(session.virtualenv, "location", None)
            if DISCARD_VENVS and location:
                session.log(f"REGULARIZERS_DISCARD_VENVS=1: deleting {location}")
                shutil.rmtree(location, ignore_errors=True)

        return nox.session(*args, **kwargs)(run)

    return decorate


SESSION_ENV: dict[str, dict[str, str]] = {
    "jax": {"REGULARIZERS_MAX_EXAMPLES": "3", "REGULARIZERS_PROPERTY_EXAMPLES": "2"},
    "dask": {"REGULARIZERS_MAX_EXAMPLES": "10"},
}
# The two slowest sessions (JAX compiling, Dask building graphs: 16 and 8 of CI's 39 minutes,
# single-threaded Python either way) run their tests in up to 4 worker processes
# (pytest-xdist); on this 2-core machine, JAX's took 8 minutes instead of ~15 and Dask's 3.
WORKERS = min(4, os.cpu_count() or 1)
SESSION_ARGS: dict[str, list[str]] = {
    name: ["-n", str(WORKERS)] if WORKERS > 1 else [] for name in ("jax", "dask")
}


def _tests(backend: str, extra: list[str]) -> None:
    @session(name=f"tests-{backend}")
    def tests(session: nox.Session) -> None:
        if backend == "numpy":
            # First prove the promise of a bare install: array-api-compat and numpy only.
            session.install(".", "numpy")
            session.run("python", "spec_tests/check_minimal_install.py")
        session.install(".", *TEST_DEPS, *extra)
        session.run(
            "pytest",
            "spec_tests",
            "--backend",
            backend,
            *SESSION_ARGS.get(backend, []),
            *session.posargs,
            env=SESSION_ENV.get(backend, {}),
        )


for _name, _extra in BACKENDS.items():
    _tests(_name, _extra)


@session(name="tests-tinker")
def tests_tinker(session: nox.Session) -> None:
    """The Pipeline as a Tinker custom loss, checked with the tinker SDK's own code."""
    session.install(".", *TEST_DEPS, "tinker", TORCH)
    session.run(
        "pytest", "spec_tests/test_tinker.py", "--tinker", "--backend", "torch", *session.posargs
    )


@session(name="tests-triton")
def tests_triton(session: nox.Session) -> None:
    """The Triton kernels of Entropy, KL and JSD (a GPU's default) on the CPU, under
    Triton's interpreter: the class-axis kernels' properties, which then draw them, and
    their own tests; and each compiled for sm_80 and sm_90 (in a process without the
    interpreter)."""
    session.install(".", *TEST_DEPS, TORCH, TRITON)
    session.run(
        "pytest",
        "spec_tests/test_fused_grad.py",
        "spec_tests/test_kl.py",
        *("--backend", "torch", "-k", "triton or class_axis"),
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )


@session(name="tests-docs")
def tests_docs(session: nox.Session) -> None:
    """Every Python code block of README.md and docs/ runs, page by page."""
    session.install(".", *TEST_DEPS, TORCH, "jax", "array-api-strict", "dask[array]", "matplotlib")
    session.run("pytest", "spec_tests/test_docs.py", "--docs", *session.posargs)


@session(name="tests-keras")
def tests_keras(session: nox.Session) -> None:
    """rg.Orthogonality against Keras 3's own OrthogonalRegularizer (torch backend)."""
    session.install(".", *TEST_DEPS, "keras", TORCH)
    session.run(
        "pytest",
        "spec_tests/test_keras_agreement.py",
        "--keras",
        "--backend",
        "torch",
        *session.posargs,
        env={"KERAS_BACKEND": "torch"},
    )


@session()
def distributed(session: nox.Session) -> None:
    """Scaling out (SPEC 11, spec_tests/distributed): a Dask LocalCluster of worker processes
    (a 1 GiB dump included), JAX on 8 forced CPU devices, torch.distributed with 2 gloo ranks,
    all on 127.0.0.1. Each test is bounded in time and fails if it leaves a process running.
    """
    session.install(".", *TEST_DEPS, "dask[array,distributed]", "jax", TORCH)
    session.run(
        "pytest",
        "spec_tests/distributed",
        "--distributed",
        *("--backend", "dask", "--backend", "jax", "--backend", "torch"),
        *session.posargs,
    )


@session()
def lint(session: nox.Session) -> None:
    """ruff (lint and format) on everything; mypy --strict on the package.

    The backend modules import torch, jax and dask lazily: mypy checks them against the real
    ones (without dask, ``to_floats``'s ``import dask`` fails mypy).
    """
    session.install(".", *LINT_DEPS, TORCH, "jax", "dask[array]")
    session.run("ruff", "check", ".")
    session.run(
        "ruff",
        "format",
        "--check",
        "src",
        "spec_tests",
        "benchmarks",
        "examples",
        "docs/plots",
        "docs/_tooling",
    )
    session.run("mypy")


@session()
def docs(session: nox.Session) -> None:
    """The docs site, built with ``--strict``: every figure drawn, every page and API entry.

    ``docs/plots`` runs each plot script (PNGs into ``docs/img/``, not committed); then
    mkdocs builds into ``site/`` (``nox -s docs -- serve`` serves it locally instead).
    """
    session.install(".", "numpy", "matplotlib", "mkdocs-material", "mkdocstrings[python]", "ruff")
    session.run("python", "docs/plots", env={"MPLBACKEND": "Agg"})
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env={"NO_MKDOCS_2_WARNING": "1"})
        return
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


@session()
def example(session: nox.Session) -> None:
    """The training example: a character-level model trained in PyTorch and JAX, then
    fine-tuned RL-style from a frozen reference; writes its curves to examples/output/."""
    session.install(".[numpy,torch,jax]", "tqdm", "matplotlib")
    session.run("python", "examples/train_charlm.py", *session.posargs, env={"MPLBACKEND": "Agg"})


@session()
def bench(session: nox.Session) -> None:
    """The benchmark suite (not in the default run: CI time is for tests): value+metrics, the
    training path of every built-in, the per-call overhead, the compiled Pipeline and the
    family's cases, each against hand-written code in the same run; one table with every goal,
    written to benchmarks/results/latest.json, docs/benchmarks.md and the README.
    ``nox -s bench -- --smoke`` runs every case once at tiny sizes (about a minute)."""
    session.install(".", "numpy", TORCH, "jax", "keras", "matplotlib")
    session.run("python", "benchmarks/run.py", *session.posargs)


@session()
def demo(session: nox.Session) -> None:
    """The main job: the shipped sample logprobs through every regularizer on every backend."""
    session.install(".[numpy,torch,jax,dask]")
    session.run("python", "examples/demo.py", *session.posargs)
