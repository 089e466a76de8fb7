"""The format-neutral core both dialects stand on: the served models (`models`), submitting jobs and
relaying their events (`service`, `replies`, `queue`, `reaping`), a request before validation
(`request`) and tgq's parameter rules (`validation`), output constraints (`constraints`), the handler
plumbing (`handlers`, `state`, `streams`, `timing`) and the request metrics (`metrics`). Nothing here
knows a wire format: no dialect is imported."""
