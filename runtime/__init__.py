"""Runtime: loads exported artifacts and runs prefill and decode with a managed KV cache."""
