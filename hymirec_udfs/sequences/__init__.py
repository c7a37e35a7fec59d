"""Stage ``build_sequences``: per-user time-ordered histories and training samples.
"""
