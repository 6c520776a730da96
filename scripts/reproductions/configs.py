"""Item 6: the GPU-scale experiment files (CIFAR-10, PTB, MNIST) and the numbers they report, docs/reproductions.md
section 6. No training.

Config: ``conf/experiment/{cifar10_cnn,cifar10_resnet34,cifar10_densenet121,ptb_lstm,mnist_logreg,mnist_mlp}.yaml``,
each composed as ``train.py`` would and its comments parsed for the results they report. Writes ``configs.json`` and
``configs.md``, the Markdown table that docs/reproductions.md includes as is (``tests/test_reproductions.py`` checks).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from ._common import ROOT, compose, write_json

GPU_EXPERIMENTS = ("cifar10_cnn", "cifar10_resnet34", "cifar10_densenet121", "ptb_lstm", "mnist_logreg", "mnist_mlp")
HEADER = ["| experiment file | command | settings (as composed) | reported numbers (from the file's comments) |",
          "|---|---|---|---|"]


def run(args) -> dict:
    """No training: each experiment file composed (its settings as train.py would use them) and the results its
    comments report, parsed from the file; written as a Markdown table that docs/reproductions.md includes as is."""
    data, rows = {}, []
    for name in GPU_EXPERIMENTS:
        data[name], row = _experiment(name)
        rows.append(row)
    markdown = "\n".join(HEADER + rows) + "\n"
    (args.out / "configs.md").write_text(markdown)
    print(markdown)
    write_json(args.out, "configs", data)
    return data


def _experiment(name: str) -> tuple[dict, str]:
    """One file: its JSON entry and its row of the table."""
    path = Path(str(resources.files("optstudy._conf") / "experiment" / f"{name}.yaml"))  # the repository's conf/
    cfg = compose(f"experiment={name}")
    opt = cfg.optimizer
    settings = {"model": cfg.model.name, "data": cfg.data.name, "batch": cfg.data.batch_size,
                "epochs": cfg.trainer.max_epochs, "optimizer": opt.name, "lr": opt.lr,
                "betas": list(opt.betas) if "betas" in opt else None, "final_lr": opt.get("final_lr"),
                "gamma": cfg.bound.get("gamma") if "final_lr" in opt else None, "weight_decay": opt.weight_decay,
                "scheduler": cfg.scheduler.name, "milestones": list(cfg.scheduler.milestones),
                "augment": cfg.data.get("augment"), "gradient_clip_val": cfg.trainer.gradient_clip_val,
                "layers": cfg.model.get("layers"), "trainer": cfg.trainer.accelerator, "objective": cfg.objective}
    reported, source = _reported(path.read_text())
    entry = {"file": str(path.relative_to(ROOT)), "settings": settings, "reported": reported,
             "reported_source": source}
    numbers = ("; ".join(reported) + f" — test accuracy at epoch 200 (best epoch in brackets), from {source}"
               if reported else f"none stated; the file: {source}" if source else "none stated")
    row = (f"| `{path.relative_to(ROOT)}` | `python train.py experiment={name}` | {', '.join(_settings(cfg, settings))}"
           f" | {numbers} |")
    return entry, row


def _reported(text: str) -> tuple[list[str], str]:
    """The file's comments: its "name acc% (best%)" results, and where they (or the lack of them) come from."""
    reported = [f"{m[0]} {m[1]}% ({m[2]}%)" for m in re.findall(r"(\w+)\s+(\d+\.\d+)%\s+\((\d+\.\d+)%\)", text)]
    comment = " ".join(line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#"))
    demo = re.search(r"\((demos/cifar10/curve/pretrained/[^)]*)\)", comment)
    said = re.search(r"(?:Reported|Paper's result): (.*?)(?:\.\s+[A-Z]|;|$)", comment)
    source = (f"the authors' demo's pretrained curves, github.com/Luolc/AdaBound {demo[1]}" if demo else
              said[1].strip() if said else "")
    return reported, source


def _settings(cfg, settings: dict) -> list[str]:
    """The table's "settings (as composed)" cell, in parts."""
    opt = cfg.optimizer
    parts = [cfg.model.name + (f" ({cfg.model.layers} layer; model.layers=2, 3)" if "layers" in cfg.model else ""),
             cfg.data.name + (" (crop + flip)" if settings["augment"] else ""), f"batch {settings['batch']}",
             f"{settings['epochs']} epochs",
             f"{opt.name} lr {opt.lr:g}" + (f", final_lr {opt.final_lr:g}, γ {settings['gamma']:g}"
                                            if settings["final_lr"] is not None else "")]
    if opt.weight_decay:
        parts.append(f"weight decay {opt.weight_decay:g}")
    if settings["scheduler"] == "multistep":
        parts.append("lr ×0.1 at epoch " + " and ".join(map(str, settings["milestones"])))
    elif settings["scheduler"] == "inv_sqrt":
        parts.append("lr/√t")
    if settings["gradient_clip_val"]:
        parts.append(f"gradient norm clipped at {settings['gradient_clip_val']:g}")
    parts.append(f"trainer={'gpu' if settings['trainer'] == 'gpu' else 'cpu'}")
    return parts
