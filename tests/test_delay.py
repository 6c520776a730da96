"""``trainer.delay``: gradients applied late, simulated exactly (``optstudy.delay``).

The simulator equals a hand-written delayed loop at float64 — on its own with every core optimizer, and inside real
Lightning training (digits MLP) for sgd, adam and adabound — for fixed delays 0, 1, 3 and random ones; a delay of 0
through the simulator is the plain run bit for bit; resuming from a checkpoint equals the run that never stopped; a
population member equals its standalone run; the staleness it records is the one the definition gives.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch.nn import functional as F

from optstudy import data, delay, optim
from optstudy.config import compose, optimizer_kwargs
from optstudy.errors import ConfigError
from optstudy.lit import Task
from optstudy.population.members import member_configs
from optstudy.population.run import train_population
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
F64 = ["trainer.precision=64-true", "logger=none"]
RANDOM = "trainer.delay={dist:poisson,mean:2,max:6}"


# --- the simulator alone: every optimizer against a hand-written delayed loop -------------------------------------
def _problem(seed: int = 0):
    """A float64 softmax regression on fixed random data, 4 batches of 8: (initial params, loss of (params, step))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=gen)
    w0 = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.3
    b0 = torch.zeros(3, dtype=torch.float64)

    def loss(params, step):
        i = (step % 4) * 8
        w, b = params
        return F.cross_entropy(x[i:i + 8] @ w + b, y[i:i + 8])

    return (w0, b0), loss


def _hand_loop(name: str, arrival, steps: int):
    """The definition, written out: step s computes g_s at the current parameters; at step t every g_s with
    s + d_s == t is applied, in order of s, each as its own optimizer step."""
    (w0, b0), loss = _problem()
    params = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    opt = optim.build(name, params, impl="loop")
    grads = {}
    for t in range(steps):
        grads[t] = torch.autograd.grad(loss(params, t), params)
        for s in sorted(s for s in grads if arrival(s) == t):
            for p, g in zip(params, grads.pop(s)):
                p.grad = g.clone()
            opt.step()
    return [p.detach() for p in params], opt


def _simulated(name: str, spec: delay.DelaySpec, steps: int):
    (w0, b0), loss = _problem()
    params = [w0.clone().requires_grad_(), b0.clone().requires_grad_()]
    opt = optim.build(name, params, impl="loop")
    line = delay.DelayLine(spec)
    for t in range(steps):
        def closure(t=t):
            opt.zero_grad(set_to_none=True)
            value = loss(params, t)
            value.backward()
            return value

        line.step(opt, closure, t)
    return [p.detach() for p in params], opt, line


@pytest.mark.parametrize("name", optim.NAMES)
@pytest.mark.parametrize("tau", [0, 1, 3])
def test_every_optimizer_equals_the_hand_written_delayed_loop(name, tau):
    """Bit-identical at float64 (the same operations in the same order); the optimizer counts applied updates."""
    steps = 12
    simulated, opt, line = _simulated(name, delay.DelaySpec(tau=tau), steps)
    reference, ref_opt = _hand_loop(name, lambda s: s + tau, steps)
    for a, b in zip(simulated, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == steps - tau
    assert ref_opt.state[ref_opt.param_groups[0]["params"][0]]["step"] == steps - tau
    assert len(line.pending) == tau and line.applied == steps - tau


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adagrad", "adabound"])
@pytest.mark.parametrize("dist", [{"dist": "uniform", "max": 4}, {"dist": "geometric", "mean": 2.0},
                                  {"dist": "poisson", "mean": 3.0, "max": 5}])
def test_random_delays_out_of_order_equal_the_hand_written_loop(name, dist):
    spec = delay.parse(dist, run_seed=7)
    steps = 20
    draws = [spec.draw(s) for s in range(steps)]
    assert len(set(draws)) > 1 and any(s + d > s2 + d2 for s, d in enumerate(draws) for s2, d2 in enumerate(draws)
                                       if s2 > s)  # delays vary and some gradients overtake others
    simulated, _, line = _simulated(name, spec, steps)
    reference, _ = _hand_loop(name, lambda s: s + draws[s], steps)
    for a, b in zip(simulated, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    in_flight = sum(s + d >= steps for s, d in enumerate(draws))
    assert len(line.pending) == in_flight and line.applied == steps - in_flight


def test_draws_are_a_function_of_seed_and_step_with_the_asked_mean_and_cap():
    spec = delay.parse({"dist": "geometric", "mean": 4, "max": 30}, run_seed=3)
    draws = [spec.draw(s) for s in range(20000)]
    assert draws[:50] == [spec.draw(s) for s in range(50)]  # no hidden state: a resumed run draws the same
    assert max(draws) <= 30 and min(draws) == 0
    assert sum(draws) / len(draws) == pytest.approx(4, rel=0.05)  # the cap at 30 takes off ~0.03
    poisson = delay.parse({"dist": "poisson", "mean": 2.5}, run_seed=3)
    assert sum(poisson.draw(s) for s in range(20000)) / 20000 == pytest.approx(2.5, rel=0.03)
    uniform = delay.parse({"dist": "uniform", "max": 4}, run_seed=3)
    assert {uniform.draw(s) for s in range(500)} == {0, 1, 2, 3, 4}
    assert [spec.draw(s) for s in range(50)] != [delay.parse({"dist": "geometric", "mean": 4, "max": 30},
                                                             run_seed=4).draw(s) for s in range(50)]


def test_staleness_is_counted_in_applied_updates():
    """Fixed τ: g_s was computed after max(0, s - τ) updates and is the (s+1)-th applied: staleness min(s, τ)."""
    tau, steps = 3, 12
    _, _, line = _simulated("sgd", delay.DelaySpec(tau=tau), steps)
    expected = [min(s, tau) for s in range(steps - tau)]
    m = line.metrics(final=True)
    assert m["delay/mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-15)
    assert (m["delay/max"], m["delay/p50"], m["delay/applied"], m["delay/dropped"]) == (3, 3, 9, 3)


# --- inside Lightning: train(cfg) against the loop, on the digits MLP ---------------------------------------------
def _final_params(result) -> list[torch.Tensor]:
    saved = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return [v for k, v in saved["state_dict"].items() if k.startswith("model.")]


def _lightning_reference(cfg, arrival, clip: float | None = None) -> list[torch.Tensor]:
    """The digits MLP trained by hand as train(cfg) trains it (same initial weights and batches, float64), with
    gradient g_s applied at step arrival(s); with ``scheduler.name=inv_sqrt``, the lr of step t is lr/sqrt(t+1) for
    every update applied at step t."""
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = Task(cfg, data.load(cfg.data, cfg.seed)).double()
    params = list(module.model.parameters())
    kwargs = optimizer_kwargs(cfg, notes=False)  # as Task.configure_optimizers builds it
    opt = optim.build(kwargs.pop("name"), params, **kwargs)
    base_lr = opt.param_groups[0]["lr"]
    grads, t = {}, 0
    for epoch in range(cfg.trainer.max_epochs):
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(module.model(x.double()), y)
            grads[t] = torch.autograd.grad(loss, params)
            if cfg.scheduler.name == "inv_sqrt":
                opt.param_groups[0]["lr"] = base_lr * (1 / math.sqrt(t + 1))  # LambdaLR's product, as it rounds
            for s in sorted(s for s in grads if arrival(s) == t):
                for p, g in zip(params, grads.pop(s)):
                    p.grad = g.clone()
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
            t += 1
    return [p.detach() for p in params]


@pytest.mark.parametrize("name", ["sgd", "adam", "adabound"])
@pytest.mark.parametrize("tau", [0, 1, 3])
def test_training_with_a_delay_equals_the_hand_written_loop(name, tau, tmp_path):
    """One epoch (23 steps) of the digits MLP at float64: within 1e-12 of the loop (measured: bit-identical)."""
    cfg = compose([f"optimizer={name}", "optimizer.lr=0.05", f"trainer.delay={tau}", "trainer.max_epochs=1", *F64,
                   f"checkpoint.dir={tmp_path}"])
    trained = _final_params(train(cfg))
    for a, b in zip(trained, _lightning_reference(cfg, lambda s: s + tau)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_random_delays_clipping_and_a_schedule_in_training_equal_the_loop(tmp_path):
    """Out-of-order arrivals over two epochs, each gradient clipped by itself before it is applied, the lr of the
    step where it arrives (inv_sqrt, per training step)."""
    cfg = compose(["optimizer=adam", "optimizer.lr=0.01", RANDOM, "trainer.max_epochs=2", "scheduler.name=inv_sqrt",
                   "trainer.gradient_clip_val=0.5", *F64, f"checkpoint.dir={tmp_path}"])
    spec = delay.parse(cfg.trainer.delay, cfg.seed)
    trained = _final_params(train(cfg))
    for a, b in zip(trained, _lightning_reference(cfg, lambda s: s + spec.draw(s), clip=0.5)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_zero_delay_through_the_simulator_is_the_plain_run_bit_for_bit(tmp_path):
    plain = train(compose(["optimizer=adabound", "trainer.max_epochs=2", *F64, f"checkpoint.dir={tmp_path / 'a'}"]))
    zero = train(compose(["optimizer=adabound", "trainer.max_epochs=2", *F64, f"checkpoint.dir={tmp_path / 'b'}",
                          "trainer.delay={dist:uniform,max:0}"]))
    assert zero.value == plain.value
    for a, b in zip(_final_params(zero), _final_params(plain)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("delay_value", ["trainer.delay=5", RANDOM])
def test_resume_from_a_checkpoint_equals_the_run_that_never_stopped(delay_value, tmp_path):
    """The gradients in flight at the end of epoch 2 are in the checkpoint; epochs 3-4 apply them as the straight
    run does: bit-identical (at float32; 64-true resumes exactly too, ``tests/test_resume_precision.py``)."""
    common = ["optimizer=adam", "optimizer.lr=0.01", delay_value, "logger=none"]
    straight = train(compose([*common, "trainer.max_epochs=4", f"checkpoint.dir={tmp_path / 'a'}"]))
    train(compose([*common, "trainer.max_epochs=2", f"checkpoint.dir={tmp_path / 'b'}"]))
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["optstudy_delay"]["pending"]  # something was in flight
    resumed = train(compose([*common, "trainer.max_epochs=4", f"checkpoint.dir={tmp_path / 'c'}",
                             f"ckpt_path={ckpt}"]))
    assert resumed.value == straight.value
    for a, b in zip(_final_params(resumed), _final_params(straight)):
        assert torch.equal(a, b)


def test_resuming_with_another_delay_is_refused(tmp_path):
    train(compose(["trainer.delay=2", "trainer.max_epochs=1", *F64, f"checkpoint.dir={tmp_path / 'a'}"]))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    for other in ("trainer.delay=3", "trainer.delay=0"):
        with pytest.raises(ConfigError, match=r"trainer.delay must be the checkpoint's \(2\).*got (3|0)"):
            train(compose([other, "trainer.max_epochs=2", *F64, f"checkpoint.dir={tmp_path / 'b'}",
                           f"ckpt_path={ckpt}"]))


# --- populations ------------------------------------------------------------------------------------------------
def test_a_population_member_equals_its_standalone_run(mlflow_uri):
    """Four members (2 lrs x 2 seeds) with τ = 2, float64: each within 1e-9 of its own run, delay metrics alike."""
    overrides = ["optimizer=adam", "population.lr=[1e-3,3e-2]", "population.seed=[0,1]", "trainer.delay=2",
                 "trainer.precision=64-true", "trainer.max_epochs=1", "checkpoint.enabled=false"]
    result = train_population(compose(overrides))
    configs, _ = member_configs(compose(overrides))
    client = MlflowClient(mlflow_uri)
    for member, cfg in zip(result.members, configs):
        alone = client.get_run(train(cfg).run_id).data.metrics
        logged = client.get_run(member.run_id).data.metrics
        assert logged["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-9, abs=0)
        assert logged["delay/mean"] == alone["delay/mean"] and alone["delay/max"] == 2 == alone["delay/dropped"]


def test_random_delays_in_a_population_share_one_sequence(mlflow_uri):
    base = ["optimizer=sgd", "optimizer.lr=0.1", "population.seed=[0,1]", "trainer.precision=64-true",
            "trainer.max_epochs=1", "checkpoint.enabled=false"]
    with pytest.raises(ConfigError, match=r"trainer.delay.seed must be set for a population of seeds \[0, 1\]"):
        train_population(compose([*base, RANDOM]))
    with pytest.raises(ConfigError, match="trainer.delay must be the same for every member of a population"):
        train_population(compose(base[:2] + base[3:]),
                         [{"trainer.delay": 2, "seed": 0}, {"trainer.delay": 3, "seed": 0}])
    overrides = [*base, "trainer.delay={dist:geometric,mean:3,seed:11}"]
    result = train_population(compose(overrides))
    configs, _ = member_configs(compose(overrides))
    client = MlflowClient(mlflow_uri)
    for member, cfg in zip(result.members, configs):
        alone = client.get_run(train(cfg).run_id).data.metrics
        assert client.get_run(member.run_id).data.metrics["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-9)


# --- what a run records, and bad input ----------------------------------------------------------------------------
def test_the_run_records_the_staleness_it_applied(mlflow_uri, tmp_path):
    """23 steps a epoch, 2 epochs, τ = 4: 42 gradients applied with staleness min(s, 4), 4 left in flight."""
    result = train(compose(["trainer.delay=4", "trainer.max_epochs=2", f"checkpoint.dir={tmp_path}"]))
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(result.run_id).data.metrics
    expected = [min(s, 4) for s in range(46 - 4)]
    assert metrics["delay/mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert (metrics["delay/max"], metrics["delay/applied"], metrics["delay/dropped"]) == (4, 42, 4)
    steps = [m.step for m in client.get_metric_history(result.run_id, "delay/mean")]
    assert steps[:2] == [10, 20] and steps[-1] == 46  # every log_every_n_steps, and at the end



@pytest.mark.slow
def test_delay_with_ddp_keeps_the_replicas_equal(mlflow_uri, tmp_path):
    """trainer=ddp on 2 CPU processes with τ = 3: each rank delays the all-reduced gradient the same way, so the
    replicas stay identical (ddp/param_max_diff, measured by the run) and the staleness is a single run's: 12 steps
    an epoch (each rank half the data), 2 epochs, 21 gradients applied, 3 left in flight."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.delay=3", "trainer.max_epochs=2", "logger.experiment=ddp_delay", f"checkpoint.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    [run] = client.search_runs([client.get_experiment_by_name("ddp_delay").experiment_id])
    metrics = run.data.metrics
    assert metrics["ddp/param_max_diff"] == 0.0
    expected = [min(s, 3) for s in range(24 - 3)]
    assert metrics["delay/mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert (metrics["delay/max"], metrics["delay/applied"], metrics["delay/dropped"]) == (3, 21, 3)

@pytest.mark.parametrize("value, message", [
    ("-1", "trainer.delay must be an integer >= 0 (steps) or a distribution, got -1"),
    ("1.5", "trainer.delay must be an integer >= 0 (steps) or a distribution"),
    ("{dist:normal,mean:2}", "trainer.delay.dist must be one of uniform, geometric, poisson, got 'normal'"),
    ("{dist:poisson}", "trainer.delay.mean must be a number >= 0 (steps) for dist=poisson, got None"),
    ("{dist:geometric,mean:-1}", "trainer.delay.mean must be a number >= 0 (steps) for dist=geometric, got -1"),
    ("{dist:uniform}", "trainer.delay.max must be set for dist=uniform"),
    ("{dist:uniform,max:2.5}", "trainer.delay.max must be an integer >= 0 (steps), got 2.5"),
    ("{dist:poisson,mean:2,seed:-3}", "trainer.delay.seed must be an integer >= 0 or null"),
    ("{dist:poisson,mean:2,lag:1}", "trainer.delay.lag: not a key of a delay distribution"),
])
def test_bad_delays_are_config_errors(value, message):
    from optstudy.config import validate

    with pytest.raises(ConfigError) as info:
        validate(compose([f"trainer.delay={value}"]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_delay_refuses_what_would_change_its_gradients():
    from optstudy.config import validate

    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches must be 1 with trainer.delay=2"):
        validate(compose(["trainer.delay=2", "+trainer.accumulate_grad_batches=4"]))
    with pytest.raises(ConfigError, match="trainer.precision must be 32-true or 64-true"):
        validate(compose(["trainer.delay=2", "trainer.precision=bf16-mixed"]))
    with pytest.raises(ConfigError, match="trainer.delay must be 0 with trainer=hogwild, whose delays are real"):
        validate(compose(["trainer=hogwild", "+trainer.delay=2"]))


def test_command_line_bad_delay_exits_2_and_help_shows_the_key():
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer.delay=-2"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 2 and "trainer.delay must be an integer >= 0" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    shown = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                           check=False)
    assert "  delay: 0" in shown.stdout


def test_the_staleness_reproduction_runs_and_delay_hurts(tmp_path):
    """``python scripts/reproduce.py staleness --quick``: the same code as docs' full sweep, 2 epochs; a delay of 8
    steps (of 90) must cost SGD and Adagrad at their lr without delay (measured: 5.2x, 8.4x; logreg Adagrad 2.3x)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["staleness", "--quick", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "staleness.json").read_text())
    ratios = {(problem, r["optimizer"], r["tau"]): r["ratio_default"]
              for problem, found in saved["problems"].items() for r in found["summary"]}
    assert ratios["mlp", "sgd", 0] == ratios["mlp", "adagrad", 0] == ratios["logreg", "adagrad", 0] == 1
    assert min(ratios["mlp", "sgd", 8], ratios["mlp", "adagrad", 8], ratios["logreg", "adagrad", 8]) > 1.5
    assert (tmp_path / "staleness.png").stat().st_size > 10_000
