"""TEST DOUBLE of QuantConfig in tensorrt_llm/models/modeling_utils.py (fields and defaults)."""
import dataclasses
from typing import List, Optional

from tensorrt_llm.quantization.mode import QuantAlgo


@dataclasses.dataclass
class QuantConfig:
    quant_algo: Optional[QuantAlgo] = None
    kv_cache_quant_algo: Optional[QuantAlgo] = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    clamp_val: Optional[List[float]] = None
    use_meta_recipe: bool = False
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: Optional[List[str]] = None
