"""Training a population from ``train.py``'s config: K member configs (``members.py``), their models built each under
its own seed and stacked (``stack.py``), one Lightning run (``task.py``), one MLflow run per member
(``tracking.py``). A model that cannot stack trains its members one after another, with a one-line note.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import OmegaConfDumper

from optstudy import data, models
from optstudy.data import _order
from optstudy.config import validate
from optstudy.early import check_monitor
from optstudy.errors import ConfigError
from optstudy.lit import Diverged, Trajectory
from optstudy.lrlog import EffectiveLR, summary
from optstudy.optim import lr_histogram
from optstudy.population import members as pop
from optstudy.population.early import callbacks as member_early_stopping
from optstudy.population.stack import NotStackable, stack
from optstudy.population.task import PopulationTask, stacked_data
from optstudy.train import (_quiet_lightning, _resolved, make_trainer, output_dir, run_name, set_threads,
                            trainer_kwargs)
from optstudy.tracking import flatten, git_commit, tracking_uri, ui_command


@dataclasses.dataclass(frozen=True)
class Member:
    setting: dict  # what this member sets: {"optimizer.lr": 1e-4, "seed": 0}
    value: float  # its objective's final value (NaN if it diverged before measuring it)
    metrics: dict[str, float]  # every metric's last value
    run_id: str | None
    diverged: str | None  # the reason, if it diverged
    stopped: str | None = None  # the reason, if a study stopped it early (pruned)


@dataclasses.dataclass(frozen=True)
class PopulationResult:
    members: list[Member]
    parent_run_id: str | None
    tracking_uri: str | None
    output_dir: Path
    seconds: float
    sequential: bool  # the model could not stack: members trained one after another
    compactions: tuple = ()  # (epoch, rows left) each time stopped members were cut out of the stack

    @property
    def value(self) -> float:
        """The best member's objective."""
        return min((m.value for m in self.members if m.diverged is None), default=float("nan"))


def train_population(cfg: DictConfig, settings: list[dict] | None = None,
                     callbacks: list | None = None) -> PopulationResult:
    """Trains the members ``cfg``'s ``population.*`` describes, or the given ``settings`` (``members.member_dicts``);
    ``callbacks``: extra Lightning callbacks (a study's pruning), which see the ``PopulationTask``."""
    validate(cfg)  # each member's values too (members.check)
    if settings is not None:
        pop.check(cfg, settings)
    if cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path: resuming a population is not supported yet; train it again")
    _quiet_lightning()
    configs, settings = pop.member_dicts(cfg, settings)
    start = time.perf_counter()
    modules, datasets = _build_members(cfg, configs)
    if "n_classes" in cfg.data:  # loading filled data.n_classes etc.: the members' configs carry the values now
        configs, settings = pop.member_dicts(cfg, settings)
    try:
        model = stack(modules)
    except NotStackable as exc:
        print(f"note: model {models.label(cfg.model)} cannot be stacked ({exc}); training its {len(configs)} "
              "members one after another", flush=True)
        return _sequential(cfg, [OmegaConf.create(c) for c in configs], settings, start)
    return _stacked(cfg, configs, settings, model, datasets, start, callbacks or [])


def _build_members(cfg, configs) -> tuple[list, list]:
    """Each member's model built exactly as its standalone run builds it: seeded, data loaded, model made."""
    modules, datasets, loaded = [], [], {}
    data_seed = configs[0]["seed"] if cfg.population.shared_order else None
    for member in configs:
        pl.seed_everything(member["seed"], workers=True, verbose=False)
        seed = member["seed"] if data_seed is None else data_seed
        if seed not in loaded:  # the loaders draw from their own generators, not the global one
            loaded[seed] = data.load(cfg.data, seed)
        datasets.append((seed, loaded[seed]))
        if loaded[seed].datamodule is not None:  # its loaders batch and order; stacked members need our batches
            raise ConfigError(f"population: data._target_ {data.label(cfg.data)} is a LightningDataModule, whose own "
                              "loaders a population cannot stack; return its (train, val) Datasets instead")
        modules.append(models.build(cfg.model, loaded[seed]))
    return modules, datasets


def _stacked(cfg, configs, settings, model, datasets, start, extra: list) -> PopulationResult:
    seeds = [seed for seed, _ in datasets]
    parts = [d for _, d in datasets]
    orders = _order.for_members([c["data"] for c in configs], parts)  # data.order: each member's standalone order
    task = PopulationTask(cfg, configs, model, parts[0].task, stacked_data(parts, seeds, "train"),
                          stacked_data(parts, seeds, "val"), orders)
    # threads by the stack's size, whose every operation is K members' (set_threads: one for small models, whose
    # operations are too small to split); a study's worker has already taken its share of the cores. K = 144 MNIST-1D
    # MLPs (2.2M parameters) trained in 6.3 s on 2 threads, 12.2 s on one; trainer.threads=N overrides
    set_threads(cfg, model)
    names = _metric_names(task)
    if cfg.objective not in names:
        raise ConfigError(f"objective must be one of {', '.join(names)}, got {cfg.objective!r}")
    check_monitor(cfg, names)
    out = output_dir(cfg)
    logger = _logger(cfg, configs, settings)
    rates = MemberRates(len(configs), int(cfg.logger.get("eff_lr_every_n_steps", 25)),
                        bool(cfg.logger.get("eff_lr_heatmap", True))) if logger else None
    kwargs = trainer_kwargs(cfg)
    progress = Progress(task, cfg.objective, print_lines=not kwargs["enable_progress_bar"])
    callbacks = [progress] + ([rates] if rates else []) + extra + member_early_stopping(cfg, len(configs))
    if cfg.checkpoint.enabled:
        callbacks.append(pl.callbacks.ModelCheckpoint(out / "checkpoints", save_top_k=0, save_last=True))
    trainer = make_trainer(kwargs, logger=logger or False, callbacks=callbacks, default_root_dir=out,
                           enable_checkpointing=bool(cfg.checkpoint.enabled))
    if logger is not None:
        logger.log_hyperparams(_resolved(cfg))
        task.on_stopped = lambda k, status, reason: _end_member(logger, rates, task, configs, out, k, status, reason)
    try:
        trainer.fit(task)
    except BaseException as exc:
        if logger is not None:  # each member keeps its artifacts so far, as a standalone run that fails does
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            reason = "interrupted" if status == "KILLED" else f"{type(exc).__name__}: {exc}"
            for k in task.alive():
                _end_member(logger, rates, task, configs, out, k, status, reason)
            logger.close(status, reason, spill=out / "undelivered_metrics.jsonl")
        raise
    result = _result(cfg, task, logger, settings, out, time.perf_counter() - start)
    if logger is not None:
        for k in task.alive():
            _end_member(logger, rates, task, configs, out, k, "FINISHED", None)
        table = write_table(result, out / "population.csv")
        logger.close("FINISHED", artifacts=[table], spill=out / "undelivered_metrics.jsonl")
    return result


def _metric_names(task: PopulationTask) -> tuple[str, ...]:
    """The metrics a member logs, as ``Task.metric_names`` gives a standalone run's."""
    extra = {"classification": ("val_acc",), "language_model": ("val_ppl",)}.get(task.task, ())
    if task.task == "objective":
        extra = tuple(task.model.metrics()[0])
    return ("train_loss", "val_loss", *extra)


def _logger(cfg, configs, settings):
    if cfg.logger.name == "none":
        return None
    from optstudy.population.tracking import PopulationLogger

    tags = {"optimizer": cfg.optimizer.name, "model": models.label(cfg.model), "data": data.label(cfg.data),
            "mlflow.source.git.commit": git_commit()}
    extra = flatten(OmegaConf.to_container(cfg.tags, resolve=True))
    members = [{"run_name": _run_name(m), "params": m,
                "tags": {**tags, **flatten(m.get("tags") or {}), "population.setting": pop.label(s)}}
               for m, s in zip(configs, settings)]
    parent = cfg.logger.get("run_name") or f"{cfg.optimizer.name} population of {len(configs)}"
    return PopulationLogger(tracking_uri(cfg.logger.get("tracking_uri")), cfg.logger.experiment, parent,
                            {**tags, **extra}, members, outage_wait=float(cfg.logger.get("outage_wait", 60)))


def _end_member(logger, rates, task, configs, out: Path, k: int, status: str, reason: str | None) -> None:
    """Member k's artifacts (its config, effective-lr histograms and heatmap, an objective's trajectory), then its
    run ended."""
    directory = out / f"member-{k}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(to_yaml(configs[k]))
    paths = [directory / "config.yaml"]
    if rates is not None:
        paths += rates.recorders[k].save(directory, None, _run_name(configs[k]))
    if task.trajectories[k]:
        trajectory = Trajectory()
        trajectory.rows = task.trajectories[k]
        paths += trajectory.save(directory, task.model.member(task.row(k)), _run_name(configs[k]))
    if status == "KILLED" and k in task.stopped:  # pruned by a study: tagged as a pruned standalone run is
        logger.experiment.set_tag(logger.run_ids[k], "optuna.pruned", "true")
    logger.close_member(k, status, reason, artifacts=paths, spill=directory / "undelivered_metrics.jsonl")


def _result(cfg, task, logger, settings, out, seconds) -> PopulationResult:
    members = []
    for k, setting in enumerate(settings):
        metrics = dict(task.last[k])
        pruned = None if k in task.early else task.stopped.get(k)  # early stopping ends a member, not prunes it
        members.append(Member(setting, metrics.get(cfg.objective, float("nan")), metrics,
                              logger.run_ids[k] if logger else None, task.diverged.get(k), pruned))
    return PopulationResult(members, logger.parent_run_id if logger else None, logger.uri if logger else None, out,
                            seconds, sequential=False, compactions=tuple(task.compactions))


def _sequential(cfg, configs, settings, start) -> PopulationResult:
    """Members one after another as standalone runs, each nested under a parent run (tagged as the stacked ones)."""
    from optstudy.train import train

    parent = None
    if cfg.logger.name != "none":
        from optstudy.tracking import MLflowLogger

        parent = MLflowLogger(tracking_uri(cfg.logger.get("tracking_uri")), cfg.logger.experiment,
                              f"{cfg.optimizer.name} population of {len(configs)}",
                              {"optimizer": cfg.optimizer.name, "model": models.label(cfg.model),
                               "data": data.label(cfg.data),
                               "population.size": len(configs)})
        parent.log_hyperparams(_resolved(cfg))
    results = []
    for k, (member, setting) in enumerate(zip(configs, settings)):
        if parent is not None:
            member = OmegaConf.merge(member, {"tags": {"mlflow.parentRunId": parent.run_id,
                                                       "population.parent": parent.run_id, "population.member": k,
                                                       "population.setting": pop.label(setting)}})
        try:
            r = train(member)
            results.append(Member(setting, r.value, r.metrics, r.run_id, None))
        except Diverged as exc:
            results.append(Member(setting, float("nan"), {}, None, str(exc)))
    out = output_dir(cfg)
    result = PopulationResult(results, parent and parent.run_id, parent and parent.uri, out,
                              time.perf_counter() - start, sequential=True)
    if parent is not None:
        parent.close("FINISHED", artifacts=[write_table(result, out / "population.csv")])
    return result


class _Dumper(getattr(yaml, "CDumper", yaml.Dumper)):
    """OmegaConf's dumper (its rule for quoting strings) on libyaml's emitter: 5x faster, the same text."""


_Dumper.add_representer(str, OmegaConfDumper.str_representer)


def to_yaml(config: dict) -> str:
    """A member's plain config as ``OmegaConf.to_yaml`` writes it, in ~6 ms instead of ~30 (``OmegaConf.to_yaml``
    first makes a DictConfig, then emits in pure Python): 144 members' configs took 4 s of a population's end."""
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _run_name(member: dict) -> str:
    """``run_name`` of a member's plain config."""
    return run_name(member)


class MemberRates(pl.Callback):
    """``EffectiveLR`` per member: one ``lr_histogram`` of the population every ``every`` steps (and after the first
    and the last), each member's quantiles to its run and its histograms kept for its heatmap."""

    def __init__(self, k: int, every: int, draw: bool = True):
        self.every = every
        self.recorders = [EffectiveLR(every, draw=draw) for _ in range(k)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every == 0 or step == 1:
            self._record(trainer, module, step)

    def on_train_end(self, trainer, module):
        step = trainer.global_step
        if step > 0 and self.recorders[0].steps[-1:] != [step]:
            self._record(trainer, module, step)

    def _record(self, trainer, module, step: int) -> None:
        opt = trainer.optimizers[0]
        hists = lr_histogram(opt)
        bounds = [opt.bounds(g, step) for g in opt.param_groups] if hasattr(opt, "bounds") else None
        rows = {}
        for k in module.alive():
            r = module.row(k)  # its row in the stack: fewer rows than members once stopped ones are cut
            hist, recorder = hists[r], self.recorders[k]
            rows[k] = {f"eff_lr/g{g}/{q}": v for g in range(hist.counts.shape[0]) for q, v in summary(hist, g).items()}
            recorder.steps.append(step)
            recorder.records.append(hist)
            if bounds is not None:
                recorder.bounds.append([[_member(lo, r), _member(hi, r)] for lo, hi in bounds])
        if trainer.logger is not None:
            trainer.logger.log_member_metrics(rows, step)


def _member(value, k: int) -> float:
    return float(value[k]) if getattr(value, "ndim", 0) else float(value)


class Progress(pl.Callback):
    """One line per epoch for the whole population: the objective's best, median and worst member."""

    def __init__(self, task: PopulationTask, objective: str, print_lines: bool):
        self.task, self.objective, self.print_lines = task, objective, print_lines

    def on_train_epoch_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if not self.print_lines:
            return
        values = [self.task.last[k].get(self.objective) for k in self.task.alive()]
        values = sorted(v for v in values if v is not None)
        better_high = self.objective == "val_acc"
        shown = "no member left" if not values else (
            f"{self.objective} best {(values[-1] if better_high else values[0]):.4f}  median "
            f"{statistics.median(values):.4f}  worst {(values[0] if better_high else values[-1]):.4f}")
        gone = f"  diverged {len(self.task.diverged)}" if self.task.diverged else ""
        if len(self.task.rows) < self.task.k:
            gone += f"  stack of {len(self.task.rows)}"
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  step {trainer.global_step}  "
              f"{len(self.task.alive())} members  {shown}{gone}  ({time.perf_counter() - self._start:.1f}s)",
              flush=True)


def write_table(result: PopulationResult, path: Path) -> Path:
    """One row per member: what it sets, its final metrics, its run, whether it diverged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for m in result.members for k in m.metrics})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["member", *result.members[0].setting, *keys, "run_id", "diverged"])
        for k, m in enumerate(result.members):
            writer.writerow([k, *m.setting.values(), *(m.metrics.get(key, "") for key in keys), m.run_id or "",
                             m.diverged or ""])
    return path


def summary_table(result: PopulationResult, objective: str) -> str:
    """The members sorted by objective (best first), as printed at the end of ``train.py``."""
    better_high = objective == "val_acc"
    order = sorted(range(len(result.members)), key=lambda k: _rank(result.members[k], better_high))
    lines = [f"{'member':>6}  {'setting':<40} {objective:>12}  run"]
    for k in order:
        m = result.members[k]
        value = "diverged" if m.diverged else f"{m.value:.6g}"
        lines.append(f"{k:>6}  {pop.label(m.setting):<40} {value:>12}  {m.run_id or ''}")
    return "\n".join(lines)


def _rank(member: Member, better_high: bool) -> tuple:
    if member.diverged or member.value != member.value:
        return (1, 0.0)
    return (0, -member.value if better_high else member.value)


def report(result: PopulationResult, cfg: DictConfig) -> None:
    """The end of ``train.py`` for a population: the table, where the runs are, exit 3 if every member diverged."""
    print(summary_table(result, cfg.objective), flush=True)
    how = "one after another" if result.sequential else "as one population"
    where = ""
    if result.parent_run_id:
        where = f"; parent run {result.parent_run_id}, open it with: {ui_command(result.tracking_uri)}"
    print(f"{len(result.members)} members trained {how} in {result.seconds:.1f}s{where}", flush=True)
    if all(m.diverged for m in result.members):
        raise Diverged(f"every member of the population diverged (first: {result.members[0].diverged})")
