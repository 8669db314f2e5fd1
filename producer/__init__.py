"""Producer side: read and validate inputs, submit batches, follow them; never imports torch."""
