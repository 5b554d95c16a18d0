#!/bin/bash

# Parameters
#SBATCH --account=astro-vae
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=4
#SBATCH --job-name=galaxy-vae
#SBATCH --mail-type=END,FAIL
#SBATCH --mem=200GB
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=<RUN>/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --signal=USR2@120
#SBATCH --time=120
#SBATCH --wckey=submitit

# setup
module load cuda/12.4
source $HOME/venvs/hpcvae/bin/activate
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=WARN
export OMP_NUM_THREADS=8
export NCCL_IB_TIMEOUT=22

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <RUN>/slurm/%j_%t_log.out --cpu-bind=none <PYTHON> -u -m submitit.core._submit <RUN>/slurm
