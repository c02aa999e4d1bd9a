"""The one place where the transformers releases BlueLM supports (5.17 onwards) differ: the cache keyword.

transformers 5.24 renamed `past_key_values` to `cache` everywhere: forward keywords, output fields, the mask
helpers and the layers' gradient-checkpointing guard. BlueLM's own name is `cache` on every release; this
module translates to whatever the installed transformers calls it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from transformers.masking_utils import create_causal_mask
from transformers.utils.deprecation import deprecate_kwarg

_Function = TypeVar("_Function", bound=Callable[..., Any])

# The installed transformers' name for the KV cache: "cache" from 5.24, "past_key_values" before.
CACHE_KEYWORD = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
CACHE_IS_RENAMED = CACHE_KEYWORD == "cache"


def accepts_past_key_values(func: _Function) -> _Function:
    """Let `past_key_values=` mean exactly `cache=`.

    Where transformers has renamed it, with transformers' own deprecation warning (what its Llama does);
    before the rename it is transformers' own name (its generate() passes it every step), so no warning.
    """
    if CACHE_IS_RENAMED:
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(func)

    @functools.wraps(func)
    def renamed(*args: Any, **kwargs: Any) -> Any:
        if "past_key_values" in kwargs:
            old = kwargs.pop("past_key_values")
            if kwargs.get("cache") is None:
                kwargs["cache"] = old
        return func(*args, **kwargs)

    return renamed  # type: ignore[return-value]


def cache_keyword(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the installed transformers' name, for its helpers, layers and output classes."""
    return {CACHE_KEYWORD: cache}


def output_cache(outputs: Any) -> Any:
    """The cache a transformers output object carries, whatever the field is called."""
    return getattr(outputs, CACHE_KEYWORD)


def causal_mask(**kwargs: Any) -> Any:
    """transformers' `create_causal_mask`, given the cache as `cache=`."""
    return create_causal_mask(**{CACHE_KEYWORD if key == "cache" else key: value for key, value in kwargs.items()})
