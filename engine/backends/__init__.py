"""Model backends: each library a model can come from (transformers text, image or causal LM, timm) in one file.

A backend owns loading, forward, the role patterns of its adaptable linears, merged save/load and PEFT's
``task_type``. ``register_backend`` adds one (a new backend is one file plus its import below);
``get_backend(name)`` returns it; ``list_backends()`` lists them in registration order.
"""

from engine.backends.base import Backend, get_backend, list_backends, register_backend

# The built-in backends register themselves on import (order matters: the first that claims a name loads it).
from engine.backends import hf_text, hf_image, timm_backend, hf_causal  # noqa: E402, F401, I001  isort: skip

__all__ = ["Backend", "get_backend", "list_backends", "register_backend"]
