"""Stage ``recommend``: per as-of date, every user's interest embeddings and top-K items
from the served model, retrieved from today's item index (exact, or faiss ANN).
"""
