"""On-demand stage ``ablations``: HyMiRec and each ablation switch of the paper's Table 4,
trained and compared.
"""
