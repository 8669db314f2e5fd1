"""The contract both sides share: schema, batch states, Redis key layout, RQ entry points.

Nothing here imports torch or transformers, so producers start fast on hosts without a GPU stack.
"""
