"""Stage ``embed_items``: the content encoder (transformers, pooling, model id) and its
pandas UDF.
"""
