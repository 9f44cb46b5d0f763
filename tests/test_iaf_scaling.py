"""The autoregressive guides' defaults hold from a few latents to thousands (issue #17, item 10).

The MADE of ``AutoIAFFlow`` and ``AutoSplineFlow`` used to be ``2 D`` wide with plain masked
layers: :math:`O(D^2)` parameters, and under ``fit``'s Adam (``lr=0.01``) every step moved each
output by :math:`O(\\mathrm{lr} \\cdot 2D)`, so fits diverged from a few hundred latents up. The
measured table is ``benchmarks/results/iaf_scaling.md`` (``benchmarks/iaf_scaling.py``).
"""

import os
import re
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from device_params import DEVICES

import pyro_nf
from pyro_nf.transforms import MADE
from pyro_nf.transforms.autoregressive import default_hidden_size, made_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _normals(dim, seed=0):
    """Independent Normal posteriors with scales from 0.1 to 1 (the benchmark's model)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = torch.logspace(-1, 1, dim)
    y = torch.randn(dim, generator=gen) * (1 + sigma**2).sqrt()

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(dim), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, sigma).to_event(1), obs=y)

    return model


def test_default_made_width_is_capped_at_128():
    assert [default_hidden_size(d) for d in (1, 8, 10, 64, 65, 5000, 10000)] == [
        16, 16, 20, 128, 128, 128, 128,
    ]  # fmt: skip
    assert made_layout(10000, None, None)[0] == (128,)


def test_autoiafflow_parameters_grow_linearly_with_D():
    """About K layers x 3 x 128 x D parameters, not K x 6 x D^2 (18 million at D = 1000)."""
    guide = pyro_nf.AutoIAFFlow(_normals(1000)).setup()
    layers = len(guide.flow.layers)
    count = sum(p.numel() for p in guide.parameters())
    assert count < layers * (3 * 128 + 3) * 1000 + 2000


@pytest.mark.parametrize("dim", [300, 1000])
@pytest.mark.parametrize("guide_class", [pyro_nf.AutoIAFFlow, pyro_nf.AutoSplineFlow])
def test_default_fit_with_default_lr_does_not_diverge_at_large_D(guide_class, dim):
    """40 steps of ``fit`` with every default: the loss falls and never goes far above the start.

    With pyro_nf 0.1's defaults the IAF loss went from 8.4e3 to over 1e6 within 10 steps at
    D = 1000. Three IAF layers with the layers' step reference of 64 reached 6.9 times the first
    loss at D = 300 and 4.2 times at D = 1000; the autoguides' reference of 16 stays below 1.1
    times. (A single step's loss is one Monte Carlo draw and may
    stray above the start; hence 3x.)
    """
    model = _normals(dim)
    losses = pyro_nf.fit(model, guide_class(model), num_steps=40, progress=False, seed=0).losses
    assert max(losses) < 3 * losses[0]
    assert sorted(losses[-10:])[5] < losses[0]


def test_one_adam_step_moves_made_outputs_by_a_width_independent_amount():
    """The cause: the change of an output in one Adam step no longer grows with the fan-in."""

    def largest_move(width, fan_in_ref):
        torch.manual_seed(0)
        made = MADE(256, (width,), torch.arange(256), fan_in_ref=fan_in_ref)
        x = torch.randn(16, 256)
        opt = torch.optim.Adam(made.parameters(), lr=0.01)
        m, a = made(x)
        (m + a).sum().backward()  # every output pushed the same way: coherent steps
        opt.step()
        with torch.no_grad():
            return max(t.abs().max().item() for t in made(x))

    narrow, wide = largest_move(64, 64), largest_move(4096, 64)
    assert wide < 1.5 * narrow
    # the plain masked layers of before: 64 times the width, about 64 times the move
    assert largest_move(4096, None) > 20 * narrow


def test_step_scale_leaves_the_network_at_initialization_unchanged():
    """Scaled units start with weights n/64 times larger: the same function before training."""
    order = torch.arange(300)
    torch.manual_seed(0)
    scaled = MADE(300, (600, 600), order, fan_in_ref=64)
    torch.manual_seed(0)
    plain = MADE(300, (600, 600), order, fan_in_ref=None)
    with torch.no_grad():
        for made in (scaled, plain):
            made.out.weight.copy_(torch.randn(made.out.weight.shape, generator=torch.Generator().manual_seed(1)))  # fmt: skip
        scaled.out.weight.mul_(1 / scaled.out.scale[:, None])
    x = torch.randn(5, 300)
    for a, b in zip(scaled(x), plain(x)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert scaled.hidden[1].scale.min() < 0.2 and plain.hidden[1].scale is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_scaled_made_follows_its_device_and_dtype(device, dtype):
    """The step scales are buffers: they move with the layer, and a guide on the device fits."""
    made = MADE(300, (600,), torch.arange(300)).to(device=device, dtype=dtype)
    assert made.out.scale.device.type == device and made.out.scale.dtype == dtype
    m, a = made(torch.randn(4, 300, device=device, dtype=dtype))
    assert m.device.type == device and a.dtype == dtype
    dim = 300
    y = torch.randn(dim, device=device, dtype=dtype)

    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros_like(y), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)

    guide = pyro_nf.AutoIAFFlow(model)
    losses = pyro_nf.fit(model, guide, num_steps=20, progress=False, seed=0).losses
    assert guide.flow.layers[0].made.out.scale.device.type == device
    assert max(losses) < 3 * losses[0]


def test_made_units_with_at_most_64_inputs_are_the_plain_masked_network():
    """The 2-D benchmarks' MADEs (64 units, three layers) are exactly what they were."""
    made = MADE(2, (64, 64, 64), torch.arange(2))
    assert all(layer.scale is None for layer in [*made.hidden, made.out])
    with torch.no_grad():
        made.out.weight.normal_()
    x = torch.randn(7, 2)
    h = x
    for layer in made.hidden:
        h = torch.nn.functional.elu(torch.nn.functional.linear(h, layer.weight * layer.mask, layer.bias))  # fmt: skip
    out = torch.nn.functional.linear(h, made.out.weight * made.out.mask, made.out.bias)
    assert torch.equal(torch.cat(made(x), -1), out)


def test_narrow_made_lets_every_coordinate_see_recent_ones():
    """Hidden layers narrower than D spread their degrees: coordinate k sees one close before it.

    (They used to take degrees 1..width only, so coordinates past the width saw only the first
    ``width`` variables.)
    """
    dim, width = 50, 10
    made = MADE(dim, (width,), torch.arange(dim))
    reach = (made.out.mask[:dim] @ made.hidden[0].mask) > 0  # output i depends on input j
    gap = (dim - 2) // (width - 1) + 2
    for i in range(2, dim):
        assert reach[i, :i].nonzero().max() >= i - gap, i
    assert not reach.triu().any()  # still autoregressive


def test_old_defaults_stay_reachable():
    """``fan_in_ref=None`` and an explicit width rebuild pyro_nf 0.1.0's IAF (the benchmark's
    comparison row)."""
    model = _normals(40)
    guide = pyro_nf.guides.AutoFlow(
        model, transform="iaf", num_transforms=2, hidden_dims=(80,), fan_in_ref=None
    ).setup()
    made = guide.flow.layers[0].made
    assert made.hidden[0].weight.shape == (80, 40) and made.out.scale is None


def test_iaf_scaling_benchmark_quick_writes_its_table(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "iaf_scaling.py"), "--quick",
         "--guides", "AutoIAFFlow", "AutoNormal", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    report = (tmp_path / "iaf_scaling_quick.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (AutoIAFFlow|AutoNormal) \| ([\d,]+) \|", report, flags=re.M)
    assert {(d, g) for d, g, _ in rows} == {
        (d, g) for d in ("1", "10") for g in ("AutoIAFFlow", "AutoNormal")
    }
    assert "torch " in report and "commit " in report and "machine: " in report


def test_autoregressive_autoguides_scale_steps_from_16_inputs_and_the_layers_from_64():
    """The autoguides' MADEs take the steps of a 16-input unit (``AUTOGUIDE_FAN_IN_REF``); a
    :class:`~pyro_nf.Flow`'s layers (a VAE's amortized flow) keep 64; ``fan_in_ref`` overrides."""
    from pyro_nf.transforms.autoregressive import AUTOGUIDE_FAN_IN_REF, FAN_IN_REF

    assert (AUTOGUIDE_FAN_IN_REF, FAN_IN_REF) == (16, 64)
    model = _normals(50)  # MADE width 100: output units see up to 100 hidden units
    for guide_class in (pyro_nf.AutoIAFFlow, pyro_nf.AutoSplineFlow):
        made = guide_class(model).setup().flow.layers[0].made
        n = made.out.mask.sum(1)
        torch.testing.assert_close(made.out.scale, (16 / n.clamp(min=1)).clamp(max=1))
        assert made.fan_in_ref == 16
        assert guide_class(model, fan_in_ref=None).setup().flow.layers[0].made.out.scale is None
    assert len(pyro_nf.AutoIAFFlow(model).setup().flow.layers) == 3
    assert len(pyro_nf.AutoSplineFlow(model).setup().flow.layers) == 2
    layer = pyro_nf.Flow(50, "iaf", 1).layers[0]
    assert layer.made.fan_in_ref == 64
