"""flow_sigmas against diffusers' own FlowMatchEulerDiscreteScheduler and pipeline shift functions."""

import numpy as np
import pytest
import torch

from flowbp_kernels import flow_sigmas, flux2_mu, flux_mu

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402


def _scheduler_sigmas(n, **cfg_and_mu):
    mu = cfg_and_mu.pop("mu", None)
    sch = FlowMatchEulerDiscreteScheduler(**cfg_and_mu)
    kwargs = {"mu": mu} if mu is not None else {}
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), **kwargs)
    return sch.sigmas.double()


@pytest.mark.parametrize("n", [1, 10, 25, 40])
def test_sd3_static_shift_matches_scheduler(n):
    ours = flow_sigmas(n, shift=3.0)
    ref = _scheduler_sigmas(n, shift=3.0)
    assert ours.shape == (n + 1,)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)  # the scheduler works in float32


@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("n", [25, 50])
def test_flux_dynamic_shift_matches_scheduler(seq_len, n):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = flux_mu(seq_len)
    assert mu == pytest.approx(calculate_shift(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)
    ref = _scheduler_sigmas(n, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, mu=mu)
    torch.testing.assert_close(flow_sigmas(n, mu=mu), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seq_len,n", [(1024, 25), (4096, 50), (8192, 28)])
def test_flux2_empirical_mu_matches_pipeline(seq_len, n):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    mu = flux2_mu(seq_len, n)
    assert mu == pytest.approx(compute_empirical_mu(seq_len, n), abs=1e-12)
    ref = _scheduler_sigmas(n, use_dynamic_shifting=True, mu=mu)
    torch.testing.assert_close(flow_sigmas(n, mu=mu), ref, atol=1e-6, rtol=0)


def test_reference_values_sd35_and_flux1():
    # REFERENCE.md section 1.2 lists these (computed from the formulas, 3 decimals)
    sd3 = flow_sigmas(25, shift=3.0)
    assert sd3[:4].tolist() == pytest.approx([1.0, 0.986, 0.972, 0.957], abs=6e-4)
    assert float(sd3[-2]) == pytest.approx(0.111, abs=6e-4)
    fl = flow_sigmas(25, mu=flux_mu(1024))
    assert fl[:3].tolist() == pytest.approx([1.0, 0.978, 0.956], abs=6e-4)
    assert float(fl[-2]) == pytest.approx(0.073, abs=6e-4)


def test_unshifted_and_errors():
    s = flow_sigmas(4)
    assert s.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert s.dtype == torch.float64
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="either shift or mu"):
        flow_sigmas(4, shift=3.0, mu=1.0)
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(4, shift=-1.0)
