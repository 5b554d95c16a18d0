from hpcvae.cli import run_cli
from hpcvae.evaluate.cli import main

if __name__ == "__main__":
    run_cli(main, "hpcvae.evaluate")
