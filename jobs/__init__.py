"""The contract both sides share: schema, batch states, Redis key layout, the batch store, chunk jobs,
the workers registry, and the input formats with their validation.

Nothing here imports torch or transformers, so producers start fast on hosts without a GPU stack.
"""
