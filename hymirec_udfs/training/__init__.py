"""Distributed-training plumbing shared by stage 1 and stage 2: DDP process setup, rank
shards, checkpoints and RNG state, optimiser and schedule, the TorchDistributor
launcher.
"""
