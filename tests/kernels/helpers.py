"""The three-way error check shared by the kernel tests (eager baselines: benchmarks/baselines.py)."""

import torch


def assert_within_torch_error(ours, ref, eager, *, name, factor=2.0, rel_atol=1e-5):
    """ours must be as close to the float64 ref as eager torch in the same dtype, up to
    `factor`, plus a floor of rel_atol * max|ref| (so fp32, where both are ~1e-7, passes)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
    err = (ours.double() - ref).abs().max().item()
    torch_err = (eager.double() - ref).abs().max().item()
    floor = rel_atol * max(1.0, ref.abs().max().item())
    assert err <= factor * torch_err + floor, (
        f"{name}: max error {err:.3g} vs eager torch's {torch_err:.3g} (floor {floor:.3g})")
