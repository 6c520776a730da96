#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of under 8 minutes (issues 12-13): populations of K = 16...1024 members
# against one member at a time on the same GPU, peak GPU memory, `train.py trainer=gpu` on the default problem, and
# a population's members equal to their standalone optimizer steps on CUDA at float64.
#   benchmarks/gpu_check.sh            # from the repository root, with optstudy importable (e.g. PYTHONPATH=src)
# On a machine without CUDA it runs the same steps on the CPU with K <= 64 (what CI's `--help` test can afford).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    TRAINER=trainer=gpu; KS="16 256 1024"; SAMPLE=4
else
    echo "no CUDA device: the CPU steps only, K <= 64"
    TRAINER=trainer=cpu; KS="16 64"; SAMPLE=4
fi
$PY -c "import torch; print('torch', torch.__version__)"

echo "== a population's members equal their standalone steps (float64, 30 steps, loop and compiled)"
$PY - <<'PY'
import torch
import optstudy.optim as o
dev = "cuda" if torch.cuda.is_available() else "cpu"
K, shapes = 3, [(5, 3), (7,), (2, 3, 4)]
hp = {"adam": dict(lr=[1e-3, 1e-2, 3e-2], betas=[(0.9, 0.999), (0.8, 0.99), (0.85, 0.995)]),
      "nadam": dict(lr=[1e-3, 1e-2, 3e-2], momentum_decay=[4e-3, 0.0, 0.05]),
      "adabound": dict(lr=[1e-3, 1e-2, 3e-2], final_lr=[0.1, 0.05, 0.2]),
      "momentum": dict(lr=[1e-3, 1e-2, 3e-2], momentum=[0.9, 0.5, 0.0])}
worst = 0.0
for impl in ("loop", "compiled"):
    for name, h in hp.items():
        gen = torch.Generator().manual_seed(0)
        start = [torch.randn(K, *s, generator=gen, dtype=torch.float64) for s in shapes]
        pop = [p.to(dev).clone().requires_grad_() for p in start]
        alone = [[p[k].to(dev).clone().requires_grad_() for p in start] for k in range(K)]
        opt = o.build(name, pop, members=K, impl=impl, **h)
        singles = [o.build(name, alone[k], impl=impl, **{a: (v[k] if isinstance(v, list) else v) for a, v in h.items()})
                   for k in range(K)]
        for t in range(30):
            for ps, op in [(pop, opt)] + list(zip(alone, singles)):
                for p in ps:
                    p.grad = torch.sin(3 * p.detach()) + 0.1 * t
                op.step()
        for k in range(K):
            for a, b in zip(pop, alone[k]):
                worst = max(worst, ((a[k] - b).abs() / b.abs().clamp(min=1e-12)).max().item())
print(f"{dev}: largest relative difference member vs standalone: {worst:.2e} (bound 1e-12): "
      f"{'PASS' if worst <= 1e-12 else 'FAIL'}")
PY

if [ "$TRAINER" = trainer=gpu ]; then
    echo "== optimizer step on the GPU (ResNet-18's shapes; torch's fused/foreach against ours)"
    $PY benchmarks/optimizer_step.py --device cuda --names sgd,adam,adabound,rmsprop --repeats 5
fi

echo "== train.py $TRAINER on the default problem (3 epochs)"
$PY train.py $TRAINER logger=none trainer.max_epochs=3 checkpoint.enabled=false

echo "== populations against one member at a time (Adam, K learning rates, 3 epochs)"
$PY benchmarks/population_train.py --problems digits_mlp mnist1d_mlp digits_cnn --ks $KS --epochs 3 \
    --sequential-sample $SAMPLE -- $TRAINER
