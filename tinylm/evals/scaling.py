"""Scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal frontier.

The fit is Hoffmann et al. 2022 ("Chinchilla"), approach 3 (sec. 3.3 and app. D.2): with a = log A,
b = log B, e = log E the predicted log-loss is the log-sum-exp LSE(a - alpha log N, b - beta log D, e),
and the parameters minimise the sum over runs of Huber_delta(predicted log-loss - log observed loss),
delta = 1e-3, by L-BFGS from every point of a grid of starting values; the best end point is kept.

Under a compute budget C = 6 N D (Kaplan et al. 2020, sec. 2.1) the loss is smallest at
N_opt(C) = G (C / 6)^(beta / (alpha + beta)), D_opt(C) = G^-1 (C / 6)^(alpha / (alpha + beta)),
G = (alpha A / (beta B))^(1 / (alpha + beta)) (Hoffmann et al. 2022, eq. 4): setting the derivative of
E + A N^-alpha + B (C / 6N)^-beta in N to zero.

Pure numpy and scipy (the `scaling` extra); matplotlib draws the plot. No torch: a fit runs anywhere.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tinylm.core.errors import TinylmError, optional_import

# Hoffmann et al. 2022, app. D.2: the grid of initialisations and the Huber delta.
CHINCHILLA_GRID: dict[str, Sequence[float]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
HUBER_DELTA = 1e-3
N_PARAMS = 5  # E, A, alpha, B, beta: a fit needs at least as many runs


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, N parameters and D training tokens."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n: Any, d: Any) -> np.ndarray:
        """The predicted loss of N parameters trained on D tokens (arrays broadcast).

        Args:
            n: parameters.
            d: training tokens.
        """
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def has_optimum(self) -> bool:
        """Whether loss falls with both N and D (alpha, beta > 0): otherwise no split of C is best."""
        return self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0

    def optimal(self, flops: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt): the split of C = 6 N D FLOPs with the lowest loss (Hoffmann et al. 2022, eq. 4).

        Args:
            flops: the compute budget C in FLOPs (arrays allowed).
        """
        if not self.has_optimum:
            raise TinylmError(f"the fitted law has alpha {self.alpha:.3g}, beta {self.beta:.3g}: with an exponent "
                              f"<= 0 there is no compute-optimal size (the runs do not show loss falling with both)")
        c = np.asarray(flops, dtype=float) / 6
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        s = self.alpha + self.beta
        return g * c ** (self.beta / s), c ** (self.alpha / s) / g

    def tokens_per_param(self, flops: Any) -> np.ndarray:
        """D_opt / N_opt at C FLOPs; constant in C only when alpha == beta.

        Args:
            flops: the compute budget C in FLOPs.
        """
        n, d = self.optimal(flops)
        return d / n

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Fit:
    """A fitted law and how the fit went."""

    law: ScalingLaw
    log: dict[str, float]  # the optimised parameters: a = log A, alpha, b = log B, beta, e = log E (E may underflow)
    objective: float  # the summed Huber loss at the best end point
    points: int  # runs fitted
    starts: int  # grid points L-BFGS started from
    converged: int  # starts whose L-BFGS run reported success
    delta: float  # the Huber delta


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber's loss of residuals r: r^2 / 2 within delta, delta (|r| - delta / 2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient in
    theta = (a, alpha, b, beta, e); the gradient by hand (the chain rule through the log-sum-exp), so that
    L-BFGS needs no finite differences over thousands of starts."""
    a, alpha, b, beta, e = theta
    t_n, t_d = a - alpha * log_n, b - beta * log_d  # (runs,) the log of each term
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - log_l  # (runs,) residuals of the log-loss
    c = np.minimum(np.maximum(r, -delta), delta)  # Huber'(r); Huber(r) = c (r - c / 2)
    dr = c / total  # d LSE / d term = w / total (a softmax)
    g_n, g_d = dr * w_n, dr * w_d
    grad = np.array([g_n.sum(), -(g_n @ log_n), g_d.sum(), -(g_d @ log_d), (dr * w_e).sum()])
    return float(c @ (r - 0.5 * c)), grad


def check_enough(runs: int) -> None:
    """A fit needs at least as many runs as the law has parameters.

    Args:
        runs: how many runs there are.
    """
    if runs < N_PARAMS:
        raise TinylmError(f"{runs} runs are too few to fit L(N, D) = E + A/N^alpha + B/D^beta: it has "
                          f"{N_PARAMS} parameters, so at least {N_PARAMS} runs (more sizes or budgets)")


def fit_law(n: Sequence[float], d: Sequence[float], loss: Sequence[float], delta: float = HUBER_DELTA,
            grid: dict[str, Sequence[float]] | None = None) -> Fit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs (Hoffmann et al. 2022, approach 3).

    Args:
        n: each run's parameters.
        d: each run's training tokens.
        loss: each run's final loss (nats per token, > 0).
        delta: the Huber delta on log-loss residuals (Chinchilla: 1e-3).
        grid: starting values of alpha, beta, e, a, b (default CHINCHILLA_GRID, 4500 starts).
    """
    minimize = optional_import("scipy.optimize", "scaling", "fitting a scaling law").minimize
    threadpool_limits = optional_import("threadpoolctl", "scaling", "fitting a scaling law").threadpool_limits
    n_, d_, l_ = (np.asarray(x, dtype=float) for x in (n, d, loss))
    if not n_.shape == d_.shape == l_.shape or n_.ndim != 1:
        raise TinylmError("a scaling fit needs one parameter count, token count and loss per run")
    check_enough(len(l_))
    if not (np.all(np.isfinite(np.stack([n_, d_, l_]))) and (n_ > 0).all() and (d_ > 0).all() and (l_ > 0).all()):
        raise TinylmError("a scaling fit needs positive, finite parameter counts, token counts and losses")
    args = (np.log(n_), np.log(d_), np.log(l_), delta)
    g = grid or CHINCHILLA_GRID
    best, starts, converged = None, 0, 0
    # One BLAS thread: L-BFGS-B's vector updates are 5 long, and a threaded OpenBLAS made each iteration
    # 50x slower on a busy 2-core machine (20 ms instead of 0.4 ms).
    with threadpool_limits(limits=1, user_api="blas"):
        for alpha, beta, e, a, b in itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"]):
            res = _descend(minimize, np.array([a, alpha, b, beta, e]), args)
            starts += 1
            converged += bool(res.success)
            if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
    a, alpha, b, beta, e = best.x
    law = ScalingLaw(E=math.exp(e), A=math.exp(a), alpha=float(alpha), B=math.exp(b), beta=float(beta))
    log = {"a": float(a), "alpha": float(alpha), "b": float(b), "beta": float(beta), "e": float(e)}
    return Fit(law, log, float(best.fun), len(l_), starts, converged, delta)


def _descend(minimize: Any, x0: np.ndarray, args: tuple[Any, ...]) -> Any:
    """One L-BFGS run from x0. ftol 1e-15: scipy's test is relative to max(|f|, 1), and a Huber sum over
    1e-3 residuals is ~1e-5, so the default (2e-9) stops far from the optimum (Besiroglu et al. 2024,
    "Chinchilla scaling: a replication attempt", find Chinchilla's own fit stopped early this way)."""
    return minimize(_objective, x0, args=args, jac=True, method="L-BFGS-B",
                    options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 1000})


def frontier(law: ScalingLaw, flops: Sequence[float]) -> list[dict[str, float]]:
    """The compute-optimal point at each budget: C, N_opt, D_opt, D_opt / N_opt, and the predicted loss.

    Args:
        law: a fitted law.
        flops: compute budgets C = 6 N D.
    """
    c = np.asarray(flops, dtype=float)
    n, d = law.optimal(c)
    return [{"flops": float(ci), "params": float(ni), "tokens": float(di), "tokens_per_param": float(di / ni),
             "loss": float(law.loss(ni, di))} for ci, ni, di in zip(c, n, d)]


# ----- the plot -------------------------------------------------------------------------------------------

def plot_ladder(runs: list[dict[str, Any]], law: ScalingLaw | None, png: Path) -> None:
    """Three panels: loss vs tokens per model size with the fitted curves; loss vs compute with the
    compute-optimal frontier; N_opt and D_opt vs compute. Without a law, the runs' points only.

    Args:
        runs: records with "params", "tokens", "loss" and "flops".
        law: the fitted law, or None.
        png: the image to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    sizes = sorted({r["params"] for r in runs})
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(sizes))))
    d_all = np.array([r["tokens"] for r in runs], dtype=float)
    c_all = np.array([r["flops"] for r in runs], dtype=float)
    for size, colour in zip(sizes, colours):
        mine = sorted((r for r in runs if r["params"] == size), key=lambda r: r["tokens"])
        label = f"N = {_si(size)}"
        axes[0].plot([r["tokens"] for r in mine], [r["loss"] for r in mine], "o", color=colour, label=label)
        axes[1].plot([r["flops"] for r in mine], [r["loss"] for r in mine], "o", color=colour, label=label)
        if law is not None:
            d = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
            axes[0].plot(d, law.loss(size, d), "-", color=colour, lw=1)
    if law is not None and law.has_optimum:
        c = np.geomspace(c_all.min() / 2, c_all.max() * 10, 100)
        n_opt, d_opt = law.optimal(c)
        axes[1].plot(c, law.loss(n_opt, d_opt), "k--", lw=1, label="compute-optimal (fit)")
        axes[2].plot(c, n_opt, "-", label="N_opt (parameters)")
        axes[2].plot(c, d_opt, "-", label="D_opt (tokens)")
        axes[2].plot(c_all, [r["params"] for r in runs], ".", color="gray", label="ladder runs (N)")
        axes[2].set_title(f"alpha {law.alpha:.3f}, beta {law.beta:.3f}; "
                          f"D/N at {_si(c_all.max())} FLOPs: {float(law.tokens_per_param(c_all.max())):.0f}")
    else:
        why = f"{len(runs)} runs: too few to fit {N_PARAMS} parameters" if law is None else \
            f"alpha {law.alpha:.3g}, beta {law.beta:.3g}: no compute-optimal point"
        axes[2].text(0.5, 0.5, why, ha="center", va="center", transform=axes[2].transAxes)
    for ax, xlabel in zip(axes, ("training tokens D", "compute C = 6ND (FLOPs)", "compute C = 6ND (FLOPs)")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("final val loss (nats/token)")
    axes[1].set_ylabel("final val loss (nats/token)")
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=100, format="png")  # png may be a temporary name without the suffix
    plt.close(fig)


def _si(x: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"
