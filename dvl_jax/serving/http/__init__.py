"""`dvl serve`'s HTTP layer: an OpenAI-compatible FastAPI app over one `dvl.Engine`.

`create_app(engine, processor, Settings(...), slots=)` (`app.py`); the request schema (`schema.py`), prompts
built as `dvl generate` builds them (`inputs.py`), images (`media.py`), the thread that owns the engine
(`worker.py`), response bodies and SSE chunks (`responses.py`) and Prometheus metrics (`metrics.py`).
"""

from dvl_jax.serving.http.app import Settings, create_app
from dvl_jax.serving.http.media import MediaLimits

__all__ = ["MediaLimits", "Settings", "create_app"]
