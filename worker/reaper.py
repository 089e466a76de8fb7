"""Kept for imports: the reaper lives in `common.reaper` (workers and API processes both reap)."""
from common.reaper import reap_expired, reap_stranded

__all__ = ["reap_expired", "reap_stranded"]
