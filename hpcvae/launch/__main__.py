from hpcvae.cli import run_cli
from hpcvae.launch.cli import main

if __name__ == "__main__":
    run_cli(main, "hpcvae.launch")
