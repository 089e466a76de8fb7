"""A paged KV cache: fixed-size blocks in one pool, per-row block tables, and prefix caching over them."""
