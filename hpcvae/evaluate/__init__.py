"""``python -m hpcvae.evaluate``: how good is a trained model, in pictures and numbers.

Notebook API: :func:`evaluate` writes the whole report; :func:`moments` and the
``plot_*`` functions (each returns a matplotlib Figure) work on plain arrays.
"""

from __future__ import annotations

from hpcvae.evaluate.cli import main
from hpcvae.evaluate.markdown import render_markdown
from hpcvae.evaluate.moments import LANUSSE2021, STATS, compare, fit_slope, moments
from hpcvae.evaluate.plots import (
    plot_generation_grid,
    plot_latent_corner,
    plot_losses,
    plot_population,
    plot_reconstructions,
    plot_redshift_sweep,
    plot_redshift_trends,
    read_metrics,
)
from hpcvae.evaluate.plots_science import plot_morphology, plot_power_spectra, plot_response
from hpcvae.evaluate.report import EvalConfig, evaluate

__all__ = [
    "LANUSSE2021",
    "STATS",
    "EvalConfig",
    "compare",
    "evaluate",
    "fit_slope",
    "main",
    "moments",
    "plot_generation_grid",
    "plot_latent_corner",
    "plot_losses",
    "plot_morphology",
    "plot_power_spectra",
    "plot_response",
    "plot_population",
    "plot_reconstructions",
    "plot_redshift_sweep",
    "plot_redshift_trends",
    "read_metrics",
    "render_markdown",
]
