"""TEST DOUBLE of QuantConfig in tensorrt_llm/models/modeling_utils.py: the same ten fields and
defaults, and to_dict = dataclasses.asdict, which PretrainedConfig.to_dict writes into an
engine's config.json as pretrained_config.quantization."""
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
    mamba_ssm_cache_dtype: Optional[str] = None

    @classmethod
    def from_dict(cls, config: dict) -> "QuantConfig":
        return cls(**config)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
