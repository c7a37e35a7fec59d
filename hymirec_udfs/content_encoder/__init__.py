"""Stage ``train_content_encoder`` (METHOD stage 1): the content LLM fine-tuned with the
recommendation loss.
"""
