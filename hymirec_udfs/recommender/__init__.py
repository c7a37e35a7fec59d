"""Stage ``train`` (METHOD stage 2): the item store, HyMiRec and its baselines, DMIL, the
data loader and the training loop.
"""
