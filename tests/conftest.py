"""Shared test set-up: deterministic threads so results do not depend on the machine."""

import torch

torch.set_num_threads(2)
