"""Analytic accounting: total/active parameters, FLOPs and memory, from the config alone.

- ``counts``: the data of a count (``Term``, ``Component``, ``ParamCount``, ``Counted``) and the
  vendors' active-parameter conventions;
- ``params``: the components of a ``ModelConfig`` and the term builders other counts reuse;
- ``flops``: FLOPs per token, weight bytes, KV cache;
- ``report``: the ``Report`` of ``moekit params`` (formula text, JSON).

Types moekit cannot build (hybrids, extra attention parts) are counted by their readers in
``moekit.interop.types`` into a ``Counted``; every function here takes either.
"""

from moekit.accounting.counts import (
    COMPONENTS,
    VENDOR_ACTIVE_CONVENTION,
    ActiveConvention,
    AttentionShape,
    Component,
    Counted,
    ParamCount,
    Term,
)
from moekit.accounting.flops import (
    DTYPE_BYTES,
    WEIGHT_DTYPES,
    FlopCount,
    count_flops,
    kv_cache_bytes_per_token,
    kv_cache_values_per_token,
    kv_cache_window_bytes,
    weights_bytes,
)
from moekit.accounting.params import count_extended, count_params, model_components, mtp_component
from moekit.accounting.report import Report, account

__all__ = [
    "COMPONENTS",
    "DTYPE_BYTES",
    "VENDOR_ACTIVE_CONVENTION",
    "WEIGHT_DTYPES",
    "ActiveConvention",
    "AttentionShape",
    "Component",
    "Counted",
    "FlopCount",
    "ParamCount",
    "Report",
    "Term",
    "account",
    "count_extended",
    "count_flops",
    "count_params",
    "kv_cache_bytes_per_token",
    "kv_cache_values_per_token",
    "kv_cache_window_bytes",
    "model_components",
    "mtp_component",
    "weights_bytes",
]
