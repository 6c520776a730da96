"""Objective models (``optstudy.models._synthetic``), the ``synthetic`` dataset, their configs, ``trajectory_plot``.

The counterexample runs reproduce Reddi et al. (2018) with a plain loop: β = (0.9, 0.99), lr α/√t with α = 1, x0 = 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

import optstudy.data
import optstudy.data._synthetic
import optstudy.models
import optstudy.models._synthetic
import optstudy.optim as o
from optstudy.errors import ConfigError
from optstudy.models._synthetic import Beale, Counterexample, NoisyQuadratic, Rosenbrock, Saddle
from optstudy.plots import trajectory_plot

ROOT = Path(__file__).resolve().parents[2]
OBJECTIVES = ("counterexample", "noisy_quadratic", "beale", "rosenbrock", "saddle")


def grad(model) -> torch.Tensor:
    """The gradient of one training-mode forward (one step) with respect to the model's only parameter."""
    (p,) = model.parameters()
    p.grad = None
    model(None).backward()
    return p.grad.detach().clone()


def at(model, point):
    with torch.no_grad():
        next(model.parameters()).copy_(torch.as_tensor(point, dtype=torch.float64))
    return model


# --- analytic gradients, float64 ---------------------------------------------------------------------------------

def beale_grad(x, y):
    a1, a2, a3 = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return [2 * a1 * (y - 1) + 2 * a2 * (y**2 - 1) + 2 * a3 * (y**3 - 1),
            2 * a1 * x + 4 * a2 * x * y + 6 * a3 * x * y**2]


def rosenbrock_grad(x, y, a=1.0, b=100.0):
    return [-2 * (a - x) - 4 * b * x * (y - x**2), 2 * b * (y - x**2)]


@pytest.mark.parametrize("model, expected", [
    (Beale(), beale_grad(0.7, -1.3)),
    (Rosenbrock(), rosenbrock_grad(0.7, -1.3)),
    (Rosenbrock(a=2.0, b=5.0), rosenbrock_grad(0.7, -1.3, a=2.0, b=5.0)),
    (Saddle(), [1.4, 2.6]),
], ids=["beale", "rosenbrock", "rosenbrock_a2_b5", "saddle"])
def test_surface_gradients_are_analytic(model, expected):
    model = at(model.double(), [0.7, -1.3])
    torch.testing.assert_close(grad(model), torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
    assert model.val_loss().item() == pytest.approx(float(model.surface(0.7, -1.3)), rel=1e-12)


def test_counterexample_gradient_follows_the_period():
    model = Counterexample(x0=0.25).double()
    gs = [grad(model).item() for _ in range(2 * 101 + 1)]  # t = 1 .. 203
    assert gs == [101.0 if t % 101 == 1 else -1.0 for t in range(1, 204)]
    assert grad(Counterexample(C=50.0, scale=10.0).double()).item() == 500.0
    # the expected per-step loss: (C - (P - 1)) / P · x online, (pC - (1 - p)) · x stochastic
    assert model.val_loss().item() == pytest.approx(0.25 / 101, rel=1e-12)
    assert Counterexample(stochastic=True, x0=0.5).val_loss().item() == pytest.approx(0.5 * 0.02, rel=1e-6)


def test_stochastic_counterexample_draws_the_big_gradient_with_probability_p():
    torch.manual_seed(0)
    model = Counterexample(stochastic=True, p=0.25).double()
    gs = torch.tensor([grad(model).item() for _ in range(2000)])
    assert set(gs.tolist()) == {101.0, -1.0}
    assert (gs == 101.0).float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_noisy_quadratic_gradient_is_h_times_theta_minus_c():
    dim, noise = 7, 2.0
    model = NoisyQuadratic(dim=dim, noise=noise).double()
    theta = torch.linspace(-1, 2, dim, dtype=torch.float64)
    at(model, theta)
    h = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)
    torch.manual_seed(5)
    g = grad(model)
    torch.manual_seed(5)
    c = torch.randn(dim, dtype=torch.float64) * (noise / h).sqrt()  # σ_i² = noise / h_i: gradient covariance noise·H
    torch.testing.assert_close(g, h * (theta - c), rtol=1e-10, atol=0)
    model.eval()
    torch.testing.assert_close(grad(model), h * theta, rtol=1e-10, atol=0)
    assert model.val_loss().item() == pytest.approx(0.5 * (h * theta**2).sum().item(), rel=1e-12)


def test_noisy_quadratic_starts_at_ones_and_is_deterministic_under_a_seed():
    def losses(seed):
        torch.manual_seed(seed)
        model = NoisyQuadratic()
        opt = o.build("sgd", model.parameters(), lr=0.1)
        out = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(None)
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out, model.metrics()

    assert NoisyQuadratic(dim=100).val_loss().item() == pytest.approx(0.5 * sum(1 / i for i in range(1, 101)))
    assert losses(3) == losses(3)
    assert losses(3)[0] != losses(4)[0]
    assert set(losses(3)[1]) == {"theta_norm"}


def test_minima_are_minima():
    for model, minimum in ((Beale(), (3.0, 0.5)), (Rosenbrock(), (1.0, 1.0)), (Rosenbrock(a=-0.5), (-0.5, 0.25))):
        assert model.minimum == minimum
        model = at(model.double(), minimum)
        assert grad(model).abs().max().item() < 1e-12
        assert model.val_loss().item() == pytest.approx(0.0, abs=1e-15)
        for dx, dy in ((1e-3, 0), (0, 1e-3), (-1e-3, 1e-3)):  # both are sums of squares, so 0 is the global minimum
            assert model.surface(minimum[0] + dx, minimum[1] + dy) > 0
    assert Saddle().minimum is None
    assert at(Saddle().double(), [0.0, 0.0]).val_loss().item() == 0.0 and grad(Saddle()).norm() > 0


# --- the counterexample ------------------------------------------------------------------------------------------

def counterexample_run(name, steps, alpha=1.0, **model_params) -> np.ndarray:
    """x after each of ``steps`` steps of ``name`` with β = (0.9, 0.99) and lr α/√t, projected onto [-1, 1]."""
    model = Counterexample(**model_params).double()
    opt = o.build(name, model.parameters(), lr=alpha, betas=(0.9, 0.99))
    xs = np.empty(steps)
    for t in range(1, steps + 1):
        opt.param_groups[0]["lr"] = alpha / math.sqrt(t)  # AdaBound's bounds follow lr / initial lr
        opt.zero_grad()
        model(None).backward()
        opt.step()
        model.project_()
        xs[t - 1] = model.x.item()
    return xs


@pytest.fixture(scope="module")
def online():
    return {name: counterexample_run(name, 3000) for name in ("adam", "amsgrad", "adabound", "amsbound")}


def test_adam_goes_to_the_worst_point_and_amsgrad_towards_the_best(online):
    # measured: adam 0.968 at t = 3000 (mean of the last 500 steps 0.942), amsgrad -0.741 (-0.753)
    assert online["adam"][-1] > 0.9 and online["adam"][-505:].mean() > 0.85
    assert online["amsgrad"][-1] < -0.6 and online["amsgrad"][-505:].max() < -0.6


def test_adabound_and_amsbound_follow_adam_and_amsgrad_while_the_bounds_are_wide(online):
    # γ = 1e-3: the bounds are [0.05, 0.2]·lr/α at t = 1000 and Adam's rates lie mostly inside them, so the two
    # runs equal their unbounded twins to three decimals (measured 0.968 and -0.741 at t = 3000)
    assert online["adabound"][-1] > 0.8
    assert online["amsbound"][-1] < -0.6


def test_at_the_papers_scale_adabound_and_amsbound_act_like_sgd_and_head_to_minus_one():
    # 1010x / -10x (scale 10): Adam's rates fall below the lower bound, the clip makes both SGD-like (measured: both
    # -0.465 at t = 3000, -1.0 at t = 8000); Adam and AMSGrad are scale-invariant and do not change
    for name in ("adabound", "amsbound"):
        xs = counterexample_run(name, 3000, scale=10.0)
        assert xs[-1] < -0.3 and xs[-505:].mean() < -0.4


def test_stochastic_adam_stays_near_the_worst_point_and_amsgrad_below_it():
    # noisy: over 5 seeds at t = 8000 the mean of the last 1000 x was 0.63..0.92 for Adam and -0.94..0.40 for AMSGrad,
    # Adam above AMSGrad by >= 0.5 each time; at t = 4000 one seed still had AMSGrad above 0.9, so no shorter run
    torch.manual_seed(0)
    adam = counterexample_run("adam", 8000, stochastic=True)[-1000:].mean()
    torch.manual_seed(0)
    amsgrad = counterexample_run("amsgrad", 8000, stochastic=True)[-1000:].mean()
    assert adam > 0.5 and amsgrad < adam - 0.5


def test_projection_keeps_x_in_the_feasible_set():
    model = Counterexample(x0=1.0)
    opt = o.build("sgd", model.parameters(), lr=10.0)
    for _ in range(300):
        opt.zero_grad()
        model(None).backward()
        opt.step()
        with torch.no_grad():
            model.project_()
        assert -1.0 <= model.x.item() <= 1.0
        assert model.metrics() == {"x": model.x.item()}
    with pytest.raises(ConfigError, match=r"model.x0 must be in the feasible set \[-1, 1\], got 2.0"):
        Counterexample(x0=2.0)


# --- contract: step counter, eval mode, configs ------------------------------------------------------------------

def test_the_step_counter_is_a_buffer_that_resumes_from_a_checkpoint():
    model = Counterexample(x0=0.5)
    for _ in range(101):
        model(None)
    state = model.state_dict()
    assert "t" in state and state["t"].item() == 101 and state["t"].dtype == torch.long
    model.eval()
    model(None)  # eval mode: the noise-free objective, no step
    assert model.t.item() == 101 and model(None).item() == pytest.approx(0.5 / 101)
    resumed = Counterexample(x0=0.5)
    resumed.load_state_dict(state)
    assert grad(resumed).item() == 101.0  # step 102 = 1 mod 101: the big one, as it would have been
    for name in ("noisy_quadratic", "beale", "rosenbrock", "saddle"):
        assert "t" in optstudy.models._synthetic.MODELS[name][1](None).state_dict()


def test_synthetic_dataset_yields_step_indices():
    data = optstudy.data._synthetic.synthetic(seed=0, steps_per_epoch=7)
    assert data.task == "objective" and len(data.train) == 7 and len(data.val) == 1
    batches = list(DataLoader(data.train, batch_size=1))
    assert [b.tolist() for b in batches] == [[i] for i in range(7)] and batches[0].dtype == torch.long
    with pytest.raises(ConfigError, match="data.steps_per_epoch must be an integer >= 1, got 0"):
        optstudy.data._synthetic.synthetic(seed=0, steps_per_epoch=0)


def cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_configs_compose_load_and_build_and_run_a_few_steps(name):
    c = cfg("data=synthetic", f"model={name}")
    assert c.data.batch_size == 1 and c.data.steps_per_epoch == 100
    data = optstudy.data.load(c.data, 0)
    model = optstudy.models.build(c.model, data)
    opt = o.build("adam", model.parameters(), lr=1e-2)
    for batch in DataLoader(data.train, batch_size=c.data.batch_size):
        opt.zero_grad()
        loss = model(batch)
        assert loss.shape == () and torch.isfinite(loss)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.project_()
    assert model.t.item() == 100
    assert torch.is_floating_point(model.val_loss()) and model.val_loss().shape == ()
    assert all(isinstance(v, float) for v in model.metrics().values())


def test_start_is_configurable_and_defaults_as_documented():
    c = cfg("data=synthetic", "model=beale", "model.start=[2.0,-1.0]")
    model = optstudy.models.build(c.model, optstudy.data.load(c.data, 0))
    assert isinstance(model, Beale) and model.metrics() == {"x": 2.0, "y": -1.0}
    assert Beale().metrics() == {"x": 1.0, "y": 1.5} and Rosenbrock().metrics() == {"x": -1.5, "y": 2.0}
    with pytest.raises(ConfigError, match=r"model.start must be a pair of finite numbers \[x, y\], got \[1.0\]"):
        Beale(start=[1.0])


# --- plots -------------------------------------------------------------------------------------------------------

def test_trajectory_plot_writes_a_png(tmp_path):
    model = Beale()
    paths = {"adam": np.array([[1.0, 1.5], [1.5, 1.0], [2.5, 0.6], [3.0, 0.5]]),
             "sgd": torch.tensor([[1.0, 1.5], [1.1, 1.2], [1.4, 0.9]])}
    out = trajectory_plot(model, paths, tmp_path / "beale.png")
    assert out == tmp_path / "beale.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    saddle = trajectory_plot(Saddle(), {"adam": [[-1.0, 1e-3], [0.0, 0.5]]}, tmp_path / "saddle.png")
    assert saddle.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
