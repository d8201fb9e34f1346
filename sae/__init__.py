"""Sparse autoencoders on Gemma activations: the library behind the batch jobs.

Nothing here knows about jobs, command lines or cloud submission.
"""

__version__ = "0.1.0"
