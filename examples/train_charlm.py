"""A character-level model trained with regularizers' penalties, in PyTorch and in JAX.

Run it with ``nox -s example`` (or ``python examples/train_charlm.py`` where torch, jax,
tqdm and matplotlib are installed); ``--quick`` runs a few steps of everything.

1. **Pretraining.** A small MLP reads the last 16 characters of ``examples/data/poems.txt``
   (public-domain poems) and predicts the next one. The loss is a ``Pipeline``: the
   negative log-likelihood as its base loss and ``rg.L2(center="mean")`` on the logprobs of
   the target characters, which penalizes their spread (no token learned far worse than the
   rest). Trained in PyTorch, and again in JAX under ``jax.jit``.
2. **RL fine-tuning from a frozen reference.** The pretrained model becomes the reference; a
   copy, the policy, samples 32-character continuations and is rewarded for the share of the
   letter "e" in them: easy to hack, so the policy drifts toward "eeee...". The loss is a
   ``Pipeline`` whose base loss is the policy gradient (REINFORCE) and whose terms are
   ``rg.SampledKL(reference=rg.Field("ref_logprobs"))``, weighted by an
   ``rg.AdaptiveKLController`` that steers the KL to a target, and ``rg.SampledEntropy()``,
   an entropy bonus. The same code runs on torch tensors and on JAX arrays under ``jit``.
3. **What the penalties did, measured.** The RL run is repeated without the KL term and
   without the entropy bonus (call-time weights of 0: nothing is rebuilt or retraced); the
   KL to the reference and the entropy are measured exactly, from the full next-character
   distributions at the sampled positions (not from the penalties' own estimates).

It prints a progress bar with per-step metrics, then a table of the measured effects, and
writes ``loss.png``, ``penalty.png``, ``kl.png``, ``entropy.png``, ``curves.png`` (all four)
and ``metrics.json`` (every step's metrics) into ``--out`` (default ``examples/output/``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace
from tqdm import tqdm

import regularizers as rg

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "data" / "poems.txt"


@dataclass(frozen=True)
class Config:
    context: int = 16  # characters the model reads
    embed: int = 16
    hidden: int = 192
    pretrain_steps: int = 600
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    spread_weight: float = 0.05  # weight of rg.L2(center="mean") in pretraining
    rl_steps: int = 120
    rl_batch: int = 64  # sequences per step
    rl_length: int = 32  # characters sampled per sequence
    rl_lr: float = 1e-3
    kl_init: float = 0.05  # rg.AdaptiveKLController(init=, target=, horizon=)
    kl_target: float = 6.0  # nats per sequence of 32 characters (Ziegler et al.'s default)
    kl_horizon: float = 640.0
    entropy_weight: float = 0.01
    eval_batch: int = 256
    seed: int = 0


# The runs of the RL stage: which penalties are on (a weight of 0 switches one off).
RUNS = {
    "KL + entropy": (True, True),
    "no KL term": (False, True),
    "no entropy bonus": (True, False),
    "neither": (False, False),
}


# --------------------------------------------------------------------------------------
# Data and the losses, written once for both frameworks
# --------------------------------------------------------------------------------------


def load_corpus() -> tuple[np.ndarray, list[str]]:
    text = CORPUS.read_text().lower()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.array([index[c] for c in text], dtype=np.int64), chars


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (context, next character) pair of the corpus."""
    n = len(tokens) - context
    idx = np.arange(context)[None, :] + np.arange(n)[:, None]
    return tokens[idx], tokens[context:]


def nll(data: Any, logprobs: Any) -> Any:
    """The base loss of pretraining: mean negative log-likelihood of the targets."""
    xp = array_namespace(logprobs)
    return -xp.mean(logprobs)


def policy_gradient(data: Any, logprobs: Any) -> Any:
    """REINFORCE: -mean over sequences of advantage x the sequence's log-likelihood.

    ``logprobs`` is ``[sequences, characters]``; ``data["advantages"]`` one per sequence.
    """
    xp = array_namespace(logprobs)
    return -xp.mean(xp.sum(logprobs, axis=1) * data["advantages"])


def pretrain_pipeline(cfg: Config, metrics: str) -> rg.Pipeline:
    return rg.Pipeline(
        [(rg.L2(center="mean", reduce="mean"), cfg.spread_weight)],
        base_loss=nll,
        metrics=metrics,  # type: ignore[arg-type]
    )


def rl_pipeline(cfg: Config, metrics: str) -> rg.Pipeline:
    # Per sequence: the KL summed over its characters (the KL of Ziegler et al.'s controller),
    # then the mean over sequences; "unbiased" makes the expected gradient that of
    # KL(policy || reference) (the default k3 gradient is that of the forward KL).
    kl = rg.SampledKL(
        reference=rg.Field("ref_logprobs"),
        estimator="k3",
        gradient="unbiased",
        reduce="seq-mean-token-sum",
    )
    entropy = rg.SampledEntropy(reduce="seq-mean-token-sum")  # minimizing it raises entropy
    return rg.Pipeline(
        [(kl, cfg.kl_init), (entropy, cfg.entropy_weight)],
        base_loss=policy_gradient,
        metrics=metrics,  # type: ignore[arg-type]
    )


def reward(tokens: np.ndarray, e: int) -> np.ndarray:
    """The share of the letter "e" in each sampled continuation."""
    return (tokens == e).mean(axis=1)


def exact_kl_entropy(policy_lp: np.ndarray, ref_lp: np.ndarray) -> tuple[float, float]:
    """KL(policy || reference) and the policy's entropy, in nats per character, from the
    full next-character distributions ``[..., V]`` at the sampled positions."""
    p = np.exp(policy_lp)
    return float(np.mean(np.sum(p * (policy_lp - ref_lp), -1))), float(
        np.mean(-np.sum(p * policy_lp, -1))
    )


def decode(tokens: np.ndarray, chars: list[str]) -> str:
    return "".join(chars[int(t)] for t in tokens).replace("\n", "/")


# --------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------


class TorchBackend:
    name = "PyTorch"

    def __init__(self, cfg: Config, vocab: int) -> None:
        import torch

        self.torch, self.cfg, self.vocab = torch, cfg, vocab
        torch.set_num_threads(1)  # a tiny model: one thread is the fastest on a small CPU
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def model(self) -> Any:
        torch, cfg = self.torch, self.cfg
        return torch.nn.Sequential(
            torch.nn.Embedding(self.vocab, cfg.embed),
            torch.nn.Flatten(-2),
            torch.nn.Linear(cfg.context * cfg.embed, cfg.hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(cfg.hidden, self.vocab),
        )

    def pretrain(self, x: np.ndarray, y: np.ndarray, cfg: Config, bar: Any) -> tuple:
        torch = self.torch
        pipe = pretrain_pipeline(cfg, "float")
        model = self.model()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
        xs, ys = torch.as_tensor(x), torch.as_tensor(y)
        rng = np.random.default_rng(cfg.seed)
        curve = []
        for _ in range(cfg.pretrain_steps):
            i = torch.as_tensor(rng.integers(0, len(x), cfg.pretrain_batch))
            logprobs = torch.log_softmax(model(xs[i]), -1)
            target_lp = logprobs.gather(-1, ys[i][:, None])[:, 0]
            loss, metrics = pipe(None, target_lp)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(metrics)
            bar.update()
            bar.set_postfix(nll=f"{metrics['base_loss']:.3f}")
        return model, curve

    def rl(self, reference: Any, prompts: np.ndarray, e: int, run: tuple[bool, bool], bar: Any):
        torch, cfg = self.torch, self.cfg
        policy = self.model()
        policy.load_state_dict(reference.state_dict())
        reference.requires_grad_(False)
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.rl_lr)
        pipe = rl_pipeline(cfg, "float")
        ctl = rg.AdaptiveKLController(
            init=cfg.kl_init, target=cfg.kl_target, horizon=cfg.kl_horizon
        )
        use_kl, use_entropy = run
        rng = np.random.default_rng(cfg.seed + 1)
        history = []
        for _ in range(cfg.rl_steps):
            start = torch.as_tensor(prompts[rng.integers(0, len(prompts), cfg.rl_batch)])
            tokens = self.sample(policy, start)
            r = reward(tokens[:, cfg.context :].numpy(), e)
            lp_all = torch.log_softmax(policy(self.contexts(tokens)), -1)  # [B, T, V]
            target = tokens[:, cfg.context :, None]
            logprobs = lp_all.gather(-1, target)[..., 0]  # [B, T]: the sampled characters
            with torch.no_grad():
                ref_all = torch.log_softmax(reference(self.contexts(tokens)), -1)
            data = {
                "ref_logprobs": ref_all.gather(-1, target)[..., 0],
                "advantages": torch.as_tensor(r - r.mean(), dtype=torch.float32),
            }
            weights = {
                "sampled_kl": ctl.value if use_kl else 0.0,
                "sampled_entropy": cfg.entropy_weight if use_entropy else 0.0,
            }
            loss, metrics = pipe(data, logprobs, weights=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if use_kl:  # the KL estimate of this batch, per sequence, steers the weight
                ctl.update(metrics["sampled_kl/value"], n_steps=cfg.rl_batch)
            kl, entropy = exact_kl_entropy(lp_all.detach().numpy(), ref_all.numpy())
            history.append({**metrics, "reward": float(r.mean()), "kl": kl, "entropy": entropy})
            bar.update()
            bar.set_postfix(
                reward=f"{r.mean():.2f}",
                kl=f"{kl:.3f}",
                H=f"{entropy:.2f}",
                w_kl=f"{ctl.value:.3f}",
            )
        return policy, history

    def contexts(self, tokens: Any) -> Any:
        """``[B, K + T]`` tokens -> ``[B, T, K]``: the context of each sampled character."""
        return tokens.unfold(1, self.cfg.context, 1)[:, : tokens.shape[1] - self.cfg.context]

    def sample(self, model: Any, start: Any, length: int | None = None) -> Any:
        torch = self.torch
        tokens = start
        with torch.no_grad():
            for _ in range(length or self.cfg.rl_length):
                probs = torch.softmax(model(tokens[:, -self.cfg.context :]), -1)
                nxt = torch.multinomial(probs, 1, generator=self.generator)
                tokens = torch.cat([tokens, nxt], 1)
        return tokens

    def evaluate(self, policy: Any, reference: Any, prompts: np.ndarray, e: int) -> dict:
        torch, cfg = self.torch, self.cfg
        rng = np.random.default_rng(cfg.seed + 2)
        start = torch.as_tensor(prompts[rng.integers(0, len(prompts), cfg.eval_batch)])
        tokens = self.sample(policy, start)
        with torch.no_grad():
            p = torch.log_softmax(policy(self.contexts(tokens)), -1).numpy()
            q = torch.log_softmax(reference(self.contexts(tokens)), -1).numpy()
        kl, entropy = exact_kl_entropy(p, q)
        r = float(reward(tokens[:, cfg.context :].numpy(), e).mean())
        return {"reward": r, "kl": kl, "entropy": entropy, "text": tokens[0].numpy()}

    def target_logprobs(self, model: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(x)), -1)
            return lp.gather(-1, torch.as_tensor(y)[:, None])[:, 0].numpy()


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------


class JaxBackend:
    name = "JAX"

    def __init__(self, cfg: Config, vocab: int) -> None:
        # one thread, as for torch (read when jax starts, so before the import)
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.cfg, self.vocab = jax, jnp, cfg, vocab
        self.key = jax.random.key(cfg.seed)
        self._build()

    def _next_key(self) -> Any:
        self.key, key = self.jax.random.split(self.key)
        return key

    def init(self) -> dict:
        jax, jnp, cfg = self.jax, self.jnp, self.cfg
        k = jax.random.split(self._next_key(), 3)
        fan_in = cfg.context * cfg.embed

        def uniform(key: Any, shape: tuple, fan: int) -> Any:
            bound = 1.0 / np.sqrt(fan)
            return jax.random.uniform(key, shape, minval=-bound, maxval=bound)

        return {
            "emb": jax.random.normal(k[0], (self.vocab, cfg.embed)),
            "w1": uniform(k[1], (fan_in, cfg.hidden), fan_in),
            "b1": jnp.zeros(cfg.hidden),
            "w2": uniform(k[2], (cfg.hidden, self.vocab), cfg.hidden),
            "b2": jnp.zeros(self.vocab),
        }

    def _build(self) -> None:
        """The jitted functions; the Pipelines are closed over (hashable, static)."""
        jax, jnp, cfg = self.jax, self.jnp, self.cfg
        pretrain_pipe = pretrain_pipeline(cfg, "array")
        rl_pipe = rl_pipeline(cfg, "array")

        def logits(params: dict, ctx: Any) -> Any:
            h = params["emb"][ctx].reshape(*ctx.shape[:-1], -1)
            return jnp.tanh(h @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

        def contexts(tokens: Any) -> Any:
            t = tokens.shape[1] - cfg.context
            idx = jnp.arange(t)[:, None] + jnp.arange(cfg.context)[None, :]
            return tokens[:, idx]  # [B, T, K]

        def adam(params: dict, grads: dict, state: dict, lr: float) -> tuple[dict, dict]:
            b1, b2, eps = 0.9, 0.999, 1e-8
            step = state["step"] + 1
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
            scale = lr * jnp.sqrt(1 - b2**step) / (1 - b1**step)
            params = jax.tree.map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps), params, m, v)
            return params, {"step": step, "m": m, "v": v}

        @jax.jit
        def pretrain_step(params: dict, state: dict, x: Any, y: Any, weight: Any) -> tuple:
            def loss_fn(params: dict) -> tuple:
                lp = jax.nn.log_softmax(logits(params, x))
                target_lp = jnp.take_along_axis(lp, y[:, None], -1)[:, 0]
                return pretrain_pipe(None, target_lp, weights={"l2_weight_decay": weight})

            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params, state = adam(params, grads, state, cfg.pretrain_lr)
            return params, state, metrics

        @jax.jit
        def sample(params: dict, key: Any, start: Any) -> Any:
            def step(tokens: Any, key: Any) -> tuple:
                z = logits(params, tokens[:, -cfg.context :])
                nxt = jax.random.categorical(key, z)
                return jnp.concatenate([tokens[:, 1:], nxt[:, None]], 1), nxt

            keys = jax.random.split(key, cfg.rl_length)
            _, new = jax.lax.scan(step, start, keys)
            return jnp.concatenate([start, new.T], 1)

        @jax.jit
        def rl_step(params, ref, state, tokens, advantages, weights) -> tuple:  # type: ignore[no-untyped-def]
            ctx, target = contexts(tokens), tokens[:, cfg.context :, None]
            ref_all = jax.nn.log_softmax(logits(ref, ctx))
            data = {
                "ref_logprobs": jnp.take_along_axis(ref_all, target, -1)[..., 0],
                "advantages": advantages,
            }

            def loss_fn(params: dict) -> tuple:
                lp_all = jax.nn.log_softmax(logits(params, ctx))
                logprobs = jnp.take_along_axis(lp_all, target, -1)[..., 0]
                # weights are 0-d arrays: a new KL coefficient at every step, one compilation
                loss, metrics = rl_pipe(data, logprobs, weights=weights)
                return loss, (metrics, lp_all)

            (_, (metrics, lp_all)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params, state = adam(params, grads, state, cfg.rl_lr)
            return params, state, metrics, lp_all, ref_all

        @jax.jit
        def distributions(params: dict, ref: dict, tokens: Any) -> tuple:
            ctx = contexts(tokens)
            return jax.nn.log_softmax(logits(params, ctx)), jax.nn.log_softmax(logits(ref, ctx))

        self.pretrain_step, self.sample_fn, self.rl_step = pretrain_step, sample, rl_step
        self.distributions, self.logits = distributions, jax.jit(logits)

    def adam_state(self, params: dict) -> dict:
        zeros = self.jax.tree.map(self.jnp.zeros_like, params)
        return {"step": self.jnp.asarray(0.0), "m": zeros, "v": zeros}

    def pretrain(self, x: np.ndarray, y: np.ndarray, cfg: Config, bar: Any) -> tuple:
        jnp = self.jnp
        params = self.init()
        state = self.adam_state(params)
        rng = np.random.default_rng(cfg.seed)
        curve = []
        for _ in range(cfg.pretrain_steps):
            i = rng.integers(0, len(x), cfg.pretrain_batch)
            params, state, metrics = self.pretrain_step(
                params, state, jnp.asarray(x[i]), jnp.asarray(y[i]), jnp.asarray(cfg.spread_weight)
            )
            curve.append(rg.to_floats(metrics))
            bar.update()
            bar.set_postfix(nll=f"{curve[-1]['base_loss']:.3f}")
        return params, curve

    def rl(self, reference: Any, prompts: np.ndarray, e: int, run: tuple[bool, bool], bar: Any):
        cfg, jnp = self.cfg, self.jnp
        params = reference
        state = self.adam_state(params)
        ctl = rg.AdaptiveKLController(
            init=cfg.kl_init, target=cfg.kl_target, horizon=cfg.kl_horizon
        )
        use_kl, use_entropy = run
        rng = np.random.default_rng(cfg.seed + 1)
        history = []
        for _ in range(cfg.rl_steps):
            start = jnp.asarray(prompts[rng.integers(0, len(prompts), cfg.rl_batch)])
            tokens = self.sample_fn(params, self._next_key(), start)
            r = reward(np.asarray(tokens[:, cfg.context :]), e)
            weights = {
                "sampled_kl": jnp.asarray(ctl.value if use_kl else 0.0),
                "sampled_entropy": jnp.asarray(cfg.entropy_weight if use_entropy else 0.0),
            }
            adv = jnp.asarray(r - r.mean(), dtype=jnp.float32)
            params, state, metrics, lp_all, ref_all = self.rl_step(
                params, reference, state, tokens, adv, weights
            )
            metrics = rg.to_floats(metrics)
            if use_kl:
                ctl.update(metrics["sampled_kl/value"], n_steps=cfg.rl_batch)
            kl, entropy = exact_kl_entropy(np.asarray(lp_all), np.asarray(ref_all))
            history.append({**metrics, "reward": float(r.mean()), "kl": kl, "entropy": entropy})
            bar.update()
            bar.set_postfix(
                reward=f"{r.mean():.2f}",
                kl=f"{kl:.3f}",
                H=f"{entropy:.2f}",
                w_kl=f"{ctl.value:.3f}",
            )
        return params, history

    def evaluate(self, policy: Any, reference: Any, prompts: np.ndarray, e: int) -> dict:
        cfg, jnp = self.cfg, self.jnp
        rng = np.random.default_rng(cfg.seed + 2)
        start = jnp.asarray(prompts[rng.integers(0, len(prompts), cfg.eval_batch)])
        tokens = self.sample_fn(policy, self.jax.random.key(cfg.seed + 2), start)
        p, q = self.distributions(policy, reference, tokens)
        kl, entropy = exact_kl_entropy(np.asarray(p), np.asarray(q))
        r = float(reward(np.asarray(tokens[:, cfg.context :]), e).mean())
        return {"reward": r, "kl": kl, "entropy": entropy, "text": np.asarray(tokens[0])}

    def target_logprobs(self, params: Any, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        lp = np.asarray(self.jax.nn.log_softmax(self.logits(params, self.jnp.asarray(x))))
        return np.take_along_axis(lp, y[:, None], -1)[:, 0]


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------


def run(backend: Any, cfg: Config, data: dict, results: dict) -> None:
    x, y, prompts, e = data["x"], data["y"], data["prompts"], data["e"]
    name = backend.name
    pretrain_runs = {"with the L2 term": cfg}
    if name == "PyTorch":  # one ablation of the pretraining penalty is enough to see it
        pretrain_runs["without"] = replace(cfg, spread_weight=0.0)
    out: dict[str, Any] = {"pretrain": {}, "pretrain_curve": {}, "rl": {}, "eval": {}}
    reference = None
    for label, c in pretrain_runs.items():
        with tqdm(
            total=c.pretrain_steps, desc=f"{name} pretrain ({label})", leave=True, mininterval=0.5
        ) as bar:
            model, out["pretrain_curve"][label] = backend.pretrain(x, y, c, bar)
        lp = backend.target_logprobs(model, x, y)
        out["pretrain"][label] = {
            "nll_bits_per_char": float(-lp.mean() / np.log(2)),
            "logprob_std": float(lp.std()),
            "worst_logprob_p01": float(np.quantile(lp, 0.01)),
        }
        reference = reference if reference is not None else model
    for label, switches in RUNS.items():
        with tqdm(
            total=cfg.rl_steps, desc=f"{name} RL ({label})", leave=True, mininterval=0.5
        ) as bar:
            policy, history = backend.rl(reference, prompts, e, switches, bar)
        out["rl"][label] = history
        out["eval"][label] = backend.evaluate(policy, reference, prompts, e)
    out["eval"]["reference"] = backend.evaluate(reference, reference, prompts, e)
    results[name] = out


def report(results: dict, chars: list[str], cfg: Config) -> str:
    lines = []
    for name, out in results.items():
        lines.append(f"\n{name}: pretraining ({cfg.pretrain_steps} steps), on the whole corpus")
        lines.append(f"  {'':<20}{'NLL bits/char':>14}{'logprob std':>13}{'1% worst logprob':>18}")
        for label, m in out["pretrain"].items():
            lines.append(
                f"  {label:<20}{m['nll_bits_per_char']:>14.3f}{m['logprob_std']:>13.3f}"
                f"{m['worst_logprob_p01']:>18.3f}"
            )
        lines.append(
            f"{name}: RL fine-tuning ({cfg.rl_steps} steps), measured on {cfg.eval_batch} fresh "
            "samples; KL(policy || reference) and entropy exact, in nats per character"
        )
        lines.append(f"  {'':<20}{'reward':>8}{'KL':>8}{'entropy':>9}   sample")
        for label, m in out["eval"].items():
            text = decode(m["text"][cfg.context :], chars)[:32]
            lines.append(
                f"  {label:<20}{m['reward']:>8.3f}{m['kl']:>8.3f}{m['entropy']:>9.3f}   {text!r}"
            )
        ev = out["eval"]
        with_kl, without_kl = ev["KL + entropy"]["kl"], ev["no KL term"]["kl"]
        with_h, without_h = ev["KL + entropy"]["entropy"], ev["no entropy bonus"]["entropy"]
        lines.append(
            f"  the KL term:       KL to the reference {without_kl:.3f} -> {with_kl:.3f} nats/char "
            f"({_ratio(with_kl, without_kl)})"
        )
        lines.append(
            f"  the entropy bonus: entropy {without_h:.3f} -> {with_h:.3f} nats/char "
            f"({_ratio(with_h, without_h)})"
        )
        pre = out["pretrain"]
        if "without" in pre:
            a, b = pre["without"]["logprob_std"], pre["with the L2 term"]["logprob_std"]
            lines.append(
                f"  the L2 term (pretraining): spread of target logprobs {a:.3f} -> {b:.3f} "
                f"({_ratio(b, a)})"
            )
    return "\n".join(lines)


def _ratio(new: float, old: float) -> str:
    return f"{(new / old - 1) * 100:+.0f}%" if old else "n/a"


def plot(results: dict, out: Path) -> list[Path]:
    """One PNG per panel, and ``curves.png`` with all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "KL + entropy": "#3949ab",
        "no KL term": "#d81b60",
        "no entropy bonus": "#00897b",
        "neither": "#9e9e9e",
    }
    styles = {"PyTorch": "-", "JAX": "--"}

    def smooth(v: list[float], k: int = 9) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        return np.convolve(
            np.pad(a, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, "valid"
        )

    def finish(ax: Any, title: str, xlabel: str = "RL step") -> None:
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    def runs(ax: Any, key: str, labels: list[str]) -> None:
        for name, res in results.items():
            for label in labels:
                values = smooth([m[key] for m in res["rl"][label]])
                ax.plot(
                    values, styles[name], color=colors[label], lw=1.6, label=f"{label} ({name})"
                )

    def loss(ax: Any) -> None:
        for name, res in results.items():
            curve = res["pretrain_curve"]["with the L2 term"]
            ax.plot(
                smooth([m["loss_total"] for m in curve]),
                styles[name],
                color="#3949ab",
                label=f"loss_total ({name})",
            )
            ax.plot(
                smooth([m["base_loss"] for m in curve]),
                styles[name],
                color="#9e9e9e",
                label=f"base loss: NLL ({name})",
            )
        finish(ax, "pretraining loss (nats/char)", "pretraining step")

    def reward(ax: Any) -> None:
        runs(ax, "reward", list(RUNS))
        finish(ax, "RL: reward (share of 'e' in the samples)")

    def penalty(ax: Any) -> None:
        for name, res in results.items():
            h = res["rl"]["KL + entropy"]
            ax.plot(
                smooth([m["sampled_kl/contribution"] for m in h]),
                styles[name],
                color="#3949ab",
                label=f"KL term: weight x KL ({name})",
            )
            ax.plot(
                smooth([m["sampled_entropy/contribution"] for m in h]),
                styles[name],
                color="#00897b",
                label=f"entropy term ({name})",
            )
        twin = ax.twinx()
        for name, res in results.items():
            weights = [m["sampled_kl/weight"] for m in res["rl"]["KL + entropy"]]
            twin.plot(
                weights,
                styles[name],
                color="#fb8c00",
                lw=1,
                label=f"KL weight from AdaptiveKLController ({name})",
            )
        twin.set_ylabel("KL weight", color="#fb8c00")
        handles, labels = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(handles + more[0], labels + more[1], fontsize=7)
        ax.set_title("RL, KL + entropy: the penalty terms in the loss", fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)

    def kl(ax: Any) -> None:
        runs(ax, "kl", ["KL + entropy", "no KL term"])
        finish(ax, "RL: KL(policy || reference), nats/char")

    def entropy(ax: Any) -> None:
        runs(ax, "entropy", ["KL + entropy", "no entropy bonus"])
        finish(ax, "RL: policy entropy, nats/char")

    def effects(ax: Any) -> None:
        labels = list(RUNS)
        width = 0.8 / (2 * len(results))
        for j, (name, res) in enumerate(results.items()):
            for k, key in enumerate(("kl", "entropy")):
                offset = (2 * j + k - len(results) + 0.5) * width
                values = [res["eval"][label][key] for label in labels]
                ax.bar(
                    np.arange(len(labels)) + offset,
                    values,
                    width,
                    color=["#3949ab", "#00897b"][k],
                    alpha=1.0 if j == 0 else 0.55,
                    label=f"{'KL' if key == 'kl' else 'entropy'} ({name})",
                )
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_title("after RL, on fresh samples (nats/char)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    panels = {
        "loss": loss,
        "reward": reward,
        "penalty": penalty,
        "kl": kl,
        "entropy": entropy,
        "effects": effects,
    }
    paths = []
    for name, draw in panels.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
        draw(ax)
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        paths.append(out / f"{name}.png")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, draw in zip(axes.flat, panels.values(), strict=True):
        draw(ax)
    frameworks = " and ".join(f"{n} ({'solid' if styles[n] == '-' else 'dashed'})" for n in results)
    fig.suptitle(
        "A character model pretrained, then fine-tuned from a frozen reference with a reward for "
        f"the letter 'e': {frameworks}",
        fontsize=12,
    )
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)
    paths.append(out / "curves.png")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "output")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything")
    parser.add_argument("--only", choices=["torch", "jax"], help="one framework")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="override a Config field"
    )
    args = parser.parse_args()
    cfg = Config()
    if args.quick:
        cfg = replace(cfg, pretrain_steps=20, rl_steps=6, eval_batch=32)
    for item in args.set:
        key, _, value = item.partition("=")
        cfg = replace(cfg, **{key: type(getattr(cfg, key))(value)})
    args.out.mkdir(parents=True, exist_ok=True)

    tokens, chars = load_corpus()
    x, y = windows(tokens, cfg.context)
    data = {"x": x, "y": y, "prompts": x, "e": chars.index("e"), "chars": chars}
    print(
        f"corpus: {len(tokens)} characters, {len(chars)} distinct; model: MLP over "
        f"{cfg.context} characters, hidden {cfg.hidden}"
    )

    start = time.perf_counter()
    results: dict[str, Any] = {}
    backends = {"torch": TorchBackend, "jax": JaxBackend}
    for key, backend in backends.items():
        if args.only in (None, key):
            run(backend(cfg, len(chars)), cfg, data, results)
    took = time.perf_counter() - start

    print(report(results, chars, cfg))
    paths = plot(results, args.out)
    serializable = {
        name: {
            "pretrain": out["pretrain"],
            "rl": out["rl"],
            "eval": {
                k: {m: v for m, v in e.items() if m != "text"} for k, e in out["eval"].items()
            },
        }
        for name, out in results.items()
    }
    (args.out / "metrics.json").write_text(json.dumps(serializable, indent=1))
    print(
        f"\ntrained in {took:.0f}s; wrote {', '.join(p.name for p in paths)} and metrics.json "
        f"to {args.out}"
    )


if __name__ == "__main__":
    main()
