"""Adam and AMSGrad (one class, a flag), AdaMax and NAdam."""

from __future__ import annotations

import torch

from optstudy.optim._base import CoreOptimizer
from optstudy.optim._pieces import coupled_decay, ema_, ema_sq_, max_, num, sqrt
from optstudy.optim._rules import fail


def _adam_kernel(p, g, m, v, *v_max, step_size, bc2_sqrt, beta1, beta2, gain1, gain2, eps, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    ema_(m, g, beta1, gain1)
    ema_sq_(v, g, beta2, gain2)
    if v_max:
        v = max_(v_max[0], v)
    p.sub_(m / (v.sqrt() / bc2_sqrt + eps) * step_size)


class _AdamBase(CoreOptimizer):
    """Bias corrections shared by the Adam family: ``bc1 = 1-β1^t``, ``bc2 = 1-β2^t``."""

    TORCH_FLAGS = dict(foreach=None, differentiable=False, capturable=False)

    @staticmethod
    def corrections(group, state) -> tuple[float, float]:
        beta1, beta2 = group["betas"]
        t = state["step"]
        return 1 - beta1**t, 1 - beta2**t


class Adam(_AdamBase):
    r"""Adam (Kingma & Ba, 2015) and, with ``amsgrad=True``, AMSGrad (Reddi et al., 2018)::

        m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  amsgrad: v̄ ← max(v̄, v), v ← v̄
        θ ← θ - η·(m/bc1) / (√(v/bc2) + ε)
        bc1 = 1-β1^t, bc2 = 1-β2^t;  bias_correction=False: bc1 = bc2 = 1

    Equal to ``torch.optim.Adam(amsgrad=...)`` (the max is over the raw v, as torch and the AdaBound code; optax
    takes it over v̂). With ``decoupled_weight_decay=True`` equal to ``torch.optim.AdamW``. Defaults lr=1e-3,
    betas=(0.9, 0.999), eps=1e-8, bias_correction=True. Effective learning rate ``η/bc1 / (√(v/bc2) + ε)``;
    direction ``m``.

    ``bias_correction=False`` drops both corrections, the ablation of the Adam paper's Sec. 6.4 (Fig. 4). m and v
    start at 0, so early on they are the moments times 1-β1^t and 1-β2^t; with β2 near 1, √(1-β2^t) is far below
    1-β1^t, and for a constant gradient the step is η·(1-β1^t)/√(1-β2^t): at β2 = 0.9999, 100·η at t = 1 with
    β1 = 0, and up to 21·η (t ≈ 12) with β1 = 0.9. torch.optim has no such switch; here it is a group value like
    the others.
    """

    name = "adam"
    DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                    bias_correction=True, maximize=False)
    FIXED = dict(amsgrad=False)
    TORCH_FLAGS = dict(foreach=None, differentiable=False, capturable=False, fused=None)
    kernel = staticmethod(_adam_kernel)

    def prepare_group(self, group):
        super().prepare_group(group)
        if not isinstance(group["bias_correction"], bool):
            raise fail(f"optimizer {self.name}", "bias_correction", "must be true or false", group["bias_correction"])

    def buffers(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    def scalars(self, group, state):
        bc1, bc2 = self.corrections(group, state) if group["bias_correction"] else (1.0, 1.0)
        beta1, beta2 = group["betas"]
        return dict(step_size=group["lr"] / bc1, bc2_sqrt=sqrt(bc2), beta1=beta1, beta2=beta2, gain1=1 - beta1,
                    gain2=1 - beta2, eps=num(group["eps"]))

    def effective_lr(self, p, state, group, s):
        v = state.get("max_exp_avg_sq", state["exp_avg_sq"])
        return s["step_size"] / (v.sqrt() / s["bc2_sqrt"]).add_(s["eps"])


class AMSGrad(Adam):
    __doc__ = Adam.__doc__
    name = "amsgrad"
    FIXED = dict(amsgrad=True)


def _adamax_kernel(p, g, m, u, *, clr, beta1, beta2, gain1, eps, wd, decay):
    g = coupled_decay(p, g, wd, decay)
    ema_(m, g, beta1, gain1)
    u.copy_(torch.maximum(u * beta2, g.abs() + eps))
    p.sub_(m / u * clr)


class Adamax(_AdamBase):
    r"""AdaMax (Kingma & Ba, 2015, section 7.1), Adam with the infinity norm::

        m ← β1·m + (1-β1)·g;  u ← max(β2·u, |g| + ε);  θ ← θ - (η/bc1)·m/u

    Equal to ``torch.optim.Adamax`` (ε inside the max, as torch); defaults lr=2e-3, betas=(0.9, 0.999), eps=1e-8.
    Effective learning rate ``η/bc1/u``; direction ``m``.
    """

    name = "adamax"
    DEFAULTS = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                    maximize=False)
    kernel = staticmethod(_adamax_kernel)

    def buffers(self, group):
        return ("exp_avg", "exp_inf")

    def scalars(self, group, state):
        bc1, _ = self.corrections(group, state)
        beta1, beta2 = group["betas"]
        return dict(clr=group["lr"] / bc1, beta1=beta1, beta2=beta2, gain1=1 - beta1, eps=num(group["eps"]))

    def effective_lr(self, p, state, group, s):
        return s["clr"] / state["exp_inf"]


def _nadam_kernel(p, g, m, v, *, c_g, c_m, bc2, beta1, beta2, gain1, gain2, eps, wd, decay, **_):  # _: lr, mu, ...
    g = coupled_decay(p, g, wd, decay)
    ema_(m, g, beta1, gain1)
    ema_sq_(v, g, beta2, gain2)
    d = (v / bc2).sqrt() + eps
    p.add_(g / d * c_g + m / d * c_m)


class NAdam(_AdamBase):
    r"""NAdam (Dozat, 2016) with torch's momentum schedule::

        μ_t = β1·(1 - ½·0.96^(tψ));  Π_t = μ_1···μ_t;  m, v as Adam;  d = √(v/bc2) + ε
        θ ← θ - η·(1-μ_t)/(1-Π_t)·g/d - η·μ_{t+1}/(1-Π_t·μ_{t+1})·m/d

    Equal to ``torch.optim.NAdam`` (``momentum_decay=0`` gives momentum ½·β1, not β1, as torch). Defaults lr=2e-3,
    betas=(0.9, 0.999), eps=1e-8, momentum_decay ψ=4e-3. Effective learning rate ``η/d``; direction the look-ahead
    momentum ``(1-μ_t)/(1-Π_t)·g + μ_{t+1}/(1-Π_t·μ_{t+1})·m``.
    """

    name = "nadam"
    DEFAULTS = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3,
                    decoupled_weight_decay=False, maximize=False)
    kernel = staticmethod(_nadam_kernel)
    TENSOR_COUNTS = ("step", "mu_product")

    def buffers(self, group):
        return ("exp_avg", "exp_avg_sq")

    def init_state(self, p, state, group):
        super().init_state(p, state, group)
        state["mu_product"] = 1.0

    def state_key(self, state):
        return (state["step"], state["mu_product"])

    def scalars(self, group, state):
        beta1, beta2 = group["betas"]
        t, psi, lr = state["step"], group["momentum_decay"], group["lr"]
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        prod = state["mu_product"] * mu
        return dict(c_g=-lr * (1.0 - mu) / (1.0 - prod), c_m=-lr * mu_next / (1.0 - prod * mu_next),
                    bc2=1 - beta2**t, beta1=beta1, beta2=beta2, gain1=1 - beta1, gain2=1 - beta2,
                    eps=num(group["eps"]), lr=lr,
                    mu_product=prod, mu=mu)

    def after_kernel(self, state, group, s):
        if isinstance(state["mu_product"], torch.Tensor):
            # under torch.compile: the same tensor (a new one would be recompiled for), by ``*=``, the same product
            # as s["mu_product"]; torch 2.13 loses mul_/copy_ into a 0-d float64 input there, but not ``*=``
            state["mu_product"] *= s["mu"]
        else:
            state["mu_product"] = s["mu_product"]

    def effective_lr(self, p, state, group, s):
        return s["lr"] / state["exp_avg_sq"].div(s["bc2"]).sqrt().add_(s["eps"])
