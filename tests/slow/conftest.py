"""Load and soak tests reuse the integration stacks (real redis-server, worker, gunicorn API)."""
from tests.integration.conftest import tiny_model_dir  # noqa: F401  (a fixture)
