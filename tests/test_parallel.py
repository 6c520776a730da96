"""``trainer=hogwild|downpour|easgd``: real processes (torch.multiprocessing spawn, torch.distributed gloo), real MLflow
on a SQLite file. Each run has 2 CPU processes (plus a server where the algorithm has one) on a tiny problem: logistic
regression on digits, a few batches per epoch.

Exact checks at float64 (tolerance 1e-12, summation order being the same):
- Hogwild with one process, and Downpour with one worker pushing and pulling every step, equal a plain run: the
  Lightning run of ``train.py`` with the same config (``trainer=cpu``), same initial weights, batches and optimizer;
- EASGD with alpha = 0 (sync and async): each worker's final weights equal a hand-written single-process loop on its
  shard (``EpochShuffle`` rank i of 2) with the core optimizer, and the centre stays at the initial weights.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from optstudy import data as datasets
from optstudy import models, optim
from optstudy.config import compose, optimizer_kwargs, validate
from optstudy.errors import ConfigError
from optstudy.lit import EpochShuffle
from optstudy.parallel.loop import Optimizer, Shard
from optstudy.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=logreg", "data.batch_size=32", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
        "trainer.log_every_n_steps=2", "++logger.eff_lr_every_n_steps=2", "++logger.eff_lr_heatmap=false"]


def _cfg(tmp_path, *overrides):
    return compose([*TINY, f"checkpoint.dir={tmp_path}", *overrides])


def _weights(path: Path) -> dict:
    return torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _metrics(uri: str, run_id: str) -> tuple[str, set]:
    run = MlflowClient(uri).get_run(run_id)
    return run.info.status, set(run.data.metrics)


# --- cheap checks: no process started ---------------------------------------------------------------------------
def test_shards_follow_epoch_shuffle():
    for n, seed, epoch, world in [(1438, 0, 0, 2), (1438, 3, 5, 2), (101, 7, 2, 3), (5, 1, 0, 4)]:
        for rank in range(world):
            theirs, ours = EpochShuffle(n, seed, rank, world), Shard(n, seed, rank, world)
            theirs.set_epoch(epoch)
            ours.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_each_process_draws_its_own_gradient_noise():
    """Hogwild's and EASGD's processes each add their own noise (each gradient has its own in Neelakantan et al.);
    process 0 draws the plain run's, so that one process is the plain run."""
    cfg = compose(["optimizer=sgd", "optimizer.grad_noise.eta=0.5", "seed=3"])

    def stepped(rank):
        p = torch.zeros(50, requires_grad=True)
        opt = Optimizer(cfg, [p], rank) if rank is not None else None
        if opt is None:
            kwargs = optimizer_kwargs(cfg, notes=False)
            opt = optim.build(kwargs.pop("name"), [p], **kwargs)
        p.grad = torch.ones(50)
        opt.step()
        return p.detach().clone()

    plain, first, second, third = stepped(None), stepped(0), stepped(1), stepped(2)
    assert torch.equal(first, plain)
    assert not torch.equal(second, first) and not torch.equal(third, second) and not torch.equal(third, first)
    assert torch.equal(stepped(1), second)  # a stream, not chance: the same rank draws the same noise


@pytest.mark.parametrize("override, message", [
    ("trainer.processes=0", r"trainer.processes must be an integer >= 1, got 0"),
    ("trainer.alpha=1.5", r"trainer.alpha \(EASGD's moving rate\) must be a number in \[0, 1\], got 1.5"),
    ("trainer.variant=ring", r"trainer.variant must be sync or async, got 'ring'"),
    ("trainer.tau=0", r"trainer.tau must be an integer >= 1, got 0"),
    ("ckpt_path=last.ckpt", r"ckpt_path: trainer=easgd cannot resume from a checkpoint"),
    ("population.seed=[0,1]", r"population: trainer=easgd trains one model in several processes"),
    ("trainer.precision=16-mixed", r"trainer.precision must be 32-true or 64-true with trainer=easgd"),
])
def test_bad_values_fail_before_any_process(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(tmp_path, "trainer=easgd", override))  # what train.py checks before anything else


def test_downpour_periods_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.push_every must be an integer >= 1, got -1"):
        train(_cfg(tmp_path, "trainer=downpour", "trainer.push_every=-1"))


# --- each trainer, 2 processes, to the end, tracked ---------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["hogwild", "downpour"])
def test_runs_to_the_end_and_logs_to_mlflow(tmp_path, mlflow_uri, trainer, capsys):
    result = train(_cfg(tmp_path, f"trainer={trainer}"))
    last = capsys.readouterr().out.splitlines()[-1]  # train.py's summary line, as a Lightning run's
    assert last.startswith(f"run {result.run_id} 'adam lr=") and " trained in " in last
    assert f": val_loss = {result.value:.6g}; open it with: mlflow ui --backend-store-uri " in last
    assert math.isfinite(result.value) and result.value == result.metrics["val_loss"] < math.log(10)
    status, names = _metrics(mlflow_uri, result.run_id)
    assert status == "FINISHED"
    expected = {"val_loss", "val_acc", "train_loss", "worker0/train_loss", "worker1/train_loss", "delay/mean",
                "delay/max", "lr/g0", "eff_lr/g0/p50"}
    assert expected <= names, expected - names
    assert len(result.epoch_seconds) == 2
    # 2 processes x 2 epochs x 6 batches: every gradient counted, each applied with a delay >= 0
    assert result.metrics["delay/applied"] == 24 and result.metrics["delay/max"] >= result.metrics["delay/mean"] >= 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """``train.py``'s Lightning run of the tiny problem at float64: the plain run the one-process trainers equal."""
    out = tmp_path_factory.mktemp("plain")
    result = train(_cfg(out, "trainer.precision=64-true", "optimizer=adam", "logger=none"))
    return result, _weights(out)["state_dict"]


@pytest.mark.parametrize("trainer", [["trainer=hogwild", "trainer.processes=1"],
                                     ["trainer=downpour", "trainer.processes=1"]], ids=["hogwild", "downpour"])
def test_one_process_equals_the_plain_run(tmp_path, plain_run, trainer):
    reference, weights = plain_run
    result = train(_cfg(tmp_path, *trainer, "trainer.precision=64-true", "optimizer=adam", "logger=none"))
    ours = _weights(tmp_path)["state_dict"]
    assert ours.keys() == weights.keys()
    for key in weights:
        assert ours[key].dtype == torch.float64
        torch.testing.assert_close(ours[key], weights[key], rtol=0, atol=1e-12)
    # Lightning's callback_metrics went through self.log, which keeps float32: ours rounded the same way equals it
    assert torch.tensor(result.metrics["val_loss"], dtype=torch.float32).item() == reference.metrics["val_loss"]
    assert result.metrics.get("delay/max", 0) == 0  # one process: nothing is ever stale


def _local_run(cfg, shard: int, shards: int) -> tuple[torch.Tensor, dict]:
    """A single-process loop on one shard, written out: the run an EASGD worker with alpha = 0 must equal; its final
    parameters and optimizer state."""
    torch.manual_seed(cfg.seed)  # pl.seed_everything's torch part: the initial weights of train.py's runs
    data = datasets.load(cfg.data, cfg.seed)
    model = models.build(cfg.model, data).double()
    kwargs = optimizer_kwargs(cfg, notes=False)
    opt = optim.build(kwargs.pop("name"), model.parameters(), **kwargs)
    sampler = EpochShuffle(len(data.train), cfg.seed, shard, shards)
    loader = torch.utils.data.DataLoader(data.train, batch_size=cfg.data.batch_size, sampler=sampler)
    for epoch in range(cfg.trainer.max_epochs):
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i == cfg.trainer.limit_train_batches:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x.double()), y).backward()
            opt.step()
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), opt.state_dict()


@pytest.mark.parametrize("variant", ["sync", "async"])
def test_easgd_with_alpha_zero_equals_independent_local_runs(tmp_path, mlflow_uri, variant):
    cfg = _cfg(tmp_path, "trainer=easgd", f"trainer.variant={variant}", "trainer.alpha=0", "trainer.tau=2",
               "trainer.precision=64-true", "optimizer=momentum", "optimizer.lr=0.05")
    result = train(cfg)
    status, names = _metrics(mlflow_uri, result.run_id)
    assert status == "FINISHED" and {"val_loss", "worker0/train_loss", "worker1/train_loss"} <= names
    saved = _weights(tmp_path)
    for i in range(2):
        worker = torch.cat([v.reshape(-1) for v in saved["workers"][i].values()])
        local, local_opt = _local_run(cfg, i, 2)
        torch.testing.assert_close(worker, local, rtol=0, atol=1e-12)
        if i == 0:  # worker 0's optimizer state, also in async, where it lives in worker 0's process
            torch.testing.assert_close(saved["optimizer_worker0"]["state"], local_opt["state"], rtol=0, atol=1e-12)
    torch.manual_seed(cfg.seed)
    initial = models.build(cfg.model, datasets.load(cfg.data, cfg.seed)).double().state_dict()
    for key, value in initial.items():  # alpha = 0: the centre never moves
        assert torch.equal(saved["state_dict"][f"model.{key}"], value)


@pytest.mark.parametrize("variant", ["sync", "async"])
def test_easgd_logs_worker_0s_effective_learning_rates(tmp_path, mlflow_uri, variant):
    """Worker 0's optimizer applies updates in both variants (async: in its own process, not the server's): its
    ``lr/g*`` and effective lrs are the run's, its t-th update at run step 2 t (2 workers), the last at the step of
    the last ``val_loss``; the histograms are the run's ``eff_lr_histograms.npz``."""
    result = train(_cfg(tmp_path, "trainer=easgd", f"trainer.variant={variant}", "trainer.tau=2"))
    client = MlflowClient(mlflow_uri)
    status, names = _metrics(mlflow_uri, result.run_id)
    assert status == "FINISHED" and {"lr/g0", "eff_lr/g0/p50", "eff_lr/g0/min", "eff_lr/g0/max"} <= names
    assert "eff_lr_histograms.npz" in {a.path for a in client.list_artifacts(result.run_id)}
    arrays = np.load(client.download_artifacts(result.run_id, "eff_lr_histograms.npz", str(tmp_path)))
    # 2 epochs x 6 updates; eff_lr_every_n_steps=2: worker 0's first, every 2nd and its last (t = 12)
    assert arrays["steps"].tolist() == [2 * t for t in (1, 2, 4, 6, 8, 10, 12)]
    assert [m.step for m in client.get_metric_history(result.run_id, "eff_lr/g0/p50")] == arrays["steps"].tolist()
    assert [m.step for m in client.get_metric_history(result.run_id, "lr/g0")] == [4, 8, 12, 16, 20]  # exchanges
    assert client.get_metric_history(result.run_id, "val_loss")[-1].step == 24


# --- the end of a process --------------------------------------------------------------------------------------
def _aborts_at_exit(rank: int, world: int, reports) -> None:
    """A process whose work is done but whose interpreter would abort at its finalisation, as gloo's threads
    sometimes make it ("terminate called without an active exception")."""
    import atexit

    reports.put(("done", rank))
    atexit.register(os.kill, os.getpid(), signal.SIGABRT)


def test_a_finished_process_is_not_failed_by_its_interpreters_finalisation(tmp_path):
    from optstudy.parallel.launch import launch

    (tmp_path / "errors").mkdir()
    seen = []
    launch(_aborts_at_exit, 2, (), tmp_path / "errors", on_report=seen.append)
    assert sorted(seen) == [("done", 0), ("done", 1)]


# --- a killed worker --------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_killed_worker_ends_the_run_with_one_line_and_no_orphans(tmp_path, mlflow_uri):
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "trainer=downpour", "model=logreg",
                             "trainer.max_epochs=100000", f"checkpoint.dir={tmp_path}", "logger.experiment=kill"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        deadline, workers = time.monotonic() + 240, []
        while time.monotonic() < deadline and len(workers) < 3:  # the server and two workers
            time.sleep(0.5)
            workers = [c for c in _children(proc.pid) if "spawn_main" in _cmdline(c)]
            assert proc.poll() is None, proc.communicate()
        assert len(workers) == 3, "the processes did not start"
        everyone = _children(proc.pid)  # with the resource tracker
        time.sleep(3)  # let them train a little
        os.kill(max(workers), signal.SIGKILL)  # the last started
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: worker ") and "was killed by SIGKILL" in last and "other processes were stopped" in last
    assert "Traceback" not in err
    time.sleep(1)
    assert not [pid for pid in everyone if _alive(pid)]  # no orphan left behind
    runs = MlflowClient(mlflow_uri).search_runs([MlflowClient(mlflow_uri).get_experiment_by_name("kill").experiment_id])
    assert runs[0].info.status == "FAILED" and "killed by SIGKILL" in runs[0].data.tags["failure_reason"]
