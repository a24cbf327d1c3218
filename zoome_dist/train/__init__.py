"""DeepSpeed training: ``run(cfg, shards, fold, out)`` is what the launcher, Ray and the tests call.

Importing it settles DeepSpeed's accelerator where ``DS_ACCELERATOR`` is unset, as DeepSpeed itself would
choose between the two this project runs on (cuda when torch sees a GPU, else cpu), without DeepSpeed's
warning that it "was unable to detect" a GPU on a CPU machine. The ranks it starts inherit the choice.
"""
import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.device_count() > 0 and torch.cuda.is_available() else "cpu"
