"""Tinker, tested with the SDK's own code and no network (nox -s tests-tinker).

(a) ``TrainingClient._compute_custom_loss`` (the client-side step of
    ``forward_backward_custom``) with a Pipeline, real ``Datum`` and ``ForwardBackwardOutput``;
(b) ``regularizers.integrations.tinker.custom_loss`` through the SDK's own ``trace_loss`` (what
    ``ServiceClient.create_custom_loss`` runs before uploading) and ``run_loss_handle``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest
import torch
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss
from tinker.lib.public_interfaces.training_client import TrainingClient

import regularizers as rg
from regularizers.integrations.tinker import custom_loss

pytestmark = pytest.mark.backends("torch")
LENGTHS = (5, 9, 3, 12)


def batch(seed: int = 0) -> tuple[list[Any], Any, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    data, outputs, logprobs = [], [], []
    for n in LENGTHS:
        lp = (-rng.gamma(0.7, 2.0, size=n)).astype(np.float32)
        lp[0] = -150.0  # beyond the ADR's clip
        lp[-1] = 0.0  # a kink
        weights = (np.arange(n) >= n // 3).astype(np.float32)  # 0 on the "prompt"
        # the reference and sampling policies' logprobs of the same tokens (SampledKL/Entropy)
        ref = np.minimum(lp + rng.normal(0.0, 0.5, size=n), 0.0).astype(np.float32)
        behavior = np.minimum(lp + rng.normal(0.0, 0.2, size=n), 0.0).astype(np.float32)
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(list(range(1, n + 1))),
                loss_fn_inputs={
                    "target_tokens": list(range(2, n + 2)),
                    "weights": weights.tolist(),
                    # keys the SDK does not know take arrays (a list needs a known dtype)
                    "ref_logprobs": ref,
                    "behavior_logprobs": behavior,
                },
            )
        )
        outputs.append({"logprobs": types.TensorData(data=lp.tolist(), dtype="float32", shape=[n])})
        logprobs.append(lp)
    fwd = types.ForwardBackwardOutput(
        loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={}
    )
    return data, fwd, logprobs


SUM_PIPE = rg.Pipeline(
    [
        (rg.L1(mask=rg.Field("weights")), 0.1),
        (rg.L2(clip=(-100.0, 0.0), mask=rg.Field("weights")), 0.01),
        rg.Term(rg.L2(target="probs", center=0.5), 0.3, name="probs_l2"),
    ]
)
MEAN_PIPE = rg.Pipeline(
    [
        (rg.L1(reduce="mean", mask=("field", "weights")), 0.1),
        (rg.L2(center="mean", clip=(-100.0, 0.0)), 0.01),
    ]
)

# SPEC 8.3-8.4 on Tinker's shape: the reference (and behaviour) logprobs ride in each datum's
# loss_fn_inputs, the policy's sampled-token logprobs come from the forward pass.
KL_PIPE = rg.Pipeline(
    [
        (rg.SampledKL(reference=rg.Field("ref_logprobs")), 0.05),
        (rg.SampledEntropy(), 0.01),
        (rg.L1(), 0.1),
    ]
)
OFF_POLICY_PIPE = rg.Pipeline(
    [
        (
            rg.SampledKL(
                rg.Field("ref_logprobs"),
                estimator="k1",
                gradient="unbiased",
                behavior=rg.Field("behavior_logprobs"),
                log_ratio_clip=(-0.5, 0.5),
                mask=rg.Field("weights"),
            ),
            0.05,
        ),
        rg.Term(rg.SampledKL(rg.Field("ref_logprobs"), estimator="abs"), 0.02, name="kl_abs"),
        (
            rg.SampledEntropy(
                mode="minimize", behavior=rg.Field("behavior_logprobs"), mask=rg.Field("weights")
            ),
            0.01,
        ),
    ]
)
PIPES = {"sum": SUM_PIPE, "mean": MEAN_PIPE, "kl": KL_PIPE, "off_policy": OFF_POLICY_PIPE}


@pytest.mark.parametrize("pipe", list(PIPES.values()), ids=list(PIPES))
def test_compute_custom_loss_sends_minus_the_gradient(bk: Any, pipe: rg.Pipeline) -> None:
    data, fwd, logprobs = batch()
    result = TrainingClient._compute_custom_loss(data, pipe, fwd)
    # What the pipeline says on its own, on tensors that require grad as the SDK's do (so the
    # same code path, and the same float32 rounding), and the closed-form gradient of each term.
    loss, metrics = pipe(data, [torch.tensor(lp, requires_grad=True) for lp in logprobs])
    want = [np.zeros_like(lp) for lp in logprobs]
    for t in pipe.terms:
        _, _, g = t.regularizer.value_and_grad(data, [torch.tensor(lp) for lp in logprobs])
        want = [w + t.weight * gi.numpy() for w, gi in zip(want, g, strict=True)]
    assert len(result.data) == len(data)
    for datum, sent, w in zip(data, result.data, want, strict=True):
        weights = sent.loss_fn_inputs["weights"].to_numpy()
        np.testing.assert_allclose(weights, -w, rtol=1e-5, atol=1e-6)
        assert sent.loss_fn_inputs["target_tokens"] == datum.loss_fn_inputs["target_tokens"]
    assert result.metrics == metrics  # dict[str, float], the pipeline's own
    assert all(type(v) is float for v in result.metrics.values())
    assert result.loss_sum == pytest.approx(loss.detach().item(), rel=1e-6)


def test_custom_loss_is_accepted_by_the_sdks_tracing(bk: Any) -> None:
    fn, ranks = custom_loss(SUM_PIPE)
    assert ranks == {"logprobs": 1, "weights": 1}
    handle = trace_loss(fn, ranks, session_id="test-session")
    assert handle.input_names == ("weights",)
    _, _, logprobs = batch()
    _, metrics = fn(torch.tensor(logprobs[0]), torch.tensor([1.0] * LENGTHS[0]))
    assert set(metrics) == {
        "custom/l1_sparsity:sum",
        "custom/l2_weight_decay:sum",
        "custom/probs_l2:sum",
    }
    fn_mean, _ = custom_loss(MEAN_PIPE)
    _, metrics_mean = fn_mean(torch.tensor(logprobs[0]), torch.tensor([1.0] * LENGTHS[0]))
    # reduce decides the suffix; center="mean" alone keeps a sum (of per-datum centered terms)
    assert set(metrics_mean) == {"custom/l1_sparsity:mean", "custom/l2_weight_decay:sum"}


def test_sampled_penalties_are_accepted_by_the_sdks_tracing(bk: Any) -> None:
    fn, ranks = custom_loss(KL_PIPE)
    assert ranks == {"logprobs": 1, "ref_logprobs": 1}
    handle = trace_loss(fn, ranks, session_id="test-session")
    assert handle.input_names == ("ref_logprobs",)
    # what create_custom_loss uploads: k3 as expm1, the on-policy ratio through detach
    targets = {node.target for node in encode_graph(handle).nodes}
    assert {"torch.expm1", "detach"} <= targets, targets
    fn, ranks = custom_loss(OFF_POLICY_PIPE)
    handle = trace_loss(fn, ranks, session_id="test-session")
    assert handle.input_names == ("weights", "ref_logprobs", "behavior_logprobs")
    _, _, logprobs = batch()
    lp = torch.tensor(logprobs[0])
    _, metrics = handle.graph(lp, torch.ones_like(lp), lp - 0.1, lp)
    assert set(metrics) == {
        "custom/sampled_kl:sum",
        "custom/kl_abs:sum",
        "custom/sampled_entropy:sum",
    }


@pytest.mark.parametrize("name", ["sum", "kl", "off_policy"])
def test_run_loss_handle_matches_forward_backward_custom_for_sums(bk: Any, name: str) -> None:
    pipe = PIPES[name]
    data, fwd, logprobs = batch(seed=3)
    fn, ranks = custom_loss(pipe)
    handle = trace_loss(fn, ranks, session_id="test-session")
    leaves = [torch.tensor(lp, requires_grad=True) for lp in logprobs]
    loss, metrics = run_loss_handle(handle, data, leaves)
    a = TrainingClient._compute_custom_loss(data, pipe, fwd)
    assert loss.item() == pytest.approx(a.loss_sum, rel=1e-6)
    for t in pipe.terms:
        assert metrics[f"custom/{t.name}:sum"] == pytest.approx(
            a.metrics[f"{t.name}/value"], rel=1e-5
        )
    loss.backward()
    for leaf, sent in zip(leaves, a.data, strict=True):
        np.testing.assert_allclose(
            -leaf.grad.numpy(), sent.loss_fn_inputs["weights"].to_numpy(), rtol=1e-5, atol=1e-6
        )
    # The handle path of _compute_custom_loss itself agrees too.
    b = TrainingClient._compute_custom_loss(data, handle, fwd)
    assert b.loss_sum == pytest.approx(a.loss_sum, rel=1e-6)


def test_custom_loss_rejects_what_it_cannot_trace(bk: Any) -> None:
    with pytest.raises(ValueError, match="base_loss"):
        custom_loss(rg.Pipeline([(rg.L1(), 1.0)], base_loss=rg.L2()))
    with pytest.raises(ValueError, match="'L1-Big'"):
        custom_loss(rg.Pipeline([rg.Term(rg.L1(), 1.0, name="L1-Big")]))
    with pytest.raises(TypeError, match="'mine'"):
        custom_loss(rg.Pipeline([rg.Term(lambda d, lp: lp.sum(), 1.0, name="mine")]))
    with pytest.raises(ValueError, match="logprobs_rank"):
        custom_loss(SUM_PIPE, logprobs_rank=3)
    with pytest.raises(TypeError, match="reference given as Field"):
        custom_loss(rg.Pipeline([(rg.SampledKL([torch.zeros(3)]), 1.0)]))


def test_import_regularizers_does_not_import_tinker() -> None:
    import subprocess

    code = (
        "import sys, regularizers, regularizers.pipeline; "
        "assert 'tinker' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
