"""`batchgen serve`: the OpenAI Files + Batches HTTP API and a live dashboard over the same Redis.

Importing this package imports no web stack; producer/serve/app.py does.
"""
