"""``python -m hpcvae.synth``."""

from hpcvae.cli import run_cli
from hpcvae.synth import main

if __name__ == "__main__":
    run_cli(main, "hpcvae.synth")
