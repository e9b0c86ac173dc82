"""`python -m block_transformer.uptrain RECIPE` = `bt-uptrain RECIPE`, for `accelerate launch -m` and `torchrun -m`."""

from .command import uptrain_cmd

if __name__ == "__main__":
    uptrain_cmd()
