"""Test-wide settings: one torch thread (much faster than oversubscribing a small shared machine)."""

import torch

torch.set_num_threads(1)
