"""The multi-task fine-tuning suite (``benchmarks/e2e_suite.py``): does GeLoRA beat uniform LoRA?

One job per module: ``sources`` fetches and reads the corpora, ``tasks`` defines the tasks (splits,
metrics), ``model`` the encoder with its head and the batches, ``methods`` the adapters and their
preparation, ``runner`` the resumable cells and the results file, ``report`` the tables and the plot.
"""
