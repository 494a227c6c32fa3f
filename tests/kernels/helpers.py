"""The three-way error check shared by the kernel tests (eager baselines: benchmarks/baselines.py)."""

import torch


def assert_within_torch_error(ours, ref, eager, *, name, factor=2.0, rel_atol=1e-5):
    """ours must be as close to the float64 ref as eager torch in the same dtype, up to
    `factor`, plus a floor: rel_atol * max|ref| (so fp32, where both are ~1e-7, passes), or for a
    low-precision output one rounding to its dtype at max|ref| (eps / 2: unavoidable whatever the
    algorithm, and a single draw can put eager just under it and us just over)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (unwritten output?)"
    err = (ours.double() - ref).abs().max().item()
    torch_err = (eager.double() - ref).abs().max().item()
    rounding = torch.finfo(ours.dtype).eps / 2 if ours.is_floating_point() else 0.0
    floor = max(rel_atol, rounding) * max(1.0, ref.abs().max().item())
    assert err <= factor * torch_err + floor, (
        f"{name}: max error {err:.3g} vs eager torch's {torch_err:.3g} (floor {floor:.3g})")
