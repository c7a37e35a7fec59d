"""Stages ``fit_codebook`` and ``encode_items``: balanced spherical k-means, the residual
codebook, its statistics and serialisation, distributed encoding.
"""
